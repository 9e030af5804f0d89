//! `Seq2SeqModel`: an encoder-decoder model (T5, Flan-T5) in a recipe, with the names a decoder
//! has: `model.loss(source, target)`, `model.generate(source, opts)`, `add_lora`, `train`,
//! `save_adapter`, `load_adapter`, `save_merged`. `load_model` returns one when the directory's
//! config.json is a T5's.

use super::model::{sampling, GenerateOptions};
use crate::generate::Sampling;
use crate::models::t5::T5;
use crate::nn::peft::{self, LoraSpec};
use crate::script::options::{from_json, guard, parse, to_json};
use crate::tokenizer::Tokenizer;
use crate::train::seq2seq::Pair;
use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, FuncRegistration, Map, NativeCallContext};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use tch::{Kind, Tensor};

type Res<T> = Result<T, Box<EvalAltResult>>;

/// A loaded encoder-decoder model: the network, its tokenizer, config.json and where it came from.
pub struct Seq2Seq {
    pub net: T5,
    pub tokenizer: Tokenizer,
    pub config_json: serde_json::Value,
    pub source: String,
    /// The adapters' settings, once `add_lora` or `load_adapter` gave it some.
    pub lora: Option<LoraSpec>,
}

/// An encoder-decoder model shared between the recipe's variables.
#[derive(Clone)]
pub struct Seq2SeqModel(pub Rc<RefCell<Seq2Seq>>);

/// Whether config.json describes an encoder-decoder model this build loads.
pub fn is_seq2seq(json: &serde_json::Value) -> bool {
    let architecture = json.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
    architecture == Some("T5ForConditionalGeneration") || architecture.is_none() && json.get("model_type").and_then(|t| t.as_str()) == Some("t5")
}

/// A T5 model directory in `dtype` on `device`.
pub fn load(dir: &Path, json: serde_json::Value, dtype: &str, device: tch::Device) -> anyhow::Result<Seq2Seq> {
    let net = T5::from_dir(dir, dtype, device)?;
    let eos = net.config.eos_ids().first().copied();
    let tokenizer = Tokenizer::from_dir(dir, None, eos, Some(net.config.pad_token_id))?;
    tracing::info!("loaded {} (T5: {} + {} layers, {:?}, {device:?})", dir.display(), net.config.num_layers, net.config.decoder_layers(), net.kind);
    Ok(Seq2Seq { net, tokenizer, config_json: json, source: dir.display().to_string(), lora: None })
}

impl Seq2Seq {
    /// Installs the peft LoRA (or DoRA) adapter in `dir` (fp32), replacing any the model has;
    /// a tensor that names no layer is an error before anything changes.
    pub fn load_adapter(&mut self, dir: &Path) -> anyhow::Result<()> {
        let files = peft::read_adapter(dir)?;
        if !files.spec.modules_to_save.is_empty() || !files.spec.trainable_tokens.is_empty() {
            anyhow::bail!("{}: modules_to_save and trainable tokens are not supported on an encoder-decoder model", files.cfg_path.display());
        }
        let names: Vec<String> = self.net.linears().iter().map(|l| l.name.clone()).collect();
        peft::check_all_used(&files, &names.iter().map(String::as_str).collect::<Vec<_>>())?;
        peft::install_adapters(self.net.linears_mut(), &files, Kind::Float)?;
        tracing::info!("loaded adapter {} (r={}, alpha={})", dir.display(), files.spec.r, files.spec.alpha);
        self.lora = Some(files.spec);
        Ok(())
    }

    /// Mean cross-entropy of `target`'s tokens (its EOS included) given `source`.
    pub fn loss(&self, source: &str, target: &str) -> anyhow::Result<f64> {
        let _guard = tch::no_grad_guard();
        let device = self.net.device;
        let ids = Tensor::from_slice(&self.tokenizer.encode(source, true)?).view([1, -1]).to_device(device);
        let labels = Tensor::from_slice(&self.tokenizer.encode(target, true)?).view([1, -1]).to_device(device);
        Ok(self.net.loss(&ids, &ids.ones_like(), &labels, false).to_kind(Kind::Double).double_value(&[]))
    }

    /// The target texts generated for `sources`, `batch_size` sources at a time (each stops at EOS).
    pub fn generate(&self, sources: &[String], s: &Sampling, batch_size: usize) -> anyhow::Result<Vec<String>> {
        let ids = sources.iter().map(|p| self.tokenizer.encode(p, true)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut stops = self.net.config.eos_ids();
        stops.extend(self.tokenizer.eos_id);
        let mut texts = Vec::with_capacity(sources.len());
        for chunk in ids.chunks(batch_size.max(1)) {
            for out in self.net.generate(chunk, s, &stops)? {
                texts.push(crate::generate::cut_at_stop(&self.tokenizer.decode(&out, true)?, &s.stop).to_string());
            }
        }
        Ok(texts)
    }
}

/// The `(source, target)` text of a record: `format` `"seq2seq"` (fields `input` and `target`;
/// the default), `"alpaca"` (its prompt and `output`), or a function returning `#{source, target}`.
pub(crate) fn texts(ctx: &NativeCallContext, call: &str, format: Option<&Dynamic>, r: &serde_json::Value, at: &str) -> Res<(String, String)> {
    use crate::data::format::{alpaca_prompt, string_field};
    let field = |key: &str, what: &str| string_field(r, key, at, what).map_err(|e| -> Box<EvalAltResult> { format!("{call}: {e}").into() });
    match format {
        Some(f) if f.is_fnptr() => {
            let f = f.clone().cast::<FnPtr>();
            let v: Dynamic = crate::script::limits::callback(|| f.call_within_context(ctx, (from_json(r),))).map_err(|e| crate::script::prefix_error(e, &format!("{call}: the format function failed on {at}")))?;
            let v = to_json(&v);
            let what = "a format function returns #{source, target}";
            let get = |key: &str| string_field(&v, key, &format!("{at} (as the format function returned it)"), what).map_err(|e| -> Box<EvalAltResult> { format!("{call}: {e}").into() });
            Ok((get("source")?, get("target")?))
        }
        Some(f) if f.clone().into_string().is_ok_and(|n| n == "alpaca") => {
            let what = "the alpaca template reads instruction, output and an optional input";
            let input = r.get("input").and_then(|v| v.as_str()).filter(|s| !s.is_empty());
            Ok((alpaca_prompt(&field("instruction", what)?, input), field("output", what)?))
        }
        None => {
            let what = "format \"seq2seq\" (the default for an encoder-decoder model) reads input and target";
            Ok((field("input", what)?, field("target", what)?))
        }
        Some(f) if f.clone().into_string().is_ok_and(|n| n == "seq2seq") => {
            let what = "format \"seq2seq\" reads input and target";
            Ok((field("input", what)?, field("target", what)?))
        }
        Some(f) => Err(format!("{call}: an encoder-decoder model (T5) takes format \"seq2seq\", \"alpaca\" or a function returning #{{source, target}}, got {f}").into()),
    }
}

/// The tokenized pairs of `ds`'s records, each side cut to `max_length` tokens with its EOS kept
/// last (as transformers' tokenizer truncates T5's `$A </s>`).
pub fn pairs(ctx: &NativeCallContext, m: &Seq2SeqModel, ds: &super::dataset::Dataset, format: Option<&Dynamic>, max_length: usize) -> Res<Vec<Pair>> {
    let model = m.0.borrow();
    let tok = &model.tokenizer;
    let cut = |mut ids: Vec<i64>| {
        if max_length > 0 && ids.len() > max_length {
            let last = *ids.last().unwrap();
            ids.truncate(max_length);
            let keep_eos = tok.eos_id == Some(last);
            if keep_eos {
                ids[max_length - 1] = last;
            }
        }
        ids
    };
    let mut out = Vec::with_capacity(ds.0.records.len());
    for (i, r) in ds.0.records.iter().enumerate() {
        let at = ds.0.place(i).to_string();
        let (source, target) = texts(ctx, "train", format, r, &at)?;
        let encode = |t: &str| guard("train", || Ok(cut(tok.encode(t, true)?)));
        let pair = Pair { source: encode(&source)?, target: encode(&target)? };
        if pair.source.is_empty() || pair.target.is_empty() {
            return Err(format!("train: {at}: the {} has no tokens", if pair.source.is_empty() { "source" } else { "target" }).into());
        }
        out.push(pair);
    }
    Ok(out)
}

impl Seq2SeqModel {
    /// The model, for `what`, a call that changes it: refused while `train` runs (from a callback).
    fn get_mut(&self, what: &str) -> anyhow::Result<std::cell::RefMut<'_, Seq2Seq>> {
        self.0.try_borrow_mut().map_err(|_| anyhow::anyhow!("the model is training; {what} cannot change it from inside a train callback"))
    }
}

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("add_lora")
        .with_comments(["/// Adds LoRA (or DoRA) adapters to an encoder-decoder model: #{r, alpha, dropout, targets, use_rslora, use_dora, seed} (defaults 8, 16, 0.0, [\"q\", \"v\"] as peft's for T5; targets among q, k, v, o, wi, wi_0, wi_1, wo, lm_head)."])
        .with_params_info(["model: &mut Seq2SeqModel", "options: Map", "Seq2SeqModel"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, opts: Map| -> Res<Seq2SeqModel> {
            let o: super::lora::LoraOptions = parse("add_lora", &opts)?;
            guard("add_lora", || {
                if o.trainable_tokens.is_some() || o.modules_to_save.is_some() {
                    anyhow::bail!("add_lora: trainable_tokens and modules_to_save are not supported on an encoder-decoder model");
                }
                let spec = super::lora::spec_of(&o, &["q", "v"])?;
                let mut inner = m.get_mut("add_lora")?;
                let names = peft::add_adapters(&mut inner.net, &spec, Kind::Float)?;
                tracing::info!("added LoRA r={} alpha={} to {} layers", spec.r, spec.alpha, names.len());
                inner.lora = Some(spec);
                Ok(())
            })?;
            Ok(m.clone())
        });
    FuncRegistration::new("train")
        .with_comments(["/// Trains an encoder-decoder model's adapters on source/target pairs: #{train, eval, format: \"seq2seq\" | \"alpaca\" | fn(record) -> #{source, target}, ...} with the options of a decoder's train."])
        .with_params_info(["model: Seq2SeqModel", "options: Map", "Map"])
        .register_into_engine(engine, |ctx: NativeCallContext, m: Seq2SeqModel, opts: Map| -> Res<Map> { super::train::train_seq2seq(ctx, &m, opts) });
    FuncRegistration::new("save_adapter")
        .with_comments(["/// Writes an encoder-decoder model's adapter in PEFT format (task SEQ_2_SEQ_LM) plus the tokenizer files."])
        .with_params_info(["model: &mut Seq2SeqModel", "dir: &str", "()"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, dir: &str| -> Res<()> {
            guard("save_adapter", || {
                let m = m.0.borrow();
                super::lora::save_adapter_and_tokenizer(&m.net, m.lora.as_ref(), &m.source, &m.tokenizer, dir)
            })
        });
    let save_merged = |m: &mut Seq2SeqModel, dir: &str, o: super::lora::MergeOptions| -> Res<()> {
        guard("save_merged", || {
            let m = m.0.borrow();
            let (kind, shard) = o.resolve(m.net.kind)?;
            crate::models::save::write_model_dir(&crate::api::write_path(dir)?, m.net.merged_tensors(kind), kind, shard, &m.config_json, None, &m.tokenizer)?;
            tracing::info!("saved merged model to {dir}");
            Ok(())
        })
    };
    FuncRegistration::new("save_merged")
        .with_comments(["/// Writes a standalone encoder-decoder model directory with the adapters folded in (safetensors, config, tokenizer)."])
        .with_params_info(["model: &mut Seq2SeqModel", "dir: &str", "()"])
        .register_into_engine(engine, move |m: &mut Seq2SeqModel, dir: &str| save_merged(m, dir, Default::default()));
    FuncRegistration::new("save_merged")
        .with_comments(["/// save_merged on an encoder-decoder model with #{dtype, max_shard_size}."])
        .with_params_info(["model: &mut Seq2SeqModel", "dir: &str", "options: Map", "()"])
        .register_into_engine(engine, move |m: &mut Seq2SeqModel, dir: &str, opts: Map| -> Res<()> { save_merged(m, dir, parse("save_merged", &opts)?) });
    engine.register_type_with_name::<Seq2SeqModel>("Seq2SeqModel");
    FuncRegistration::new("loss")
        .with_comments(["/// Mean cross-entropy (natural log) of `target`'s tokens, EOS included, given `source` (an encoder-decoder model: T5)."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "target: &str", "f64"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str, target: &str| -> Res<f64> { guard("loss", || m.0.borrow().loss(source, target)) });
    FuncRegistration::new("generate")
        .with_comments(["/// The target text for `source` (an encoder-decoder model: the encoder runs once, the decoder with its cache; greedy, up to 64 new tokens)."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "String"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str| -> Res<String> { guard("generate", || Ok(m.0.borrow().generate(&[source.to_string()], &Sampling::default(), 1)?.remove(0))) });
    FuncRegistration::new("generate")
        .with_comments(["/// The target text for `source` with #{max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, profile}."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "options: Map", "String"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str, opts: Map| -> Res<String> {
            let o: GenerateOptions = parse("generate", &opts)?;
            if o.batch_size.is_some() {
                return Err("generate: batch_size applies to an array of prompts".into());
            }
            guard("generate", || o.profiled(|| Ok(m.0.borrow().generate(&[source.to_string()], &sampling(&o), 1)?.remove(0))))
        });
    FuncRegistration::new("generate")
        .with_comments(["/// The target texts for an array of sources, decoded together (right-padded, one encoder pass, one decoder cache; each row stopping at its EOS); greedy, up to 64 new tokens."])
        .with_params_info(["model: &mut Seq2SeqModel", "sources: Array", "Array"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, sources: Array| -> Res<Array> {
            let sources = super::model::strings(sources, "generate: sources")?;
            let out = guard("generate", || m.0.borrow().generate(&sources, &Sampling::default(), sources.len()))?;
            Ok(out.into_iter().map(Dynamic::from).collect())
        });
    FuncRegistration::new("generate")
        .with_comments(["/// The target texts for an array of sources with #{max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, batch_size (all at once), profile}."])
        .with_params_info(["model: &mut Seq2SeqModel", "sources: Array", "options: Map", "Array"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, sources: Array, opts: Map| -> Res<Array> {
            let sources = super::model::strings(sources, "generate: sources")?;
            let o: GenerateOptions = parse("generate", &opts)?;
            let batch = o.batch_size.unwrap_or(sources.len());
            let out = guard("generate", || o.profiled(|| m.0.borrow().generate(&sources, &sampling(&o), batch)))?;
            Ok(out.into_iter().map(Dynamic::from).collect())
        });
    FuncRegistration::new("load_adapter")
        .with_comments(["/// Loads a peft LoRA adapter directory onto an encoder-decoder model (T5 targets: q, k, v, o, wi, wi_0, wi_1, wo), replacing any it has."])
        .with_params_info(["model: &mut Seq2SeqModel", "dir: &str", "Seq2SeqModel"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, dir: &str| -> Res<Seq2SeqModel> {
            guard("load_adapter", || m.get_mut("load_adapter")?.load_adapter(&crate::api::read_path(dir)?))?;
            Ok(m.clone())
        });
    FuncRegistration::new("get$config")
        .with_comments(["/// `model.config`: the encoder-decoder model's config.json as a map."])
        .with_params_info(["model: &mut Seq2SeqModel", "Map"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel| from_json(&m.0.borrow().config_json).cast::<Map>());
}
