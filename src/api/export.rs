//! Export for llama.cpp and Ollama: `model.save_gguf(path, #{quant, modelfile})`,
//! `model.save_gguf_adapter(path)`, and `ftscript export` on the command line.

use super::model::Model;
use crate::gguf::export::{self, FileType};
use crate::models::LoadedModel;
use crate::script::options::{guard, parse};
use rhai::{Engine, EvalAltResult, FuncRegistration, Map};
use serde::Deserialize;
use std::path::Path;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `model.save_gguf(path, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GgufOptions {
    /// `f32`, `f16` (default), `bf16`, `q8_0`, `q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`.
    pub quant: Option<String>,
    /// Write an Ollama `Modelfile` beside the file (default true).
    pub modelfile: Option<bool>,
}

/// Writes `m` (adapters merged) as GGUF, and a `Modelfile` beside it unless told not to.
pub fn save_gguf(m: &LoadedModel, path: &Path, o: &GgufOptions) -> anyhow::Result<()> {
    let ft = FileType::parse(o.quant.as_deref().unwrap_or("f16"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    export::save_gguf(m, path, ft)?;
    if o.modelfile.unwrap_or(true) {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let modelfile = path.with_file_name("Modelfile");
        crate::nn::weights::write_atomic(&modelfile, export::modelfile(m, &name).as_bytes())?;
    }
    tracing::info!("saved {} ({})", path.display(), o.quant.as_deref().unwrap_or("f16"));
    Ok(())
}

/// `ftscript export MODEL OUT.gguf --quant Q [--adapter DIR]`: MODEL is a Hugging Face
/// directory or a .gguf file; an adapter is merged before writing.
pub fn export_cli(model: &Path, out: &Path, quant: &str, adapter: Option<&Path>) -> anyhow::Result<()> {
    let mut m = crate::models::load(model, "fp32", tch::Device::Cpu)?;
    if let Some(dir) = adapter {
        m.lora = Some(crate::nn::peft::load_adapter(&mut m.net, dir, tch::Kind::Float)?);
    }
    save_gguf(&m, out, &GgufOptions { quant: Some(quant.to_string()), modelfile: Some(true) })
}

pub fn register(engine: &mut Engine) {
    let save = |m: &mut Model, path: &str, o: GgufOptions| -> Res<()> { guard("save_gguf", || save_gguf(&m.get(), &crate::api::write_path(path)?, &o)) };
    FuncRegistration::new("save_gguf")
        .with_comments(["/// Writes the model, adapters merged, as a GGUF file for llama.cpp / Ollama (f16), with an Ollama Modelfile beside it."])
        .with_params_info(["model: &mut Model", "path: &str", "()"])
        .register_into_engine(engine, move |m: &mut Model, path: &str| save(m, path, GgufOptions::default()));
    FuncRegistration::new("save_gguf")
        .with_comments(["/// save_gguf with #{quant: f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k, modelfile: bool}."])
        .with_params_info(["model: &mut Model", "path: &str", "options: Map", "()"])
        .register_into_engine(engine, move |m: &mut Model, path: &str, opts: Map| -> Res<()> { save(m, path, parse("save_gguf", &opts)?) });
    FuncRegistration::new("save_gguf_adapter")
        .with_comments(["/// Writes the LoRA adapter as a GGUF LoRA file (llama-server --lora, Ollama's ADAPTER)."])
        .with_params_info(["model: &mut Model", "path: &str", "()"])
        .register_into_engine(engine, |m: &mut Model, path: &str| -> Res<()> {
            guard("save_gguf_adapter", || {
                export::save_gguf_adapter(&m.get(), &crate::api::write_path(path)?)?;
                tracing::info!("saved GGUF LoRA adapter to {path}");
                Ok(())
            })
        });
}
