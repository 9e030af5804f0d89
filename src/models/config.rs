//! `config.json` of a Hugging Face causal LM, in both forms found in the wild:
//! the classic one (`torch_dtype`, `rope_theta`, `rope_scaling`) and the one transformers 5
//! writes (`dtype`, `rope_parameters` holding `rope_theta` and the scaling fields).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Architectures this build can load (the `architectures[0]` of config.json).
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// A serde mirror of the fields of config.json that the Llama family uses.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

pub use crate::nn::rope::RopeScaling;

/// The resolved configuration of a Llama-family decoder.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
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
    /// Attention sees at most this many previous positions (Mistral; Qwen2 when enabled).
    pub sliding_window: Option<usize>,
    /// Layers from this index on use the sliding window (Qwen2's `max_window_layers`).
    pub sliding_window_from_layer: usize,
    /// q/k/v projections carry a bias (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

impl LlamaConfig {
    /// Reads and validates `config.json`; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(json.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let architecture = match (&raw.architectures, &raw.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) => match t.as_str() {
                "llama" => "LlamaForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                other => other.to_string(),
            },
            _ => bail!("missing key `architectures` (and no `model_type`)"),
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            bail!(
                "unsupported architecture `{architecture}`; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            );
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" && act != "swish" {
                bail!("unsupported hidden_act `{act}`; supported: silu");
            }
        }
        if raw.num_attention_heads == 0 || raw.hidden_size % raw.num_attention_heads != 0 && raw.head_dim.is_none() {
            bail!("hidden_size {} is not divisible by num_attention_heads {}", raw.hidden_size, raw.num_attention_heads);
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || raw.num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads {} is not a multiple of num_key_value_heads {num_key_value_heads}", raw.num_attention_heads);
        }
        // transformers 5 nests rope settings in `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
        let rope_params = raw.rope_parameters.clone().or(raw.rope_scaling.clone());
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10000.0);
        let rope_scaling = parse_rope_scaling(rope_params.as_ref(), raw.max_position_embeddings)?;
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        let window = raw.sliding_window.as_ref().and_then(|v| v.as_u64()).map(|v| v as usize);
        let (sliding_window, sliding_window_from_layer) = if is_qwen2 {
            if raw.use_sliding_window.unwrap_or(false) {
                (window, raw.max_window_layers.unwrap_or(0))
            } else {
                (None, 0)
            }
        } else {
            (window, 0)
        };
        Ok(LlamaConfig {
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            sliding_window,
            sliding_window_from_layer,
            qkv_bias: is_qwen2 || raw.attention_bias,
            o_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
        })
    }
}

fn parse_rope_scaling(params: Option<&serde_json::Value>, max_pos: usize) -> Result<RopeScaling> {
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
        other => bail!("unsupported rope scaling type `{other}`; supported: default, linear, dynamic, llama3"),
    })
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
        let a = LlamaConfig::from_json(&classic).unwrap();
        let b = LlamaConfig::from_json(&v5).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let j = serde_json::json!({"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2});
        let e = LlamaConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let j = serde_json::json!({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":2});
        let e = LlamaConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }
}
