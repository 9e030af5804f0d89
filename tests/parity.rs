//! Logit parity with transformers: tiny random-init models made by transformers at test time.

mod common;
use common::*;
use ftscript::generate::{generate_ids, Sampling};
use ftscript::models::llama::AttnMask;
use tch::{Device, Kind, Tensor};

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    py("make_tiny.py", &[out]);
    for name in ["llama_gqa", "llama3_rope", "llama_linear_rope", "mistral", "qwen2_tied"] {
        let d = dir.path().join(name);
        let reference = read_safetensors(&d.join("reference.safetensors"));
        let m = ftscript::models::load(&d, "fp32", Device::Cpu).unwrap();
        let ids = &reference["ids"];
        let (b, t) = ids.size2().unwrap();
        let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], true);
        let logits = tch::no_grad(|| m.net.forward(ids, &positions, &AttnMask::Causal, None, false));
        let err = rel_err(&logits, &reference["logits"]);
        println!("{name}: logits max rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: logits differ from transformers: rel err {err:.3e}");

        let prompt: Vec<i64> = Vec::try_from(ids.get(0).narrow(0, 0, 10)).unwrap();
        let want: Vec<i64> = Vec::try_from(&reference["greedy"]).unwrap();
        let s = Sampling { max_new_tokens: 20, ..Sampling::default() };
        let got = generate_ids(&m, &prompt, &s).unwrap();
        // ftscript stops at EOS; transformers ran with EOS disabled: equal up to the first EOS.
        let eos = ftscript::generate::stop_ids(&m);
        let until_eos: Vec<i64> = want.iter().copied().take_while(|t| !eos.contains(t)).collect();
        assert_eq!(got, until_eos, "{name}: greedy tokens differ");
    }
}
