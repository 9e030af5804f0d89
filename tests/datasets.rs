//! Datasets from a recipe: load_dataset, len, indexing, map, filter, shuffle, split, concat,
//! iteration, and the errors a broken file or callback gives.

mod common;

use common::{ftscript, text};
use std::path::Path;

fn setup(dir: &Path, recipe: &str) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let mut jsonl = String::new();
    for i in 0..10 {
        jsonl.push_str(&format!("{{\"instruction\": \"question {i}\", \"output\": \"answer {i}\", \"n\": {i}}}\n"));
        if i == 4 {
            jsonl.push('\n'); // blank lines are skipped
        }
    }
    std::fs::write(dir.join("data/train.jsonl"), jsonl).unwrap();
    std::fs::write(dir.join("data/more.json"), r#"[{"instruction": "extra", "output": "x", "n": 100}]"#).unwrap();
    std::fs::write(dir.join("data/bad.jsonl"), "{\"n\": 1}\n{\"n\": 2}\n{\"n\": 3,}\n{\"n\": 4}\n").unwrap();
    std::fs::write(dir.join("recipe.rhai"), recipe).unwrap();
}

fn run(recipe: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), recipe);
    let out = ftscript(&["run", "recipe.rhai"], dir.path());
    (out.status.success(), text(&out))
}

#[test]
fn recipe_shapes_a_dataset() {
    let recipe = r#"
let ds = load_dataset("data/train.jsonl");
print(`len=${ds.len} ${len(ds)}`);
print(`first=${ds[0].instruction} last=${ds[9].output}`);
let loud = ds.map(|r| #{instruction: r.instruction, output: r.output + "!", n: r.n * 10});
print(`mapped=${loud[3].output} ${loud[3].n} ${loud.len}`);
let even = ds.filter(|r| r.n % 2 == 0);
print(`even=${even.len} ${even[1].n}`);
let a = ds.shuffle(7);
let b = ds.shuffle(7);
let same = true;
for i in 0..ds.len { if a[i].n != b[i].n { same = false; } }
print(`shuffle_same=${same}`);
let parts = ds.split(0.2, 42);
print(`split=${parts.train.len}/${parts.eval.len}`);
let again = ds.split(0.2, 42);
print(`split_same=${parts.eval[0].n == again.eval[0].n && parts.eval[1].n == again.eval[1].n}`);
let both = parts.train + parts.eval + load_dataset("data/more.json");
let total = 0;
for r in both { total += r.n; }
print(`concat=${both.len} total=${total}`);
print(`concat2=${even.concat(ds).len}`);
let built = dataset([#{text: "a"}, #{text: "b"}]);
print(`built=${built.len} ${built.to_array()[1].text}`);
print(`${ds}`);
"#;
    let (ok, out) = run(recipe);
    assert!(ok, "{out}");
    for want in [
        "len=10 10",
        "first=question 0 last=answer 9",
        "mapped=answer 3! 30 10",
        "even=5 2",
        "shuffle_same=true",
        "split=8/2",
        "split_same=true",
        "concat=11 total=145",
        "concat2=15",
        "built=2 b",
        "Dataset(10 records from data/train.jsonl)",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let (ok, out) = run("let ds = load_dataset(\"data/bad.jsonl\");\nprint(\"unreachable\");\n");
    assert!(!ok, "{out}");
    assert!(out.contains("bad.jsonl:3:"), "{out}");
    assert!(out.contains("recipe.rhai:1"), "{out}");
    assert!(!out.contains("unreachable"), "{out}");
}

#[test]
fn callback_and_index_errors_name_the_record() {
    // the record is named by its file and line (line 8: a blank line precedes it), also after a
    // shuffle, a split and a filter
    let (ok, out) = run("let ds = load_dataset(\"data/train.jsonl\").shuffle(3).split(2, 1).train.filter(|r| r.n != 9);\nlet m = ds.map(|r| if r.n == 6 { 1 } else { r });\n");
    assert!(!ok, "{out}");
    assert!(out.contains("map: data/train.jsonl:8") && out.contains("must return a map"), "{out}");
    let (ok, out) = run("let ds = load_dataset(\"data/train.jsonl\");\nprint(ds[10]);\n");
    assert!(!ok, "{out}");
    assert!(out.contains("index 10 out of range") && out.contains("recipe.rhai:2"), "{out}");
    let (ok, out) = run("let ds = load_dataset(\"data/missing.jsonl\");\n");
    assert!(!ok, "{out}");
    assert!(out.contains("data/missing.jsonl"), "{out}");
}

#[test]
fn api_lists_dataset_functions() {
    let dir = tempfile::tempdir().unwrap();
    let out = ftscript(&["api"], dir.path());
    let out = text(&out);
    for want in ["load_dataset(path: &str) -> Dataset", "split(ds: &mut Dataset, fraction: f64, seed: i64) -> Map"] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
}

/// ChatML with transformers' assistant-mask markers around each assistant turn's text and end.
const MARKED_CHATML: &str = "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[test]
fn multi_turn_chat_learns_every_assistant_turn_like_transformers_and_trl() {
    use ftscript::data::format::{format_builtin, tokenize, TokenizeOptions, TrainOn, IGNORE};
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama(tmp.path());
    let set_template = |template: &str| ftscript::tokenizer::Tokenizer::from_dir(&common::with_template(model.clone(), template), Some(0), Some(1), None).unwrap();
    let conversations = serde_json::json!([
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
         {"role": "user", "content": "good"}, {"role": "assistant", "content": "bye, café 🙂"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "6"},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "The quick brown fox."}],
        [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b\n"},
         {"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "the capital of France"}],
    ]);
    let conv_path = tmp.path().join("conversations.json");
    std::fs::write(&conv_path, conversations.to_string()).unwrap();
    let marked = set_template(MARKED_CHATML);
    let out = tmp.path().join("masks.json");
    common::py("chat_mask_reference.py", &[model.to_str().unwrap(), conv_path.to_str().unwrap(), out.to_str().unwrap()]);
    let reference: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // the same template without the markers: ftscript finds each assistant turn by rendering prefixes
    let unmarked = MARKED_CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "");
    let plain = set_template(&unmarked);
    let opts = TokenizeOptions { max_length: 0, train_on_prompt: false };
    let ints = |v: &serde_json::Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    for (i, (conv, want)) in conversations.as_array().unwrap().iter().zip(&reference).enumerate() {
        let record = serde_json::json!({ "messages": conv });
        let ids = ints(&want["input_ids"]);
        let hf_labels: Vec<i64> = ids.iter().zip(ints(&want["assistant_masks"])).map(|(&id, m)| if m == 1 { id } else { IGNORE }).collect();
        assert_eq!(hf_labels, ints(&want["trl_labels"]), "conversation {i}: transformers' and TRL's masks differ");
        let turns = conv.as_array().unwrap().iter().filter(|m| m["role"] == "assistant").count();
        assert!(turns >= 2, "conversation {i} should have several assistant turns");
        for (what, tok) in [("marked", &marked), ("unmarked", &plain)] {
            let f = format_builtin("chat_template", &record, &format!("conversation {i}"), tok, TrainOn::AllAssistantTurns).unwrap();
            let ex = tokenize(&f, tok, &opts).unwrap();
            assert_eq!(ex.input_ids, ids, "conversation {i} ({what} template): token ids differ from apply_chat_template");
            assert_eq!(ex.labels, hf_labels, "conversation {i} ({what} template): labels differ from transformers' assistant mask");
        }
        // train_on: "last" learns only the last assistant turn, of the same tokens
        let last_turn = hf_labels.iter().rposition(|&l| l == IGNORE).unwrap() + 1;
        let want: Vec<i64> = hf_labels.iter().enumerate().map(|(k, &l)| if k < last_turn { IGNORE } else { l }).collect();
        for (what, tok) in [("marked", &marked), ("unmarked", &plain)] {
            let f = format_builtin("chat_template", &record, &format!("conversation {i}"), tok, TrainOn::LastAssistantTurn).unwrap();
            let last = tokenize(&f, tok, &opts).unwrap();
            assert_eq!(last.input_ids, ids, "conversation {i} ({what} template), last turn: token ids differ from apply_chat_template");
            assert_eq!(last.labels, want, "conversation {i} ({what} template): the last turn's labels");
        }
    }
}
