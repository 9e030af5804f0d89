//! Text metrics for evaluating generated text: exact match, corpus BLEU and ROUGE-L.
//!
//! Pure Rust (no tensors), so recipes can score `model.generate(..)` outputs
//! against references inside `on_eval` callbacks. The BLEU and ROUGE-L
//! implementations reproduce the reference Python packages bit for bit in
//! their tokenization and counting, so numbers are comparable with papers and
//! with the Python fine-tuning stack:
//!
//! * [`corpus_bleu`] = `sacrebleu.corpus_bleu(hyps, [refs]).score` (sacrebleu 2.x
//!   defaults: `13a` tokenizer, case-sensitive, max order 4, `exp` smoothing,
//!   no effective order);
//! * [`rouge_l`] = `rouge_score.rouge_scorer.RougeScorer(['rougeL'],
//!   use_stemmer=False).score(reference, prediction)['rougeL'].fmeasure`.
//!
//! Corpus functions pair `predictions[i]` with `references[i]`; they panic when
//! the two slices have different lengths, and return 0.0 for an empty corpus.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

/// Python's `str.isspace()`: Unicode `White_Space` plus the ASCII
/// information separators U+001C..U+001F, which Python also treats as
/// whitespace (in `str.split()`, `str.rstrip()`), but Rust's `char::is_whitespace` does not.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn check_lengths(what: &str, predictions: usize, references: usize) {
    assert_eq!(
        predictions, references,
        "{what}: {predictions} predictions but {references} references (they are paired by index)"
    );
}

/// Arithmetic mean, `Σ xᵢ / n`, summed left to right; 0.0 when empty.
fn mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    values.sum::<f64>() / n as f64
}

// ---------------------------------------------------------------------------
// Exact match
// ---------------------------------------------------------------------------

/// Exact match of one prediction against one reference, case-sensitive.
///
/// `EM(p, r) = 1` if `trim(p) == trim(r)` else `0`, where `trim` removes
/// leading and trailing Unicode whitespace.
pub fn exact_match(prediction: &str, reference: &str) -> f64 {
    exact_match_with(prediction, reference, false)
}

/// [`exact_match`] with a choice of case sensitivity: with `ignore_case`, both
/// sides are compared after Unicode lowercasing (`str::to_lowercase`):
/// `EM(p, r) = [lower(trim(p)) == lower(trim(r))]`.
pub fn exact_match_with(prediction: &str, reference: &str, ignore_case: bool) -> f64 {
    let (p, r) = (prediction.trim(), reference.trim());
    let equal = if ignore_case {
        p.to_lowercase() == r.to_lowercase()
    } else {
        p == r
    };
    if equal {
        1.0
    } else {
        0.0
    }
}

/// Corpus exact match: the mean of [`exact_match`] over the pairs,
/// `(1/N) Σᵢ EM(pᵢ, rᵢ)` (the fraction of predictions that match exactly).
pub fn exact_match_corpus(predictions: &[String], references: &[String]) -> f64 {
    exact_match_corpus_with(predictions, references, false)
}

/// [`exact_match_corpus`] with a choice of case sensitivity (see [`exact_match_with`]).
pub fn exact_match_corpus_with(predictions: &[String], references: &[String], ignore_case: bool) -> f64 {
    check_lengths("exact_match_corpus", predictions.len(), references.len());
    mean(
        predictions
            .iter()
            .zip(references)
            .map(|(p, r)| exact_match_with(p, r, ignore_case)),
    )
}

// ---------------------------------------------------------------------------
// BLEU (sacrebleu)
// ---------------------------------------------------------------------------

/// Maximum n-gram order of BLEU (sacrebleu's `MAX_NGRAM_ORDER`).
pub const BLEU_MAX_ORDER: usize = 4;

/// Characters that mteval-v13a surrounds with spaces: sacrebleu's class
/// `[\{-\~\[-\` -\&\(-\+\:-\@\/]`, i.e. ASCII `{|}~`, `[\]^_\``, space to `&`,
/// `()*+`, `:;<=>?@` and `/`. Not included: `'`, `,`, `-`, `.`, digits, letters.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

struct Regexes13a {
    /// `([^0-9])([\.,])` → `\1 \2 `: period/comma after a non-digit.
    period_comma_after_non_digit: Regex,
    /// `([\.,])([^0-9])` → ` \1 \2`: period/comma before a non-digit.
    period_comma_before_non_digit: Regex,
    /// `([0-9])(-)` → `\1 \2 `: dash after a digit.
    dash_after_digit: Regex,
}

fn regexes_13a() -> &'static Regexes13a {
    static RE: OnceLock<Regexes13a> = OnceLock::new();
    RE.get_or_init(|| Regexes13a {
        period_comma_after_non_digit: Regex::new(r"([^0-9])([\.,])").unwrap(),
        period_comma_before_non_digit: Regex::new(r"([\.,])([^0-9])").unwrap(),
        dash_after_digit: Regex::new(r"([0-9])(-)").unwrap(),
    })
}

/// sacrebleu's `13a` tokenizer (mteval-v13a.pl, as used by WMT), preceded by
/// the `rstrip()` that BLEU applies to every segment. Returns the tokens
/// joined by single spaces.
///
/// Steps, in order (each regex substitution scans left to right without overlaps):
/// 1. strip trailing whitespace; delete `<skipped>` and `-\n`; `\n` → space;
/// 2. if the line has `&`: `&quot;`→`"`, `&amp;`→`&`, `&lt;`→`<`, `&gt;`→`>` (in that order);
/// 3. pad the line with a space on each side, then surround with spaces every
///    ASCII punctuation/symbol character except `'`, `,`, `-` and `.`;
/// 4. `([^0-9])([.,])` → `\1 \2 `; `([.,])([^0-9])` → ` \1 \2`; `([0-9])(-)` → `\1 \2 `;
/// 5. split on whitespace and join with single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let line = line.trim_end_matches(is_py_space);
    let mut s = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut padded = String::with_capacity(s.len() * 2 + 2);
    for c in std::iter::once(' ').chain(s.chars()).chain(std::iter::once(' ')) {
        if is_13a_symbol(c) {
            padded.push(' ');
            padded.push(c);
            padded.push(' ');
        } else {
            padded.push(c);
        }
    }
    let re = regexes_13a();
    let s = re.period_comma_after_non_digit.replace_all(&padded, "${1} ${2} ");
    let s = re.period_comma_before_non_digit.replace_all(&s, " ${1} ${2}");
    let s = re.dash_after_digit.replace_all(&s, "${1} ${2} ");
    s.split(is_py_space)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Counts of every n-gram, `1 ≤ n ≤ 4`, of a token sequence.
fn ngram_counts<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=BLEU_MAX_ORDER {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// BLEU's sufficient statistics and the score computed from them, as sacrebleu's `BLEUScore`.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// BLEU on the 0..100 scale.
    pub score: f64,
    /// Clipped n-gram matches, n = 1..4, summed over the corpus.
    pub counts: [u64; BLEU_MAX_ORDER],
    /// Hypothesis n-grams, n = 1..4, summed over the corpus.
    pub totals: [u64; BLEU_MAX_ORDER],
    /// Smoothed n-gram precisions in percent.
    pub precisions: [f64; BLEU_MAX_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    /// Total hypothesis length in tokens.
    pub sys_len: u64,
    /// Total (closest) reference length in tokens.
    pub ref_len: u64,
}

/// sacrebleu's `BLEU.compute_bleu` with `smooth_method='exp'`, `effective_order=False`.
///
/// * brevity penalty `BP = 1` if `c ≥ r`, else `exp(1 − r/c)` (0 when `c = 0`),
///   with `c` = `sys_len`, `r` = `ref_len`;
/// * if no n-gram of any order matches, BLEU = 0;
/// * precisions `pₙ = 100·mₙ/tₙ` (`mₙ` clipped matches, `tₙ` hypothesis n-grams);
///   when `mₙ = 0` the `exp` (NIST / mteval) smoothing uses `pₙ = 100 / (2ᵏ·tₙ)`
///   where `k` counts the zero-match orders seen so far (1, 2, ...); once some
///   `tₙ = 0` the remaining precisions stay 0;
/// * `BLEU = BP · exp((1/4) Σₙ log pₙ)` with `log 0` taken as −9999999999
///   (so a zero precision makes BLEU 0).
fn compute_bleu(counts: [u64; BLEU_MAX_ORDER], totals: [u64; BLEU_MAX_ORDER], sys_len: u64, ref_len: u64) -> BleuScore {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0; BLEU_MAX_ORDER];
    let done = |score, precisions| BleuScore {
        score,
        counts,
        totals,
        precisions,
        bp,
        sys_len,
        ref_len,
    };
    if counts.iter().all(|&m| m == 0) {
        return done(0.0, precisions);
    }
    let mut smooth = 1.0f64;
    for n in 0..BLEU_MAX_ORDER {
        if totals[n] == 0 {
            break;
        }
        if counts[n] == 0 {
            smooth *= 2.0;
            precisions[n] = 100.0 / (smooth * totals[n] as f64);
        } else {
            precisions[n] = 100.0 * counts[n] as f64 / totals[n] as f64;
        }
    }
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let sum_log: f64 = precisions.iter().map(|&p| log(p)).sum();
    done(bp * (sum_log / BLEU_MAX_ORDER as f64).exp(), precisions)
}

/// Corpus BLEU with one or more references per hypothesis: `references[i]`
/// holds the references of `hypotheses[i]`. Returns the score and its statistics.
///
/// Per segment (after [`tokenize_13a`] on the hypothesis and every reference):
/// the hypothesis n-gram counts are clipped by the maximum count of that n-gram
/// in any one reference, `mₙ += Σ_g min(count_hyp(g), maxᵣ count_r(g))`,
/// `tₙ += Σ_g count_hyp(g)`; `c += |hyp|`, and `r +=` the reference length closest
/// to `|hyp|` (the shorter one on ties). The corpus score comes from the summed
/// statistics (sacrebleu's `corpus_score` + `compute_bleu`): `BP = 1` if `c ≥ r`
/// else `exp(1 − r/c)` (0 if `c = 0`); BLEU = 0 if no n-gram matches at all;
/// `pₙ = 100·mₙ/tₙ`, or with `exp` smoothing `100/(2ᵏ·tₙ)` for the k-th order
/// with `mₙ = 0`, or 0 from the first order with `tₙ = 0` on (which zeroes BLEU);
/// `BLEU = BP·exp((1/4) Σₙ log pₙ)`. A hypothesis with no
/// reference counts as having an empty one.
pub fn corpus_bleu_stats(hypotheses: &[String], references: &[Vec<String>]) -> BleuScore {
    check_lengths("corpus_bleu", hypotheses.len(), references.len());
    let mut counts = [0u64; BLEU_MAX_ORDER];
    let mut totals = [0u64; BLEU_MAX_ORDER];
    let (mut sys_len, mut ref_len) = (0u64, 0u64);
    for (hyp, refs) in hypotheses.iter().zip(references) {
        let ref_strings: Vec<String> = refs.iter().map(|r| tokenize_13a(r)).collect();
        let ref_tokens: Vec<Vec<&str>> = ref_strings
            .iter()
            .map(|r| r.split(' ').filter(|t| !t.is_empty()).collect())
            .collect();
        let mut ref_ngrams: HashMap<&[&str], u64> = HashMap::new();
        for toks in &ref_tokens {
            for (gram, c) in ngram_counts(toks) {
                let e = ref_ngrams.entry(gram).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let hyp_string = tokenize_13a(hyp);
        let hyp_tokens: Vec<&str> = hyp_string.split(' ').filter(|t| !t.is_empty()).collect();
        let hyp_len = hyp_tokens.len() as u64;
        // Closest reference length; ties go to the shorter reference.
        let mut closest: Option<(u64, u64)> = None; // (diff, len)
        for toks in &ref_tokens {
            let len = toks.len() as u64;
            let diff = len.abs_diff(hyp_len);
            closest = match closest {
                Some((d, l)) if d < diff || (d == diff && l <= len) => Some((d, l)),
                _ => Some((diff, len)),
            };
        }
        sys_len += hyp_len;
        ref_len += closest.map_or(0, |(_, len)| len);
        for (gram, c) in ngram_counts(&hyp_tokens) {
            let n = gram.len() - 1;
            totals[n] += c;
            if let Some(&rc) = ref_ngrams.get(gram) {
                counts[n] += c.min(rc);
            }
        }
    }
    compute_bleu(counts, totals, sys_len, ref_len)
}

/// Corpus BLEU (0..100) with several references per hypothesis (`references[i]`
/// are the references of `hypotheses[i]`); see [`corpus_bleu_stats`].
pub fn corpus_bleu_multi(hypotheses: &[String], references: &[Vec<String>]) -> f64 {
    corpus_bleu_stats(hypotheses, references).score
}

/// Corpus BLEU on the 0..100 scale, one reference per hypothesis, exactly as
/// `sacrebleu.corpus_bleu(hypotheses, [references]).score` (sacrebleu 2.x):
/// `13a` tokenization ([`tokenize_13a`]), case-sensitive, n-grams up to 4,
/// clipped counts summed over the corpus, brevity penalty on total lengths,
/// `exp` smoothing of zero precisions, geometric mean of the 4 precisions:
///
/// `BLEU = BP · exp((1/4) Σₙ₌₁⁴ log pₙ)`, `pₙ = 100·Σ matchesₙ / Σ hyp-ngramsₙ`,
/// `BP = min(1, exp(1 − r/c))`.
///
/// See [`corpus_bleu_stats`] for the details (and [`corpus_bleu_multi`] for
/// several references).
pub fn corpus_bleu(hypotheses: &[String], references: &[String]) -> f64 {
    check_lengths("corpus_bleu", hypotheses.len(), references.len());
    let refs: Vec<Vec<String>> = references.iter().map(|r| vec![r.clone()]).collect();
    corpus_bleu_stats(hypotheses, &refs).score
}

// ---------------------------------------------------------------------------
// ROUGE-L (rouge-score)
// ---------------------------------------------------------------------------

/// rouge-score's default tokenizer without stemming: Unicode-lowercase the
/// text, treat every character outside `[a-z0-9]` as a separator, keep the
/// non-empty pieces. (So accented letters, CJK, and so on separate tokens and are dropped.)
pub fn tokenize_rouge(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Length of the longest common subsequence of two token sequences
/// (dynamic programming, `O(|a|·|b|)` time, `O(|b|)` memory):
/// `L[i][j] = L[i−1][j−1] + 1` if `aᵢ = bⱼ`, else `max(L[i−1][j], L[i][j−1])`.
fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L precision, recall and F-measure of one pair, as rouge-score's `Score`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// ROUGE-L of one prediction against one reference (rouge-score's `_score_lcs`):
/// with `P` = prediction tokens, `R` = reference tokens ([`tokenize_rouge`]) and
/// `L = LCS(R, P)`: `precision = L/|P|`, `recall = L/|R|`,
/// `F = 2·precision·recall / (precision + recall)` (0 when both are 0);
/// all three are 0 when either side has no tokens.
pub fn rouge_l_score(prediction: &str, reference: &str) -> RougeScore {
    let pred = tokenize_rouge(prediction);
    let reference = tokenize_rouge(reference);
    if pred.is_empty() || reference.is_empty() {
        return RougeScore {
            precision: 0.0,
            recall: 0.0,
            fmeasure: 0.0,
        };
    }
    let lcs = lcs_len(&reference, &pred) as f64;
    let precision = lcs / pred.len() as f64;
    let recall = lcs / reference.len() as f64;
    let fmeasure = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    RougeScore {
        precision,
        recall,
        fmeasure,
    }
}

/// ROUGE-L F-measure (0..1) of one pair, exactly as
/// `RougeScorer(['rougeL'], use_stemmer=False).score(reference, prediction)['rougeL'].fmeasure`;
/// see [`rouge_l_score`].
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    rouge_l_score(prediction, reference).fmeasure
}

/// Corpus ROUGE-L: the mean F-measure over the pairs, `(1/N) Σᵢ rouge_l(pᵢ, rᵢ)`.
pub fn rouge_l_corpus(predictions: &[String], references: &[String]) -> f64 {
    check_lengths("rouge_l_corpus", predictions.len(), references.len());
    mean(predictions.iter().zip(references).map(|(p, r)| rouge_l(p, r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn tokenizer_13a_examples() {
        assert_eq!(tokenize_13a("Hello, world!"), "Hello , world !");
        assert_eq!(
            tokenize_13a("It costs $3,000.50 (approx.)."),
            "It costs $ 3,000.50 ( approx . ) ."
        );
        assert_eq!(tokenize_13a("1990-2000 A-B don't"), "1990 - 2000 A-B don't");
        assert_eq!(tokenize_13a("&quot;x&quot; &amp;lt; <skipped>y  \n"), "\" x \" < y");
        assert_eq!(tokenize_13a(".5 and 5."), ". 5 and 5 .");
        assert_eq!(tokenize_13a(""), "");
    }

    #[test]
    fn exact_match_basic() {
        assert_eq!(exact_match(" a b ", "a b"), 1.0);
        assert_eq!(exact_match("A b", "a b"), 0.0);
        assert_eq!(exact_match_with("A b", "a b\n", true), 1.0);
        assert_eq!(exact_match_corpus(&s(&["x", "y"]), &s(&["x", "z"])), 0.5);
        assert_eq!(exact_match_corpus(&[], &[]), 0.0);
    }

    #[test]
    fn bleu_edges() {
        let h = s(&["the cat sat on the mat"]);
        assert!((corpus_bleu(&h, &h) - 100.0).abs() < 1e-9);
        assert_eq!(corpus_bleu(&s(&[""]), &s(&["a b"])), 0.0);
        assert_eq!(corpus_bleu(&s(&["x y"]), &s(&["a b"])), 0.0);
        // multi-reference: a perfect match with either reference scores 100
        let m = corpus_bleu_multi(&h, &[s(&["a dog", "the cat sat on the mat"])]);
        assert!((m - 100.0).abs() < 1e-9);
    }

    #[test]
    fn rouge_examples() {
        assert_eq!(
            tokenize_rouge("The Cat's 3rd-café!"),
            vec!["the", "cat", "s", "3rd", "caf"]
        );
        let r = rouge_l_score("testing one two", "testing");
        assert!((r.precision - 1.0 / 3.0).abs() < 1e-12 && r.recall == 1.0);
        assert_eq!(rouge_l("", "a"), 0.0);
        assert_eq!(rouge_l("a b c", "a b c"), 1.0);
    }
}
