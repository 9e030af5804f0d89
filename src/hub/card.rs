//! The model card (`README.md` with YAML front matter) `hub_push` writes when the folder has
//! none: `base_model`, `library_name` (`peft` for an adapter folder, `transformers` for a model),
//! tags, the LoRA settings and hyper-parameters, and the final metrics of the run the folder
//! came from (`metrics.jsonl` / `checkpoint-*/trainer_state.json` in it or its parent).

use serde_json::Value;
use std::path::{Path, PathBuf};

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// `org/name` for a base model given as a Hub id or a path into the Hub cache
/// (`.../models--org--name/snapshots/<commit>`); `None` for other local paths.
pub fn base_model_id(base: &str) -> Option<String> {
    for comp in Path::new(base).components().rev() {
        if let Some(rest) = comp.as_os_str().to_str().and_then(|c| c.strip_prefix("models--")) {
            let id = rest.replacen("--", "/", 1);
            return super::is_repo_id(&id).then_some(id);
        }
    }
    (super::is_repo_id(base) && !Path::new(base).exists()).then(|| base.to_string())
}

/// The last `metrics.jsonl` record holding `key` (in `dir` or its parent).
fn metrics_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![dir.join("metrics.jsonl")];
    if let Some(p) = dir.parent() {
        v.push(p.join("metrics.jsonl"));
    }
    v.into_iter().filter(|p| p.exists()).collect()
}

/// Final metrics: the last value of each numeric key across the run's log (metrics.jsonl, or
/// the newest trainer_state.json's log_history).
fn final_metrics(dir: &Path) -> Vec<(String, Value)> {
    let mut records: Vec<Value> = vec![];
    if let Some(p) = metrics_files(dir).first() {
        if let Ok(s) = std::fs::read_to_string(p) {
            records = s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        }
    }
    if records.is_empty() {
        if let Some(state) = trainer_state(dir) {
            records = state["log_history"].as_array().cloned().unwrap_or_default();
        }
    }
    let mut out: Vec<(String, Value)> = vec![];
    for r in records {
        for (k, v) in r.as_object().into_iter().flatten() {
            if !v.is_number() || matches!(k.as_str(), "step" | "epoch" | "elapsed_sec" | "tokens_per_sec" | "lr" | "grad_norm" | "loss_scale") {
                continue;
            }
            match out.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
    }
    out
}

/// The newest `checkpoint-N/trainer_state.json` in `dir`, its parent, or `dir` itself.
fn trainer_state(dir: &Path) -> Option<Value> {
    if let Some(v) = read_json(&dir.join("trainer_state.json")) {
        return Some(v);
    }
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let mut ckpts: Vec<(usize, PathBuf)> = std::fs::read_dir(d)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| Some((p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()?, p)))
            .collect();
        ckpts.sort();
        if let Some((_, p)) = ckpts.last() {
            if let Some(v) = read_json(&p.join("trainer_state.json")) {
                return Some(v);
            }
        }
    }
    None
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a valid YAML double-quoted scalar
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.6}").trim_end_matches('0').trim_end_matches('.').to_string(),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The card for the folder `dir` pushed as `repo_id`; `hyperparameters` are the recipe's own.
pub fn model_card(dir: &Path, repo_id: &str, hyperparameters: &[(String, Value)]) -> String {
    let adapter = read_json(&dir.join("adapter_config.json"));
    let config = read_json(&dir.join("config.json"));
    let is_adapter = adapter.is_some();
    let base_raw = adapter
        .as_ref()
        .and_then(|a| a["base_model_name_or_path"].as_str().map(String::from))
        .or_else(|| config.as_ref().and_then(|c| c["_name_or_path"].as_str().map(String::from)))
        .unwrap_or_default();
    let base = base_model_id(&base_raw);
    let mut y = String::from("---\n");
    if let Some(b) = &base {
        y += &format!("base_model: {}\n", yaml_str(b));
    }
    y += &format!("library_name: {}\n", if is_adapter { "peft" } else { "transformers" });
    y += "pipeline_tag: text-generation\ntags:\n- ftscript\n";
    if is_adapter {
        y += "- lora\n";
        if let Some(b) = &base {
            y += &format!("- {}\n", yaml_str(&format!("base_model:adapter:{b}")));
        }
    }
    y += "---\n\n";

    let name = repo_id.split('/').next_back().unwrap_or(repo_id);
    let mut md = format!("# {name}\n\n");
    let base_text = match (&base, base_raw.is_empty()) {
        (Some(b), _) => format!("[{b}](https://huggingface.co/{b})"),
        (None, false) => format!("`{base_raw}`"),
        (None, true) => "a base model".to_string(),
    };
    if is_adapter {
        md += &format!("A LoRA adapter for {base_text}, fine-tuned with ftscript. It loads with peft:\n\n");
        md += &format!(
            "```python\nfrom peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained({})\n```\n\n",
            yaml_str(repo_id)
        );
    } else {
        md += &format!("A causal language model fine-tuned from {base_text} with ftscript. It loads with transformers:\n\n");
        md += &format!(
            "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained({})\n```\n\n",
            yaml_str(repo_id)
        );
    }

    let mut params: Vec<(String, String)> = vec![];
    if let Some(a) = &adapter {
        for k in ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"] {
            if !a[k].is_null() {
                params.push((k.to_string(), fmt_value(&a[k])));
            }
        }
    }
    for (k, v) in hyperparameters {
        params.push((k.clone(), fmt_value(v)));
    }
    if let Some(state) = trainer_state(dir) {
        if let Some(v) = state.get("step") {
            params.push(("optimizer steps".to_string(), fmt_value(v)));
        }
    }
    if !params.is_empty() {
        md += "## Training hyper-parameters\n\n| parameter | value |\n|---|---|\n";
        for (k, v) in &params {
            md += &format!("| {k} | {} |\n", v.replace('|', "\\|"));
        }
        md += "\n";
    }
    let metrics = final_metrics(dir);
    if !metrics.is_empty() {
        md += "## Results\n\nFinal values from the training log:\n\n| metric | value |\n|---|---|\n";
        for (k, v) in &metrics {
            md += &format!("| {k} | {} |\n", fmt_value(v));
        }
        md += "\n";
    }
    format!("{y}{md}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_model_ids() {
        assert_eq!(base_model_id("/root/.cache/huggingface/hub/models--org--tiny/snapshots/abc").as_deref(), Some("org/tiny"));
        assert_eq!(base_model_id("meta-llama/Llama-2-7b-hf").as_deref(), Some("meta-llama/Llama-2-7b-hf"));
        assert_eq!(base_model_id("/abs/dir/model"), None);
    }
}
