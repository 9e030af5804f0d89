//! Export to llama.cpp and Ollama: a model (adapters merged, one tensor at a time) as a GGUF
//! file with llama.cpp's tensor names and metadata keys as its `convert_hf_to_gguf.py` writes
//! them, quantized as `llama-quantize` would; a LoRA adapter as a GGUF LoRA file (the layout of
//! `convert_lora_to_gguf.py`); and an Ollama `Modelfile`.

use super::quants::{quantize, QuantType};
use super::write::GgufWriter;
use super::GgufValue as V;
use crate::models::LoadedModel;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tch::Kind;

/// What a whole-model export stores its weights as: the converter's `--outtype` (`f32`,
/// `f16`, `bf16`, `q8_0`) or a `llama-quantize` file type (`q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

pub const FILE_TYPES: &[&str] = &["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"];

impl FileType {
    pub fn parse(s: &str) -> Result<FileType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => FileType::F32,
            "f16" => FileType::F16,
            "bf16" => FileType::BF16,
            "q8_0" => FileType::Q8_0,
            "q4_0" => FileType::Q4_0,
            "q4_k_m" => FileType::Q4KM,
            "q5_k_m" => FileType::Q5KM,
            "q6_k" => FileType::Q6K,
            _ => bail!("unknown GGUF quant `{s}`; valid: {}", FILE_TYPES.join(", ")),
        })
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q4KM => 15,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most weights get.
    fn base(self) -> QuantType {
        match self {
            FileType::F32 => QuantType::F32,
            FileType::F16 => QuantType::F16,
            FileType::BF16 => QuantType::BF16,
            FileType::Q8_0 => QuantType::Q8_0,
            FileType::Q4_0 => QuantType::Q4_0,
            FileType::Q4KM => QuantType::Q4_K,
            FileType::Q5KM => QuantType::Q5_K,
            FileType::Q6K => QuantType::Q6_K,
        }
    }

    /// Made by `llama-quantize` (rather than by the converter directly).
    fn by_quantize(self) -> bool {
        matches!(self, FileType::Q4_0 | FileType::Q4KM | FileType::Q5KM | FileType::Q6K)
    }
}

/// How one family is written: llama.cpp's architecture name, whether q/k rows are permuted
/// into llama.cpp's interleaved rotary order, and whether norms are stored as `1 + w` (Gemma,
/// whose norms scale by `1 + w`, for llama.cpp's plain RMS norm).
struct Arch {
    name: &'static str,
    permute_qk: bool,
    norm_plus_one: bool,
}

impl Arch {
    /// The heads whose rows [`super::permute_rotary_rows`] reorders in tensor `gguf_name` (q's
    /// heads for `attn_q`, the key/value heads for `attn_k`), when the family needs it.
    fn rotary_heads(&self, gguf_name: &str, cfg: &crate::models::config::DecoderConfig) -> Option<usize> {
        if !self.permute_qk {
            None
        } else if gguf_name.contains(".attn_q.") {
            Some(cfg.num_attention_heads)
        } else if gguf_name.contains(".attn_k.") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        }
    }
}

fn arch_of(architecture: &str) -> Result<Arch> {
    let arch = |name, permute_qk, norm_plus_one| Arch { name, permute_qk, norm_plus_one };
    Ok(match architecture {
        "LlamaForCausalLM" | "MistralForCausalLM" => arch("llama", true, false),
        "Qwen2ForCausalLM" => arch("qwen2", false, false),
        "Qwen3ForCausalLM" => arch("qwen3", false, false),
        "Gemma2ForCausalLM" => arch("gemma2", false, true),
        "Gemma3ForCausalLM" => arch("gemma3", false, true),
        "Qwen3MoeForCausalLM" => arch("qwen3moe", false, false),
        other => bail!("GGUF export of {other} is not supported; supported: Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3"),
    })
}

/// The GGUF name of a transformers tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`). With sandwich norms (Gemma 2/3) `post_attention_layernorm` is the
/// attention output's norm, and the MLP's input norm is `pre_feedforward_layernorm`.
pub fn gguf_tensor_name(hf: &str, sandwich: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if sandwich => "post_attention_norm",
        "post_attention_layernorm" | "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "mlp.experts_gate" => "ffn_gate_exps",
        "mlp.experts_up" => "ffn_up_exps",
        "mlp.experts_down" => "ffn_down_exps",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The type a tensor is stored as. `row` is its row length (`ne[0]`), `n_dims` its rank.
/// The converter keeps 1-D tensors, norms and biases in F32 and writes the rest as the
/// `--outtype`, falling back to F16 when a row is not whole blocks. `llama-quantize`
/// (`llama_tensor_get_type`) gives the output head (the tied embeddings when there is none)
/// Q6_K, or Q8_0 when its row is not whole 256-blocks; Q4_K_M and Q5_K_M give Q6_K to
/// `attn_v` and `ffn_down` in the layers [`use_more_bits`] picks; a K-quant that does not fit a
/// row falls back to Q5_0 (for Q4_K), Q5_1 (Q5_K), Q8_0 (Q6_K), and to F16 if that fails too.
fn tensor_type(ft: FileType, name: &str, n_dims: usize, row: usize, tied: bool, layer: Option<(usize, usize)>) -> QuantType {
    if n_dims <= 1 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
        return QuantType::F32;
    }
    let base = ft.base();
    if !ft.by_quantize() {
        return if row.is_multiple_of(base.block_size()) { base } else { QuantType::F16 };
    }
    let mut ty = base;
    let is_head = name == "output.weight" || (tied && name == "token_embd.weight");
    if is_head {
        ty = if !row.is_multiple_of(base.block_size()) { QuantType::Q8_0 } else { QuantType::Q6_K };
    } else if matches!(ft, FileType::Q4KM | FileType::Q5KM) && (name.contains(".attn_v.") || name.contains(".ffn_down.")) {
        if let Some((i, n)) = layer {
            if use_more_bits(i, n) {
                ty = QuantType::Q6_K;
            }
        }
    }
    if !row.is_multiple_of(ty.block_size()) {
        ty = match ty {
            QuantType::Q4_K => QuantType::Q5_0,
            QuantType::Q5_K => QuantType::Q5_1,
            QuantType::Q6_K => QuantType::Q8_0,
            other => other,
        };
        if !row.is_multiple_of(ty.block_size()) {
            ty = QuantType::F16;
        }
    }
    ty
}

/// llama.cpp's choice of the layers that get more bits: the first and last eighth, and every
/// third layer between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

fn layer_of(gguf_name: &str) -> Option<usize> {
    gguf_name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn u32v(x: usize) -> V {
    V::U32(x as u32)
}

fn strings(v: Vec<String>) -> V {
    V::Array(v.into_iter().map(V::String).collect())
}

/// Writes `m` (adapters merged) to `path` as a GGUF file of file type `ft`.
pub fn save_gguf(m: &LoadedModel, path: &Path, ft: FileType) -> Result<()> {
    let cfg = &m.net.config;
    let arch = arch_of(&cfg.architecture)?;
    let mut w = GgufWriter::new();
    w.set("general.architecture", V::String(arch.name.into()));
    w.set("general.type", V::String("model".into()));
    general_metadata(&mut w, m);
    hparams(&mut w, m, &arch, ft);
    tokenizer_metadata(&mut w, m, &arch)?;

    if let Some(factors) = llama3_rope_factors(m) {
        let n = factors.len();
        w.add_tensor("rope_freqs.weight", &[n], QuantType::F32, Box::new(move || Ok(quantize(QuantType::F32, &factors))))?;
    }
    let tensors = crate::models::save::merged_tensors(m, Kind::Float);
    let tied = m.net.lm_head.is_none();
    let n_layers = cfg.num_hidden_layers;
    if let Some(moe) = &cfg.moe {
        // llama.cpp's qwen3moe: every layer sparse, the top-k probabilities renormalized
        if moe.sparse_layers.iter().any(|s| !s) {
            bail!("GGUF export: llama.cpp's qwen3moe has no dense layers among the sparse ones (this model's mlp_only_layers / decoder_sparse_step make some dense)");
        }
        if !moe.norm_topk_prob {
            bail!("GGUF export: llama.cpp's qwen3moe renormalizes the top-k routing weights, and this model does not (norm_topk_prob: false)");
        }
    }
    let expert_stacks = expert_stacks(m);
    for (hf, shape, make) in tensors.into_iter().filter(|(hf, _, _)| !hf.contains(".mlp.experts.")).chain(expert_stacks) {
        let name = gguf_tensor_name(&hf, cfg.sandwich_norms).ok_or_else(|| anyhow!("tensor {hf} has no llama.cpp name"))?;
        let plus_one = arch.norm_plus_one && name.ends_with("norm.weight");
        let row = *shape.last().unwrap();
        let layer = layer_of(&name).map(|i| (i, n_layers));
        let ty = tensor_type(ft, &name, shape.len(), row, tied, layer);
        let heads = arch.rotary_heads(&name, cfg);
        let rows = shape[0];
        w.add_tensor(&name, &shape, ty, Box::new(move || {
            let t = make().to_kind(Kind::Float).contiguous();
            let mut data = Vec::<f32>::try_from(t.flatten(0, -1))?;
            if let Some(h) = heads {
                data = super::permute_rotary_rows(&data, rows, h, true)?;
            }
            if plus_one {
                data.iter_mut().for_each(|x| *x += 1.0);
            }
            Ok(quantize(ty, &data))
        }))?;
    }
    w.write(path).with_context(|| format!("cannot write {}", path.display()))
}

/// Each sparse layer's experts as llama.cpp stacks them, adapters merged: `ffn_gate_exps`,
/// `ffn_up_exps` `[E, I, H]` and `ffn_down_exps` `[E, H, I]` (under pseudo transformers names
/// that [`gguf_tensor_name`] maps).
fn expert_stacks(m: &LoadedModel) -> Vec<crate::models::save::LazyTensor<'_>> {
    let mut v: Vec<crate::models::save::LazyTensor<'_>> = vec![];
    for (l, layer) in m.net.layers.iter().enumerate() {
        let Some(block) = layer.mlp.sparse() else { continue };
        let (e, i2, h) = block.experts.gate_up.size3().unwrap();
        let i = i2 / 2;
        for (proj, shape) in [("gate", [e, i, h]), ("up", [e, i, h]), ("down", [e, h, i])] {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            v.push((format!("model.layers.{l}.mlp.experts_{proj}.weight"), shape, Box::new(move || match proj {
                "gate" => block.merged_rows(false, 0, i),
                "up" => block.merged_rows(false, i, i),
                _ => block.merged_rows(true, 0, h),
            })));
        }
    }
    v
}

/// The rope parameters of config.json (`rope_scaling`, or transformers 5's `rope_parameters`,
/// the full-attention layers' when they are per layer type).
fn rope_params(json: &Value) -> Option<&Value> {
    let p = json.get("rope_scaling").filter(|v| v.is_object()).or_else(|| json.get("rope_parameters").filter(|v| v.is_object()))?;
    Some(p.get("full_attention").unwrap_or(p))
}

/// Llama 3's rope scaling as llama.cpp takes it: a `rope_freqs.weight` of one factor per
/// frequency `f_i = θ^(-2i/d)` that divides it: 1 for wavelengths `2π/f` below
/// `L/high_freq_factor`, `factor` above `L/low_freq_factor`, and between them
/// `1 / ((1 - s)/factor + s)` with `s = (L·f/2π - low) / (high - low)`
/// (`L = original_max_position_embeddings`).
fn llama3_rope_factors(m: &LoadedModel) -> Option<Vec<f32>> {
    let p = rope_params(&m.config_json)?;
    if p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).map(|t| t.to_lowercase()) != Some("llama3".into()) {
        return None;
    }
    let get = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let base = p.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(m.net.config.rope_theta) as f32;
    let (factor, low, high, old_ctx) = (get("factor", 8.0), get("low_freq_factor", 1.0), get("high_freq_factor", 4.0), get("original_max_position_embeddings", 8192.0));
    let dim = m.net.config.head_dim;
    Some(
        (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf((2 * i) as f32 / dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < old_ctx / high {
                    1.0
                } else if wavelen > old_ctx / low {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

/// `general.name`: the model's folder, or its file without `.gguf` (a Hub id keeps its last
/// part). The converter derives more naming keys (basename, size label, ...) from folder names
/// and model cards; llama.cpp reads none of them.
fn general_metadata(w: &mut GgufWriter, m: &LoadedModel) {
    let source = Path::new(&m.source);
    let name = if source.extension().is_some_and(|e| e == "gguf") { source.file_stem() } else { source.file_name() };
    let name = name.map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    if !name.is_empty() {
        w.set("general.name", V::String(name));
    }
}

/// The architecture's hyperparameters (`{arch}.*`) as the converter writes them: the keys every
/// family has (RoPE base only where config.json names one; the sliding layers' own base as
/// `rope.freq_base_swa`), Llama's vocabulary size and rotary dimensions, RoPE scaling, and
/// Gemma's own keys (Gemma 2 lists its keys itself and leaves the RoPE base to llama.cpp's
/// default; both write soft-caps and the sliding window).
fn hparams(w: &mut GgufWriter, m: &LoadedModel, arch: &Arch, ft: FileType) {
    let cfg = &m.net.config;
    let json = &m.config_json;
    let k = |s: &str| format!("{}.{s}", arch.name);
    let f32v = |x: f64| V::F32(x as f32);
    let rope = rope_params(json);
    let theta = rope.and_then(|p| p.get("rope_theta")).or_else(|| json.get("rope_theta")).and_then(|t| t.as_f64());
    let head_dim_given = json.get("head_dim").map(|h| !h.is_null()).unwrap_or(false);
    w.set(&k("block_count"), u32v(cfg.num_hidden_layers));
    w.set(&k("context_length"), u32v(cfg.max_position_embeddings));
    w.set(&k("embedding_length"), u32v(cfg.hidden_size));
    w.set(&k("feed_forward_length"), u32v(cfg.intermediate_size));
    w.set(&k("attention.head_count"), u32v(cfg.num_attention_heads));
    w.set(&k("attention.head_count_kv"), u32v(cfg.num_key_value_heads));
    if arch.name != "gemma2" {
        if let Some(t) = theta {
            w.set(&k("rope.freq_base"), f32v(t));
        }
        if let Some(t) = json.pointer("/rope_parameters/sliding_attention/rope_theta").and_then(|t| t.as_f64()) {
            w.set(&k("rope.freq_base_swa"), f32v(t));
        }
    }
    w.set(&k("attention.layer_norm_rms_epsilon"), f32v(cfg.rms_norm_eps));
    if head_dim_given || arch.name == "gemma2" {
        w.set(&k("attention.key_length"), u32v(cfg.head_dim));
        w.set(&k("attention.value_length"), u32v(cfg.head_dim));
    }
    w.set("general.file_type", V::U32(ft.id()));
    if let Some(moe) = &cfg.moe {
        w.set(&k("expert_count"), u32v(moe.num_experts));
        w.set(&k("expert_used_count"), u32v(moe.top_k));
        w.set(&k("expert_feed_forward_length"), u32v(moe.intermediate_size));
    }
    match arch.name {
        "llama" => {
            w.set(&k("vocab_size"), u32v(cfg.vocab_size));
            w.set(&k("rope.dimension_count"), u32v(cfg.head_dim));
        }
        "gemma2" | "gemma3" => {
            if let Some(c) = json.get("attn_logit_softcapping").and_then(|c| c.as_f64()) {
                w.set(&k("attn_logit_softcapping"), f32v(c));
            }
            if let Some(c) = json.get("final_logit_softcapping").and_then(|c| c.as_f64()).filter(|&c| c != 0.0) {
                w.set(&k("final_logit_softcapping"), f32v(c));
            }
            if arch.name == "gemma2" || json.get("sliding_window_pattern").and_then(|p| p.as_i64()) != Some(1) {
                if let Some(win) = json.get("sliding_window").and_then(|v| v.as_u64()) {
                    w.set(&k("attention.sliding_window"), V::U32(win as u32));
                }
            }
            if arch.name == "gemma3" {
                w.set(&k("rope.freq_base"), f32v(theta.unwrap_or(1e6)));
                if cfg.sliding_layers.iter().enumerate().any(|(i, &s)| s != ((i + 1) % 6 != 0)) {
                    tracing::warn!("llama.cpp's gemma3 makes every sixth layer global and the rest sliding: this model's layer types differ, and llama.cpp will not compute what it computes");
                }
            }
            let scale = json.get("query_pre_attn_scalar").and_then(|q| q.as_f64());
            if scale.is_some_and(|q| q != cfg.head_dim as f64 && q != (cfg.hidden_size / cfg.num_attention_heads) as f64) {
                tracing::warn!("llama.cpp scales {}'s attention by 1/√head_dim (1/√(hidden/heads) for the 27B): this model's query_pre_attn_scalar {} is not written", arch.name, scale.unwrap());
            }
        }
        _ => {
            if let Some(win) = cfg.sliding_window.filter(|_| cfg.sliding_layers.iter().any(|&s| s)) {
                tracing::warn!("llama.cpp's {} attends over the whole context: beyond {win} tokens it will not compute what the sliding-window model computes", arch.name);
            }
        }
    }
    if let Some(scaling) = rope.filter(|_| arch.name != "gemma2") {
        let ty = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str()).unwrap_or("");
        let factor = scaling.get("factor").and_then(|f| f.as_f64());
        match (ty, factor) {
            ("linear", Some(f)) => {
                w.set(&k("rope.scaling.type"), V::String("linear".into()));
                w.set(&k("rope.scaling.factor"), f32v(f));
            }
            ("yarn", Some(f)) => {
                w.set(&k("rope.scaling.type"), V::String("yarn".into()));
                w.set(&k("rope.scaling.factor"), f32v(f));
                if let Some(o) = scaling.get("original_max_position_embeddings").and_then(|o| o.as_u64()) {
                    w.set(&k("rope.scaling.original_context_length"), V::U32(o as u32));
                }
            }
            _ => {}
        }
    }
    w.set("general.quantization_version", V::U32(2));
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// An added token that llama.cpp should treat as control even when the tokenizer does not
/// mark it special (`<|...|>`, `<pad>`, gemma's `<unused...>`; the converter's rule).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `tokenizer.*` as the converter writes them: `add_space_prefix`, the vocabulary (from the
/// sentencepiece `tokenizer.model` when the model has one, else byte-level BPE from
/// tokenizer.json), then the special ids, which special tokens the tokenizer adds, and the chat
/// template.
fn tokenizer_metadata(w: &mut GgufWriter, m: &LoadedModel, arch: &Arch) -> Result<()> {
    let tj: Value = serde_json::from_slice(m.tokenizer.file("tokenizer.json").ok_or_else(|| anyhow!("the model has no tokenizer.json"))?)
        .context("tokenizer.json: not valid JSON")?;
    let config: Value = m.tokenizer.file("tokenizer_config.json").and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
    let gemma = arch.name.starts_with("gemma");
    if let Some(aps) = config["add_prefix_space"].as_bool().filter(|_| arch.name == "llama") {
        w.set("tokenizer.ggml.add_space_prefix", V::Bool(aps));
    }
    match m.tokenizer.file("tokenizer.model") {
        Some(spm) => sentencepiece_vocab(w, m, spm, &config)?,
        None if gemma => bail!("GGUF export of {}: llama.cpp's Gemma needs the sentencepiece tokenizer.model beside tokenizer.json", m.net.config.architecture),
        None => byte_level_vocab(w, m, &tj, &config)?,
    }
    if gemma {
        w.set("tokenizer.ggml.add_space_prefix", V::Bool(false));
    }
    // special ids: tokenizer_config.json's `{kind}_token` found among tokenizer.json's added
    // tokens, else config.json's `{kind}_token_id`
    let vocab_size = m.net.config.vocab_size as u64;
    for (kind, key) in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("sep", "seperator"), ("pad", "padding"), ("cls", "cls"), ("mask", "mask")] {
        let entry = &config[format!("{kind}_token")];
        let content = entry.as_str().or_else(|| entry["content"].as_str());
        let added = content.and_then(|c| tj["added_tokens"].as_array().into_iter().flatten().find(|t| t["content"] == c)).and_then(|t| t["id"].as_u64());
        let id = added.filter(|&i| i < vocab_size).or_else(|| m.config_json[format!("{kind}_token_id")].as_u64().filter(|&i| i < vocab_size));
        if let Some(id) = id {
            w.set(&format!("tokenizer.ggml.{key}_token_id"), V::U32(id as u32));
        }
    }
    for (kind, add) in special_flags(&tj["post_processor"], &config) {
        w.set(&format!("tokenizer.ggml.add_{kind}_token"), V::Bool(add));
    }
    if let Some(t) = &m.tokenizer.chat_template {
        w.set("tokenizer.chat_template", V::String(t.clone()));
    }
    Ok(())
}

/// Whether an added token is special: tokenizer_config's `added_tokens_decoder` says so, or
/// it looks like a control token.
fn added_is_special(config: &Value, id: usize, content: &str, fallback: bool) -> bool {
    config["added_tokens_decoder"][id.to_string()]["special"].as_bool().unwrap_or(fallback) || looks_special(content)
}

/// A byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`): every id below `vocab_size`
/// (ids the tokenizer lacks as `[PADi]`), token types, `pre`, and the merges.
fn byte_level_vocab(w: &mut GgufWriter, m: &LoadedModel, tj: &Value, config: &Value) -> Result<()> {
    let model = &tj["model"];
    let byte_level = pre_tokenizers(&tj["pre_tokenizer"]).iter().any(|p| p["type"] == "ByteLevel");
    if model["type"].as_str() != Some("BPE") || !byte_level {
        bail!("GGUF export: the tokenizer is neither byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer: Llama 3, Qwen, SmolLM) nor sentencepiece (a tokenizer.model beside it: Llama 2, Mistral 7B)");
    }
    let vocab_size = m.net.config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    for (tok, id) in model["vocab"].as_object().ok_or_else(|| anyhow!("tokenizer.json: model.vocab is not a map"))? {
        let id = id.as_u64().unwrap_or(u64::MAX) as usize;
        if id < vocab_size {
            tokens[id] = Some(tok.clone());
        }
    }
    for added in tj["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().unwrap_or(u64::MAX) as usize;
        let Some(content) = added["content"].as_str() else { continue };
        if id >= vocab_size {
            continue;
        }
        tokens[id] = Some(content.to_string());
        types[id] = if added_is_special(config, id, content, added["special"].as_bool().unwrap_or(false)) { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| {
            types[i] = USER_DEFINED;
            format!("[PAD{i}]")
        }))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mg| match mg {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")),
            _ => String::new(),
        })
        .collect();
    w.set("tokenizer.ggml.model", V::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", V::String(pre_tokenizer_name(m, tj)?));
    w.set("tokenizer.ggml.tokens", strings(tokens));
    w.set("tokenizer.ggml.token_type", V::Array(types.into_iter().map(V::I32).collect()));
    w.set("tokenizer.ggml.merges", strings(merges));
    Ok(())
}

/// A sentencepiece vocabulary (`tokenizer.ggml.model = "llama"`) from `tokenizer.model`:
/// each piece with its score and type (unknown, control, unused and byte pieces keep their
/// type, the rest are normal), ids up to `vocab_size` the model lacks as unused `[PADi]` with
/// score -10000; added_tokens.json's tokens as user-defined, then tokenizer_config.json's added
/// tokens as control or user-defined (`▁` written as a space), both with score -1000.
fn sentencepiece_vocab(w: &mut GgufWriter, m: &LoadedModel, spm: &[u8], config: &Value) -> Result<()> {
    let vocab_size = m.net.config.vocab_size;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, (piece, score, kind)) in sentencepiece_pieces(spm).context("tokenizer.model")?.into_iter().enumerate().take(vocab_size) {
        tokens[id] = piece;
        scores[id] = score;
        types[id] = match kind {
            2 | 3 | 5 | 6 => kind,
            _ => NORMAL,
        };
    }
    let added_json: Value = m.tokenizer.file("added_tokens.json").and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
    for (content, id) in added_json.as_object().into_iter().flatten() {
        if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
            (tokens[id], scores[id], types[id]) = (content.clone(), -1000.0, USER_DEFINED);
        }
    }
    for (id, added) in config["added_tokens_decoder"].as_object().into_iter().flatten() {
        let (Ok(id), Some(content)) = (id.parse::<usize>(), added["content"].as_str()) else { continue };
        if id >= vocab_size {
            continue;
        }
        if added_is_special(config, id, content, false) {
            types[id] = CONTROL;
            tokens[id] = content.to_string();
        } else {
            types[id] = USER_DEFINED;
            tokens[id] = content.replace('\u{2581}', " ");
        }
        scores[id] = -1000.0;
    }
    w.set("tokenizer.ggml.model", V::String("llama".into()));
    w.set("tokenizer.ggml.pre", V::String("default".into()));
    w.set("tokenizer.ggml.tokens", strings(tokens));
    w.set("tokenizer.ggml.scores", V::Array(scores.into_iter().map(V::F32).collect()));
    w.set("tokenizer.ggml.token_type", V::Array(types.into_iter().map(V::I32).collect()));
    Ok(())
}

/// The pieces of a sentencepiece model, `(piece, score, type)`: the protobuf `ModelProto`'s
/// repeated field 1, each a `SentencePiece { piece = 1 (string), score = 2 (float), type = 3
/// (enum, NORMAL = 1 when absent) }`; every other field is skipped by its wire type.
fn sentencepiece_pieces(bytes: &[u8]) -> Result<Vec<(String, f32, i32)>> {
    fn varint(b: &[u8], at: &mut usize) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at).ok_or_else(|| anyhow!("truncated varint"))?;
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint too long")
    }
    /// Each field of a message: (number, wire type, its bytes: the varint's value as 8 LE bytes, or the payload).
    fn fields(b: &[u8]) -> Result<Vec<(u64, u64, &[u8], u64)>> {
        let mut out = vec![];
        let mut at = 0;
        while at < b.len() {
            let key = varint(b, &mut at)?;
            let (field, wire) = (key >> 3, key & 7);
            let (payload, value): (&[u8], u64) = match wire {
                0 => (&[], varint(b, &mut at)?),
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    let p = b.get(at..at + n).ok_or_else(|| anyhow!("truncated field {field}"))?;
                    at += n;
                    (p, 0)
                }
                2 => {
                    let n = varint(b, &mut at)? as usize;
                    let p = b.get(at..at + n).ok_or_else(|| anyhow!("truncated field {field}"))?;
                    at += n;
                    (p, 0)
                }
                _ => bail!("unsupported protobuf wire type {wire} (field {field})"),
            };
            out.push((field, wire, payload, value));
        }
        Ok(out)
    }
    let mut pieces = vec![];
    for (field, wire, payload, _) in fields(bytes)? {
        if field != 1 || wire != 2 {
            continue;
        }
        let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1i32);
        for (f, w, p, v) in fields(payload)? {
            match (f, w) {
                (1, 2) => piece = String::from_utf8(p.to_vec()).map_err(|_| anyhow!("a piece is not UTF-8"))?,
                (2, 5) => score = f32::from_le_bytes(p.try_into().unwrap()),
                (3, 0) => kind = v as i32,
                _ => {}
            }
        }
        pieces.push((piece, score, kind));
    }
    if pieces.is_empty() {
        bail!("no sentencepiece pieces (not a sentencepiece model file?)");
    }
    Ok(pieces)
}

/// Which special tokens the tokenizer adds around a text (`add_bos`, `add_eos`, `add_sep`), as
/// the converter reads them: from tokenizer.json's post-processor first (a `TemplateProcessing`
/// whose single-text template starts with the BOS (or CLS) token adds BOS, one that ends with a
/// special token adds EOS, a special token between the pair's two texts is a separator;
/// `RobertaProcessing` adds all three; `ByteLevel` none), then tokenizer_config.json's
/// `add_{kind}_token` for the kinds the post-processor left open.
fn special_flags(post: &Value, config: &Value) -> Vec<(&'static str, bool)> {
    let token = |k: &str| config[k].as_str().or_else(|| config[k]["content"].as_str()).map(str::to_string);
    let (bos, cls, eos, sep) = (token("bos_token"), token("cls_token"), token("eos_token"), token("sep_token"));
    let special = |item: &Value| item["SpecialToken"]["id"].as_str().map(str::to_string);
    let mut flags: Vec<(&'static str, bool)> = vec![];
    let set = |flags: &mut Vec<(&'static str, bool)>, kind: &'static str, v: bool, overwrite: bool| match flags.iter_mut().find(|(k, _)| *k == kind) {
        Some(f) if overwrite => f.1 = v,
        Some(_) => {}
        None => flags.push((kind, v)),
    };
    let processors: Vec<&Value> = match post["processors"].as_array() {
        Some(ps) => ps.iter().collect(),
        None if post.is_object() => vec![post],
        None => vec![],
    };
    for p in processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                set(&mut flags, "bos", false, false);
                set(&mut flags, "eos", false, false);
            }
            Some("RobertaProcessing") => ["bos", "eos", "sep"].into_iter().for_each(|k| set(&mut flags, k, true, true)),
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                let (mut first, mut last) = (None, None);
                if single.len() > 1 {
                    first = special(&single[0]);
                    if let Some(f) = &first {
                        set(&mut flags, "bos", bos.is_none() || Some(f) == bos.as_ref() || Some(f) == cls.as_ref(), true);
                    }
                    last = special(&single[single.len() - 1]);
                    if last.is_some() {
                        set(&mut flags, "eos", true, true);
                    }
                }
                let pair = p["pair"].as_array().cloned().unwrap_or_default();
                let start = usize::from(first.is_some() && pair.first().and_then(special) == first);
                let stop = pair.len() - usize::from(last.is_some() && pair.last().and_then(special) == last);
                let inner = if start < stop { &pair[start..stop] } else { &[][..] };
                let seq = |i: &Value| i["Sequence"]["id"].as_str().map(str::to_string);
                if inner.len() > 2 && seq(&inner[0]).as_deref() == Some("A") && seq(&inner[inner.len() - 1]).as_deref() == Some("B") {
                    let middle = &inner[1..inner.len() - 1];
                    let separates = |i: &Value| special(i).is_some_and(|t| Some(&t) == sep.as_ref() || Some(&t) == eos.as_ref());
                    let add_sep = (separates(&middle[0]) && last.is_none()) || (middle.len() == 2 && separates(&middle[1]));
                    set(&mut flags, "sep", add_sep, true);
                }
            }
            _ => {}
        }
    }
    for kind in ["bos", "eos", "unk", "sep", "pad", "cls", "mask"] {
        if let Some(v) = config[format!("add_{kind}_token")].as_bool() {
            set(&mut flags, kind, v, false);
        }
    }
    flags
}

fn pre_tokenizers(p: &Value) -> Vec<&Value> {
    match p["type"].as_str() {
        Some("Sequence") => p["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        Some(_) => vec![p],
        None => vec![],
    }
}

/// The GPT-2 regex of byte-level BPE (`ByteLevel` with `use_regex`).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The split regexes of the pre-tokenizers llama.cpp names (its `tokenizer.ggml.pre`).
const PRE_REGEXES: &[(&str, &str)] = &[
    ("llama-bpe", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ("qwen2", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
];

/// `tokenizer.ggml.pre`: which of llama.cpp's pre-tokenizers splits text as the tokenizer does.
/// As llama.cpp's converter does, by the sha256 of the ids (printed as a Python list) the
/// tokenizer gives its probe text, looked up in the converter's table
/// (`llama_cpp_pre.json`); a tokenizer the table lacks, by the structure of tokenizer.json's
/// `pre_tokenizer`.
fn pre_tokenizer_name(m: &LoadedModel, tokenizer_json: &Value) -> Result<String> {
    use sha2::{Digest, Sha256};
    let known: Value = serde_json::from_str(include_str!("llama_cpp_pre.json")).expect("llama_cpp_pre.json");
    let ids = m.tokenizer.encode(known["chktxt"].as_str().unwrap_or_default(), true)?;
    let printed = format!("[{}]", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "));
    let hash: String = Sha256::digest(printed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    match known["table"].as_array().into_iter().flatten().find(|e| e[0] == hash.as_str()) {
        Some(e) => Ok(e[1].as_str().unwrap_or_default().to_string()),
        None => pre_tokenizer_by_structure(tokenizer_json),
    }
}

/// The pre-tokenizer's name from its structure: the GPT-2 regex alone is `gpt-2`; single
/// digits, then GPT-2, is `smollm`; a `Split` by a known regex before a regex-free `ByteLevel`
/// is that regex's name (Llama 3's `llama-bpe`, Qwen's `qwen2`).
fn pre_tokenizer_by_structure(tokenizer_json: &Value) -> Result<String> {
    let parts = pre_tokenizers(&tokenizer_json["pre_tokenizer"]);
    let byte_level_regex = |p: &Value| p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true);
    let digits = |p: &Value| p["type"] == "Digits" && p["individual_digits"].as_bool() == Some(true);
    let split_regex = |p: &Value| -> Option<String> {
        (p["type"] == "Split").then(|| p["pattern"]["Regex"].as_str().map(str::to_string)).flatten()
    };
    let name = match parts.as_slice() {
        [b] if byte_level_regex(b) => Some("gpt-2"),
        [d, b] if digits(d) && byte_level_regex(b) => Some("smollm"),
        [s, b] if b["type"] == "ByteLevel" && !byte_level_regex(b) => split_regex(s).and_then(|r| {
            if r == GPT2_REGEX {
                return Some("gpt-2");
            }
            PRE_REGEXES.iter().find(|(_, re)| *re == r).map(|(n, _)| *n)
        }),
        _ => None,
    };
    name.map(str::to_string).ok_or_else(|| {
        anyhow!("GGUF export: tokenizer.json's pre_tokenizer {} is not one llama.cpp names (known: gpt-2, smollm, {})", tokenizer_json["pre_tokenizer"], PRE_REGEXES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
    })
}

/// The GGUF LoRA adapter of `m` (llama.cpp's `convert_lora_to_gguf.py` layout): `general.type
/// = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted weight
/// `{name}.lora_a` `[r, in]` and `{name}.lora_b` `[out, r]` in F32 (B's rows permuted like
/// the weight's for q/k). llama.cpp scales by `alpha / r`; each module's own scale is folded
/// into its B, so per-module ranks and rsLoRA come out exact.
pub fn save_gguf_adapter(m: &LoadedModel, path: &Path) -> Result<()> {
    let spec = m.lora.as_ref().ok_or_else(|| anyhow!("the model has no LoRA adapters (add_lora or load_adapter first)"))?;
    if m.net.embeddings_train() || m.net.linears().iter().any(|l| matches!(l.adapter, Some(crate::nn::Adapter::Copy(_)))) {
        bail!("trainable token rows and modules_to_save have no GGUF LoRA form: export the model with the adapter merged, model.save_gguf(path)");
    }
    if spec.use_dora {
        bail!("a DoRA adapter has no GGUF LoRA form (llama.cpp applies plain LoRA only): export the model with the adapter merged, model.save_gguf(path)");
    }
    let cfg = &m.net.config;
    let arch = arch_of(&cfg.architecture)?;
    let mut w = GgufWriter::new();
    w.set("general.architecture", V::String(arch.name.into()));
    w.set("general.type", V::String("adapter".into()));
    general_metadata(&mut w, m);
    w.set("adapter.type", V::String("lora".into()));
    w.set("adapter.lora.alpha", V::F32(spec.alpha as f32));
    w.set("general.quantization_version", V::U32(2));
    let alpha = spec.alpha;
    for lin in m.net.linears() {
        let Some(lora) = lin.lora() else { continue };
        let name = gguf_tensor_name(&format!("{}.weight", lin.name), cfg.sandwich_norms).ok_or_else(|| anyhow!("{} has no llama.cpp name", lin.name))?;
        let r = lora.a.size()[0] as usize;
        let (out, inp) = (lin.out_features() as usize, lin.in_features() as usize);
        let heads = arch.rotary_heads(&name, cfg);
        let a = lora.a.shallow_clone();
        w.add_tensor(&format!("{name}.lora_a"), &[r, inp], QuantType::F32, Box::new(move || {
            let data = Vec::<f32>::try_from(a.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous().flatten(0, -1))?;
            Ok(quantize(QuantType::F32, &data))
        }))?;
        let b = lora.b.shallow_clone();
        let fold = lora.scale * r as f64 / alpha;
        w.add_tensor(&format!("{name}.lora_b"), &[out, r], QuantType::F32, Box::new(move || {
            let b = (b.detach().to_kind(Kind::Double) * fold).to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
            let mut data = Vec::<f32>::try_from(b.flatten(0, -1))?;
            if let Some(h) = heads {
                data = super::permute_rotary_rows(&data, out, h, true)?;
            }
            Ok(quantize(QuantType::F32, &data))
        }))?;
    }
    w.write(path).with_context(|| format!("cannot write {}", path.display()))
}

/// An Ollama `Modelfile` for the GGUF file `gguf_name` (beside it): `FROM`, the chat template
/// translated to Ollama's Go template where it is a known family (ChatML, Llama 3, Gemma,
/// Mistral `[INST]`; otherwise none, and Ollama falls back to the template in the GGUF), the
/// stop strings, and the sampling `PARAMETER`s of generation_config.json.
pub fn modelfile(m: &LoadedModel, gguf_name: &str) -> String {
    let mut out = format!("# Ollama: ollama create NAME -f Modelfile\nFROM ./{gguf_name}\n");
    let template = m.tokenizer.chat_template.as_deref().unwrap_or("");
    let (go, stops): (Option<&str>, &[&str]) = if template.contains("<|im_start|>") {
        (Some("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"), &["<|im_start|>", "<|im_end|>"])
    } else if template.contains("<|start_header_id|>") {
        (Some("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"), &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    } else if template.contains("<start_of_turn>") {
        (Some("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"), &["<start_of_turn>", "<end_of_turn>"])
    } else if template.contains("[INST]") {
        (Some("{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"), &["[INST]", "[/INST]"])
    } else {
        (None, &[])
    };
    match go {
        Some(t) => out.push_str(&format!("TEMPLATE \"\"\"{t}\"\"\"\n")),
        None if !template.is_empty() => out.push_str("# the chat template is not one ftscript translates; Ollama reads the one stored in the GGUF\n"),
        None => {}
    }
    let mut stop: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    if let Some(e) = &m.tokenizer.eos_token {
        if !stop.contains(e) {
            stop.push(e.clone());
        }
    }
    for s in stop {
        out.push_str(&format!("PARAMETER stop {}\n", serde_json::to_string(&s).unwrap()));
    }
    if let Some(g) = &m.generation_config {
        for (hf, ollama) in [("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty")] {
            if let Some(v) = g.get(hf).filter(|v| v.is_number()) {
                out.push_str(&format!("PARAMETER {ollama} {v}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_go_to_llama_cpp_and_back() {
        let data: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
        let p = super::super::permute_rotary_rows(&data, 8, 2, true).unwrap();
        assert_ne!(p, data);
        assert_eq!(super::super::permute_rotary_rows(&p, 8, 2, false).unwrap(), data);
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // 30 layers: the first 3, the last 4 (26..), and 5, 8, ..., 23
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(picked, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }
}
