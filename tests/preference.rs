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
    matches_trl_on(d, "llama_gqa", objective, loss_type, adapter, extra)
}

/// [`matches_trl`] on the tiny model `family` of `tests/py/make_tiny.py`.
fn matches_trl_on(d: &Path, family: &str, objective: &str, loss_type: Option<&str>, adapter: &str, extra: &str) -> std::path::PathBuf {
    let model = if d.join(family).exists() { d.join(family) } else { tiny(d, family) };
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
    let loss_type = match loss_type {
        Some("robust") => format!("loss_type: \"robust\", label_smoothing: {},", s["robust_label_smoothing"]),
        Some(t) => format!("loss_type: \"{t}\","),
        None => String::new(),
    };
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
fn hinge_and_robust_dpo_match_trl() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "dpo", Some("hinge"), "init", "");
    matches_trl(tmp.path(), "dpo", Some("robust"), "init", "");
}

#[test]
fn orpo_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "orpo", None, "init", "");
}

/// Gemma 2: soft-capped logits inside the sequence log-probabilities and their gradient, tied
/// embeddings as the output layer.
#[test]
fn dpo_on_gemma2_matches_trl() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl_on(tmp.path(), "gemma2", "dpo", Some("sigmoid"), "init", "");
}

/// Qwen3-MoE: TRL adds the router's load-balancing loss (× config.json's `router_aux_loss_coef`,
/// over the trained forward's real tokens) to DPO and KTO for any MoE model and logs it as
/// `aux_loss`, and to ORPO when config.json sets `output_router_logits` (the tiny model does):
/// losses, `aux_loss` and the gradients it adds (through the steps that follow) match TRL's.
#[test]
fn preference_on_qwen3_moe_adds_the_load_balancing_loss_as_trl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    matches_trl_on(d, "qwen3_moe", "dpo", Some("sigmoid"), "init", "");
    matches_trl_on(d, "qwen3_moe", "kto", None, "fresh", "");
    matches_trl_on(d, "qwen3_moe", "orpo", None, "init", "");
    for name in ["dpo_sigmoid", "kto"] {
        let trl: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(format!("trl_{name}.json"))).unwrap()).unwrap();
        let aux = trl["log"][0]["aux_loss"].as_f64().unwrap_or_else(|| panic!("TRL's {name} logs no aux_loss: {}", trl["log"][0]));
        assert!(aux > 0.5, "{name}: aux_loss {aux}");
    }
}

/// From a fresh adapter (B = 0) the reference is the base model: ftscript bypasses the adapters.
#[test]
fn kto_matches_trl_from_a_fresh_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    matches_trl(tmp.path(), "kto", None, "fresh", "");
}

/// The mistakes a user makes with a preference objective are caught before the first step (or at
/// the first report, for a callback's metric) with a message that names the fix.
#[test]
fn preference_mistakes_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let m = model.to_str().unwrap();
    std::fs::write(d.join("pairs.jsonl"), "{\"prompt\": \"Q: a\\nA:\", \"chosen\": \" b\", \"rejected\": \" c\"}\n{\"prompt\": \"Q: d\\nA:\", \"chosen\": \" e\", \"rejeted\": \" f\"}\n").unwrap();
    std::fs::write(d.join("good.jsonl"), "{\"prompt\": \"Q: a\\nA:\", \"chosen\": \" b\", \"rejected\": \" c\"}\n".repeat(8)).unwrap();
    // (what, train options, expected in the error, caught by `ftscript check`)
    let table: &[(&str, &str, &[&str], bool)] = &[
        ("objective typo", r#"train: load_dataset("good.jsonl"), objective: "dop""#, &["objective \"dop\" is not one of", "did you mean \"dpo\""], true),
        ("loss_type typo", r#"train: load_dataset("good.jsonl"), objective: "dpo", loss_type: "sigmod""#, &["did you mean \"sigmoid\""], true),
        ("a DPO option on SFT", r#"train: load_dataset("good.jsonl"), beta: 0.2"#, &["`beta` applies to objective \"dpo\" or \"orpo\" or \"kto\"", "objective is \"sft\""], true),
        ("a record without `rejected`", r#"train: load_dataset("pairs.jsonl"), objective: "dpo""#, &["pairs.jsonl:2: missing field `rejected`", "rejeted"], false),
        ("KTO records without a label", r#"train: load_dataset("good.jsonl"), objective: "kto""#, &["good.jsonl:1: missing field `label`"], false),
        ("router_aux_loss_coef on a dense model", r#"train: load_dataset("good.jsonl"), objective: "dpo", router_aux_loss_coef: 0.01"#, &["router_aux_loss_coef weights a mixture-of-experts model", "is a dense model"], false),
        ("a negative router_aux_loss_coef", r#"train: load_dataset("good.jsonl"), objective: "dpo", router_aux_loss_coef: -0.01"#, &["router_aux_loss_coef must be a number ≥ 0"], false),
        ("max_length shorter than every prompt", r#"train: load_dataset("good.jsonl"), objective: "dpo", max_length: 3"#, &["every training prompt fills max_length 3", "raise max_length"], false),
        (
            "early stopping on a misspelt reward metric",
            r#"train: load_dataset("good.jsonl"), eval: load_dataset("good.jsonl"), objective: "dpo", eval_every: 1, on_eval: cb::early_stopping(#{ metric: "eval_rewards/accuracy", mode: "max" })"#,
            &["no metric `eval_rewards/accuracy`", "did you mean `eval_rewards/accuracies`"],
            false,
        ),
    ];
    let mut failed = vec![];
    for (i, (what, opts, expected, static_)) in table.iter().enumerate() {
        let recipe = format!(
            "import \"ft/callbacks\" as cb;\nlet m = load_model(\"{m}\", #{{ dtype: \"fp32\" }});\nm.add_lora(#{{ r: 4, alpha: 8 }});\ntrain(m, #{{ {opts}, batch_size: 2, max_steps: 2, log_every: 1, output_dir: \"o{i}\" }});\n"
        );
        std::fs::write(d.join("mistake.rhai"), recipe).unwrap();
        for command in if *static_ { vec!["run", "check"] } else { vec!["run"] } {
            let out = ftscript(&[command, "mistake.rhai"], d);
            let t = text(&out);
            if out.status.success() || t.contains("panicked") || !expected.iter().all(|e| t.contains(e)) || t.contains(" step 2 loss") {
                failed.push(format!("{what} ({command}): expected {expected:?}, got:\n{t}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

/// DPO through the rest of the training machinery: gradient checkpointing trains as the full
/// graph; two ranks (`ftscript launch`, Gloo) as one process with the same global batch; a run
/// stopped and resumed ends with the adapter of an uninterrupted one, bit for bit; and a 4-bit
/// (QLoRA) base trains.
#[test]
fn dpo_checkpoints_runs_on_two_ranks_resumes_and_trains_on_a_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    py("trl_reference.py", &["data", m, o]);
    std::fs::write(
        d.join("dpo.rhai"),
        format!(
            r#"
const out = "base";
const grad_accum = 4;
const steps = 4;
const ckpt = false;
const offload = false;
const resume = false;
const stop_at = 0;
const quantize = "none";
let m = if quantize == "none" {{ load_model("{m}", #{{ dtype: "fp32", device: "cpu" }}) }} else {{ load_model("{m}", #{{ device: "cpu", quantize: quantize, compute_dtype: "fp32" }}) }};
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1, seed: 3 }});
let r = train(m, #{{ train: load_dataset("pairs.jsonl"), objective: "dpo", beta: 0.1, batch_size: 2, grad_accum: grad_accum,
    max_steps: steps, lr: 5e-3, gradient_checkpointing: if offload {{ "offload" }} else {{ ckpt }}, save_every: 2, log_every: 1, seed: 5, resume: resume, output_dir: out,
    on_step: |s| if s.step == stop_at {{ "stop" }} }});
m.save_adapter(`${{out}}/rank${{rank()}}`);
print(`RESULT steps=${{r.steps}} loss=${{r.train_loss}}`);
"#
        ),
    )
    .unwrap();
    let run = |cmd: &[&str], sets: &[&str]| {
        let mut args: Vec<&str> = cmd.to_vec();
        args.push("dpo.rhai");
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = ftscript(&args, d);
        let t = text(&out);
        assert!(out.status.success(), "{args:?} failed:\n{t}");
        t
    };
    let losses = |dir: &str| losses(&d.join(dir).join("metrics.jsonl"));
    let adapter = |dir: &str| read_safetensors(&d.join(dir).join("rank0/adapter_model.safetensors"));
    run(&["run"], &[]);
    let base = losses("base");
    assert_eq!(base.len(), 4);
    assert!(base.iter().any(|l| (l - base[0]).abs() > 1e-3), "DPO should move the loss: {base:?}");
    let close = |name: &str, dir: &str, tol: f64| {
        let (a, b) = (losses(dir), &base);
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * y.abs(), "{name}: losses {a:?} vs {b:?}");
        }
        let (a, b) = (adapter(dir), adapter("base"));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let e = rel_err(t, &b[k]);
            assert!(e <= tol, "{name}: {k} differs by {e:.2e}");
        }
    };
    run(&["run"], &["out=\"ckpt\"", "ckpt=true"]);
    close("gradient checkpointing", "ckpt", 1e-5);
    // what offloading keeps (on the CPU: kept in place) and recomputes from, the residual and the
    // projections' outputs: their input gradient is summed in another order (the frozen weights'
    // parts in one buffer, then the adapters'), rounding that Adam carries to ~3e-5 in 4 steps
    run(&["run"], &["out=\"offload\"", "offload=true"]);
    close("offloaded checkpoints", "offload", 1e-4);
    run(&["launch", "--nproc-per-node", "2"], &["out=\"ranks\"", "grad_accum=2"]);
    // the ranks' gradients are summed in another order (the all-reduce): rounding that Adam's
    // normalized steps carry to ~2e-5 in a weight in 4 steps
    close("two ranks", "ranks", 1e-4);
    run(&["run"], &["out=\"resumed\"", "stop_at=2"]);
    run(&["run"], &["out=\"resumed\"", "resume=true"]);
    let (a, b) = (adapter("resumed"), adapter("base"));
    for (k, t) in &a {
        assert!(same_bits(t, &b[k]), "resumed: {k} differs from the uninterrupted run");
    }
    let t = run(&["run"], &["out=\"nf4\"", "quantize=\"nf4\""]);
    let q = losses("nf4");
    assert!(t.contains("RESULT steps=4") && q.iter().all(|l| l.is_finite()) && q.iter().any(|l| (l - q[0]).abs() > 1e-3), "QLoRA DPO: {q:?}\n{t}");
}

/// A pair's prompt run once for both completions (`prompt ++ chosen ++ rejected` in one row, the
/// completions masked from each other) gives the loss, metrics and adapter gradients of the two
/// sequences run apart: with a sliding window shorter than the row and soft-capping (Gemma 2), and
/// with a sparse model's load-balancing loss (each prompt token counted once per sequence), with
/// and without gradient checkpointing (kept or offloaded), and with the rows padded to a multiple
/// of 16 (`pad_to_multiple_of`) separate or shared.
#[test]
fn shared_prompts_train_as_separate_sequences() {
    use ftscript::models::Checkpointing;
    use ftscript::train::batch::BatchConfig;
    use ftscript::train::objective::{Backward, Objective, Split};
    use ftscript::train::preference::{DpoLoss, Preference, PreferenceObjective};
    let tmp = tempfile::tempdir().unwrap();
    for family in ["llama_gqa", "gemma2", "qwen3_moe"] {
        let mut m = ftscript::models::load(&tiny(tmp.path(), family), "fp32", Device::Cpu).unwrap();
        let target_parameters = if m.net.config.moe.is_some() { vec!["gate_up_proj".into(), "down_proj".into()] } else { vec![] };
        let spec = all_linear_lora(0.0, target_parameters);
        ftscript::nn::peft::add_lora(&mut m.net, &spec, Kind::Float).unwrap();
        let adapters: Vec<Tensor> = ftscript::nn::peft::adapter_tensors(&m.net).into_iter().map(|(_, t)| t).collect();
        tch::manual_seed(3);
        for t in &adapters {
            tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05)));
        }
        // prompts longer than Gemma 2's window of 8, completions of other lengths
        let ids = |n: usize, s: i64| -> Vec<i64> { (0..n as i64).map(|i| 3 + (i * 37 + s * 11) % 250).collect() };
        let pairs: Vec<ftscript::data::preference::Pair> =
            [(10, 5, 9), (4, 12, 3), (13, 6, 6)].iter().enumerate().map(|(k, &(p, c, r))| ftscript::data::preference::Pair { prompt: ids(p, k as i64), chosen: ids(c, 7 + k as i64), rejected: ids(r, 17 + k as i64) }).collect();
        let cfg = BatchConfig { batch_size: 3, max_length: 24, pad_to_max_length: false, pad_to_multiple_of: 1, packing: false, pad_id: 0, shuffle: false, seed: 0 };
        let rows: Vec<Vec<usize>> = vec![vec![0], vec![1], vec![2]];
        let run = |share: bool, checkpointing: Checkpointing, cfg: &BatchConfig| -> (f64, Vec<f64>, Vec<Tensor>) {
            let mut o = PreferenceObjective::pairs(Preference::Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }, pairs.clone(), vec![]).share_prompts(Some(share));
            o.prepare(&m.net, cfg).unwrap();
            for t in &adapters {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let step = o.step(&m.net, Split::Train, &rows, cfg, Some(Backward { weight: 1.0, checkpointing, seed: 0 })).unwrap();
            let metrics = Vec::<f64>::try_from(step.metrics.unwrap().select(1, 0).to_kind(Kind::Double)).unwrap();
            (step.loss.double_value(&[]), metrics, adapters.iter().map(|t| t.grad().copy()).collect())
        };
        let (loss, metrics, grads) = run(false, Checkpointing::Off, &cfg);
        let n = if family == "qwen3_moe" { 11 } else { 10 };
        assert_eq!(metrics.len(), n, "{family}: metrics {metrics:?}");
        // and with the rows padded further (`pad_to_multiple_of`), separate or shared
        let padded = BatchConfig { pad_to_multiple_of: 16, ..cfg.clone() };
        let variants = [(true, Checkpointing::Off, &cfg), (true, Checkpointing::On, &cfg), (true, Checkpointing::Offload, &cfg), (false, Checkpointing::Off, &padded), (true, Checkpointing::On, &padded)];
        for (share, checkpointing, cfg) in variants {
            let (l, m2, g) = run(share, checkpointing, cfg);
            assert!((l - loss).abs() < 1e-5 * loss.abs().max(1.0), "{family} {checkpointing:?} share {share} pad to {}: loss {l}, separate {loss}", cfg.pad_to_multiple_of);
            for (i, (a, b)) in m2.iter().zip(&metrics).enumerate() {
                assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{family} {checkpointing:?} share {share} pad to {}: metric {i} {a}, separate {b}", cfg.pad_to_multiple_of);
            }
            let moved = grads.iter().filter(|g| g.abs().max().double_value(&[]) > 0.0).count();
            assert!(moved > grads.len() / 2, "{family}: only {moved} of {} adapters get a gradient", grads.len());
            for (a, b) in g.iter().zip(&grads) {
                let err = rel_err(a, b);
                assert!(err < 1e-4, "{family} {checkpointing:?} share {share} pad to {}: adapter gradient differs by {err:.2e}", cfg.pad_to_multiple_of);
            }
        }
    }
}
