//! Recipes as users write and share them, run on a tiny model (CPU): every recipe in `scripts/`
//! to the end, hooks that use the model, a closure from an imported module as a callback, and the
//! common mistakes, each caught before the first step with a message that names it.

mod common;
use common::*;
use std::path::Path;

/// `ftscript <command> scripts/<script> --set k=v ...` in `cwd`; panics with the output on failure.
fn run_script(command: &[&str], script: &str, sets: &[(&str, String)], cwd: &Path) -> String {
    let path = root().join("scripts").join(script);
    let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    args.push(path.display().to_string());
    for (k, v) in sets {
        args.extend(["--set".to_string(), format!("{k}={v}")]);
    }
    let out = ftscript(&args.iter().map(String::as_str).collect::<Vec<_>>(), cwd);
    let t = text(&out);
    assert!(out.status.success(), "scripts/{script} failed:\n{t}");
    t
}

/// A `--set` string value (quoted, so it stays a string whatever it holds).
fn s(v: impl AsRef<str>) -> String {
    format!("{:?}", v.as_ref())
}

#[test]
fn every_shipped_recipe_runs_to_the_end_on_a_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = s(tiny_chat_model(d).display().to_string());
    // records shaped like data/kv2json.jsonl, short enough for the tiny model's 300-token vocabulary
    let lines: Vec<String> = (0..64)
        .map(|i| serde_json::json!({"instruction": "As JSON.", "input": format!("age: {i}; name: Al"), "output": format!("{{\"name\": \"Al\", \"age\": {i}}}")}).to_string())
        .collect();
    std::fs::write(d.join("kv.jsonl"), lines.join("\n")).unwrap();
    let data = s(d.join("kv.jsonl").display().to_string());
    let out = |name: &str| s(d.join(name).display().to_string());
    let mut ran = vec![];
    let mut run = |command: &[&str], script: &'static str, sets: &[(&str, String)]| {
        let t = run_script(command, script, sets, d);
        ran.push(script);
        t
    };
    let t = run(&["run"], "quickstart.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("quickstart")), ("n_eval", "2".into()), ("max_steps", "3".into())]);
    assert!(t.contains("exact match after"), "{t}");
    assert!(d.join("quickstart/adapter/adapter_model.safetensors").exists());
    run(&["run"], "merge_adapter.rhai", &[("model_dir", model.clone()), ("adapter_dir", out("quickstart/adapter")), ("merged_dir", out("merged"))]);
    assert!(d.join("merged/config.json").exists());
    let t = run(&["run"], "alpaca_lora.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("alpaca")), ("max_steps", "4".into())]);
    assert!(t.contains("sample at step") && d.join("alpaca/merged/config.json").exists(), "{t}");
    run(&["run"], "big_model.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("big")), ("compute_dtype", s("fp32")), ("max_steps", "2".into()), ("memory_budget", s("1GiB"))]);
    run(&["run"], "qlora.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("qlora")), ("device", s("cpu")), ("max_steps", "2".into())]);
    assert!(d.join("qlora/merged/config.json").exists());
    let qwen3 = s(with_chat_template(tiny(d, "qwen3")).display().to_string());
    let t = run(&["run"], "qwen3_chat.rhai", &[("model_dir", qwen3), ("data_file", data.clone()), ("output_dir", out("qwen3")), ("max_steps", "2".into())]);
    assert!(t.contains("steps 2,") && d.join("qwen3/adapter/adapter_model.safetensors").exists(), "{t}");
    for gemma in ["gemma2", "gemma3"] {
        let model = s(with_chat_template(tiny(d, gemma)).display().to_string());
        let t = run(&["run"], "gemma_qlora.rhai", &[("model_dir", model), ("data_file", data.clone()), ("output_dir", out(gemma)), ("compute_dtype", s("fp32")), ("max_steps", "2".into())]);
        assert!(t.contains("steps 2,") && d.join(gemma).join("adapter/adapter_model.safetensors").exists(), "{gemma}: {t}");
    }
    let moe = s(with_chat_template(tiny(d, "qwen3_moe")).display().to_string());
    let t = run(&["run"], "qwen3_moe.rhai", &[("model_dir", moe), ("data_file", data.clone()), ("output_dir", out("qwen3_moe")), ("compute_dtype", s("fp32")), ("max_steps", "2".into())]);
    assert!(t.contains("steps 2,") && d.join("qwen3_moe/adapter/adapter_model.safetensors").exists(), "{t}");
    let phi3 = s(with_chat_template(tiny(d, "phi3")).display().to_string());
    let t = run(&["run"], "phi_qlora.rhai", &[("model_dir", phi3), ("data_file", data.clone()), ("output_dir", out("phi3")), ("compute_dtype", s("fp32")), ("max_steps", "2".into())]);
    assert!(t.contains("steps 2,") && d.join("phi3/adapter/adapter_model.safetensors").exists(), "{t}");
    let t = run(&["run"], "dpo.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("dpo")), ("n_eval", "4".into()), ("sft_steps", "3".into()), ("dpo_steps", "4".into())]);
    assert!(t.contains("exact match after DPO") && d.join("dpo/adapter/adapter_model.safetensors").exists(), "{t}");
    let t = run(&["run"], "orpo.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("orpo")), ("n_eval", "4".into()), ("max_steps", "3".into())]);
    assert!(t.contains("eval reward accuracy") && d.join("orpo/adapter/adapter_model.safetensors").exists(), "{t}");
    let t = run(&["run"], "dora.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("dora")), ("max_steps", "3".into())]);
    let losses: Vec<f64> = t.lines().find_map(|l| l.split_once("loss of one eval record: adapter ")).map(|(_, rest)| rest.split(", merged ").map(|x| x.trim().parse().unwrap()).collect()).unwrap_or_default();
    assert!(losses.len() == 2 && (losses[0] - losses[1]).abs() < 1e-4 * losses[0], "the merged DoRA model's loss differs from the adapter's: {t}");
    let t = run(&["run"], "adalora.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("adalora")), ("max_steps", "30".into())]);
    assert!(t.contains("orth_reg") && d.join("adalora/adapter/adapter_model.safetensors").exists() && d.join("adalora/adalora_ranks.jsonl").exists(), "{t}");
    run(&["run"], "chat_tokens.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("chat_tokens")), ("max_steps", "3".into())]);
    added_tokens_load_in_transformers_and_peft(&d.join("llama_gqa"), &d.join("chat_tokens/adapter"), d);
    py("t5_reference.py", &[d.to_str().unwrap(), "flan_t5"]);
    let pairs: Vec<String> = (0..4).map(|i| serde_json::json!({"input": format!("summarize: record {i} of the quick brown fox"), "target": format!("fox {i}")}).to_string()).collect();
    std::fs::write(d.join("pairs.jsonl"), pairs.join("\n")).unwrap();
    let t = run(&["run"], "t5_eval.rhai", &[("model_dir", out("flan_t5")), ("adapter_dir", out("flan_t5/peft_adapter")), ("data_file", out("pairs.jsonl")), ("n_eval", "4".into()), ("max_new_tokens", "8".into())]);
    assert!(t.contains("mean loss of the references") && t.contains("ROUGE-L"), "{t}");
    let docs: Vec<String> = (0..10).map(|i| serde_json::json!({"document": format!("record {i}: the quick brown fox jumps over the lazy dog"), "summary": format!("fox {i}")}).to_string()).collect();
    std::fs::write(d.join("docs.jsonl"), docs.join("\n")).unwrap();
    let t = run(&["run"], "t5_summarize.rhai", &[("model_dir", out("flan_t5")), ("data_file", out("docs.jsonl")), ("n_eval", "3".into()), ("max_steps", "3".into()), ("max_new_tokens", "6".into()), ("out_dir", "runs/t5".into())]);
    assert!(t.contains("step 3: eval_loss") && t.contains("ROUGE-L") && t.contains("trained 3 steps"), "{t}");
    let t = run(&["run"], "multi_stage.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("stages")), ("n_eval", "2".into()), ("max_steps", "2".into()), ("threshold", "0.0".into()), ("require_improvement", "false".into())]);
    assert!(t.contains("base: exact match") && t.contains("merged into") && d.join("stages/merged/config.json").exists(), "{t}");
    let t = run(&["run"], "early_stop_on_generations.rhai", &[("model_dir", model.clone()), ("data_file", data.clone()), ("output_dir", out("gen-stop")), ("n_eval", "2".into()), ("max_steps", "8".into()), ("eval_every", "2".into()), ("patience", "1".into())]);
    assert!(t.contains("step 2: eval_loss") && t.contains("parse rate") && t.contains("early: true"), "{t}");
    run(&["run"], "data_prep.rhai", &[("data_file", data.clone())]);
    run(&["run"], "eval_metrics.rhai", &[]);
    run(&["run"], "inspect.rhai", &[("model_dir", model.clone())]);
    let t = run(&["run"], "export_gguf.rhai", &[("gguf", model.clone()), ("data_file", data.clone()), ("output_dir", out("gguf")), ("max_steps", "2".into())]);
    assert!(t.contains("trained 2 steps") && d.join("gguf/model-q4_k_m.gguf").exists() && d.join("gguf/adapter.gguf").exists() && d.join("gguf/Modelfile").exists(), "{t}");
    run(&["run"], "import_gguf.rhai", &[("gguf", s(demo_gguf().display().to_string())), ("out_dir", out("imported"))]);
    run(&["launch", "--nproc-per-node", "2"], "multi_gpu.rhai", &[("model_path", model.clone()), ("data_path", data.clone()), ("out", out("multi")), ("dtype", s("fp32")), ("max_steps", "2".into())]);
    // push_adapter.rhai needs the test Hub: tests/hub.rs runs it (and multi_stage.rhai's release) to the end
    ran.push("push_adapter.rhai");
    let mut shipped: Vec<String> = std::fs::read_dir(root().join("scripts"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".rhai"))
        .collect();
    shipped.sort();
    let mut covered: Vec<String> = ran.iter().map(|s| s.to_string()).collect();
    covered.sort();
    covered.dedup();
    assert_eq!(shipped, covered, "every recipe in scripts/ must run here (or in tests/hub.rs)");
}

/// The adapter `scripts/chat_tokens.rhai` saved (new special tokens, their trained embedding
/// rows, LoRA) for the base model `model`: the tokenizer saved beside it tokenizes as
/// transformers' own `add_tokens` does, and transformers + peft (base resized to the saved
/// tokenizer) give ftscript's logits on a text with the new tokens.
fn added_tokens_load_in_transformers_and_peft(model: &Path, adapter: &Path, d: &Path) {
    let tokens = ["<|call|>".to_string(), "<|result|>".to_string()];
    std::fs::write(d.join("tokens.json"), serde_json::to_string(&tokens).unwrap()).unwrap();
    let text = "<|call|>age: 3; name: Al<|result|>{\"name\"";
    let out = d.join("added_tokens.safetensors");
    py("peft_reference.py", &["added-tokens", model.to_str().unwrap(), adapter.to_str().unwrap(), d.join("tokens.json").to_str().unwrap(), text, out.to_str().unwrap()]);
    let theirs = read_safetensors(&out);
    let mut m = ftscript::models::load(model, "fp32", tch::Device::Cpu).unwrap();
    let ids = m.add_tokens(&tokens, true).unwrap();
    assert_eq!(ids, [300, 301]);
    ftscript::nn::peft::load_adapter(&mut m.net, adapter, tch::Kind::Float).unwrap();
    let ours = m.tokenizer.encode(text, true).unwrap();
    let their_ids: Vec<i64> = Vec::try_from(&theirs["ids"]).unwrap();
    let added_ids: Vec<i64> = Vec::try_from(&theirs["ids_transformers_added"]).unwrap();
    assert_eq!(ours, their_ids, "the saved tokenizer in transformers");
    assert_eq!(ours, added_ids, "transformers' add_tokens on the base tokenizer");
    assert!(ours.contains(&300) && ours.contains(&301), "{ours:?}");
    assert_eq!(Vec::<i64>::try_from(&theirs["len"]).unwrap(), [302, 302]);
    let t = ours.len() as i64;
    let input = tch::Tensor::from_slice(&ours).view([1, t]);
    let positions = tch::Tensor::arange(t, (tch::Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    let logits = tch::no_grad(|| m.net.forward(&input, &positions, &ftscript::models::decoder::AttnMask::Causal, None, false));
    let err = rel_err(&logits, &theirs["logits"]);
    assert!(err < 1e-4, "logits with the added tokens differ from transformers + peft: rel err {err:.3e}");
}

/// A tiny model and 48 short records in `d`, as `(model path, data path)`.
fn setup(d: &Path) -> String {
    tiny_model_and_text(d, 48)
}

#[test]
fn a_hook_generates_with_the_model_and_sees_the_adapters_of_its_step() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    // on_eval generates for two held-out prompts and scores them; it stops the run at step 3 of
    // 6, while step 4's forward and backward are already queued: what it generated must be what
    // the model generates after train returns
    let t = run_recipe(
        d,
        "hook.rhai",
        &format!(
            r#"
import "ft/callbacks" as cb;
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1 }});
let data = load_dataset("data.jsonl").split(8, 1);
let prompts = ["record 3: the quick", "record 5: the"];
let refs = ["brown fox", "quick brown fox"];
let seen = [];
let r = train(m, #{{ train: data.train, eval: data.eval, batch_size: 4, lr: 3e-2, log_every: 1, max_steps: 6, eval_every: 3,
    output_dir: "hook",
    on_step: cb::sample_printer(m, ["record 1:"], #{{ max_new_tokens: 4 }}),
    on_eval: |s| {{
        let gens = prompts.map(|p| m.generate(p, #{{ max_new_tokens: 8 }}));
        print(`EVAL step=${{s.step}} em=${{exact_match(gens, refs)}} bleu=${{bleu(gens, refs)}} loss=${{m.loss(prompts[0])}}`);
        seen.push(gens);
        if s.step == 3 {{ "stop" }}
    }} }});
let after = prompts.map(|p| m.generate(p, #{{ max_new_tokens: 8 }}));
print(`RESULT steps=${{r.steps}} stopped=${{r.stopped_early}} same=${{seen[seen.len() - 1] == after}}`);
print(`GEN ${{after}}`);
"#
        ),
    );
    assert!(t.contains("RESULT steps=3 stopped=true same=true"), "{t}");
    assert!(t.contains("EVAL step=3 em="), "{t}");
    assert_eq!(t.matches("sample at step").count(), 3, "sample_printer runs at every step:\n{t}");
}

#[test]
fn a_module_returns_a_stateful_early_stopping_closure() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    std::fs::write(
        d.join("rules.rhai"),
        r#"
/// Stops once the eval loss has not improved by `min_delta` for `patience` evaluations.
fn patience_rule(patience, min_delta) {
    let state = #{ best: 1e30, bad: 0 };
    |m| {
        if m.eval_loss < state.best - min_delta { state.best = m.eval_loss; state.bad = 0; } else { state.bad += 1; }
        if state.bad >= patience { "stop" }
    }
}
"#,
    )
    .unwrap();
    let recipe = format!(
        r#"
import "rules" as rules;
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let data = load_dataset("data.jsonl").split(8, 1);
let rule = rules::patience_rule(2, 0.02);
let r = train(m, #{{ train: data.train, eval: data.eval, batch_size: 4, lr: 3e-3, log_every: 1, max_steps: 40, eval_every: 2,
    output_dir: "es", on_eval: rule }});
print(`RESULT steps=${{r.steps}} stopped=${{r.stopped_early}}`);
"#
    );
    std::fs::write(d.join("es.rhai"), &recipe).unwrap();
    let check = ftscript(&["check", "es.rhai"], d);
    assert!(check.status.success(), "{}", text(&check));
    let t = run_recipe(d, "es.rhai", &recipe);
    let evals: Vec<(u64, f64)> = metrics(&d.join("es/metrics.jsonl")).iter().filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("eval_loss")?.as_f64()?))).collect();
    let (mut best, mut bad, mut predicted) = (1e30, 0, 40);
    for &(step, loss) in &evals {
        if loss < best - 0.02 {
            best = loss;
            bad = 0;
        } else {
            bad += 1;
        }
        if bad >= 2 {
            predicted = step;
            break;
        }
    }
    assert!(predicted < 40, "the run should plateau within 40 steps: {evals:?}");
    assert!(t.contains(&format!("RESULT steps={predicted} stopped=true")), "the rule says stop at {predicted}: {evals:?}\n{t}");
}

/// A recipe that trains the tiny model with `opts` added to train's options (and `lora` as
/// add_lora's), for the table of mistakes below.
fn mistake_recipe(model: &str, lora: &str, opts: &str) -> String {
    format!(
        r#"
import "ft/callbacks" as cb;
const max_steps = 4;
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8, {lora} }});
let data = load_dataset("data.jsonl").split(8, 1);
let r = train(m, #{{ train: data.train, eval: data.eval, batch_size: 4, log_every: 1, eval_every: 2, max_steps: max_steps, {opts} }});
"#
    )
}

#[test]
fn mistakes_fail_before_the_first_step_and_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    // (what, add_lora options, train options, --set, expected in the error, caught by `check`,
    // caught before the first step (else at the first report that lacks the metric))
    let table: &[(&str, &str, &str, &[&str], &[&str], bool, bool)] = &[
        ("--set of the wrong type", "", "output_dir: \"o1\"", &["max_steps=five"], &["--set max_steps=\"five\"", "`max_steps` is an integer"], true, true),
        ("format typo", "", "output_dir: \"o2\", format: \"alpca\"", &[], &["format \"alpca\" is not one of", "did you mean \"alpaca\""], true, true),
        ("scheduler typo", "", "output_dir: \"o3\", scheduler: \"cosin\"", &[], &["did you mean \"cosine\""], true, true),
        ("option key typo", "", "output_dir: \"o4\", warmup_step: 2", &[], &["unknown field `warmup_step`", "did you mean `warmup_steps`"], true, true),
        ("LoRA target typo", "targets: [\"q_prj\", \"v_proj\"]", "output_dir: \"o5\"", &[], &["target `q_prj` matches no linear layer", "did you mean `q_proj`"], false, true),
        ("early stopping on a metric no report has", "", "output_dir: \"o6\", on_eval: cb::early_stopping(#{ metric: \"eval_los\" })", &[], &["no metric `eval_los`", "did you mean `eval_loss`"], false, false),
        ("a hook reads a metric no report has", "", "output_dir: \"o7\", on_step: |s| if s.los > 9.0 { \"stop\" }", &[], &["has no key `los`"], false, false),
        ("expert stacks on a dense model", "target_parameters: [\"mlp.experts.down_proj\"]", "output_dir: \"o9\"", &[], &["target_parameters", "this model has no mixture-of-experts layers"], false, true),
        ("pad_to_multiple_of of 0", "", "output_dir: \"o10\", pad_to_multiple_of: 0", &[], &["pad_to_multiple_of must be at least 1, got 0"], false, true),
        ("pad_to_multiple_of misspelt", "", "output_dir: \"o11\", pad_to_multiple: 8", &[], &["unknown field `pad_to_multiple`", "did you mean `pad_to_multiple_of`"], true, true),
        ("max_length shorter than every prompt", "", "output_dir: \"o8\", max_length: 3, format: |r| #{ prompt: r.text, response: \"x\" }", &[], &["no example keeps a token to learn from", "max_length 3", "longest prompt has"], false, true),
    ];
    let mut failed = vec![];
    for (what, lora, opts, set, expected, static_, before_first_step) in table {
        let path = d.join("mistake.rhai");
        std::fs::write(&path, mistake_recipe(&model, lora, opts)).unwrap();
        let mut args = vec!["run", "mistake.rhai"];
        for kv in set.iter() {
            args.extend(["--set", kv]);
        }
        let out = ftscript(&args, d);
        let t = text(&out);
        let ok = !out.status.success() && !t.contains("panicked") && expected.iter().all(|e| t.contains(e)) && !(*before_first_step && t.contains(" step 1 loss"));
        if !ok {
            failed.push(format!("{what}: expected {expected:?} before the first step, got:\n{t}"));
        }
        if *static_ {
            args[0] = "check";
            let out = ftscript(&args, d);
            let t = text(&out);
            if out.status.success() || !expected.iter().all(|e| t.contains(e)) {
                failed.push(format!("{what}: `ftscript check` should catch it ({expected:?}):\n{t}"));
            }
        }
    }
    // a target that matches fewer modules than the model has layers: a warning, and training runs
    let partial = run_recipe(d, "partial.rhai", &mistake_recipe(&model, "targets: [\"layers.0.self_attn.q_proj\", \"v_proj\"]", "output_dir: \"p\""));
    if !partial.contains("target `layers.0.self_attn.q_proj` matches 1 module(s), fewer than the model's 3 layers") {
        failed.push(format!("partial target match: no warning:\n{partial}"));
    }
    // an output_dir that holds a run: refused, unless resume or overwrite
    let again = ftscript(&["run", "partial.rhai"], d);
    let t = text(&again);
    if again.status.success() || !t.contains("output_dir `p` holds an earlier run") || !t.contains("overwrite: true") {
        failed.push(format!("reused output_dir: expected a refusal:\n{t}"));
    }
    run_recipe(d, "over.rhai", &mistake_recipe(&model, "", "output_dir: \"p\", overwrite: true"));
    let lines = metrics(&d.join("p/metrics.jsonl"));
    if lines.iter().filter(|m| m["step"] == 2 && m.get("loss").is_some()).count() != 1 {
        failed.push(format!("overwrite should start the run's metrics afresh: {lines:?}"));
    }
    // resuming beyond max_steps
    std::fs::write(d.join("resume.rhai"), mistake_recipe(&model, "", "output_dir: \"p\", resume: true")).unwrap();
    let out = ftscript(&["run", "resume.rhai", "--set", "max_steps=3"], d);
    let t = text(&out);
    if out.status.success() || !t.contains("is at step 4, and this run trains 3 steps: nothing is left to train") {
        failed.push(format!("resume beyond max_steps: expected an error:\n{t}"));
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

/// Qwen3-MoE as a user meets it: loaded in 4 bits (attention quantized, the experts dense, as
/// bitsandbytes leaves them), LoRA on the attention and the expert stacks trains and saves; a
/// typo in `target_parameters` and dropout on expert stacks are refused with the fix.
#[test]
fn qwen3_moe_in_4_bits_and_its_adapter_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_and_text(d, "qwen3_moe", 16);
    let recipe = |lora: &str| {
        format!(
            r#"
let m = load_model("{model}", #{{ quantize: "nf4", compute_dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, {lora} }});
let r = train(m, #{{ train: load_dataset("data.jsonl"), batch_size: 4, max_steps: 2, log_every: 1, output_dir: "out" }});
let mem = m.memory();
print(`RESULT loss=${{r.train_loss}} quantized=${{mem.quantized}} dense=${{mem.dense}}`);
m.save_adapter("out/adapter");
"#
        )
    };
    let t = run_recipe(d, "moe.rhai", &recipe("dropout: 0.0, target_parameters: [\"gate_up_proj\", \"down_proj\"]"));
    let result = t.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("{t}"));
    let field = |k: &str| -> f64 { result.split(' ').find_map(|kv| kv.strip_prefix(&format!("{k}="))).unwrap().parse().unwrap() };
    assert!(field("loss").is_finite() && field("quantized") > 0.0, "{t}");
    // the experts (2 sparse layers × 6 × 3 × 64 × 32 fp32 values) stay dense
    assert!(field("dense") > (2 * 6 * 3 * 64 * 32 * 4) as f64, "{t}");
    let saved = read_safetensors(&d.join("out/adapter/adapter_model.safetensors"));
    assert!(saved.contains_key("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"), "{:?}", saved.keys());
    for (lora, expected) in [
        ("dropout: 0.0, target_parameters: [\"mlp.experts.gate_proj\"]", "target_parameters `mlp.experts.gate_proj` names no parameter; the expert stacks are mlp.experts.gate_up_proj, mlp.experts.down_proj"),
        ("dropout: 0.05, target_parameters: [\"down_proj\"]", "take plain LoRA without dropout, as peft's ParamWrapper does: set dropout: 0.0"),
    ] {
        std::fs::write(d.join("bad.rhai"), recipe(lora)).unwrap();
        let out = ftscript(&["run", "bad.rhai"], d);
        let t = text(&out);
        assert!(!out.status.success() && t.contains(expected) && !t.contains("panicked"), "{lora}: expected `{expected}`:\n{t}");
    }
}

#[test]
fn a_failing_callback_keeps_a_checkpoint_and_names_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let recipe = mistake_recipe(&model, "", "output_dir: \"f\",\n    on_step: |s| if s.step == 3 { throw \"bad metric\"; }");
    std::fs::write(d.join("fail.rhai"), &recipe).unwrap();
    let out = ftscript(&["run", "fail.rhai"], d);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("fail.rhai:8:") && t.contains("on_step callback failed, stopped at step 3") && t.contains("bad metric"), "{t}");
    assert!(d.join("f/checkpoint-3/adapter_model.safetensors").exists(), "no checkpoint at the failing step:\n{t}");
}

/// `generate(..., #{profile: dir})` as a recipe asks where a generation's time goes: the call
/// writes a Chrome trace of its ops and a summary, and returns the text the unprofiled call does.
#[test]
fn a_profiled_generation_writes_its_trace_and_gives_the_same_text() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let t = run_recipe(
        d,
        "profile.rhai",
        &format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 8 }});
let prompts = ["record 1:", "record 22: the quick"];
let plain = m.generate(prompts, #{{ max_new_tokens: 5 }});
let profiled = m.generate(prompts, #{{ max_new_tokens: 5, profile: "gen-profile" }});
let one = m.generate("record 3:", #{{ max_new_tokens: 3, profile: "one" }});
print(`SAME ${{plain == profiled}} ${{one == m.generate("record 3:", #{{ max_new_tokens: 3 }})}}`);
"#
        ),
    );
    assert!(t.contains("SAME true true"), "{t}");
    for dir in ["gen-profile", "one"] {
        let summary = std::fs::read_to_string(d.join(dir).join("summary.txt")).unwrap_or_else(|e| panic!("{dir}/summary.txt: {e}\n{t}"));
        assert!(summary.starts_with("generate\nwall "), "{summary}");
        let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(dir).join("trace.json")).unwrap()).unwrap();
        let names: Vec<&str> = trace["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(names.iter().any(|n| n.contains("linear") || n.contains("mm")), "{dir}: {names:?}");
    }
}

/// `with_adapters_disabled` as a recipe uses it: inside the closure the trained model generates
/// and scores as the base model loaded fresh does; outside, the adapters are back; `train`
/// inside it is refused with a message.
#[test]
fn with_adapters_disabled_gives_the_base_model_back_for_its_closure() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let t = run_recipe(
        d,
        "base.rhai",
        &format!(
            r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
let base = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{ r: 4, alpha: 16, targets: "all-linear", use_dora: true }});
train(m, #{{ train: load_dataset("data.jsonl"), batch_size: 4, lr: 5e-2, max_steps: 4, output_dir: "run" }});
let text = "record 3: the quick brown fox";
let inside = m.with_adapters_disabled(|base| [base.loss(text), base.generate("record 3:", #{{ max_new_tokens: 6 }})]);
print(`LOSSES base=${{base.loss(text)}} inside=${{inside[0]}} adapted=${{m.loss(text)}}`);
print(`GEN base=${{base.generate("record 3:", #{{ max_new_tokens: 6 }})}}|inside=${{inside[1]}}`);
try {{
    m.with_adapters_disabled(|base| train(base, #{{ train: load_dataset("data.jsonl"), max_steps: 1, output_dir: "run2" }}));
    print("REFUSED nothing: train ran");
}} catch (e) {{
    print(`REFUSED ${{e}}`);
}}
"#
        ),
    );
    let line = t.lines().find(|l| l.starts_with("LOSSES")).unwrap_or_else(|| panic!("{t}"));
    let v: Vec<f64> = line.split_whitespace().skip(1).map(|kv| kv.split_once('=').unwrap().1.parse().unwrap()).collect();
    assert!((v[0] - v[1]).abs() < 1e-6, "inside the closure the loss is the base model's: {line}");
    assert!((v[0] - v[2]).abs() > 1e-2, "the trained adapters change the loss outside it: {line}");
    let gen = t.lines().find(|l| l.starts_with("GEN")).unwrap();
    let (base, inside) = gen.trim_start_matches("GEN base=").split_once("|inside=").unwrap();
    assert_eq!(base, inside, "{t}");
    assert!(t.contains("REFUSED") && t.contains("train cannot run inside with_adapters_disabled"), "{t}");
    // the common slip, the closure using the variable the call is made on, gets the fix
    std::fs::write(d.join("slip.rhai"), format!("let m = load_model(\"{model}\", #{{ dtype: \"fp32\" }});\nm.add_lora(#{{}});\nprint(m.with_adapters_disabled(|| m.loss(\"record 1\")));\n")).unwrap();
    let out = ftscript(&["run", "slip.rhai"], d);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("use the value the closure receives") && !t.contains("panicked"), "{t}");
}

/// A recipe branches on the kind of a caught error: a missing model is `not_found`, a
/// misspelt option `bad_input`, a push without `--allow-push` `permission`, an allocation the
/// machine cannot make `oom`; the message reads as before.
#[test]
fn a_caught_error_has_a_kind_to_branch_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    // a config of plausible sizes whose embeddings alone would need 8 TB
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = 16_000_000u64.into();
    config["hidden_size"] = 131_072.into();
    std::fs::create_dir_all(d.join("huge")).unwrap();
    std::fs::write(d.join("huge/config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), d.join("huge").join(f)).unwrap();
    }
    let t = run_recipe(
        d,
        "kinds.rhai",
        &format!(
            r#"
let kinds = [];
try {{ load_model("no/such/model"); }} catch (e) {{ kinds.push(e.kind); print(`MESSAGE ${{e}}`); }}
try {{ load_model("{m}", #{{ dtpye: "fp32" }}); }} catch (e) {{ kinds.push(e.kind); }}
try {{ hub_push("{m}", "me/tiny"); }} catch (e) {{ kinds.push(e.kind); }}
try {{ load_model("huge", #{{ random_init: true, dtype: "fp32" }}); }} catch (e) {{ kinds.push(e.kind); }}
print(`KINDS ${{kinds}}`);
"#,
            m = model.display()
        ),
    );
    assert!(t.contains(r#"KINDS ["not_found", "bad_input", "permission", "oom"]"#), "{t}");
    assert!(t.contains("MESSAGE load_model: model `no/such/model` not found"), "{t}");
}

/// A recipe cannot hang the host: a training hook that loops forever, a map function that does,
/// and the recipe's own endless loop (even inside `try`) each stop with an error naming the flag
/// that raises the budget; training keeps its last checkpoint.
#[test]
fn endless_loops_stop_at_their_operation_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = setup(d);
    let run = |name: &str, body: String, flags: &[&str]| {
        std::fs::write(d.join(name), body).unwrap();
        let mut args = vec!["run", name];
        args.extend(flags);
        let out = ftscript(&args, d);
        (out.status.success(), text(&out))
    };
    let (ok, t) = run(
        "hook.rhai",
        format!(
            r#"let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_lora(#{{}});
train(m, #{{ train: load_dataset("data.jsonl"), max_steps: 4, save_every: 2, output_dir: "run",
    on_step: |s| {{ if s.step == 3 {{ let i = 0; loop {{ i += 1; }} }} }} }});
"#
        ),
        &["--max-callback-operations", "100000"],
    );
    assert!(!ok && t.contains("on_step callback failed, stopped at step 3 (checkpoint kept: run/checkpoint-3)") && t.contains("a callback ran more than 100000 operations") && t.contains("--max-callback-operations"), "{t}");
    assert!(d.join("run/checkpoint-3/adapter_model.safetensors").exists(), "{t}");
    let (ok, t) = run("map.rhai", "let ds = dataset([#{ a: 1 }]);\nds.map(|r| { while true {} r });\n".into(), &["--max-callback-operations", "100000"]);
    assert!(!ok && t.contains("--max-callback-operations") && t.contains("map.rhai:2"), "{t}");
    let (ok, t) = run("top.rhai", "try { let n = 0; loop { n += 1; } } catch (e) { print(`CAUGHT ${e.kind}`); }\n".into(), &["--max-operations", "1000000"]);
    assert!(!ok && t.contains("more than 1000000 operations outside its callbacks") && t.contains("--max-operations") && !t.contains("CAUGHT bad_input"), "{t}");
    // the defaults let a real recipe through: the same hook without its loop
    let (ok, t) = run(
        "fine.rhai",
        format!("let m = load_model(\"{model}\", #{{ dtype: \"fp32\" }});\nm.add_lora(#{{}});\ntrain(m, #{{ train: load_dataset(\"data.jsonl\"), max_steps: 2, output_dir: \"run2\", on_step: |s| {{ let x = 0; for i in 0..1000 {{ x += i; }} }} }});\n"),
        &[],
    );
    assert!(ok, "{t}");
}
