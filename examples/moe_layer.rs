//! One sparse mixture-of-experts block's forward and backward on a GPU, timed: ftscript's half of
//! `bench/moe_bench.py` (transformers' block is the other half).
//!
//!   moe_layer TOKENS HIDDEN EXPERTS TOP_K EXPERT_WIDTH LORA_RANK STEPS
//!
//! Random bf16 weights and inputs; the experts frozen, gradients taken for the input (and the
//! expert stacks' LoRA when `LORA_RANK` > 0). Prints one JSON line: ms per forward+backward and
//! the peak of allocated memory.

use ftscript::models::config::MoeConfig;
use ftscript::nn::mlp::Activation;
use ftscript::nn::moe::{ExpertLora, SparseMoe};
use ftscript::nn::WeightSource;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<i64> = std::env::args().skip(1).map(|a| a.parse().expect("integer arguments")).collect();
    let [tokens, hidden, experts, top_k, width, rank, steps] = args[..] else {
        anyhow::bail!("usage: moe_layer TOKENS HIDDEN EXPERTS TOP_K EXPERT_WIDTH LORA_RANK STEPS");
    };
    let device = Device::Cuda(0);
    let config = MoeConfig { num_experts: experts as usize, top_k: top_k as usize, intermediate_size: width as usize, norm_topk_prob: true, sparse_layers: vec![true], router_aux_loss_coef: 0.0, output_router_logits: false };
    let weights = WeightSource::Random { std: 0.02, seed: 0 };
    let mut block = SparseMoe::load(&config, "model.layers.0.mlp".into(), hidden, Activation::Silu, &weights, Kind::BFloat16, device)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    if rank > 0 {
        let lora = |out, inp, rng: &mut rand::rngs::StdRng| ExpertLora::new(experts, out, inp, rank, 2.0, Kind::Float, device, rng);
        block.experts.gate_up_lora = Some(lora(2 * width, hidden, &mut rng));
        block.experts.down_lora = Some(lora(hidden, width, &mut rng));
    }
    let x = (Tensor::randn([tokens, hidden], (Kind::BFloat16, device))).set_requires_grad(true);
    let dy = Tensor::randn([tokens, hidden], (Kind::BFloat16, device)) * 1e-3;
    let step = || -> anyhow::Result<()> {
        let (y, _) = block.forward_routed(&x, true);
        ftscript::cuda::autograd::backward(&[(&y, &dy)]).unwrap();
        Ok(())
    };
    for _ in 0..3 {
        step()?;
    }
    tch::Cuda::synchronize(0);
    ftscript::cuda::reset_peak(device);
    let start = std::time::Instant::now();
    for _ in 0..steps {
        step()?;
    }
    tch::Cuda::synchronize(0);
    let ms = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let peak = ftscript::cuda::peak_allocated(device).unwrap_or(0) as f64 / (1u64 << 30) as f64;
    println!("{}", serde_json::json!({"side": "ftscript", "lora_rank": rank, "ms": ms, "peak_gib": peak}));
    Ok(())
}
