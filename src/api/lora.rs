//! LoRA on a `Model`: `add_lora`, `save_adapter`, `load_adapter`, `save_merged`,
//! `with_adapters_disabled`, `trainable_parameters`, `print_trainable_parameters`.

use super::model::Model;
use crate::nn::peft::{self, LoraSpec, Targets};
use crate::script::options::{guard, parse};
use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};
use serde::Deserialize;
use tch::Kind;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Options of `model.add_lora(#{...})`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraOptions {
    /// Rank (default 8).
    pub r: Option<i64>,
    /// Scaling numerator (default 16): the update is scaled by alpha / r.
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    /// Module names (`["q_proj", "v_proj"]`), `"all-linear"`, or a regex over module paths.
    pub targets: Option<serde_json::Value>,
    /// Scale by alpha / √r (rank-stabilised LoRA).
    pub use_rslora: Option<bool>,
    /// DoRA: learn each output row's magnitude apart from its direction (peft's `use_dora`).
    pub use_dora: Option<bool>,
    /// Tokens (strings or ids) whose embedding rows train (peft's `trainable_token_indices`).
    pub trainable_tokens: Option<Vec<serde_json::Value>>,
    /// Modules trained whole beside the adapters (peft's `modules_to_save`): `embed_tokens`, `lm_head`.
    pub modules_to_save: Option<Vec<String>>,
    /// Seed of A's random initialisation (default 0): the same seed gives the same adapters.
    pub seed: Option<u64>,
    /// Expert stacks of a mixture-of-experts model adapted whole (peft's `target_parameters`):
    /// `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`.
    pub target_parameters: Option<Vec<String>>,
}

/// Options of `model.add_adalora(#{...})`, peft's `AdaLoraConfig` names and defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaLoraOptions {
    /// Initial rank of every adapted module (12).
    pub init_r: Option<i64>,
    /// Average rank the budget ends at (8).
    pub target_r: Option<i64>,
    /// Steps at the full budget before it starts falling (0).
    pub tinit: Option<usize>,
    /// Final steps at the target budget, ranks fixed (0).
    pub tfinal: Option<usize>,
    /// Steps between two re-allocations (1).
    #[serde(rename = "deltaT")]
    pub delta_t: Option<usize>,
    /// EMA coefficients of the importance and of its uncertainty (0.85, 0.85).
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    /// Weight of the orthogonality penalty on A and B (0.5).
    pub orth_reg_weight: Option<f64>,
    /// The step count the schedule spans (default: the run's).
    pub total_step: Option<usize>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub targets: Option<serde_json::Value>,
    pub seed: Option<u64>,
}

/// Options of `model.add_tokens(tokens, #{...})`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddTokensOptions {
    /// Special tokens (default false): skipped when decoding, never split or normalized.
    pub special: Option<bool>,
}

/// Options of `model.save_merged(dir, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeOptions {
    /// `fp32`, `fp16`, `bf16` (default: the model's dtype; fp32 stays fp32).
    pub dtype: Option<String>,
    /// Largest shard, e.g. `"5GB"`, `"500MB"` (default 5GB).
    pub max_shard_size: Option<String>,
}

impl MergeOptions {
    /// The dtype to write (the model's, `kind`, by default) and the largest shard in bytes.
    pub(crate) fn resolve(&self, kind: Kind) -> anyhow::Result<(Kind, usize)> {
        let kind = match self.dtype.as_deref() {
            Some(d) => crate::models::parse_dtype(d, None)?,
            None => kind,
        };
        Ok((kind, crate::script::options::parse_bytes(self.max_shard_size.as_deref().unwrap_or("5GB"))? as usize))
    }
}

/// `save_adapter`: the adapter of `net` in peft's format and the tokenizer's files, in `dir`.
pub(crate) fn save_adapter_and_tokenizer(net: &dyn peft::Adapted, spec: Option<&LoraSpec>, source: &str, tokenizer: &crate::tokenizer::Tokenizer, dir: &str) -> anyhow::Result<()> {
    let spec = spec.ok_or_else(|| anyhow::anyhow!("the model has no LoRA adapters (call add_lora or load_adapter first)"))?;
    let dir = &crate::api::write_path(dir)?;
    peft::save_adapter(net, spec, source, dir)?;
    tokenizer.save(dir)?;
    tracing::info!("saved adapter to {}", dir.display());
    Ok(())
}

fn targets_of(v: Option<serde_json::Value>, default: &[&str]) -> anyhow::Result<Targets> {
    Ok(match v {
        None => Targets::Names(default.iter().map(|s| s.to_string()).collect()),
        Some(serde_json::Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(serde_json::Value::String(s)) => Targets::Regex(s),
        Some(serde_json::Value::Array(a)) => Targets::Names(
            a.iter()
                .map(|v| v.as_str().map(String::from).ok_or_else(|| anyhow::anyhow!("add_lora: targets must be strings, got {v}")))
                .collect::<anyhow::Result<_>>()?,
        ),
        Some(other) => anyhow::bail!("add_lora: targets must be an array of names, \"all-linear\" or a regex, got {other}"),
    })
}

/// The LoRA settings of `add_lora`'s options (`default` targets when none are named), without
/// trainable tokens or whole modules.
pub(crate) fn spec_of(o: &LoraOptions, default: &[&str]) -> anyhow::Result<LoraSpec> {
    Ok(LoraSpec {
        r: o.r.unwrap_or(8),
        alpha: o.alpha.unwrap_or(16.0),
        dropout: o.dropout.unwrap_or(0.0),
        targets: targets_of(o.targets.clone(), default)?,
        use_rslora: o.use_rslora.unwrap_or(false),
        use_dora: o.use_dora.unwrap_or(false),
        trainable_tokens: vec![],
        modules_to_save: vec![],
        adalora: None,
        seed: o.seed.unwrap_or(0),
        target_parameters: o.target_parameters.clone().unwrap_or_default(),
    })
}

/// Adds the adapters `spec` describes (fp32) to the model and records it; logs what was added.
fn install(m: &mut crate::models::LoadedModel, spec: LoraSpec, what: &str) -> anyhow::Result<()> {
    let names = peft::add_lora(&mut m.net, &spec, Kind::Float)?;
    tracing::info!("added {what} r={} alpha={} to {} layers", spec.r, spec.alpha, names.len());
    m.lora = Some(spec);
    Ok(())
}

/// (trainable, total) parameter counts.
pub fn parameter_counts(m: &Model) -> (i64, i64) {
    let m = m.get();
    let trainable: i64 = peft::adapter_tensors(&m.net).iter().map(|(_, t)| t.numel() as i64).sum();
    let base = m.net.num_params() as i64;
    (trainable, base + trainable)
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("add_lora")
        .with_comments(["/// Adds LoRA adapters #{r, alpha, dropout, targets, use_rslora, use_dora, trainable_tokens, modules_to_save, target_parameters, seed} (defaults 8, 16, 0.0, [\"q_proj\",\"v_proj\"]); target_parameters adapts a mixture-of-experts model's expert stacks; only adapters train."])
        .with_params_info(["model: &mut Model", "options: Map", "Model"])
        .register_into_engine(engine, |m: &mut Model, opts: Map| -> Res<Model> {
            let o: LoraOptions = parse("add_lora", &opts)?;
            guard("add_lora", || {
                let mut inner = m.get_mut("add_lora")?;
                let trainable_tokens = o
                    .trainable_tokens
                    .iter()
                    .flatten()
                    .map(|t| match t {
                        serde_json::Value::String(s) => inner.tokenizer.token_to_id(s).ok_or_else(|| anyhow::anyhow!("add_lora: trainable token `{s}` is not a token of the tokenizer (add it first: model.add_tokens([\"{s}\"]))")),
                        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| anyhow::anyhow!("add_lora: trainable token {n} is not a token id")),
                        other => Err(anyhow::anyhow!("add_lora: trainable_tokens holds {other}; give token strings or ids")),
                    })
                    .collect::<anyhow::Result<_>>()?;
                let spec = LoraSpec { trainable_tokens, modules_to_save: o.modules_to_save.clone().unwrap_or_default(), ..spec_of(&o, &["q_proj", "v_proj"])? };
                let what = if spec.use_dora { "DoRA" } else { "LoRA" };
                install(&mut inner, spec, what)
            })?;
            Ok(m.clone())
        });
    FuncRegistration::new("add_adalora")
        .with_comments(["/// Adds AdaLoRA adapters #{init_r (12), target_r (8), tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight (0.5), total_step, alpha, dropout, targets, seed}: ranks re-allocated by importance inside train, saved in peft's AdaLoRA format."])
        .with_params_info(["model: &mut Model", "options: Map", "Model"])
        .register_into_engine(engine, |m: &mut Model, opts: Map| -> Res<Model> {
            let o: AdaLoraOptions = parse("add_adalora", &opts)?;
            guard("add_adalora", || {
                let schedule = peft::AdaLoraSchedule {
                    init_r: o.init_r.unwrap_or(12),
                    target_r: o.target_r.unwrap_or(8),
                    tinit: o.tinit.unwrap_or(0),
                    tfinal: o.tfinal.unwrap_or(0),
                    delta_t: o.delta_t.unwrap_or(1),
                    beta1: o.beta1.unwrap_or(0.85),
                    beta2: o.beta2.unwrap_or(0.85),
                    orth_reg_weight: o.orth_reg_weight.unwrap_or(0.5),
                    total_step: o.total_step,
                };
                anyhow::ensure!(schedule.init_r > 0 && schedule.target_r >= 0 && schedule.target_r <= schedule.init_r, "add_adalora: need 0 ≤ target_r ≤ init_r and init_r > 0, got init_r {} and target_r {}", schedule.init_r, schedule.target_r);
                anyhow::ensure!(schedule.delta_t > 0, "add_adalora: deltaT must be positive");
                anyhow::ensure!((0.0..1.0).contains(&schedule.beta1) && schedule.beta1 > 0.0 && (0.0..1.0).contains(&schedule.beta2) && schedule.beta2 > 0.0, "add_adalora: beta1 and beta2 must lie in (0, 1)");
                let spec = LoraSpec {
                    r: schedule.init_r,
                    alpha: o.alpha.unwrap_or(8.0),
                    dropout: o.dropout.unwrap_or(0.0),
                    targets: targets_of(o.targets, &["q_proj", "v_proj"])?,
                    use_rslora: false,
                    use_dora: false,
                    trainable_tokens: vec![],
                    modules_to_save: vec![],
                    adalora: Some(schedule),
                    seed: o.seed.unwrap_or(0),
                    target_parameters: vec![],
                };
                install(&mut *m.get_mut("add_adalora")?, spec, "AdaLoRA")
            })?;
            Ok(m.clone())
        });
    let add_tokens = |m: &mut Model, tokens: rhai::Array, special: bool| -> Res<rhai::Array> {
        guard("add_tokens", || {
            let tokens: Vec<String> = tokens.into_iter().map(|t| t.into_string().map_err(|t| anyhow::anyhow!("tokens must be strings, got {t}"))).collect::<anyhow::Result<_>>()?;
            let ids = m.get_mut("add_tokens")?.add_tokens(&tokens, special)?;
            Ok(ids.into_iter().map(Dynamic::from).collect())
        })
    };
    FuncRegistration::new("add_tokens")
        .with_comments(["/// Adds tokens to the tokenizer (as transformers' add_tokens) and grows the embeddings and output head to fit (new rows: the mean of the old ones); returns their ids."])
        .with_params_info(["model: &mut Model", "tokens: Array", "Array"])
        .register_into_engine(engine, move |m: &mut Model, tokens: rhai::Array| add_tokens(m, tokens, false));
    FuncRegistration::new("add_tokens")
        .with_comments(["/// add_tokens with #{special}: special tokens are skipped when decoding and never split or normalized."])
        .with_params_info(["model: &mut Model", "tokens: Array", "options: Map", "Array"])
        .register_into_engine(engine, move |m: &mut Model, tokens: rhai::Array, opts: Map| -> Res<rhai::Array> {
            let o: AddTokensOptions = parse("add_tokens", &opts)?;
            add_tokens(m, tokens, o.special.unwrap_or(false))
        });
    FuncRegistration::new("with_adapters_disabled")
        .with_comments(["/// Calls `f(model)` with adapters switched off (on every model, for the duration of the call), as peft's `disable_adapter()`: generate, loss and evaluate inside see the base model; returns what `f` returns. Works inside training hooks."])
        .with_params_info(["model: &mut Model", "f: FnPtr", "Dynamic"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: &mut Model, f: FnPtr| -> Res<Dynamic> {
            crate::nn::linear::without_adapters(|| crate::script::limits::callback(|| f.call_within_context(&ctx, (Dynamic::from(m.clone()),))))
        });
    FuncRegistration::new("trainable_parameters")
        .with_comments(["/// #{trainable, total, percent}: parameter counts, as peft's print_trainable_parameters."])
        .with_params_info(["model: &mut Model", "Map"])
        .register_into_engine(engine, |m: &mut Model| -> Map {
            let (t, all) = parameter_counts(m);
            let mut map = Map::new();
            map.insert("trainable".into(), Dynamic::from(t));
            map.insert("total".into(), Dynamic::from(all));
            map.insert("percent".into(), Dynamic::from(100.0 * t as f64 / all.max(1) as f64));
            map
        });
    FuncRegistration::new("print_trainable_parameters")
        .with_comments(["/// Prints `trainable params: N || all params: M || trainable%: P` like peft."])
        .with_params_info(["model: &mut Model", "()"])
        .register_into_engine(engine, |m: &mut Model| {
            let (t, all) = parameter_counts(m);
            tracing::info!("trainable params: {t} || all params: {all} || trainable%: {:.4}", 100.0 * t as f64 / all.max(1) as f64);
        });
    FuncRegistration::new("save_adapter")
        .with_comments(["/// Writes the adapter in PEFT format (adapter_config.json, adapter_model.safetensors) plus the tokenizer files."])
        .with_params_info(["model: &mut Model", "dir: &str", "()"])
        .register_into_engine(engine, |m: &mut Model, dir: &str| -> Res<()> {
            guard("save_adapter", || {
                let m = m.get();
                save_adapter_and_tokenizer(&m.net, m.lora.as_ref(), &m.source, &m.tokenizer, dir)
            })
        });
    FuncRegistration::new("load_adapter")
        .with_comments(["/// Loads a PEFT LoRA adapter directory onto the model (replacing any adapters it has)."])
        .with_params_info(["model: &mut Model", "dir: &str", "Model"])
        .register_into_engine(engine, |m: &mut Model, dir: &str| -> Res<Model> {
            guard("load_adapter", || {
                let mut inner = m.get_mut("load_adapter")?;
                let spec = peft::load_adapter(&mut inner.net, &super::read_path(dir)?, Kind::Float)?;
                inner.lora = Some(spec);
                Ok(())
            })?;
            Ok(m.clone())
        });
    let save_merged = |m: &mut Model, dir: &str, o: MergeOptions| -> Res<()> {
        guard("save_merged", || {
            let m = m.get();
            let (kind, shard) = o.resolve(m.net.kind)?;
            crate::models::save::save_merged(&m, &crate::api::write_path(dir)?, kind, shard)?;
            tracing::info!("saved merged model to {dir}");
            Ok(())
        })
    };
    FuncRegistration::new("save_merged")
        .with_comments(["/// Writes a standalone model directory with the adapters folded in (safetensors shards, config, tokenizer)."])
        .with_params_info(["model: &mut Model", "dir: &str", "()"])
        .register_into_engine(engine, move |m: &mut Model, dir: &str| save_merged(m, dir, MergeOptions::default()));
    FuncRegistration::new("save_merged")
        .with_comments(["/// save_merged with #{dtype, max_shard_size}."])
        .with_params_info(["model: &mut Model", "dir: &str", "options: Map", "()"])
        .register_into_engine(engine, move |m: &mut Model, dir: &str, opts: Map| -> Res<()> {
            save_merged(m, dir, parse("save_merged", &opts)?)
        });
}
