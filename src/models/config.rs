//! The resolved configuration every decoder family produces ([`DecoderConfig`]), and the
//! config.json keys the families share ([`CommonConfig`]), in both forms found in the wild:
//! the classic one (`torch_dtype`, `rope_theta`, `rope_scaling`) and the one transformers 5
//! writes (`dtype`, `rope_parameters` holding `rope_theta` and the scaling fields). Each
//! family's own keys are read in its file (`llama.rs`, `qwen3.rs`, ...).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// A serde mirror of the config.json keys every decoder family has; a family's `Config`
/// flattens it beside its own keys.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    /// transformers 5: `"sliding_attention"` or `"full_attention"` for each layer.
    pub layer_types: Option<Vec<String>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

pub use crate::nn::mlp::Activation;
pub use crate::nn::rope::RopeScaling;

/// What a decoder is made of, resolved from a family's config.json: the shapes, and which of
/// the shared blocks' variants its layers use.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// `architectures[0]` (or the one `model_type` names).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as written ("float32", "bfloat16", ...).
    pub dtype: Option<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// Attention sees at most this many previous positions in the layers `sliding_layers` marks.
    pub sliding_window: Option<usize>,
    /// For each layer, whether it uses the sliding window.
    pub sliding_layers: Vec<bool>,
    /// q/k/v projections carry a bias (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Each head's query and key are RMS-normalized over `head_dim` before RoPE (Qwen3's and
    /// Gemma 3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Norms scale by `1 + w` (Gemma).
    pub norm_unit_offset: bool,
    /// The attention and MLP outputs are normalized before their residual adds (Gemma 2/3's
    /// `post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is then
    /// `pre_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// The embeddings are multiplied by `√hidden_size` (rounded to the weights' dtype; Gemma).
    pub embed_scale: bool,
    /// Attention's `qkᵀ` scale when not `1/√head_dim` (Gemma's `query_pre_attn_scalar^-½`).
    pub attn_scale: Option<f64>,
    /// Attention scores soft-capped, `c·tanh(s/c)`, before the mask (Gemma 2's
    /// `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped, `c·tanh(z/c)` (Gemma 2's `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// The fraction of each head's dimensions that RoPE rotates (the first ones; Phi-4-mini's
    /// `partial_rotary_factor`).
    pub partial_rotary_factor: f64,
    /// The sliding-window layers' own RoPE base and scaling (Gemma 3's local RoPE, 10,000 beside
    /// the global layers' 1,000,000); `None`: every layer uses `rope_theta` / `rope_scaling`.
    pub local_rope: Option<(f64, RopeScaling)>,
    /// Sparse mixture-of-experts feed-forward on the layers it marks (Qwen3-MoE).
    pub moe: Option<MoeConfig>,
}

/// The experts of a sparse decoder ([`crate::nn::moe`]).
#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Each expert's MLP width.
    pub intermediate_size: usize,
    /// The top-k probabilities renormalized to sum to 1.
    pub norm_topk_prob: bool,
    /// For each layer, whether its feed-forward is sparse (others keep a dense MLP).
    pub sparse_layers: Vec<bool>,
    /// config.json's `router_aux_loss_coef`: the weight of the load-balancing loss.
    pub router_aux_loss_coef: f64,
    /// config.json's `output_router_logits`: the model's own loss adds the load-balancing loss.
    pub output_router_logits: bool,
}

impl MoeConfig {
    /// The weight of the load-balancing loss in the model's own loss, as transformers adds it
    /// (0 unless config.json sets `output_router_logits`).
    pub fn model_aux_coef(&self) -> f64 {
        if self.output_router_logits {
            self.router_aux_loss_coef
        } else {
            0.0
        }
    }
}

pub(crate) fn token_ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

impl DecoderConfig {
    /// Reads and validates `config.json`; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("{}", path.display()))
    }

    /// config.json → the family its `architectures[0]` (or `model_type`) names → its decoder.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let family = super::family_of(json)?;
        let config = (family.config)(json)?;
        config.check()?;
        Ok(config)
    }

    /// The window of layer `l`, if it has one.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers.get(l).copied().unwrap_or(false))
    }

    /// Layer `l`'s feed-forward: `(linear weights, weights that stay dense, activation values
    /// per token kept for backward)`. Dense: `3·H·I`, 0, `4·I`; sparse: 0, the experts and the
    /// router `E·(3·H·Iₑ + H)` (4-bit loading leaves them dense, as bitsandbytes does), and for
    /// each of a token's `k` experts its gathered input and output and `4·Iₑ` (+ the router's `E`).
    pub fn feed_forward_size(&self, l: usize) -> (u64, u64, u64) {
        let h = self.hidden_size as u64;
        match self.moe.as_ref().filter(|m| m.sparse_layers[l]) {
            Some(m) => {
                let (e, i, k) = (m.num_experts as u64, m.intermediate_size as u64, m.top_k as u64);
                (0, e * (3 * h * i + h), k * (4 * i + 2 * h) + e)
            }
            None => {
                let i = self.intermediate_size as u64;
                (3 * h * i, 0, 4 * i)
            }
        }
    }

    fn check(&self) -> Result<()> {
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!("num_attention_heads {} is not a multiple of num_key_value_heads {}", self.num_attention_heads, self.num_key_value_heads);
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            bail!("layer_types has {} entries for {} layers", self.sliding_layers.len(), self.num_hidden_layers);
        }
        Ok(())
    }
}

/// Each `(key, value, most)` of a config.json: sizes beyond any model's (a corrupt or hostile
/// file) are refused before anything is allocated by them.
pub fn check_sizes(sizes: &[(&str, usize, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, value, most)| value > most) {
        Some((key, value, most)) => bail!("{key} {value} is beyond any model's (at most {most}): a corrupt config.json?"),
        None => Ok(()),
    }
}

impl CommonConfig {
    /// Reads a family's `Config` (its keys plus these) from config.json; a missing or mistyped
    /// key is named.
    pub fn parse<T: serde::de::DeserializeOwned>(json: &serde_json::Value) -> Result<T> {
        // alone first: serde loses the key of an error inside a flattened struct
        crate::script::options::deserialize::<CommonConfig>(json.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::script::options::deserialize(json.clone()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The decoder these keys describe, as Llama builds it (no biases, no window, plain
    /// attention); `architecture` is the family's. Families change the fields that differ.
    pub fn decoder(&self, architecture: &str) -> Result<DecoderConfig> {
        let activation = match &self.hidden_act {
            Some(name) => Activation::from_name(name).with_context(|| format!("hidden_act of {architecture}"))?,
            None => Activation::Silu,
        };
        check_sizes(&[
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads.unwrap_or(0), 1 << 12),
            ("head_dim", self.head_dim.unwrap_or(0), 1 << 14),
        ])?;
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim.is_none() {
            bail!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads);
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_key_value_heads == 0 {
            bail!("num_key_value_heads is 0");
        }
        // transformers 5 nests rope settings in `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
        let rope_params = self.rope_parameters.clone().or(self.rope_scaling.clone());
        let rope_theta = self
            .rope_theta
            .or_else(|| rope_params.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10000.0);
        Ok(DecoderConfig {
            architecture: architecture.to_string(),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling: parse_rope_scaling(rope_params.as_ref(), self.max_position_embeddings)?,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            dtype: self.dtype.clone().or(self.torch_dtype.clone()),
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id),
            pad_token_id: token_ids(&self.pad_token_id).first().copied(),
            sliding_window: None,
            sliding_layers: vec![false; self.num_hidden_layers],
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            activation,
            norm_unit_offset: false,
            sandwich_norms: false,
            embed_scale: false,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
            local_rope: None,
            fused_projections: false,
            partial_rotary_factor: 1.0,
            moe: None,
        })
    }

    /// The sliding layers as `layer_types` lists them, or (older files, without the key) as the
    /// family's rule `sliding(l)` says; an unknown layer type is named.
    pub fn sliding_layers(&self, sliding: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
        let Some(types) = &self.layer_types else {
            return Ok((0..self.num_hidden_layers).map(sliding).collect());
        };
        types
            .iter()
            .enumerate()
            .map(|(l, t)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => bail!("layer_types[{l}] is `{other}`; supported: sliding_attention, full_attention"),
            })
            .collect()
    }
}

/// `sliding_window` as written: a number, or null / absent.
pub(crate) fn window(v: &Option<serde_json::Value>) -> Option<usize> {
    v.as_ref().and_then(|v| v.as_u64()).map(|v| v as usize)
}

pub(crate) fn parse_rope_scaling(params: Option<&serde_json::Value>, max_pos: usize) -> Result<RopeScaling> {
    let Some(p) = params.filter(|p| p.is_object()) else { return Ok(RopeScaling::Default) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        p.get(key).and_then(|v| v.as_f64()).with_context(|| format!("rope scaling `{kind}` needs key `{key}`"))
    };
    let original = p
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(max_pos);
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "dynamic" => RopeScaling::Dynamic { factor: num("factor")?, original_max_position_embeddings: original },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: original,
        },
        "longrope" => longrope(p, max_pos, original)?,
        other => bail!("unsupported rope scaling type `{other}`; supported: default, linear, dynamic, llama3, longrope"),
    })
}

/// LongRoPE's factors, and its attention factor as transformers derives it when absent:
/// `√(1 + ln s / ln L₀)` for `s = factor` (else `max_pos / L₀`) above 1, `L₀` being
/// `original_max_position_embeddings`.
pub(crate) fn longrope(p: &serde_json::Value, max_pos: usize, original: usize) -> Result<RopeScaling> {
    let factors = |key: &str| -> Result<Vec<f64>> {
        p.get(key).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).with_context(|| format!("rope scaling `longrope` needs the list `{key}`"))
    };
    let factor = p.get("factor").and_then(|v| v.as_f64()).unwrap_or(max_pos as f64 / original as f64);
    let attention_factor = match p.get("attention_factor").and_then(|v| v.as_f64()) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope { short_factor: factors("short_factor")?, long_factor: factors("long_factor")?, original_max_position_embeddings: original, attention_factor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_rope_forms() {
        let classic = serde_json::json!({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}});
        let v5 = serde_json::json!({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}});
        let a = DecoderConfig::from_json(&classic).unwrap();
        let b = DecoderConfig::from_json(&v5).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let j = serde_json::json!({"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2});
        let e = DecoderConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM") && e.contains("Qwen3ForCausalLM"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let j = serde_json::json!({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":2});
        let e = DecoderConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }
}
