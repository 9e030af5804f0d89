//! Qwen3-MoE's config.json (`Qwen3MoeForCausalLM`, transformers' `modeling_qwen3_moe.py`):
//! Qwen3's attention (per-head q/k norms, explicit `head_dim`) with a sparse mixture of
//! `num_experts` experts of width `moe_intermediate_size` in place of the MLP
//! ([`crate::nn::moe`]), each token routed to `num_experts_per_tok`, on every
//! `decoder_sparse_step`-th layer but those `mlp_only_layers` lists (which keep a dense MLP of
//! `intermediate_size`); with `use_sliding_window`, every layer's attention slides. When
//! `output_router_logits` is set, training adds `router_aux_loss_coef` × the load-balancing loss.

use super::config::{window, CommonConfig, DecoderConfig, MoeConfig};
use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    #[serde(default)]
    attention_bias: bool,
    use_sliding_window: Option<bool>,
    sliding_window: Option<serde_json::Value>,
    /// (`num_local_experts` as transformers 5 writes it)
    #[serde(alias = "num_local_experts")]
    num_experts: usize,
    num_experts_per_tok: usize,
    moe_intermediate_size: usize,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    #[serde(default)]
    mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default)]
    output_router_logits: bool,
    #[serde(default = "default_aux_coef")]
    router_aux_loss_coef: f64,
}

fn one() -> usize {
    1
}
fn default_aux_coef() -> f64 {
    0.001
}

/// `Qwen3MoeForCausalLM`.
pub fn qwen3_moe(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("Qwen3MoeForCausalLM")?;
    d.qk_norm = true;
    d.qkv_bias = c.attention_bias;
    d.o_bias = c.attention_bias;
    if c.use_sliding_window.unwrap_or(false) {
        d.sliding_window = window(&c.sliding_window);
        d.sliding_layers = vec![true; d.num_hidden_layers];
    }
    super::config::check_sizes(&[("num_experts", c.num_experts, 1 << 12), ("moe_intermediate_size", c.moe_intermediate_size, 1 << 20)])?;
    if c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_experts {
        bail!("num_experts_per_tok {} must be between 1 and num_experts {}", c.num_experts_per_tok, c.num_experts);
    }
    if c.decoder_sparse_step == 0 {
        bail!("decoder_sparse_step is 0");
    }
    let dense = c.mlp_only_layers.unwrap_or_default();
    d.moe = Some(MoeConfig {
        num_experts: c.num_experts,
        top_k: c.num_experts_per_tok,
        intermediate_size: c.moe_intermediate_size,
        norm_topk_prob: c.norm_topk_prob,
        sparse_layers: (0..d.num_hidden_layers).map(|l| c.num_experts > 0 && (l + 1) % c.decoder_sparse_step == 0 && !dense.contains(&l)).collect(),
        router_aux_loss_coef: c.router_aux_loss_coef,
        output_router_logits: c.output_router_logits,
    });
    Ok(d)
}
