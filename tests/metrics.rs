//! Text metrics parity: `ftscript::train::metrics` against sacrebleu (corpus BLEU)
//! and rouge-score (ROUGE-L), run by tests/py/metrics_reference.py in the project venv.

use std::path::Path;
use std::process::Command;

use ftscript::train::metrics::*;
use serde_json::{json, Value};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/metrics_reference.py");

/// (hypothesis, reference) pairs covering the tokenizers' corner cases.
const PAIRS: &[(&str, &str)] = &[
    // exact matches
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("Paris is the capital of France.", "Paris is the capital of France."),
    ("42", "42"),
    // punctuation
    ("Hello, world!", "Hello world"),
    ("Wait... what?!", "Wait -- what?"),
    (
        "\"Quoted,\" she said; (really) [yes] {no} <tag> a/b",
        "\"Quoted\", she said: really, yes, no, tag, a / b",
    ),
    ("It's John's book, isn't it?", "It is John's book, is it not?"),
    (
        "e-mail me at first.last@example.com or visit https://example.org/a?b=c&d=e.",
        "Email me at first.last@example.com, or visit https://example.org/a?b=c&d=e",
    ),
    // numbers: thousands separators, decimals, ranges, versions
    (
        "It costs $3,000.50 (approx.) in 1990-2000.",
        "It costs about $3,000.50 between 1990 and 2000.",
    ),
    (
        "Version 1.2.3 was released on 2024-05-01, 3 days early.",
        "Version 1.2.3 was released on 2024-05-01 three days early.",
    ),
    (
        "2+2=4 and x^2 >= 0; 50% of 10 is 5.",
        "2 + 2 = 4, and x^2 >= 0. Half of 10 is 5.",
    ),
    ("The U.S.A. has 50 states.", "The USA has 50 states."),
    (".5 and 5. and 5,5 and ,5", "0.5 and 5 and 5,5 and 5"),
    // case differences
    ("THE QUICK BROWN FOX", "the quick brown fox"),
    (
        "The Quick Brown Fox jumps over the lazy dog",
        "the quick brown fox jumps over the Lazy Dog",
    ),
    // empty / whitespace-only hypotheses and references
    ("", "Something should have been said here."),
    ("   \t  ", "Nothing but whitespace was produced."),
    ("Only the hypothesis has words.", ""),
    // partial overlaps, reordering, repetition (clipping)
    ("the the the the the the the", "the cat is on the mat"),
    ("on the mat the cat sat", "the cat sat on the mat"),
    (
        "A fast brown fox leaps over a sleepy dog near the river bank.",
        "The quick brown fox jumps over the lazy dog by the river bank.",
    ),
    (
        "Machine learning models require large amounts of data to train effectively.",
        "Training machine learning models effectively requires a lot of data.",
    ),
    (
        "He went to the store and bought milk, eggs, and bread for breakfast.",
        "He went to the store to buy milk, eggs and bread for breakfast.",
    ),
    ("Yes", "No, I do not think so."),
    ("completely unrelated words here", "nothing in common at all"),
    // unicode: accents, CJK, Greek, emoji, special whitespace and case mappings
    ("Café au lait — très bon!", "Cafe au lait, tres bon!"),
    ("naïve résumé coöperate", "naive resume cooperate"),
    ("東京は日本の首都です。", "東京は日本の首都である。"),
    ("ΣΊΣΥΦΟΣ και ο βράχος", "σίσυφος και ο βράχος"),
    ("I ❤️ Rust 🦀 and Python 🐍", "I love Rust 🦀 and Python"),
    (
        "non\u{a0}breaking\u{2003}spaces\u{3000}here",
        "non breaking spaces here",
    ),
    ("The \u{212a}elvin sign and İstanbul", "The kelvin sign and istanbul"),
    ("separator\u{1c}chars\u{1f}here", "separator chars here"),
    ("Straße and STRASSE", "strasse and strasse"),
    // markup that the 13a tokenizer rewrites
    (
        "Tom &amp; Jerry &quot;rock&quot; &lt;3 &amp;lt;",
        "Tom & Jerry \"rock\" <3 &lt;",
    ),
    (
        "line one\nline two; hyphen-\nated <skipped> word",
        "line one line two; hyphenated word",
    ),
    ("trailing spaces and newline   \n", "trailing spaces and newline"),
    (
        "Already tokenized text , with spaces before punctuation .",
        "Already tokenized text, with spaces before punctuation.",
    ),
];

fn strings(v: impl Iterator<Item = &'static str>) -> Vec<String> {
    v.map(str::to_owned).collect()
}

struct Corpus {
    name: String,
    hyps: Vec<String>,
    refs: Vec<String>,
    multi: Option<Vec<Vec<String>>>,
}

/// Runs the Python reference once on all corpora and returns its JSON answer for each.
fn reference(dir: &Path, corpora: &[Corpus]) -> Vec<Value> {
    let path = dir.join("corpora.json");
    let input: Vec<Value> = corpora
        .iter()
        .map(|c| {
            let mut v = json!({"hypotheses": c.hyps, "references": c.refs});
            if let Some(m) = &c.multi {
                v["multi_references"] = json!(m);
            }
            v
        })
        .collect();
    std::fs::write(&path, serde_json::to_vec(&input).unwrap()).unwrap();
    let out = Command::new(PYTHON)
        .arg(SCRIPT)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e}"));
    assert!(
        out.status.success(),
        "{SCRIPT} failed ({}); it needs sacrebleu and rouge-score in the project venv:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Vec<Value> = serde_json::from_slice(&out.stdout).expect("reference script printed invalid JSON");
    assert_eq!(answer.len(), corpora.len());
    answer
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Compares every metric on one corpus with the Python reference; returns (BLEU |diff|, max ROUGE-L |diff|).
fn check(c: &Corpus, want: &Value) -> (f64, f64) {
    let (name, hyps, refs) = (&c.name, &c.hyps, &c.refs);

    // 13a tokenization, segment by segment.
    for (h, t) in hyps.iter().zip(want["tokens_13a"].as_array().unwrap()) {
        assert_eq!(
            tokenize_13a(h),
            t.as_str().unwrap(),
            "{name}: 13a tokenization of {h:?}"
        );
    }

    // BLEU statistics must be identical; the score within 0.01.
    let single: Vec<Vec<String>> = refs.iter().map(|r| vec![r.clone()]).collect();
    let stats = corpus_bleu_stats(hyps, &single);
    assert_eq!(
        stats.counts.to_vec(),
        u64s(&want["bleu_counts"]),
        "{name}: BLEU n-gram matches"
    );
    assert_eq!(
        stats.totals.to_vec(),
        u64s(&want["bleu_totals"]),
        "{name}: BLEU n-gram totals"
    );
    assert_eq!(
        stats.sys_len,
        want["bleu_sys_len"].as_u64().unwrap(),
        "{name}: hypothesis length"
    );
    assert_eq!(
        stats.ref_len,
        want["bleu_ref_len"].as_u64().unwrap(),
        "{name}: reference length"
    );
    let ours = corpus_bleu(hyps, refs);
    assert_eq!(ours, stats.score);
    let theirs = want["bleu"].as_f64().unwrap();
    let bleu_diff = (ours - theirs).abs();
    assert!(bleu_diff <= 0.01, "{name}: BLEU {ours} vs sacrebleu {theirs}");

    // ROUGE-L per pair and mean.
    let per_pair = want["rouge_l"].as_array().unwrap();
    assert_eq!(per_pair.len(), hyps.len());
    let mut rouge_diff = 0.0f64;
    for ((h, r), f) in hyps.iter().zip(refs).zip(per_pair) {
        let (ours, theirs) = (rouge_l(h, r), f.as_f64().unwrap());
        assert!(
            (ours - theirs).abs() <= 1e-6,
            "{name}: ROUGE-L of {h:?} vs {r:?}: {ours} vs rouge-score {theirs}"
        );
        rouge_diff = rouge_diff.max((ours - theirs).abs());
    }
    let (ours_l, theirs_l) = (rouge_l_corpus(hyps, refs), want["rouge_l_mean"].as_f64().unwrap());
    assert!(
        (ours_l - theirs_l).abs() <= 1e-6,
        "{name}: mean ROUGE-L {ours_l} vs rouge-score {theirs_l}"
    );
    rouge_diff = rouge_diff.max((ours_l - theirs_l).abs());

    if let Some(m) = &c.multi {
        let (ours_m, theirs_m) = (corpus_bleu_multi(hyps, m), want["bleu_multi"].as_f64().unwrap());
        println!("{name}: multi-reference BLEU ours {ours_m:.10} sacrebleu {theirs_m:.10}");
        assert!(
            (ours_m - theirs_m).abs() <= 0.01,
            "{name}: multi-reference BLEU {ours_m} vs sacrebleu {theirs_m}"
        );
    }
    if hyps.len() > 1 {
        println!("{name}: BLEU ours {ours:.10} sacrebleu {theirs:.10}; ROUGE-L mean ours {ours_l:.12} rouge-score {theirs_l:.12}");
    }
    (bleu_diff, rouge_diff)
}

#[test]
fn bleu_and_rouge_l_match_sacrebleu_and_rouge_score() {
    assert!(PAIRS.len() >= 30);
    let dir = tempfile::tempdir().unwrap();
    let hyps = strings(PAIRS.iter().map(|p| p.0));
    let refs = strings(PAIRS.iter().map(|p| p.1));

    // The whole corpus, with a second reference per hypothesis for multi-reference BLEU.
    let multi: Vec<Vec<String>> = PAIRS
        .iter()
        .enumerate()
        .map(|(i, (h, r))| {
            let second = if i % 3 == 0 {
                h.to_uppercase()
            } else {
                PAIRS[(i + 7) % PAIRS.len()].1.to_owned()
            };
            vec![r.to_string(), second]
        })
        .collect();
    let mut corpora = vec![Corpus {
        name: "all".into(),
        hyps: hyps.clone(),
        refs: refs.clone(),
        multi: Some(multi),
    }];

    // Short segments: no 4-gram (and some no 3-gram) matches, so only the `exp` smoothing
    // keeps BLEU above 0; hypotheses shorter than references, so the brevity penalty applies.
    corpora.push(Corpus {
        name: "short".into(),
        hyps: strings(["the cat", "a dog barks", "red blue green yellow", "one two"].into_iter()),
        refs: strings(
            [
                "the cat sat",
                "the dog barks loudly",
                "red green blue yellow",
                "one two three four five",
            ]
            .into_iter(),
        ),
        multi: None,
    });

    // Multiple references at equal distance from the hypothesis length: the shorter one counts.
    corpora.push(Corpus {
        name: "ties".into(),
        hyps: strings(["a b c d", "one two three", "x y z w v u"].into_iter()),
        refs: strings(["a b c", "one two three four", "x y z w"].into_iter()),
        multi: Some(vec![
            strings(["a b c d e", "a b c"].into_iter()),
            strings(["one two three four", "one two"].into_iter()),
            strings(["x y z w v u t s", "x y z w"].into_iter()),
        ]),
    });

    // Every pair as its own corpus: sentence-sized corpora hit the brevity penalty, smoothing,
    // the all-zero early exit and empty sides one by one.
    for (i, (h, r)) in hyps.iter().zip(&refs).enumerate() {
        corpora.push(Corpus {
            name: format!("pair{i}"),
            hyps: vec![h.clone()],
            refs: vec![r.clone()],
            multi: None,
        });
    }

    let answers = reference(dir.path(), &corpora);
    let (mut bleu_diff, mut rouge_diff) = (0.0f64, 0.0f64);
    for (c, want) in corpora.iter().zip(&answers) {
        let (b, r) = check(c, want);
        bleu_diff = bleu_diff.max(b);
        rouge_diff = rouge_diff.max(r);
    }
    println!(
        "{} corpora: max BLEU |diff| {bleu_diff:.2e}, max ROUGE-L |diff| {rouge_diff:.2e}",
        corpora.len()
    );
}

#[test]
fn exact_match_semantics() {
    assert_eq!(exact_match("  Paris\n", "Paris"), 1.0);
    assert_eq!(exact_match("paris", "Paris"), 0.0);
    assert_eq!(exact_match_with("paris ", "PARIS", true), 1.0);
    let p = strings(["a", "b ", "C", ""].into_iter());
    let r = strings(["a", "b", "c", ""].into_iter());
    assert_eq!(exact_match_corpus(&p, &r), 0.75);
    assert_eq!(exact_match_corpus_with(&p, &r, true), 1.0);
}
