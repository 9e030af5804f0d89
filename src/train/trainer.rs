//! The training loop, in one readable function: accumulation, clipping, logging, evaluation,
//! checkpointing and callbacks are all visible in [`train`].
//!
//! The loop optimizes an [`Objective`] (SFT, DPO, ORPO, KTO): the objective plans nothing but
//! says how long its examples are, computes each micro-batch's loss and gradients, and names its
//! metrics; the loop names no layer and no loss. The loss of an optimizer step is
//! `Σ micro-batch losses / Σ units` over its accumulation window, a unit being what the objective
//! averages over: a label token for SFT (so the loss is the mean over every label token of the
//! window, not the mean of per-micro-batch means), a micro-batch for the preference objectives.
//!
//! On a GPU the host never waits for a step to finish before queueing the next one's forward
//! and backward: a step's loss and gradient norm travel to pinned host memory behind its
//! update, and are read (logged, handed to callbacks) while the next step computes. The next
//! update is queued only after that, so what callbacks, evaluations and checkpoints see is
//! exactly what a loop without the overlap would show them.
//!
//! Data parallel (`WORLD_SIZE` > 1, see [`crate::dist`]): every rank plans the same seeded
//! epoch; an optimizer step's window holds `grad_accum × world` micro-batches and rank `r`
//! takes those at positions `k ≡ r (mod world)`. Each rank scales its summed loss by
//! `1 / (units of the whole window)` (every rank counts them from the plan), so the all-reduced
//! **sum** of the gradients is exactly the single-process gradient of the same global batch.

use super::batch::{plan_epoch, BatchConfig, Row};
use super::checkpoint::{self, TrainerState};
use super::objective::{Backward, Objective, Split};
use super::logger::RunLogger;
use super::optim::{clip_grad_norm, zero_grads, AdamW};
use super::schedule::{lr_at, Schedule};
use crate::data::format::Example;
use crate::dist::ProcessGroup;
use crate::models::decoder::Decoder;
use crate::nn::peft::{self, Adapted, LoraSpec};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub batch: BatchConfig,
    pub eval_batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub lr: f64,
    pub scheduler: Schedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    /// Compute dtype of the frozen weights (adapters stay fp32).
    pub precision: Kind,
    /// Recompute each decoder layer in backward; `None` = decide from free device memory, or
    /// from `memory_budget`.
    pub gradient_checkpointing: Option<Checkpointing>,
    /// Bytes of GPU memory (per GPU) training may hold: the caching allocator is capped there,
    /// and checkpointing and the micro-batch are chosen to fit.
    pub memory_budget: Option<u64>,
    pub log_every: usize,
    pub eval_every: Option<usize>,
    pub save_every: Option<usize>,
    pub save_total_limit: Option<usize>,
    pub output_dir: PathBuf,
    pub seed: u64,
    pub resume: bool,
    /// Profile these optimizer steps (main process only).
    pub profile: Option<ProfileSteps>,
    /// What a non-finite loss or gradient norm does.
    pub on_nan: OnNan,
    /// Steps whose gradients are made NaN (to test `on_nan`).
    pub inject_nan_steps: Vec<usize>,
    /// What running out of memory in a step does.
    pub on_oom: OnOom,
    /// Micro-batches of more rows than this fail as out of memory (to test `on_oom`).
    pub inject_oom_rows: Option<usize>,
    /// AdaLoRA's schedule, when the adapters are AdaLoRA's.
    pub adalora: Option<crate::nn::peft::AdaLoraSchedule>,
}

pub use crate::models::Checkpointing;

/// What the loop asks of the model it trains (a decoder, T5), besides its adapters: its dtype,
/// its devices, and whether a micro-batch's activations fit without checkpointing.
pub trait TrainModel: Adapted {
    /// The frozen weights' dtype.
    fn kind(&self) -> Kind;
    /// The devices the model uses, the inputs' first.
    fn devices(&self) -> Vec<tch::Device>;
    /// Where the loss is computed.
    fn head_device(&self) -> tch::Device;
    /// What `rows` rows of `row_len` tokens need on the device beyond the weights, by what
    /// backward keeps ([`super::memory`]).
    fn activation_needs(&self, rows: u64, row_len: u64) -> super::memory::Needs;
    /// Casts the frozen weights to `kind` (adapters stay as they are).
    fn set_dtype(&mut self, kind: Kind);
}

impl TrainModel for Decoder {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn devices(&self) -> Vec<tch::Device> {
        Decoder::devices(self)
    }
    fn head_device(&self) -> tch::Device {
        self.head_device
    }
    fn activation_needs(&self, rows: u64, row_len: u64) -> super::memory::Needs {
        super::memory::decoder_needs(&self.config, rows, row_len, self.kind, super::memory::decoder_adapters_keep(self), self.device.is_cuda())
    }
    fn set_dtype(&mut self, kind: Kind) {
        Decoder::set_dtype(self, kind)
    }
}

/// What a step with a non-finite loss or gradient norm does (fp16's overflow steps, which its loss
/// scaling expects, are skipped either way).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnNan {
    /// Training stops with an error before the next checkpoint; the last one is intact.
    Stop,
    /// The update is skipped (the gradient norm is read before every update for it: on a GPU
    /// the host then waits for each step's backward); more than `max_skipped` such steps stop.
    Skip { max_skipped: usize },
}

/// What running out of device memory inside a step does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnOom {
    /// Training stops with an error naming the step, the shapes and what to lower.
    Stop,
    /// The step is retried with every micro-batch halved (again, while rows remain to halve):
    /// the same examples per optimizer step, so the same numbers.
    Halve,
}

/// `steps` optimizer steps from step `start` (1-based, as logged), and the evaluation after the
/// last of them if one falls there, profiled into `<output_dir>/profile/` (`trace.json`,
/// `summary.txt`).
#[derive(Debug, Clone, Copy)]
pub struct ProfileSteps {
    pub start: usize,
    pub steps: usize,
}

/// What a callback asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Control {
    Continue,
    Stop,
}

/// Recipe callbacks; each receives the current metrics. They run with gradients off, may use
/// the model (it is only read while training), and see the adapters as of the step reported.
/// A callback that fails stops training like a `Stop`, with a checkpoint at the current step;
/// `train` then returns the failure.
pub trait Hooks {
    fn on_step(&mut self, metrics: &Map<String, Value>) -> Result<Control>;
    fn on_log(&mut self, metrics: &Map<String, Value>) -> Result<Control>;
    fn on_eval(&mut self, metrics: &Map<String, Value>) -> Result<Control>;
    /// Metrics an evaluation adds besides the objective's (scores of generated answers), before
    /// it is logged and handed to `on_eval`. `scored`: the objective's eval examples
    /// ([`Objective::eval_examples`]); a hook whose forward covers them (generation from their
    /// prompts) may return their summed label loss, and the evaluation then runs no loss pass
    /// of its own.
    fn eval_extra(&mut self, _scored: Option<&[Example]>) -> Result<(Map<String, Value>, Option<f64>)> {
        Ok((Map::new(), None))
    }
}

/// Stops `running` once the GPUs are idle and writes `profile/trace.json` and
/// `profile/summary.txt` (also logged) under `dir`.
fn write_profile(running: crate::cuda::profile::Profiler, dir: &std::path::Path, p: ProfileSteps, evaluated: bool) -> Result<()> {
    let last = p.start + p.steps - 1;
    let evaluation = if evaluated { format!(" and the evaluation after step {last}") } else { String::new() };
    let header = format!("steps {}..={last}{evaluation} (times are totals over the {} steps)", p.start, p.steps);
    running.finish(&dir.join("profile"), &header)
}

/// Sums of a step's (or an evaluation's) loss and metrics, as read back from the device:
/// `[loss, (value, count) per metric]`.
fn stack_sums(loss: &Tensor, metrics: &Option<Tensor>) -> Tensor {
    let loss = loss.to_kind(Kind::Double).reshape([1]);
    match metrics {
        Some(m) => {
            let m = m.to_kind(Kind::Double).to_device(loss.device()).reshape([-1]);
            Tensor::cat(&[loss, m], 0)
        }
        None => loss,
    }
}

/// Adds `names`' metrics from `sums` (`[(value, count)...]`, as [`stack_sums`] lays them out
/// after the loss) to `m`, each as `prefix + name`: `Σ value / Σ count`, left out where the count is 0.
fn insert_metrics(m: &mut Map<String, Value>, prefix: &str, names: &[&str], sums: &[f64]) {
    for (k, name) in names.iter().enumerate() {
        let (v, c) = (sums[2 * k], sums[2 * k + 1]);
        if c > 0.0 {
            m.insert(format!("{prefix}{name}"), json!(v / c));
        }
    }
}

/// The objective's mean loss and metrics over its evaluation examples, without gradients, as
/// logged: `eval_loss`, `eval_<metric>`, and the objective's extras. With `pg`, the micro-batches
/// are shared out across its ranks and the sums reduced. On a GPU the forwards run the fused
/// kernels ([`crate::nn::inference_kernels`]; dropout off).
pub fn evaluate<M: TrainModel>(net: &M, objective: &dyn Objective<M>, cfg: &BatchConfig, pg: Option<&ProcessGroup>) -> Result<Map<String, Value>> {
    let _g = tch::no_grad_guard();
    crate::nn::inference_kernels(|| evaluate_on(net, objective, cfg, pg))
}

/// [`evaluate`]'s work, inside its scope.
fn evaluate_on<M: TrainModel>(net: &M, objective: &dyn Objective<M>, cfg: &BatchConfig, pg: Option<&ProcessGroup>) -> Result<Map<String, Value>> {
    let cfg = BatchConfig { shuffle: false, ..cfg.clone() };
    let names = objective.metric_names();
    let mut sums = Tensor::zeros([1 + 2 * names.len() as i64], (Kind::Double, net.head_device()));
    let mut units = 0.0;
    let (rank, world) = pg.map(|g| (g.rank, g.world_size)).unwrap_or((0, 1));
    for (j, rows) in plan_epoch(objective.lengths(Split::Eval), &cfg, 0).into_iter().enumerate() {
        if j % world != rank {
            continue;
        }
        let step = objective.step(net, Split::Eval, &rows, &cfg, None)?;
        sums += stack_sums(&step.loss, &step.metrics).to_device(net.head_device());
        units += objective.units(Split::Eval, &rows, &cfg);
    }
    let mut sums = Vec::<f64>::try_from(sums)?;
    sums.push(units);
    if let Some(g) = pg {
        sums = g.sum_f64(&sums)?;
    }
    let units = sums.pop().unwrap_or(0.0);
    let mut m = eval_loss_map(objective, sums[0], units)?;
    insert_metrics(&mut m, "eval_", &names, &sums[1..]);
    Ok(m)
}

/// `eval_loss` (`sum / units`) and the objective's extras.
fn eval_loss_map<M: TrainModel>(objective: &dyn Objective<M>, sum: f64, units: f64) -> Result<Map<String, Value>> {
    if units == 0.0 {
        bail!("the evaluation set has nothing to evaluate (no label tokens)");
    }
    let mut m = Map::new();
    m.insert("eval_loss".into(), json!(sum / units));
    m.extend(objective.eval_extras(sum / units, units));
    Ok(m)
}

/// The evaluation's map from the summed loss of every eval example, scored elsewhere
/// ([`Hooks::eval_extra`]), over the units of the whole eval set.
fn loss_map<M: TrainModel>(objective: &dyn Objective<M>, sum: f64, cfg: &BatchConfig) -> Result<Map<String, Value>> {
    let all: Row = (0..objective.lengths(Split::Eval).len()).collect();
    eval_loss_map(objective, sum, objective.units(Split::Eval, &[all], cfg))
}

/// What the loop keeps of an optimizer step queued on the GPU until its loss is read back.
struct QueuedStep {
    epoch: usize,
    /// The position in the epoch's plan after the step, and the plan's length.
    end: usize,
    plan_len: usize,
    lr: f64,
    /// Units of the whole window (all ranks) and this rank's tokens.
    units: f64,
    tokens: i64,
}

/// The outcome of a run, returned to the recipe.
#[derive(Debug, Clone, Default)]
pub struct TrainResult {
    pub steps: usize,
    pub epoch: f64,
    pub train_loss: f64,
    pub eval_loss: Option<f64>,
    pub stopped_early: bool,
    pub tokens_per_sec: f64,
    pub checkpoint: Option<PathBuf>,
    pub log_history: Vec<Value>,
    /// A SIGINT or SIGTERM stopped the run (after saving `checkpoint`).
    pub interrupted: bool,
}

/// Whether every element of `params` is finite (one read from the device).
fn finite(params: &[Tensor]) -> bool {
    let _g = tch::no_grad_guard();
    params.iter().all(|p| p.isfinite().all().int64_value(&[]) != 0)
}

/// Casts the frozen weights to the compute dtype (adapters are left in fp32); done before
/// [`train`], which only reads the model.
pub fn set_precision<M: TrainModel>(net: &mut M, kind: Kind) {
    if net.kind() != kind {
        tracing::info!("casting frozen weights from {:?} to {:?} for training", net.kind(), kind);
        net.set_dtype(kind);
    }
}

/// Whether a callback asked to stop (a failure counts as a stop, and is kept in `failure`).
fn asks_stop(outcome: Result<Control>, failure: &mut Option<anyhow::Error>) -> bool {
    match outcome {
        Ok(c) => c == Control::Stop,
        Err(e) => {
            failure.get_or_insert(e);
            true
        }
    }
}

/// Trains the model's LoRA adapters (the frozen weights already in `cfg.precision`:
/// [`set_precision`]).
pub fn train<M: TrainModel>(
    net: &M,
    spec: &LoraSpec,
    base_model: &str,
    objective: &dyn Objective<M>,
    cfg: &TrainConfig,
    hooks: &mut dyn Hooks,
    logger: &mut RunLogger,
) -> Result<TrainResult> {
    let params: Vec<Tensor> = peft::adapter_tensors(net).into_iter().map(|(_, t)| t).collect();
    if params.is_empty() {
        bail!("the model has no LoRA adapters; call model.add_lora(#{{...}}) first");
    }
    let lengths = objective.lengths(Split::Train);
    if lengths.is_empty() {
        bail!("the training set is empty");
    }
    let names = objective.metric_names();
    anyhow::ensure!(net.kind() == cfg.precision, "the frozen weights are {:?}, the run's precision {:?}", net.kind(), cfg.precision);
    let fp16 = cfg.precision == Kind::Half;
    let pg = crate::dist::group()?;
    let (rank, world) = pg.map(|g| (g.rank, g.world_size)).unwrap_or((0, 1));
    let main = rank == 0;
    let plan_len = plan_epoch(lengths, &cfg.batch, 0).len();
    // micro-batches per optimizer step, over all ranks
    let window = cfg.grad_accum * world;
    let steps_per_epoch = plan_len.div_ceil(window);
    let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs);
    let warmup = cfg.warmup_steps.unwrap_or((cfg.warmup_ratio * total_steps as f64).ceil() as usize);
    let mut opt = AdamW::new(&params, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay);
    let mut state = TrainerState::default();
    state.loss_scale = if fp16 { 65536.0 } else { 1.0 };

    if main {
        let removed = checkpoint::remove_partial(&cfg.output_dir)?;
        if removed > 0 {
            tracing::info!("removed {removed} half-written checkpoint(s) an interrupted run left in {}", cfg.output_dir.display());
        }
    }
    let mut allocator = match &cfg.adalora {
        Some(schedule) => super::adalora::RankAllocator::new(net, schedule, total_steps)?,
        None => None,
    };
    if cfg.resume {
        if let Some(dir) = checkpoint::latest(&cfg.output_dir)? {
            state = checkpoint::load(&dir, net, &params, &mut opt)?;
            if let Some(a) = &mut allocator {
                a.restore(net, &crate::nn::WeightSource::open_files(&[dir.join("optimizer.safetensors")])?)?;
            }
            if state.step >= total_steps {
                bail!(
                    "resume: {} is at step {}, and this run trains {total_steps} steps: nothing is left to train; raise max_steps (or epochs) above {}",
                    dir.display(),
                    state.step,
                    state.step
                );
            }
            tracing::info!("resumed from {} (step {}, epoch {}, batch {})", dir.display(), state.step, state.epoch, state.batch_in_epoch);
        } else {
            tracing::info!("resume: no checkpoint in {}, starting fresh", cfg.output_dir.display());
        }
        // what an interrupted run logged after the step resumed from (or after none) is dropped
        logger.resume_at(&cfg.output_dir, state.step)?;
    }
    if let Some(g) = pg {
        // every rank starts from rank 0's adapters, moments and position
        g.bucketed(&params, |t| g.broadcast(t, 0))?;
        g.bucketed(&opt.m, |t| g.broadcast(t, 0))?;
        g.bucketed(&opt.v, |t| g.broadcast(t, 0))?;
        let pos = Tensor::from_slice(&[state.step as f64, state.epoch as f64, state.batch_in_epoch as f64, state.loss_scale, state.good_steps as f64, opt.step as f64]);
        g.broadcast(&pos, 0)?;
        let pos = Vec::<f64>::try_from(pos)?;
        (state.step, state.epoch, state.batch_in_epoch, state.loss_scale, state.good_steps) = (pos[0] as usize, pos[1] as usize, pos[2] as usize, pos[3], pos[4] as usize);
        opt.step = pos[5] as _;
        // give every adapter a (zero) gradient, so a rank without micro-batches in a window
        // still has a full bucket to contribute
        let zero = params.iter().map(|p| p.sum(Kind::Float) * 0.0).fold(Tensor::zeros([], (Kind::Float, net.devices()[0])), |a, b| a + b);
        zero.backward();
    }
    // what backward keeps, and how many smaller micro-batches each planned one runs as
    let longest = lengths.iter().copied().max().unwrap_or(1).min(cfg.batch.max_length);
    let row_len = cfg.batch.width(if cfg.batch.packing { cfg.batch.max_length } else { longest }) as u64;
    let rows = cfg.batch.batch_size as u64;
    // a micro-batch of `examples` examples (the unit `split` divides)
    let needs = |examples: u64| net.activation_needs(examples * objective.rows_per_example() as u64, row_len);
    // one example's needs: which ways of keeping activations the model has
    let one = needs(1);
    let modes: Vec<Checkpointing> = match cfg.gradient_checkpointing {
        Some(Checkpointing::First(n)) => match one.per_layer {
            Some((layers, _)) if n <= layers => vec![Checkpointing::First(n)],
            Some((layers, _)) => bail!("gradient_checkpointing: {n} layers to checkpoint, but the model has {layers}"),
            None => bail!("gradient_checkpointing: {n}: this model checkpoints all its layers or none (true or false)"),
        },
        Some(c) => vec![c],
        None => {
            let layers = one.per_layer.map_or(0, |(layers, _)| layers);
            super::memory::ladder(layers).into_iter().filter(|&m| one.of(m).is_some()).collect()
        }
    };
    let on_gpu = net.devices().iter().any(|d| d.is_cuda());
    let budget = cfg.memory_budget.filter(|_| on_gpu);
    if cfg.memory_budget.is_some() && budget.is_none() {
        tracing::info!("memory_budget caps GPU memory; on the CPU it is not applied");
    }
    // the cap lasts as long as training (lifted when `_cap` drops)
    let (_cap, (mut checkpointing, mut split)) = match budget {
        Some(b) => {
            let cuda: Vec<tch::Device> = net.devices().into_iter().filter(|d| d.is_cuda()).collect();
            let cap = cuda.iter().map(|&d| crate::cuda::limit_memory(d, b)).collect::<Result<Vec<_>>>()?;
            // the weights, adapters and optimizer moments, and the adapters' gradients to come
            let resident = cuda.iter().filter_map(|&d| crate::cuda::allocated(d)).max().unwrap_or(0) + 4 * params.iter().map(|p| p.numel() as u64).sum::<u64>();
            (cap, super::memory::plan_within(b, resident, rows, row_len, &modes, needs)?)
        }
        None => (vec![], match cfg.gradient_checkpointing {
            Some(c) => (c, 1),
            None => {
                let (c, why) = super::memory::plan(needs(rows), net.devices()[0]);
                tracing::info!("gradient_checkpointing auto: {why}");
                (c, 1)
            }
        }),
    };
    // memory comes first where layers are recomputed to save it
    crate::cuda::autograd::overlap_lora(checkpointing == Checkpointing::Off);
    let trainable: i64 = params.iter().map(|p| p.numel() as i64).sum();
    tracing::info!(
        "training: {} examples, {plan_len} micro-batches/epoch, batch {} × accumulation {} × {world} process(es), {total_steps} steps, warmup {warmup}, {trainable} trainable parameters",
        lengths.len(),
        cfg.batch.batch_size,
        cfg.grad_accum
    );

    let progress = if main { indicatif::ProgressBar::new(total_steps as u64) } else { indicatif::ProgressBar::hidden() };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap(),
    );
    progress.set_position(state.step as u64);
    let mut result = TrainResult { log_history: state.log_history.clone(), ..Default::default() };
    for d in net.devices() {
        crate::cuda::reset_peak(d);
    }
    let started = std::time::Instant::now();
    let mut window_tokens = 0i64;
    let mut log_loss_sum = 0.0;
    let mut log_steps = 0usize;
    // the objective's metrics since the last log: (Σ value, Σ count) each
    let mut log_metric_sums = vec![0.0; 2 * names.len()];
    let mut stop = false;
    // steps whose update was skipped for a non-finite gradient norm, not yet reported
    let mut skipped_steps: std::collections::BTreeSet<usize> = Default::default();
    let mut skipped_total = 0usize;
    let signals = super::interrupt::Guard::install();
    // the first callback failure: training stops, with a checkpoint, and returns it
    let mut failure: Option<anyhow::Error> = None;
    // said at the first evaluation whose loss eval_generate's prompts' forward scored
    let mut said_scored = false;
    let mut profiler = None;
    // where the next step's micro-batches start: (epoch, position in its plan, the plan)
    let (mut epoch, mut position) = (state.epoch, state.batch_in_epoch);
    let mut plan = plan_epoch(lengths, &cfg.batch, epoch);
    let mut finished_plan_len = plan.len();
    // steps overlap by one (see the module's doc): each iteration queues step n + 1's forward
    // and backward, finishes step n (its loss and norm, `[‖g‖, Σ loss, Σ metrics…]`, arriving on
    // the host), then queues step n + 1's update
    let mut queued = state.step; // steps whose update is queued
    let mut pending: Option<(QueuedStep, crate::cuda::HostCopy)> = None;

    loop {
        // the last profiled step is finished before the next is queued, so the trace ends with it
        let profile_ends = cfg.profile.is_some_and(|p| main && pending.is_some() && p.start + p.steps - 1 == queued);
        let mut next = None;
        if queued < total_steps && !stop && !profile_ends {
            if let Some(p) = cfg.profile.filter(|p| main && p.start == queued + 1) {
                tracing::info!("profiling steps {}..={}", p.start, p.start + p.steps - 1);
                profiler = Some(crate::cuda::profile::start(net.devices()[0].is_cuda())?);
            }
            if position >= plan.len() {
                epoch += 1;
                position = 0;
                plan = plan_epoch(lengths, &cfg.batch, epoch);
            }
            // one optimizer step: a window of up to grad_accum × world micro-batches, never
            // across epochs; this rank takes every world-th one
            let end = (position + window).min(plan.len());
            let window_rows: &[Vec<Row>] = &plan[position..end];
            let units: f64 = window_rows.iter().map(|rows| objective.units(Split::Train, rows, &cfg.batch)).sum();
            let poisoned = cfg.inject_nan_steps.contains(&(queued + 1));
            let weight = if poisoned { f64::NAN } else { state.loss_scale / units.max(1.0) };
            let (mut sums, tokens) = loop {
                let run = || -> Result<(Tensor, i64)> {
                    let mut sums = Tensor::zeros([1 + 2 * names.len() as i64], (Kind::Double, net.head_device()));
                    let mut tokens = 0i64;
                    let mine = window_rows.iter().enumerate().filter(|(k, _)| k % world == rank);
                    // each micro-batch as `split` smaller ones, numbered as a run with that many more would number them
                    for (k, rows) in mine.flat_map(|(k, rows)| rows.chunks(rows.len().div_ceil(split)).enumerate().map(move |(j, r)| (k * split + j, r))) {
                        let seed = (cfg.seed as i64).wrapping_mul(1_000_003).wrapping_add((queued * 64 + k) as i64 * 1009);
                        let step = crate::script::options::catch_panic(|| {
                            if cfg.inject_oom_rows.is_some_and(|cap| rows.len() > cap) {
                                bail!("out of memory (inject_oom_rows: {} rows)", rows.len());
                            }
                            objective.step(net, Split::Train, rows, &cfg.batch, Some(Backward { weight, checkpointing, seed }))
                        })?;
                        sums += stack_sums(&step.loss, &step.metrics).to_device(net.head_device());
                        tokens += step.tokens;
                    }
                    Ok((sums, tokens))
                };
                match run() {
                    Ok(done) => break done,
                    Err(e) if crate::script::options::error_kind(&format!("{e:#}")) == "oom" => {
                        let largest = window_rows.iter().map(|r| r.len().div_ceil(split)).max().unwrap_or(1);
                        zero_grads(&params)?;
                        crate::cuda::empty_cache();
                        // on a GPU, the next more frugal of `modes` (more than one where what
                        // backward keeps was ours to choose: "auto", with or without a budget)
                        let frugal = if on_gpu { super::memory::more_frugal(checkpointing, &modes, &one) } else { None };
                        if let Some(next) = frugal {
                            let within = if budget.is_some() { " within memory_budget" } else { "" };
                            tracing::warn!("step {}: out of memory{within} with {}; from now on {}", queued + 1, checkpointing.describe(), next.describe());
                            checkpointing = next;
                            crate::cuda::autograd::overlap_lora(checkpointing == Checkpointing::Off);
                            continue;
                        }
                        if (cfg.on_oom == OnOom::Halve || budget.is_some()) && largest > 1 {
                            split *= 2;
                            tracing::warn!(
                                "step {}: out of memory; from now on each micro-batch of {} rows runs as {split} of {} (the same examples per step: the gradients are accumulated over twice as many, smaller micro-batches)",
                                queued + 1,
                                cfg.batch.batch_size,
                                cfg.batch.batch_size.div_ceil(split)
                            );
                            continue;
                        }
                        let kept = result.checkpoint.as_ref().map(|c| format!("the last checkpoint, {}, is intact", c.display())).unwrap_or_else(|| "no checkpoint was saved".into());
                        let lengths = objective.lengths(Split::Train);
                        let row_len = window_rows.iter().flatten().map(|row| row.iter().map(|&i| lengths[i]).sum::<usize>().min(cfg.batch.max_length)).max().unwrap_or(0);
                        let used = net.devices().into_iter().filter_map(|d| crate::cuda::allocated(d).map(|b| format!("{:.1} GiB on {d:?}", b as f64 / (1u64 << 30) as f64))).collect::<Vec<_>>();
                        let advice = match budget {
                            Some(b) => format!("memory_budget {:.2} GiB is too small for one example with {}: raise it, or lower max_length", b as f64 / (1u64 << 30) as f64, checkpointing.describe()),
                            None => "lower batch_size (raising grad_accum keeps the global batch), max_length, or set gradient_checkpointing: true; or let ftscript halve the micro-batch with on_oom: \"halve\"".into(),
                        };
                        bail!(
                            "step {}: out of memory in a micro-batch of {largest} rows × up to {row_len} tokens{}; {advice}; {kept} ({e:#})",
                            queued + 1,
                            if used.is_empty() { String::new() } else { format!(" ({} in use)", used.join(", ")) }
                        );
                    }
                    Err(e) => return Err(e),
                }
            };
            if poisoned {
                sums = sums * f64::NAN;
            }
            let lr = lr_at(cfg.scheduler, cfg.lr, queued, total_steps, warmup);
            next = Some((QueuedStep { epoch, end, plan_len: plan.len(), lr, units, tokens }, sums));
            position = end;
        }

        if let Some((done, read)) = pending.take() {
            // [‖g‖, AdaLoRA's orthogonality penalty, loss, metrics...]
            let mut read = Vec::<f64>::try_from(read.wait()?)?;
            let grad_norm = read.remove(0);
            let orth_reg = read.remove(0);
            read.push(done.tokens as f64);
            if let Some(g) = pg {
                read = g.sum_f64(&read)?;
            }
            let step_tokens = read.pop().unwrap_or(0.0) as i64;
            window_tokens += step_tokens;
            let loss = read[0] / done.units.max(1.0);
            let step_metrics = &read[1..];
            if !(loss.is_finite() && grad_norm.is_finite()) && !skipped_steps.remove(&(state.step + 1)) {
                // its update is applied already: stop before any checkpoint holds it
                let kept = result.checkpoint.as_ref().map(|c| format!("the last checkpoint, {}, is intact", c.display())).unwrap_or_else(|| "no checkpoint was saved".into());
                failure = Some(anyhow::anyhow!(
                    "step {}: the loss is {loss} and the gradient norm {grad_norm}; {kept}. Try halving the learning rate (lr {}), bf16 instead of fp16 (or fp32), or on_nan: \"skip\"",
                    state.step + 1,
                    cfg.lr
                ));
                break;
            }
            state.step += 1;
            (state.epoch, state.batch_in_epoch, finished_plan_len) = (done.epoch, done.end, done.plan_len);
            progress.set_position(state.step as u64);
            log_loss_sum += loss;
            log_steps += 1;
            for (acc, v) in log_metric_sums.iter_mut().zip(step_metrics) {
                *acc += v;
            }
            let epoch_f = state.epoch as f64 + state.batch_in_epoch as f64 / done.plan_len as f64;
            result.train_loss = loss;

            let mut m = Map::new();
            m.insert("step".into(), json!(state.step));
            m.insert("epoch".into(), json!(epoch_f));
            m.insert("loss".into(), json!(loss));
            m.insert("lr".into(), json!(done.lr));
            m.insert("grad_norm".into(), json!(grad_norm));
            if allocator.is_some() {
                m.insert("orth_reg".into(), json!(orth_reg));
            }
            insert_metrics(&mut m, "", &names, step_metrics);
            stop |= asks_stop(hooks.on_step(&m), &mut failure);

            if state.step % cfg.log_every == 0 || state.step == total_steps || stop {
                let secs = started.elapsed().as_secs_f64();
                let tps = window_tokens as f64 / secs.max(1e-9);
                let mut m = m.clone();
                m.insert("loss".into(), json!(log_loss_sum / log_steps as f64));
                insert_metrics(&mut m, "", &names, &log_metric_sums);
                log_metric_sums.iter_mut().for_each(|v| *v = 0.0);
                m.insert("tokens_per_sec".into(), json!(tps));
                m.insert("elapsed_sec".into(), json!(secs));
                if fp16 {
                    m.insert("loss_scale".into(), json!(state.loss_scale));
                }
                // the busiest GPU's peak (and each GPU's, for a model split across several)
                let peaks: Vec<f64> = net.devices().into_iter().filter_map(crate::cuda::peak_allocated).map(|p| p as f64 / (1u64 << 30) as f64).collect();
                if let Some(max) = peaks.iter().cloned().reduce(f64::max) {
                    m.insert("peak_gib".into(), json!(max));
                }
                if peaks.len() > 1 {
                    m.insert("peak_gib_per_device".into(), json!(peaks));
                }
                progress.set_message(format!("loss {:.4}", log_loss_sum / log_steps as f64));
                progress.suspend(|| tracing::info!("step {} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s", state.step, log_loss_sum / log_steps as f64, done.lr, grad_norm, tps));
                logger.log(state.step, &m)?;
                state.log_history.push(Value::Object(m.clone()));
                log_loss_sum = 0.0;
                log_steps = 0;
                result.tokens_per_sec = tps;
                stop |= asks_stop(hooks.on_log(&m), &mut failure);
            }
            let eval_now = cfg.eval_every.map(|e| state.step % e == 0).unwrap_or(false) || (state.step == total_steps && cfg.eval_every.is_some());
            let evaluates = eval_now && !objective.lengths(Split::Eval).is_empty();
            if evaluates {
                let started = std::time::Instant::now();
                let eval_cfg = BatchConfig { batch_size: cfg.eval_batch_size, ..cfg.batch.clone() };
                let (extra, scored) = progress.suspend(|| hooks.eval_extra(objective.eval_examples(net)))?;
                let measured = match scored {
                    Some(sum) => {
                        if !std::mem::replace(&mut said_scored, true) {
                            progress.suspend(|| tracing::info!("evaluation: eval_loss is scored in the forward of eval_generate's prompts (one prefill for both)"));
                        }
                        loss_map(objective, sum, &eval_cfg)?
                    }
                    None => evaluate(net, objective, &eval_cfg, pg)?,
                };
                let eval_loss = measured["eval_loss"].as_f64().unwrap_or(f64::NAN);
                let mut m = Map::new();
                m.insert("step".into(), json!(state.step));
                m.insert("epoch".into(), json!(epoch_f));
                m.extend(measured);
                m.extend(extra);
                // the whole evaluation: the loss over the eval set, and eval_generate's
                m.insert("eval_seconds".into(), json!(started.elapsed().as_secs_f64()));
                let shown: Vec<String> = m
                    .iter()
                    .filter(|(k, _)| k.starts_with("eval_"))
                    .map(|(k, v)| match v.as_f64().unwrap_or(f64::NAN) {
                        // counts (eval_tokens) as they are; scores and seconds to 4 places
                        x if x.fract() == 0.0 && x.abs() < 1e15 => format!("{k} {x}"),
                        x => format!("{k} {x:.4}"),
                    })
                    .collect();
                progress.suspend(|| tracing::info!("step {} {}", state.step, shown.join(" ")));
                logger.log(state.step, &m)?;
                state.log_history.push(Value::Object(m.clone()));
                result.eval_loss = Some(eval_loss);
                stop |= asks_stop(hooks.on_eval(&m), &mut failure);
            }
            // the last profiled step's evaluation, if one falls there, is in the profile too
            if let Some(p) = cfg.profile.filter(|p| p.start + p.steps == state.step + 1) {
                if let Some(running) = profiler.take() {
                    progress.suspend(|| write_profile(running, &cfg.output_dir, p, evaluates))?;
                }
            }
            stop |= super::interrupt::interrupted();
            if let Some(g) = pg {
                // a stop asked for on any rank stops every rank, at the same step
                stop = g.sum_f64(&[stop as u8 as f64])?[0] > 0.0;
            }
            let save_now = cfg.save_every.map(|s| state.step % s == 0).unwrap_or(false);
            if (save_now || stop || state.step == total_steps) && !finite(&params) {
                failure = Some(anyhow::anyhow!("step {}: the adapters hold non-finite values after the update; not saved. Try halving the learning rate (lr {})", state.step, cfg.lr));
                break;
            }
            if save_now || stop || state.step == total_steps {
                // rank 0 writes; the others wait until the checkpoint is complete
                let dir = if main {
                    let extra = allocator.as_ref().map(|a| a.checkpoint_tensors(net)).unwrap_or_default();
                    let dir = checkpoint::save(&cfg.output_dir, net, spec, base_model, &params, &opt, &state, extra)?;
                    checkpoint::prune(&cfg.output_dir, cfg.save_total_limit)?;
                    dir
                } else {
                    cfg.output_dir.join(format!("checkpoint-{}", state.step))
                };
                if let Some(g) = pg {
                    g.barrier()?;
                }
                result.checkpoint = Some(dir);
            }
        }

        let Some((step, sums)) = next else {
            if queued >= total_steps || stop {
                break;
            }
            continue;
        };
        if stop {
            // the next step's gradients are dropped, its update never queued
            zero_grads(&params)?;
            break;
        }
        if let Some(g) = pg {
            // Σ over ranks of (local loss gradient / window tokens) = the global batch's gradient
            let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
            g.bucketed(&grads, |t| g.all_reduce_sum(t))?;
        }
        if state.loss_scale != 1.0 {
            let _g = tch::no_grad_guard();
            for p in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(1.0 / state.loss_scale);
                }
            }
        }
        let orth_reg = match &allocator {
            Some(a) => a.orthogonal_backward(net)?,
            None => Tensor::zeros([], (Kind::Float, sums.device())),
        };
        let norm = clip_grad_norm(&params, cfg.max_grad_norm)?;
        // fp16 must see the norm before stepping; otherwise nothing here waits for the GPU
        let skip_nan = matches!(cfg.on_nan, OnNan::Skip { .. });
        let skipped = (fp16 || skip_nan) && !norm.double_value(&[]).is_finite();
        if skipped {
            skipped_steps.insert(queued + 1);
            if fp16 {
                state.loss_scale /= 2.0;
                state.good_steps = 0;
                tracing::warn!("fp16: non-finite gradients, skipping step {} and halving the loss scale to {}", queued + 1, state.loss_scale);
            } else {
                skipped_total += 1;
                let (epoch, end) = (step.epoch, step.end);
                tracing::warn!("step {}: non-finite gradient norm, update skipped (epoch {epoch}, micro-batches before {end}; {skipped_total} skipped so far)", queued + 1);
                if let OnNan::Skip { max_skipped } = cfg.on_nan {
                    if skipped_total > max_skipped {
                        zero_grads(&params)?;
                        bail!("step {}: {skipped_total} steps skipped for non-finite gradients, more than max_skipped_steps {max_skipped}; try halving the learning rate (lr {})", queued + 1, cfg.lr);
                    }
                }
            }
        } else {
            opt.step(&params, step.lr)?;
            if let Some(a) = &mut allocator {
                if let Some((budget, pattern)) = a.update_and_allocate(net, queued)? {
                    if main {
                        super::adalora::log_allocation(&cfg.output_dir, queued, budget, &pattern)?;
                    }
                }
            }
            if fp16 {
                state.good_steps += 1;
                if state.good_steps % 2000 == 0 {
                    state.loss_scale *= 2.0;
                }
            }
        }
        zero_grads(&params)?;
        let scalar = |t: &Tensor| t.to_device(sums.device()).to_kind(Kind::Double).reshape([1]);
        let read = crate::cuda::to_host(&Tensor::cat(&[scalar(&norm), scalar(&orth_reg), sums], 0))?;
        pending = Some((step, read));
        queued += 1;
    }
    progress.finish_and_clear();
    if let Some(e) = failure {
        let kept = result.checkpoint.as_ref().map(|c| format!(" (checkpoint kept: {})", c.display())).unwrap_or_default();
        return Err(e.context(format!("stopped at step {}{kept}", state.step)));
    }
    result.interrupted = super::interrupt::interrupted();
    drop(signals);
    if stop && state.step < total_steps && !result.interrupted {
        tracing::info!("training stopped by a callback at step {}", state.step);
        result.stopped_early = true;
    }
    result.steps = state.step;
    result.epoch = state.epoch as f64 + state.batch_in_epoch as f64 / finished_plan_len.max(1) as f64;
    result.log_history = state.log_history.clone();
    Ok(result)
}
