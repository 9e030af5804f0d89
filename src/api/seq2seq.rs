//! `Seq2SeqModel`: an encoder-decoder model (T5, Flan-T5) in a recipe, with the names a decoder
//! has: `model.loss(source, target)`, `model.generate(source, opts)`. `load_model` returns one
//! when the directory's config.json is a T5's.

use super::model::{sampling, GenerateOptions};
use crate::generate::Sampling;
use crate::models::t5::T5;
use crate::nn::peft;
use crate::script::options::{from_json, guard, parse};
use crate::tokenizer::Tokenizer;
use rhai::{Engine, EvalAltResult, FuncRegistration, Map};
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
    Ok(Seq2Seq { net, tokenizer, config_json: json, source: dir.display().to_string() })
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

    /// The target text generated for `source` (stops at EOS).
    pub fn generate(&self, source: &str, s: &Sampling) -> anyhow::Result<String> {
        let ids = self.tokenizer.encode(source, true)?;
        let mut stops = self.net.config.eos_ids();
        stops.extend(self.tokenizer.eos_id);
        let out = self.net.generate(&ids, s, &stops)?;
        Ok(crate::generate::cut_at_stop(&self.tokenizer.decode(&out, true)?, &s.stop).to_string())
    }
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Seq2SeqModel>("Seq2SeqModel");
    FuncRegistration::new("loss")
        .with_comments(["/// Mean cross-entropy (natural log) of `target`'s tokens, EOS included, given `source` (an encoder-decoder model: T5)."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "target: &str", "f64"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str, target: &str| -> Res<f64> { guard("loss", || m.0.borrow().loss(source, target)) });
    FuncRegistration::new("generate")
        .with_comments(["/// The target text for `source` (an encoder-decoder model: the encoder runs once, the decoder with its cache; greedy, up to 64 new tokens)."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "String"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str| -> Res<String> { guard("generate", || m.0.borrow().generate(source, &Sampling::default())) });
    FuncRegistration::new("generate")
        .with_comments(["/// The target text for `source` with #{max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop}."])
        .with_params_info(["model: &mut Seq2SeqModel", "source: &str", "options: Map", "String"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, source: &str, opts: Map| -> Res<String> {
            let o: GenerateOptions = parse("generate", &opts)?;
            if o.batch_size.is_some() {
                return Err("generate: batch_size applies to an array of prompts".into());
            }
            let s = sampling(o);
            guard("generate", || m.0.borrow().generate(source, &s))
        });
    FuncRegistration::new("load_adapter")
        .with_comments(["/// Loads a peft LoRA adapter directory onto an encoder-decoder model (T5 targets: q, k, v, o, wi, wi_0, wi_1, wo), replacing any it has."])
        .with_params_info(["model: &mut Seq2SeqModel", "dir: &str", "Seq2SeqModel"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel, dir: &str| -> Res<Seq2SeqModel> {
            guard("load_adapter", || m.0.try_borrow_mut().map_err(|_| anyhow::anyhow!("the model is in use"))?.load_adapter(&crate::api::read_path(dir)?))?;
            Ok(m.clone())
        });
    FuncRegistration::new("get$config")
        .with_comments(["/// `model.config`: the encoder-decoder model's config.json as a map."])
        .with_params_info(["model: &mut Seq2SeqModel", "Map"])
        .register_into_engine(engine, |m: &mut Seq2SeqModel| from_json(&m.0.borrow().config_json).cast::<Map>());
}
