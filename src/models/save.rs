//! Writing a standalone Hugging Face model directory (`save_merged`): config.json,
//! generation_config.json, tokenizer files, and safetensors shards
//! (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when over the shard
//! size, else `model.safetensors`). LoRA adapters are folded in one layer at a time
//! (`W + s·B·A`, or DoRA's rescaled form), so at most one shard of merged weights is held in memory.

use super::LoadedModel;
use crate::nn::weights::{save_safetensors, write_atomic};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The model's tensors with adapters merged, in state-dict order, computed lazily: a 4-bit
/// weight is dequantized (and its adapter folded in) only when its shard is written, so a
/// QLoRA model never exists twice in memory. Each entry: name, shape, maker.
pub(crate) fn merged_tensors(m: &LoadedModel, kind: Kind) -> Vec<LazyTensor<'_>> {
    let net = &m.net;
    let shape = |size: Vec<i64>| -> Vec<usize> { size.into_iter().map(|d| d as usize).collect() };
    let mut v: Vec<LazyTensor<'_>> = vec![];
    let dense = net.state_dict();
    let linear_of = |name: &str| net.linears().into_iter().find(|l| Some(l.name.as_str()) == name.strip_suffix(".weight"));
    let merged = move |lin: &'_ crate::nn::Linear| merged_weight(lin, kind);
    let mut names: Vec<String> = dense.iter().map(|(n, _)| n.clone()).collect();
    for lin in net.linears() {
        if lin.weight.is_quantized() {
            names.push(format!("{}.weight", lin.name));
        }
    }
    for name in names {
        match linear_of(&name) {
            Some(lin) if lin.adapter.is_some() || lin.weight.is_quantized() => {
                v.push((name, shape(lin.weight.size()), Box::new(move || merged(lin))));
            }
            _ if name == "model.embed_tokens.weight" && net.embeddings_train() => {
                v.push((name, shape(net.embed_tokens.size()), Box::new(move || crate::nn::no_grad(|| net.embedding_weight()).to_kind(kind).to_device(Device::Cpu))));
            }
            _ => {
                let t = dense.iter().find(|(n, _)| *n == name).map(|(_, t)| t.shallow_clone()).unwrap();
                // an expert's weight, its slice of the stack's adapter folded in when it has one
                let block = net.layers.iter().filter_map(|l| l.mlp.sparse()).find(|b| name.starts_with(&format!("{}.experts.", b.name)));
                let key = name.clone();
                v.push((
                    name,
                    shape(t.size()),
                    Box::new(move || block.and_then(|b| b.merged(&key)).unwrap_or_else(|| t.detach()).to_kind(kind).to_device(Device::Cpu)),
                ));
            }
        }
    }
    v
}

/// A linear layer's weight in `kind` on the CPU, its adapter (if any) folded in in fp32.
pub(crate) fn merged_weight(lin: &crate::nn::Linear, kind: Kind) -> Tensor {
    let _g = tch::no_grad_guard();
    let w = lin.weight.dense();
    match &lin.adapter {
        Some(a) => a.merged_weight(&w.to_kind(Kind::Float)).to_kind(kind).to_device(Device::Cpu),
        None => w.to_kind(kind).to_device(Device::Cpu),
    }
}

/// A tensor to write: its name, its shape, and how to make it (when its shard is written).
pub(crate) type LazyTensor<'a> = (String, Vec<usize>, Box<dyn Fn() -> Tensor + 'a>);

/// Writes the merged model into `dir` with shards of at most `max_shard_bytes`.
pub fn save_merged(m: &LoadedModel, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    write_model_dir(dir, merged_tensors(m, kind), kind, max_shard_bytes, &m.config_json, m.generation_config.as_ref(), &m.tokenizer)
}

/// Writes a model directory: `tensors` in shards of at most `max_shard_bytes` (with the index
/// when there are several), config.json with its dtype set to `kind`, generation_config.json
/// when given, and the tokenizer's files.
pub(crate) fn write_model_dir(
    dir: &Path,
    tensors: Vec<LazyTensor<'_>>,
    kind: Kind,
    max_shard_bytes: usize,
    config_json: &serde_json::Value,
    generation_config: Option<&serde_json::Value>,
    tokenizer: &crate::tokenizer::Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let elt = kind.elt_size_in_bytes();
    // plan shards by size, in order
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0usize;
    let mut total = 0usize;
    let sizes: Vec<usize> = tensors.iter().map(|(_, shape, _)| shape.iter().product::<usize>() * elt).collect();
    for (i, &sz) in sizes.iter().enumerate() {
        if cur + sz > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().unwrap().push(i);
        cur += sz;
        total += sz;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    for (s, idx) in shards.iter().enumerate() {
        let file = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", s + 1, n) };
        let mut map = BTreeMap::new();
        for &i in idx {
            let (name, _, make) = &tensors[i];
            map.insert(name.clone(), make());
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        save_safetensors(&map, &dir.join(&file), Some(meta.clone()))?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    let mut config = config_json.clone();
    if let Some(obj) = config.as_object_mut() {
        let name = super::dtype_name(kind);
        if obj.contains_key("dtype") || !obj.contains_key("torch_dtype") {
            obj.insert("dtype".into(), name.into());
        }
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), name.into());
        }
    }
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    if let Some(g) = generation_config {
        write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(g)?.as_bytes())?;
    }
    tokenizer.save(dir)?;
    Ok(())
}

/// Writes a 4-bit model in bitsandbytes' serialization (see [`crate::nn::quant::Quant4::bnb_tensors`]):
/// `model.safetensors` with the packed weights and quant states, dense tensors as they are, and
/// config.json with transformers' `quantization_config`, so that
/// `AutoModelForCausalLM.from_pretrained(dir)` loads it as `Linear4bit` layers and ftscript
/// reloads it without quantizing again. LoRA adapters are not included (`save_adapter`).
pub fn save_quantized(m: &LoadedModel, dir: &Path) -> Result<()> {
    use crate::nn::linear::Weight;
    let quantized: Vec<_> = m.net.linears().into_iter().filter_map(|l| match &l.weight { Weight::Quant4(q) => Some((l, q)), _ => None }).collect();
    if m.net.linears().iter().any(|l| matches!(l.weight, Weight::Int8(_))) {
        anyhow::bail!("save_quantized: int8 weights are not saved in bitsandbytes' format yet (use save_merged)");
    }
    let Some((_, first)) = quantized.first() else {
        anyhow::bail!("save_quantized: the model has no 4-bit weights (load it with #{{quantize: \"nf4\"}})");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut map = BTreeMap::new();
    for (name, t) in m.net.state_dict() {
        map.insert(name, t.detach().to_device(Device::Cpu));
    }
    for (lin, q) in &quantized {
        for (k, t) in q.bnb_tensors(&lin.name) {
            map.insert(k, t);
        }
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&map, &dir.join("model.safetensors"), Some(meta))?;
    let skip: Vec<String> = m.net.linears().iter().filter(|l| !l.weight.is_quantized()).map(|l| l.name.clone()).collect();
    let mut config = m.config_json.clone();
    if let Some(obj) = config.as_object_mut() {
        let name = super::dtype_name(m.net.kind);
        obj.insert(if obj.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" }.into(), name.into());
        obj.insert(
            "quantization_config".into(),
            serde_json::json!({
                "quant_method": "bitsandbytes",
                "_load_in_8bit": false,
                "_load_in_4bit": true,
                "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": if skip.is_empty() { serde_json::Value::Null } else { serde_json::json!(skip) },
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "bnb_4bit_quant_type": first.qtype.name(),
                "bnb_4bit_use_double_quant": first.nested.is_some(),
                "bnb_4bit_compute_dtype": name,
                "bnb_4bit_quant_storage": "uint8",
                "load_in_4bit": true,
                "load_in_8bit": false,
            }),
        );
    }
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    if let Some(g) = &m.generation_config {
        write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(g)?.as_bytes())?;
    }
    m.tokenizer.save(dir)?;
    Ok(())
}
