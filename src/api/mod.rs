//! The recipe surface: one file per Rhai namespace, each a thin adapter that parses options,
//! calls core Rust, and maps errors.

pub mod callbacks;
pub mod dataset;
pub mod dist;
pub mod evaluate;
pub mod export;
pub mod hub;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod seq2seq;
pub mod train;

use rhai::Engine;
use std::path::PathBuf;
use std::sync::OnceLock;

static RECIPE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory of the running recipe; relative paths are tried against the working
/// directory first, then against it.
pub fn set_recipe_dir(dir: PathBuf) {
    let _ = RECIPE_DIR.set(dir);
}

pub fn recipe_dir() -> PathBuf {
    RECIPE_DIR.get().cloned().unwrap_or_else(|| PathBuf::from("."))
}

/// Resolves a path argument: as given if it exists (or is absolute), else next to the recipe.
pub fn resolve(p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() || path.exists() {
        return path;
    }
    let alt = recipe_dir().join(&path);
    if alt.exists() { alt } else { path }
}

/// A path the recipe reads ([`resolve`]d), if the sandbox lets it.
pub fn read_path(p: &str) -> anyhow::Result<PathBuf> {
    let path = resolve(p);
    crate::script::sandbox::check_read(&path)?;
    Ok(path)
}

/// A path the recipe writes, if the sandbox lets it.
pub fn write_path(p: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(p);
    crate::script::sandbox::check_write(&path)?;
    Ok(path)
}

/// Registers every ftscript type and function.
pub fn register(engine: &mut Engine) {
    model::register(engine);
    seq2seq::register(engine);
    lora::register(engine);
    dataset::register(engine);
    train::register(engine);
    dist::register(engine);
    metrics::register(engine);
    evaluate::register(engine);
    export::register(engine);
    hub::register(engine);
}

type Validator = fn(&serde_json::Value) -> Result<(), String>;

/// The options struct behind each function that takes an option map, for `ftscript check`.
pub fn option_validator(function: &str) -> Option<Validator> {
    use crate::script::options::validate;
    Some(match function {
        "load_model" => validate::<model::LoadOptions>,
        "generate" => validate::<model::GenerateOptions>,
        "add_lora" => validate::<lora::LoraOptions>,
        "save_merged" => validate::<lora::MergeOptions>,
        "save_gguf" => validate::<export::GgufOptions>,
        "train" => train::validate_options,
        "evaluate" => evaluate::validate_options,
        "early_stopping" => validate::<callbacks::EarlyStoppingOptions>,
        "hub_push" => validate::<hub::PushArgs>,
        "hub_download" => validate::<hub::DownloadArgs>,
        _ => return None,
    })
}
