//! The demo model, SmolLM2-135M-Instruct, imported from its GGUF file: the imported directory
//! loads in transformers with ftscript's logits, the rebuilt tokenizer gives transformers' ids,
//! and the model answers a question.

mod common;
use common::*;
use ftscript::generate::{generate_ids, Sampling};
use ftscript::models::decoder::AttnMask;
use tch::{Device, Kind, Tensor};

fn logits(m: &ftscript::models::LoadedModel, ids: &[Vec<i64>]) -> Tensor {
    let (b, t) = (ids.len() as i64, ids[0].len() as i64);
    let flat: Vec<i64> = ids.iter().flatten().copied().collect();
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true);
    tch::no_grad(|| m.net.forward(&Tensor::from_slice(&flat).view([b, t]), &positions, &AttnMask::Causal, None, false))
}

#[test]
fn imported_demo_model_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let dir = demo_model();
    let m = ftscript::models::load(&dir, "fp32", Device::Cpu).unwrap();

    // tokenizer: the same ids as transformers' own GGUF tokenizer conversion
    py("gguf_reference.py", &[demo_gguf().to_str().unwrap(), d.to_str().unwrap(), "--no-model"]);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference_tokens.json")).unwrap()).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    assert!(texts.len() >= 10);
    for (text, ids) in texts.iter().zip(reference["ids"].as_array().unwrap()) {
        let want: Vec<i64> = ids.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let got = m.tokenizer.encode(text.as_str().unwrap(), true).unwrap();
        assert_eq!(got, want, "token ids differ for {text}");
    }

    // logits: transformers loading the imported directory vs ftscript
    let ids = vec![m.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is in France.", true).unwrap()];
    std::fs::write(d.join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
    py("peft_reference.py", &["model-logits", dir.to_str().unwrap(), d.join("ids.json").to_str().unwrap(), d.join("logits.safetensors").to_str().unwrap()]);
    let theirs = &read_safetensors(&d.join("logits.safetensors"))["logits"];
    let ours = logits(&m, &ids);
    let err = rel_err(&ours, theirs);
    println!("SmolLM2 logits max rel err {err:.2e}");
    assert!(err < 1e-4, "imported model logits differ from transformers: rel err {err:.3e}");

    // loading the .gguf directly gives the same model
    let direct = ftscript::models::load(&demo_gguf(), "fp32", Device::Cpu).unwrap();
    assert!(logits(&direct, &ids).equal(&ours), "load_model(.gguf) differs from the imported directory");

    // the chat template renders as transformers' apply_chat_template does
    let conversations = serde_json::json!([
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]);
    std::fs::write(d.join("chats.json"), conversations.to_string()).unwrap();
    let want: Vec<String> = serde_json::from_str(&py("chat_reference.py", &[dir.to_str().unwrap(), d.join("chats.json").to_str().unwrap()])).unwrap();
    let mut k = 0;
    for msgs in conversations.as_array().unwrap() {
        for gen in [true, false] {
            let t = &m.tokenizer;
            let got = ftscript::data::template::render_chat(t.chat_template.as_deref().unwrap(), msgs, gen, t.bos_token.as_deref(), t.eos_token.as_deref()).unwrap();
            assert_eq!(got, want[k], "chat template rendering differs (add_generation_prompt={gen})");
            k += 1;
        }
    }

    // and it answers
    let prompt = ftscript::data::template::render_chat(
        m.tokenizer.chat_template.as_deref().unwrap(),
        &serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]),
        true,
        None,
        None,
    )
    .unwrap();
    let out = generate_ids(&m, &m.tokenizer.encode(&prompt, true).unwrap(), &Sampling { max_new_tokens: 20, ..Default::default() }).unwrap();
    let answer = m.tokenizer.decode(&out, true).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer}");
}

/// GGUF files that llama.cpp's own converter writes from tiny Qwen3, Gemma 2, Gemma 3 and Phi-3
/// models (sentencepiece vocabularies: the converter knows no tiny BPE pre-tokenizer) load as
/// those families: every tensor equals what transformers' GGUF loader reads, Gemma's
/// sentencepiece vocabulary gives its token ids (Phi-3's the original tokenizer's), and the logits over 24 ids (beyond the Gemmas' window of 8 and Phi-3's LongRoPE length of 16) are the
/// original model's.
#[test]
fn qwen3_gemma_and_phi3_import_from_llama_cpp_conversions() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ids: Vec<Vec<i64>> = vec![(0..24).map(|i| 3 + (i * 37) % 300).collect()];
    for name in ["qwen3_spm", "gemma2_spm", "gemma3_spm", "phi3_spm"] {
        let dir = tiny(d, name);
        let gguf = d.join(format!("{name}.gguf"));
        py("llama_cpp_reference.py", &["convert", dir.to_str().unwrap(), gguf.to_str().unwrap(), "--outtype", "f32"]);
        let original = ftscript::models::load(&dir, "fp32", Device::Cpu).unwrap();
        let imported = ftscript::models::load(&gguf, "fp32", Device::Cpu).unwrap();
        assert_eq!(imported.net.config.architecture, original.net.config.architecture);
        let err = rel_err(&logits(&imported, &ids), &logits(&original, &ids));
        println!("{name}: imported vs original logits: max rel err {err:.2e}");
        assert!(err < 1e-5, "{name}: the imported model's logits differ from the original's: {err:.3e}");

        let out = d.join(format!("{name}-reference"));
        py("gguf_reference.py", &[gguf.to_str().unwrap(), out.to_str().unwrap()]);
        let theirs = read_safetensors(&out.join("reference_model.safetensors"));
        let ours: std::collections::HashMap<String, Tensor> = imported.net.state_dict().into_iter().collect();
        for (k, t) in &theirs {
            if k == "lm_head.weight" && !ours.contains_key(k) {
                assert!(t.equal(&ours["model.embed_tokens.weight"]), "{name}: transformers' tied head differs");
                continue;
            }
            let mine = ours.get(k).unwrap_or_else(|| panic!("{name}: transformers has `{k}`, the import not"));
            assert!(mine.equal(t), "{name}: `{k}` differs from transformers' GGUF loader");
        }
        assert_eq!(ours.len(), theirs.keys().filter(|k| ours.contains_key(*k)).count(), "{name}: the import has tensors transformers lacks");
        if name == "qwen3_spm" {
            // transformers converts a qwen3 GGUF's vocabulary as byte-level BPE whatever it is (real
            // Qwen3 files are); this one is sentencepiece, which the import reads as sentencepiece
            continue;
        }
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("reference_tokens.json")).unwrap()).unwrap();
        let texts = reference["texts"].as_array().unwrap();
        let want: Vec<Vec<i64>> = if name == "phi3_spm" {
            // transformers' GGUF Phi-3 converter drops sentencepiece's normalizer (no "▁" for
            // spaces): the original tokenizer (without its BOS) is the reference
            texts.iter().map(|t| original.tokenizer.encode(t.as_str().unwrap(), false).unwrap()).collect()
        } else {
            serde_json::from_value(reference["ids"].clone()).unwrap()
        };
        for (text, want) in texts.iter().zip(want) {
            // (the original tokenizer prepends "▁" to the first word only, llama.cpp and the
            // import to the text: leading whitespace differs by one "▁")
            if name == "phi3_spm" && text.as_str().unwrap().starts_with(char::is_whitespace) {
                continue;
            }
            assert_eq!(imported.tokenizer.encode(text.as_str().unwrap(), true).unwrap(), want, "{name}: token ids differ for {text}");
        }
    }
}
