//! Preference objectives against TRL 1.x (`tests/py/trl_reference.py`): DPO (sigmoid, IPO), ORPO
//! and KTO train 10 steps on a tiny model (CPU, fp32, the same initial adapter, the same batches,
//! no dropout) with TRL's losses and metrics step for step; the trained adapter loads in peft; the
//! reference model is the base model (adapters bypassed) or the starting adapter, as TRL's.

mod common;
use common::*;
use ftscript::models::decoder::AttnMask;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Metrics TRL logs that are not the objective's: bookkeeping, and ORPO's `logits/*`, which
/// TRL's experimental ORPO averages over prompt and padding positions too (ftscript, like TRL's
/// DPO and KTO, over the completion tokens).
fn compared(key: &str, objective: &str) -> bool {
    !matches!(key, "step" | "epoch" | "learning_rate" | "num_tokens") && !(objective == "orpo" && key.starts_with("logits/"))
}

/// Trains `objective` from the peft adapter `adapter` with TRL and with ftscript (a recipe, as a
/// user writes it) in `d`; asserts every step's loss and metrics agree to 1e-4 (relative, or
/// absolute below 1). Returns ftscript's output directory.
fn matches_trl(d: &Path, objective: &str, loss_type: Option<&str>, adapter: &str, extra: &str) -> std::path::PathBuf {
    let model = tiny_llama(d);
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    if !d.join("pairs.jsonl").exists() {
        py("trl_reference.py", &["data", m, o]);
    }
    let name = match loss_type {
        Some(t) => format!("{objective}_{t}"),
        None => objective.to_string(),
    };
    let mut args = vec![objective, m, o, adapter];
    args.extend(loss_type);
    py("trl_reference.py", &args);
    let trl: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(format!("trl_{name}.json"))).unwrap()).unwrap();
    let s = &trl["settings"];
    let data = if objective == "kto" { "kto.jsonl" } else { "pairs.jsonl" };
    let loss_type = loss_type.map(|t| format!("loss_type: \"{t}\",")).unwrap_or_default();
    let out = d.join(format!("ft_{name}{}", if extra.is_empty() { "" } else { "_extra" }));
    run_recipe(
        d,
        &format!("{name}.rhai"),
        &format!(
            r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cpu" }});
m.load_adapter("{o}/{adapter}");
train(m, #{{
    train: load_dataset("{o}/{data}"), objective: "{objective}", {loss_type} beta: {beta}, {extra}
    shuffle: false, batch_size: {bs}, max_steps: {steps}, lr: {lr}, scheduler: "constant",
    weight_decay: 0.0, max_grad_norm: {mgn}, max_length: {max_length}, log_every: 1,
    output_dir: "{out}",
}});
m.save_adapter("{out}/adapter");
"#,
            beta = s["beta"],
            bs = s["batch_size"],
            steps = s["steps"],
            lr = s["lr"],
            mgn = s["max_grad_norm"],
            max_length = s["max_length"],
            out = out.display(),
        ),
    );
    let ours: Vec<serde_json::Value> = metrics(&out.join("metrics.jsonl")).into_iter().filter(|v| v.get("loss").is_some()).collect();
    let theirs = trl["log"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "{name}: step counts differ");
    let mut compared_keys = 0;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        for (key, want) in b.as_object().unwrap() {
            if !compared(key, objective) {
                continue;
            }
            let want = want.as_f64().unwrap();
            let got = a.get(key).and_then(|v| v.as_f64()).unwrap_or_else(|| panic!("{name} step {}: ftscript does not log `{key}` (TRL logs {want}); ftscript: {a}", i + 1));
            let err = (got - want).abs() / want.abs().max(1.0);
            assert!(err < 1e-4, "{name} step {}: `{key}` is {got}, TRL's {want} (error {err:.2e})", i + 1);
            compared_keys += 1;
        }
    }
    assert!(compared_keys >= 10 * 8, "{name}: only {compared_keys} values compared");
    let losses: Vec<f64> = theirs.iter().map(|v| v["loss"].as_f64().unwrap()).collect();
    assert!(losses.iter().any(|l| (l - losses[0]).abs() > 1e-3), "{name}: TRL's losses do not move: {losses:?}");
    out
}

/// ftscript's logits for `ids` `[B, T]` with `adapter`, and the same with the adapters bypassed.
fn logits_with_and_without(model: &Path, adapter: &Path, ids: &Tensor) -> (Tensor, Tensor) {
    let mut m = ftscript::models::load(model, "fp32", Device::Cpu).unwrap();
    ftscript::nn::peft::load_adapter(&mut m.net, adapter, Kind::Float).unwrap();
    let (b, t) = ids.size2().unwrap();
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true);
    let run = || tch::no_grad(|| m.net.forward(ids, &positions, &AttnMask::Causal, None, false));
    (run(), ftscript::nn::linear::without_adapters(run))
}

#[test]
fn dpo_matches_trl_and_its_adapter_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // a trained (random-B) starting adapter: the reference is that adapter, as TRL's "ref" copy
    let out = matches_trl(d, "dpo", Some("sigmoid"), "init", "");
    // the same run with the reference computed once before training
    let pre = matches_trl(d, "dpo", Some("sigmoid"), "init", "precompute_ref_log_probs: true,");
    let loss = |dir: &Path| -> Vec<f64> { metrics(&dir.join("metrics.jsonl")).iter().filter_map(|v| v.get("loss")?.as_f64()).collect() };
    let (a, b) = (loss(&out), loss(&pre));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6, "precomputed reference: losses {b:?} vs {a:?}");
    }

    // the adapter ftscript trained loads in peft with ftscript's logits, and is TRL's
    let model = d.join("llama_gqa");
    let ids: Vec<Vec<i64>> = (0..2).map(|r| (0..12).map(|i| 3 + (i * 37 + r * 101) % 290).collect()).collect();
    std::fs::write(d.join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
    let (m, a) = (model.to_str().unwrap(), out.join("adapter"));
    py("peft_reference.py", &["adapter-logits", m, a.to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("peft.safetensors").to_str().unwrap()]);
    py("peft_reference.py", &["adapter-logits", m, d.join("trl_dpo_sigmoid_adapter").to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("trl.safetensors").to_str().unwrap()]);
    let flat: Vec<i64> = ids.into_iter().flatten().collect();
    let ids = Tensor::from_slice(&flat).view([2, 12]);
    let (ours, base) = logits_with_and_without(&model, &a, &ids);
    let err = rel_err(&ours, &read_safetensors(&d.join("peft.safetensors"))["logits"]);
    assert!(err < 1e-5, "the DPO adapter in peft: logits differ by {err:.2e}");
    let err = rel_err(&ours, &read_safetensors(&d.join("trl.safetensors"))["logits"]);
    assert!(err < 1e-4, "ftscript's DPO adapter and TRL's: logits differ by {err:.2e}");
    assert!(rel_err(&ours, &base) > 1e-3, "the adapter should change the logits");

    // bypassing the adapters gives the base model, as transformers computes it
    py("peft_reference.py", &["model-logits", m, d.join("ids.json").to_str().unwrap(), d.join("base.safetensors").to_str().unwrap()]);
    let err = rel_err(&base, &read_safetensors(&d.join("base.safetensors"))["logits"]);
    assert!(err < 1e-5, "adapters bypassed vs the base model in transformers: {err:.2e}");
}

#[test]
fn ipo_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "dpo", Some("ipo"), "init", "");
}

#[test]
fn orpo_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "orpo", None, "init", "");
}

/// From a fresh adapter (B = 0) the reference is the base model: ftscript bypasses the adapters.
#[test]
fn kto_matches_trl_from_a_fresh_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "kto", None, "fresh", "");
}
