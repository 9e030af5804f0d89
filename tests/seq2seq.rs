//! Encoder-decoder models against transformers: tiny T5 v1.0 (ReLU, tied head) and Flan-T5-style
//! (gated-GELU, untied head) models made at test time by transformers.

mod common;
use common::*;
use ftscript::models::t5::T5;
use std::path::{Path, PathBuf};
use tch::Device;

/// The tiny T5 `name` of tests/py/t5_reference.py, made in `dir`.
fn tiny_t5(dir: &Path, name: &str) -> PathBuf {
    py("t5_reference.py", &[dir.to_str().unwrap(), name]);
    dir.join(name)
}

/// fp32 logits and the loss with `labels` (a padded source, -100 in the labels) equal
/// transformers' (rel ≤ 1e-4), and 20 greedy tokens are the same, for both kinds of T5.
#[test]
fn t5_logits_loss_and_greedy_tokens_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["t5", "flan_t5"] {
        let dir = tiny_t5(tmp.path(), name);
        let m = T5::from_dir(&dir, "fp32", Device::Cpu).unwrap();
        let r = read_safetensors(&dir.join("reference.safetensors"));
        let (ids, mask, labels) = (&r["input_ids"], &r["attention_mask"], &r["labels"]);
        let logits = tch::no_grad(|| m.forward(ids, mask, labels, false));
        // the -100 positions of the second row have logits too (of padding inputs)
        let e = rel_err(&logits, &r["logits"]);
        assert!(e < 1e-4, "{name}: logits rel err {e}");
        let loss = tch::no_grad(|| m.loss(ids, mask, labels, false)).double_value(&[]);
        let want = r["loss"].double_value(&[]);
        assert!((loss - want).abs() <= 1e-4 * want, "{name}: loss {loss} vs transformers {want}");
        let source: Vec<i64> = Vec::try_from(ids.get(0)).unwrap();
        let greedy = m.generate(&source, &ftscript::generate::Sampling { max_new_tokens: 20, ..Default::default() }, &[]).unwrap();
        let want: Vec<i64> = Vec::try_from(&r["greedy"]).unwrap();
        assert_eq!(greedy, want, "{name}: greedy tokens");

        // in bf16, and in fp16 with the feed-forwards' `wo` kept fp32: transformers' numbers
        // exactly where the two libtorch builds compute alike (bit for bit here)
        for (dtype, key) in [("bf16", "logits_bf16"), ("fp16", "logits_fp16")] {
            let half = T5::from_dir(&dir, dtype, Device::Cpu).unwrap();
            let logits = tch::no_grad(|| half.forward(ids, mask, labels, false)).to_kind(tch::Kind::Float);
            // mean |a − b| / mean |b| (one rounding in bf16's 3 digits moves a max-based error by ~1e-2)
            let mean_err = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().mean(tch::Kind::Double).double_value(&[]) / b.abs().mean(tch::Kind::Double).double_value(&[]);
            let e = mean_err(&logits, &r[key]);
            let from_fp32 = mean_err(&r[key], &r["logits"]);
            assert!(e < from_fp32 / 10.0, "{name} {dtype}: logits mean error {e} against transformers', {from_fp32} between its {dtype} and fp32");
        }
    }
}

/// The user's path: a recipe loads a T5 directory, scores its reference targets with
/// `model.loss(source, target)` and generates with `model.generate(source, opts)`: the losses
/// equal transformers' `loss` with `labels` and the texts its greedy `generate`, for both kinds;
/// with a peft-made LoRA loaded (`model.load_adapter(dir)`), the losses equal peft's.
#[test]
fn a_recipe_scores_and_generates_with_t5_as_transformers_does() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for name in ["t5", "flan_t5"] {
        let dir = tiny_t5(d, name);
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let pairs = reference["pairs"].as_array().unwrap();
        let mut body = format!("let m = load_model(\"{}\");\n", dir.display());
        for (i, p) in pairs.iter().enumerate() {
            body.push_str(&format!(
                "print(`LOSS{i}=${{m.loss({s}, {t})}}`);\nprint(`GEN{i}=${{m.generate({s}, #{{ max_new_tokens: 20 }}).to_debug()}}`);\n",
                s = p["source"],
                t = p["target"]
            ));
        }
        // a peft-made LoRA (q, v, wo of every block; random B) loaded onto it
        body.push_str(&format!("m.load_adapter(\"{}\");\n", dir.join("peft_adapter").display()));
        for (i, p) in pairs.iter().enumerate() {
            body.push_str(&format!("print(`ADAPTED{i}=${{m.loss({s}, {t})}}`);\n", s = p["source"], t = p["target"]));
        }
        let t = run_recipe(d, &format!("{name}.rhai"), &body);
        for (i, p) in pairs.iter().enumerate() {
            let field = |key: &str| t.lines().find_map(|l| l.strip_prefix(&format!("{key}{i}="))).unwrap_or_else(|| panic!("no {key}{i} in:\n{t}")).to_string();
            let loss: f64 = field("LOSS").parse().unwrap();
            let want = p["loss"].as_f64().unwrap();
            assert!((loss - want).abs() <= 1e-4 * want, "{name} pair {i}: loss {loss} vs transformers {want}");
            let adapted: f64 = field("ADAPTED").parse().unwrap();
            let want = p["loss_with_adapter"].as_f64().unwrap();
            assert!((adapted - want).abs() <= 1e-4 * want, "{name} pair {i}: loss with the peft adapter {adapted} vs peft {want}");
            assert!((adapted - p["loss"].as_f64().unwrap()).abs() > 1e-3, "{name} pair {i}: the adapter changes nothing");
            // Rust's debug form of the text (quoted, newlines escaped), as Rhai's `to_debug` writes it
            assert_eq!(field("GEN"), format!("{:?}", p["generated"].as_str().unwrap()), "{name} pair {i}: generated text");
        }
    }
}
