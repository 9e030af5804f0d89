//! `evaluate(model, dataset, #{...})`: generates an answer for every record's prompt, in batches,
//! and scores the answers against the records' references.

use super::dataset::Dataset;
use super::model::Model;
use crate::data::format::{format_builtin, Formatted, TrainOn};
use crate::data::format::{tokenize, Example, TokenizeOptions, IGNORE};
use crate::generate::{Sampling, Scoring};
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
    /// Any of `exact_match`, `bleu`, `rouge_l` (default: these three) and `loss`.
    pub metrics: Option<Vec<String>>,
    pub max_new_tokens: Option<usize>,
    /// Prompts decoded together (16).
    pub batch_size: Option<usize>,
    /// (prompt, prediction, reference) triples returned, the first ones (3).
    pub samples: Option<usize>,
}

impl EvaluateOptions {
    /// The metrics asked for, else [`DEFAULT_METRICS`].
    fn metrics(&self) -> Vec<String> {
        self.metrics.clone().unwrap_or_else(|| DEFAULT_METRICS.iter().map(|s| s.to_string()).collect())
    }
}

pub const METRICS: &[&str] = &["exact_match", "bleu", "rouge_l", "loss"];

/// The metrics scored when `metrics` is left out.
const DEFAULT_METRICS: &[&str] = &["exact_match", "bleu", "rouge_l"];

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

/// A record's prompt and reference answer, tokenized as `train` tokenizes them.
struct Pair {
    prompt: String,
    /// The prompt's tokens: a pair's prompt as [`encode_prompt`](crate::tokenizer::Tokenizer::encode_prompt)
    /// gives them, a conversation's start as its template renders them (no special tokens added).
    ids: Vec<i64>,
    reference: String,
    /// The record as formatted, for [`Pair::example`].
    formatted: Formatted,
}

impl Pair {
    /// The whole record as `train` tokenizes it (uncut), the reference's tokens labelled.
    fn example(&self, tok: &crate::tokenizer::Tokenizer) -> anyhow::Result<Example> {
        tokenize(&self.formatted, tok, &TokenizeOptions { max_length: 0, train_on_prompt: false })
    }
}

/// Each record as a [`Pair`]: by a format function, a template, or, for `messages` records, the
/// conversation before the last message rendered with the chat template and that message's
/// content.
fn pairs(ctx: &NativeCallContext, m: &Model, ds: &Dataset, format: Option<&Dynamic>) -> Res<Vec<Pair>> {
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
        let tok = &model.tokenizer;
        let failed = |e: anyhow::Error| format!("evaluate: {at}: {e:#}");
        out.push(match &formatted {
            Formatted::Pair { prompt, response } => Pair { ids: tok.encode_prompt(prompt).map_err(failed)?, prompt: prompt.clone(), reference: response.clone(), formatted },
            Formatted::Chat { text, learn } => {
                let Some(last) = learn.last() else { return Err(format!("evaluate: {at}: the conversation has no assistant message to compare with").into()) };
                let reference = r
                    .get("messages")
                    .and_then(|m| m.as_array()?.last()?.get("content")?.as_str().map(String::from))
                    .unwrap_or_else(|| text[last.clone()].to_string());
                let prompt = text[..last.start].to_string();
                Pair { ids: tok.encode(&prompt, false).map_err(failed)?, prompt, reference, formatted }
            }
            Formatted::Text(_) => return Err(format!("evaluate: {at}: the format gives plain text; evaluation needs a prompt and a reference (#{{prompt, response}})").into()),
        });
    }
    Ok(out)
}

/// `evaluate(model, dataset, opts)`.
pub fn evaluate(ctx: &NativeCallContext, m: &Model, ds: &Dataset, opts: &Map) -> Res<Map> {
    Ok(evaluate_scoring(ctx, m, ds, opts, None)?.0)
}

/// [`evaluate`], as `train`'s `eval_generate` runs it: with `examples` (the training objective's
/// eval examples, one per record), also their summed label loss, from the forward of the prompts
/// the answers are generated from; `None` when an example and its record's prompt are not one
/// the other's prefix (then the objective scores them in a pass of its own). The `loss` metric
/// scores each reference the same way: its tokens as `train` tokenizes the record (a pair's
/// response and EOS after the prompt; a conversation's last assistant turn as its template
/// renders it).
pub fn evaluate_scoring(ctx: &NativeCallContext, m: &Model, ds: &Dataset, opts: &Map, examples: Option<&[Example]>) -> Res<(Map, Option<f64>)> {
    let o = options(opts)?;
    let pairs = pairs(ctx, m, ds, opts.get("format"))?;
    if pairs.is_empty() {
        return Err("evaluate: the dataset is empty".into());
    }
    let metrics = o.metrics();
    let wants_loss = metrics.iter().any(|m| m == "loss");
    let sampling = Sampling { max_new_tokens: o.max_new_tokens.unwrap_or(64), ..Default::default() };
    let started = std::time::Instant::now();
    let batch_size = o.batch_size.unwrap_or(16);
    let (predictions, scored, loss) = guard("evaluate", || {
        let model = m.get();
        let ids: Vec<Vec<i64>> = pairs.iter().map(|p| p.ids.clone()).collect();
        let rows = match examples {
            Some(e) => {
                let rows = continuations(&ids, e).ok();
                if rows.is_none() {
                    tracing::debug!("evaluate: the objective's eval examples do not begin with these prompts (another format or tokenization): its eval_loss takes a pass of its own");
                }
                rows
            }
            None if wants_loss => {
                let own = pairs.iter().map(|p| p.example(&model.tokenizer)).collect::<anyhow::Result<Vec<_>>>()?;
                Some(continuations(&ids, &own).map_err(|i| {
                    anyhow::anyhow!("evaluate: the `loss` metric: {}: the prompt's tokens alone are not the start of the whole record's tokens (a tokenizer merge across the prompt's end)", ds.0.place(i))
                })?)
            }
            None => None,
        };
        let scoring: Option<Vec<Scoring>> = rows.as_ref().map(|r| r.iter().map(|(continuation, labels)| Scoring { continuation, labels }).collect());
        let (predictions, loss) = match crate::dist::group()? {
            Some(pg) => generate_sharded(pg, &model, &ids, scoring.as_deref(), &sampling, batch_size)?,
            None => super::model::generate_scored(&model, &ids, scoring.as_deref(), &sampling, batch_size)?,
        };
        let tokens = rows.iter().flatten().map(|(_, labels)| labels.iter().skip(1).filter(|&&l| l != IGNORE).count()).sum::<usize>();
        Ok((predictions, tokens, loss))
    })?;
    let (prompts, references): (Vec<String>, Vec<String>) = pairs.into_iter().map(|p| (p.prompt, p.reference)).unzip();
    let mut out = scores(&metrics, &o, &prompts, &predictions, &references, started)?;
    if wants_loss {
        out.insert("loss".into(), Dynamic::from(loss.unwrap_or(f64::NAN) / scored as f64));
    }
    Ok((out, examples.and(loss)))
}

/// A scored row after its prompt: the continuation's tokens, and the labels over prompt and
/// continuation.
type ScoredRow = (Vec<i64>, Vec<i64>);

/// Each example's tokens after its record's prompt `ids`, and its labels over prompt and those
/// tokens, when every example and its prompt are one the other's prefix (an example cut at
/// `max_length` may end inside its prompt: it then continues with nothing); else the index of the
/// first that is not.
fn continuations(ids: &[Vec<i64>], examples: &[Example]) -> Result<Vec<ScoredRow>, usize> {
    if ids.len() != examples.len() {
        return Err(ids.len().min(examples.len()));
    }
    ids.iter()
        .zip(examples)
        .enumerate()
        .map(|(i, (p, e))| {
            let n = p.len().min(e.input_ids.len());
            if p[..n] != e.input_ids[..n] {
                return Err(i);
            }
            let continuation = e.input_ids[n..].to_vec();
            let mut labels = e.labels.clone();
            labels.resize(p.len() + continuation.len(), IGNORE);
            Ok((continuation, labels))
        })
        .collect()
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
    let metrics = o.metrics();
    if metrics.iter().any(|m| m == "loss") {
        return Err("evaluate: the `loss` metric is for a decoder model; an encoder-decoder model's loss is train's eval_loss".into());
    }
    scores(&metrics, &o, &sources, &predictions, &references, started)
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

/// `evaluate`'s result: the text metrics of the predictions against the references (`loss` is
/// the caller's), the first samples, the record count and the seconds since `started`.
fn scores(metrics: &[String], o: &EvaluateOptions, prompts: &[String], predictions: &[String], references: &[String], started: std::time::Instant) -> Res<Map> {
    let mut out = Map::new();
    for name in metrics {
        let score = match name.as_str() {
            "exact_match" => exact_match_corpus(predictions, references),
            "bleu" => corpus_bleu(predictions, references),
            "rouge_l" => rouge_l_corpus(predictions, references),
            "loss" => continue,
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
/// buffer in which each rank wrote only its own records'), so the scores are the same everywhere;
/// so is the scored loss (summed over the ranks).
fn generate_sharded(pg: &crate::dist::ProcessGroup, model: &crate::models::LoadedModel, ids: &[Vec<i64>], scoring: Option<&[Scoring]>, s: &Sampling, batch_size: usize) -> anyhow::Result<(Vec<String>, Option<f64>)> {
    let (rank, world) = (crate::dist::rank(), crate::dist::world_size());
    let mine: Vec<usize> = (rank..ids.len()).step_by(world).collect();
    let scoring = scoring.map(|sc| mine.iter().map(|&i| sc[i]).collect::<Vec<_>>());
    let (local, loss) = super::model::generate_scored(model, &mine.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>(), scoring.as_deref(), s, batch_size)?;
    tracing::info!("evaluate: rank {rank} generated {} of {} records", mine.len(), ids.len());
    let loss = match loss {
        Some(l) => Some(pg.sum_f64(&[l])?[0]),
        None => None,
    };
    let mut lengths = vec![0f64; ids.len()];
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
    Ok(((0..ids.len()).map(|i| String::from_utf8_lossy(&bytes[offsets[i]..offsets[i] + lengths[i]]).into_owned()).collect(), loss))
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("evaluate")
        .with_comments(["/// Generates an answer for each record's prompt (greedy, in batches) and scores it against the record's reference: #{exact_match, bleu, rouge_l, samples: [#{prompt, prediction, reference}], records, seconds}; options #{format, metrics (\"loss\" adds the references' mean token loss, from the prompts' forward), max_new_tokens, batch_size, samples}."])
        .with_params_info(["model: &mut Model", "dataset: Dataset", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: &mut Model, ds: Dataset, opts: Map| -> Res<Map> { evaluate(&ctx, m, &ds, &opts) });
    FuncRegistration::new("evaluate")
        .with_comments(["/// On an encoder-decoder model (T5): generates each record's target from its source (format \"seq2seq\", \"alpaca\" or fn(record) -> #{source, target}, as train reads them) and scores it, batch_size sources at a time: the same map and options."])
        .with_params_info(["model: &mut Seq2SeqModel", "dataset: Dataset", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: &mut super::seq2seq::Seq2SeqModel, ds: Dataset, opts: Map| -> Res<Map> { evaluate_seq2seq(&ctx, m, &ds, &opts) });
}
