//! `load_model`, `Model` and `Tokenizer`.

use crate::generate::{self, Sampling};
use crate::models::{self, LoadedModel};
use super::seq2seq::Seq2SeqModel;
use crate::script::options::{from_json, guard, parse, rt_any};
use rhai::{Array, Dynamic, Engine, EvalAltResult, FuncRegistration, Map};
use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// A model shared between the recipe's variables.
#[derive(Clone)]
pub struct Model(pub Rc<RefCell<LoadedModel>>);

impl Model {
    /// The model, for a call that reads it (callbacks may read it while `train` runs).
    pub fn get(&self) -> std::cell::Ref<'_, LoadedModel> {
        self.0.borrow()
    }

    /// The model, for `what`, a call that changes it: refused while `train` runs (from a callback).
    pub fn get_mut(&self, what: &str) -> anyhow::Result<std::cell::RefMut<'_, LoadedModel>> {
        self.0
            .try_borrow_mut()
            .map_err(|_| anyhow::anyhow!("the model is training; {what} cannot change it from inside a train callback"))
    }
}

/// A model's tokenizer (shares the model).
#[derive(Clone)]
pub struct Tokenizer(pub Rc<RefCell<LoadedModel>>);

/// Options of `load_model(path, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    /// `auto` (the checkpoint's dtype), `fp32`, `fp16`, `bf16`.
    pub dtype: Option<String>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`, `cuda:0,1` (decoder layers split across those GPUs).
    pub device: Option<String>,
    /// Fresh weights from config.json (transformers' `from_config`); the checkpoint's are not read.
    pub random_init: Option<bool>,
    /// `nf4`, `fp4` (4-bit, bitsandbytes' format) or `int8` (per-row absmax).
    pub quantize: Option<String>,
    pub double_quant: Option<bool>,
    pub compute_dtype: Option<String>,
    pub quant_skip: Option<Vec<String>>,
    /// Hub revision (branch, tag or commit).
    pub revision: Option<String>,
}

/// Options of `model.generate(prompt, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    /// Strings that end a row's text (left out of it).
    pub stop: Option<Vec<String>>,
    /// Prompts decoded together (an array of prompts; all at once by default).
    pub batch_size: Option<usize>,
    /// On a GPU, replay each decoding step from a CUDA graph (default true; false: op by op).
    pub cuda_graph: Option<bool>,
    /// A directory for a profile of the call (`trace.json`, `summary.txt`), as train's `profile`.
    pub profile: Option<String>,
}

impl GenerateOptions {
    /// `f` under the profiler when the options ask for a profile.
    pub fn profiled<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let dir = self.profile.as_deref().map(crate::api::write_path).transpose()?;
        crate::cuda::profile::profiled(dir.as_deref(), "generate", f)
    }
}

/// What `load_model` returns: a [`Model`] (a decoder), or a [`Seq2SeqModel`] when config.json
/// is an encoder-decoder's (T5).
fn load_for_recipe(spec: &str, opts: LoadOptions) -> anyhow::Result<Dynamic> {
    let (path, hub_id) = locate(spec, opts.revision.as_deref())?;
    let json = std::fs::read_to_string(path.join("config.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if let Some(json) = json.filter(super::seq2seq::is_seq2seq) {
        if opts.quantize.is_some() || opts.random_init.is_some() || opts.compute_dtype.is_some() {
            anyhow::bail!("{}: an encoder-decoder model (T5) loads with dtype and device only (no quantize, compute_dtype or random_init yet)", path.display());
        }
        let device = models::parse_device(opts.device.as_deref().unwrap_or("auto"))?;
        let mut m = super::seq2seq::load(&path, json, opts.dtype.as_deref().unwrap_or("auto"), device)?;
        if let Some(id) = hub_id {
            m.source = id;
        }
        return Ok(Dynamic::from(Seq2SeqModel(Rc::new(RefCell::new(m)))));
    }
    Ok(Dynamic::from(Model(Rc::new(RefCell::new(load_model(&path, hub_id, opts)?)))))
}

/// The directory or file `spec` names (as given, next to the recipe, or a Hub id's snapshot in
/// the cache), if the sandbox lets the recipe read it; and the Hub id it came from.
fn locate(spec: &str, revision: Option<&str>) -> anyhow::Result<(std::path::PathBuf, Option<String>)> {
    let path = crate::api::resolve(spec);
    if !path.exists() && crate::hub::is_repo_id(spec) {
        // not a local path: a Hub id, through the huggingface_hub cache
        let snap = crate::api::hub::snapshot(spec, revision, crate::hub::Filter::Safetensors)
            .map_err(|e| anyhow::anyhow!("model `{spec}` is no local directory or .gguf file, and from the Hub: {e:#}"))?;
        return Ok((snap, Some(spec.to_string())));
    }
    crate::script::sandbox::check_read(&path)?;
    if !path.exists() {
        anyhow::bail!("model `{spec}` not found: no such directory or .gguf file");
    }
    Ok((path, None))
}

/// The decoder at `path` ([`locate`]d; `hub_id`: the Hub id it came from) as `opts` say.
pub fn load_model(path: &std::path::Path, hub_id: Option<String>, opts: LoadOptions) -> anyhow::Result<LoadedModel> {
    let quant = quant_config(&opts)?;
    let device = models::placement::parse_device_spec(opts.device.as_deref().unwrap_or("auto"))?;
    let started = std::time::Instant::now();
    let dtype = opts.dtype.as_deref().unwrap_or("auto");
    let mut m = if opts.random_init.unwrap_or(false) {
        models::init_random(path, dtype, device, quant.as_ref())?
    } else {
        models::load_with(path, dtype, device, quant.as_ref())?
    };
    if let Some(c) = &opts.compute_dtype {
        let kind = models::parse_dtype(c, None)?;
        m.net.set_dtype(kind);
    }
    if let Some(id) = hub_id {
        m.source = id; // adapters record the Hub id as their base model, as peft does
    }
    tracing::info!(
        "loaded {} ({} layers, {:.1}M parameters, {:?}, {:?}) in {:.1}s",
        m.source,
        m.net.layers.len(),
        m.net.num_params() as f64 / 1e6,
        m.net.kind,
        m.net.devices(),
        started.elapsed().as_secs_f64()
    );
    Ok(m)
}

/// `quantize`, `double_quant`, `quant_skip`, `compute_dtype` → the 4-bit settings (checked).
fn quant_config(o: &LoadOptions) -> anyhow::Result<Option<crate::nn::quant::QuantConfig>> {
    use crate::nn::quant::{QuantConfig, QuantType};
    let Some(q) = o.quantize.as_deref() else {
        if o.double_quant.is_some() || o.quant_skip.is_some() || o.compute_dtype.is_some() {
            anyhow::bail!("double_quant, quant_skip and compute_dtype apply to quantized models: add quantize: \"nf4\" (or \"fp4\"), or use dtype");
        }
        return Ok(None);
    };
    let qtype = QuantType::parse(q).map_err(|e| anyhow::anyhow!("quantize: {e}"))?;
    if qtype == QuantType::Int8 && o.double_quant.is_some() {
        anyhow::bail!("double_quant applies to nf4/fp4, not int8");
    }
    Ok(Some(QuantConfig { qtype, double_quant: o.double_quant.unwrap_or(false), skip: o.quant_skip.clone().unwrap_or_default() }))
}

/// `model.memory()`: bytes of weights by kind, and the CUDA allocator's view when on a GPU.
fn memory(m: &LoadedModel) -> Map {
    let (quantized, dense, adapters) = m.net.weight_bytes();
    let mut map = Map::new();
    map.insert("quantized".into(), Dynamic::from(quantized as i64));
    map.insert("dense".into(), Dynamic::from(dense as i64));
    map.insert("adapters".into(), Dynamic::from(adapters as i64));
    map.insert("total".into(), Dynamic::from((quantized + dense + adapters) as i64));
    // summed over the GPUs of a split model
    let devices = m.net.devices();
    let on_gpu = |bytes: Option<u64>| bytes.map(|b| Dynamic::from(b as i64)).unwrap_or(Dynamic::UNIT);
    map.insert("cuda_allocated".into(), on_gpu(devices.iter().map(|&d| crate::cuda::allocated(d)).sum::<Option<u64>>()));
    map.insert("cuda_peak".into(), on_gpu(devices.iter().map(|&d| crate::cuda::peak_allocated(d)).sum::<Option<u64>>()));
    map
}

pub fn sampling(o: &GenerateOptions) -> Sampling {
    let d = Sampling::default();
    Sampling {
        max_new_tokens: o.max_new_tokens.unwrap_or(d.max_new_tokens),
        temperature: o.temperature.unwrap_or(d.temperature),
        top_p: o.top_p.unwrap_or(d.top_p),
        top_k: o.top_k.unwrap_or(d.top_k),
        repetition_penalty: o.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: o.seed.unwrap_or(d.seed),
        stop: o.stop.clone().unwrap_or_default(),
        cuda_graph: o.cuda_graph.unwrap_or(d.cuda_graph),
        ..d
    }
}

/// Continuations of `prompts`, decoded `batch_size` prompts at a time ([`generate_scored`]); a
/// prompt is tokenized as `train` tokenizes a prompt ([`Tokenizer::encode_prompt`]: one BOS
/// when a chat template writes it too, no EOS after it).
///
/// [`Tokenizer::encode_prompt`]: crate::tokenizer::Tokenizer::encode_prompt
pub fn generate_texts(m: &LoadedModel, prompts: &[String], s: &Sampling, batch_size: usize) -> anyhow::Result<Vec<String>> {
    let ids = prompts.iter().map(|p| m.tokenizer.encode_prompt(p)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(generate_scored(m, &ids, None, s, batch_size)?.0)
}

/// Continuations of the prompts `ids`, decoded `batch_size` prompts at a time, longest prompts
/// first: a batch pads each prompt to its longest, so prompts of like length batched together pad
/// least (and the batch most likely to run out of memory comes first). A batch that runs out of
/// memory is decoded again in halves, and later batches are as small (down to one prompt;
/// greedy decoding gives the same tokens, seeded sampling other draws). With `scoring` (one per
/// prompt), also the summed loss of the scored tokens ([`generate::generate_scoring`]).
pub fn generate_scored(m: &LoadedModel, ids: &[Vec<i64>], scoring: Option<&[generate::Scoring]>, s: &Sampling, batch_size: usize) -> anyhow::Result<(Vec<String>, Option<f64>)> {
    let started = std::time::Instant::now();
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut out = vec![String::new(); ids.len()];
    let mut loss = scoring.map(|_| tch::Tensor::zeros([], (tch::Kind::Float, m.net.head_device)));
    let mut tokens = 0;
    let (mut size, mut rest) = (batch_size.max(1), &order[..]);
    while !rest.is_empty() {
        let chunk = &rest[..size.min(rest.len())];
        let rows: Vec<Vec<i64>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let scored = scoring.map(|sc| chunk.iter().map(|&i| sc[i]).collect::<Vec<_>>());
        let (batch, batch_loss) = match crate::script::options::catch_panic(|| generate::generate_scoring(m, &rows, scored.as_deref(), s)) {
            Err(e) if chunk.len() > 1 && crate::script::options::error_kind(&format!("{e:#}")) == "oom" => {
                size = chunk.len() / 2;
                tracing::warn!("generate: out of memory decoding {} prompts at a time, now {size} at a time ({e:#})", chunk.len());
                continue;
            }
            r => r?,
        };
        rest = &rest[chunk.len()..];
        if let (Some(sum), Some(l)) = (loss.as_mut(), batch_loss) {
            *sum += l;
        }
        for (&i, generated) in chunk.iter().zip(batch) {
            tokens += generated.len();
            out[i] = generate::cut_at_stop(&m.tokenizer.decode(&generated, true)?, &s.stop).to_string();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::debug!("generated {tokens} tokens for {} prompt(s) in {secs:.2}s ({:.1} tokens/s)", ids.len(), tokens as f64 / secs.max(1e-9));
    Ok((out, loss.map(|l| l.double_value(&[]))))
}

fn generate_text(m: &LoadedModel, prompt: &str, s: &Sampling) -> anyhow::Result<String> {
    Ok(generate_texts(m, &[prompt.to_string()], s, 1)?.remove(0))
}

/// The strings of a Rhai array (`what` names it in the error).
pub(crate) fn strings(a: Array, what: &str) -> Res<Vec<String>> {
    a.into_iter().map(|p| p.into_string().map_err(|t| -> Box<EvalAltResult> { format!("{what} must be strings, got {t}").into() })).collect()
}

/// `[#{role, content}, ...]` or a plain user message → the chat template's prompt text.
fn chat_prompt(m: &LoadedModel, messages: Dynamic) -> anyhow::Result<String> {
    let messages = if messages.is_string() {
        serde_json::json!([{"role": "user", "content": messages.into_string().unwrap()}])
    } else {
        crate::script::options::to_json(&messages)
    };
    let t = &m.tokenizer;
    let template = t
        .chat_template
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("{}: the tokenizer has no chat_template", m.source))?;
    crate::data::template::render_chat(template, &messages, true, t.bos_token.as_deref(), t.eos_token.as_deref())
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Model>("Model");
    engine.register_type_with_name::<Tokenizer>("Tokenizer");

    FuncRegistration::new("load_model")
        .with_comments(["/// Loads a Hugging Face model directory or a .gguf file (defaults: dtype auto, device auto): a Model, or a Seq2SeqModel for an encoder-decoder (T5)."])
        .with_params_info(["path: &str", "Model"])
        .register_into_engine(engine, |path: &str| -> Res<Dynamic> { guard("load_model", || load_for_recipe(path, LoadOptions::default())) });
    FuncRegistration::new("load_model")
        .with_comments(["/// Loads a model with options #{dtype, device, quantize, double_quant, compute_dtype, quant_skip, revision, random_init}."])
        .with_params_info(["path: &str", "options: Map", "Model"])
        .register_into_engine(engine, |path: &str, opts: Map| -> Res<Dynamic> {
            let opts: LoadOptions = parse("load_model", &opts)?;
            guard("load_model", || load_for_recipe(path, opts))
        });
    FuncRegistration::new("generate")
        .with_comments(["/// Generates a continuation of `prompt` (greedy, up to 64 new tokens)."])
        .with_params_info(["model: &mut Model", "prompt: &str", "String"])
        .register_into_engine(engine, |m: &mut Model, prompt: &str| -> Res<String> {
            guard("generate", || generate_text(&m.get(), prompt, &Sampling::default()))
        });
    FuncRegistration::new("generate")
        .with_comments(["/// Generates with #{max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed, stop: [strings], profile: dir (trace.json and summary.txt of the call)}; stops at EOS."])
        .with_params_info(["model: &mut Model", "prompt: &str", "options: Map", "String"])
        .register_into_engine(engine, |m: &mut Model, prompt: &str, opts: Map| -> Res<String> {
            let o: GenerateOptions = parse("generate", &opts)?;
            guard("generate", || o.profiled(|| generate_text(&m.get(), prompt, &sampling(&o))))
        });
    FuncRegistration::new("generate")
        .with_comments(["/// Continuations of an array of prompts, decoded together (left-padded, one KV cache, each row stopping at its EOS); greedy, up to 64 new tokens."])
        .with_params_info(["model: &mut Model", "prompts: Array", "Array"])
        .register_into_engine(engine, |m: &mut Model, prompts: Array| -> Res<Array> {
            let prompts = strings(prompts, "generate: prompts")?;
            let out = guard("generate", || generate_texts(&m.get(), &prompts, &Sampling::default(), prompts.len()))?;
            Ok(out.into_iter().map(Dynamic::from).collect())
        });
    FuncRegistration::new("generate")
        .with_comments(["/// Continuations of an array of prompts with #{max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, batch_size (all at once), profile}."])
        .with_params_info(["model: &mut Model", "prompts: Array", "options: Map", "Array"])
        .register_into_engine(engine, |m: &mut Model, prompts: Array, opts: Map| -> Res<Array> {
            let prompts = strings(prompts, "generate: prompts")?;
            let o: GenerateOptions = parse("generate", &opts)?;
            let batch = o.batch_size.unwrap_or(prompts.len());
            let out = guard("generate", || o.profiled(|| generate_texts(&m.get(), &prompts, &sampling(&o), batch)))?;
            Ok(out.into_iter().map(Dynamic::from).collect())
        });
    FuncRegistration::new("chat_prompt")
        .with_comments(["/// Renders a user message, or an array of #{role, content} messages, with the model's chat template (generation prompt added)."])
        .with_params_info(["model: &mut Model", "messages: Dynamic", "String"])
        .register_into_engine(engine, |m: &mut Model, messages: Dynamic| -> Res<String> {
            guard("chat_prompt", || chat_prompt(&m.get(), messages))
        });
    FuncRegistration::new("loss")
        .with_comments(["/// Mean next-token negative log-likelihood (natural log) of `text` (tokenized as a prompt: one BOS, as generate)."])
        .with_params_info(["model: &mut Model", "text: &str", "f64"])
        .register_into_engine(engine, |m: &mut Model, text: &str| -> Res<f64> {
            guard("loss", || {
                let m = m.get();
                let ids = m.tokenizer.encode_prompt(text)?;
                generate::loss_of_ids(&m, &ids)
            })
        });
    FuncRegistration::new("memory")
        .with_comments(["/// Bytes of weights by kind #{quantized, dense, adapters, total}, plus #{cuda_allocated, cuda_peak} (bytes on a GPU, () elsewhere)."])
        .with_params_info(["model: &mut Model", "Map"])
        .register_into_engine(engine, |m: &mut Model| -> Res<Map> { Ok(memory(&m.get())) });
    FuncRegistration::new("save_quantized")
        .with_comments(["/// Saves a 4-bit model in bitsandbytes' format (transformers loads it with its quantization_config; reloads without re-quantizing); adapters not included."])
        .with_params_info(["model: &mut Model", "dir: &str", "()"])
        .register_into_engine(engine, |m: &mut Model, dir: &str| -> Res<()> {
            guard("save_quantized", || crate::models::save::save_quantized(&m.get(), &crate::api::write_path(dir)?))
        });
    // a caught error is its message: `try { ... } catch (e) { if e.kind == "oom" { ... } }`
    FuncRegistration::new("get$kind")
        .with_comments(["/// The kind of a caught error (its message): \"oom\", \"not_found\", \"permission\" or \"bad_input\", for `try { ... } catch (e) { if e.kind == \"oom\" { ... } }`."])
        .with_params_info(["error: &mut ImmutableString", "String"])
        .register_into_engine(engine, |e: &mut rhai::ImmutableString| crate::script::options::error_kind(e).to_string());
    FuncRegistration::new("get$tokenizer")
        .with_comments(["/// `model.tokenizer`: the model's tokenizer (encode, decode, special ids)."])
        .with_params_info(["model: &mut Model", "Tokenizer"])
        .register_into_engine(engine, |m: &mut Model| Tokenizer(m.0.clone()));
    FuncRegistration::new("get$config")
        .with_comments(["/// `model.config`: the model's config.json as a map."])
        .with_params_info(["model: &mut Model", "Map"])
        .register_into_engine(engine, |m: &mut Model| from_json(&m.get().config_json).cast::<Map>());

    FuncRegistration::new("encode")
        .with_comments(["/// Token ids of `text`, with BOS/EOS as the tokenizer's post-processor adds them."])
        .with_params_info(["tokenizer: &mut Tokenizer", "text: &str", "Array"])
        .register_into_engine(engine, |t: &mut Tokenizer, text: &str| -> Res<Array> {
            let ids = t.0.borrow().tokenizer.encode(text, true).map_err(rt_any)?;
            Ok(ids.into_iter().map(Dynamic::from).collect())
        });
    FuncRegistration::new("decode")
        .with_comments(["/// Text of token ids (special tokens skipped)."])
        .with_params_info(["tokenizer: &mut Tokenizer", "ids: Array", "String"])
        .register_into_engine(engine, |t: &mut Tokenizer, ids: Array| -> Res<String> {
            let ids: Vec<i64> = ids.iter().map(|d| d.as_int().map_err(|_| format!("decode: ids must be integers, got {}", d.type_name()))).collect::<Result<_, _>>()?;
            t.0.borrow().tokenizer.decode(&ids, true).map_err(rt_any)
        });
    FuncRegistration::new("get$eos_id")
        .with_comments(["/// `tokenizer.eos_id`: the end-of-sequence id, or () when the tokenizer has none."])
        .with_params_info(["tokenizer: &mut Tokenizer", "Dynamic"])
        .register_into_engine(engine, |t: &mut Tokenizer| t.0.borrow().tokenizer.eos_id.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    FuncRegistration::new("get$bos_id")
        .with_comments(["/// `tokenizer.bos_id`: the beginning-of-sequence id, or () when the tokenizer has none."])
        .with_params_info(["tokenizer: &mut Tokenizer", "Dynamic"])
        .register_into_engine(engine, |t: &mut Tokenizer| t.0.borrow().tokenizer.bos_id.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    FuncRegistration::new("get$pad_id")
        .with_comments(["/// `tokenizer.pad_id`: the padding id (the pad token's, else EOS's)."])
        .with_params_info(["tokenizer: &mut Tokenizer", "i64"])
        .register_into_engine(engine, |t: &mut Tokenizer| t.0.borrow().tokenizer.pad_id);
    FuncRegistration::new("get$vocab_size")
        .with_comments(["/// `tokenizer.vocab_size`: the number of tokens, added ones included."])
        .with_params_info(["tokenizer: &mut Tokenizer", "i64"])
        .register_into_engine(engine, |t: &mut Tokenizer| t.0.borrow().tokenizer.vocab_size() as i64);

    FuncRegistration::new("import_gguf")
        .with_comments(["/// Converts a .gguf file (llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3) into a Hugging Face model directory (config, safetensors, tokenizer)."])
        .with_params_info(["gguf: &str", "dir: &str", "()"])
        .register_into_engine(engine, |gguf: &str, dir: &str| -> Res<()> {
            guard("import_gguf", || import_gguf(&crate::api::read_path(gguf)?, &crate::api::write_path(dir)?))
        });
}

/// `ftscript import FILE.gguf DIR` and `import_gguf(...)`.
pub fn import_gguf(gguf: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    let import = crate::gguf::import(gguf)?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    crate::gguf::write_hf_dir(&import, dir)?;
    tracing::info!("imported {} into {}", gguf.display(), dir.display());
    Ok(())
}
