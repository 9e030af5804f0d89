//! Writing a standalone Hugging Face model directory (`save_merged`): config.json,
//! generation_config.json, tokenizer files, and safetensors shards
//! (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when over the shard
//! size, else `model.safetensors`). LoRA adapters are folded in one layer at a time
//! (`W + s·B·A`), so at most one shard of merged weights is held in memory.

use super::LoadedModel;
use crate::nn::weights::{save_safetensors, write_atomic};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The model's tensors with adapters merged, in state-dict order, computed lazily.
fn merged_tensors(m: &LoadedModel, kind: Kind) -> Vec<(String, Box<dyn Fn() -> Tensor + '_>)> {
    let net = &m.net;
    let mut v: Vec<(String, Box<dyn Fn() -> Tensor + '_>)> = vec![];
    for (name, t) in net.state_dict() {
        let module = name.strip_suffix(".weight").unwrap_or("");
        let lin = net.linears().into_iter().find(|l| l.name == module && l.lora.is_some());
        match lin {
            Some(lin) => v.push((
                name,
                Box::new(move || {
                    let _g = tch::no_grad_guard();
                    let l = lin.lora.as_ref().unwrap();
                    (lin.weight.to_kind(Kind::Float) + l.merged_delta().to_kind(Kind::Float)).to_kind(kind).to_device(Device::Cpu)
                }),
            )),
            None => v.push((name, Box::new(move || t.detach().to_kind(kind).to_device(Device::Cpu)))),
        }
    }
    v
}

/// Writes the merged model into `dir` with shards of at most `max_shard_bytes`.
pub fn save_merged(m: &LoadedModel, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = merged_tensors(m, kind);
    let elt = kind.elt_size_in_bytes();
    // plan shards by size, in order
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0usize;
    let mut total = 0usize;
    let sizes: Vec<usize> = m.net.state_dict().iter().map(|(_, t)| t.numel() * elt).collect();
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
            let (name, make) = &tensors[i];
            map.insert(name.clone(), make());
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        save_safetensors(&map, &dir.join(&file), Some(meta.clone()))?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    let mut config = m.config_json.clone();
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
    if let Some(g) = &m.generation_config {
        write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(g)?.as_bytes())?;
    }
    m.tokenizer.save(dir)?;
    Ok(())
}
