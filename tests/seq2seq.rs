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
        let greedy = m.generate(&[source], &ftscript::generate::Sampling { max_new_tokens: 20, ..Default::default() }, &[]).unwrap().remove(0);
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
/// equal transformers' `loss` with `labels` and the texts its greedy `generate` (one by one, in
/// one right-padded batch, and with a repetition penalty, which sees the decoder's ids), for both kinds;
/// `evaluate` over the pairs predicts the same texts; with a peft-made LoRA loaded
/// (`model.load_adapter(dir)`), the losses equal peft's.
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
        // evaluate() over the same pairs as records (format "seq2seq": input, target) generates the same texts
        let records: Vec<String> = pairs.iter().map(|p| format!("#{{ input: {}, target: {} }}", p["source"], p["target"])).collect();
        body.push_str(&format!("let e = evaluate(m, dataset([{}]), #{{ metrics: [\"exact_match\", \"bleu\"], max_new_tokens: 20, samples: {} }});\n", records.join(", "), pairs.len()));
        body.push_str("print(`RECORDS=${e.records}`);\nfor i in 0..e.samples.len() { print(`EVAL${i}=${e.samples[i].prediction.to_debug()}`); }\n");
        // the sources in one padded batch; each with a repetition penalty
        let sources: Vec<String> = pairs.iter().map(|p| p["source"].to_string()).collect();
        body.push_str(&format!("let b = m.generate([{}], #{{ max_new_tokens: 20 }});\nfor i in 0..b.len() {{ print(`BATCH${{i}}=${{b[i].to_debug()}}`); }}\n", sources.join(", ")));
        for (i, s) in sources.iter().enumerate() {
            body.push_str(&format!("print(`PENALIZED{i}=${{m.generate({s}, #{{ max_new_tokens: 20, repetition_penalty: 1.5 }}).to_debug()}}`);\n"));
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
            assert_eq!(field("EVAL"), format!("{:?}", p["generated"].as_str().unwrap()), "{name} pair {i}: evaluate's prediction");
            assert_eq!(field("BATCH"), format!("{:?}", p["batch_generated"].as_str().unwrap()), "{name} pair {i}: generated in a padded batch");
            assert_eq!(field("PENALIZED"), format!("{:?}", p["penalized"].as_str().unwrap()), "{name} pair {i}: with repetition_penalty");
        }
        assert!(pairs.iter().any(|p| p["penalized"] != p["generated"]), "{name}: the penalty changes no generation, so it is not tested");
    }
}

/// The losses a recipe printed as `KEY<i>=<loss>`, in order.
fn printed(t: &str, key: &str, n: usize) -> Vec<f64> {
    (0..n).map(|i| t.lines().find_map(|l| l.strip_prefix(&format!("{key}{i}="))).unwrap_or_else(|| panic!("no {key}{i} in:\n{t}")).parse().unwrap()).collect()
}

/// The user's path: a recipe loads a tiny T5 (both kinds, dropout off), starts from peft's fresh
/// LoRA (q, v, wo) and trains it 20 steps on `{input, target}` records (`format: "seq2seq"`,
/// batch 4 × accumulation 2, in order) — the per-step losses equal HF `Seq2SeqTrainer` + peft's
/// from the same adapter (≤ 1e-4; the token mean of each step). The adapter it saves loads in
/// `PeftModel.from_pretrained` and the model it merges in transformers, with the losses the
/// recipe measured; the adapter HF trained loads in the recipe with HF's losses.
#[test]
fn t5_lora_training_matches_seq2seq_trainer_and_loads_in_peft_and_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for name in ["t5", "flan_t5"] {
        tiny_t5(d, name);
        py("t5_reference.py", &["train", d.to_str().unwrap(), name]);
        let m = d.join(format!("{name}_train"));
        let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("hf.json")).unwrap()).unwrap();
        let s = &hf["settings"];
        let pairs = hf["pairs"].as_array().unwrap();
        let losses_of = |key: &str| pairs.iter().enumerate().map(|(i, p)| format!("print(`{key}{i}=${{m.loss({}, {})}}`);\n", p[0], p[1])).collect::<String>();
        let body = format!(
            r#"let m = load_model("{dir}");
m.load_adapter("{dir}/init");
let r = train(m, #{{ train: load_dataset("{dir}/train.jsonl"), format: "seq2seq", shuffle: false, {settings}, output_dir: "run-{name}" }});
m.save_adapter("ours-{name}");
m.save_merged("merged-{name}");
{ours}m.load_adapter("{dir}/hf_trained");
{theirs}"#,
            dir = m.display(),
            settings = reference_train_options(s),
            ours = losses_of("OURS"),
            theirs = losses_of("HF"),
        );
        let t = run_recipe(d, &format!("train_{name}.rhai"), &body);
        let ours = losses(&d.join(format!("run-{name}/metrics.jsonl")));
        let theirs: Vec<f64> = hf["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(ours.len(), theirs.len(), "{name}: steps logged");
        for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-4, "{name} step {}: loss {a} vs Seq2SeqTrainer {b}", k + 1);
        }
        assert!(theirs[0] - theirs[theirs.len() - 1] > 0.02, "{name}: the run learns nothing ({theirs:?})");
        // the adapter HF trained, loaded by the recipe, gives HF's losses
        let want: Vec<f64> = hf["trained_pair_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (a, b) in printed(&t, "HF", pairs.len()).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b, "{name}: loss under HF's adapter {a} vs peft {b}");
        }
        // ours, loaded by peft, and merged, loaded by transformers, give the recipe's losses
        let ours_losses = printed(&t, "OURS", pairs.len());
        std::fs::write(d.join("pairs.json"), serde_json::to_string(pairs).unwrap()).unwrap();
        for (model, adapter, what) in [(m.clone(), d.join(format!("ours-{name}")), "PeftModel.from_pretrained"), (d.join(format!("merged-{name}")), PathBuf::from("-"), "the merged model in transformers")] {
            let out = d.join("losses.json");
            py("t5_reference.py", &["losses", model.to_str().unwrap(), adapter.to_str().unwrap(), d.join("pairs.json").to_str().unwrap(), out.to_str().unwrap()]);
            let got: Vec<f64> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
            for (a, b) in ours_losses.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-4 * b, "{name}: {what} gives loss {b}, the recipe {a}");
            }
        }
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(format!("ours-{name}/adapter_config.json"))).unwrap()).unwrap();
        assert_eq!(config["task_type"], "SEQ_2_SEQ_LM");
    }
}

/// Gradient checkpointing (each encoder and decoder block recomputed in backward, dropout on:
/// the model's 0.1 and LoRA's) trains exactly as the full graph: the same losses and adapters.
#[test]
fn t5_checkpointing_trains_like_the_full_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = tiny_t5(d, "flan_t5");
    let records: Vec<String> = (0..12).map(|i| serde_json::json!({"input": format!("summarize: record {i} of the quick brown fox jumps"), "target": format!("fox {i} jumps")}).to_string()).collect();
    std::fs::write(d.join("pairs.jsonl"), records.join("\n")).unwrap();
    let mut body = String::new();
    for ckpt in [false, true] {
        body.push_str(&format!(
            r#"let m = load_model("{dir}");
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1, targets: ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], seed: 7 }});
train(m, #{{ train: load_dataset("pairs.jsonl"), batch_size: 4, max_steps: 4, lr: 1e-2, log_every: 1, gradient_checkpointing: {ckpt}, output_dir: "run-{ckpt}" }});
m.save_adapter("adapter-{ckpt}");
"#,
            dir = dir.display()
        ));
    }
    run_recipe(d, "ckpt.rhai", &body);
    let (full, ckpt) = (losses(&d.join("run-false/metrics.jsonl")), losses(&d.join("run-true/metrics.jsonl")));
    assert_eq!(full.len(), 4);
    for (a, b) in full.iter().zip(&ckpt) {
        assert!((a - b).abs() <= 1e-5 * a, "loss with checkpointing {b} vs the full graph {a}");
    }
    let (a, b) = (read_safetensors(&d.join("adapter-false/adapter_model.safetensors")), read_safetensors(&d.join("adapter-true/adapter_model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let e = rel_err(&b[k], t);
        assert!(e < 1e-4, "{k}: checkpointed adapter differs by {e}");
    }
}

/// Batches padded further (`pad_to_multiple_of`) score as they are: the same eval loss (no
/// dropout there; in training the dropout masks would be drawn over the larger shape).
#[test]
fn t5_padding_to_a_multiple_leaves_the_loss_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = tiny_t5(d, "flan_t5");
    let records: Vec<String> = (0..8).map(|i| serde_json::json!({"input": format!("summarize: record {i} of the {} fox", "quick ".repeat(i % 4)), "target": format!("fox {i}{}", " jumps".repeat(i % 3))}).to_string()).collect();
    std::fs::write(d.join("pairs.jsonl"), records.join("\n")).unwrap();
    let mut body = String::new();
    for multiple in [1, 16] {
        body.push_str(&format!(
            r#"let m = load_model("{dir}");
m.add_lora(#{{ r: 4, alpha: 8, seed: 7 }});
let r = train(m, #{{ train: load_dataset("pairs.jsonl"), eval: load_dataset("pairs.jsonl"), batch_size: 4, eval_batch_size: 3, max_steps: 1, lr: 0.0, eval_every: 1, pad_to_multiple_of: {multiple}, output_dir: "run-{multiple}" }});
"#,
            dir = dir.display()
        ));
    }
    run_recipe(d, "pad.rhai", &body);
    let eval_loss = |m: &str| metrics(&d.join(format!("run-{m}/metrics.jsonl"))).iter().find_map(|r| r.get("eval_loss")?.as_f64()).unwrap();
    let (plain, padded) = (eval_loss("1"), eval_loss("16"));
    assert!((plain - padded).abs() <= 1e-6 * plain, "eval loss padded to 16: {padded}, as it is: {plain}");
}

/// The mistakes a user makes in a T5 recipe stop it with an error that names the call, the
/// line and what to write instead: a target T5 does not have (with the closest name), a
/// decoder-only option, a preference objective, a record without the fields the format reads,
/// a format a decoder cannot take.
#[test]
fn t5_recipe_mistakes_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = tiny_t5(d, "t5");
    std::fs::write(d.join("pairs.jsonl"), "{\"input\": \"summarize: a fox\", \"target\": \"fox\"}\n{\"text\": \"no pair here\"}\n").unwrap();
    let llama = tiny_llama(d);
    let cases = [
        ("m.add_lora(#{ targets: [\"q_proj\", \"v\"] });", "target `q_proj` matches no linear layer (did you mean `q`?)"),
        ("m.add_lora(#{ trainable_tokens: [\"fox\"] });", "not supported on an encoder-decoder model"),
        ("m.add_lora(#{}); train(m, #{ train: load_dataset(\"pairs.jsonl\"), objective: \"dpo\" });", "objective \"dpo\" is for decoder models"),
        ("m.add_lora(#{}); train(m, #{ train: load_dataset(\"pairs.jsonl\"), packing: true });", "packing, train_on_prompt, train_on and eval_generate apply to decoder models"),
        ("m.add_lora(#{}); train(m, #{ train: load_dataset(\"pairs.jsonl\") });", "pairs.jsonl:2: missing field `input`"),
        ("m.add_lora(#{}); train(m, #{ train: load_dataset(\"pairs.jsonl\"), format: \"chatml\" });", "takes format \"seq2seq\", \"alpaca\" or a function"),
        ("m.add_lora(#{}); train(m, #{ train: load_dataset(\"pairs.jsonl\"), format: \"seq2sq\" });", "seq2seq"),
        ("train(m, #{ train: load_dataset(\"pairs.jsonl\") });", "call model.add_lora"),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let path = d.join(format!("bad{i}.rhai"));
        std::fs::write(&path, format!("let m = load_model(\"{}\");\n{line}\n", dir.display())).unwrap();
        let out = ftscript(&["run", path.to_str().unwrap()], d);
        let t = text(&out);
        assert!(!out.status.success(), "case {i} ran:\n{t}");
        assert!(t.contains(want) && t.contains(&format!("bad{i}.rhai:2")), "case {i}: expected `{want}` at line 2 in:\n{t}");
        assert!(!t.contains("panicked"), "case {i} panicked:\n{t}");
    }
    let path = d.join("decoder.rhai");
    std::fs::write(&path, format!("let m = load_model(\"{}\");\nm.add_lora(#{{}});\ntrain(m, #{{ train: load_dataset(\"pairs.jsonl\"), format: \"seq2seq\" }});\n", llama.display())).unwrap();
    let t = text(&ftscript(&["run", path.to_str().unwrap()], d));
    assert!(t.contains("format \"seq2seq\" is for an encoder-decoder model") && t.contains("decoder.rhai:3"), "{t}");
}

/// Training on a GPU in bf16 takes T5's fused pieces (the residual add and RMS norm in one
/// kernel, libtorch's one-kernel tanh-GELU): with and without checkpointing, the first step's
/// loss is transformers' bf16 loss on the same pairs (dropout off) to 0.2%.
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn t5_bf16_training_loss_on_the_gpu_matches_transformers() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let records: Vec<serde_json::Value> = (0..4).map(|i| serde_json::json!({"input": format!("summarize: record {i} of the quick brown fox jumps over the lazy dog"), "target": format!("fox {i} jumps")})).collect();
    std::fs::write(d.join("pairs.jsonl"), records.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    for name in ["t5", "flan_t5"] {
        let m = tiny_t5(d, name);
        let path = m.join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["dropout_rate"] = 0.0.into();
        std::fs::write(&path, config.to_string()).unwrap();
        let theirs: f64 = py_eval(&format!(
            "import torch, json; from transformers import AutoTokenizer, T5ForConditionalGeneration as M\n\
             tok = AutoTokenizer.from_pretrained('{m}')\n\
             model = M.from_pretrained('{m}', dtype=torch.bfloat16).cuda()\n\
             rs = [json.loads(l) for l in open('{d}/pairs.jsonl')]\n\
             src = tok([r['input'] for r in rs], return_tensors='pt', padding=True)\n\
             labels = tok([r['target'] for r in rs], return_tensors='pt', padding=True).input_ids\n\
             labels[labels == 0] = -100\n\
             with torch.no_grad(): print(model(input_ids=src.input_ids.cuda(), attention_mask=src.attention_mask.cuda(), labels=labels.cuda()).loss.item())",
            m = m.display(),
            d = d.display()
        ))
        .trim()
        .parse()
        .unwrap();
        for ckpt in ["false", "true"] {
            let body = format!(
                "let m = load_model(\"{m}\", #{{ dtype: \"bf16\", device: \"cuda\" }});\nm.add_lora(#{{ r: 4, alpha: 8, targets: [\"q\", \"k\", \"v\", \"o\"] }});\n\
                 train(m, #{{ train: load_dataset(\"pairs.jsonl\"), shuffle: false, batch_size: 4, max_steps: 1, lr: 0.0, log_every: 1, gradient_checkpointing: {ckpt}, output_dir: \"{name}-{ckpt}\" }});\n",
                m = m.display()
            );
            run_recipe(d, &format!("{name}-{ckpt}.rhai"), &body);
            let ours = metrics(&d.join(format!("{name}-{ckpt}/metrics.jsonl"))).iter().find_map(|v| v.get("loss")?.as_f64()).unwrap();
            println!("{name} checkpointing {ckpt}: loss {ours} vs transformers {theirs}");
            assert!((ours - theirs).abs() < 2e-3 * theirs, "{name} checkpointing {ckpt}: loss {ours} vs transformers' {theirs}");
        }
    }
}
