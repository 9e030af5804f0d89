//! Sequence-to-sequence fine-tuning (T5): the cross-entropy of each target's tokens given its
//! source, a window's loss being `Σ token losses / Σ target tokens` (what transformers'
//! `Seq2SeqTrainer` computes with `num_items_in_batch`). A micro-batch pads its sources with the
//! pad id (masked) and its targets with -100, as `DataCollatorForSeq2Seq` does.

use super::batch::{BatchConfig, Row};
use super::objective::{Backward, Objective, Split, Step};
use crate::models::t5::T5;
use crate::models::Checkpointing;
use anyhow::Result;
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

/// A tokenized pair: the source's ids and the target's (its EOS included), each already cut to
/// `max_length`.
#[derive(Debug, Clone)]
pub struct Pair {
    pub source: Vec<i64>,
    pub target: Vec<i64>,
}

pub struct Seq2SeqSft {
    pairs: [Vec<Pair>; 2],
    lengths: [Vec<usize>; 2],
    pad_id: i64,
}

impl Seq2SeqSft {
    pub fn new(train: Vec<Pair>, eval: Vec<Pair>, pad_id: i64) -> Seq2SeqSft {
        // a pair's length, for planning, is its source and target together
        let lengths = |ps: &[Pair]| ps.iter().map(|p| p.source.len() + p.target.len()).collect();
        Seq2SeqSft { lengths: [lengths(&train), lengths(&eval)], pairs: [train, eval], pad_id }
    }

    fn pairs(&self, split: Split) -> &[Pair] {
        &self.pairs[(split == Split::Eval) as usize]
    }

    /// `(source ids, source mask, labels)` of the micro-batch `rows` (one pair a row), right-padded
    /// to the longest (rounded up as `cfg` says; `padding: "max_length"` does not apply).
    fn collate(&self, split: Split, rows: &[Row], cfg: &BatchConfig) -> (Tensor, Tensor, Tensor) {
        let pairs: Vec<&Pair> = rows.iter().flatten().map(|&i| &self.pairs(split)[i]).collect();
        let pad = |seqs: Vec<&[i64]>, value: i64| -> Tensor {
            let width = cfg.rounded(seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1));
            let flat: Vec<i64> = seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(value, width - s.len()))).collect();
            Tensor::from_slice(&flat).view([seqs.len() as i64, width as i64])
        };
        let ids = pad(pairs.iter().map(|p| p.source.as_slice()).collect(), self.pad_id);
        let ones: Vec<Vec<i64>> = pairs.iter().map(|p| vec![1; p.source.len()]).collect();
        let mask = pad(ones.iter().map(Vec::as_slice).collect(), 0);
        let labels = pad(pairs.iter().map(|p| p.target.as_slice()).collect(), -100);
        (ids, mask, labels)
    }
}

impl Objective<T5> for Seq2SeqSft {
    fn lengths(&self, split: Split) -> &[usize] {
        &self.lengths[(split == Split::Eval) as usize]
    }

    /// The target tokens of the micro-batch.
    fn units(&self, split: Split, rows: &[Row], _cfg: &BatchConfig) -> f64 {
        rows.iter().flatten().map(|&i| self.pairs(split)[i].target.len()).sum::<usize>() as f64
    }

    fn step(&self, net: &T5, split: Split, rows: &[Row], cfg: &BatchConfig, backward: Option<Backward>) -> Result<Step> {
        let (ids, mask, labels) = self.collate(split, rows, cfg);
        let put = |t: &Tensor| crate::cuda::upload(t, net.device);
        let (ids, mask, labels) = (put(&ids), put(&mask), put(&labels));
        let tokens = rows.iter().flatten().map(|&i| self.pairs(split)[i].source.len() + self.pairs(split)[i].target.len()).sum::<usize>() as i64;
        let loss = match backward {
            Some(bw) => net.loss_and_backward(&ids, &mask, &labels, bw.weight, bw.checkpointing != Checkpointing::Off, bw.seed)?,
            None => crate::nn::no_grad(|| net.loss(&ids, &mask, &labels, false) * labels.ne(-100).sum(Kind::Float)),
        };
        Ok(Step { loss: loss.to_kind(Kind::Float), metrics: None, tokens })
    }

    fn eval_extras(&self, loss: f64, units: f64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("eval_ppl".into(), json!(loss.exp()));
        m.insert("eval_tokens".into(), json!(units as i64));
        m
    }
}
