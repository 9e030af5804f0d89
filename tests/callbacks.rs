//! Callbacks, early stopping, checkpoints and resume, through real recipes on a tiny model.

mod common;
use common::*;
use std::path::Path;

/// A tiny model plus a small text dataset, shared by the tests below.
fn setup(d: &Path) -> String {
    tiny_model_and_text(d, 48)
}

const TRAIN_OPTS: &str = r#"train: data.train, eval: data.eval, batch_size: 4, lr: 3e-3, log_every: 1"#;

#[test]
fn early_stopping_stops_where_the_patience_rule_says() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let (patience, min_delta) = (2, 0.02);
    run_recipe(
        d,
        "es.rhai",
        &format!(
            r#"
import "ft/callbacks" as cb;
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("data.jsonl").split(8, 1);
let r = train(m, #{{ {TRAIN_OPTS}, max_steps: 40, eval_every: 2, output_dir: "es",
    on_eval: cb::early_stopping(#{{ metric: "eval_loss", patience: {patience}, min_delta: {min_delta} }}) }});
print(`RESULT steps=${{r.steps}} stopped=${{r.stopped_early}}`);
"#
        ),
    );
    // apply the rule by hand to the eval losses the run logged
    let evals: Vec<(u64, f64)> = metrics(&d.join("es/metrics.jsonl"))
        .iter()
        .filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("eval_loss")?.as_f64()?)))
        .collect();
    let (mut best, mut bad, mut predicted) = (f64::INFINITY, 0, 40);
    for &(step, loss) in &evals {
        if loss < best - min_delta {
            best = loss;
            bad = 0;
        } else {
            bad += 1;
            if bad >= patience {
                predicted = step;
                break;
            }
        }
    }
    assert!(predicted < 40, "the run should plateau within 40 steps; eval losses {evals:?}");
    let last_step = evals.last().unwrap().0;
    assert_eq!(last_step, predicted, "training ran to step {last_step}, the rule says stop at {predicted}: {evals:?}");
    assert!(d.join(format!("es/checkpoint-{predicted}/adapter_model.safetensors")).exists(), "no checkpoint at the stop");
}

#[test]
fn stop_from_a_callback_keeps_a_checkpoint_and_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = |out: &str, stop_at: i64, resume: bool| {
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1 }});
let data = load_dataset("data.jsonl").split(8, 1);
let r = train(m, #{{ {TRAIN_OPTS}, max_steps: 12, seed: 3, output_dir: "{out}", resume: {resume},
    on_step: |s| if s.step == {stop_at} {{ "stop" }} }});
print(`RESULT steps=${{r.steps}} stopped=${{r.stopped_early}}`);
"#
        )
    };
    let full = run_recipe(d, "full.rhai", &recipe("full", -1, false));
    assert!(full.contains("RESULT steps=12 stopped=false"), "{full}");
    let stopped = run_recipe(d, "part1.rhai", &recipe("part", 5, false));
    assert!(stopped.contains("RESULT steps=5 stopped=true"), "{stopped}");
    assert!(d.join("part/checkpoint-5/adapter_model.safetensors").exists());
    assert!(d.join("part/checkpoint-5/optimizer.safetensors").exists());
    let resumed = run_recipe(d, "part2.rhai", &recipe("part", -1, true));
    assert!(resumed.contains("RESULT steps=12 stopped=false"), "{resumed}");
    let a = read_safetensors(&d.join("full/checkpoint-12/adapter_model.safetensors"));
    let b = read_safetensors(&d.join("part/checkpoint-12/adapter_model.safetensors"));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resume (max diff {})", (t - &b[k]).abs().max().double_value(&[]));
    }
}

#[test]
fn run_logs_are_read_by_tensorboard() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    run_recipe(
        d,
        "tb.rhai",
        &format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("data.jsonl").split(8, 1);
train(m, #{{ {TRAIN_OPTS}, max_steps: 6, eval_every: 3, output_dir: "tb" }});
"#
        ),
    );
    let logged = metrics(&d.join("tb/metrics.jsonl"));
    let tb: serde_json::Value = serde_json::from_str(&py("tb_read.py", &[d.join("tb").to_str().unwrap()])).unwrap();
    let series = |tag: &str| -> Vec<(u64, f64)> {
        tb[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {tb}")).iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
    };
    let want_loss: Vec<(u64, f64)> = logged.iter().filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("loss")?.as_f64()?))).collect();
    let want_eval: Vec<(u64, f64)> = logged.iter().filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("eval_loss")?.as_f64()?))).collect();
    for (want, got) in [(want_loss, series("train/loss")), (want_eval, series("eval/loss"))] {
        assert_eq!(want.len(), got.len(), "{want:?} vs {got:?}");
        for ((s1, v1), (s2, v2)) in want.iter().zip(&got) {
            assert_eq!(s1, s2);
            assert!((v1 - v2).abs() < 1e-5 * v1.abs().max(1.0), "{v1} vs {v2}");
        }
    }
}

/// `ftscript run RECIPE` in `d`, in the background (its output piped).
fn spawn_run(d: &Path, recipe: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_ftscript"))
        .args(["run", recipe])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Training steps logged so far in the run log `log` (lines with a loss).
fn logged_steps(log: &Path) -> usize {
    std::fs::read_to_string(log).map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count()).unwrap_or(0)
}

/// Waits (polling every millisecond, five minutes at most) until `log` holds `n` logged steps.
fn wait_for_logged_steps(log: &Path, n: usize) {
    let started = std::time::Instant::now();
    while logged_steps(log) < n {
        assert!(started.elapsed().as_secs() < 300, "{}: {n} steps not logged in 5 minutes", log.display());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The adapters saved in `a` and `b` are the same, bit for bit.
fn assert_same_adapters(a: &Path, b: &Path) {
    let (x, y) = (read_safetensors(&a.join("adapter_model.safetensors")), read_safetensors(&b.join("adapter_model.safetensors")));
    assert_eq!(x.len(), y.len());
    for (k, t) in &x {
        assert!(same_bits(t, &y[k]), "{k} differs between {} and {}", a.display(), b.display());
    }
}

/// Ctrl-C (SIGINT) or SIGTERM during training: the step in flight finishes, a checkpoint is
/// saved, the process exits 0 saying how to resume (the rest of the recipe does not run), and the
/// same recipe with `resume: true` continues from that checkpoint, ending with the adapter an
/// uninterrupted run of as many steps makes, bit for bit (CPU, fp32, dropout and shuffling on).
#[test]
fn a_signal_saves_a_checkpoint_and_resume_continues_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 24);
    let o = d.to_str().unwrap();
    let recipe = |out: &str, resume: bool, steps: usize| {
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1, targets: ["q_proj", "v_proj"] }});
let r = train(m, #{{ train: load_dataset("{o}/data.jsonl"), batch_size: 2, max_length: 32, max_steps: {steps},
    lr: 1e-3, scheduler: "constant", log_every: 1, output_dir: "{o}/{out}", resume: {resume} }});
print(`finished at step ${{r.steps}}`);
m.save_adapter("{o}/{out}/adapter");
"#
        )
    };
    for (signal, name) in [(libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        let out = format!("run-{name}");
        std::fs::write(d.join("long.rhai"), recipe(&out, false, 100_000)).unwrap();
        let child = spawn_run(d, "long.rhai");
        wait_for_logged_steps(&d.join(&out).join("metrics.jsonl"), 2);
        // SAFETY: signals our own child, which is alive until waited for.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let done = child.wait_with_output().unwrap();
        let t = text(&done);
        assert!(done.status.success(), "{name}: an interrupted run exits 0: {t}");
        assert!(t.contains("interrupted at step") && t.contains("resume: true") && !t.contains("finished at step"), "{name}: {t}");
        let checkpoints: Vec<usize> = std::fs::read_dir(d.join(&out))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
            .collect();
        assert_eq!(checkpoints.len(), 1, "{name}: {checkpoints:?}");
        let at = checkpoints[0];
        assert!(at >= 2 && t.contains(&format!("interrupted at step {at}")), "{name}: {t}");

        std::fs::write(d.join("resume.rhai"), recipe(&out, true, at + 2)).unwrap();
        let resumed = ftscript(&["run", "resume.rhai"], d);
        let t = text(&resumed);
        assert!(resumed.status.success() && t.contains(&format!("finished at step {}", at + 2)), "{name}: {t}");
        let straight = format!("straight-{name}");
        std::fs::write(d.join("straight.rhai"), recipe(&straight, false, at + 2)).unwrap();
        let run = ftscript(&["run", "straight.rhai"], d);
        assert!(run.status.success(), "{}", text(&run));
        assert_same_adapters(&d.join(&out).join("adapter"), &d.join(&straight).join("adapter"));
    }
}

/// Runs `dir/name.rhai`: LoRA (r 4 on q and v, plus `lora`'s options) trained on
/// `dir/data.jsonl` with `train`'s options into `dir/name`, printing the step it finished at,
/// then its adapter saved to `dir/name/adapter`.
fn train_run(d: &Path, model: &str, name: &str, lora: &str, train: &str) -> std::process::Output {
    let o = d.to_str().unwrap();
    let recipe = format!(
        r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, targets: ["q_proj", "v_proj"], {lora} }});
let r = train(m, #{{ train: load_dataset("{o}/data.jsonl"), max_length: 32, lr: 1e-3, log_every: 1, output_dir: "{o}/{name}", {train} }});
print(`finished at step ${{r.steps}}`);
m.save_adapter("{o}/{name}/adapter");
"#
    );
    std::fs::write(d.join(format!("{name}.rhai")), recipe).unwrap();
    ftscript(&["run", &format!("{name}.rhai")], d)
}

/// A non-finite step (NaN gradients injected at step 3). By default training stops with an
/// error naming the step and what to try, and no checkpoint holds the step (the last is step
/// 2's, finite). With `on_nan: "skip"` that step's update is skipped and training goes on to the
/// end with finite adapters. More skipped steps than `max_skipped_steps` stop.
#[test]
fn a_nan_step_stops_training_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 24);
    let run = |name: &str, extra: &str| train_run(d, &model, name, "", &format!("batch_size: 2, max_steps: 5, save_every: 1, {extra}"));
    let adapters_finite = |dir: &Path| read_safetensors(&dir.join("adapter_model.safetensors")).values().all(|t| t.isfinite().all().int64_value(&[]) != 0);

    let out = run("stop", "inject_nan_steps: [3]");
    let t = text(&out);
    assert!(!out.status.success() && t.contains("step 3: the loss is NaN") && t.contains("halving the learning rate") && t.contains("checkpoint-2"), "{t}");
    let mut kept: Vec<String> = std::fs::read_dir(d.join("stop")).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("checkpoint-")).collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-1", "checkpoint-2"]);
    assert!(adapters_finite(&d.join("stop/checkpoint-2")));

    let out = run("skip", r#"inject_nan_steps: [3], on_nan: "skip""#);
    let t = text(&out);
    assert!(out.status.success() && t.contains("step 3: non-finite gradient norm, update skipped") && t.contains("finished at step 5"), "{t}");
    assert!(adapters_finite(&d.join("skip/adapter")));

    let out = run("too_many", r#"inject_nan_steps: [2, 3], on_nan: "skip", max_skipped_steps: 1"#);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("more than max_skipped_steps 1"), "{t}");
}

/// Out of memory inside a step (a test-only cap: micro-batches of more than 2 rows fail as a CUDA
/// OOM would). By default training stops with one line naming the step, the shapes and what to
/// lower, and the last checkpoint intact. With `on_oom: "halve"` the step is retried with every
/// micro-batch halved, logged once, and the losses and adapter equal those of a run planned with
/// half the batch and twice the accumulation (dropout on: the halves draw the smaller run's
/// masks). `batch_size: "auto"` (8) halves as often as it must.
#[test]
fn out_of_memory_stops_with_advice_or_halves_the_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 32);
    let run = |name: &str, extra: &str| train_run(d, &model, name, "dropout: 0.1", &format!("max_steps: 4, save_every: 2, {extra}"));
    let losses = |name: &str| losses(&d.join(name).join("metrics.jsonl"));

    let out = run("stop", "batch_size: 4, grad_accum: 2, inject_oom_rows: 2");
    let t = text(&out);
    assert!(!out.status.success() && t.contains("step 1: out of memory in a micro-batch of 4 rows") && t.contains("lower batch_size") && t.contains("on_oom: \"halve\""), "{t}");
    assert!(!d.join("stop/adapter").exists() && !d.join("stop/checkpoint-2").exists());

    let out = run("halved", r#"batch_size: 4, grad_accum: 2, inject_oom_rows: 2, on_oom: "halve""#);
    let t = text(&out);
    assert!(out.status.success() && t.contains("finished at step 4"), "{t}");
    assert_eq!(t.matches("out of memory").count(), 1, "the halving is logged once: {t}");
    let out = run("smaller", "batch_size: 2, grad_accum: 4");
    assert!(out.status.success(), "{}", text(&out));
    let (a, b) = (losses("halved"), losses("smaller"));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * y.abs(), "halved {a:?} vs planned smaller {b:?}");
    }
    let (ha, sa) = (read_safetensors(&d.join("halved/adapter/adapter_model.safetensors")), read_safetensors(&d.join("smaller/adapter/adapter_model.safetensors")));
    for (k, t) in &ha {
        assert!(rel_err(t, &sa[k]) < 1e-5, "{k}");
    }

    let out = run("auto", r#"batch_size: "auto", inject_oom_rows: 2"#);
    let t = text(&out);
    assert!(out.status.success() && t.contains("runs as 4 of 2"), "{t}");
    let out = run("auto_planned", "batch_size: 2, grad_accum: 4");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(losses("auto").len(), 4);
    for (x, y) in losses("auto").iter().zip(&losses("auto_planned")) {
        assert!((x - y).abs() <= 1e-6 * y.abs());
    }
}

/// `memory_budget` as a user writes it: a size in a unit nobody uses is refused before any work
/// (and by `ftscript check`), naming the option and the form it takes; on the CPU a budget is accepted and said not to apply
/// (the same recipe then runs on a GPU). Its effect on a GPU: tests/training.rs.
#[test]
fn a_memory_budget_names_its_mistakes_and_is_not_applied_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 8);
    let out = train_run(d, &model, "parsecs", "", r#"max_steps: 1, memory_budget: "14 parsecs""#);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("memory_budget: invalid size `14 parsecs`") && t.contains("\"14GiB\""), "{t}");
    assert!(!d.join("parsecs").exists(), "refused before any work");
    // and `ftscript check` finds it without running anything
    let check = ftscript(&["check", "parsecs.rhai"], d);
    assert!(!check.status.success() && text(&check).contains("memory_budget: invalid size `14 parsecs`"), "{}", text(&check));
    let out = train_run(d, &model, "bool", "", "max_steps: 1, memory_budget: true");
    assert!(!out.status.success() && text(&out).contains("memory_budget must be a size such as \"14GiB\" or a number of bytes, got true"), "{}", text(&out));
    let out = train_run(d, &model, "cpu", "", r#"max_steps: 2, memory_budget: "2GiB""#);
    let t = text(&out);
    assert!(out.status.success() && t.contains("finished at step 2") && t.contains("memory_budget caps GPU memory; on the CPU it is not applied"), "{t}");
}

/// SIGKILL at five moments (right after a step is logged, at varying delays, so some land while
/// its checkpoint is written), resuming each time: every `checkpoint-*` left behind is complete,
/// half-written ones are removed on the next start, and the final adapter equals an
/// uninterrupted run's bit for bit (CPU, fp32, dropout and shuffling on).
#[test]
fn runs_killed_at_any_moment_resume_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 24);
    let o = d.to_str().unwrap();
    let steps = 60; // more than five kills can reach, each a few steps after the last
    let recipe = |out: &str| {
        format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1, targets: ["q_proj", "v_proj"] }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), batch_size: 2, max_length: 32, max_steps: {steps}, lr: 1e-3,
    scheduler: "cosine", log_every: 1, save_every: 1, output_dir: "{o}/{out}", resume: true }});
m.save_adapter("{o}/{out}/adapter");
"#
        )
    };
    std::fs::write(d.join("straight.rhai"), recipe("straight")).unwrap();
    let out = ftscript(&["run", "straight.rhai"], d);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(d.join("killed.rhai"), recipe("killed")).unwrap();
    let log = d.join("killed/metrics.jsonl");
    for delay_ms in [0u64, 3, 9, 1, 20] {
        let before = logged_steps(&log);
        let mut child = spawn_run(d, "killed.rhai");
        wait_for_logged_steps(&log, before + 1);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for e in std::fs::read_dir(d.join("killed")).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("checkpoint-") {
                for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"] {
                    assert!(e.path().join(f).exists(), "{name} lacks {f} after a kill {delay_ms} ms after a step");
                }
            }
        }
    }
    let out = ftscript(&["run", "killed.rhai"], d);
    assert!(out.status.success(), "{}", text(&out));
    let leftovers: Vec<String> = std::fs::read_dir(d.join("killed")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "half-written checkpoints left: {leftovers:?}");
    assert_same_adapters(&d.join("killed/adapter"), &d.join("straight/adapter"));
    // the logs hold each step once, as the uninterrupted run's: what a killed run logged after
    // its last checkpoint is forgotten on resume, in metrics.jsonl and in TensorBoard
    let losses = |run: &str| -> Vec<(u64, f64)> { metrics(&d.join(run).join("metrics.jsonl")).iter().filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?))).collect() };
    assert_eq!(losses("killed"), losses("straight"), "metrics.jsonl of the killed and resumed run");
    let tb = |run: &str| -> serde_json::Value { serde_json::from_str::<serde_json::Value>(&py("tb_read.py", &[d.join(run).to_str().unwrap()])).unwrap()["train/loss"].clone() };
    assert_eq!(tb("killed"), tb("straight"), "TensorBoard's train/loss of the killed and resumed run");
}
