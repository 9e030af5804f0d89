//! GGUF export, proved in real llama.cpp: the demo model imported from its GGUF, fine-tuned with
//! LoRA by `scripts/export_gguf.rhai`, exported as f16, q8_0 and q4_k_m and as a GGUF LoRA
//! adapter. Metadata, tensor names, types and bytes equal what llama.cpp's own converter (and
//! `llama_model_quantize`) writes for the same merged model; llama.cpp's logits and greedy
//! tokens equal ftscript's; the chat template and the tokenizer survive the trip. Tiny Qwen2 and
//! Qwen3 models take the same path. References: tests/py/llama_cpp_reference.py.

mod common;
use common::*;
use ftscript::generate::{generate_ids, Sampling};
use ftscript::models::decoder::AttnMask;
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn lcpp(args: &[&str]) -> Value {
    serde_json::from_str(&py("llama_cpp_reference.py", args)).expect("llama_cpp_reference.py printed no JSON")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// ftscript's logits `[T, V]` for one sequence.
fn logits(m: &ftscript::models::LoadedModel, ids: &[i64]) -> Tensor {
    let t = ids.len() as i64;
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    tch::no_grad(|| m.net.forward(&Tensor::from_slice(ids).view([1, t]), &positions, &AttnMask::Causal, None, false)).squeeze_dim(0)
}

/// llama.cpp's logits `[T, V]`; `kv` is its KV cache's type (`f16`, its default, or `f32`).
fn llama_cpp_logits(gguf: &Path, ids: &[i64], d: &Path, kv: &str, lora: Option<&Path>) -> Tensor {
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(ids).unwrap()).unwrap();
    let mut args = vec!["logits", p(gguf), p(&ids_file), "--kv-type", kv];
    if let Some(l) = lora {
        args.extend(["--lora", p(l)]);
    }
    let v = lcpp(&args);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let (t, n) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([t, n])
}

fn llama_cpp_greedy(gguf: &Path, ids: &[i64], n: usize, lora: Option<&Path>) -> Vec<i64> {
    let ids = serde_json::to_string(ids).unwrap();
    let n = n.to_string();
    let mut args = vec!["greedy", p(gguf), &ids, &n, "--stop-at-eog"];
    if let Some(l) = lora {
        args.extend(["--lora", p(l)]);
    }
    serde_json::from_value(lcpp(&args)["tokens"].clone()).unwrap()
}

/// LoRA r=4 on every linear layer with a random B (as if trained), so merging changes the model.
fn add_trained_looking_lora(m: &mut ftscript::models::LoadedModel) {
    // (and every expert stack of a mixture of experts)
    let target_parameters = if m.net.config.moe.is_some() { vec!["gate_up_proj".into(), "down_proj".into()] } else { vec![] };
    let spec = all_linear_lora(0.0, target_parameters);
    ftscript::nn::peft::add_lora(&mut m.net, &spec, Kind::Float).unwrap();
    let random = |b: &Tensor| tch::no_grad(|| Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.05);
    for lin in m.net.linears_mut() {
        if let Some(ftscript::nn::Adapter::Lora(l)) = &mut lin.adapter {
            tch::no_grad(|| l.b.copy_(&random(&l.b)));
        }
    }
    for layer in &mut m.net.layers {
        if let Some(moe) = layer.mlp.sparse_mut() {
            for l in [&mut moe.experts.gate_up_lora, &mut moe.experts.down_lora].into_iter().flatten() {
                tch::no_grad(|| l.b.copy_(&random(&l.b)));
            }
        }
    }
    m.lora = Some(spec);
}

/// Every metadata entry and tensor of two dumps equal, but for the `general.*` naming keys
/// the converter derives from directory names and model cards.
fn assert_same_file(ours: &Value, theirs: &Value, what: &str) {
    let naming = |k: &str| k.starts_with("general.") && !matches!(k, "general.architecture" | "general.type" | "general.file_type" | "general.quantization_version" | "general.alignment");
    let keys = |v: &Value| -> Vec<String> { v["kv"].as_object().unwrap().keys().filter(|k| !naming(k)).cloned().collect() };
    let (mut ko, mut kt) = (keys(ours), keys(theirs));
    ko.sort();
    kt.sort();
    assert_eq!(ko, kt, "{what}: metadata keys differ");
    for k in &ko {
        assert_eq!(ours["kv"][k], theirs["kv"][k], "{what}: metadata {k} differs");
    }
    let tensors = |v: &Value| -> std::collections::BTreeMap<String, Value> {
        v["tensors"].as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap().to_string(), json!([t["shape"], t["type"], t["sha256"]]))).collect()
    };
    let (to, tt) = (tensors(ours), tensors(theirs));
    assert_eq!(to.keys().collect::<Vec<_>>(), tt.keys().collect::<Vec<_>>(), "{what}: tensor names differ");
    for (name, o) in &to {
        assert_eq!(o, &tt[name], "{what}: tensor {name} differs ([shape, type, sha256])");
    }
}

#[test]
fn demo_model_fine_tuned_and_exported_runs_in_llama_cpp_as_in_ftscript() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out");
    let lines: Vec<String> = std::fs::read_to_string(root().join("data/kv2json.jsonl")).unwrap().lines().take(32).map(String::from).collect();
    std::fs::write(d.join("kv.jsonl"), lines.join("\n")).unwrap();
    let q = |s: &Path| format!("{:?}", s.display().to_string());
    let run = ftscript(
        &["run", p(&root().join("scripts/export_gguf.rhai")), "--set", &format!("gguf={}", q(&demo_gguf())), "--set", &format!("data_file={}", q(&d.join("kv.jsonl"))),
          "--set", &format!("output_dir={}", q(&out)), "--set", "max_steps=4"],
        d,
    );
    assert!(run.status.success(), "scripts/export_gguf.rhai failed:\n{}", text(&run));
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model-q4_k_m.gguf") && modelfile.contains("<|im_start|>{{ .Role }}") && modelfile.contains("PARAMETER stop \"<|im_end|>\""), "{modelfile}");

    // `ftscript export` on the command line writes the same file as the recipe
    let cli = d.join("cli/model.gguf");
    let o = ftscript(&["export", p(&demo_gguf()), p(&cli), "--quant", "q8_0", "--adapter", p(&out.join("adapter"))], d);
    assert!(o.status.success(), "ftscript export failed:\n{}", text(&o));
    assert!(std::fs::read(&cli).unwrap() == std::fs::read(out.join("model-q8_0.gguf")).unwrap(), "ftscript export differs from the recipe's save_gguf");
    assert!(std::fs::read_to_string(d.join("cli/Modelfile")).unwrap().contains("FROM ./model.gguf"));

    // ftscript's model: the demo GGUF with the trained adapter (unmerged), and its merged copy
    let mut m = ftscript::models::load(&demo_gguf(), "fp32", Device::Cpu).unwrap();
    m.lora = Some(ftscript::nn::peft::load_adapter(&mut m.net, &out.join("adapter"), Kind::Float).unwrap());
    let merged = d.join("merged");
    ftscript::models::save::save_merged(&m, &merged, Kind::Float, usize::MAX).unwrap();

    // the converter's files for the same merged model
    let reference = |name: &str| d.join(name);
    lcpp(&["convert", p(&merged), p(&reference("ref-f16.gguf")), "--outtype", "f16"]);
    lcpp(&["convert", p(&merged), p(&reference("ref-q8_0.gguf")), "--outtype", "q8_0"]);
    lcpp(&["convert", p(&merged), p(&reference("ref-f32.gguf")), "--outtype", "f32"]);
    lcpp(&["quantize", p(&reference("ref-f32.gguf")), p(&reference("ref-q4_k_m.gguf")), "q4_k_m"]);
    for quant in ["f16", "q8_0", "q4_k_m"] {
        let ours = lcpp(&["dump", p(&out.join(format!("model-{quant}.gguf"))), "--hash"]);
        let theirs = lcpp(&["dump", p(&reference(&format!("ref-{quant}.gguf"))), "--hash"]);
        assert_same_file(&ours, &theirs, quant);
    }
    // the adapter as convert_lora_to_gguf.py writes it from the PEFT directory
    let base_dir = d.join("base");
    ftscript::models::save::save_merged(&ftscript::models::load(&demo_gguf(), "fp32", Device::Cpu).unwrap(), &base_dir, Kind::Float, usize::MAX).unwrap();
    lcpp(&["convert-lora", p(&out.join("adapter")), p(&base_dir), p(&reference("ref-adapter.gguf")), "--outtype", "f32"]);
    assert_same_file(&lcpp(&["dump", p(&out.join("adapter.gguf")), "--hash"]), &lcpp(&["dump", p(&reference("ref-adapter.gguf")), "--hash"]), "LoRA adapter");

    // llama.cpp runs the f16 export as ftscript runs the model
    let t = &m.tokenizer;
    // llama.cpp renders a chat template it recognizes by its markers (ChatML here) with its own
    // code, without Jinja: a template's default system message is not added, so the
    // conversations bring their own
    let chats = json!([[{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "name: Ada; age: 36"}],
                       [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]]);
    let rendered: Vec<String> = serde_json::from_value(lcpp(&["chat", p(&out.join("model-f16.gguf")), &chats.to_string()])).unwrap();
    for (msgs, theirs) in chats.as_array().unwrap().iter().zip(&rendered) {
        let ours = ftscript::data::template::render_chat(t.chat_template.as_deref().unwrap(), msgs, true, t.bos_token.as_deref(), t.eos_token.as_deref()).unwrap();
        assert_eq!(&ours, theirs, "llama.cpp renders the exported chat template differently");
    }
    let texts = json!(["Hello, world! How are you today?", "digits 12345 and 3.14159", "café naïve 中文 😀", rendered[0]]);
    let ids: Vec<Vec<i64>> = serde_json::from_value(lcpp(&["tokenize", p(&out.join("model-f16.gguf")), &texts.to_string()])["ids"].clone()).unwrap();
    for (text, theirs) in texts.as_array().unwrap().iter().zip(&ids) {
        assert_eq!(&t.encode(text.as_str().unwrap(), true).unwrap(), theirs, "llama.cpp tokenizes {text} differently");
    }
    let prompt = t.encode(&rendered[0], true).unwrap();
    let ours = logits(&m, &prompt);
    let theirs = llama_cpp_logits(&out.join("model-f16.gguf"), &prompt, d, "f16", None);
    let err = rel_err(&theirs, &ours);
    println!("llama.cpp f16 logits vs ftscript: max rel err {err:.2e}");
    assert!(err < 1e-2, "llama.cpp's logits of the f16 export differ from ftscript's: {err:.3e}");
    // greedy decoding on a question the model answers with confidence (on a close call, q8_0's
    // rounding of the activations in llama.cpp's matmuls may flip a token)
    let question = json!([{"role": "user", "content": "List the days of the week."}]);
    let prompt = t.encode(&ftscript::data::template::render_chat(t.chat_template.as_deref().unwrap(), &question, true, None, None).unwrap(), true).unwrap();
    let greedy = generate_ids(&m, &prompt, &Sampling { max_new_tokens: 20, ..Default::default() }).unwrap();
    println!("ftscript greedy: {:?}", t.decode(&greedy, false).unwrap());
    assert_eq!(greedy.len(), 20, "the model should answer at length: {greedy:?}");
    assert_eq!(llama_cpp_greedy(&out.join("model-f16.gguf"), &prompt, 20, None), greedy, "llama.cpp's greedy tokens (f16) differ from ftscript's");
    // q8_0 also rounds llama.cpp's activations, and its kernels round differently from one CPU
    // to another (AVX2, AVX512, AMX), so a close call may flip: along ftscript's answer its
    // logits stay close, and it picks ftscript's token wherever ftscript's choice is clear
    let answer: Vec<i64> = prompt.iter().chain(&greedy[..19]).copied().collect();
    let at = prompt.len() as i64 - 1;
    let q8 = llama_cpp_logits(&out.join("model-q8_0.gguf"), &answer, d, "f16", None).narrow(0, at, 20);
    let ours = logits(&m, &answer).narrow(0, at, 20);
    let err = rel_err(&q8, &ours);
    println!("llama.cpp q8_0 logits along ftscript's answer: max rel err {err:.2e}");
    assert!(err < 5e-2, "llama.cpp's logits of the q8_0 export differ from ftscript's: {err:.3e}");
    let (top2, _) = ours.topk(2, -1, true, true);
    let margin = Vec::<f32>::try_from(top2.select(1, 0) - top2.select(1, 1)).unwrap();
    let picked = Vec::<i64>::try_from(q8.argmax(-1, false)).unwrap();
    let clear: Vec<usize> = (0..20).filter(|&i| margin[i] > 0.5).collect();
    assert!(clear.len() >= 15, "the answer should be mostly clear calls: margins {margin:?}");
    for i in clear {
        assert_eq!(picked[i], greedy[i], "llama.cpp's q8_0 export picks another token at step {i} (ftscript's margin {})", margin[i]);
    }
    // the base plus the GGUF LoRA adapter is the merged model
    assert_eq!(llama_cpp_greedy(&out.join("base-f16.gguf"), &prompt, 20, Some(&out.join("adapter.gguf"))), greedy, "base + GGUF LoRA in llama.cpp differs from the merged export");
    println!("llama.cpp q4_k_m greedy: {:?}", t.decode(&llama_cpp_greedy(&out.join("model-q4_k_m.gguf"), &prompt, 20, None), false).unwrap());
}

#[test]
/// Qwen2, Qwen3, Llama, Mistral and Qwen3-MoE (LoRA on every linear layer and every expert stack,
/// merged) exported in f32: llama.cpp's logits and tokens are ftscript's, and the file imports
/// back as the same model.
fn qwen_families_export_and_match_in_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // (llama.cpp has no sliding window for these families: the ids stay within the tiny ones' 8)
    for name in ["qwen2_tied", "qwen3", "llama_gqa", "mistral", "llama_linear_rope", "llama3_rope", "qwen3_moe_sparse"] {
        let dir = tiny(d, name);
        let mut m = ftscript::models::load(&dir, "fp32", Device::Cpu).unwrap();
        add_trained_looking_lora(&mut m);
        let gguf = d.join(format!("{name}.gguf"));
        ftscript::gguf::export::save_gguf(&m, &gguf, ftscript::gguf::export::FileType::F32).unwrap();
        let ids = m.tokenizer.encode("the fox", true).unwrap();
        assert!(ids.len() <= 8, "{ids:?}");
        let err = rel_err(&llama_cpp_logits(&gguf, &ids, d, "f32", None), &logits(&m, &ids));
        println!("{name}: llama.cpp f32 logits vs ftscript: max rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: llama.cpp's logits of the export differ from ftscript's: {err:.3e}");
        let theirs: Vec<Vec<i64>> = serde_json::from_value(lcpp(&["tokenize", p(&gguf), &json!(["the quick brown fox, 12345!"]).to_string()])["ids"].clone()).unwrap();
        assert_eq!(theirs[0], m.tokenizer.encode("the quick brown fox, 12345!", true).unwrap(), "{name}: llama.cpp tokenizes differently");
        // and the file loads back as the model it came from (adapters merged)
        let back = ftscript::models::load(&gguf, "fp32", Device::Cpu).unwrap();
        // (llama.cpp's `llama` is Mistral's architecture too)
        assert_eq!(back.net.config.architecture, m.net.config.architecture.replace("Mistral", "Llama"));
        let err = rel_err(&logits(&back, &ids), &logits(&m, &ids));
        assert!(err < 1e-5, "{name}: the export imported back gives other logits: {err:.3e}");
    }
}

#[test]
fn sentencepiece_llama_and_gemma_export_as_the_converter_writes_them_and_run_in_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // (the ids stay within the tiny Gemmas' sliding window of 8, whose layer pattern llama.cpp fixes)
    let text = "the fox";
    for name in ["llama_spm", "gemma2_spm", "gemma3_spm"] {
        let dir = tiny(d, name);
        let m = ftscript::models::load(&dir, "fp32", Device::Cpu).unwrap();
        let ours = d.join(format!("{name}.gguf"));
        ftscript::gguf::export::save_gguf(&m, &ours, ftscript::gguf::export::FileType::F32).unwrap();
        let reference = d.join(format!("{name}-ref.gguf"));
        lcpp(&["convert", p(&dir), p(&reference), "--outtype", "f32"]);
        assert_same_file(&lcpp(&["dump", p(&ours), "--hash"]), &lcpp(&["dump", p(&reference), "--hash"]), name);
        let ids = m.tokenizer.encode(text, true).unwrap();
        assert!(ids.len() <= 8, "{ids:?}");
        let theirs: Vec<Vec<i64>> = serde_json::from_value(lcpp(&["tokenize", p(&ours), &json!([text, "12345 + 678 = naïve café"]).to_string()])["ids"].clone()).unwrap();
        assert_eq!(theirs[0], ids, "{name}: llama.cpp tokenizes the export differently");
        assert_eq!(theirs[1], m.tokenizer.encode("12345 + 678 = naïve café", true).unwrap(), "{name}: llama.cpp tokenizes the export differently");
        let err = rel_err(&llama_cpp_logits(&ours, &ids, d, "f32", None), &logits(&m, &ids));
        println!("{name}: llama.cpp logits vs ftscript: max rel err {err:.2e}");
        // ggml's CPU GELU (Gemma's MLP) reads an f16 table: ~1e-3 of its own
        let tolerance = if name.starts_with("gemma") { 2e-3 } else { 1e-4 };
        assert!(err < tolerance, "{name}: llama.cpp's logits differ from ftscript's: {err:.3e}");
    }
}

#[test]
fn a_qlora_model_exports_its_dequantized_weights_with_the_adapter_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = tiny_llama(d);
    let q = ftscript::nn::quant::QuantConfig { qtype: ftscript::nn::quant::QuantType::Nf4, double_quant: true, skip: vec![] };
    let mut m = ftscript::models::load_with(&dir, "fp32", Device::Cpu, Some(&q)).unwrap();
    add_trained_looking_lora(&mut m);
    assert!(m.net.linears().iter().any(|l| l.weight.is_quantized()));
    let gguf = d.join("qlora.gguf");
    ftscript::gguf::export::save_gguf(&m, &gguf, ftscript::gguf::export::FileType::F32).unwrap();
    let ids = m.tokenizer.encode("the fox", true).unwrap();
    let err = rel_err(&llama_cpp_logits(&gguf, &ids, d, "f32", None), &logits(&m, &ids));
    println!("NF4 + LoRA: llama.cpp logits of the export vs ftscript: max rel err {err:.2e}");
    assert!(err < 1e-4, "the QLoRA model's export differs from it in llama.cpp: {err:.3e}");
}

#[test]
fn bad_export_requests_are_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_llama(d);
    let recipe = d.join("r.rhai");
    let cases = [
        (r#"model.save_gguf("x.gguf", #{ quant: "q4_k_s" });"#, "unknown GGUF quant `q4_k_s`"),
        (r#"model.save_gguf("x.gguf", #{ qaunt: "q8_0" });"#, "qaunt"),
        (r#"model.save_gguf_adapter("a.gguf");"#, "no LoRA adapters"),
    ];
    for (line, want) in cases {
        std::fs::write(&recipe, format!("let model = load_model({:?});\n{line}\n", model.display().to_string())).unwrap();
        let out = ftscript(&["run", p(&recipe)], d);
        let t = text(&out);
        assert!(!out.status.success() && t.contains(want), "{line}: expected an error containing {want:?}, got:\n{t}");
        assert!(!d.join("x.gguf").exists() && !d.join("a.gguf").exists(), "{line}: nothing may be written");
    }
}
