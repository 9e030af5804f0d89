//! The Llama family's config.json (Llama 1/2/3.x, Mistral, Qwen2): the decoder of
//! [`decoder`](super::decoder) as transformers' `modeling_llama.py` builds it, with
//! `attention_bias` / `mlp_bias` (Llama), a sliding window on every layer (Mistral), and biased
//! q/k/v projections with a window on the layers from `max_window_layers` on when
//! `use_sliding_window` (Qwen2).

use super::config::{window, CommonConfig, DecoderConfig};
use anyhow::Result;
use serde::Deserialize;

/// The keys of the Llama family (Qwen3's too) beside the common ones.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub sliding_window: Option<serde_json::Value>,
    /// Qwen2 and Qwen3.
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
}

impl Config {
    /// Qwen's window: only with `use_sliding_window`, on the layers `layer_types` marks (from
    /// `max_window_layers` on, in older files).
    pub(super) fn qwen_window(&self, d: &mut DecoderConfig) -> Result<()> {
        if self.use_sliding_window.unwrap_or(false) {
            d.sliding_window = window(&self.sliding_window);
            let from = self.max_window_layers.unwrap_or(0);
            d.sliding_layers = self.common.sliding_layers(|l| l >= from)?;
        }
        Ok(())
    }
}

/// `LlamaForCausalLM`.
pub fn llama(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("LlamaForCausalLM")?;
    d.qkv_bias = c.attention_bias;
    d.o_bias = c.attention_bias;
    d.mlp_bias = c.mlp_bias;
    Ok(d)
}

/// `MistralForCausalLM`: Llama with every layer's attention limited to `sliding_window`.
pub fn mistral(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("MistralForCausalLM")?;
    d.sliding_window = window(&c.sliding_window);
    d.sliding_layers = c.common.sliding_layers(|_| true)?;
    Ok(d)
}

/// `Qwen2ForCausalLM`: biased q/k/v; [Qwen's window](Config::qwen_window).
pub fn qwen2(json: &serde_json::Value) -> Result<DecoderConfig> {
    let c: Config = CommonConfig::parse(json)?;
    let mut d = c.common.decoder("Qwen2ForCausalLM")?;
    d.qkv_bias = true;
    c.qwen_window(&mut d)?;
    Ok(d)
}
