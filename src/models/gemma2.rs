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

/// The keys Gemma 2 and Gemma 3 share beside the common ones.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct GemmaKeys {
    hidden_activation: Option<String>,
    #[serde(default = "default_query_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default = "default_window")]
    sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    attention_bias: bool,
}

fn default_query_scalar() -> f64 {
    256.0
}
fn default_window() -> Option<serde_json::Value> {
    Some(4096.into())
}

impl GemmaKeys {
    /// The decoder with Gemma's layer: `(1 + w)` norms, four a layer, embeddings × √H, GeGLU,
    /// `query_pre_attn_scalar`, biases only with `attention_bias`, and the window (on no layer
    /// yet: each family marks its own).
    pub(super) fn decoder(&self, common: &CommonConfig, architecture: &str) -> Result<DecoderConfig> {
        let mut d = common.decoder(architecture)?;
        d.activation = match &self.hidden_activation {
            Some(name) => Activation::from_name(name)?,
            None => Activation::GeluTanh,
        };
        d.qkv_bias = self.attention_bias;
        d.o_bias = self.attention_bias;
        d.norm_unit_offset = true;
        d.sandwich_norms = true;
        d.embed_scale = true;
        d.attn_scale = Some(self.query_pre_attn_scalar.powf(-0.5));
        d.sliding_window = window(&self.sliding_window);
        Ok(d)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: CommonConfig,
    #[serde(flatten)]
    gemma: GemmaKeys,
    #[serde(default = "default_attn_softcap")]
    attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_final_softcap")]
    final_logit_softcapping: Option<f64>,
}

fn default_attn_softcap() -> Option<f64> {
    Some(50.0)
}
fn default_final_softcap() -> Option<f64> {
    Some(30.0)
}

/// `Gemma2ForCausalLM`.
pub fn gemma2(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.gemma.decoder(&c.common, "Gemma2ForCausalLM")?;
    d.attn_softcap = c.attn_logit_softcapping;
    d.final_softcap = c.final_logit_softcapping;
    d.sliding_layers = c.common.sliding_layers(|l| l % 2 == 0)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 2 takes transformers' soft-caps when config.json leaves them out, none when `null`.
    #[test]
    fn gemma2_softcaps_default_and_null() {
        let base = serde_json::json!({"architectures": ["Gemma2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 4});
        let d = DecoderConfig::from_json(&base).unwrap();
        assert_eq!((d.attn_softcap, d.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!((0..4).map(|l| d.window_of(l).is_some()).collect::<Vec<_>>(), [true, false, true, false]);
        let mut off = base.clone();
        off["attn_logit_softcapping"] = serde_json::Value::Null;
        off["final_logit_softcapping"] = serde_json::Value::Null;
        let d = DecoderConfig::from_json(&off).unwrap();
        assert_eq!((d.attn_softcap, d.final_softcap), (None, None));
    }
}
