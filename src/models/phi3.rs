//! Phi-3's config.json (`Phi3ForCausalLM`: Phi-3 and Phi-3.5 mini/medium, Phi-4, Phi-4-mini;
//! transformers' `modeling_phi3.py`): the Llama decoder with q, k, v in one `qkv_proj` and
//! gate, up in one `gate_up_proj` (each adapted as one module, under peft's names), RoPE over
//! the first `partial_rotary_factor` of each head's dimensions (Phi-4-mini), LongRoPE for the
//! 128k models (`su` in older files), and a window on every layer when `sliding_window` is set.
//! The residual and embedding dropouts (`resid_pdrop`, `embd_pdrop`) are not applied: Phi's own
//! files set them to 0.

use super::config::{longrope, window, CommonConfig, DecoderConfig, RopeScaling};
use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    sliding_window: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    resid_pdrop: f64,
    #[serde(default)]
    embd_pdrop: f64,
}

/// `Phi3ForCausalLM`.
pub fn phi3(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let rope = c.common.rope_parameters.as_ref().or(c.common.rope_scaling.as_ref()).filter(|p| p.is_object());
    // older Phi-3 files call LongRoPE `su`
    let mut common = c.common.clone();
    if let Some(p) = rope.filter(|p| p.get("type").or_else(|| p.get("rope_type")).and_then(|t| t.as_str()) == Some("su")) {
        let mut p = p.clone();
        p["rope_type"] = "longrope".into();
        p.as_object_mut().map(|o| o.remove("type"));
        if common.rope_parameters.is_some() { common.rope_parameters = Some(p) } else { common.rope_scaling = Some(p) }
    }
    let mut d = common.decoder("Phi3ForCausalLM")?;
    d.fused_projections = true;
    d.sliding_window = window(&c.sliding_window);
    d.sliding_layers = c.common.sliding_layers(|_| true)?;
    d.partial_rotary_factor = c.partial_rotary_factor.or_else(|| rope.and_then(|p| p.get("partial_rotary_factor")).and_then(|v| v.as_f64())).unwrap_or(1.0);
    if !(d.partial_rotary_factor > 0.0 && d.partial_rotary_factor <= 1.0) {
        bail!("partial_rotary_factor must lie in (0, 1], got {}", d.partial_rotary_factor);
    }
    if let RopeScaling::LongRope { .. } = d.rope_scaling {
        let p = common.rope_parameters.as_ref().or(common.rope_scaling.as_ref()).unwrap();
        // the pretraining length: in the rope settings (transformers 5) or beside them
        let original = p.get("original_max_position_embeddings").and_then(|v| v.as_u64()).map(|v| v as usize).or(c.original_max_position_embeddings).unwrap_or(d.max_position_embeddings);
        d.rope_scaling = longrope(p, d.max_position_embeddings, original)?;
        let rotary = (d.head_dim as f64 * d.partial_rotary_factor) as usize;
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = &d.rope_scaling {
            if short_factor.len() != rotary / 2 || long_factor.len() != rotary / 2 {
                bail!("longrope: short_factor and long_factor need {} entries (half the rotary dimensions), got {} and {}", rotary / 2, short_factor.len(), long_factor.len());
            }
        }
    }
    if c.resid_pdrop > 0.0 || c.embd_pdrop > 0.0 {
        tracing::warn!("Phi-3: resid_pdrop {} and embd_pdrop {} are not applied while training", c.resid_pdrop, c.embd_pdrop);
    }
    Ok(d)
}
