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
    let (ok, out) = run("let ds = load_dataset(\"data/train.jsonl\");\nlet m = ds.map(|r| if r.n == 6 { 1 } else { r });\n");
    assert!(!ok, "{out}");
    assert!(out.contains("map: record 6") && out.contains("must return a map"), "{out}");
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
