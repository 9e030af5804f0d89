//! Model loading: a Hugging Face model directory or a GGUF file → a [`LoadedModel`].
//!
//! Every decoder family is the one [`Decoder`] (shared blocks from `crate::nn`), built from the
//! [`DecoderConfig`] its config.json resolves to. The trainer, generation, checkpoints, peft and
//! saving talk to `Decoder` and name no family.
//!
//! Adding a dense family: one file here with a serde `Config` mirroring its config.json
//! (flattening [`config::CommonConfig`]) and a function `config.json → DecoderConfig` that sets
//! the variants it uses (a block the decoder lacks goes into `crate::nn` and behind a field of
//! `DecoderConfig`), plus one line in [`FAMILIES`]. Then a tiny model of it in
//! `tests/py/make_tiny.py` (its parity test) and a row in README's "Supported architectures".

pub mod config;
pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod phi3;
pub mod placement;
pub mod qwen3;
pub mod qwen3_moe;
pub mod save;
pub mod t5;

/// A family: the `architectures[0]` and `model_type` its config.json names, and how that
/// config.json becomes a decoder.
pub struct Family {
    pub architecture: &'static str,
    pub model_type: &'static str,
    pub config: fn(&serde_json::Value) -> Result<DecoderConfig>,
}

/// The families this build loads.
pub const FAMILIES: &[Family] = &[
    Family { architecture: "LlamaForCausalLM", model_type: "llama", config: llama::llama },
    Family { architecture: "MistralForCausalLM", model_type: "mistral", config: llama::mistral },
    Family { architecture: "Qwen2ForCausalLM", model_type: "qwen2", config: llama::qwen2 },
    Family { architecture: "Qwen3ForCausalLM", model_type: "qwen3", config: qwen3::qwen3 },
    Family { architecture: "Qwen3MoeForCausalLM", model_type: "qwen3_moe", config: qwen3_moe::qwen3_moe },
    Family { architecture: "Gemma2ForCausalLM", model_type: "gemma2", config: gemma2::gemma2 },
    Family { architecture: "Gemma3ForCausalLM", model_type: "gemma3_text", config: gemma3::gemma3 },
    Family { architecture: "Phi3ForCausalLM", model_type: "phi3", config: phi3::phi3 },
];

/// The family of a config.json, by `architectures[0]` (or `model_type` when that is absent).
pub fn family_of(json: &serde_json::Value) -> Result<&'static Family> {
    let architecture = json.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
    let model_type = json.get("model_type").and_then(|t| t.as_str());
    let found = match (architecture, model_type) {
        (Some(a), _) => FAMILIES.iter().find(|f| f.architecture == a),
        (None, Some(t)) => FAMILIES.iter().find(|f| f.model_type == t),
        (None, None) => bail!("missing key `architectures` (and no `model_type`)"),
    };
    found.with_context(|| {
        let supported: Vec<&str> = FAMILIES.iter().map(|f| f.architecture).collect();
        format!("unsupported architecture `{}`; supported: {}", architecture.or(model_type).unwrap_or_default(), supported.join(", "))
    })
}

use crate::nn::WeightSource;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use config::DecoderConfig;
use crate::nn::quant::QuantConfig;
use decoder::Decoder;
use placement::{DeviceSpec, Placement};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What backward keeps of the forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Checkpointing {
    /// Every layer's activations.
    Off,
    /// The first `n` decoder layers checkpointed as `On` does, the layers above them keeping
    /// every activation (Megatron's block recomputation of `n` layers): between `Off` and `On`
    /// in memory and speed.
    First(usize),
    /// Each decoder layer's input on the GPU; the rest is recomputed in backward.
    On,
    /// Each decoder layer's input and its residual after attention in pinned host memory
    /// (copied out during the forward and back one layer ahead during backward, on a side
    /// stream), and the q, k and v projections' outputs where the copies keep pace and the host
    /// has room; the rest, but for `o_proj` (and those projections), is recomputed.
    Offload,
}

impl Checkpointing {
    /// What it does, in a log line's words.
    pub fn describe(&self) -> String {
        match self {
            Checkpointing::Off => "no checkpointing".into(),
            Checkpointing::First(n) => format!("checkpointing the first {n} layers (the others keep their activations)"),
            Checkpointing::On => "checkpointing each layer".into(),
            Checkpointing::Offload => "offloading each layer's input to host memory".into(),
        }
    }

    /// How many of `layers` decoder layers, counted from the first, are checkpointed.
    pub fn checkpointed_layers(&self, layers: usize) -> usize {
        match *self {
            Checkpointing::Off => 0,
            Checkpointing::First(n) => n.min(layers),
            Checkpointing::On | Checkpointing::Offload => layers,
        }
    }
}

/// A model ready to run: the network, its tokenizer, and the files it came from.
pub struct LoadedModel {
    pub net: Decoder,
    pub tokenizer: Tokenizer,
    /// config.json as read (written back, with `torch_dtype` updated, when saving merged).
    pub config_json: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
    /// Where the model came from (a directory, a GGUF file, or a Hub id).
    pub source: String,
    /// The LoRA settings of the adapters on the model, if any.
    pub lora: Option<crate::nn::peft::LoraSpec>,
}

impl LoadedModel {
    /// Adds `tokens` to the tokenizer ([`Tokenizer::add_tokens`]) and grows the embeddings and
    /// output head when an id falls past their rows ([`Decoder::grow_vocab`]; a vocabulary
    /// padded beyond the tokenizer, as Qwen's, may hold them already). Before any adapter: the
    /// adapters' shapes follow the vocabulary. Returns the tokens' ids.
    pub fn add_tokens(&mut self, tokens: &[String], special: bool) -> Result<Vec<i64>> {
        anyhow::ensure!(self.lora.is_none(), "add tokens before adding or loading adapters (their shapes follow the vocabulary)");
        let ids = self.tokenizer.add_tokens(tokens, special)?;
        let rows = self.net.embed_tokens.size()[0];
        let needed = ids.iter().max().map_or(0, |m| m + 1);
        if needed > rows {
            self.net.grow_vocab(needed)?;
            self.config_json["vocab_size"] = needed.into();
            tracing::info!("the vocabulary grew from {rows} to {needed} rows for the added tokens (new rows: the mean of the old ones)");
        }
        Ok(ids)
    }
}

/// `"auto" | "cpu" | "cuda" | "cuda:N"` → a libtorch device. In a data-parallel run, `auto` and
/// `cuda` mean this process's GPU, `cuda:LOCAL_RANK`.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => crate::dist::local_cuda_device().unwrap_or(Device::Cpu),
        "cpu" => Device::Cpu,
        "cuda" | "gpu" => {
            if !tch::Cuda::is_available() {
                bail!("device `cuda` requested but CUDA is not available (no GPU, or libtorch_cuda not linked)");
            }
            crate::dist::local_cuda_device().unwrap_or(Device::Cuda(0))
        }
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().with_context(|| format!("invalid device `{s}`"))?;
            let count = tch::Cuda::device_count() as usize;
            if n >= count {
                bail!("device `{s}` requested but {count} CUDA device(s) are visible");
            }
            Device::Cuda(n)
        }
        other => bail!("unknown device `{other}`; valid: auto, cpu, cuda, cuda:N"),
    })
}

/// `"auto" | "fp32" | "fp16" | "bf16"` (and the torch spellings) → a kind; `auto` reads
/// the checkpoint's `torch_dtype`/`dtype`.
pub fn parse_dtype(s: &str, config_dtype: Option<&str>) -> Result<Kind> {
    Ok(match s {
        "auto" => match config_dtype {
            Some("bfloat16") => Kind::BFloat16,
            Some("float16") => Kind::Half,
            _ => Kind::Float,
        },
        "fp32" | "float32" | "float" => Kind::Float,
        "fp16" | "float16" | "half" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("unknown dtype `{other}`; valid: auto, fp32, fp16, bf16"),
    })
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Loads a model directory (config.json + safetensors + tokenizer) or a `.gguf` file.
pub fn load(path: &Path, dtype: &str, device: Device) -> Result<LoadedModel> {
    load_with(path, dtype, device, None)
}

/// [`load`], with the decoder's linear layers quantized as they stream in when `quant` is
/// given, onto one device or split across GPUs.
pub fn load_with(path: &Path, dtype: &str, device: impl Into<DeviceSpec>, quant: Option<&QuantConfig>) -> Result<LoadedModel> {
    load_dir(path, dtype, &device.into(), quant, false)
}

/// A model directory's architecture and tokenizer with freshly initialized weights, as
/// transformers' `from_config` makes them (see [`WeightSource::Random`]); no weights are read.
pub fn init_random(path: &Path, dtype: &str, device: impl Into<DeviceSpec>, quant: Option<&QuantConfig>) -> Result<LoadedModel> {
    load_dir(path, dtype, &device.into(), quant, true)
}

/// Where each part goes: `spec`'s one device, or the decoder balanced over its GPUs by the
/// bytes its weights take in `kind` (or quantized).
fn placement(config: &DecoderConfig, spec: &DeviceSpec, kind: Kind, quant: Option<&QuantConfig>) -> Placement {
    match spec {
        DeviceSpec::One(d) => Placement::single(*d, config.num_hidden_layers),
        DeviceSpec::Split(gpus) => {
            let dense = kind.elt_size_in_bytes() as f64;
            let linear = match quant.map(|q| q.qtype) {
                Some(crate::nn::quant::QuantType::Int8) => 1.0,
                Some(_) => 0.53,
                None => dense,
            };
            let p = Placement::balanced(config, gpus, dense, linear);
            tracing::info!("device auto: {}", p.describe());
            p
        }
    }
}

fn load_dir(path: &Path, dtype: &str, device: &DeviceSpec, quant: Option<&QuantConfig>, random: bool) -> Result<LoadedModel> {
    if path.extension().map(|e| e == "gguf").unwrap_or(false) {
        if random {
            bail!("{}: random_init needs a model directory (config.json + tokenizer), not a GGUF file", path.display());
        }
        return load_gguf(path, dtype, device, quant);
    }
    if !path.is_dir() {
        bail!("{}: no such model directory or .gguf file", path.display());
    }
    let config_path = path.join("config.json");
    if !config_path.exists() {
        bail!("{}: missing config.json", path.display());
    }
    let config_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    let config = DecoderConfig::from_json(&config_json).with_context(|| config_path.display().to_string())?;
    let kind = parse_dtype(dtype, config.dtype.as_deref())?;
    let weights = if random {
        let std = config_json.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        WeightSource::Random { std, seed: 0 }
    } else {
        WeightSource::open_dir(path)?
    };
    let tokenizer = Tokenizer::from_dir(path, config.bos_token_id, config.eos_token_ids.first().copied(), config.pad_token_id)?;
    let generation_config = std::fs::read_to_string(path.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let placement = placement(&config, device, kind, quant);
    let net = Decoder::load_quantized(config, &weights, kind, &placement, quant)?;
    Ok(LoadedModel { net, tokenizer, config_json, generation_config, source: path.display().to_string(), lora: None })
}

fn load_gguf(path: &Path, dtype: &str, device: &DeviceSpec, quant: Option<&QuantConfig>) -> Result<LoadedModel> {
    let import = crate::gguf::import(path)?;
    let config = DecoderConfig::from_json(&import.config).with_context(|| path.display().to_string())?;
    let kind = parse_dtype(dtype, config.dtype.as_deref())?;
    let mut tensors = HashMap::new();
    for (name, shape, data) in &import.tensors {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        tensors.insert(name.clone(), Tensor::from_slice(data).view(shape.as_slice()));
    }
    let files = vec![
        ("tokenizer.json".to_string(), import.tokenizer_json.clone().into_bytes()),
        ("tokenizer_config.json".to_string(), serde_json::to_vec_pretty(&import.tokenizer_config)?),
    ];
    let tokenizer = Tokenizer::from_files(files, &path.display().to_string(), config.bos_token_id, config.eos_token_ids.first().copied(), config.pad_token_id)?;
    let placement = placement(&config, device, kind, quant);
    let net = Decoder::load_quantized(config, &WeightSource::Memory(tensors), kind, &placement, quant)?;
    Ok(LoadedModel {
        net,
        tokenizer,
        config_json: import.config.clone(),
        generation_config: Some(import.generation_config.clone()),
        source: path.display().to_string(),
        lora: None,
    })
}
