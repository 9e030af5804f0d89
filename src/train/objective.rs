//! The seam between the training loop and what it optimizes. An [`Objective`] owns its examples,
//! says how long each is (the loop plans micro-batches from lengths alone), what a micro-batch
//! weighs in the mean loss of its window, computes a micro-batch's loss and gradients, and names
//! its metrics. Supervised fine-tuning ([`Sft`]) is one objective; the preference objectives
//! (DPO, ORPO, KTO) are in [`super::preference`].

use super::batch::{collate, Batch, BatchConfig, Row};
use crate::data::format::{Example, IGNORE};
use crate::models::decoder::{AttnMask, AuxLoss, Decoder};
use crate::models::Checkpointing;
use anyhow::Result;
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

/// Which examples: those trained on, or those evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    Train,
    Eval,
}

/// How a micro-batch is back-propagated: the summed loss scaled by `weight` (1 / the window's
/// units, times the fp16 loss scale), layers kept or recomputed as `checkpointing` says, dropout
/// drawn from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Backward {
    pub weight: f64,
    pub checkpointing: Checkpointing,
    pub seed: i64,
}

/// One micro-batch's outcome, still on the device (nothing here waits for the GPU).
pub struct Step {
    /// The loss summed over the micro-batch's units (detached, fp32 scalar).
    pub loss: Tensor,
    /// `[k, 2]`: for each of the objective's metrics, its value in this micro-batch and 1 (or
    /// 0, 0 when the micro-batch has nothing to measure it on); summed over micro-batches, a
    /// metric is reported as `Σ value / Σ count`, the mean over micro-batches as TRL logs it.
    pub metrics: Option<Tensor>,
    /// Tokens that are not padding, for throughput.
    pub tokens: i64,
}

/// What the training loop asks of an objective.
/// `M` is the model the objective trains (a decoder by default; T5 for [`super::seq2seq::Seq2SeqSft`]).
pub trait Objective<M: ?Sized = Decoder> {
    /// The token length of each example of `split` (the planner reads only these).
    fn lengths(&self, split: Split) -> &[usize];
    /// Rows one example puts in a micro-batch (2 for a chosen/rejected pair), for memory planning.
    fn rows_per_example(&self) -> usize {
        1
    }
    /// What the micro-batch `rows` counts in the mean loss of its window (label tokens for SFT,
    /// 1 for objectives whose loss is a mean over each micro-batch, as TRL's).
    fn units(&self, split: Split, rows: &[Row], cfg: &BatchConfig) -> f64;
    /// The loss of the micro-batch `rows` (on the model's device) and, with `backward`, its
    /// gradients into the adapters.
    fn step(&self, net: &M, split: Split, rows: &[Row], cfg: &BatchConfig, backward: Option<Backward>) -> Result<Step>;
    /// The names of [`Step::metrics`], in order (TRL's names: `rewards/chosen`, ...).
    fn metric_names(&self) -> Vec<&'static str> {
        vec![]
    }
    /// Work done once before training, with the model as it will train (DPO's precomputed
    /// reference log-probabilities); `cfg` gives the batches.
    fn prepare(&mut self, _net: &M, _cfg: &BatchConfig) -> Result<()> {
        Ok(())
    }
    /// Entries an evaluation adds to `eval_loss` (SFT: perplexity and tokens).
    fn eval_extras(&self, _loss: f64, _units: f64) -> Map<String, Value> {
        Map::new()
    }
    /// The eval examples, when the eval loss is nothing but their label tokens' summed
    /// next-token cross-entropy over [`Objective::units`] (SFT on a dense model): a forward
    /// over them made for another reason (generating from their prompts) can give it.
    fn eval_examples(&self, _net: &M) -> Option<&[Example]> {
        None
    }
}

/// Moves a CPU batch to the model's device (without waiting for the GPU: [`crate::cuda::upload`]).
pub fn to_device(b: &Batch, device: tch::Device) -> (Tensor, Tensor, Tensor, AttnMask) {
    let put = |t: &Tensor| crate::cuda::upload(t, device);
    let mask = match &b.segments {
        Some(s) => AttnMask::Segments(put(s)),
        None => AttnMask::Causal,
    };
    (put(&b.input_ids), put(&b.labels), put(&b.positions), mask)
}

/// Supervised fine-tuning: next-token cross-entropy over the label tokens; a window's loss is
/// `Σ token losses / Σ label tokens`.
/// A sparse model adds its load-balancing loss as its own loss in transformers does
/// ([`Decoder::model_aux_coef`]), or weighted by `aux_coef` when a run sets it.
pub struct Sft {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    lengths: [Vec<usize>; 2],
    aux_coef: Option<f64>,
}

impl Sft {
    pub fn new(train: Vec<Example>, eval: Vec<Example>, aux_coef: Option<f64>) -> Sft {
        let lengths = [train.iter().map(|e| e.input_ids.len()).collect(), eval.iter().map(|e| e.input_ids.len()).collect()];
        Sft { train, eval, lengths, aux_coef }
    }

    fn examples(&self, split: Split) -> &[Example] {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }
}

impl Objective for Sft {
    fn lengths(&self, split: Split) -> &[usize] {
        &self.lengths[(split == Split::Eval) as usize]
    }

    /// The label tokens after the shift, as [`collate`] counts them (an example's first token
    /// never has a loss: it is a row's first, or masked in a packed row).
    fn units(&self, split: Split, rows: &[Row], cfg: &BatchConfig) -> f64 {
        let ex = self.examples(split);
        let count = |e: &Example| e.labels.iter().take(cfg.max_length).skip(1).filter(|&&l| l != IGNORE).count();
        rows.iter().flatten().map(|&i| count(&ex[i])).sum::<usize>() as f64
    }

    fn step(&self, net: &Decoder, split: Split, rows: &[Row], cfg: &BatchConfig, backward: Option<Backward>) -> Result<Step> {
        let b = collate(self.examples(split), rows, cfg);
        let (ids, labels, positions, mask) = to_device(&b, net.device);
        // a sparse model's load-balancing loss counts once per micro-batch, as in transformers
        // (`loss = mean CE + coef · aux`): in the window's sum, `units` × it
        let units = self.units(split, rows, cfg);
        let valid = Some(b.valid.shallow_clone());
        let coef = self.aux_coef.unwrap_or_else(|| net.model_aux_coef());
        let (loss, balance) = match backward {
            Some(bw) => net.loss_and_backward(&ids, &labels, &positions, &mask, bw.weight, &AuxLoss { coef, weight: bw.weight * units, valid }, bw.checkpointing, bw.seed)?,
            None => crate::nn::no_grad(|| {
                let (h, routes) = net.hidden_routed(&ids, &positions, &mask, None, false);
                (net.head_loss_sum(&h, &labels), net.balance_loss(&routes, coef, valid.as_ref()))
            }),
        };
        let loss = match balance {
            Some(b) => loss.to_kind(Kind::Float) + b.to_device(loss.device()) * units,
            None => loss,
        };
        Ok(Step { loss: loss.to_kind(Kind::Float), metrics: None, tokens: b.n_tokens })
    }

    /// A sparse model's load-balancing loss depends on which examples share a micro-batch.
    fn eval_examples(&self, net: &Decoder) -> Option<&[Example]> {
        net.router_aux_loss_coef().is_none().then_some(&self.eval[..])
    }

    fn eval_extras(&self, loss: f64, units: f64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("eval_ppl".into(), json!(loss.exp()));
        m.insert("eval_tokens".into(), json!(units as i64));
        m
    }
}
