//! `ftscript init NAME --template T`: a new recipe from one of the shipped, commented ones
//! (`scripts/`, embedded in the binary), its usage line naming the new file.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `(template, file in scripts/, its text)`.
pub const TEMPLATES: &[(&str, &str, &str)] = &[
    ("lora", "alpaca_lora.rhai", include_str!("../scripts/alpaca_lora.rhai")),
    ("qlora", "qlora.rhai", include_str!("../scripts/qlora.rhai")),
    ("chat", "qwen3_chat.rhai", include_str!("../scripts/qwen3_chat.rhai")),
    ("multi-gpu", "multi_gpu.rhai", include_str!("../scripts/multi_gpu.rhai")),
    ("dpo", "dpo.rhai", include_str!("../scripts/dpo.rhai")),
    ("seq2seq", "t5_summarize.rhai", include_str!("../scripts/t5_summarize.rhai")),
];

/// Writes template `template` to `name` (`.rhai` added when missing); never overwrites.
pub fn write(name: &Path, template: &str) -> Result<PathBuf> {
    let Some((_, file, text)) = TEMPLATES.iter().find(|(t, _, _)| *t == template) else {
        let names: Vec<&str> = TEMPLATES.iter().map(|(t, _, _)| *t).collect();
        bail!("unknown template `{template}`; templates: {}", names.join(", "));
    };
    let path = if name.extension().is_some() { name.to_path_buf() } else { name.with_extension("rhai") };
    if path.exists() {
        bail!("{}: already exists (init never overwrites)", path.display());
    }
    let text = text.replace(&format!("scripts/{file}"), &path.display().to_string());
    crate::nn::weights::write_atomic(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
