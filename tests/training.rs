//! LoRA training against HF Trainer + peft: loss curves, adapter interop both ways, merged
//! models; callbacks (early stopping, "stop"), checkpoints and bit-exact resume.

mod common;
use common::*;
use ftscript::models::decoder::AttnMask;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// ftscript's logits for the token ids in `ids.json`, with the adapter in `adapter` (if any).
fn ftscript_logits(model: &Path, adapter: Option<&Path>, ids_json: &Path) -> Tensor {
    let mut m = ftscript::models::load(model, "fp32", Device::Cpu).unwrap();
    if let Some(a) = adapter {
        ftscript::nn::peft::load_adapter(&mut m.net, a, Kind::Float).unwrap();
    }
    let ids: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(ids_json).unwrap()).unwrap();
    let (b, t) = (ids.len() as i64, ids[0].len() as i64);
    let flat: Vec<i64> = ids.into_iter().flatten().collect();
    let ids = Tensor::from_slice(&flat).view([b, t]);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true);
    tch::no_grad(|| m.net.forward(&ids, &positions, &AttnMask::Causal, None, false))
}


#[test]
fn lora_training_and_adapters_match_hf_and_peft() {
    lora_matches_hf_and_peft("llama_gqa");
}

/// DoRA: peft's DoRA adapter loads with peft's logits, 20 steps follow HF Trainer + peft's
/// DoRA, and the trained adapter (with its `lora_magnitude_vector`s) loads in peft and merges.
#[test]
fn dora_training_and_adapters_match_hf_and_peft() {
    adapters_match_hf_and_peft("llama_gqa", Some("dora"));
}

/// Trainable token rows (peft's `trainable_token_indices`) beside LoRA, on an untied model and
/// on a tied one (whose output head's rows are the trained embeddings: their gradient comes
/// from the fused loss as well as from the embedding lookup).
/// peft's `modules_to_save`: the embeddings and the output head trained whole beside LoRA.
#[test]
fn modules_to_save_match_hf_and_peft() {
    adapters_match_hf_and_peft("llama_gqa", Some("modules"));
}

/// DoRA and modules_to_save on Qwen3 (q/k norms inside the adapted attention).
#[test]
fn qwen3_dora_and_modules_to_save_match_hf_and_peft() {
    adapters_match_hf_and_peft("qwen3", Some("dora"));
    adapters_match_hf_and_peft("qwen3", Some("modules"));
}

#[test]
fn trainable_tokens_match_hf_and_peft() {
    adapters_match_hf_and_peft("llama_gqa", Some("tokens"));
    adapters_match_hf_and_peft("qwen2_tied", Some("tokens"));
}

#[test]
fn qwen3_lora_training_and_adapters_match_hf_and_peft() {
    lora_matches_hf_and_peft("qwen3");
}

#[test]
fn gemma2_lora_training_and_adapters_match_hf_and_peft() {
    lora_matches_hf_and_peft("gemma2");
}

/// Gemma 2's soft-capped attention goes in blocks of queries from 512-token rows on: a user's
/// run on rows of 600 tokens (global and sliding layers, both soft-capped) starts from
/// transformers' eager loss on the same tokens (fp32: 1e-7 apart; a block that misses its
/// last key is 5e-5 off).
#[test]
fn gemma2_training_on_long_rows_starts_from_transformers_loss() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tiny(d, "gemma2");
    let ids: Vec<Vec<i64>> = (0..2).map(|r| (0..600).map(|i| 3 + (r * 37 + i * 11 + i * i % 17) % 290).collect()).collect();
    let lines: Vec<String> = ids.iter().map(|r| serde_json::json!({ "input_ids": r }).to_string()).collect();
    std::fs::write(d.join("long.jsonl"), lines.join("\n")).unwrap();
    let theirs: f64 = py_eval(&format!(
        "import torch; from transformers import AutoModelForCausalLM as M\n\
         model = M.from_pretrained('{m}', dtype=torch.float32, attn_implementation='eager')\n\
         ids = torch.tensor({ids:?})\n\
         with torch.no_grad(): print(model(input_ids=ids, labels=ids).loss.item())",
        m = m.display()
    ))
    .trim()
    .parse()
    .unwrap();
    run_recipe(
        d,
        "long.rhai",
        &format!(
            r#"
let m = load_model("{m}");
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.0 }});
train(m, #{{ train: load_dataset("{o}/long.jsonl"), format: "tokens", shuffle: false, batch_size: 2, max_steps: 1,
    lr: 0.0, log_every: 1, output_dir: "{o}/run" }});
"#,
            m = m.display(),
            o = d.display()
        ),
    );
    let ours = metrics(&d.join("run/metrics.jsonl")).iter().find_map(|v| v.get("loss")?.as_f64()).unwrap();
    println!("600-token rows: loss {ours} vs transformers {theirs}");
    assert!((ours - theirs).abs() < 1e-5 * theirs, "loss {ours} vs transformers' {theirs}");
}

/// Phi-3: LoRA on the fused `qkv_proj` and `gate_up_proj` (one adapter each, as peft makes
/// them), partial rotary, LongRoPE's long factors, the window; and DoRA on the fused modules.
#[test]
fn phi3_lora_training_and_adapters_match_hf_and_peft() {
    lora_matches_hf_and_peft("phi3");
    adapters_match_hf_and_peft("phi3", Some("dora"));
}

#[test]
fn gemma3_lora_training_and_adapters_match_hf_and_peft() {
    lora_matches_hf_and_peft("gemma3");
}

/// Qwen3-MoE: LoRA on the attention and on every expert stack (peft's `target_parameters`), the
/// load-balancing loss in the loss as transformers adds it.
#[test]
fn qwen3_moe_lora_training_and_adapters_match_hf_and_peft() {
    adapters_match_hf_and_peft("qwen3_moe", Some("experts"));
}

fn lora_matches_hf_and_peft(name: &str) {
    adapters_match_hf_and_peft(name, None);
}

/// On the tiny model `name`: a peft adapter (LoRA, or the `variant` peft_reference.py names)
/// loads with peft's logits; 20 steps train as HF Trainer + peft do from the same adapter; the
/// trained adapter loads in peft and the merged model in transformers, both with ftscript's
/// logits.
fn adapters_match_hf_and_peft(name: &str, variant: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny(d, name);
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    py("peft_reference.py", &[&["init", m, o][..], variant.as_slice()].concat());
    let name = &format!("{name}{}", variant.map(|v| format!(" ({v})")).unwrap_or_default());
    py("peft_reference.py", &["train", m, o]);
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("hf_losses.json")).unwrap()).unwrap();
    let s = &hf["settings"];

    // 1. a peft-made adapter loads in ftscript with the same logits
    let ours = ftscript_logits(&model, Some(&d.join("random")), &d.join("ids.json"));
    let theirs = &read_safetensors(&d.join("random_logits.safetensors"))["logits"];
    let err = rel_err(&ours, theirs);
    assert!(err < 1e-4, "{name}: peft adapter logits differ: rel err {err:.3e}");

    // 2. the same training run as HF Trainer + peft, from peft's initial adapter
    run_recipe(
        d,
        "train.rhai",
        &format!(
            r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cpu" }});
m.load_adapter("{o}/init");
let r = train(m, #{{
    train: load_dataset("{o}/train.jsonl"), format: "tokens", shuffle: false, {settings},
    output_dir: "{o}/ft",
}});
m.save_adapter("{o}/ft_adapter");
m.save_merged("{o}/ft_merged");
"#,
            settings = reference_train_options(s),
        ),
    );
    let ours = losses(&d.join("ft/metrics.jsonl"));
    let theirs: Vec<f64> = hf["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(ours.len(), theirs.len(), "step counts differ: {ours:?} vs {theirs:?}");
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!((a - b).abs() < 1e-3, "{name} step {}: ftscript loss {a} vs HF Trainer {b}\nours {ours:?}\nHF {theirs:?}", i + 1);
    }
    if name.starts_with("llama_gqa") {
        assert!(theirs.first().unwrap() - theirs.last().unwrap() > 0.05, "the reference run should learn: {theirs:?}");
    }

    // 3. the adapter ftscript trained loads in peft with the same logits
    let ad = d.join("ft_adapter");
    if variant == Some("tokens") {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["trainable_token_indices"], serde_json::json!([5, 17, 42, 99, 120]), "{config}");
        let saved = read_safetensors(&ad.join("adapter_model.safetensors"));
        let rows = &saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"];
        assert_eq!(rows.size(), [5, 64]);
        let start = read_safetensors(&d.join("init/adapter_model.safetensors"));
        let moved = rel_err(rows, &start["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]);
        assert!(moved > 1e-3, "the token rows did not train (rel change {moved:.2e})");
    }
    if variant == Some("modules") {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["modules_to_save"], serde_json::json!(["embed_tokens", "lm_head"]), "{config}");
        let saved = read_safetensors(&ad.join("adapter_model.safetensors"));
        let start = read_safetensors(&d.join("init/adapter_model.safetensors"));
        for key in ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"] {
            assert_eq!(saved[key].size(), [300, 64], "{key}");
            let moved = rel_err(&saved[key], &start[key]);
            assert!(moved > 1e-3, "{key} did not train (rel change {moved:.2e})");
        }
    }
    if variant == Some("dora") {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["use_dora"], true, "{config}");
        let saved = read_safetensors(&ad.join("adapter_model.safetensors"));
        let magnitudes: Vec<&String> = saved.keys().filter(|k| k.ends_with(".lora_magnitude_vector")).collect();
        assert_eq!(magnitudes.len(), 3 * 2, "one magnitude per adapted module (3 layers × q, v): {:?}", saved.keys());
    }
    if variant == Some("experts") {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), "{config}");
        let saved = read_safetensors(&ad.join("adapter_model.safetensors"));
        let start = read_safetensors(&d.join("init/adapter_model.safetensors"));
        // layers 0 and 2 are sparse (6 experts, r = 4): gate_up_proj's adapter one base_layer deeper
        for (module, inp, out) in [("experts.base_layer", 64, 64), ("experts", 32, 64)] {
            for l in [0, 2] {
                let key = |t: &str| format!("base_model.model.model.layers.{l}.mlp.{module}.{t}.weight");
                assert_eq!(saved[&key("lora_A")].size(), [24, inp], "{}", key("lora_A"));
                assert_eq!(saved[&key("lora_B")].size(), [out, 24], "{}", key("lora_B"));
                assert!(saved[&key("lora_B")].abs().max().double_value(&[]) > 1e-4, "{} did not train", key("lora_B"));
                assert!(rel_err(&saved[&key("lora_A")], &start[&key("lora_A")]) > 1e-4, "{} did not train", key("lora_A"));
            }
        }
        assert!(!saved.keys().any(|k| k.contains("layers.1.mlp")), "layer 1 is dense and has no adapter: {:?}", saved.keys());
    }
    py("peft_reference.py", &["adapter-logits", m, ad.to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("peft_ft.safetensors").to_str().unwrap()]);
    let ours = ftscript_logits(&model, Some(&ad), &d.join("ids.json"));
    let theirs = &read_safetensors(&d.join("peft_ft.safetensors"))["logits"];
    let err = rel_err(&ours, theirs);
    assert!(err < 1e-4, "{name}: ftscript adapter in peft: logits differ, rel err {err:.3e}");
    // the comparisons mean something only if training moved the model away from its start
    let moved = rel_err(&ours, &ftscript_logits(&model, None, &d.join("ids.json")));
    assert!(moved > 1e-3, "{name}: 20 steps left the logits where they started (rel change {moved:.2e})");

    // 4. save_merged loads in transformers and matches the adapter-applied logits
    let merged = d.join("ft_merged");
    py("peft_reference.py", &["model-logits", merged.to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("merged.safetensors").to_str().unwrap()]);
    let theirs = &read_safetensors(&d.join("merged.safetensors"))["logits"];
    let err = rel_err(&ours, theirs);
    assert!(err < 1e-4, "{name}: merged model logits differ from adapter-applied logits: rel err {err:.3e}");
}

/// peft's per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) survive a load/save
/// round trip, with plain LoRA and with DoRA, trainable token rows and a trained lm_head: the adapter ftscript saves
/// carries them and loads in peft with the same logits, and saving what was loaded from it again
/// gives the same bytes.
#[test]
fn rank_and_alpha_patterns_survive_a_round_trip_through_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    std::fs::write(d.join("ids.json"), "[[5, 17, 42, 99, 120, 7, 250, 31, 64, 12]]").unwrap();
    for variant in [None, Some("dora+tokens")] {
        py("peft_reference.py", &[&["patterned", m, o][..], variant.as_slice()].concat());
        let theirs = &read_safetensors(&d.join("patterned_logits.safetensors"))["logits"];
        let ours = ftscript_logits(&model, Some(&d.join("patterned")), &d.join("ids.json"));
        let err = rel_err(&ours, theirs);
        assert!(err < 1e-4, "{variant:?}: a peft adapter with patterns: logits differ, rel err {err:.3e}");

        run_recipe(
            d,
            "resave.rhai",
            &format!(
                "let m = load_model(\"{m}\", #{{ dtype: \"fp32\" }});\nm.load_adapter(\"{o}/patterned\");\nm.save_adapter(\"{o}/resaved\");\n\
                 let again = load_model(\"{m}\", #{{ dtype: \"fp32\" }});\nagain.load_adapter(\"{o}/resaved\");\nagain.save_adapter(\"{o}/resaved2\");\n"
            ),
        );
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("resaved/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["r"], 4, "{config}");
        assert_eq!(config["use_dora"], variant.is_some(), "{config}");
        assert_eq!(config["trainable_token_indices"], if variant.is_some() { serde_json::json!([5, 17, 42, 99, 120]) } else { serde_json::Value::Null }, "{config}");
        assert_eq!(config["modules_to_save"], if variant.is_some() { serde_json::json!(["lm_head"]) } else { serde_json::Value::Null }, "{config}");
        let ranks = config["rank_pattern"].as_object().unwrap();
        let alphas = config["alpha_pattern"].as_object().unwrap();
        assert!(ranks.len() == 3 && ranks.iter().all(|(k, v)| k.ends_with("v_proj") && v == 6), "rank_pattern {ranks:?}");
        assert!(alphas.len() == 3 && alphas.iter().all(|(k, v)| k.ends_with("q_proj") && v == 20.0), "alpha_pattern {alphas:?}");
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let (first, second) = (std::fs::read(d.join("resaved").join(file)).unwrap(), std::fs::read(d.join("resaved2").join(file)).unwrap());
            assert!(first == second, "{variant:?}: {file} changed in a save → load → save round trip");
        }
        py("peft_reference.py", &["adapter-logits", m, d.join("resaved").to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("resaved_logits.safetensors").to_str().unwrap()]);
        let again = &read_safetensors(&d.join("resaved_logits.safetensors"))["logits"];
        let err = rel_err(again, theirs);
        assert!(err < 1e-4, "{variant:?}: the re-saved adapter in peft: logits differ, rel err {err:.3e}");
    }
}

/// Gradient checkpointing (each layer's attention recomputed in backward, the MLP's gradients
/// formed directly) trains exactly as the full graph does: same losses, same adapters — with
/// LoRA on every projection (adapters inside the MLP) and on q/v only (the frozen MLP's blocked
/// path), DoRA on every projection (the layer recomputed whole under autograd), trainable token
/// rows and modules_to_save (the first layer's input keeps its graph to the embeddings), dropout
/// (re-seeded for the recomputation), and packed rows (the segment mask); also the first profile
/// of a run.
#[test]
fn gradient_checkpointing_matches_the_full_graph() {
    checkpointing_matches_the_full_graph("llama_gqa");
}

/// As above for the families whose layers differ: Qwen3's q/k norms (inside the recomputed
/// attention), Gemma 2's output norms (the layer recomputed whole under autograd), GeGLU,
/// soft-capped attention scores and logits, Gemma 3's two rotary tables, Phi-3's fused
/// projections (the MLP recomputed under autograd) and partial rotary, Qwen3-MoE's sparse layers
/// (recomputed under autograd, the load-balancing loss's gradient entering at each router) with
/// LoRA on the expert stacks.
#[test]
fn qwen3_gemma_and_phi3_checkpoint_like_the_full_graph() {
    for family in ["qwen3", "gemma2", "gemma3", "phi3", "qwen3_moe"] {
        checkpointing_matches_the_full_graph(family);
    }
}

fn checkpointing_matches_the_full_graph(model_name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_and_text(d, model_name, 24);
    let o = d.to_str().unwrap();
    // (targets, projections adapted per layer, more add_lora options, tensors per adapted projection, tensors besides)
    let mut variants = vec![("\"all-linear\"", 7, "", 2, 0), ("[\"q_proj\", \"v_proj\"]", 2, "", 2, 0)];
    if model_name == "phi3" {
        // four linear layers a block: qkv_proj, o_proj, gate_up_proj, down_proj
        variants = vec![("\"all-linear\"", 4, "", 2, 0), ("[\"qkv_proj\", \"down_proj\"]", 2, "", 2, 0)];
    }
    // Qwen3-MoE: every expert stack too (two a sparse block; peft's ParamWrapper has no dropout)
    let dropout = if model_name == "qwen3_moe" { 0.0 } else { 0.1 };
    if model_name == "qwen3_moe" {
        variants = vec![("[\"q_proj\", \"v_proj\"]", 2, "target_parameters: [\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"],", 2, 2 * 2 * 2)];
    }
    if model_name == "llama_gqa" {
        variants.push(("\"all-linear\"", 7, "use_dora: true,", 3, 0));
        variants.push(("[\"q_proj\", \"v_proj\"]", 2, "trainable_tokens: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],", 2, 1));
        variants.push(("[\"q_proj\", \"v_proj\"]", 2, "modules_to_save: [\"embed_tokens\", \"lm_head\"],", 2, 2));
    }
    for (targets, adapted, extra, per_module, besides) in variants {
        let adapted_name = format!("{adapted}{}", extra.len());
        let run = |name: &str, ckpt: &str| {
            run_recipe(
                d,
                &format!("{name}.rhai"),
                &format!(
                    r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: {dropout}, targets: {targets}, {extra} seed: 3 }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), batch_size: 4, max_length: 32, packing: true,
    max_steps: 3, lr: 1e-2, log_every: 1, gradient_checkpointing: {ckpt}, output_dir: "{o}/{name}",
    profile: #{{ start: 2, steps: 1 }} }});
m.save_adapter("{o}/{name}/adapter");
"#
                ),
            );
        };
        let full_name = format!("full{adapted_name}");
        run(&full_name, "false");
        let full = losses(&d.join(&full_name).join("metrics.jsonl"));
        let a = read_safetensors(&d.join(&full_name).join("adapter/adapter_model.safetensors"));
        assert_eq!(full.len(), 3);
        assert_eq!(a.len(), 3 * adapted * per_module + besides, "{targets} {extra}: adapters on {adapted} projections of the 3 layers");
        assert!(a.values().any(|t| t.abs().max().double_value(&[]) > 0.0));
        // "offload" on the CPU keeps the checkpoints where they are, but recomputes as on a GPU
        // (from the residual after attention, without o_proj); 2: the first two layers
        // checkpointed, the third keeping its activations
        for mode in ["true", "\"offload\"", "2"] {
            let name = format!("ckpt{adapted_name}{}", mode.len());
            run(&name, mode);
            let ckpt = losses(&d.join(&name).join("metrics.jsonl"));
            for (x, y) in full.iter().zip(&ckpt) {
                assert!((x - y).abs() < 1e-6, "{model_name} {targets} {extra} {mode}: losses differ: {full:?} vs {ckpt:?}");
            }
            let b = read_safetensors(&d.join(&name).join("adapter/adapter_model.safetensors"));
            for (k, t) in &a {
                let err = rel_err(t, &b[k]);
                // fp32 rounding, which Adam's normalisation amplifies, stays below 1e-4; a missing or
                // wrong gradient moves an element by ~lr (1e-2 against entries of ~0.1)
                assert!(err < 1e-3, "{model_name} {k}: rel err {err:.3e} between the {mode} and the full run");
            }
        }
        let ckpt_name = format!("ckpt{adapted_name}4");
        let summary = std::fs::read_to_string(d.join(&ckpt_name).join("profile/summary.txt")).unwrap();
        assert!(summary.starts_with("steps 2..=2"), "{summary}");
        assert!(d.join(&ckpt_name).join("profile/trace.json").exists());
    }
}

/// A number of layers to checkpoint that the model does not have, or a negative one, is refused
/// before training, naming the option and the model's layer count.
#[test]
fn checkpointing_more_layers_than_the_model_has_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_and_text(d, "llama_gqa", 8);
    let o = d.to_str().unwrap();
    for (ckpt, expect) in [("5", "gradient_checkpointing: 5 layers to checkpoint, but the model has 3"), ("-1", "gradient_checkpointing must be true, false, \"auto\", \"offload\" or a number of layers")] {
        std::fs::write(
            d.join("ckpt.rhai"),
            format!(
                r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, targets: ["q_proj"] }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), max_steps: 1, gradient_checkpointing: {ckpt}, output_dir: "{o}/run" }});
"#
            ),
        )
        .unwrap();
        let out = ftscript(&["run", "ckpt.rhai"], d);
        assert!(!out.status.success() && text(&out).contains(expect), "{ckpt}: {}", text(&out));
        let metrics = std::fs::read_to_string(d.join("run").join("metrics.jsonl")).unwrap_or_default();
        assert!(!metrics.contains("\"loss\""), "{ckpt}: trained before refusing: {metrics}");
    }
}

/// The user's path to kept attention: a recipe training unpacked rows (plain causal attention)
/// with `gradient_checkpointing: "offload"`, which on the CPU keeps every layer's projections'
/// and attention's outputs and runs attention's backward from them, trains as the full graph
/// does: the same losses and adapters, with LoRA with dropout on every projection, and on q and
/// v only (o_proj then draws no dropout, and attention's kept output stands in for the
/// checkpointed residual after attention, rebuilt in backward as `x + o_proj(y)`).
#[test]
fn offloading_unpacked_rows_trains_as_the_full_graph() {
    for lora in [r#"dropout: 0.1, targets: "all-linear""#, r#"dropout: 0.1, targets: ["q_proj", "v_proj"]"#] {
        offloading_trains_as_the_full_graph(lora);
    }
}

fn offloading_trains_as_the_full_graph(lora: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_and_text(d, "llama_gqa", 16);
    let o = d.to_str().unwrap();
    let run = |name: &str, ckpt: &str| -> (Vec<f64>, std::collections::HashMap<String, Tensor>) {
        run_recipe(
            d,
            &format!("{name}.rhai"),
            &format!(
                r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, {lora}, seed: 3 }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), batch_size: 4, max_length: 32, packing: false,
    max_steps: 3, lr: 1e-2, log_every: 1, gradient_checkpointing: {ckpt}, output_dir: "{o}/{name}" }});
m.save_adapter("{o}/{name}/adapter");
"#
            ),
        );
        (losses(&d.join(name).join("metrics.jsonl")), read_safetensors(&d.join(name).join("adapter/adapter_model.safetensors")))
    };
    let (full, a) = run("full", "false");
    let (offload, b) = run("offload", "\"offload\"");
    assert_eq!(full.len(), 3);
    for (x, y) in full.iter().zip(&offload) {
        assert!((x - y).abs() < 1e-6, "{lora}: losses differ: {full:?} vs {offload:?}");
    }
    for (k, t) in &a {
        let err = rel_err(t, &b[k]);
        // fp32 rounding, which Adam's normalisation amplifies, stays below 1e-4; a wrong gradient
        // moves an element by ~lr (1e-2 against entries of ~0.1)
        assert!(err < 1e-3, "{lora}: {k}: rel err {err:.3e} between the offloaded and the full run");
    }
}

/// What offloading keeps from a layer's forward for its backward (`Keep`: the q, k and v
/// projections' outputs; attention's output and log-sum-exp, from FlashAttention, here libtorch's
/// CPU kernel) back-propagates as recomputing it does: for the attention half of a multi-head, a
/// grouped-query and a q/k-normed layer with LoRA on every projection (dropout 0.1, redrawn from
/// the same seed), the input's and the adapters' gradients agree within fp32 rounding whatever is
/// kept. A windowed layer (shorter than the rows) keeps no attention.
#[test]
fn kept_attention_and_projections_back_propagate_as_recomputation() {
    // fp32 rounding of sums in another order is ~1e-7; a wrong or missing term, or a dropout mask
    // drawn differently, is of the order of the gradient itself
    kept_attention_case(Device::Cpu, "fp32", 1e-5);
}

/// [`kept_attention_and_projections_back_propagate_as_recomputation`] on a GPU, in fp16 (the
/// CUDA FlashAttention kernel takes 16-bit types): its forward and backward called directly
/// against recomputation through SDPA, within fp16 rounding.
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn kept_attention_back_propagates_as_recomputation_on_the_gpu() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    kept_attention_case(Device::Cuda(0), "fp16", 2e-2);
}

fn kept_attention_case(device: Device, dtype: &str, tolerance: f64) {
    use ftscript::models::decoder::Keep;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (name, l, flash) in [("llama_wide", 0usize, true), ("llama_gqa", 1, true), ("qwen3", 0, true), ("qwen3", 1, false)] {
        let mut m = ftscript::models::load(&tiny(d, name), dtype, device).unwrap();
        let spec = all_linear_lora(0.1, vec![]);
        let kind = m.net.kind;
        ftscript::nn::peft::add_lora(&mut m.net, &spec, kind).unwrap();
        let adapters: Vec<Tensor> = ftscript::nn::peft::adapter_tensors(&m.net).into_iter().map(|(_, t)| t).collect();
        tch::manual_seed(2);
        for t in &adapters {
            tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn(t.size(), (t.kind(), device)) * 0.1)));
        }
        let layer = &m.net.layers[l];
        let hidden = m.net.config.hidden_size as i64;
        let (b, t) = (2i64, 24i64);
        let x = Tensor::randn([b, t, hidden], (kind, device));
        let dh = Tensor::randn([b, t, hidden], (kind, device));
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], true);
        let mut shared = m.net.layer_inputs(&positions, &AttnMask::Causal);
        let (cos_sin, mask) = shared.on(device, layer.rope);
        let grads = |keep: Keep| -> Vec<Tensor> {
            for a in &adapters {
                let mut g = a.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            tch::manual_seed(5);
            let (_, _, _, kept) = tch::no_grad(|| layer.attention_block_keeping(&x, None, cos_sin, mask, keep, true));
            assert_eq!(kept.outputs.is_some(), keep.projections, "{name} layer {l} {keep:?}");
            assert_eq!(kept.attention.is_some(), keep.attention && flash, "{name} layer {l} {keep:?}: attention kept");
            let input = x.detach().set_requires_grad(true);
            tch::manual_seed(5);
            let attention = kept.attention;
            let roots = layer.attention_recompute_backward(&input, &dh, cos_sin, mask, kept.outputs, || Ok(attention)).unwrap();
            ftscript::cuda::autograd::backward(&roots.iter().map(|(t, g)| (t, g)).collect::<Vec<_>>()).unwrap();
            // the MLP's adapters are outside the attention half: no gradient
            let grad = |a: &Tensor| if a.grad().defined() { a.grad().to_kind(Kind::Float) } else { a.zeros_like().to_kind(Kind::Float) };
            std::iter::once(input.grad().to_kind(Kind::Float)).chain(adapters.iter().map(grad)).collect()
        };
        let recomputed = grads(Keep::default());
        assert!(recomputed[1..].iter().filter(|g| g.abs().max().double_value(&[]) > 0.0).count() >= 8, "{name}: the adapters get gradients");
        for keep in [Keep { projections: true, attention: false }, Keep { projections: false, attention: true }, Keep { projections: true, attention: true }] {
            for (i, (a, r)) in grads(keep).iter().zip(&recomputed).enumerate() {
                let err = rel_err(a, r);
                assert!(err < tolerance, "{name} layer {l} {keep:?} ({dtype}): gradient {i} differs by {err:.2e}");
            }
        }
    }
}

/// On a GPU: checkpoints kept in host memory (`gradient_checkpointing: "offload"`, copied on a
/// side stream and back) and checkpointing only the first 2 of 3 layers train as checkpoints kept on the GPU (same losses up to fp32 rounding:
/// the recomputation differs, see the test above), and both as the full graph does (the
/// recomputation re-seeds, so the GPU draws LoRA's dropout masks again as the forward drew them).
/// Ignored unless asked for (`--include-ignored`, on a GPU).
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn offloaded_checkpoints_train_like_kept_ones() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 24);
    let o = d.to_str().unwrap();
    for (name, mode) in [("full", "false"), ("kept", "true"), ("offload", "\"offload\""), ("first", "2")] {
        run_recipe(
            d,
            &format!("{name}.rhai"),
            &format!(
                r#"
let m = load_model("{model}", #{{ dtype: "fp32", device: "cuda" }});
m.add_lora(#{{ r: 4, alpha: 8, dropout: 0.1, targets: "all-linear", seed: 3 }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), batch_size: 4, max_length: 32, max_steps: 3, lr: 1e-2,
    log_every: 1, gradient_checkpointing: {mode}, output_dir: "{o}/{name}" }});
"#
            ),
        );
    }
    let kept = losses(&d.join("kept/metrics.jsonl"));
    assert_eq!(kept.len(), 3);
    // checkpointing only the first 2 of the 3 layers: the fused LoRA nodes above keep their graph
    for other in ["offload", "first"] {
        let got = losses(&d.join(format!("{other}/metrics.jsonl")));
        assert_eq!(got.len(), 3);
        for (a, b) in kept.iter().zip(&got) {
            assert!((a - b).abs() < 1e-6, "{other} changed the training: {kept:?} vs {got:?}");
        }
    }
    // a mask drawn differently in the recomputation would change the gradients and the later losses
    let full = losses(&d.join("full/metrics.jsonl"));
    for (a, b) in full.iter().zip(&kept) {
        assert!((a - b).abs() < 1e-5, "checkpointing changed the training: {full:?} vs {kept:?}");
    }
}

/// `gradient_checkpointing: "auto"` on a GPU, when a step runs out of memory anyway (a test-only
/// cap: micro-batches of more than 2 rows fail as a CUDA OOM would), retries it with the next
/// more frugal setting down the ladder (no checkpointing, the first layers, each layer,
/// offloading), then, with `on_oom: "halve"`, with smaller micro-batches, and trains the same
/// numbers as a run planned that way (no dropout); a setting the user forced is not changed.
/// Ignored unless asked for (`--include-ignored`, on a GPU).
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn auto_checkpointing_steps_down_when_a_step_runs_out_of_memory() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_and_text(d, "llama_wide", 16);
    let (m, o) = (model.as_str(), d.to_str().unwrap());
    let train = |name: &str, extra: &str| {
        std::fs::write(
            d.join(format!("{name}.rhai")),
            format!(
                r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cuda" }});
m.add_lora(#{{ r: 8, alpha: 16, dropout: 0.0, targets: ["q_proj", "v_proj"], seed: 5 }});
train(m, #{{ train: load_dataset("{o}/data.jsonl"), shuffle: false, max_steps: 2, lr: 1e-3, log_every: 1, output_dir: "{o}/{name}", {extra} }});
"#
            ),
        )
        .unwrap();
        ftscript(&["run", &format!("{name}.rhai")], d)
    };
    let out = train("halved", r#"batch_size: 4, inject_oom_rows: 2, on_oom: "halve""#);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for step in ["out of memory with no checkpointing; from now on checkpointing the first", "from now on checkpointing each layer", "from now on offloading", "runs as 2 of 2"] {
        assert!(t.contains(step), "expected `{step}`:\n{t}");
    }
    let out = train("planned", r#"batch_size: 2, grad_accum: 2, gradient_checkpointing: "offload""#);
    assert!(out.status.success(), "{}", text(&out));
    let (a, b) = (losses(&d.join("halved/metrics.jsonl")), losses(&d.join("planned/metrics.jsonl")));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "stepped down {a:?} vs planned {b:?}");
    }
    // forced: no step down, the error names the step and what to lower
    let out = train("forced", "batch_size: 4, inject_oom_rows: 2, gradient_checkpointing: false");
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("from now on") && t.contains("step 1: out of memory in a micro-batch of 4 rows"), "{t}");
}

/// `memory_budget` on a GPU, as a user sets it: under a budget between the weights and what
/// keeping every activation peaks at, training picks a more frugal way (checkpointing the first
/// layers, then each layer, then offloading, then smaller micro-batches), peaks within the budget, and trains the same numbers
/// as keeping everything (no dropout: smaller micro-batches would draw other masks). Ignored unless asked for (`--include-ignored`, on a GPU).
#[test]
#[ignore = "needs a GPU: cargo test --release -- --include-ignored, where CUDA is"]
fn a_memory_budget_keeps_the_peak_within_it_and_trains_the_same() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny(d, "llama_wide");
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    // 16 rows of 512 ids
    let lines: Vec<String> = (0..16).map(|r| format!("{{\"input_ids\": {:?}}}", (0..512).map(|i| 3 + (r * 131 + i * 17) % 290).collect::<Vec<_>>())).collect();
    std::fs::write(d.join("long.jsonl"), lines.join("\n")).unwrap();
    let train = |name: &str, extra: &str| {
        let log = run_recipe(
            d,
            &format!("{name}.rhai"),
            &format!(
                r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cuda" }});
m.add_lora(#{{ r: 8, alpha: 16, dropout: 0.0, targets: ["q_proj", "v_proj"], seed: 5 }});
print(`resident ${{m.memory().cuda_allocated}}`);
train(m, #{{ train: load_dataset("{o}/long.jsonl"), format: "tokens", shuffle: false, batch_size: 8, max_length: 512,
    max_steps: 3, lr: 1e-3, log_every: 1, output_dir: "{o}/{name}", {extra} }});
"#
            ),
        );
        let resident: f64 = log.lines().find_map(|l| l.strip_prefix("resident ")).unwrap().trim().parse().unwrap();
        let peak = metrics(&d.join(format!("{name}/metrics.jsonl"))).iter().filter_map(|v| v["peak_gib"].as_f64()).fold(0.0, f64::max) * (1u64 << 30) as f64;
        (log, resident, peak, losses(&d.join(format!("{name}/metrics.jsonl"))))
    };
    let (_, resident, full_peak, full) = train("full", "gradient_checkpointing: false");
    let activations = full_peak - resident;
    assert!(activations > 4.0 * resident, "the test wants activations well over the weights: {activations} vs {resident}");
    // four fifths: some of the first layers checkpointed; half: checkpointing (some or all
    // layers); a tenth: offloading or smaller micro-batches (whichever the estimates pick)
    for (name, share, expect) in [("most", 0.8, "checkpointing the first"), ("half", 0.5, "checkpointing"), ("tenth", 0.1, "memory_budget")] {
        let budget = (resident + share * activations) as u64;
        let (log, _, peak, got) = train(name, &format!("memory_budget: {budget}"));
        assert!(log.contains(expect), "{name}: expected {expect}:\n{log}");
        assert!(peak <= budget as f64, "{name}: peak {peak} over the budget {budget}");
        assert_eq!(got.len(), full.len());
        for (a, b) in full.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{name}: the budget changed the training: {full:?} vs {got:?}");
        }
    }
    // below the weights: refused before training, naming the option
    std::fs::write(
        d.join("tiny.rhai"),
        format!(
            r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cuda" }});
m.add_lora(#{{ r: 8, targets: ["q_proj"] }});
train(m, #{{ train: load_dataset("{o}/long.jsonl"), format: "tokens", max_steps: 1, memory_budget: "1MiB", output_dir: "{o}/tiny" }});
"#
        ),
    )
    .unwrap();
    let out = ftscript(&["run", "tiny.rhai"], d);
    assert!(!out.status.success() && text(&out).contains("memory_budget 0.00 GiB is below what training holds"), "{}", text(&out));
}

/// AdaLoRA from peft's initial adapter, 50 steps, against peft with a hand-written loop that
/// calls `update_and_allocate` after every step (ftscript applies it inside `train`): the same
/// losses (cross-entropy plus the orthogonality penalty), the same kept triplets after every
/// allocation, and adapters that load across with the same logits both ways.
#[test]
fn adalora_ranks_and_losses_match_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let (m, o) = (model.to_str().unwrap(), d.to_str().unwrap());
    py("peft_reference.py", &["init", m, o]);
    py("peft_reference.py", &["adalora", m, o]);
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("ada_reference.json")).unwrap()).unwrap();
    let s = &reference["settings"];
    run_recipe(
        d,
        "adalora.rhai",
        &format!(
            r#"
let m = load_model("{m}", #{{ dtype: "fp32", device: "cpu" }});
m.load_adapter("{o}/ada_init");
train(m, #{{ train: load_dataset("{o}/train.jsonl"), format: "tokens", shuffle: false, batch_size: 2,
    max_steps: {steps}, lr: {lr}, scheduler: "constant", weight_decay: 0.0, max_grad_norm: {mgn}, log_every: 1,
    output_dir: "{o}/ada" }});
m.save_adapter("{o}/ada_adapter");
"#,
            steps = s["steps"],
            lr = s["lr"],
            mgn = s["max_grad_norm"],
        ),
    );
    let w = s["orth_reg_weight"].as_f64().unwrap();
    let rows = metrics(&d.join("ada/metrics.jsonl"));
    let ours: Vec<f64> = rows.iter().filter(|r| r.get("loss").is_some()).map(|r| r["loss"].as_f64().unwrap() + w * r["orth_reg"].as_f64().unwrap()).collect();
    let theirs: Vec<f64> = reference["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!((a - b).abs() < 1e-3, "step {}: ftscript {a} vs peft {b}\nours {ours:?}\npeft {theirs:?}", i + 1);
    }
    // the kept triplets after every allocation
    let allocations: Vec<serde_json::Value> = std::fs::read_to_string(d.join("ada/adalora_ranks.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let patterns = reference["patterns"].as_object().unwrap();
    let steps: Vec<String> = allocations.iter().map(|a| a["global_step"].to_string()).collect();
    let mut expected: Vec<&String> = patterns.keys().collect();
    expected.sort_by_key(|k| k.parse::<usize>().unwrap());
    assert_eq!(steps.iter().collect::<Vec<_>>(), expected, "allocation steps");
    for a in &allocations {
        let step = a["global_step"].to_string();
        assert_eq!(&a["rank_pattern"], &patterns[&step], "step {step}: kept triplets differ");
    }
    let last = &allocations.last().unwrap()["ranks"];
    let total: u64 = last.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 2 * 9, "the final budget: target_r × 9 modules");
    // ftscript's adapter in peft, peft's in ftscript
    let ad = d.join("ada_adapter");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "ADALORA", "{config}");
    py("peft_reference.py", &["adapter-logits", m, ad.to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("ada_in_peft.safetensors").to_str().unwrap()]);
    let ours = ftscript_logits(&model, Some(&ad), &d.join("ids.json"));
    let err = rel_err(&ours, &read_safetensors(&d.join("ada_in_peft.safetensors"))["logits"]);
    assert!(err < 1e-4, "ftscript's AdaLoRA adapter in peft: rel err {err:.3e}");
    let err = rel_err(&ftscript_logits(&model, Some(&d.join("ada_trained")), &d.join("ids.json")), &read_safetensors(&d.join("ada_trained_logits.safetensors"))["logits"]);
    assert!(err < 1e-4, "peft's trained AdaLoRA adapter in ftscript: rel err {err:.3e}");
    let moved = rel_err(&ours, &ftscript_logits(&model, None, &d.join("ids.json")));
    assert!(moved > 1e-3, "training left the logits where they started ({moved:.2e})");
}

/// An AdaLoRA run stopped after its first allocations (by a callback, which keeps a checkpoint) and
/// resumed ends with the adapter and the allocations of an uninterrupted run, bit for bit: the
/// checkpoint holds the whole triplets, the smoothed importances and the kept triplets beside
/// the cut-down adapter.
#[test]
fn adalora_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 40);
    let run = |out: &str, extra: &str| {
        run_recipe(
            d,
            &format!("{out}.rhai"),
            &format!(
                r#"
let m = load_model("{model}", #{{ dtype: "fp32" }});
m.add_adalora(#{{ init_r: 4, target_r: 1, tinit: 2, tfinal: 4, deltaT: 1, beta1: 0.97, beta2: 0.97, total_step: 16, dropout: 0.1, targets: "all-linear", seed: 5 }});
train(m, #{{ train: load_dataset("data.jsonl"), batch_size: 4, lr: 1e-2, max_steps: 16, log_every: 1, output_dir: "{out}" {extra} }});
m.save_adapter("{out}/final");
"#
            ),
        )
    };
    run("straight", "");
    run("stopped", r#", on_step: |s| if s.step == 5 { "stop" }"#);
    assert!(d.join("stopped/checkpoint-5").exists());
    run("stopped", ", resume: true");
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        let (a, b) = (std::fs::read(d.join("straight/final").join(file)).unwrap(), std::fs::read(d.join("stopped/final").join(file)).unwrap());
        assert!(a == b, "{file} differs between the straight and the resumed run");
    }
    let allocations = |out: &str| std::fs::read_to_string(d.join(out).join("adalora_ranks.jsonl")).unwrap();
    assert_eq!(allocations("straight"), allocations("stopped"));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("straight/final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["rank_pattern"].as_object().unwrap().len(), 21, "{config}");
}

/// A decoder's batches padded further (`pad_to_multiple_of`, rows of ragged lengths) score as
/// they are: the same eval loss, in a recipe as a user writes it.
#[test]
fn padding_to_a_multiple_leaves_the_eval_loss_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model_and_text(d, 10);
    let mut body = String::new();
    for multiple in [1, 16] {
        body.push_str(&format!(
            r#"let m = load_model("{model}", #{{ dtype: "fp32", device: "cpu" }});
m.add_lora(#{{ r: 4, alpha: 8, seed: 7 }});
train(m, #{{ train: load_dataset("data.jsonl"), eval: load_dataset("data.jsonl"), batch_size: 4, eval_batch_size: 3, max_steps: 1, lr: 0.0, eval_every: 1, pad_to_multiple_of: {multiple}, output_dir: "run-{multiple}" }});
"#
        ));
    }
    run_recipe(d, "pad.rhai", &body);
    let eval_loss = |m: &str| metrics(&d.join(format!("run-{m}/metrics.jsonl"))).iter().find_map(|r| r.get("eval_loss")?.as_f64()).unwrap();
    let (plain, padded) = (eval_loss("1"), eval_loss("16"));
    assert!((plain - padded).abs() <= 1e-6 * plain, "eval loss padded to 16: {padded}, as it is: {plain}");
}
