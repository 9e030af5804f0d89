//! Data-parallel training on CPU (Gloo) through `ftscript launch`: ranks agree, match a single
//! process with the same global batch, and a failing rank stops the run quickly.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A tiny model and 50 text records (42 train after the split: the last optimizer step's window
/// is partial, so one rank gets no micro-batch in it).
fn setup(d: &Path) -> String {
    tiny_model_and_text(d, 50)
}

#[test]
fn two_ranks_agree_and_match_one_process_with_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = d.join("dp.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"
const batch = 2;
const out = "dp";
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("data.jsonl").split(8, 1);
let r = train(m, #{{ train: data.train, eval: data.eval, batch_size: batch, grad_accum: 2, epochs: 1,
    lr: 3e-3, log_every: 1, eval_every: 3, seed: 5, output_dir: out }});
m.save_adapter(`${{out}}/rank${{rank()}}`);
print(`RESULT rank=${{rank()}} world=${{world_size()}} main=${{is_main_process()}} steps=${{r.steps}}`);
"#
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let out = ftscript(&["launch", "--nproc-per-node", "2", r], d);
    let t = text(&out);
    assert!(out.status.success(), "launch failed:\n{t}");
    assert!(t.contains("RESULT rank=0 world=2 main=true steps=6"), "{t}");
    let out = ftscript(&["run", r, "--set", "batch=4", "--set", "out=\"single\""], d);
    let t = text(&out);
    assert!(out.status.success(), "single run failed:\n{t}");
    assert!(t.contains("RESULT rank=0 world=1 main=true steps=6"), "{t}");

    let r0 = read_safetensors(&d.join("dp/rank0/adapter_model.safetensors"));
    let r1 = read_safetensors(&d.join("dp/rank1/adapter_model.safetensors"));
    let single = read_safetensors(&d.join("single/rank0/adapter_model.safetensors"));
    assert_eq!(r0.len(), single.len());
    assert!(!r0.is_empty());
    for (k, t) in &r0 {
        assert!(t.equal(&r1[k]), "{k} differs between ranks");
        let e = rel_err(t, &single[k]);
        assert!(e <= 1e-5, "{k}: 2 ranks vs 1 process rel err {e}");
    }
    // the logged (global) losses agree too, and only rank 0 wrote logs and checkpoints
    let (a, b) = (metrics(&d.join("dp/metrics.jsonl")), metrics(&d.join("single/metrics.jsonl")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "eval_loss"] {
            if let (Some(x), Some(y)) = (x.get(key).and_then(|v| v.as_f64()), y.get(key).and_then(|v| v.as_f64())) {
                assert!((x - y).abs() <= 1e-5 * y.abs(), "{key}: {x} vs {y}");
            }
        }
    }
    assert!(d.join("dp/checkpoint-6/adapter_model.safetensors").exists());
}

#[test]
fn evaluate_under_launch_shares_the_records_between_ranks_and_scores_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    // 7 records: rank 0 generates 4, rank 1 generates 3; batch 1, so no padding differs from the
    // single process's
    let recipe = d.join("eval.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
let data = load_dataset("data.jsonl").take(7);
let fmt = |r| #{{ prompt: r.text.sub_string(0, 12), response: r.text.sub_string(12) }};
let r = evaluate(m, data, #{{ format: fmt, metrics: ["exact_match", "bleu", "rouge_l", "loss"], max_new_tokens: 6, batch_size: 1, samples: 7 }});
let predictions = r.samples.map(|s| s.prediction);
// the loss is summed in another order on two ranks: compared to 5 places
let loss = (r.loss * 100000.0).round() / 100000.0;
print(`RESULT rank=${{rank()}} records=${{r.records}} bleu=${{r.bleu}} rouge_l=${{r.rouge_l}} exact_match=${{r.exact_match}} loss=${{loss}} predictions=${{predictions}}`);
"#
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let out = ftscript(&["launch", "--nproc-per-node", "2", r], d);
    let t = text(&out);
    assert!(out.status.success(), "launch failed:\n{t}");
    assert!(t.contains("rank 0 generated 4 of 7 records") && t.contains("rank 1 generated 3 of 7 records"), "{t}");
    let result = |t: &str, rank: usize| -> String {
        let line = t.lines().find(|l| l.contains(&format!("RESULT rank={rank} "))).unwrap_or_else(|| panic!("no RESULT of rank {rank}:\n{t}"));
        line[line.find("records=").unwrap()..].to_string()
    };
    // (the launcher shows rank 0's output; every rank gets the same all-reduced predictions)
    let r0 = result(&t, 0);
    let single = ftscript(&["run", r], d);
    let ts = text(&single);
    assert!(single.status.success(), "single run failed:\n{ts}");
    assert_eq!(r0, result(&ts, 0), "2 ranks score differently from one process");
    assert!(r0.contains("records=7"), "{r0}");
}

#[test]
fn a_failing_rank_stops_the_launch_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = d.join("die.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("data.jsonl");
train(m, #{{ train: data, batch_size: 2, max_steps: 100000, log_every: 1, output_dir: "die",
    on_step: |s| {{ if rank() == 1 && s.step == 3 {{ throw "rank 1 gives up"; }} }} }});
"#
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = ftscript(&["launch", "--nproc-per-node", "2", recipe.to_str().unwrap()], d);
    let took = started.elapsed();
    let t = text(&out);
    assert!(!out.status.success(), "launch should fail:\n{t}");
    let last = String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.starts_with("error:")).last().unwrap_or_default().to_string();
    assert!(last.contains("rank 1 failed") && last.contains("rank 1 gives up"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    // loading + 3 steps take ~2 s; a hang would run until the 600 s collective timeout
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{t}");
}

#[test]
fn torchrun_can_start_the_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = d.join("tr.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let r = train(m, #{{ train: load_dataset("data.jsonl"), batch_size: 2, max_steps: 4, lr: 3e-3, output_dir: "tr" }});
m.save_adapter(`tr/rank${{rank()}}`);
"#
        ),
    )
    .unwrap();
    // torchrun's elastic agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True)
    let out = std::process::Command::new(root().join(".venv/bin/torchrun"))
        .args(["--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_ftscript"), "run", recipe.to_str().unwrap()])
        .current_dir(d)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "torchrun failed:\n{t}");
    let r0 = read_safetensors(&d.join("tr/rank0/adapter_model.safetensors"));
    let r1 = read_safetensors(&d.join("tr/rank1/adapter_model.safetensors"));
    for (k, t) in &r0 {
        assert!(t.equal(&r1[k]), "{k} differs between ranks");
    }
}

#[test]
fn a_stop_on_one_rank_stops_all_and_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = d.join("res.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"
const out = "full";
const stop_at = -1;
const resume = false;
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let r = train(m, #{{ train: load_dataset("data.jsonl"), batch_size: 2, max_steps: 8, lr: 3e-3, seed: 3, output_dir: out,
    resume: resume, on_step: |s| if s.step == stop_at && rank() == 1 {{ "stop" }} }});
m.save_adapter(`${{out}}/rank${{rank()}}`);
print(`RESULT steps=${{r.steps}} stopped=${{r.stopped_early}}`);
"#
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let launch = |extra: &[&str]| {
        let mut args = vec!["launch", "--nproc-per-node", "2", r];
        args.extend_from_slice(extra);
        let out = ftscript(&args, d);
        let t = text(&out);
        assert!(out.status.success(), "launch {extra:?} failed:\n{t}");
        t
    };
    assert!(launch(&[]).contains("RESULT steps=8 stopped=false"));
    // only rank 1 asks to stop; rank 0 (which prints) stops at the same step
    assert!(launch(&["--set", "out=\"part\"", "--set", "stop_at=3"]).contains("RESULT steps=3 stopped=true"));
    assert!(d.join("part/checkpoint-3/optimizer.safetensors").exists());
    assert!(launch(&["--set", "out=\"part\"", "--set", "resume=true"]).contains("RESULT steps=8 stopped=false"));
    let a = read_safetensors(&d.join("full/rank0/adapter_model.safetensors"));
    for rank in 0..2 {
        let b = read_safetensors(&d.join(format!("part/rank{rank}/adapter_model.safetensors")));
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{k} differs after resume on rank {rank}");
        }
    }
}

/// `ftscript launch --allow-push` lets the ranks publish (as `ftscript run --allow-push` does);
/// without it `hub_push` is refused with a permission error. (The endpoint refuses connections:
/// with the flag the push gets as far as the network.)
#[test]
fn launch_passes_allow_push_to_its_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("out")).unwrap();
    std::fs::write(d.join("out/README.md"), "hi").unwrap();
    std::fs::write(
        d.join("push.rhai"),
        "if is_main_process() {\n    try { hub_push(\"out\", \"me/tiny\"); print(\"PUSH done\"); } catch (e) { print(`PUSH ${e.kind}: ${e}`); }\n}\n",
    )
    .unwrap();
    let launch = |extra: &[&str]| {
        let mut args = vec!["launch", "--nproc-per-node", "2"];
        args.extend(extra);
        args.push("push.rhai");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftscript"))
            .args(&args)
            .current_dir(d)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_TOKEN", "hf_test")
            .env("HF_HOME", d.join("hf"))
            .output()
            .unwrap();
        text(&out)
    };
    let t = launch(&[]);
    assert!(t.contains("PUSH permission") && t.contains("--allow-push"), "{t}");
    let t = launch(&["--allow-push"]);
    assert!(t.contains("PUSH ") && !t.contains("PUSH permission"), "{t}");
}
