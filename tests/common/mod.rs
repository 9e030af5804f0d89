//! Shared helpers for the integration tests: the project's Python (the reference stack), the
//! ftscript binary, and the demo model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's virtualenv Python (scripts/setup.sh creates it).
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// Runs a Python script from tests/py with arguments; panics with its output on failure.
pub fn py(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/py").join(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("cannot start python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python {script} {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs the ftscript binary.
pub fn ftscript(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftscript"))
        .args(args)
        .current_dir(cwd)
        .env("FTSCRIPT_LOG", "info")
        .output()
        .expect("cannot start ftscript")
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The demo model directory (SmolLM2-135M-Instruct imported from its GGUF by scripts/setup.sh).
pub fn demo_model() -> PathBuf {
    let p = root().join("models/smollm2-135m-instruct");
    assert!(p.join("config.json").exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

pub fn demo_gguf() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// Tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    let src = ftscript::nn::WeightSource::open_files(&[path.to_path_buf()]).unwrap();
    src.names().into_iter().map(|n| {
        let t = src.load_any(&n).unwrap();
        (n, t)
    }).collect()
}

/// The `__metadata__` entries of a safetensors file.
pub fn safetensors_metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// max |a − b| / max |b|
pub fn rel_err(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
}

/// Writes `body` as `dir/name` and runs it with `ftscript run` in `dir`; panics with the output
/// on failure, else returns it.
pub fn run_recipe(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    let out = ftscript(&["run", path.to_str().unwrap()], dir);
    let t = text(&out);
    assert!(out.status.success(), "recipe {name} failed:\n{t}");
    t
}

/// A tiny transformers-made Decoder with grouped-query attention, `dir/llama_gqa` (config,
/// safetensors, tokenizer, reference logits); returns its path.
pub fn tiny_llama(dir: &Path) -> PathBuf {
    tiny(dir, "llama_gqa")
}

/// The tiny model `name` of `tests/py/make_tiny.py`, made in `dir`; returns its directory.
pub fn tiny(dir: &Path, name: &str) -> PathBuf {
    py("make_tiny.py", &[dir.to_str().unwrap(), name]);
    dir.join(name)
}

/// [`tiny_llama`] and `n` short text records in `dir/data.jsonl`; returns the model's path.
pub fn tiny_model_and_text(dir: &Path, n: usize) -> String {
    tiny_and_text(dir, "llama_gqa", n)
}

/// The tiny model `name` and `n` short text records in `dir/data.jsonl`; returns the model's path.
pub fn tiny_and_text(dir: &Path, name: &str, n: usize) -> String {
    let model = tiny(dir, name);
    let mut lines = String::new();
    for i in 0..n {
        lines.push_str(&format!("{{\"text\": \"record {i}: the quick brown fox jumps over the lazy dog {}\"}}\n", i * 7 % 13));
    }
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
    model.display().to_string()
}

/// The lines of a run's `metrics.jsonl`.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Same bits (so +0 ≠ -0 and NaN = NaN).
pub fn same_bits(a: &tch::Tensor, b: &tch::Tensor) -> bool {
    use tch::Kind;
    if a.size() != b.size() || a.kind() != b.kind() {
        return false;
    }
    let int = match a.kind() {
        Kind::Float => Kind::Int,
        Kind::Half | Kind::BFloat16 => Kind::Int16,
        _ => return a.equal(b),
    };
    a.contiguous().view_dtype(int).equal(&b.contiguous().view_dtype(int))
}

/// Runs `code` with the project's Python; its stdout.
pub fn py_eval(code: &str) -> String {
    let out = Command::new(python()).args(["-c", code]).output().expect("cannot start python");
    assert!(out.status.success(), "python -c {code:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// ChatML, for the tiny model (the shipped recipes prompt through the model's chat template).
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny Llama with a chat template.
pub fn tiny_chat_model(d: &Path) -> PathBuf {
    with_chat_template(tiny_llama(d))
}

/// The tiny model at `model`, given a chat template.
pub fn with_chat_template(model: PathBuf) -> PathBuf {
    with_template(model, CHAT_TEMPLATE)
}

/// The tiny model at `model`, given the chat `template`.
pub fn with_template(model: PathBuf, template: &str) -> PathBuf {
    let path = model.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = template.into();
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    model
}

/// The training losses a run logged in its `metrics.jsonl`, a step each.
pub fn losses(metrics_jsonl: &Path) -> Vec<f64> {
    metrics(metrics_jsonl).iter().filter_map(|v| v.get("loss")?.as_f64()).collect()
}

/// `train`'s options for the settings a Python reference trained with (`{batch_size, grad_accum,
/// steps, lr, warmup, weight_decay, max_grad_norm}`), linear schedule, a log line a step.
pub fn reference_train_options(s: &serde_json::Value) -> String {
    format!(
        "batch_size: {}, grad_accum: {}, max_steps: {}, lr: {}, scheduler: \"linear\", warmup_steps: {}, weight_decay: {}, max_grad_norm: {}, log_every: 1",
        s["batch_size"], s["grad_accum"], s["steps"], s["lr"], s["warmup"], s["weight_decay"], s["max_grad_norm"]
    )
}

/// LoRA r=4, α=8 (A seeded with 1) on every linear layer, with `dropout`, and on the expert
/// stacks `target_parameters` names (peft's `target_parameters`).
pub fn all_linear_lora(dropout: f64, target_parameters: Vec<String>) -> ftscript::nn::peft::LoraSpec {
    ftscript::nn::peft::LoraSpec { r: 4, alpha: 8.0, dropout, targets: ftscript::nn::peft::Targets::AllLinear, use_rslora: false, use_dora: false, trainable_tokens: vec![], modules_to_save: vec![], adalora: None, seed: 1, target_parameters }
}
