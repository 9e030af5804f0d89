//! Gemma 2's config.json (`Gemma2ForCausalLM`, transformers' `modeling_gemma2.py`): the decoder
//! with Gemma's norms (`(1 + w) · x / rms`, four a layer: the attention and MLP outputs are
//! normalized before their residual adds), embeddings scaled by `√hidden_size`, a GeGLU MLP
//! (`gelu_pytorch_tanh`), attention scaled by `query_pre_attn_scalar^-½` with its scores
//! soft-capped (`attn_logit_softcapping`, 50), logits soft-capped (`final_logit_softcapping`,
//! 30), and a sliding window on every other layer (`layer_types`; the even ones in older files).
//! A key absent from config.json takes transformers' default; `null` turns a soft-cap off.

use super::config::{window, Activation, CommonConfig, DecoderConfig};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    hidden_activation: Option<String>,
    #[serde(default = "default_query_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default = "default_attn_softcap")]
    attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_final_softcap")]
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_window")]
    sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    attention_bias: bool,
}

fn default_query_scalar() -> f64 {
    256.0
}
fn default_attn_softcap() -> Option<f64> {
    Some(50.0)
}
fn default_final_softcap() -> Option<f64> {
    Some(30.0)
}
fn default_window() -> Option<serde_json::Value> {
    Some(4096.into())
}

/// `Gemma2ForCausalLM`.
pub fn gemma2(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("Gemma2ForCausalLM")?;
    d.activation = match &c.hidden_activation {
        Some(name) => Activation::from_name(name)?,
        None => Activation::GeluTanh,
    };
    d.qkv_bias = c.attention_bias;
    d.o_bias = c.attention_bias;
    d.norm_unit_offset = true;
    d.sandwich_norms = true;
    d.embed_scale = true;
    d.attn_scale = Some(c.query_pre_attn_scalar.powf(-0.5));
    d.attn_softcap = c.attn_logit_softcapping;
    d.final_softcap = c.final_logit_softcapping;
    d.sliding_window = window(&c.sliding_window);
    d.sliding_layers = match c.common.layer_types {
        Some(_) => c.common.sliding_layers(None)?,
        None => (0..d.num_hidden_layers).map(|l| l % 2 == 0).collect(),
    };
    Ok(d)
}
