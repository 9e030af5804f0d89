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
