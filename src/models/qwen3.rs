//! Qwen3's config.json (`Qwen3ForCausalLM`, transformers' `modeling_qwen3.py`): the Llama
//! decoder with each head's query and key RMS-normalized over `head_dim` before RoPE
//! (`self_attn.q_norm`, `self_attn.k_norm`), `head_dim` set on its own (128 where
//! `hidden_size / num_attention_heads` differs), no biases unless `attention_bias`, and a
//! sliding window only with `use_sliding_window`, on the layers `layer_types` marks.

use super::config::{CommonConfig, DecoderConfig};
use super::llama::Config;
use anyhow::Result;

/// `Qwen3ForCausalLM`.
pub fn qwen3(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("Qwen3ForCausalLM")?;
    d.qk_norm = true;
    d.qkv_bias = c.attention_bias;
    d.o_bias = c.attention_bias;
    c.qwen_window(&mut d)?;
    Ok(d)
}
