//! LoRA (and DoRA) injection and the PEFT adapter format.
//!
//! Files (as `peft` writes them): `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`)
//! (and DoRA's `...lora_magnitude_vector` `[out]`, with `use_dora: true` in the config),
//! where `<module>` is the linear layer's name in the base model's state dict
//! (e.g. `model.layers.0.self_attn.q_proj`); trainable token rows (`trainable_token_indices`
//! in the config) are `base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta`
//! `[n, H]`, the rows themselves (not a difference, despite the name). LoRA on a stack of
//! expert weights (peft's `target_parameters`, e.g. `mlp.experts.gate_up_proj`) is keyed by the
//! experts module, `<block>.experts[.base_layer].lora_A.weight` `[E·r, in]` and `lora_B.weight`
//! `[out, r·E]` ([`ExpertLora`]).

use super::adapters::{AdaLora, Adapter, Dora, Lora};
use super::moe::{ExpertLora, SparseMoe};
use super::linear::Linear;
use super::weights::{save_safetensors, write_atomic, WeightSource};
use crate::models::decoder::{Decoder, TokenRows};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// A model whose linear layers carry peft adapters (a decoder, T5): what the peft format, the
/// trainer's checkpoints and AdaLoRA read and change.
pub trait Adapted {
    /// Every linear layer, named as in the base model's state dict, in a fixed order.
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Blocks a target named in every block matches at least once (warned about when fewer).
    fn blocks(&self) -> usize;
    /// peft's `task_type` (`CAUSAL_LM`, `SEQ_2_SEQ_LM`).
    fn task_type(&self) -> &'static str;
    /// Trained tensors outside the linear layers (token rows, an embedding copy), by peft key.
    fn embedding_adapters(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// The token ids whose embedding rows train (`trainable_token_indices`).
    fn trainable_token_ids(&self) -> Option<Vec<i64>> {
        None
    }
    /// The sparse mixture-of-experts blocks, whose expert stacks take `target_parameters`.
    fn sparse_blocks(&self) -> Vec<&SparseMoe> {
        vec![]
    }
    fn sparse_blocks_mut(&mut self) -> Vec<&mut SparseMoe> {
        vec![]
    }
}

impl Adapted for Decoder {
    fn linears(&self) -> Vec<&Linear> {
        Decoder::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Decoder::linears_mut(self)
    }
    fn blocks(&self) -> usize {
        self.layers.len()
    }
    fn task_type(&self) -> &'static str {
        "CAUSAL_LM"
    }
    fn embedding_adapters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![];
        if let Some(t) = &self.token_rows {
            v.push((TOKEN_ROWS_KEY.to_string(), t.values.shallow_clone()));
        }
        if let Some(c) = &self.embed_copy {
            v.push((EMBED_COPY_KEY.to_string(), c.shallow_clone()));
        }
        v
    }
    fn trainable_token_ids(&self) -> Option<Vec<i64>> {
        self.token_rows.as_ref().map(|t| t.ids.clone())
    }
    fn sparse_blocks(&self) -> Vec<&SparseMoe> {
        self.layers.iter().filter_map(|l| l.mlp.sparse()).collect()
    }
    fn sparse_blocks_mut(&mut self) -> Vec<&mut SparseMoe> {
        self.layers.iter_mut().filter_map(|l| l.mlp.sparse_mut()).collect()
    }
}

/// The expert stacks of a sparse block, by their parameter's path, in the order peft wraps them.
const EXPERT_PARAMETERS: [&str; 2] = ["experts.gate_up_proj", "experts.down_proj"];

/// Whether peft's `target_parameters` entry `target` names the parameter at `path` (equal to it,
/// or to its last segments).
fn names_parameter(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names matched as peft does: equal to the last path segment(s), e.g. `q_proj`.
    Names(Vec<String>),
    /// A regex that must match the whole module path (peft's string form).
    Regex(String),
    /// Every linear layer except the output projection.
    AllLinear,
}

impl Targets {
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            Targets::Names(names) => names.iter().any(|n| module == n || module.ends_with(&format!(".{n}"))),
            Targets::Regex(re) => {
                let re = regex::Regex::new(&format!("^(?:{re})$")).with_context(|| format!("invalid targets regex `{re}`"))?;
                re.is_match(module)
            }
            Targets::AllLinear => module != "lm_head",
        })
    }
}

/// A LoRA configuration, mirroring the fields of peft's `LoraConfig` we support.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Targets,
    pub use_rslora: bool,
    /// DoRA: a learnt magnitude per output row ([`Dora`]).
    pub use_dora: bool,
    /// Token ids whose embedding rows train (peft's `trainable_token_indices`).
    pub trainable_tokens: Vec<i64>,
    /// Modules trained whole (peft's `modules_to_save`): `embed_tokens`, `lm_head`.
    pub modules_to_save: Vec<String>,
    /// AdaLoRA's schedule, for AdaLoRA adapters (`r` is then the initial rank).
    pub adalora: Option<AdaLoraSchedule>,
    /// Seed for A's initialisation.
    pub seed: u64,
    /// Parameters adapted whole-stack (peft's `target_parameters`): a sparse block's
    /// `experts.gate_up_proj`, `experts.down_proj` (or their last segments).
    pub target_parameters: Vec<String>,
}

/// AdaLoRA's rank budget schedule and regularization, as peft's `AdaLoraConfig` names them:
/// the total budget stays `init_r` per module for `tinit` steps, falls cubically to `target_r`
/// per module until `total_step − tfinal` (re-allocated every `deltaT` steps by importance, an
/// exponential average with `beta1` of `|p·∂L/∂p|` times one with `beta2` of its deviation), and
/// stays there; `orth_reg_weight · mean ‖PPᵀ − I‖_F` over A and B is added to the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraSchedule {
    pub init_r: i64,
    pub target_r: i64,
    pub tinit: usize,
    pub tfinal: usize,
    #[serde(rename = "deltaT")]
    pub delta_t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub orth_reg_weight: f64,
    /// The run's step count when absent (peft requires it).
    pub total_step: Option<usize>,
}

/// LoRA's scale of rank `r`: `alpha / r`, or `alpha / √r` with rsLoRA.
fn lora_scale(alpha: f64, r: i64, rslora: bool) -> f64 {
    if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.r, self.use_rslora)
    }
}

/// `adapter_config.json`, field for field as peft writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub auto_mapping: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    pub peft_type: String,
    pub r: i64,
    /// LoRA: a rank per module; AdaLoRA: the triplets kept, per `<module>.lora_E` (`null`
    /// before the first allocation).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub revision: Option<String>,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Parameters (not modules) with adapters: expert stacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
    /// A list of token ids, or `{"embed_tokens": [...]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<serde_json::Value>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub use_rslora: bool,
    /// AdaLoRA's keys (`peft_type: "ADALORA"`).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub adalora: Option<AdaLoraSchedule>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn bias_none() -> String {
    "none".into()
}
fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Adds fresh adapters to every matching linear layer of `net`; returns the adapted module
/// names. Adapters of kind `kind` (fp32 for mixed precision) on the device of the layer they
/// adapt. Every target name must match a layer (an error names the one that does not, before any
/// adapter is added); a name matched in fewer blocks than the model has is warned about.
pub fn add_adapters(net: &mut dyn Adapted, spec: &LoraSpec, kind: Kind) -> Result<Vec<String>> {
    if spec.r <= 0 {
        bail!("add_lora: r must be positive, got {}", spec.r);
    }
    let modules: Vec<String> = net.linears().iter().map(|l| l.name.clone()).collect();
    let mut kinds: Vec<String> = modules.iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect();
    kinds.sort();
    kinds.dedup();
    if let Targets::Names(names) = &spec.targets {
        for name in names {
            let hits = modules.iter().filter(|m| Targets::Names(vec![name.clone()]).matches(m).unwrap_or(false)).count();
            if hits == 0 {
                // a decoder's name on T5 (`q_proj` for `q`) gets T5's
                let t5_name = name.strip_suffix("_proj").filter(|n| kinds.iter().any(|k| k == n));
                let hint = crate::script::options::did_you_mean(name, kinds.iter().map(String::as_str)).or(t5_name).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default();
                bail!("add_lora: target `{name}` matches no linear layer{hint}; the model's linear layers: {}", kinds.join(", "));
            }
            if hits < net.blocks() {
                tracing::warn!("add_lora: target `{name}` matches {hits} module(s), fewer than the model's {} layers", net.blocks());
            }
        }
    }
    let mut names = vec![];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(spec.seed);
    names.extend(add_expert_adapters(net, spec, kind, &mut rng)?);
    for lin in net.linears_mut() {
        if spec.targets.matches(&lin.name)? {
            let (out, inp) = (lin.out_features(), lin.in_features());
            lin.adapter = Some(if spec.adalora.is_some() {
                Adapter::AdaLora(AdaLora::new(inp, out, spec.r, spec.alpha, spec.dropout, kind, lin.weight.device(), &mut rng))
            } else {
                let lora = Lora::new(inp, out, spec.r, spec.scale(), spec.dropout, kind, lin.weight.device(), &mut rng);
                if spec.use_dora { Adapter::Dora(Dora::new(lora, &lin.weight)) } else { Adapter::Lora(lora) }
            });
            names.push(lin.name.clone());
        }
    }
    if names.is_empty() {
        bail!("add_lora: targets {:?} match no linear layer; the model's linear layers: {}", spec.targets, kinds.join(", "));
    }
    Ok(names)
}

/// The adapters of `spec.target_parameters` on the expert stacks of `net`'s sparse blocks
/// (drawn from `rng` before the linear layers'); returns the adapted parameters' paths.
fn add_expert_adapters(net: &mut dyn Adapted, spec: &LoraSpec, kind: Kind, rng: &mut impl rand::Rng) -> Result<Vec<String>> {
    if spec.target_parameters.is_empty() {
        return Ok(vec![]);
    }
    if spec.dropout > 0.0 || spec.use_dora || spec.adalora.is_some() {
        bail!("add_lora: target_parameters (expert stacks) take plain LoRA without dropout, as peft's ParamWrapper does: set dropout: 0.0{}", if spec.use_dora { " and drop use_dora" } else { "" });
    }
    let blocks = net.sparse_blocks_mut();
    if blocks.is_empty() {
        bail!("add_lora: target_parameters {:?}: this model has no mixture-of-experts layers", spec.target_parameters);
    }
    for t in &spec.target_parameters {
        let hit = blocks.iter().any(|b| EXPERT_PARAMETERS.iter().any(|p| names_parameter(t, &format!("{}.{p}", b.name))));
        if !hit {
            bail!("add_lora: target_parameters `{t}` names no parameter; the expert stacks are {}", EXPERT_PARAMETERS.map(|p| format!("mlp.{p}")).join(", "));
        }
    }
    let mut names = vec![];
    for b in blocks {
        let e = b.experts.count();
        for p in EXPERT_PARAMETERS {
            let path = format!("{}.{p}", b.name);
            if !spec.target_parameters.iter().any(|t| names_parameter(t, &path)) {
                continue;
            }
            let stack = if p == EXPERT_PARAMETERS[0] { &b.experts.gate_up } else { &b.experts.down };
            let (out, inp) = (stack.size()[1], stack.size()[2]);
            let lora = ExpertLora::new(e, out, inp, spec.r, spec.scale(), kind, stack.device(), rng);
            if p == EXPERT_PARAMETERS[0] {
                b.experts.gate_up_lora = Some(lora);
            } else {
                b.experts.down_lora = Some(lora);
            }
            names.push(path);
        }
    }
    Ok(names)
}

/// [`add_adapters`] on a decoder, then its `modules_to_save` copies and trainable token rows.
pub fn add_lora(net: &mut Decoder, spec: &LoraSpec, kind: Kind) -> Result<Vec<String>> {
    let names = add_adapters(net, spec, kind)?;
    net.token_rows = None;
    net.embed_copy = None;
    for module in &spec.modules_to_save {
        match module.as_str() {
            "embed_tokens" if net.lm_head.is_none() => bail!("add_lora: modules_to_save `embed_tokens`: this model ties its output head to the embeddings; train chosen rows with trainable_tokens instead"),
            "embed_tokens" => net.embed_copy = Some(crate::nn::no_grad(|| net.embed_tokens.to_kind(kind).copy()).set_requires_grad(true)),
            "lm_head" => {
                let head = net.lm_head.as_mut().context("add_lora: modules_to_save `lm_head`: this model ties its output head to the embeddings (it has no lm_head of its own)")?;
                if head.adapter.is_some() {
                    bail!("add_lora: `lm_head` is both a LoRA target and in modules_to_save");
                }
                let copy = crate::nn::no_grad(|| head.weight.dense().to_kind(kind).copy()).set_requires_grad(true);
                head.adapter = Some(Adapter::Copy(copy));
            }
            other => bail!("add_lora: modules_to_save `{other}` is not supported (embed_tokens, lm_head)"),
        }
    }
    if !spec.trainable_tokens.is_empty() {
        if net.embed_copy.is_some() {
            bail!("add_lora: embed_tokens is in modules_to_save, so every row trains already; drop trainable_tokens");
        }
        let vocab = net.embed_tokens.size()[0];
        if let Some(bad) = spec.trainable_tokens.iter().find(|&&i| i < 0 || i >= vocab) {
            bail!("add_lora: trainable token id {bad} is outside the embedding's {vocab} rows");
        }
        let ids = Tensor::from_slice(&spec.trainable_tokens).to_device(net.embed_tokens.device());
        let values = crate::nn::no_grad(|| net.embed_tokens.index_select(0, &ids).to_kind(kind)).set_requires_grad(true);
        net.token_rows = Some(TokenRows { ids: spec.trainable_tokens.clone(), values });
    }
    Ok(names)
}

/// The trainable adapter tensors, `(peft key, tensor)`, sorted by key (a fixed order on every rank).
pub fn adapter_tensors(net: &dyn Adapted) -> Vec<(String, Tensor)> {
    let mut v = vec![];
    for lin in net.linears() {
        for (suffix, t) in lin.adapter.iter().flat_map(Adapter::tensors) {
            v.push((format!("base_model.model.{}.{suffix}", lin.name), t));
        }
    }
    v.extend(net.embedding_adapters());
    for block in net.sparse_blocks() {
        for (module, l) in block.adapter_keys() {
            v.push((format!("base_model.model.{module}.lora_A.weight"), l.a.shallow_clone()));
            v.push((format!("base_model.model.{module}.lora_B.weight"), l.b.shallow_clone()));
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The expert stacks with adapters, as peft's `target_parameters` lists them (`None`: none).
fn adapted_parameters(net: &dyn Adapted) -> Option<Vec<String>> {
    let mut v = vec![];
    for b in net.sparse_blocks() {
        for (p, l) in EXPERT_PARAMETERS.iter().zip([&b.experts.gate_up_lora, &b.experts.down_lora]) {
            let p = format!("mlp.{p}");
            if l.is_some() && !v.contains(&p) {
                v.push(p);
            }
        }
    }
    (!v.is_empty()).then_some(v)
}

/// peft's key of the trained copy of `model.embed_tokens` (`modules_to_save`).
const EMBED_COPY_KEY: &str = "base_model.model.model.embed_tokens.weight";

/// peft's key of the trainable token rows of `model.embed_tokens`.
const TOKEN_ROWS_KEY: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";

/// The distinct last path segments of adapted modules (`["q_proj", "v_proj"]`).
fn target_suffixes(net: &dyn Adapted) -> Vec<String> {
    let mut s: Vec<String> = net
        .linears()
        .iter()
        .filter(|l| l.adapter.as_ref().is_some_and(|a| !matches!(a, Adapter::Copy(_))))
        .map(|l| l.name.rsplit('.').next().unwrap().to_string())
        .collect();
    s.sort();
    s.dedup();
    s
}

/// peft's `rank_pattern` and `alpha_pattern` for the adapters whose rank or alpha differ from
/// `spec`'s `r` and `alpha` (e.g. loaded from an adapter with patterns), keyed by module name
/// (peft matches a key against the end of the module path). The alpha is recovered from the
/// adapter's scale: `s·r` (or `s·√r` with rsLoRA).
fn patterns(net: &dyn Adapted, spec: &LoraSpec) -> (BTreeMap<String, serde_json::Value>, BTreeMap<String, f64>) {
    let (mut ranks, mut alphas) = (BTreeMap::new(), BTreeMap::new());
    for lin in net.linears() {
        if let Some(Adapter::AdaLora(a)) = &lin.adapter {
            if let Some(keep) = &*a.keep.borrow() {
                ranks.insert(format!("{}.lora_E", lin.name), serde_json::json!(keep));
            }
            continue;
        }
        let Some(l) = lin.adapter.as_ref().and_then(Adapter::low_rank) else { continue };
        let r = l.rank();
        let alpha = if spec.use_rslora { l.scale * (r as f64).sqrt() } else { l.scale * r as f64 };
        if r != spec.r {
            ranks.insert(lin.name.clone(), r.into());
        }
        if (alpha - spec.alpha).abs() > 1e-9 * spec.alpha.abs().max(1.0) {
            alphas.insert(lin.name.clone(), alpha);
        }
    }
    (ranks, alphas)
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` (each atomically).
/// AdaLoRA's tensors as peft saves them, cut to the triplets the rank pattern keeps.
fn budgeted(net: &dyn Adapted) -> Vec<(String, Tensor)> {
    let mut v = vec![];
    for lin in net.linears() {
        let Some(Adapter::AdaLora(a)) = &lin.adapter else { continue };
        let rows = match &*a.keep.borrow() {
            Some(keep) if keep.len() as i64 == a.rank() => {
                let kept: Vec<i64> = keep.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i as i64).collect();
                Some(Tensor::from_slice(&kept).to_device(a.a.device()))
            }
            _ => None,
        };
        let cut = |t: &Tensor, dim: i64| match &rows {
            Some(r) => t.detach().index_select(dim, r),
            None => t.detach(),
        };
        v.push((format!("base_model.model.{}.lora_A", lin.name), cut(&a.a, 0)));
        v.push((format!("base_model.model.{}.lora_E", lin.name), cut(&a.e, 0)));
        v.push((format!("base_model.model.{}.lora_B", lin.name), cut(&a.b, 1)));
    }
    v
}

pub fn save_adapter(net: &dyn Adapted, spec: &LoraSpec, base_model: &str, dir: &Path) -> Result<()> {
    let mut tensors: BTreeMap<String, Tensor> = adapter_tensors(net).into_iter().map(|(k, t)| (k, t.detach())).collect();
    tensors.extend(budgeted(net));
    if tensors.is_empty() {
        bail!("save_adapter: the model has no LoRA adapters (call add_lora or load_adapter first)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let target_modules = match &spec.targets {
        Targets::Regex(re) => serde_json::Value::String(re.clone()),
        _ => serde_json::json!(target_suffixes(net)),
    };
    let (rank_pattern, alpha_pattern) = patterns(net, spec);
    let config = AdapterConfig {
        alpha_pattern,
        auto_mapping: None,
        base_model_name_or_path: Some(base_model.to_string()),
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: serde_json::Value::Bool(true),
        layers_pattern: None,
        layers_to_transform: None,
        lora_alpha: spec.alpha,
        lora_dropout: spec.dropout,
        modules_to_save: (!spec.modules_to_save.is_empty()).then(|| spec.modules_to_save.clone()),
        peft_type: if spec.adalora.is_some() { "ADALORA" } else { "LORA" }.into(),
        r: spec.r,
        rank_pattern,
        revision: None,
        target_modules,
        task_type: Some(net.task_type().into()),
        target_parameters: adapted_parameters(net),
        trainable_token_indices: net.trainable_token_ids().map(|ids| serde_json::json!(ids)),
        use_dora: spec.use_dora,
        use_rslora: spec.use_rslora,
        adalora: spec.adalora.clone(),
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&tensors, &dir.join("adapter_model.safetensors"), Some(meta))?;
    write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    Ok(())
}

/// Reads a peft LoRA adapter directory and installs its weights (replacing existing adapters).
/// Returns the spec it describes. `kind` is the adapters' dtype.
/// A peft adapter directory, read and checked: its config, the spec it describes, and its tensors.
pub struct AdapterFiles {
    pub cfg: AdapterConfig,
    pub spec: LoraSpec,
    pub weights: WeightSource,
    /// `adapter_config.json` and `adapter_model.safetensors`, for messages.
    pub cfg_path: std::path::PathBuf,
    pub file: std::path::PathBuf,
}

pub fn load_adapter(net: &mut Decoder, dir: &Path, kind: Kind) -> Result<LoraSpec> {
    let files = read_adapter(dir)?;
    let experts: Vec<String> = net.sparse_blocks().iter().flat_map(|b| [format!("{}.experts", b.name), format!("{}.experts.base_layer", b.name)]).collect();
    check_all_used(&files, &net.linears().iter().map(|l| l.name.as_str()).chain(experts.iter().map(String::as_str)).collect::<Vec<_>>())?;
    install_expert_adapters(net, &files, kind)?;
    let AdapterFiles { spec, weights, cfg_path, file, .. } = &files;
    net.token_rows = None;
    net.embed_copy = None;
    for module in &spec.modules_to_save {
        let key = match module.as_str() {
            "embed_tokens" => EMBED_COPY_KEY,
            "lm_head" => "base_model.model.lm_head.weight",
            other => bail!("{}: modules_to_save `{other}` is not supported (embed_tokens, lm_head)", cfg_path.display()),
        };
        if !weights.contains(key) {
            bail!("{}: modules_to_save names `{module}` but tensor `{key}` is missing", file.display());
        }
        let device = net.embed_tokens.device();
        match module.as_str() {
            "embed_tokens" => {
                let shape = net.embed_tokens.size();
                net.embed_copy = Some(weights.load(key, &shape, kind, device)?.set_requires_grad(true));
            }
            _ => {
                let head = net.lm_head.as_mut().with_context(|| format!("{}: modules_to_save names `lm_head`, but this model ties its output head to the embeddings", cfg_path.display()))?;
                let w = weights.load(key, &head.weight.size(), kind, head.weight.device())?.set_requires_grad(true);
                head.adapter = Some(Adapter::Copy(w));
            }
        }
    }
    if !spec.trainable_tokens.is_empty() {
        if !weights.contains(TOKEN_ROWS_KEY) {
            bail!("{}: trainable_token_indices is set but tensor `{TOKEN_ROWS_KEY}` is missing", file.display());
        }
        let (n, hidden) = (spec.trainable_tokens.len() as i64, net.embed_tokens.size()[1]);
        let vocab = net.embed_tokens.size()[0];
        if let Some(bad) = spec.trainable_tokens.iter().find(|&&i| i < 0 || i >= vocab) {
            bail!("{}: trainable token id {bad} is outside the model's {vocab} embedding rows (were tokens added to the tokenizer? add them with model.add_tokens first)", cfg_path.display());
        }
        let values = weights.load(TOKEN_ROWS_KEY, &[n, hidden], kind, net.embed_tokens.device())?.set_requires_grad(true);
        net.token_rows = Some(TokenRows { ids: spec.trainable_tokens.clone(), values });
    }
    install_adapters(net.linears_mut(), &files, kind)?;
    Ok(files.spec)
}

/// Installs the expert-stack adapters of `files` (peft's `target_parameters`) on the sparse
/// blocks of `net` (every block loses its own first). peft wraps a block's adapted stacks in
/// [`EXPERT_PARAMETERS`] order, the last outermost: its tensors are `<block>.experts.lora_*`, the
/// one before it `<block>.experts.base_layer.lora_*`.
fn install_expert_adapters(net: &mut dyn Adapted, files: &AdapterFiles, kind: Kind) -> Result<()> {
    let AdapterFiles { cfg, spec, weights, cfg_path, file } = files;
    for b in net.sparse_blocks_mut() {
        b.experts.gate_up_lora = None;
        b.experts.down_lora = None;
        let adapted: Vec<usize> = (0..EXPERT_PARAMETERS.len()).filter(|&i| spec.target_parameters.iter().any(|t| names_parameter(t, &format!("{}.{}", b.name, EXPERT_PARAMETERS[i])))).collect();
        let e = b.experts.count();
        for (depth, &i) in adapted.iter().rev().enumerate() {
            let module = format!("{}.experts{}", b.name, ".base_layer".repeat(depth));
            let key = |t: &str| format!("base_model.model.{module}.{t}.weight");
            if !weights.contains(&key("lora_A")) {
                bail!("{}: target_parameters names {} but tensor `{}` is missing", cfg_path.display(), EXPERT_PARAMETERS[i], key("lora_A"));
            }
            let stack = if i == 0 { &b.experts.gate_up } else { &b.experts.down };
            let (out, inp, device) = (stack.size()[1], stack.size()[2], stack.device());
            let r = weights.load_any(&key("lora_A"))?.size()[0] / e;
            let a = weights.load(&key("lora_A"), &[e * r, inp], kind, device).with_context(|| format!("{}", file.display()))?.set_requires_grad(true);
            let bt = weights.load(&key("lora_B"), &[out, r * e], kind, device)?.set_requires_grad(true);
            let scale = lora_scale(cfg.lora_alpha, r, cfg.use_rslora);
            let lora = Some(ExpertLora { a, b: bt, scale });
            if i == 0 {
                b.experts.gate_up_lora = lora;
            } else {
                b.experts.down_lora = lora;
            }
        }
    }
    Ok(())
}

/// Reads and checks the peft adapter directory `dir` (LoRA, DoRA or AdaLoRA).
pub fn read_adapter(dir: &Path) -> Result<AdapterFiles> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: AdapterConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a peft adapter config", cfg_path.display()))?;
    match (cfg.peft_type.as_str(), &cfg.adalora) {
        ("LORA", _) | ("ADALORA", Some(_)) => {}
        ("ADALORA", None) => bail!("{}: an ADALORA config without init_r, target_r, ...", cfg_path.display()),
        (other, _) => bail!("{}: peft_type `{other}` is not supported (LORA, ADALORA)", cfg_path.display()),
    }
    if cfg.peft_type == "LORA" && cfg.adalora.is_some() {
        bail!("{}: peft_type LORA with AdaLoRA keys (init_r, ...)", cfg_path.display());
    }
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        bail!("{}: missing adapter_model.safetensors (adapter_model.bin is not supported)", dir.display());
    }
    let weights = WeightSource::open_files(&[file.clone()])?;
    let targets = match &cfg.target_modules {
        serde_json::Value::String(s) if s == "all-linear" => Targets::AllLinear,
        serde_json::Value::String(s) => Targets::Regex(s.clone()),
        serde_json::Value::Array(a) => Targets::Names(a.iter().filter_map(|v| v.as_str().map(String::from)).collect()),
        other => bail!("{}: unsupported target_modules {other}", cfg_path.display()),
    };
    let trainable_tokens: Vec<i64> = match &cfg.trainable_token_indices {
        None | Some(serde_json::Value::Null) => vec![],
        Some(serde_json::Value::Array(a)) => a.iter().map(|v| v.as_i64().with_context(|| format!("{}: trainable_token_indices holds {v}, not a token id", cfg_path.display()))).collect::<Result<_>>()?,
        Some(serde_json::Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "embed_tokens") {
                bail!("{}: trainable tokens of `{k}` are not supported (only embed_tokens)", cfg_path.display());
            }
            o.get("embed_tokens").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_i64()).collect()).unwrap_or_default()
        }
        Some(other) => bail!("{}: trainable_token_indices must be a list of ids, got {other}", cfg_path.display()),
    };
    let modules_to_save = cfg.modules_to_save.clone().unwrap_or_default();
    let r = cfg.adalora.as_ref().map_or(cfg.r, |a| a.init_r);
    let target_parameters = cfg.target_parameters.clone().unwrap_or_default();
    let spec = LoraSpec { r, alpha: cfg.lora_alpha, dropout: cfg.lora_dropout, targets, use_rslora: cfg.use_rslora, use_dora: cfg.use_dora, trainable_tokens, modules_to_save, adalora: cfg.adalora.clone(), seed: 0, target_parameters };
    Ok(AdapterFiles { cfg, spec, weights, cfg_path, file })
}

/// Installs the adapters of `files` (in `kind`) on the layers of `linears` its tensors name;
/// the others lose theirs (but a `modules_to_save` copy). Fails when it names none.
pub fn install_adapters(linears: Vec<&mut Linear>, files: &AdapterFiles, kind: Kind) -> Result<()> {
    let AdapterFiles { cfg, spec, weights, cfg_path, file } = files;
    let mut found = 0;
    for lin in linears {
        if let Some(schedule) = &spec.adalora {
            let key = |t: &str| format!("base_model.model.{}.{t}", lin.name);
            if !weights.contains(&key("lora_A")) {
                lin.adapter = None;
                continue;
            }
            // the triplets a budget step kept, if one ran; the tensors hold only those
            let keep: Option<Vec<bool>> = match cfg.rank_pattern.get(&format!("{}.lora_E", lin.name)) {
                Some(v) => Some(serde_json::from_value(v.clone()).with_context(|| format!("{}: rank_pattern of {} is not a list of booleans", cfg_path.display(), lin.name))?),
                None => None,
            };
            let r = keep.as_ref().map_or(schedule.init_r, |k| k.iter().filter(|x| **x).count() as i64);
            let (out, inp) = (lin.out_features(), lin.in_features());
            let device = lin.weight.device();
            let a = weights.load(&key("lora_A"), &[r, inp], kind, device)?.set_requires_grad(true);
            let e = weights.load(&key("lora_E"), &[r, 1], kind, device)?.set_requires_grad(true);
            let b = weights.load(&key("lora_B"), &[out, r], kind, device)?.set_requires_grad(true);
            lin.adapter = Some(Adapter::AdaLora(AdaLora { a, e, b, scale: AdaLora::scale(spec.alpha, schedule.init_r), dropout: spec.dropout, keep: keep.into() }));
            found += 1;
            continue;
        }
        let key_a = format!("base_model.model.{}.lora_A.weight", lin.name);
        let key_b = format!("base_model.model.{}.lora_B.weight", lin.name);
        if !weights.contains(&key_a) {
            if !matches!(lin.adapter, Some(Adapter::Copy(_))) || !spec.modules_to_save.contains(&lin.name) {
                lin.adapter = None;
            }
            continue;
        }
        // rank_pattern / alpha_pattern: a key matches the module path's last segments
        let name = lin.name.as_str();
        let matches = |k: &str| name == k || name.ends_with(&format!(".{k}"));
        let r = cfg.rank_pattern.iter().find(|(k, _)| matches(k)).and_then(|(_, v)| v.as_i64()).unwrap_or(cfg.r);
        let alpha = cfg.alpha_pattern.iter().find(|(k, _)| matches(k)).map(|(_, v)| *v).unwrap_or(cfg.lora_alpha);
        let (out, inp) = (lin.out_features(), lin.in_features());
        let device = lin.weight.device();
        let a = weights.load(&key_a, &[r, inp], kind, device)?.set_requires_grad(true);
        let b = weights.load(&key_b, &[out, r], kind, device)?.set_requires_grad(true);
        let scale = lora_scale(alpha, r, cfg.use_rslora);
        let lora = Lora { a, b, scale, dropout: cfg.lora_dropout };
        lin.adapter = Some(if cfg.use_dora {
            let key = format!("base_model.model.{}.lora_magnitude_vector", lin.name);
            if !weights.contains(&key) {
                bail!("{}: `use_dora` is set but tensor `{key}` is missing", file.display());
            }
            Adapter::Dora(Dora { magnitude: weights.load(&key, &[out], kind, device)?.set_requires_grad(true), lora })
        } else {
            Adapter::Lora(lora)
        });
        found += 1;
    }
    if found == 0 && spec.target_parameters.is_empty() {
        bail!("{}: no adapter tensor matches a linear layer of this model", file.display());
    }
    Ok(())
}

/// Fails on a tensor of `files` that names none of the layers `names` (nor an embedding or head copy).
pub fn check_all_used(files: &AdapterFiles, names: &[&str]) -> Result<()> {
    let AdapterFiles { weights, file, .. } = files;
    let unused: Vec<String> = weights
        .names()
        .into_iter()
        .filter(|n| {
            if [TOKEN_ROWS_KEY, EMBED_COPY_KEY, "base_model.model.lm_head.weight"].contains(&n.as_str()) {
                return false;
            }
            let module = n.trim_start_matches("base_model.model.");
            let module = [".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_A", ".lora_B", ".lora_E"].iter().find_map(|s| module.strip_suffix(s)).unwrap_or(module);
            !names.contains(&module)
        })
        .collect();
    if !unused.is_empty() {
        bail!("{}: tensor `{}` names no linear layer of this model", file.display(), unused[0]);
    }
    Ok(())
}

/// Folds every adapter of the linear layers into its base weight (`W ← W + s·B·A`, DoRA's
/// rescaled form) and removes the adapters. A dense weight is updated in place (it may be a
/// slice of a joint weight, [`super::linear::Joint`]); a 4-bit one becomes dense.
pub fn merge_linears(net: &mut dyn Adapted) {
    let _g = tch::no_grad_guard();
    for lin in net.linears_mut() {
        if let Some(a) = lin.adapter.take() {
            let merged = a.merged_weight(&lin.weight.dense()).detach();
            match &mut lin.weight {
                super::linear::Weight::Dense(w) if w.kind() == merged.kind() => {
                    w.copy_(&merged);
                }
                w => *w = super::linear::Weight::Dense(merged),
            }
        }
    }
}

/// [`merge_linears`] on a decoder, its trained token rows folded into the embeddings first.
pub fn merge(net: &mut Decoder) {
    net.embed_tokens = crate::nn::no_grad(|| net.embedding_weight().detach());
    net.token_rows = None;
    merge_linears(net);
    for block in net.sparse_blocks_mut() {
        block.merge_adapters();
    }
}
