//! Checkpoints: `output_dir/checkpoint-N/` holds the adapter in PEFT format
//! (`adapter_config.json`, `adapter_model.safetensors`), the optimizer moments
//! (`optimizer.safetensors`: `m.<key>`, `v.<key>` per adapter tensor) and `trainer_state.json`
//! (step, data position, loss scale, log history). The directory is written under a temporary
//! name and renamed, so a checkpoint is either complete or absent.

use super::optim::AdamW;
use crate::nn::peft::{self, Adapted, LoraSpec};
use crate::nn::weights::{save_safetensors, write_atomic, WeightSource};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Where training stands; enough to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Current epoch (0-based) and the next micro-batch in it.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// fp16 dynamic loss scale and steps since it last changed.
    pub loss_scale: f64,
    pub good_steps: usize,
    pub log_history: Vec<serde_json::Value>,
}

impl Default for TrainerState {
    fn default() -> Self {
        TrainerState { step: 0, epoch: 0, batch_in_epoch: 0, loss_scale: 1.0, good_steps: 0, log_history: vec![] }
    }
}

fn step_of(dir: &Path) -> Option<usize> {
    dir.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<(usize, PathBuf)> = vec![];
    if output_dir.exists() {
        for e in std::fs::read_dir(output_dir).with_context(|| format!("cannot list {}", output_dir.display()))? {
            let p = e?.path();
            if let Some(n) = step_of(&p) {
                if p.join("trainer_state.json").exists() {
                    v.push((n, p));
                }
            }
        }
    }
    v.sort();
    Ok(v.into_iter().map(|(_, p)| p).collect())
}

/// Removes the half-written checkpoints (`.checkpoint-N.tmp-PID/`) a killed run left in
/// `output_dir`; returns how many.
pub fn remove_partial(output_dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Ok(0) };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output_dir)?.pop())
}

pub fn save(
    output_dir: &Path,
    net: &dyn Adapted,
    spec: &LoraSpec,
    base_model: &str,
    params: &[Tensor],
    opt: &AdamW,
    state: &TrainerState,
    extra: Vec<(String, Tensor)>,
) -> Result<PathBuf> {
    let dir = output_dir.join(format!("checkpoint-{}", state.step));
    let tmp = output_dir.join(format!(".checkpoint-{}.tmp-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    peft::save_adapter(net, spec, base_model, &tmp)?;
    let keys: Vec<String> = peft::adapter_tensors(net).into_iter().map(|(k, _)| k).collect();
    anyhow::ensure!(keys.len() == params.len(), "internal: adapter/parameter count mismatch");
    let mut moments = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        moments.insert(format!("m.{k}"), opt.m[i].shallow_clone());
        moments.insert(format!("v.{k}"), opt.v[i].shallow_clone());
    }
    moments.extend(extra);
    let mut meta = std::collections::HashMap::new();
    meta.insert("adamw_step".to_string(), opt.step.to_string());
    save_safetensors(&moments, &tmp.join("optimizer.safetensors"), Some(meta))?;
    write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    // its files are synced already; the directory's entries and its rename are made durable too
    crate::nn::weights::persist(&tmp, &dir)?;
    tracing::info!("saved checkpoint {}", dir.display());
    Ok(dir)
}

/// Restores adapter weights, optimizer moments and trainer state from `dir` into the live tensors.
pub fn load(dir: &Path, net: &dyn Adapted, params: &[Tensor], opt: &mut AdamW) -> Result<TrainerState> {
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer_state.json")).with_context(|| format!("cannot read {}/trainer_state.json", dir.display()))?,
    )
    .with_context(|| format!("{}/trainer_state.json: invalid", dir.display()))?;
    let adapter = WeightSource::open_files(&[dir.join("adapter_model.safetensors")])?;
    let opt_file = dir.join("optimizer.safetensors");
    let moments = WeightSource::open_files(&[opt_file.clone()])?;
    let keys: Vec<String> = peft::adapter_tensors(net).into_iter().map(|(k, _)| k).collect();
    let _g = tch::no_grad_guard();
    for (i, k) in keys.iter().enumerate() {
        if !adapter.contains(k) && !moments.contains(&format!("adalora.param.{k}")) {
            bail!("{}: checkpoint lacks adapter tensor `{k}` (was it made with other LoRA settings?)", dir.display());
        }
        let mut p = params[i].shallow_clone();
        // a parameter the adapter file holds cut down (AdaLoRA's) is saved whole beside the moments
        let full = format!("adalora.param.{k}");
        let from = if moments.contains(&full) { moments.load(&full, &p.size(), p.kind(), p.device())? } else { adapter.load(k, &p.size(), p.kind(), p.device())? };
        p.copy_(&from);
        opt.m[i].copy_(&moments.load(&format!("m.{k}"), &p.size(), p.kind(), p.device())?);
        opt.v[i].copy_(&moments.load(&format!("v.{k}"), &p.size(), p.kind(), p.device())?);
    }
    let header = std::fs::read(&opt_file)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&header).map_err(|e| anyhow::anyhow!("{}: {e:?}", opt_file.display()))?;
    opt.step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adamw_step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: missing adamw_step metadata", opt_file.display()))?;
    Ok(state)
}

/// Deletes the oldest checkpoints beyond `limit`.
pub fn prune(output_dir: &Path, limit: Option<usize>) -> Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let all = list(output_dir)?;
    if all.len() > limit.max(1) {
        for d in &all[..all.len() - limit.max(1)] {
            std::fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
    }
    Ok(())
}
