//! `evaluate(model, dataset, #{...})`: generates an answer for every record's prompt, in batches,
//! and scores the answers against the records' references.

use super::dataset::Dataset;
use super::model::Model;
use crate::data::format::{format_builtin, Formatted, TrainOn};
use crate::generate::Sampling;
use crate::script::options::{from_json, guard, parse, to_json};
use crate::train::metrics::{corpus_bleu, exact_match_corpus, rouge_l_corpus};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};
use serde::de::IgnoredAny;
use serde::Deserialize;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `evaluate(model, dataset, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateOptions {
    /// A template name (`alpaca`, `chatml`, `chat_template`) or a function returning `#{prompt, response}`.
    pub format: Option<IgnoredAny>,
    /// Any of `exact_match`, `bleu`, `rouge_l` (default: all three).
    pub metrics: Option<Vec<String>>,
    pub max_new_tokens: Option<usize>,
    /// Prompts decoded together (16).
    pub batch_size: Option<usize>,
    /// (prompt, prediction, reference) triples returned, the first ones (3).
    pub samples: Option<usize>,
}

pub const METRICS: &[&str] = &["exact_match", "bleu", "rouge_l"];

/// `check`'s view of the options: known keys, known metric names.
pub fn validate_options(json: &serde_json::Value) -> Result<(), String> {
    crate::script::options::validate::<EvaluateOptions>(json)?;
    for m in json.get("metrics").and_then(|v| v.as_array()).into_iter().flatten() {
        if let Some(name) = m.as_str() {
            crate::script::options::one_of("metrics", name, METRICS)?;
        }
    }
    Ok(())
}

/// Each record as (prompt, reference): by a format function, a template, or, for `messages`
/// records, the conversation before the last message rendered with the chat template and that
/// message's content.
fn pairs(ctx: &NativeCallContext, m: &Model, ds: &Dataset, format: Option<&Dynamic>) -> Res<Vec<(String, String)>> {
    let model = m.get();
    let records = &ds.0.records;
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let at = ds.0.place(i).to_string();
        let formatted = match format {
            Some(f) if f.is_fnptr() => {
                let f = f.clone().cast::<FnPtr>();
                let v: Dynamic = crate::script::limits::callback(|| f.call_within_context(ctx, (from_json(r),)))
                    .map_err(|e| crate::script::prefix_error(e, &format!("evaluate: the format function failed on {at}")))?;
                Formatted::from_value(&to_json(&v), &at).map_err(|e| format!("evaluate: {e}"))?
            }
            Some(f) => {
                let name = f.clone().into_string().map_err(|t| format!("evaluate: format must be a template name or a function, got {t}"))?;
                format_builtin(&name, r, &at, &model.tokenizer, TrainOn::LastAssistantTurn).map_err(|e| format!("evaluate: {e:#}"))?
            }
            None if r.get("messages").is_some() => format_builtin("chat_template", r, &at, &model.tokenizer, TrainOn::LastAssistantTurn).map_err(|e| format!("evaluate: {e:#}"))?,
            None => format_builtin("alpaca", r, &at, &model.tokenizer, TrainOn::LastAssistantTurn).map_err(|e| format!("evaluate: {e:#} (or pass format: a template name or a function returning #{{prompt, response}})"))?,
        };
        out.push(match formatted {
            Formatted::Pair { prompt, response } => (prompt, response),
            Formatted::Chat { text, learn } => {
                let Some(last) = learn.last() else { return Err(format!("evaluate: {at}: the conversation has no assistant message to compare with").into()) };
                let reference = r
                    .get("messages")
                    .and_then(|m| m.as_array()?.last()?.get("content")?.as_str().map(String::from))
                    .unwrap_or_else(|| text[last.clone()].to_string());
                (text[..last.start].to_string(), reference)
            }
            Formatted::Text(_) => return Err(format!("evaluate: {at}: the format gives plain text; evaluation needs a prompt and a reference (#{{prompt, response}})").into()),
        });
    }
    Ok(out)
}

/// `evaluate(model, dataset, opts)`, also run by `train`'s `eval_generate`.
pub fn evaluate(ctx: &NativeCallContext, m: &Model, ds: &Dataset, opts: &Map) -> Res<Map> {
    let o = options(opts)?;
    let pairs = pairs(ctx, m, ds, opts.get("format"))?;
    if pairs.is_empty() {
        return Err("evaluate: the dataset is empty".into());
    }
    let (prompts, references): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let sampling = Sampling { max_new_tokens: o.max_new_tokens.unwrap_or(64), ..Default::default() };
    let started = std::time::Instant::now();
    let batch_size = o.batch_size.unwrap_or(16);
    let predictions = guard("evaluate", || {
        let model = m.get();
        match crate::dist::group()? {
            Some(pg) => generate_sharded(pg, &model, &prompts, &sampling, batch_size),
            None => super::model::generate_texts(&model, &prompts, &sampling, batch_size),
        }
    })?;
    scores(&o, &prompts, &predictions, &references, started)
}

/// `evaluate` on an encoder-decoder model: each record's `(source, target)` by its format
/// (`"seq2seq"`, `"alpaca"` or a function returning `#{source, target}`, as `train` reads
/// them), the source's generation scored against the target.
pub fn evaluate_seq2seq(ctx: &NativeCallContext, m: &super::seq2seq::Seq2SeqModel, ds: &Dataset, opts: &Map) -> Res<Map> {
    let o = options(opts)?;
    let mut pairs = vec![];
    for (i, r) in ds.0.records.iter().enumerate() {
        pairs.push(super::seq2seq::texts(ctx, "evaluate", opts.get("format"), r, &ds.0.place(i).to_string())?);
    }
    if pairs.is_empty() {
        return Err("evaluate: the dataset is empty".into());
    }
    let (sources, references): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let sampling = Sampling { max_new_tokens: o.max_new_tokens.unwrap_or(64), ..Default::default() };
    let started = std::time::Instant::now();
    let predictions = guard("evaluate", || m.0.borrow().generate(&sources, &sampling, o.batch_size.unwrap_or(16)))?;
    scores(&o, &sources, &predictions, &references, started)
}

/// The options of an `evaluate` call, checked.
fn options(opts: &Map) -> Res<EvaluateOptions> {
    let mut json = to_json(&Dynamic::from_map(opts.clone()));
    if opts.get("format").is_some_and(|f| f.is_fnptr()) {
        json.as_object_mut().map(|o| o.remove("format"));
    }
    validate_options(&json).map_err(|e| format!("evaluate: {e}"))?;
    parse("evaluate", opts)
}

/// `evaluate`'s result: the metrics of the predictions against the references, the first
/// samples, the record count and the seconds since `started`.
fn scores(o: &EvaluateOptions, prompts: &[String], predictions: &[String], references: &[String], started: std::time::Instant) -> Res<Map> {
    let metrics: Vec<String> = o.metrics.clone().unwrap_or_else(|| METRICS.iter().map(|s| s.to_string()).collect());
    let mut out = Map::new();
    for name in &metrics {
        let score = match name.as_str() {
            "exact_match" => exact_match_corpus(predictions, references),
            "bleu" => corpus_bleu(predictions, references),
            "rouge_l" => rouge_l_corpus(predictions, references),
            other => return Err(format!("evaluate: unknown metric `{other}`").into()),
        };
        out.insert(name.as_str().into(), Dynamic::from(score));
    }
    let samples: Array = prompts
        .iter()
        .zip(predictions)
        .zip(references)
        .take(o.samples.unwrap_or(3))
        .map(|((p, pred), r)| {
            let mut s = Map::new();
            s.insert("prompt".into(), Dynamic::from(p.clone()));
            s.insert("prediction".into(), Dynamic::from(pred.clone()));
            s.insert("reference".into(), Dynamic::from(r.clone()));
            Dynamic::from_map(s)
        })
        .collect();
    out.insert("samples".into(), Dynamic::from_array(samples));
    out.insert("records".into(), Dynamic::from(prompts.len() as i64));
    out.insert("seconds".into(), Dynamic::from(started.elapsed().as_secs_f64()));
    Ok(out)
}

/// Under `ftscript launch`: rank `r` of `w` generates for the records `r, r + w, r + 2w, ...`,
/// and every rank gets every prediction back (their UTF-8 bytes summed over the ranks into one
/// buffer in which each rank wrote only its own records'), so the scores are the same everywhere.
fn generate_sharded(pg: &crate::dist::ProcessGroup, model: &crate::models::LoadedModel, prompts: &[String], s: &Sampling, batch_size: usize) -> anyhow::Result<Vec<String>> {
    let (rank, world) = (crate::dist::rank(), crate::dist::world_size());
    let mine: Vec<usize> = (rank..prompts.len()).step_by(world).collect();
    let local = super::model::generate_texts(model, &mine.iter().map(|&i| prompts[i].clone()).collect::<Vec<_>>(), s, batch_size)?;
    tracing::info!("evaluate: rank {rank} generated {} of {} records", mine.len(), prompts.len());
    let mut lengths = vec![0f64; prompts.len()];
    for (&i, text) in mine.iter().zip(&local) {
        lengths[i] = text.len() as f64;
    }
    let lengths: Vec<usize> = pg.sum_f64(&lengths)?.into_iter().map(|l| l as usize).collect();
    let offsets: Vec<usize> = lengths.iter().scan(0, |at, &l| Some(std::mem::replace(at, *at + l))).collect();
    let mut bytes = vec![0i32; lengths.iter().sum::<usize>().max(1)];
    for (&i, text) in mine.iter().zip(&local) {
        for (k, b) in text.bytes().enumerate() {
            bytes[offsets[i] + k] = b as i32;
        }
    }
    let all = tch::Tensor::from_slice(&bytes).to_device(pg.device);
    pg.all_reduce_sum(&all)?;
    let bytes: Vec<u8> = Vec::<i32>::try_from(all.to_device(tch::Device::Cpu))?.into_iter().map(|b| b as u8).collect();
    Ok((0..prompts.len()).map(|i| String::from_utf8_lossy(&bytes[offsets[i]..offsets[i] + lengths[i]]).into_owned()).collect())
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("evaluate")
        .with_comments(["/// Generates an answer for each record's prompt (greedy, in batches) and scores it against the record's reference: #{exact_match, bleu, rouge_l, samples: [#{prompt, prediction, reference}], records, seconds}; options #{format, metrics, max_new_tokens, batch_size, samples}."])
        .with_params_info(["model: &mut Model", "dataset: Dataset", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: &mut Model, ds: Dataset, opts: Map| -> Res<Map> { evaluate(&ctx, m, &ds, &opts) });
    FuncRegistration::new("evaluate")
        .with_comments(["/// On an encoder-decoder model (T5): generates each record's target from its source (format \"seq2seq\", \"alpaca\" or fn(record) -> #{source, target}, as train reads them) and scores it, batch_size sources at a time: the same map and options."])
        .with_params_info(["model: &mut Seq2SeqModel", "dataset: Dataset", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: &mut super::seq2seq::Seq2SeqModel, ds: Dataset, opts: Map| -> Res<Map> { evaluate_seq2seq(&ctx, m, &ds, &opts) });
}
