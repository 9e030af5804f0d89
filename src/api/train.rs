//! `train(model, #{...})`: option parsing, formatting records (by template name or a Rhai
//! function), callbacks, and the result map. The loop itself is `crate::train::trainer`.

use super::dataset::Dataset;
use super::model::Model;
use crate::data::format::{format_builtin, Example, Formatted, TokenizeOptions, TrainOn, IGNORE};
use crate::script::options::{from_json, guard, parse, to_json};
use crate::train::batch::BatchConfig;
use crate::train::logger::RunLogger;
use crate::train::schedule::Schedule;
use crate::train::objective::{Objective, Sft};
use crate::train::preference::{DpoLoss, Preference, PreferenceObjective};
use crate::train::trainer::{self, Control, Hooks, TrainConfig, TrainModel};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};
use serde::de::IgnoredAny;
use serde::Deserialize;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `train(model, #{...})`; `train`, `eval`, `format` and the `on_*` callbacks are
/// Rhai values taken out before the rest is deserialized.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    pub train: Option<IgnoredAny>,
    pub eval: Option<IgnoredAny>,
    pub format: Option<IgnoredAny>,
    pub on_log: Option<IgnoredAny>,
    pub on_eval: Option<IgnoredAny>,
    pub on_step: Option<IgnoredAny>,
    /// `evaluate`'s options: each evaluation also generates answers for the eval set and scores them.
    pub eval_generate: Option<IgnoredAny>,
    pub max_length: Option<usize>,
    /// Rows per micro-batch (4), or `"auto"`: 8, halved on running out of memory (`on_oom: "halve"`).
    pub batch_size: Option<serde_json::Value>,
    pub eval_batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub epochs: Option<usize>,
    pub max_steps: Option<usize>,
    pub lr: Option<f64>,
    pub scheduler: Option<String>,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub adam_eps: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub precision: Option<String>,
    pub gradient_checkpointing: Option<serde_json::Value>,
    /// GPU memory training may hold, per GPU: `"14GiB"`, `"15GB"` or bytes. Checkpointing and
    /// the micro-batch are chosen to fit it, and the allocator is capped there.
    pub memory_budget: Option<serde_json::Value>,
    pub log_every: Option<usize>,
    pub eval_every: Option<usize>,
    pub save_every: Option<usize>,
    pub save_total_limit: Option<usize>,
    pub output_dir: Option<String>,
    pub seed: Option<u64>,
    pub resume: Option<bool>,
    /// Clear an `output_dir` that holds an earlier run (without it, or `resume`, such a directory is refused).
    pub overwrite: Option<bool>,
    pub packing: Option<bool>,
    /// `longest` (per batch, default) or `max_length`.
    pub padding: Option<String>,
    /// Each batch's width rounded up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    pub train_on_prompt: Option<bool>,
    /// Multi-turn chat (`chat_template`): `all` assistant turns (default) or the `last` one.
    pub train_on: Option<String>,
    pub shuffle: Option<bool>,
    /// `#{start: N, steps: K}`: profile K optimizer steps from step N (and the evaluation after the last, if one falls there).
    pub profile: Option<ProfileOptions>,
    /// A non-finite loss or gradient norm: `stop` (default) or `skip` the update.
    pub on_nan: Option<String>,
    /// With `on_nan: "skip"`: how many steps may be skipped before training stops (default 10).
    pub max_skipped_steps: Option<usize>,
    /// Steps whose gradients are made NaN, to try `on_nan` (tests).
    pub inject_nan_steps: Option<Vec<usize>>,
    /// Out of memory in a step: `stop` (default; the error says what to lower) or `halve` the
    /// micro-batch and retry (the same examples per step).
    pub on_oom: Option<String>,
    /// Micro-batches of more rows than this fail as out of memory, to try `on_oom` (tests).
    pub inject_oom_rows: Option<usize>,
    /// `sft` (default), `dpo`, `orpo` or `kto`.
    pub objective: Option<String>,
    /// Preference objectives: the strength β of the reference (DPO, KTO) or of the odds-ratio term (ORPO); 0.1.
    pub beta: Option<f64>,
    /// DPO: `sigmoid` (default), `hinge`, `ipo` or `robust`.
    pub loss_type: Option<String>,
    /// DPO's `robust` loss: the probability that a preference label is flipped.
    pub label_smoothing: Option<f64>,
    /// DPO, KTO: compute the reference log-probabilities once before training.
    pub precompute_ref_log_probs: Option<bool>,
    /// A mixture-of-experts model: the weight of the load-balancing loss added to the training
    /// loss. Default config.json's `router_aux_loss_coef` where transformers and TRL add it: SFT
    /// and ORPO when config.json sets `output_router_logits`, DPO and KTO always (0 turns it off).
    pub router_aux_loss_coef: Option<f64>,
    /// KTO: the weights of desirable and undesirable examples' losses (1.0 each).
    pub desirable_weight: Option<f64>,
    pub undesirable_weight: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileOptions {
    pub start: usize,
    #[serde(default = "one")]
    pub steps: usize,
}

fn one() -> usize {
    1
}

/// The options of `train` that take one of a few names (checked before any work, and by `ftscript check`).
const CHOICES: &[(&str, &[&str])] = &[
    ("scheduler", &["linear", "cosine", "constant", "constant_with_warmup"]),
    ("precision", &["auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]),
    ("padding", &["longest", "max_length"]),
    ("gradient_checkpointing", &["auto", "offload"]),
    ("format", &["alpaca", "chatml", "text", "chat_template", "tokens", "seq2seq"]),
    ("train_on", &["all", "last"]),
    ("on_nan", &["stop", "skip"]),
    ("on_oom", &["stop", "halve"]),
    ("batch_size", &["auto"]),
    ("objective", &["sft", "dpo", "orpo", "kto"]),
    ("loss_type", DpoLoss::NAMES),
];

/// Options that only some objectives read: (option, the objectives that read it).
const OBJECTIVE_OPTIONS: &[(&str, &[&str])] = &[
    ("beta", &["dpo", "orpo", "kto"]),
    ("loss_type", &["dpo"]),
    ("label_smoothing", &["dpo"]),
    ("precompute_ref_log_probs", &["dpo", "kto"]),
    ("desirable_weight", &["kto"]),
    ("undesirable_weight", &["kto"]),
    ("format", &["sft"]),
    ("packing", &["sft"]),
    ("train_on_prompt", &["sft"]),
    ("train_on", &["sft"]),
];

/// `train`'s option map checked as `train` will read it: known keys with the right types, and
/// each named choice one of its names (with "did you mean").
pub fn validate_options(json: &serde_json::Value) -> Result<(), String> {
    crate::script::options::validate::<TrainOptions>(json)?;
    for (key, names) in CHOICES {
        if let Some(v) = json.get(*key).and_then(|v| v.as_str()) {
            crate::script::options::one_of(key, v, names)?;
        }
    }
    batch_size_of(json.get("batch_size"))?;
    memory_budget_of(json.get("memory_budget"))?;
    if let Some(c) = json.get("router_aux_loss_coef").and_then(|v| v.as_f64()) {
        if !(c.is_finite() && c >= 0.0) {
            return Err(format!("router_aux_loss_coef must be a number ≥ 0 (0 turns the load-balancing loss off), got {c}"));
        }
    }
    if let Some(g) = json.get("eval_generate").and_then(|g| g.as_object()) {
        let mut g = g.clone();
        // a format function is checked when it runs
        g.remove("format");
        if g.get("metrics").and_then(|m| m.as_array()).is_some_and(|m| m.iter().any(|n| n.as_str() == Some("loss"))) {
            return Err("eval_generate: leave \"loss\" out of metrics: the evaluation's eval_loss already is the loss over the eval set".into());
        }
        super::evaluate::validate_options(&serde_json::Value::Object(g)).map_err(|e| format!("eval_generate: {e}"))?;
    }
    let objective = match json.get("objective") {
        None => "sft",
        Some(v) => match v.as_str() {
            Some(name) => name,
            // not known before the recipe runs (`ftscript check`)
            None => return Ok(()),
        },
    };
    for (key, readers) in OBJECTIVE_OPTIONS {
        if json.get(*key).is_some() && !readers.contains(&objective) {
            return Err(format!("`{key}` applies to objective {}, and this run's objective is \"{objective}\"", readers.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(" or ")));
        }
    }
    Ok(())
}

/// How records become examples.
enum Format {
    Builtin(String),
    Function(FnPtr),
    /// Records already hold `input_ids` (and optionally `labels`).
    Tokens,
}

fn format_of(v: Option<&Dynamic>, first: Option<&serde_json::Value>) -> anyhow::Result<Format> {
    match v {
        Some(d) if d.is_fnptr() => Ok(Format::Function(d.clone().cast::<FnPtr>())),
        Some(d) if d.is_string() => {
            let s = d.clone().into_string().unwrap();
            if s == "tokens" {
                return Ok(Format::Tokens);
            }
            Ok(Format::Builtin(s))
        }
        Some(d) => anyhow::bail!("train: format must be a template name or a function, got {}", d.type_name()),
        None => {
            // infer from the first record's fields
            let has = |k: &str| first.and_then(|r| r.get(k)).is_some();
            Ok(if has("input_ids") {
                Format::Tokens
            } else if has("messages") {
                Format::Builtin("chat_template".into())
            } else if has("instruction") {
                Format::Builtin("alpaca".into())
            } else if has("text") {
                Format::Builtin("text".into())
            } else {
                anyhow::bail!("train: cannot infer the format of the records; pass format: \"alpaca\" | \"chatml\" | \"chat_template\" | \"text\" | \"tokens\" or a function")
            })
        }
    }
}

fn ints(v: &serde_json::Value, what: &str, at: &crate::data::dataset::Place) -> anyhow::Result<Vec<i64>> {
    v.as_array()
        .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<i64>>>())
        .ok_or_else(|| anyhow::anyhow!("{at}: `{what}` must be an array of integers"))
}

/// Formats and tokenizes a dataset (Rhai format functions run here, on the recipe's thread;
/// tokenization runs on worker threads and is cached).
fn examples(
    ctx: &NativeCallContext,
    m: &Model,
    ds: &Dataset,
    fmt: &Format,
    o: &TokenizeOptions,
    train_on: TrainOn,
) -> Res<Vec<Example>> {
    let records = &ds.0.records;
    let model = m.get();
    let tok = &model.tokenizer;
    match fmt {
        Format::Tokens => records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = ds.0.place(i);
                let ids = ints(r.get("input_ids").unwrap_or(&serde_json::Value::Null), "input_ids", at)?;
                let labels = match r.get("labels") {
                    Some(l) => ints(l, "labels", at)?,
                    None => ids.clone(),
                };
                anyhow::ensure!(labels.len() == ids.len(), "{at}: `labels` and `input_ids` differ in length");
                let n = if o.max_length > 0 { ids.len().min(o.max_length) } else { ids.len() };
                Ok(Example { input_ids: ids[..n].to_vec(), labels: labels[..n].iter().map(|&l| if l < 0 { IGNORE } else { l }).collect() })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| format!("train: {e}").into()),
        Format::Builtin(name) => {
            let items = records
                .iter()
                .enumerate()
                .map(|(i, r)| format_builtin(name, r, &ds.0.place(i).to_string(), tok, train_on))
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(|e| -> Box<EvalAltResult> { format!("train: {e:#}").into() })?;
            guard("train", || crate::data::cache::tokenize_all(items, tok, o))
        }
        Format::Function(f) => {
            let mut items = Vec::with_capacity(records.len());
            for (i, r) in records.iter().enumerate() {
                let out: Dynamic = crate::script::limits::callback(|| f.call_within_context(ctx, (from_json(r),)))
                    .map_err(|e| crate::script::prefix_error(e, &format!("train: the format function failed on {}", ds.0.place(i))))?;
                items.push(Formatted::from_value(&to_json(&out), &ds.0.place(i).to_string()).map_err(|e| -> Box<EvalAltResult> { format!("train: {e}").into() })?);
            }
            guard("train", || crate::data::cache::tokenize_all(items, tok, o))
        }
    }
}

/// Recipe callbacks: each option is a function or an array of functions. The first failure is
/// kept as Rhai reported it (with the callback's file:line), for `train` to return.
struct RhaiHooks<'a> {
    ctx: &'a NativeCallContext<'a>,
    /// `eval_generate`: the model, the eval set and `evaluate`'s options.
    eval_generate: Option<(Model, Dataset, Map)>,
    on_step: Vec<FnPtr>,
    on_log: Vec<FnPtr>,
    on_eval: Vec<FnPtr>,
    failure: Option<(String, Box<EvalAltResult>)>,
}

fn callbacks(v: Option<&Dynamic>, name: &str) -> Res<Vec<FnPtr>> {
    match v {
        None => Ok(vec![]),
        Some(d) if d.is_fnptr() => Ok(vec![d.clone().cast::<FnPtr>()]),
        Some(d) if d.is_array() => d
            .clone()
            .cast::<Array>()
            .into_iter()
            .map(|x| if x.is_fnptr() { Ok(x.cast::<FnPtr>()) } else { Err(format!("train: {name} must hold functions, got {}", x.type_name()).into()) })
            .collect(),
        Some(d) => Err(format!("train: {name} must be a function or an array of functions, got {}", d.type_name()).into()),
    }
}

impl RhaiHooks<'_> {
    /// Calls `fns` in order with gradients off (a callback may generate or compute a loss).
    fn call(&mut self, which: fn(&Self) -> &[FnPtr], name: &str, metrics: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<Control> {
        let _eval = tch::no_grad_guard();
        let mut control = Control::Continue;
        for f in which(self) {
            let arg = from_json(&serde_json::Value::Object(metrics.clone()));
            match crate::script::limits::callback(|| f.call_within_context::<Dynamic>(self.ctx, (arg,))) {
                Ok(out) if out.clone().into_string().is_ok_and(|s| s == "stop") => control = Control::Stop,
                Ok(_) => {}
                Err(e) => {
                    let what = format!("{name} callback failed");
                    anyhow::bail!(self.failure.insert((what, e)).0.clone());
                }
            }
        }
        Ok(control)
    }
}

impl Hooks for RhaiHooks<'_> {
    fn on_step(&mut self, m: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<Control> {
        self.call(|h| &h.on_step, "on_step", m)
    }
    fn on_log(&mut self, m: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<Control> {
        self.call(|h| &h.on_log, "on_log", m)
    }
    fn on_eval(&mut self, m: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<Control> {
        self.call(|h| &h.on_eval, "on_eval", m)
    }

    /// `eval_generate`'s scores as `eval_<metric>` (and the seconds it took); its sample
    /// triples go to the log. The objective's `examples` are scored in the prompts' forward.
    fn eval_extra(&mut self, examples: Option<&[crate::data::format::Example]>) -> anyhow::Result<(serde_json::Map<String, serde_json::Value>, Option<f64>)> {
        let Some((model, ds, opts)) = &self.eval_generate else { return Ok(Default::default()) };
        let _eval = tch::no_grad_guard();
        let (scores, loss) = match super::evaluate::evaluate_scoring(self.ctx, model, ds, opts, examples) {
            Ok(s) => s,
            Err(e) => anyhow::bail!(self.failure.insert(("eval_generate failed".into(), e)).0.clone()),
        };
        let mut out = serde_json::Map::new();
        for (k, v) in scores {
            match k.as_str() {
                "samples" => {
                    for s in v.into_array().unwrap_or_default() {
                        tracing::info!("eval_generate sample: {}", to_json(&s));
                    }
                }
                "records" => {}
                "seconds" => _ = out.insert("eval_generate_seconds".into(), to_json(&v)),
                _ => _ = out.insert(format!("eval_{k}"), to_json(&v)),
            }
        }
        Ok((out, loss))
    }
}

fn dataset_opt(map: &Map, key: &str) -> Res<Option<Dataset>> {
    match map.get(key) {
        None => Ok(None),
        Some(d) if d.is_unit() => Ok(None),
        Some(d) => d
            .clone()
            .try_cast::<Dataset>()
            .map(Some)
            .ok_or_else(|| format!("train: `{key}` must be a Dataset (from load_dataset), got {}", d.type_name()).into()),
    }
}

/// What an `output_dir` holds of an earlier run, if anything: metrics, event files, checkpoints.
/// A run that stopped before its first log line (refused options, say) left only an empty
/// metrics.jsonl and event files without scalars: that is no earlier run.
fn earlier_run(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n == "metrics.jsonl" || n.starts_with("events.out.tfevents") || n.starts_with("checkpoint-"))
        .collect();
    let logged = std::fs::metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
    if !logged && !found.iter().any(|n| n.starts_with("checkpoint-")) {
        return vec![];
    }
    found.sort();
    found
}

/// Refuses an `output_dir` that holds an earlier run unless the run resumes it, or clears it
/// with `overwrite` (main process only: the others write no run files).
fn claim_output_dir(dir: &std::path::Path, resume: bool, overwrite: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!(resume && overwrite), "resume and overwrite exclude each other: resume continues the run in output_dir, overwrite clears it");
    let earlier = earlier_run(dir);
    if earlier.is_empty() || resume || !crate::dist::is_main_process() {
        return Ok(());
    }
    if overwrite {
        tracing::info!("overwrite: clearing {}", dir.display());
        return std::fs::remove_dir_all(dir).map_err(|e| anyhow::anyhow!("overwrite: cannot clear {}: {e}", dir.display()));
    }
    let shown: Vec<&str> = earlier.iter().map(String::as_str).take(4).collect();
    anyhow::bail!(
        "output_dir `{}` holds an earlier run ({}{}); pass resume: true to continue it, overwrite: true to start over, or another output_dir",
        dir.display(),
        shown.join(", "),
        if earlier.len() > shown.len() { ", ..." } else { "" }
    )
}

/// `batch_size`: rows per micro-batch (4 when absent), or `"auto"` (8, halved on running out of
/// memory); returns the rows and whether it was `"auto"`.
fn batch_size_of(v: Option<&serde_json::Value>) -> Result<(usize, bool), String> {
    match v {
        None => Ok((4, false)),
        Some(serde_json::Value::String(s)) if s == "auto" => Ok((8, true)),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok((n as usize, false)),
            _ => Err(format!("batch_size must be a positive integer or \"auto\", got {v}")),
        },
    }
}

/// `memory_budget`: a size (`"14GiB"`) or a number of bytes → bytes.
fn memory_budget_of(v: Option<&serde_json::Value>) -> Result<Option<u64>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => crate::script::options::parse_bytes(s).map(Some).map_err(|e| format!("memory_budget: {e}")),
        Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(v) => Err(format!("memory_budget must be a size such as \"14GiB\" or a number of bytes, got {v}")),
    }
}

/// `train`'s options, parsed and checked before any model is looked at.
struct Run {
    o: TrainOptions,
    output_dir: std::path::PathBuf,
    train: Dataset,
    eval: Option<Dataset>,
    max_length: usize,
    batch_size: usize,
    auto_batch: bool,
    eval_batch_size: usize,
    objective: String,
}

fn parse_run(opts: &Map) -> Res<Run> {
    let mut json = to_json(&Dynamic::from_map(opts.clone()));
    if opts.get("format").is_some_and(|f| f.is_fnptr()) {
        json.as_object_mut().map(|o| o.remove("format"));
    }
    validate_options(&json).map_err(|e| format!("train: {e}"))?;
    let o: TrainOptions = parse("train", opts)?;
    let output_dir = crate::api::write_path(o.output_dir.as_deref().unwrap_or("runs/ftscript")).map_err(|e| format!("train: output_dir: {e:#}"))?;
    guard("train", || claim_output_dir(&output_dir, o.resume.unwrap_or(false), o.overwrite.unwrap_or(false)))?;
    let train = dataset_opt(opts, "train")?.ok_or("train: missing option `train` (the training Dataset)")?;
    let eval = dataset_opt(opts, "eval")?;
    let (batch_size, auto_batch) = batch_size_of(o.batch_size.as_ref()).map_err(|e| format!("train: {e}"))?;
    Ok(Run {
        max_length: o.max_length.unwrap_or(1024),
        eval_batch_size: o.eval_batch_size.unwrap_or(batch_size),
        objective: o.objective.clone().unwrap_or_else(|| "sft".into()),
        o,
        output_dir,
        train,
        eval,
        batch_size,
        auto_batch,
    })
}

/// The loop's settings from the run's options, for a model whose frozen weights are `kind`.
fn train_config(run: &Run, spec: &crate::nn::peft::LoraSpec, pad_id: i64, kind: tch::Kind) -> anyhow::Result<TrainConfig> {
    let o = &run.o;
    let precision = match o.precision.as_deref() {
        None | Some("auto") => kind,
        Some(p) => crate::models::parse_dtype(p, None)?,
    };
    let gradient_checkpointing = match &o.gradient_checkpointing {
        None => None,
        Some(serde_json::Value::Bool(true)) => Some(trainer::Checkpointing::On),
        Some(serde_json::Value::Bool(false)) => Some(trainer::Checkpointing::Off),
        Some(serde_json::Value::String(s)) if s == "auto" => None,
        Some(serde_json::Value::String(s)) if s == "offload" => Some(trainer::Checkpointing::Offload),
        Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => Some(trainer::Checkpointing::First(n.as_u64().unwrap_or(0) as usize)),
        Some(v) => anyhow::bail!("gradient_checkpointing must be true, false, \"auto\", \"offload\" or a number of layers to checkpoint (the first ones), got {v}"),
    };
    let memory_budget = memory_budget_of(o.memory_budget.as_ref()).map_err(anyhow::Error::msg)?;
    Ok(TrainConfig {
        memory_budget,
        batch: BatchConfig {
            batch_size: run.batch_size,
            max_length: run.max_length,
            pad_to_max_length: match o.padding.as_deref() {
                None | Some("longest") => false,
                Some("max_length") => true,
                Some(p) => anyhow::bail!("padding must be \"longest\" or \"max_length\", got \"{p}\""),
            },
            pad_to_multiple_of: match o.pad_to_multiple_of {
                Some(0) => anyhow::bail!("pad_to_multiple_of must be at least 1, got 0"),
                n => n.unwrap_or(1),
            },
            packing: o.packing.unwrap_or(false),
            pad_id,
            shuffle: o.shuffle.unwrap_or(true),
            seed: o.seed.unwrap_or(42),
        },
        eval_batch_size: run.eval_batch_size,
        grad_accum: o.grad_accum.unwrap_or(1).max(1),
        epochs: o.epochs.unwrap_or(1),
        max_steps: o.max_steps,
        lr: o.lr.unwrap_or(2e-4),
        scheduler: Schedule::parse(o.scheduler.as_deref().unwrap_or("linear"))?,
        warmup_steps: o.warmup_steps,
        warmup_ratio: o.warmup_ratio.unwrap_or(0.0),
        weight_decay: o.weight_decay.unwrap_or(0.0),
        adam_beta1: o.adam_beta1.unwrap_or(0.9),
        adam_beta2: o.adam_beta2.unwrap_or(0.999),
        adam_eps: o.adam_eps.unwrap_or(1e-8),
        max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
        precision,
        gradient_checkpointing,
        log_every: o.log_every.unwrap_or(10).max(1),
        eval_every: o.eval_every.filter(|_| run.eval.is_some()),
        save_every: o.save_every,
        save_total_limit: o.save_total_limit,
        output_dir: run.output_dir.clone(),
        seed: o.seed.unwrap_or(42),
        resume: o.resume.unwrap_or(false),
        on_nan: match o.on_nan.as_deref() {
            None | Some("stop") => trainer::OnNan::Stop,
            Some("skip") => trainer::OnNan::Skip { max_skipped: o.max_skipped_steps.unwrap_or(10) },
            Some(other) => anyhow::bail!("on_nan must be \"stop\" or \"skip\", got \"{other}\""),
        },
        inject_nan_steps: o.inject_nan_steps.clone().unwrap_or_default(),
        on_oom: match o.on_oom.as_deref() {
            Some("halve") => trainer::OnOom::Halve,
            None if run.auto_batch => trainer::OnOom::Halve,
            _ => trainer::OnOom::Stop,
        },
        inject_oom_rows: o.inject_oom_rows,
        adalora: spec.adalora.clone(),
        profile: match &o.profile {
            Some(p) if p.start == 0 || p.steps == 0 => anyhow::bail!("profile: start and steps count from 1, got start {} steps {}", p.start, p.steps),
            Some(p) => Some(trainer::ProfileSteps { start: p.start, steps: p.steps }),
            None => None,
        },
    })
}

/// The recipe's callbacks of `opts` (`on_step`, `on_log`, `on_eval`), and `eval_generate`'s
/// model, set and options.
fn hooks<'a>(ctx: &'a NativeCallContext<'a>, opts: &Map, eval_generate: Option<(Model, Dataset, Map)>) -> Res<RhaiHooks<'a>> {
    Ok(RhaiHooks {
        ctx,
        on_step: callbacks(opts.get("on_step"), "on_step")?,
        on_log: callbacks(opts.get("on_log"), "on_log")?,
        on_eval: callbacks(opts.get("on_eval"), "on_eval")?,
        eval_generate,
        failure: None,
    })
}

/// Runs the loop on `net` (its frozen weights in `cfg.precision` already, the objective
/// prepared), the run's logs written by the main process; a callback's failure is returned as
/// its own error (so it renders at the callback's file:line) after where training stopped.
fn run_loop<M: TrainModel>(net: &M, spec: &crate::nn::peft::LoraSpec, source: &str, objective: &dyn Objective<M>, cfg: &TrainConfig, hooks: &mut RhaiHooks) -> Res<trainer::TrainResult> {
    let result = guard("train", || {
        let main = crate::dist::is_main_process();
        let mut logger = if main { RunLogger::create(&cfg.output_dir)? } else { RunLogger::disabled() };
        match trainer::train(net, spec, source, objective, cfg, hooks, &mut logger) {
            Ok(r) => {
                // the run's curves beside its logs (a picture that cannot be drawn fails nothing)
                if main {
                    let out = cfg.output_dir.join("loss.png");
                    if let Err(e) = crate::plot::plot(std::slice::from_ref(&cfg.output_dir), &out) {
                        tracing::warn!("no {}: {e:#}", out.display());
                    }
                }
                Ok(Ok(r))
            }
            Err(e) => match hooks.failure.take() {
                Some((what, failure)) => Ok(Err(crate::script::prefix_error(failure, &format!("train: {what}, {e}")))),
                None => Err(e),
            },
        }
    })?;
    result
}

/// `train`'s result map (an interrupted run exits instead, after saying how to resume).
fn result_map(r: trainer::TrainResult, out_dir: &std::path::Path) -> Map {
    if r.interrupted {
        let at = r.checkpoint.as_ref().map(|c| format!(", checkpoint saved in {}", c.display())).unwrap_or_default();
        eprintln!("interrupted at step {}{at}; run the recipe again with `resume: true` to continue", r.steps);
        std::process::exit(0);
    }
    let mut map = Map::new();
    map.insert("steps".into(), Dynamic::from(r.steps as i64));
    map.insert("epoch".into(), Dynamic::from(r.epoch));
    map.insert("train_loss".into(), Dynamic::from(r.train_loss));
    map.insert("eval_loss".into(), r.eval_loss.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    map.insert("stopped_early".into(), Dynamic::from(r.stopped_early));
    map.insert("tokens_per_sec".into(), Dynamic::from(r.tokens_per_sec));
    map.insert("output_dir".into(), Dynamic::from(out_dir.display().to_string()));
    map.insert(
        "checkpoint".into(),
        r.checkpoint.map(|c| Dynamic::from(c.display().to_string())).unwrap_or(Dynamic::UNIT),
    );
    map.insert("log_history".into(), from_json(&serde_json::Value::Array(r.log_history)));
    map
}

fn train_fn(ctx: NativeCallContext, m: &mut Model, opts: Map) -> Res<Map> {
    let run = parse_run(&opts)?;
    let (o, train_ds, eval_ds) = (&run.o, &run.train, &run.eval);
    if opts.get("format").and_then(|f| f.clone().into_string().ok()).as_deref() == Some("seq2seq") {
        return Err("train: format \"seq2seq\" is for an encoder-decoder model (T5); this model is a decoder: use \"alpaca\", \"chatml\", \"chat_template\", \"text\" or \"tokens\"".into());
    }
    if o.router_aux_loss_coef.is_some() && m.get().net.router_aux_loss_coef().is_none() {
        return Err(format!("train: router_aux_loss_coef weights a mixture-of-experts model's load-balancing loss, and {} is a dense model (no router): leave the option out", m.get().source).into());
    }
    let mut objective: Box<dyn Objective> = if run.objective == "sft" {
        let fmt = format_of(opts.get("format"), train_ds.0.records.first()).map_err(|e| -> Box<EvalAltResult> { e.to_string().into() })?;
        let tok_opts = TokenizeOptions { max_length: run.max_length, train_on_prompt: o.train_on_prompt.unwrap_or(false) };
        let train_on = if o.train_on.as_deref() == Some("last") { TrainOn::LastAssistantTurn } else { TrainOn::AllAssistantTurns };
        let train_ex = examples(&ctx, m, train_ds, &fmt, &tok_opts, train_on)?;
        let eval_ex = match eval_ds {
            Some(d) => examples(&ctx, m, d, &fmt, &tok_opts, train_on)?,
            None => vec![],
        };
        Box::new(Sft::new(train_ex, eval_ex, o.router_aux_loss_coef))
    } else {
        guard("train", || preference_objective(&run.objective, o, m, train_ds, eval_ds.as_ref(), run.batch_size, run.eval_batch_size))?
    };
    let eval_generate = match opts.get("eval_generate") {
        None => None,
        Some(g) => {
            let mut g = g.clone().try_cast::<Map>().ok_or("train: eval_generate must be a map of evaluate's options (#{metrics, max_new_tokens, ...})")?;
            let ds = eval_ds.clone().ok_or("train: eval_generate scores the eval set: pass eval: a Dataset")?;
            // the eval records' prompts and references as training formats them, unless told otherwise
            if let Some(format) = opts.get("format").filter(|_| !g.contains_key("format")) {
                g.insert("format".into(), format.clone());
            }
            Some((m.clone(), ds, g))
        }
    };
    let mut hooks = hooks(&ctx, &opts, eval_generate)?;
    let (spec, source, cfg) = guard("train", || {
        anyhow::ensure!(!crate::nn::linear::adapters_disabled(), "train cannot run inside with_adapters_disabled (the adapters it trains are switched off there)");
        let model = m.get();
        let spec = model.lora.clone().ok_or_else(|| anyhow::anyhow!("the model has no LoRA adapters; call model.add_lora(#{{...}}) first"))?;
        let cfg = train_config(&run, &spec, model.tokenizer.pad_id, model.net.kind)?;
        Ok((spec, model.source.clone(), cfg))
    })?;
    guard("train", || {
        if m.get().net.kind != cfg.precision {
            trainer::set_precision(&mut m.get_mut("train")?.net, cfg.precision);
        }
        objective.prepare(&m.get().net, &BatchConfig { batch_size: run.eval_batch_size, ..cfg.batch.clone() })
    })?;
    // the model is only read from here on: callbacks may use it too
    let r = run_loop(&m.get().net, &spec, &source, objective.as_ref(), &cfg, &mut hooks)?;
    Ok(result_map(r, &run.output_dir))
}

/// `train` on an encoder-decoder model: supervised pairs (`format: "seq2seq"` reads `input` and
/// `target`, `"alpaca"` maps its prompt to the source and `output` to the target, or a function
/// returns `#{source, target}`), no packing, no preference objectives.
pub fn train_seq2seq(ctx: NativeCallContext, m: &super::seq2seq::Seq2SeqModel, opts: Map) -> Res<Map> {
    let run = parse_run(&opts)?;
    let o = &run.o;
    if run.objective != "sft" {
        return Err(format!("train: objective \"{}\" is for decoder models; an encoder-decoder model (T5) trains on source/target pairs (objective \"sft\")", run.objective).into());
    }
    if o.router_aux_loss_coef.is_some() {
        return Err("train: router_aux_loss_coef weights a mixture-of-experts model's load-balancing loss; an encoder-decoder model (T5) has no router: leave the option out".into());
    }
    if o.packing == Some(true) || o.train_on_prompt.is_some() || o.train_on.is_some() || opts.contains_key("eval_generate") {
        return Err("train: packing, train_on_prompt, train_on and eval_generate apply to decoder models; an encoder-decoder model (T5) trains on source/target pairs (score generations in an on_eval callback: model.generate and bleu / rouge_l)".into());
    }
    if m.0.borrow().lora.is_none() {
        return Err("train: the model has no LoRA adapters; call model.add_lora(#{...}) first".into());
    }
    let pairs = |ds: &Dataset| super::seq2seq::pairs(&ctx, m, ds, opts.get("format"), run.max_length);
    let train = pairs(&run.train)?;
    let eval = match &run.eval {
        Some(d) => pairs(d)?,
        None => vec![],
    };
    let mut hooks = hooks(&ctx, &opts, None)?;
    let (spec, source, cfg, objective) = guard("train", || {
        anyhow::ensure!(!crate::nn::linear::adapters_disabled(), "train cannot run inside with_adapters_disabled (the adapters it trains are switched off there)");
        let model = m.0.borrow();
        let spec = model.lora.clone().ok_or_else(|| anyhow::anyhow!("the model has no LoRA adapters; call model.add_lora(#{{...}}) first"))?;
        let cfg = train_config(&run, &spec, model.net.config.pad_token_id, model.net.kind)?;
        let objective = crate::train::seq2seq::Seq2SeqSft::new(train, eval, model.net.config.pad_token_id);
        Ok((spec, model.source.clone(), cfg, objective))
    })?;
    guard("train", || {
        let mut model = m.0.try_borrow_mut().map_err(|_| anyhow::anyhow!("the model is training; train cannot change it from inside a train callback"))?;
        trainer::set_precision(&mut model.net, cfg.precision);
        Ok(())
    })?;
    let r = run_loop(&m.0.borrow().net, &spec, &source, &objective, &cfg, &mut hooks)?;
    Ok(result_map(r, &run.output_dir))
}

/// The preference objective `name` over the records of `train` (and `eval`), tokenized as TRL
/// tokenizes them (errors name the record).
#[allow(clippy::too_many_arguments)]
fn preference_objective(name: &str, o: &TrainOptions, m: &Model, train: &Dataset, eval: Option<&Dataset>, batch_size: usize, eval_batch_size: usize) -> anyhow::Result<Box<dyn Objective>> {
    let model = m.get();
    let tok = &model.tokenizer;
    let beta = o.beta.unwrap_or(0.1);
    anyhow::ensure!(beta > 0.0, "beta must be positive, got {beta}");
    fn records(ds: Option<&Dataset>) -> Vec<(&serde_json::Value, String)> {
        ds.map(|d| d.0.records.iter().enumerate().map(|(i, r)| (r, d.0.place(i).to_string())).collect()).unwrap_or_default()
    }
    let (train, eval) = (records(Some(train)), records(eval));
    let max_length = o.max_length.unwrap_or(1024);
    // as TRL, an example whose prompt alone fills max_length is left out (no completion token
    // would be left to learn from)
    fn fitting<T>(mut items: Vec<T>, prompt_len: impl Fn(&T) -> usize, max_length: usize, split: &str) -> anyhow::Result<Vec<T>> {
        let before = items.len();
        let longest = items.iter().map(&prompt_len).max().unwrap_or(0);
        items.retain(|x| prompt_len(x) < max_length);
        if before > 0 && items.is_empty() {
            anyhow::bail!("every {split} prompt fills max_length {max_length} (the shortest leaves no completion token; the longest prompt has {longest} tokens): raise max_length");
        }
        if items.len() < before {
            tracing::warn!("{} {split} example(s) left out: their prompt alone fills max_length {max_length}", before - items.len());
        }
        Ok(items)
    }
    if name == "kto" {
        let judged = |rs: &[(&serde_json::Value, String)], split: &str| -> anyhow::Result<Vec<_>> {
            let items = rs.iter().map(|(r, at)| crate::data::preference::judged(r, at, tok)).collect::<anyhow::Result<Vec<_>>>()?;
            fitting(items, |j| j.prompt.len(), max_length, split)
        };
        let kind = Preference::Kto { beta, desirable_weight: o.desirable_weight.unwrap_or(1.0), undesirable_weight: o.undesirable_weight.unwrap_or(1.0) };
        let objective = PreferenceObjective::judged(kind, judged(&train, "training")?, judged(&eval, "evaluation")?, batch_size, eval_batch_size);
        return Ok(Box::new(objective.precompute_reference(o.precompute_ref_log_probs == Some(true)).router_aux_loss(o.router_aux_loss_coef)));
    }
    let kind = match name {
        "dpo" => Preference::Dpo { beta, loss: DpoLoss::parse(o.loss_type.as_deref().unwrap_or("sigmoid"), o.label_smoothing.unwrap_or(0.0))? },
        "orpo" => Preference::Orpo { beta },
        other => anyhow::bail!("unknown objective \"{other}\""),
    };
    let pairs = |rs: &[(&serde_json::Value, String)], split: &str| -> anyhow::Result<Vec<_>> {
        let items = rs.iter().map(|(r, at)| crate::data::preference::pair(r, at, tok)).collect::<anyhow::Result<Vec<_>>>()?;
        fitting(items, |p| p.prompt.len(), max_length, split)
    };
    let objective = PreferenceObjective::pairs(kind, pairs(&train, "training")?, pairs(&eval, "evaluation")?);
    Ok(Box::new(objective.precompute_reference(o.precompute_ref_log_probs == Some(true)).router_aux_loss(o.router_aux_loss_coef)))
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("train")
        .with_comments(["/// Trains the model's LoRA adapters on #{train, eval, format, ...}; returns #{steps, train_loss, eval_loss, stopped_early, ...}."])
        .with_params_info(["model: Model", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: Model, opts: Map| -> Res<Map> {
            let mut m = m;
            train_fn(ctx, &mut m, opts)
        });
}
