#![allow(deprecated)] // FnPtr::from_fn is marked volatile, not deprecated
//! The `ft/callbacks` module (`import "ft/callbacks" as cb;`): each function returns a function
//! pointer with its own state, callable from train's `on_log` / `on_eval` / `on_step`, alone or
//! in an array: `on_eval: [cb::early_stopping(#{patience: 3}), cb::sample_printer(model, ["Hi"])]`.

use super::model::Model;
use crate::script::options::{parse, to_json};
use crate::train::callbacks::EarlyStopping;
use rhai::{Array, Dynamic, EvalAltResult, FnPtr, FuncRegistration, Map, Module};
use serde::Deserialize;
use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `cb::early_stopping(#{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingOptions {
    /// Metric to watch (default `eval_loss`).
    pub metric: Option<String>,
    /// Reports without improvement before stopping (default 3).
    pub patience: Option<usize>,
    /// Smallest change that counts as an improvement (default 0).
    pub min_delta: Option<f64>,
    /// `min` (default) or `max`.
    pub mode: Option<String>,
}

/// Options of `cb::sample_printer(model, prompts, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplePrinterOptions {
    pub max_new_tokens: Option<usize>,
}

fn metrics_arg(args: &mut [&mut Dynamic]) -> Res<Map> {
    args.first()
        .and_then(|a| (**a).clone().try_cast::<Map>())
        .ok_or_else(|| "callback: expected a metrics map".into())
}

fn early_stopping(opts: Map) -> Res<FnPtr> {
    let o: EarlyStoppingOptions = parse("early_stopping", &opts)?;
    let maximize = match o.mode.as_deref() {
        None | Some("min") => false,
        Some("max") => true,
        Some(m) => return Err(format!("early_stopping: mode must be \"min\" or \"max\", got \"{m}\"").into()),
    };
    let state = Rc::new(RefCell::new(EarlyStopping::new(
        o.metric.as_deref().unwrap_or("eval_loss"),
        o.patience.unwrap_or(3),
        o.min_delta.unwrap_or(0.0),
        maximize,
    )));
    FnPtr::from_fn("early_stopping", move |_ctx, args| {
        let m = metrics_arg(args)?;
        let mut s = state.borrow_mut();
        let Some(v) = m.get(s.metric.as_str()).and_then(|v| v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64))) else {
            // a metric the report does not hold would never stop the run
            let keys: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
            let hint = crate::script::options::did_you_mean(&s.metric, keys.iter().copied()).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default();
            return Err(format!(
                "early_stopping: this report has no metric `{}`{hint}; it holds {} (eval metrics reach on_eval, loss and lr on_step and on_log)",
                s.metric,
                keys.join(", ")
            )
            .into());
        };
        if s.update(v) {
            let step = m.get("step").map(|s| s.to_string()).unwrap_or_default();
            tracing::info!(
                "early stopping at step {step}: {} has not improved on {:.6} for {} report(s)",
                s.metric,
                s.best.unwrap_or(f64::NAN),
                s.patience
            );
            return Ok(Dynamic::from("stop"));
        }
        Ok(Dynamic::UNIT)
    })
}

fn sample_printer(model: Model, prompts: Array, opts: Map) -> Res<FnPtr> {
    let o: SamplePrinterOptions = parse("sample_printer", &opts)?;
    let prompts: Vec<String> = prompts
        .into_iter()
        .map(|p| p.into_string().map_err(|t| -> Box<EvalAltResult> { format!("sample_printer: prompts must be strings, got {t}").into() }))
        .collect::<Res<_>>()?;
    let sampling = crate::generate::Sampling { max_new_tokens: o.max_new_tokens.unwrap_or(48), ..Default::default() };
    FnPtr::from_fn("sample_printer", move |_ctx, args| {
        let m = metrics_arg(args)?;
        let step = m.get("step").map(|s| s.to_string()).unwrap_or_default();
        let inner = model.get();
        // the prompts decoded together
        let outs = crate::script::options::guard("sample_printer", || super::model::generate_texts(&inner, &prompts, &sampling, prompts.len()))?;
        for (p, out) in prompts.iter().zip(outs) {
            tracing::info!("sample at step {step}: {p:?} → {out:?}");
        }
        Ok(Dynamic::UNIT)
    })
}

fn metrics_logger(path: &str) -> Res<FnPtr> {
    let path = crate::api::write_path(path).map_err(|e| format!("metrics_logger: {e:#}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("metrics_logger: cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("metrics_logger: cannot open {}: {e}", path.display()))?;
    let file = Rc::new(RefCell::new(file));
    FnPtr::from_fn("metrics_logger", move |_ctx, args| {
        let m = metrics_arg(args)?;
        let line = to_json(&Dynamic::from_map(m)).to_string();
        writeln!(file.borrow_mut(), "{line}").map_err(|e| format!("metrics_logger: {e}"))?;
        Ok(Dynamic::UNIT)
    })
}

/// The `ft/callbacks` module, resolved by `import "ft/callbacks"` (its functions have no global name).
pub fn module() -> Module {
    let mut m = Module::new();
    FuncRegistration::new("early_stopping")
        .with_comments(["/// Returns \"stop\" once `metric` has not improved by more than `min_delta` for `patience` consecutive reports: #{metric (eval_loss), patience (3), min_delta (0.0), mode (min|max)}."])
        .with_params_info(["options: Map", "FnPtr"])
        .set_into_module(&mut m, early_stopping);
    FuncRegistration::new("sample_printer")
        .with_comments(["/// Logs greedy generations of fixed prompts each time it runs (e.g. on_eval), 48 new tokens each."])
        .with_params_info(["model: Model", "prompts: Array", "FnPtr"])
        .set_into_module(&mut m, |model: Model, prompts: Array| sample_printer(model, prompts, Map::new()));
    FuncRegistration::new("sample_printer")
        .with_comments(["/// sample_printer with #{max_new_tokens (48)}."])
        .with_params_info(["model: Model", "prompts: Array", "options: Map", "FnPtr"])
        .set_into_module(&mut m, sample_printer);
    FuncRegistration::new("metrics_logger")
        .with_comments(["/// Appends every metrics map it receives to a JSONL file."])
        .with_params_info(["path: &str", "FnPtr"])
        .set_into_module(&mut m, metrics_logger);
    m.build_index();
    m
}
