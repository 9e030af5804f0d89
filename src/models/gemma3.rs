//! Gemma 3's text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`: Gemma 3 1B and the
//! text-only checkpoints; transformers' `modeling_gemma3.py`): Gemma 2's layer (`(1 + w)` norms,
//! four a layer, embeddings × √H, GeGLU, `query_pre_attn_scalar`) with per-head `(1 + w)` q/k
//! norms before RoPE, no soft-caps by default, five sliding-window layers to one global
//! (`layer_types`, or `sliding_window_pattern`), and a RoPE per layer type: `rope_parameters`
//! keyed by `full_attention` / `sliding_attention` (transformers 5), or `rope_theta` +
//! `rope_scaling` for the global layers and `rope_local_base_freq` for the sliding ones (older files).

use super::config::{parse_rope_scaling, CommonConfig, DecoderConfig, RopeScaling};
use super::gemma2::GemmaKeys;
use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    #[serde(flatten)]
    gemma: GemmaKeys,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_pattern")]
    sliding_window_pattern: usize,
    #[serde(default = "default_local_base")]
    rope_local_base_freq: f64,
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
    let mut d = c.gemma.decoder(&c.common, "Gemma3ForCausalLM")?;
    d.qk_norm = true;
    d.attn_softcap = c.attn_logit_softcapping;
    d.final_softcap = c.final_logit_softcapping;
    anyhow::ensure!(c.sliding_window_pattern > 0, "config.json: sliding_window_pattern must be at least 1 (every n-th layer global), got 0");
    d.sliding_layers = c.common.sliding_layers(|l| (l + 1) % c.sliding_window_pattern != 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> DecoderConfig {
        let mut j = serde_json::json!({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 12, "num_attention_heads": 2, "head_dim": 4});
        j.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        DecoderConfig::from_json(&j).unwrap()
    }

    /// The file format Gemma 3 shipped with (transformers 4.5x): `rope_theta` + `rope_scaling`
    /// for the global layers, `rope_local_base_freq` for the sliding ones, `sliding_window_pattern`.
    #[test]
    fn reads_the_older_rope_keys_and_the_pattern() {
        let d = config(serde_json::json!({"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "rope_local_base_freq": 1e4, "sliding_window": 512, "sliding_window_pattern": 6}));
        assert_eq!((d.rope_theta, d.rope_scaling.clone()), (1e6, RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(d.local_rope, Some((1e4, RopeScaling::Default)));
        let full: Vec<usize> = (0..12).filter(|&l| d.window_of(l).is_none()).collect();
        assert_eq!(full, [5, 11]);
        assert_eq!(d.window_of(0), Some(512));
        assert_eq!((d.attn_softcap, d.final_softcap), (None, None));
    }

    #[test]
    fn a_zero_pattern_is_an_error_not_a_panic() {
        let j = serde_json::json!({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 12, "num_attention_heads": 2, "head_dim": 4, "sliding_window_pattern": 0});
        let e = DecoderConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("sliding_window_pattern must be at least 1"), "{e}");
    }
}
