//! The `ftscript` command line.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ftscript::script::{self, Recipe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ftscript", version, about = "Fine-tune large language models with short Rhai recipes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe.
    Run {
        recipe: PathBuf,
        /// Override a top-level `const` of the recipe: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Compile a recipe, resolve its imports and validate its option maps, without running it.
    Check {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
    },
    /// List every recipe function with its signature and documentation.
    Api,
    /// Convert a llama-family .gguf file into a Hugging Face model directory.
    Import { gguf: PathBuf, dir: PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTSCRIPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

fn engine_for(recipe: &Path) -> rhai::Engine {
    let dir = recipe.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).unwrap_or(Path::new("."));
    ftscript::api::set_recipe_dir(dir.to_path_buf());
    script::new_engine(dir)
}

fn run(recipe_path: &Path, set: &[String]) -> Result<()> {
    let engine = engine_for(recipe_path);
    let mut recipe = Recipe::load(&engine, recipe_path)?;
    let mut overrides = vec![];
    for kv in set {
        let Some((k, v)) = kv.split_once('=') else { bail!("--set {kv}: expected KEY=VALUE") };
        overrides.push((k.trim().to_string(), script::parse_set_value(&engine, v)));
    }
    recipe.apply_overrides(&overrides)?;
    recipe.run(&engine)?;
    Ok(())
}

fn check(paths: &[PathBuf]) -> Result<()> {
    let mut failed = 0;
    for path in paths {
        let engine = engine_for(path);
        let problems = match Recipe::load(&engine, path) {
            Ok(recipe) => script::check::check(&engine, &recipe),
            Err(e) => vec![e.to_string()],
        };
        if problems.is_empty() {
            println!("ok: {}", path.display());
        } else {
            failed += 1;
            for p in problems {
                eprintln!("error: {p}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} recipe(s) failed the check");
    }
    Ok(())
}

/// Prints every registered function from the engine's own metadata, so it never drifts.
fn api() -> Result<()> {
    let engine = script::new_engine(Path::new("."));
    let json: serde_json::Value = serde_json::from_str(&engine.gen_fn_metadata_to_json(false)?)?;
    let mut lines: Vec<(String, String)> = vec![];
    for f in json["functions"].as_array().into_iter().flatten() {
        let sig = f["signature"].as_str().unwrap_or_default().to_string();
        let doc = f["docComments"]
            .as_array()
            .and_then(|d| d.first())
            .and_then(|d| d.as_str())
            .map(|d| d.trim_start_matches("///").trim().to_string())
            .unwrap_or_default();
        lines.push((sig, doc));
    }
    lines.sort();
    lines.dedup();
    for (sig, doc) in lines {
        println!("{sig}");
        if !doc.is_empty() {
            println!("    {doc}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // libtorch reports errors by panicking inside tch; the script layer catches them, so keep
    // the default hook from printing a backtrace banner for errors we turn into messages.
    std::panic::set_hook(Box::new(|info| tracing::debug!("panic: {info}")));
    let result = match &cli.command {
        Command::Run { recipe, set } => run(recipe, set),
        Command::Check { recipes } => check(recipes),
        Command::Api => api(),
        Command::Import { gguf, dir } => ftscript::api::model::import_gguf(gguf, dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
