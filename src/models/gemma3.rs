//! Gemma 3's text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`: Gemma 3 1B and the
//! text-only checkpoints; transformers' `modeling_gemma3.py`): Gemma 2's layer (`(1 + w)` norms,
//! four a layer, embeddings × √H, GeGLU, `query_pre_attn_scalar`) with per-head `(1 + w)` q/k
//! norms before RoPE, no soft-caps by default, five sliding-window layers to one global
//! (`layer_types`, or `sliding_window_pattern`), and a RoPE per layer type: `rope_parameters`
//! keyed by `full_attention` / `sliding_attention` (transformers 5), or `rope_theta` +
//! `rope_scaling` for the global layers and `rope_local_base_freq` for the sliding ones (older files).

use super::config::{parse_rope_scaling, window, Activation, CommonConfig, DecoderConfig, RopeScaling};
use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    hidden_activation: Option<String>,
    #[serde(default = "default_query_scalar")]
    query_pre_attn_scalar: f64,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_window")]
    sliding_window: Option<serde_json::Value>,
    #[serde(default = "default_pattern")]
    sliding_window_pattern: usize,
    #[serde(default = "default_local_base")]
    rope_local_base_freq: f64,
    #[serde(default)]
    attention_bias: bool,
}

fn default_query_scalar() -> f64 {
    256.0
}
fn default_window() -> Option<serde_json::Value> {
    Some(4096.into())
}
fn default_pattern() -> usize {
    6
}
fn default_local_base() -> f64 {
    10_000.0
}

/// `(rope_theta, scaling)` of one entry of `rope_parameters`.
fn rope_of(entry: &serde_json::Value, default_theta: f64, max_pos: usize) -> Result<(f64, RopeScaling)> {
    let theta = entry.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(default_theta);
    Ok((theta, parse_rope_scaling(Some(entry), max_pos)?))
}

/// `Gemma3ForCausalLM`.
pub fn gemma3(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("Gemma3ForCausalLM")?;
    d.activation = match &c.hidden_activation {
        Some(name) => Activation::from_name(name)?,
        None => Activation::GeluTanh,
    };
    d.qkv_bias = c.attention_bias;
    d.o_bias = c.attention_bias;
    d.qk_norm = true;
    d.norm_unit_offset = true;
    d.sandwich_norms = true;
    d.embed_scale = true;
    d.attn_scale = Some(c.query_pre_attn_scalar.powf(-0.5));
    d.attn_softcap = c.attn_logit_softcapping;
    d.final_softcap = c.final_logit_softcapping;
    d.sliding_window = window(&c.sliding_window);
    d.sliding_layers = match c.common.layer_types {
        Some(_) => c.common.sliding_layers(None)?,
        None => (0..d.num_hidden_layers).map(|l| (l + 1) % c.sliding_window_pattern != 0).collect(),
    };
    let max_pos = d.max_position_embeddings;
    let by_type = c.common.rope_parameters.as_ref().filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let local = match by_type {
        Some(p) => {
            if let Some(full) = p.get("full_attention") {
                (d.rope_theta, d.rope_scaling) = rope_of(full, 1_000_000.0, max_pos).context("rope_parameters.full_attention")?;
            }
            match p.get("sliding_attention") {
                Some(local) => rope_of(local, c.rope_local_base_freq, max_pos).context("rope_parameters.sliding_attention")?,
                None => (c.rope_local_base_freq, RopeScaling::Default),
            }
        }
        None => {
            if c.common.rope_theta.is_none() {
                d.rope_theta = 1_000_000.0;
            }
            (c.rope_local_base_freq, RopeScaling::Default)
        }
    };
    d.local_rope = Some(local);
    Ok(d)
}
