//! The `ftscript` command line.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ftscript::script::{self, Recipe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ftscript", version, long_version = ftscript::env::long_version(), about = "Fine-tune large language models with short Rhai recipes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The operation budgets of a recipe (`ftscript::script::limits`).
#[derive(clap::Args, Clone, Copy)]
struct LimitArgs {
    /// Rhai operations the recipe's own code may run outside its callbacks (default 10^10):
    /// a recipe that loops forever stops with an error.
    #[arg(long, value_name = "N")]
    max_operations: Option<u64>,
    /// Rhai operations one call of a callback (a hook, a format or map function) may run
    /// (default 10^9).
    #[arg(long, value_name = "N")]
    max_callback_operations: Option<u64>,
    /// How deep the recipe's function calls may nest (default 64).
    #[arg(long, value_name = "N")]
    max_call_depth: Option<usize>,
    /// Bytes one Rhai string may hold (default 64 MiB).
    #[arg(long, value_name = "BYTES")]
    max_string_size: Option<usize>,
    /// Entries one Rhai array may hold (default 2^24).
    #[arg(long, value_name = "N")]
    max_array_size: Option<usize>,
    /// Keys one Rhai object map may hold (default 2^20).
    #[arg(long, value_name = "N")]
    max_map_size: Option<usize>,
    /// Bytes the process may hold while the recipe's own code runs (default 90% of the machine's).
    #[arg(long, value_name = "BYTES")]
    max_memory: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> ftscript::script::limits::Limits {
        let d = ftscript::script::limits::Limits::default();
        ftscript::script::limits::Limits {
            total: self.max_operations.unwrap_or(d.total),
            per_callback: self.max_callback_operations.unwrap_or(d.per_callback),
            call_depth: self.max_call_depth.unwrap_or(d.call_depth),
            string_size: self.max_string_size.unwrap_or(d.string_size),
            array_size: self.max_array_size.unwrap_or(d.array_size),
            map_size: self.max_map_size.unwrap_or(d.map_size),
            memory: self.max_memory.unwrap_or(d.memory),
        }
    }

    /// The flags again, for the processes a launcher starts.
    fn args(&self) -> Vec<String> {
        let mut args = vec![];
        let flags = [
            ("--max-operations", self.max_operations.map(|n| n.to_string())),
            ("--max-callback-operations", self.max_callback_operations.map(|n| n.to_string())),
            ("--max-call-depth", self.max_call_depth.map(|n| n.to_string())),
            ("--max-string-size", self.max_string_size.map(|n| n.to_string())),
            ("--max-array-size", self.max_array_size.map(|n| n.to_string())),
            ("--max-map-size", self.max_map_size.map(|n| n.to_string())),
            ("--max-memory", self.max_memory.map(|n| n.to_string())),
        ];
        for (flag, value) in flags {
            if let Some(v) = value {
                args.extend([flag.to_string(), v]);
            }
        }
        args
    }
}

/// What a recipe may touch beyond its confinement (`ftscript::script::sandbox`).
#[derive(clap::Args, Clone)]
struct SandboxArgs {
    /// Let the recipe read under PATH too (repeatable).
    #[arg(long, value_name = "PATH")]
    allow_read: Vec<PathBuf>,
    /// Let the recipe write under PATH too (repeatable).
    #[arg(long, value_name = "PATH")]
    allow_write: Vec<PathBuf>,
    /// Let the recipe use the network (Hub downloads that the cache cannot answer).
    #[arg(long)]
    allow_net: bool,
}

impl SandboxArgs {
    /// Confines the recipe at `recipe` run with `set`'s values: those naming existing paths are readable.
    fn install(&self, recipe: &Path, set: &[String]) {
        let set_paths: Vec<PathBuf> = set
            .iter()
            .filter_map(|kv| kv.split_once('=').map(|(_, v)| script::parse_set_value(v)))
            .filter_map(|v| v.into_string().ok().map(PathBuf::from))
            .filter(|p| p.exists())
            .collect();
        let cwd = std::env::current_dir().unwrap_or_default();
        script::sandbox::install(script::sandbox::Sandbox::for_recipe(recipe_dir(recipe), &cwd, &set_paths, &self.allow_read, &self.allow_write, self.allow_net));
    }

    /// The flags again, for the processes a launcher starts.
    fn args(&self) -> Vec<String> {
        let mut v = vec![];
        for p in &self.allow_read {
            v.extend(["--allow-read".to_string(), p.display().to_string()]);
        }
        for p in &self.allow_write {
            v.extend(["--allow-write".to_string(), p.display().to_string()]);
        }
        if self.allow_net {
            v.push("--allow-net".to_string());
        }
        v
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe.
    Run {
        recipe: PathBuf,
        /// Let the recipe publish to the Hugging Face Hub (`hub_push`); off by default.
        #[arg(long)]
        allow_push: bool,
        /// Override a top-level `const` of the recipe: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Compile a recipe, resolve its imports and validate its option maps, without running it.
    Check {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// Check with a top-level `const` overridden, as `run --set` would: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List every recipe function with its signature and documentation.
    Api {
        /// Write Rhai definition files (`.d.rhai`) for editors into this directory instead.
        #[arg(long, value_name = "DIR")]
        definitions: Option<PathBuf>,
    },
    /// Print versions, what is compiled in, the GPUs and the Hub settings (never the token), for bug reports.
    Env,
    /// Draw the curves of runs (train and eval loss, learning rate, tokens/s against the step)
    /// from their metrics.jsonl into a PNG: RUN_DIR/loss.png, several runs overlaid.
    Plot {
        /// Run directories (a train's output_dir).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the PNG (default: the first run's loss.png).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Run a recipe data-parallel: one process per GPU (or CPU process), torchrun-style.
    Launch {
        /// Processes on this node (usually its GPU count).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Nodes in the run.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This node's index, 0..nnodes.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// Address of node 0 (it hosts the rendezvous store).
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        /// Port of the rendezvous store (default: a free port on one node, 29500 across nodes).
        #[arg(long)]
        master_port: Option<u16>,
        recipe: PathBuf,
        /// Let the recipe publish to the Hugging Face Hub (`hub_push`, on the main process).
        #[arg(long)]
        allow_push: bool,
        /// Override a top-level `const` of the recipe: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Start a recipe from a commented template: lora, qlora, chat (multi-turn SFT with the
    /// model's chat template), multi-gpu, dpo (SFT then DPO, scored before and after), seq2seq
    /// (LoRA on T5 / Flan-T5 for summarization, scored by generation).
    Init {
        /// The new recipe's file (`.rhai` is added when it has no extension).
        name: PathBuf,
        #[arg(long, default_value = "lora", value_parser = clap::builder::PossibleValuesParser::new(ftscript::init::TEMPLATES.iter().map(|t| t.0)))]
        template: String,
    },
    /// Convert a .gguf file (llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3) into a Hugging Face model directory.
    Import { gguf: PathBuf, dir: PathBuf },
    /// Write a model (a Hugging Face directory or a .gguf file, with an optional LoRA adapter
    /// merged) as a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.
    Export {
        model: PathBuf,
        out: PathBuf,
        /// f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k
        #[arg(long, default_value = "f16")]
        quant: String,
        /// A PEFT LoRA adapter directory to merge first.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Push a folder (an adapter or a model) to a Hugging Face Hub repo, creating it if needed.
    Push {
        dir: PathBuf,
        /// `org/name`
        repo: String,
        /// Create the repo private.
        #[arg(long)]
        private: bool,
        /// Branch to commit to (default main).
        #[arg(long)]
        revision: Option<String>,
        /// Commit message.
        #[arg(long, short = 'm')]
        message: Option<String>,
        /// Open a pull request instead of committing to the branch.
        #[arg(long)]
        create_pr: bool,
    },
    /// Download a Hub repo into the Hugging Face cache and print its snapshot directory.
    Download {
        /// `org/name`
        repo: String,
        #[arg(long)]
        revision: Option<String>,
    },
}

fn init_logging() {
    // in a data-parallel run only rank 0 talks, unless FTSCRIPT_LOG says otherwise
    let default = if ftscript::dist::is_main_process() { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTSCRIPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

/// The directory a recipe is in (`.` for a bare file name).
fn recipe_dir(recipe: &Path) -> &Path {
    recipe.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn engine_for(recipe: &Path) -> rhai::Engine {
    let dir = recipe_dir(recipe);
    ftscript::api::set_recipe_dir(dir.to_path_buf());
    script::new_engine(dir)
}

/// Loads a recipe with its `--set` overrides applied.
fn load(engine: &rhai::Engine, recipe_path: &Path, set: &[String]) -> Result<Recipe> {
    let mut recipe = Recipe::load(engine, recipe_path)?;
    let mut overrides = vec![];
    for kv in set {
        let Some((k, v)) = kv.split_once('=') else { bail!("--set {kv}: expected KEY=VALUE") };
        overrides.push((k.trim().to_string(), script::parse_set_value(v)));
    }
    recipe.apply_overrides(&overrides)?;
    Ok(recipe)
}

fn run(recipe_path: &Path, set: &[String]) -> Result<()> {
    let engine = engine_for(recipe_path);
    load(&engine, recipe_path, set)?.run(&engine)
}

fn check(paths: &[PathBuf], set: &[String]) -> Result<()> {
    let mut failed = 0;
    for path in paths {
        let engine = engine_for(path);
        let problems = match load(&engine, path, set) {
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
    let engine = script::listing_engine();
    let json: serde_json::Value = serde_json::from_str(&engine.gen_fn_metadata_to_json(false)?)?;
    let mut lines: Vec<(String, String)> = vec![];
    // the global functions, then each native stdlib module's as `import "ft/x" as x` calls them
    let modules = script::native_modules().into_iter().map(|(name, _)| (name, format!("{}::", name.rsplit('/').next().unwrap_or(name))));
    let listed = std::iter::once((json["functions"].as_array(), String::new())).chain(modules.map(|(name, prefix)| (json["modules"][name]["functions"].as_array(), prefix)));
    for (f, prefix) in listed.flat_map(|(fs, prefix)| fs.into_iter().flatten().map(move |f| (f, prefix.clone()))) {
        let sig = format!("{prefix}{}", f["signature"].as_str().unwrap_or_default());
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
        Command::Run { recipe, set, allow_push, limits, sandbox } => {
            ftscript::api::hub::set_allow_push(*allow_push);
            sandbox.install(recipe, set);
            ftscript::script::limits::set(limits.limits());
            run(recipe, set)
        }
        Command::Check { recipes, set } => check(recipes, set),
        Command::Api { definitions: None } => api(),
        Command::Api { definitions: Some(dir) } => script::write_definitions(&dir).map(|n| println!("wrote {n} definition file(s) to {}", dir.display())),
        Command::Env => {
            for (name, value) in ftscript::env::report() {
                println!("{name:<14} {value}");
            }
            Ok(())
        }
        Command::Plot { runs, out } => {
            let out = out.clone().unwrap_or_else(|| runs[0].join("loss.png"));
            ftscript::plot::plot(runs, &out).map(|()| println!("wrote {}", out.display()))
        }
        Command::Launch { nproc_per_node, nnodes, node_rank, master_addr, master_port, recipe, allow_push, set, limits, sandbox } => {
            let opts = ftscript::dist::launch::LaunchOptions {
                nproc_per_node: *nproc_per_node,
                nnodes: *nnodes,
                node_rank: *node_rank,
                master_addr: master_addr.clone(),
                master_port: *master_port,
            };
            let mut args = vec!["run".to_string(), recipe.display().to_string()];
            for kv in set {
                args.extend(["--set".to_string(), kv.clone()]);
            }
            args.extend(limits.args());
            args.extend(sandbox.args());
            if *allow_push {
                args.push("--allow-push".to_string());
            }
            ftscript::dist::launch::launch(&opts, &args)
        }
        Command::Init { name, template } => ftscript::init::write(name, template).map(|p| println!("wrote {} (template {template}); try: ftscript check {}", p.display(), p.display())),
        Command::Import { gguf, dir } => ftscript::api::model::import_gguf(gguf, dir),
        Command::Export { model, out, quant, adapter } => ftscript::api::export::export_cli(model, out, quant, adapter.as_deref()),
        Command::Push { dir, repo, private, revision, message, create_pr } => {
            let opts = ftscript::hub::PushOptions {
                private: *private,
                revision: revision.clone(),
                commit_message: message.clone(),
                create_pr: *create_pr,
                hyperparameters: vec![],
            };
            ftscript::hub::push(&ftscript::hub::HubConfig::from_env(), dir, repo, &opts).map(|url| println!("{url}"))
        }
        Command::Download { repo, revision } => {
            let cfg = ftscript::hub::HubConfig::from_env();
            ftscript::hub::snapshot_download(&cfg, repo, revision.as_deref(), ftscript::hub::Filter::All).map(|p| println!("{}", p.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
