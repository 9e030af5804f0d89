//! Hostile input, by bounded mutation fuzzing with fixed seeds (cargo-fuzz needs a nightly
//! toolchain): valid files of each kind ftscript reads — GGUF, safetensors, config.json,
//! tokenizer_config.json's chat template, JSONL datasets — are corrupted (bytes flipped, runs
//! zeroed or set to 0xff, cut short, lengths made absurd) and read back. Each read must return
//! `Ok` or an error; none may panic. `FTSCRIPT_FUZZ_CASES` sets the cases per target (default
//! 200); the seed of a failing case is in the message.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;

fn cases() -> u64 {
    std::env::var("FTSCRIPT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// `bytes` corrupted one of five ways, chosen by the seed.
fn mutate(bytes: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return b;
    }
    // most of a file's structure sits in its head: aim there half the time
    let head = b.len().min(4096);
    let at = |rng: &mut rand::rngs::StdRng, n: usize| if rng.gen_bool(0.5) { rng.gen_range(0..head.min(n)) } else { rng.gen_range(0..n) };
    match seed % 5 {
        0 => {
            for _ in 0..rng.gen_range(1..8) {
                let i = at(&mut rng, b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => {
            let i = at(&mut rng, b.len());
            let n = rng.gen_range(1..16).min(b.len() - i);
            let v = if rng.gen_bool(0.5) { 0 } else { 0xff };
            b[i..i + n].iter_mut().for_each(|x| *x = v);
        }
        2 => b.truncate(at(&mut rng, b.len())),
        3 => {
            // an absurd little-endian u64 where a length or count may be
            let i = at(&mut rng, b.len().saturating_sub(8).max(1));
            let v: u64 = [u64::MAX, u64::MAX / 2, 1 << 40, 1 << 32, 0x7fff_ffff][rng.gen_range(0..5)];
            for (k, x) in v.to_le_bytes().iter().enumerate() {
                if let Some(y) = b.get_mut(i + k) {
                    *y = *x;
                }
            }
        }
        _ => {
            let i = at(&mut rng, b.len());
            b.insert(i, rng.gen());
        }
    }
    b
}

/// Runs `read` on `cases()` corruptions of `valid`, written to `dir/name`; fails on a panic.
fn survives(dir: &Path, name: &str, valid: &[u8], read: impl Fn(&Path)) {
    let path = dir.join(name);
    let mut errors = 0;
    for seed in 0..cases() {
        std::fs::write(&path, mutate(valid, seed)).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&path)));
        if let Err(p) = outcome {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            panic!("{name}: seed {seed} panicked: {msg}");
        }
        errors += 1;
    }
    assert!(errors > 0);
}

#[test]
fn corrupted_gguf_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let m = ftscript::models::load(&model, "fp32", tch::Device::Cpu).unwrap();
    let gguf = d.join("tiny.gguf");
    ftscript::gguf::export::save_gguf(&m, &gguf, ftscript::gguf::export::FileType::parse("q8_0").unwrap()).unwrap();
    let valid = std::fs::read(&gguf).unwrap();
    survives(d, "mutated.gguf", &valid, |p| {
        if let Ok(g) = ftscript::gguf::GgufFile::open(p) {
            let _ = g.metadata();
        }
        let _ = ftscript::gguf::import(p);
    });
}

#[test]
fn corrupted_safetensors_and_configs_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    survives(d, "model.safetensors", &weights, |p| {
        if let Ok(w) = ftscript::nn::WeightSource::open_files(&[p.to_path_buf()]) {
            for name in w.names() {
                let _ = w.load_any(&name);
            }
        }
    });
    // a whole model directory with the corrupted weights loads or errs
    let broken = d.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), broken.join(f)).unwrap();
    }
    survives(&broken, "model.safetensors", &weights, |_| {
        let _ = ftscript::models::load(&broken, "fp32", tch::Device::Cpu);
    });
    let config = std::fs::read(model.join("config.json")).unwrap();
    survives(d, "config.json", &config, |p| {
        let _ = ftscript::models::config::DecoderConfig::from_file(p);
    });
}

#[test]
fn corrupted_datasets_and_chat_templates_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lines: Vec<String> = (0..20).map(|i| serde_json::json!({"instruction": "Say", "input": format!("n {i} é ✓"), "output": "ok"}).to_string()).collect();
    survives(d, "data.jsonl", lines.join("\n").as_bytes(), |p| {
        let _ = ftscript::data::dataset::Dataset::load(p);
    });
    let as_json = format!("[{}]", lines.join(","));
    survives(d, "data.json", as_json.as_bytes(), |p| {
        let _ = ftscript::data::dataset::Dataset::load(p);
    });
    let template = "{% for m in messages %}{% if m.role == 'system' %}<<{{ m.content | trim }}>>{% else %}<|im_start|>{{ m.role }}\n{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let messages = serde_json::json!([{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]);
    survives(d, "template.jinja", template.as_bytes(), |p| {
        let t = String::from_utf8_lossy(&std::fs::read(p).unwrap()).to_string();
        let _ = ftscript::data::template::render_chat_spans(&t, &messages, true, Some("<s>"), Some("</s>"));
    });
}
