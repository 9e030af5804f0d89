//! Preference objectives as TRL 1.x defines them: DPO (with its IPO, hinge and robust losses),
//! ORPO and KTO. Each micro-batch's loss is a mean over its pairs (or examples), so a window's
//! loss is the mean over its micro-batches, as TRL's (the Trainer divides each micro-batch's loss
//! by the accumulation steps). Sequences are `prompt ++ completion`, right-padded, chosen rows
//! before rejected ones in one forward; `log π(y|x)` is the sum of the completion tokens' log
//! probabilities, computed by the model's fused head
//! ([`Decoder::next_token_head_backward`]) without full-vocabulary logits.
//!
//! The reference model of DPO and KTO is the model as training starts, run without gradients
//! (one copy of the weights, as TRL does with a peft model): with fresh adapters (every `B = 0`)
//! that is the base model, the adapters bypassed (peft's `disable_adapter()`); with trained ones
//! (DPO after SFT) the adapters' starting values are kept aside and swapped in (TRL's frozen
//! "ref" adapter). Or its log probabilities are computed once before training
//! (`precompute_ref_log_probs`).
//!
//! A sparse (MoE) model's load-balancing loss over the trained forward's real tokens is added
//! as TRL adds it: `router_aux_loss_coef` × it (config.json's coefficient by default, for DPO and
//! KTO whatever `output_router_logits` says, for ORPO only when it is set), logged as `aux_loss`.

use super::batch::{BatchConfig, Row};
use super::objective::{Backward, Objective, Split, Step};
use crate::data::preference::{Judged, Pair};
use crate::models::decoder::{AttnMask, AuxLoss, Decoder};
use crate::nn::linear::without_adapters;
use crate::nn::loss::NextTokenStats;
use crate::nn::peft;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// DPO's loss on the reward margin `Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoLoss {
    /// `−log σ(βΔ)` (Rafailov et al., 2023).
    Sigmoid,
    /// `relu(1 − βΔ)` (SLiC).
    Hinge,
    /// `(Δ̄ − 1/(2β))²`, Δ̄ with each log ratio averaged over its completion tokens (Azar et al., 2023).
    Ipo,
    /// `(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)`, ε the probability of a flipped label (rDPO).
    Robust { label_smoothing: f64 },
}

impl DpoLoss {
    pub const NAMES: &'static [&'static str] = &["sigmoid", "hinge", "ipo", "robust"];

    pub fn parse(name: &str, label_smoothing: f64) -> Result<DpoLoss> {
        Ok(match name {
            "sigmoid" => DpoLoss::Sigmoid,
            "hinge" => DpoLoss::Hinge,
            "ipo" => DpoLoss::Ipo,
            "robust" if (0.0..0.5).contains(&label_smoothing) => DpoLoss::Robust { label_smoothing },
            "robust" => bail!("loss_type \"robust\": label_smoothing must lie in [0, 0.5), got {label_smoothing}"),
            other => bail!("loss_type must be one of {:?}, got \"{other}\"", DpoLoss::NAMES),
        })
    }
}

/// Which preference objective, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preference {
    Dpo { beta: f64, loss: DpoLoss },
    /// Odds-ratio preference optimization (Hong et al., 2024): the chosen sequences' NLL (every
    /// token, prompt included, as TRL) minus `β · mean log σ(log odds(chosen) − log odds(rejected))`,
    /// odds from the completions' mean token log-probabilities. No reference model.
    Orpo { beta: f64 },
    /// Kahneman–Tversky optimization (Ethayarajh et al., 2024) on unpaired judged completions:
    /// desirable `1 − σ(β(r − z))`, undesirable `1 − σ(β(z − r))`, weighted, `r` the log ratio to
    /// the reference, `z = max(0, mean KL estimate)` from mismatched (prompt, completion) pairs.
    Kto { beta: f64, desirable_weight: f64, undesirable_weight: f64 },
}

/// The examples of one split.
enum Examples {
    Pairs(Vec<Pair>),
    /// Judged completions, each with the completion its KL estimate pairs it with.
    Judged(Vec<(Judged, Vec<i64>)>),
}

impl Examples {
    fn len(&self) -> usize {
        match self {
            Examples::Pairs(p) => p.len(),
            Examples::Judged(j) => j.len(),
        }
    }
}

/// A preference objective over its training and evaluation examples.
pub struct PreferenceObjective {
    kind: Preference,
    examples: [Examples; 2],
    lengths: [Vec<usize>; 2],
    /// Compute the reference log-probabilities before training ([`Objective::prepare`]).
    precompute: bool,
    /// The adapters' values as training starts, when they are not fresh ([`Objective::prepare`]).
    start_adapters: Option<Vec<Tensor>>,
    /// Reference log-probabilities per example, computed before training: (chosen, rejected) of
    /// a pair, (completion, KL completion) of a judged example.
    reference: Option<[Vec<[f64; 2]>; 2]>,
    /// The weight of a sparse model's load-balancing loss: the run's, else TRL's default (set by
    /// [`Objective::prepare`]).
    aux_coef: Option<f64>,
    /// Run each pair's prompt once for both completions: always, never, or (`None`) where that
    /// saves enough ([`Sequences::pairs`]).
    share_prompts: Option<bool>,
}

/// KTO's mismatched completions: within each run of `batch_size` examples (dataset order),
/// example `i` takes the completion of `i − 1`, the first the last's (TRL's rotation).
pub fn kl_completions(examples: &[Judged], batch_size: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        for i in 0..chunk.len() {
            out.push(chunk[(i + chunk.len() - 1) % chunk.len()].completion.clone());
        }
    }
    out
}

/// `prompt ++ completion` sequences as one right-padded micro-batch on the model's device.
struct Sequences {
    /// What the model runs on: the sequences themselves (`[R, T]`, causal), or their pairs with
    /// the prompt shared ([`Sequences::pairs`]).
    ids: Tensor,
    positions: Tensor,
    mask: AttnMask,
    /// With shared prompts: `[R·T]`, where each position of the sequences lies in the flattened
    /// `[B·W]` states of the shared rows.
    gather: Option<Tensor>,
    /// `[R, T]` (`[B, W]` shared): how much each token the model runs on counts in a sparse
    /// model's load-balancing loss (1 per sequence holding it; a shared prompt's 2, padding 0).
    token_weight: Tensor,
    /// Every real token (its next-token log-probability is measured); -100 on padding.
    labels: Tensor,
    /// `[R, T-1]` fp32, on the head's device: 1 where position `t` predicts a completion token.
    completion: Tensor,
    tokens: i64,
}

/// Share the prompt of a micro-batch's pairs when that saves at least this share of the tokens
/// the model runs on (the shared rows' attention is masked, not causal, so it costs more).
const SHARE_PROMPT_SAVING: f64 = 0.125;

impl Sequences {
    /// The sequences `prompt ++ completion`, each cut to `max_length` (its start kept).
    fn new(parts: &[(&[i64], &[i64])], cfg: &BatchConfig, net: &Decoder) -> Sequences {
        let rows: Vec<(Vec<i64>, usize)> = parts
            .iter()
            .map(|(p, c)| {
                let mut ids = p.to_vec();
                ids.extend_from_slice(c);
                ids.truncate(cfg.max_length);
                (ids, p.len())
            })
            .collect();
        let width = cfg.width(rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(2));
        let (b, t) = (rows.len() as i64, width as i64);
        let (mut ids, mut labels, mut completion) = (vec![], vec![], vec![]);
        let mut tokens = 0;
        for (row, prompt) in &rows {
            tokens += row.len() as i64;
            let pad = width - row.len();
            ids.extend(row.iter().copied().chain(std::iter::repeat_n(cfg.pad_id, pad)));
            labels.extend(row.iter().copied().chain(std::iter::repeat_n(-100, pad)));
            // position t predicts token t + 1
            completion.extend((1..width).map(|k| (k >= *prompt && k < row.len()) as u8 as f32));
        }
        let put = |v: &[i64]| crate::cuda::upload(&Tensor::from_slice(v).view([b, t]), net.device);
        let labels = put(&labels);
        Sequences {
            ids: put(&ids),
            positions: crate::cuda::upload(&Tensor::arange(t, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0).expand([b, t], true).contiguous(), net.device),
            mask: AttnMask::Causal,
            gather: None,
            token_weight: labels.ne(-100),
            labels,
            completion: Tensor::from_slice(&completion).view([b, t - 1]).to_device(net.head_device),
            tokens,
        }
    }

    /// The pairs `(prompt, chosen, rejected)` as [`Sequences::new`] lays them out (chosen rows,
    /// then rejected ones), run as one row per pair, `prompt ++ chosen ++ rejected`: the prompt's
    /// states are computed once, chosen attends to the prompt and itself, rejected to the prompt
    /// and itself, at the positions it has in its own sequence. With `share` `None`, only when
    /// that saves [`SHARE_PROMPT_SAVING`] of the tokens.
    fn pairs(triples: &[(&[i64], &[i64], &[i64])], cfg: &BatchConfig, net: &Decoder, share: Option<bool>) -> Sequences {
        let parts: Vec<(&[i64], &[i64])> = triples.iter().map(|t| (t.0, t.1)).chain(triples.iter().map(|t| (t.0, t.2))).collect();
        let seq = Sequences::new(&parts, cfg, net);
        // each completion as `new` cut it
        let fit = |p: &[i64], c: &[i64]| c.len().min(cfg.max_length.saturating_sub(p.len()));
        let rows: Vec<(usize, usize, usize)> = triples.iter().map(|(p, c, r)| (p.len().min(cfg.max_length), fit(p, c), fit(p, r))).collect();
        let prompts: usize = rows.iter().map(|r| r.0).sum();
        let saving = prompts as f64 / seq.tokens.max(1) as f64;
        if !share.unwrap_or(saving >= SHARE_PROMPT_SAVING) {
            return seq;
        }
        let width = cfg.width(rows.iter().map(|(p, c, r)| p + c + r).max().unwrap_or(1).max(2));
        let t = seq.labels.size()[1] as usize;
        let (mut ids, mut positions, mut segments, mut weight) = (vec![], vec![], vec![], vec![]);
        let mut gather = vec![0i64; 2 * rows.len() * t];
        for (k, ((prompt, chosen, rejected), &(p, c, r))) in triples.iter().zip(&rows).enumerate() {
            let row = prompt[..p].iter().chain(&chosen[..c]).chain(&rejected[..r]);
            ids.extend(row.copied().chain(std::iter::repeat_n(cfg.pad_id, width - p - c - r)));
            positions.extend((0..p + c).chain(p..p + r).chain(std::iter::repeat_n(0, width - p - c - r)).map(|x| x as i64));
            // 0 the prompt (seen by both completions), 1 chosen, 2 rejected, 3 padding
            segments.extend([(0i64, p), (1, c), (2, r), (3, width - p - c - r)].iter().flat_map(|&(s, n)| std::iter::repeat_n(s, n)));
            weight.extend([(2.0f32, p), (1.0, c + r), (0.0, width - p - c - r)].iter().flat_map(|&(w, n)| std::iter::repeat_n(w, n)));
            let base = (k * width) as i64;
            for i in 0..t {
                // the chosen sequence is the row's start; the rejected one skips the chosen tokens
                gather[k * t + i] = if i < p + c { base + i as i64 } else { base };
                gather[(rows.len() + k) * t + i] = if i < p { base + i as i64 } else if i < p + r { base + (i + c) as i64 } else { base };
            }
        }
        let (b, w) = (rows.len() as i64, width as i64);
        let put = |v: &[i64]| crate::cuda::upload(&Tensor::from_slice(v).view([b, w]), net.device);
        let positions = put(&positions);
        Sequences {
            ids: put(&ids),
            mask: AttnMask::SharedPrefix { segments: put(&segments), positions: positions.shallow_clone() },
            positions,
            gather: Some(Tensor::from_slice(&gather).to_device(net.head_device)),
            token_weight: Tensor::from_slice(&weight).view([b, w]),
            ..seq
        }
    }

    /// The sequences' states `[R, T, H]` from the states `h` of what the model ran on.
    fn unshare(&self, h: &Tensor) -> Tensor {
        match &self.gather {
            None => h.shallow_clone(),
            Some(g) => {
                let (r, t) = self.labels.size2().unwrap();
                let hidden = h.size()[2];
                h.reshape([-1, hidden]).index_select(0, &g.to_device(h.device())).view([r, t, hidden])
            }
        }
    }

    /// `Σ_t completion · x` per row.
    fn per_row(&self, x: &Tensor) -> Tensor {
        (x * &self.completion).sum_dim_intlist([1].as_slice(), false, Kind::Float)
    }

    /// The completions' summed log-probabilities `[R]`, without gradients: through the training
    /// path (its kernels, dropout from `seed`) while training, so that the reference agrees with
    /// the trained model to the bit where their weights do; the evaluation path otherwise.
    fn logps(&self, net: &Decoder, seed: Option<i64>) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let h = match seed {
            Some(seed) => net.training_hidden(&self.ids, &self.positions, &self.mask, seed)?,
            None => net.hidden(&self.ids, &self.positions, &self.mask, None, false),
        };
        Ok(self.per_row(&net.next_token_stats(&self.unshare(&h), &self.labels).logp))
    }

    /// The objective's loss from the sequences' statistics, back-propagated with `backward`
    /// (or only measured without): returns what `loss_of` returns besides the loss, and a sparse
    /// model's load-balancing loss weighted by `aux_coef` (back-propagated too) unless it is 0.
    fn loss<R>(&self, net: &Decoder, backward: Option<Backward>, aux_coef: f64, loss_of: impl FnOnce(&NextTokenStats) -> Result<(Tensor, R)>) -> Result<(R, Option<Tensor>)> {
        let valid = Some(self.token_weight.shallow_clone());
        match backward {
            Some(bw) => {
                let aux = AuxLoss { coef: aux_coef, weight: bw.weight, valid };
                net.backward_through_head(&self.ids, &self.positions, &self.mask, bw.checkpointing, bw.seed, Some(&aux), |h| net.next_token_head_backward(&self.unshare(h), &self.labels, bw.weight, loss_of))
            }
            None => {
                let _g = tch::no_grad_guard();
                let (h, routes) = net.hidden_routed(&self.ids, &self.positions, &self.mask, None, false);
                let balance = net.balance_loss(&routes, aux_coef, valid.as_ref());
                Ok((net.next_token_head_backward(&self.unshare(&h), &self.labels, 0.0, loss_of)?, balance))
            }
        }
    }
}

/// A metric of one micro-batch: its value and 1, or 0 and 0 where it has nothing to measure
/// (both scalars on the device: nothing waits for the GPU).
type Metric = (Tensor, Tensor);

/// A metric every micro-batch has.
fn always(v: Tensor) -> Metric {
    let one = v.ones_like();
    (v, one)
}

/// A metric the micro-batch may lack (known on the host).
fn present(v: Option<Tensor>, device: tch::Device) -> Metric {
    match v {
        Some(v) => always(v),
        None => (Tensor::zeros([], (Kind::Float, device)), Tensor::zeros([], (Kind::Float, device))),
    }
}

/// `Σ x·mask / Σ mask`, a token-weighted mean, present where the mask holds a token.
fn masked_mean(x: &Tensor, mask: &Tensor) -> Metric {
    let n = mask.sum(Kind::Float);
    ((x * mask).sum(Kind::Float) / n.clamp_min(1.0), n.gt(0.0).to_kind(Kind::Float))
}

/// `[k, 2]`: the metrics' (value, count) rows.
fn metric_rows(values: Vec<Metric>) -> Tensor {
    let rows: Vec<Tensor> = values.into_iter().map(|(v, c)| Tensor::stack(&[v.detach().to_kind(Kind::Float).reshape([]), c.to_device(v.device()).to_kind(Kind::Float).reshape([])], 0)).collect();
    Tensor::stack(&rows, 0)
}

/// `log(1 − eˣ)` for `x < 0`, stable on both sides of `−ln 2`.
fn log1mexp(x: &Tensor) -> Tensor {
    (-x.exp()).log1p().where_self(&x.lt(-std::f64::consts::LN_2), &(-x.expm1()).log())
}

/// The metrics of a pair objective (DPO, ORPO), before its own ones.
const PAIR_METRICS: &[&str] = &["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"];
const DPO_EXTRA: &[&str] = &["entropy", "mean_token_accuracy"];
const ORPO_EXTRA: &[&str] = &["nll_loss", "log_odds_ratio", "log_odds_chosen"];

/// [`PAIR_METRICS`]' values for the chosen and rejected rows' log-probabilities (`chosen`,
/// `rejected` `[B]`) and rewards (`β·`(log-ratio, or log-probability for ORPO)).
fn pair_metrics(s: &NextTokenStats, seq: &Sequences, chosen: &Tensor, rejected: &Tensor, chosen_rewards: &Tensor, rejected_rewards: &Tensor) -> Vec<Metric> {
    let b = chosen.size()[0];
    let (cr, rr) = (chosen_rewards.detach(), rejected_rewards.detach());
    vec![
        always(cr.mean(Kind::Float)),
        always(rr.mean(Kind::Float)),
        always(cr.gt_tensor(&rr).to_kind(Kind::Float).mean(Kind::Float)),
        always((&cr - &rr).mean(Kind::Float)),
        always(chosen.detach().mean(Kind::Float)),
        always(rejected.detach().mean(Kind::Float)),
        // over the completion tokens, as TRL's DPO and KTO (its experimental ORPO also averages
        // the prompt's and the padding's positions)
        masked_mean(&s.mean_logit.narrow(0, 0, b), &seq.completion.narrow(0, 0, b)),
        masked_mean(&s.mean_logit.narrow(0, b, b), &seq.completion.narrow(0, b, b)),
    ]
}

const KTO_METRICS: &[&str] = &["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "kl", "entropy"];

impl PreferenceObjective {
    /// DPO or ORPO over pairs.
    pub fn pairs(kind: Preference, train: Vec<Pair>, eval: Vec<Pair>) -> PreferenceObjective {
        let len = |p: &Pair| p.prompt.len() + p.chosen.len().max(p.rejected.len());
        let lengths = [train.iter().map(len).collect(), eval.iter().map(len).collect()];
        PreferenceObjective { kind, examples: [Examples::Pairs(train), Examples::Pairs(eval)], lengths, precompute: false, start_adapters: None, reference: None, aux_coef: None, share_prompts: None }
    }

    /// KTO over judged completions; `batch_size` groups the KL estimate's mismatched pairs.
    pub fn judged(kind: Preference, train: Vec<Judged>, eval: Vec<Judged>, batch_size: usize, eval_batch_size: usize) -> PreferenceObjective {
        let with_kl = |ex: Vec<Judged>, bs: usize| -> Vec<(Judged, Vec<i64>)> {
            let kl = kl_completions(&ex, bs);
            ex.into_iter().zip(kl).collect()
        };
        let (train, eval) = (with_kl(train, batch_size), with_kl(eval, eval_batch_size));
        let len = |(j, kl): &(Judged, Vec<i64>)| j.prompt.len() + j.completion.len().max(kl.len());
        let lengths = [train.iter().map(len).collect(), eval.iter().map(len).collect()];
        PreferenceObjective { kind, examples: [Examples::Judged(train), Examples::Judged(eval)], lengths, precompute: false, start_adapters: None, reference: None, aux_coef: None, share_prompts: None }
    }

    fn index(split: Split) -> usize {
        (split == Split::Eval) as usize
    }

    /// The sequences of `rows`: chosen rows, then rejected ones (pairs), or the judged
    /// completions, then their KL completions.
    fn sequences(&self, split: Split, rows: &[Row], cfg: &BatchConfig, net: &Decoder) -> (Sequences, Option<Sequences>) {
        let picked: Vec<usize> = rows.iter().flatten().copied().collect();
        match &self.examples[Self::index(split)] {
            Examples::Pairs(p) => {
                let triples: Vec<(&[i64], &[i64], &[i64])> = picked.iter().map(|&i| (&p[i].prompt[..], &p[i].chosen[..], &p[i].rejected[..])).collect();
                (Sequences::pairs(&triples, cfg, net, self.share_prompts), None)
            }
            Examples::Judged(j) => {
                let parts: Vec<(&[i64], &[i64])> = picked.iter().map(|&i| (&j[i].0.prompt[..], &j[i].0.completion[..])).collect();
                let kl: Vec<(&[i64], &[i64])> = picked.iter().map(|&i| (&j[i].0.prompt[..], &j[i].1[..])).collect();
                (Sequences::new(&parts, cfg, net), Some(Sequences::new(&kl, cfg, net)))
            }
        }
    }

    /// Reference log-probabilities of the sequences `main` (and `kl`) of `rows`: precomputed,
    /// or by the reference model (through the training path with `seed` while training). `[R]`
    /// (and `[B]`).
    fn reference(&self, split: Split, rows: &[Row], net: &Decoder, main: &Sequences, kl: Option<&Sequences>, seed: Option<i64>) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(r) = &self.reference {
            let r = &r[Self::index(split)];
            let picked: Vec<usize> = rows.iter().flatten().copied().collect();
            let first: Vec<f32> = picked.iter().map(|&i| r[i][0] as f32).collect();
            let second: Vec<f32> = picked.iter().map(|&i| r[i][1] as f32).collect();
            let put = |v: &[f32]| Tensor::from_slice(v).to_device(net.head_device);
            return Ok(match kl {
                // pairs: [chosen..., rejected...]
                None => (Tensor::cat(&[put(&first), put(&second)], 0), None),
                Some(_) => (put(&first), Some(put(&second))),
            });
        }
        self.as_reference(net, || Ok((main.logps(net, seed)?, kl.map(|k| k.logps(net, seed)).transpose()?)))
    }

    /// `f` run on the reference model: the adapters bypassed, or their starting values swapped in.
    fn as_reference<R>(&self, net: &Decoder, f: impl FnOnce() -> R) -> R {
        let Some(start) = &self.start_adapters else { return without_adapters(f) };
        let _g = tch::no_grad_guard();
        let params: Vec<Tensor> = peft::adapter_tensors(net).into_iter().map(|(_, t)| t).collect();
        let now: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
        let swap = |to: &[Tensor]| {
            for (mut p, v) in params.iter().map(|p| p.shallow_clone()).zip(to) {
                p.copy_(v);
            }
        };
        swap(start);
        let out = f();
        swap(&now);
        out
    }

    /// With `on`, every example's reference log-probabilities are computed once before training
    /// (adapters bypassed), so that training runs one forward per micro-batch fewer.
    pub fn precompute_reference(self, on: bool) -> PreferenceObjective {
        PreferenceObjective { precompute: on, ..self }
    }

    /// The weight of a sparse model's load-balancing loss (`None`: TRL's default, see the module doc).
    pub fn router_aux_loss(self, coef: Option<f64>) -> PreferenceObjective {
        PreferenceObjective { aux_coef: coef, ..self }
    }

    /// Whether pairs run with their prompt shared (`None`: where it saves enough).
    pub fn share_prompts(self, share: Option<bool>) -> PreferenceObjective {
        PreferenceObjective { share_prompts: share, ..self }
    }

    fn aux_coef(&self) -> f64 {
        self.aux_coef.unwrap_or(0.0)
    }

    fn compute_reference(&mut self, net: &Decoder, cfg: &BatchConfig) -> Result<()> {
        let mut out: [Vec<[f64; 2]>; 2] = [vec![], vec![]];
        for split in [Split::Train, Split::Eval] {
            let n = self.examples[Self::index(split)].len();
            let rows: Vec<Row> = (0..n).map(|i| vec![i]).collect();
            for batch in rows.chunks(cfg.batch_size.max(1)) {
                let (main, kl) = self.sequences(split, batch, cfg, net);
                let (first, second) = self.as_reference(net, || -> Result<_> {
                    // through the training path, as the trained model's log-probabilities are
                    let first = Vec::<f64>::try_from(main.logps(net, Some(0))?.to_kind(Kind::Double))?;
                    let second = match &kl {
                        Some(k) => Vec::<f64>::try_from(k.logps(net, Some(0))?.to_kind(Kind::Double))?,
                        None => vec![],
                    };
                    Ok((first, second))
                })?;
                let b = batch.len();
                for i in 0..b {
                    out[Self::index(split)].push(match &kl {
                        None => [first[i], first[b + i]],
                        Some(_) => [first[i], second[i]],
                    });
                }
            }
        }
        tracing::info!("precomputed the reference log-probabilities of {} + {} examples", out[0].len(), out[1].len());
        self.reference = Some(out);
        Ok(())
    }

    fn dpo(&self, s: &NextTokenStats, seq: &Sequences, reference: &Tensor, beta: f64, loss: DpoLoss) -> Result<(Tensor, Tensor)> {
        let logps = seq.per_row(&s.logp);
        let b = logps.size()[0] / 2;
        let (chosen, rejected) = (logps.narrow(0, 0, b), logps.narrow(0, b, b));
        let (ref_chosen, ref_rejected) = (reference.narrow(0, 0, b), reference.narrow(0, b, b));
        let chosen_ratio = &chosen - ref_chosen;
        let rejected_ratio = &rejected - ref_rejected;
        let delta = &chosen_ratio - &rejected_ratio;
        let per_pair = match loss {
            DpoLoss::Sigmoid => -(&delta * beta).log_sigmoid(),
            DpoLoss::Hinge => (-(&delta * beta) + 1.0).relu(),
            DpoLoss::Ipo => {
                let n = seq.completion.sum_dim_intlist([1].as_slice(), false, Kind::Float).clamp_min(1.0);
                let avg = (&chosen_ratio / n.narrow(0, 0, b)) - (&rejected_ratio / n.narrow(0, b, b));
                (avg - 1.0 / (2.0 * beta)).square()
            }
            DpoLoss::Robust { label_smoothing: e } => (-(&delta * beta).log_sigmoid() * (1.0 - e) + (&delta * -beta).log_sigmoid() * e) / (1.0 - 2.0 * e),
        };
        let mut metrics = pair_metrics(s, seq, &chosen, &rejected, &(&chosen_ratio * beta), &(&rejected_ratio * beta));
        metrics.push(masked_mean(&s.entropy, &seq.completion));
        metrics.push(masked_mean(&s.top1.narrow(0, 0, b).to_kind(Kind::Float), &seq.completion.narrow(0, 0, b)));
        let metrics = metric_rows(metrics);
        Ok((per_pair.mean(Kind::Float), metrics))
    }

    fn orpo(&self, s: &NextTokenStats, seq: &Sequences, beta: f64) -> Result<(Tensor, Tensor)> {
        let n = seq.completion.sum_dim_intlist([1].as_slice(), false, Kind::Float);
        let avg = seq.per_row(&s.logp) / n;
        let b = avg.size()[0] / 2;
        let (chosen, rejected) = (avg.narrow(0, 0, b), avg.narrow(0, b, b));
        // the chosen sequences' mean token NLL, prompt tokens included
        let real = seq.labels.narrow(1, 1, seq.labels.size()[1] - 1).narrow(0, 0, b).ne(-100).to_kind(Kind::Float).to_device(s.logp.device());
        let nll = -(s.logp.narrow(0, 0, b) * &real).sum(Kind::Float) / real.sum(Kind::Float);
        let log_odds = (&chosen - &rejected) - (log1mexp(&chosen) - log1mexp(&rejected));
        let ratio = log_odds.log_sigmoid();
        let loss = &nll - (&ratio * beta).mean(Kind::Float);
        let mut metrics = pair_metrics(s, seq, &chosen, &rejected, &(&chosen * beta), &(&rejected * beta));
        metrics.extend([always(nll.detach()), always(ratio.detach().mean(Kind::Float)), always(log_odds.detach().mean(Kind::Float))]);
        let metrics = metric_rows(metrics);
        Ok((loss, metrics))
    }

    #[allow(clippy::too_many_arguments)]
    fn kto(&self, s: &NextTokenStats, seq: &Sequences, reference: &Tensor, kl: &Tensor, desirable: &[bool], beta: f64, weights: (f64, f64)) -> Result<(Tensor, Tensor)> {
        let logps = seq.per_row(&s.logp);
        let device = logps.device();
        let ratio = &logps - reference;
        let mask = Tensor::from_slice(&desirable.iter().map(|&d| d as u8 as f32).collect::<Vec<_>>()).to_device(device);
        let not = -&mask + 1.0;
        let chosen_loss = -((&ratio - kl) * beta).sigmoid() + 1.0;
        let rejected_loss = -((-&ratio + kl) * beta).sigmoid() + 1.0;
        let per: Tensor = &chosen_loss * &mask * weights.0 + &rejected_loss * &not * weights.1;
        let loss = per.mean(Kind::Float);
        let (nc, nr) = (desirable.iter().filter(|&&d| d).count() as f64, desirable.iter().filter(|&&d| !d).count() as f64);
        let rewards = ratio.detach() * beta;
        let mean_over = |x: &Tensor, m: &Tensor, n: f64| (n > 0.0).then(|| (x * m).sum(Kind::Float) / n);
        let (rc, rr) = (mean_over(&rewards, &mask, nc), mean_over(&rewards, &not, nr));
        let margin = match (&rc, &rr) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        let comp = &seq.completion;
        let metrics = metric_rows(vec![
            present(rc, device),
            present(rr, device),
            present(margin, device),
            present(mean_over(&logps.detach(), &mask, nc), device),
            present(mean_over(&logps.detach(), &not, nr), device),
            masked_mean(&s.mean_logit, &(comp * mask.unsqueeze(1))),
            masked_mean(&s.mean_logit, &(comp * not.unsqueeze(1))),
            always(kl.shallow_clone()),
            masked_mean(&s.entropy, comp),
        ]);
        Ok((loss, metrics))
    }
}

impl Objective for PreferenceObjective {
    fn lengths(&self, split: Split) -> &[usize] {
        &self.lengths[Self::index(split)]
    }

    fn rows_per_example(&self) -> usize {
        2
    }

    fn prepare(&mut self, net: &Decoder, cfg: &BatchConfig) -> Result<()> {
        // TRL: DPO and KTO add config.json's coefficient for any MoE model, ORPO only when the
        // config sets output_router_logits
        let default = match self.kind {
            Preference::Orpo { .. } => net.model_aux_coef(),
            _ => net.router_aux_loss_coef().unwrap_or(0.0),
        };
        self.aux_coef = Some(net.router_aux_loss_coef().map_or(0.0, |_| self.aux_coef.unwrap_or(default)));
        let _g = tch::no_grad_guard();
        let adapters = peft::adapter_tensors(net);
        let fresh = adapters.iter().filter(|(name, _)| name.contains("lora_B")).all(|(_, b)| b.abs().max().double_value(&[]) == 0.0);
        self.start_adapters = (!fresh).then(|| adapters.iter().map(|(_, t)| t.copy()).collect());
        if !fresh {
            tracing::info!("the reference model is the model with its adapters as training starts (they are not fresh: B ≠ 0)");
        }
        if self.precompute && self.reference.is_none() {
            self.compute_reference(net, cfg)?;
        }
        Ok(())
    }

    fn units(&self, _split: Split, _rows: &[Row], _cfg: &BatchConfig) -> f64 {
        1.0
    }

    fn step(&self, net: &Decoder, split: Split, rows: &[Row], cfg: &BatchConfig, backward: Option<Backward>) -> Result<Step> {
        let (main, kl_seq) = self.sequences(split, rows, cfg, net);
        // the reference (and KTO's KL estimate) through the training path while training
        let seed = backward.map(|b| b.seed);
        let tokens = main.tokens + kl_seq.as_ref().map_or(0, |k| k.tokens);
        let coef = self.aux_coef();
        let ((loss, metrics), balance) = match self.kind {
            Preference::Dpo { beta, loss } => {
                let (reference, _) = self.reference(split, rows, net, &main, None, seed)?;
                main.loss(net, backward, coef, |s| {
                    let (l, m) = self.dpo(s, &main, &reference, beta, loss)?;
                    Ok((l.shallow_clone(), (l.detach(), m)))
                })?
            }
            Preference::Orpo { beta } => main.loss(net, backward, coef, |s| {
                let (l, m) = self.orpo(s, &main, beta)?;
                Ok((l.shallow_clone(), (l.detach(), m)))
            })?,
            Preference::Kto { beta, desirable_weight, undesirable_weight } => {
                let kl_seq = kl_seq.as_ref().expect("judged examples have KL sequences");
                let (reference, ref_kl) = self.reference(split, rows, net, &main, Some(kl_seq), seed)?;
                // the KL estimate: policy (no gradient) against reference on mismatched pairs
                let policy_kl = kl_seq.logps(net, seed)?;
                let kl = (policy_kl - ref_kl.expect("a KL reference")).mean(Kind::Float).clamp_min(0.0);
                let desirable: Vec<bool> = match &self.examples[Self::index(split)] {
                    Examples::Judged(j) => rows.iter().flatten().map(|&i| j[i].0.desirable).collect(),
                    Examples::Pairs(_) => unreachable!("KTO holds judged examples"),
                };
                main.loss(net, backward, coef, |s| {
                    let (l, m) = self.kto(s, &main, &reference, &kl, &desirable, beta, (desirable_weight, undesirable_weight))?;
                    Ok((l.shallow_clone(), (l.detach(), m)))
                })?
            }
        };
        // `loss + coef · aux`, and `aux` itself as a metric (TRL's `aux_loss`)
        let (loss, metrics) = match (coef != 0.0, balance) {
            (false, _) => (loss, metrics),
            (true, balance) => {
                let b = balance.map(|b| b.to_device(loss.device()).to_kind(Kind::Float));
                let row = metric_rows(vec![present(b.as_ref().map(|b| b / coef), loss.device())]).to_device(metrics.device());
                (b.map_or(loss.shallow_clone(), |b| loss.to_kind(Kind::Float) + b), Tensor::cat(&[metrics, row], 0))
            }
        };
        Ok(Step { loss: loss.to_kind(Kind::Float), metrics: Some(metrics), tokens })
    }

    fn metric_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&str> = match self.kind {
            Preference::Dpo { .. } => PAIR_METRICS.iter().chain(DPO_EXTRA).copied().collect(),
            Preference::Orpo { .. } => PAIR_METRICS.iter().chain(ORPO_EXTRA).copied().collect(),
            Preference::Kto { .. } => KTO_METRICS.to_vec(),
        };
        if self.aux_coef() != 0.0 {
            names.push("aux_loss");
        }
        names
    }
}
