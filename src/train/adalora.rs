//! AdaLoRA's rank allocation, applied inside `train` after every optimizer step (what peft
//! leaves to the user as `model.base_model.update_and_allocate(global_step)`), and its
//! orthogonal regularization. Computed as peft's `RankAllocator` computes it:
//!
//! - importance of each entry `I = |p · ∂L/∂p|` (after clipping, with `p` after the update),
//!   smoothed `Ī ← β₁Ī + (1−β₁)I` and its uncertainty `Ū ← β₂Ū + (1−β₂)|I − Ī|`, the score
//!   `Ī·Ū`;
//! - triplet `i`'s score: `s(Eᵢ) + mean_j s(Aᵢⱼ) + mean_j s(Bⱼᵢ)`;
//! - the budget: `init_r` per module until `tinit`, then `(b₀ − b_T)·(1 − (t − tinit)/(T −
//!   tfinal − tinit))³ + b_T` (truncated) until `T − tfinal`, then `target_r` per module; every
//!   `deltaT` steps the lowest-scoring triplets beyond the budget get `Eᵢ = 0`; at `T − tfinal`
//!   the pattern is fixed and re-applied after every later step;
//! - the loss gains `w · mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F` over every module (once per optimizer
//!   step; peft's loop adds it to each forward).

use crate::nn::peft::Adapted;
use crate::nn::adapters::{AdaLora, Adapter};
use crate::nn::peft::AdaLoraSchedule;
use anyhow::Result;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub struct RankAllocator {
    schedule: AdaLoraSchedule,
    total_step: usize,
    init_budget: i64,
    target_budget: i64,
    /// Per module, per tensor (A, B, E): the smoothed importance and uncertainty.
    ema: Vec<Option<[(Tensor, Tensor); 3]>>,
}

/// The AdaLoRA adapters of `net` with their module names, in model order.
fn modules(net: &dyn Adapted) -> Vec<(&str, &AdaLora)> {
    net.linears()
        .into_iter()
        .filter_map(|l| match &l.adapter {
            Some(Adapter::AdaLora(a)) => Some((l.name.as_str(), a)),
            _ => None,
        })
        .collect()
}

impl RankAllocator {
    /// The allocator for `net`'s AdaLoRA adapters (`None` when it has none), over a run of
    /// `run_steps` steps unless the schedule names its own `total_step`.
    pub fn new(net: &dyn Adapted, schedule: &AdaLoraSchedule, run_steps: usize) -> Result<Option<RankAllocator>> {
        let ada = modules(net);
        if ada.is_empty() {
            return Ok(None);
        }
        if let Some((name, _)) = ada.iter().find(|(_, a)| a.keep.borrow().is_some()) {
            anyhow::bail!("AdaLoRA: `{name}` was cut to its rank budget already (a saved adapter with a rank_pattern); train a fresh add_adalora adapter");
        }
        let total_step = schedule.total_step.unwrap_or(run_steps);
        anyhow::ensure!(
            schedule.tinit + schedule.tfinal < total_step,
            "AdaLoRA: tinit ({}) + tfinal ({}) must be below total_step ({total_step}), or no step is left for the budget to fall",
            schedule.tinit,
            schedule.tfinal
        );
        let init_budget = ada.iter().map(|(_, a)| a.rank()).sum();
        Ok(Some(RankAllocator { schedule: schedule.clone(), total_step, init_budget, target_budget: schedule.target_r * ada.len() as i64, ema: (0..ada.len()).map(|_| None).collect() }))
    }

    /// Adds `w · mean ‖PPᵀ − I‖_F` over every A (`AAᵀ`) and B (`BᵀB`) to the adapters'
    /// gradients; returns its value `mean ‖·‖_F` (detached).
    pub fn orthogonal_backward(&self, net: &dyn Adapted) -> Result<Tensor> {
        let ada = modules(net);
        let mut terms = vec![];
        for (_, a) in &ada {
            for cov in [a.a.matmul(&a.a.tr()), a.b.tr().matmul(&a.b)] {
                let eye = Tensor::eye(cov.size()[0], (cov.kind(), cov.device()));
                terms.push((cov - eye).square().sum(Kind::Float).sqrt());
            }
        }
        let reg = Tensor::stack(&terms.iter().map(|t| t.to_device(terms[0].device())).collect::<Vec<_>>(), 0).sum(Kind::Float) / terms.len() as f64;
        if self.schedule.orth_reg_weight > 0.0 {
            crate::cuda::autograd::backward(&[(&reg, &Tensor::from(self.schedule.orth_reg_weight).to_kind(reg.kind()).to_device(reg.device()))])?;
        }
        Ok(reg.detach())
    }

    /// The budget at 0-based step `step` and whether to re-allocate there.
    fn budget(&self, step: usize) -> (i64, bool) {
        let s = &self.schedule;
        if step <= s.tinit {
            (self.init_budget, false)
        } else if step > self.total_step - s.tfinal {
            (self.target_budget, true)
        } else {
            let c = 1.0 - (step - s.tinit) as f64 / (self.total_step - s.tfinal - s.tinit) as f64;
            (((self.init_budget - self.target_budget) as f64 * c.powf(3.0) + self.target_budget as f64) as i64, step.is_multiple_of(s.delta_t))
        }
    }

    /// The smoothed importances after this step's gradients.
    fn update_importance(&mut self, net: &dyn Adapted) {
        let _g = tch::no_grad_guard();
        let (b1, b2) = (self.schedule.beta1, self.schedule.beta2);
        for (slot, (_, a)) in self.ema.iter_mut().zip(modules(net)) {
            let tensors = [&a.a, &a.b, &a.e];
            let ema = slot.get_or_insert_with(|| tensors.map(|p| (p.zeros_like(), p.zeros_like())));
            for (p, (avg, unc)) in tensors.iter().zip(ema.iter_mut()) {
                let ipt = (*p * p.grad()).abs();
                *avg = &*avg * b1 + &ipt * (1.0 - b1);
                *unc = &*unc * b2 + (&ipt - &*avg).abs() * (1.0 - b2);
            }
        }
    }

    /// Masks the lowest-scoring triplets beyond `budget` (`Eᵢ = 0`) and records which survive.
    fn mask_to_budget(&self, net: &dyn Adapted, budget: i64) -> Result<BTreeMap<String, Vec<bool>>> {
        let _g = tch::no_grad_guard();
        let ada = modules(net);
        let scores: Vec<Tensor> = self
            .ema
            .iter()
            .map(|ema| {
                let [(ia, ua), (ib, ub), (ie, ue)] = ema.as_ref().expect("importances before the first allocation");
                let ab = (ia * ua).mean_dim([1i64].as_slice(), false, Kind::Float) + (ib * ub).mean_dim([0i64].as_slice(), false, Kind::Float);
                (ie * ue).view([-1]) + ab
            })
            .collect();
        let k = self.init_budget - budget;
        let threshold = if k > 0 {
            let all = Tensor::cat(&scores.iter().map(|s| s.to_device(scores[0].device())).collect::<Vec<_>>(), 0);
            Some(all.kthvalue(k, 0, false).0.double_value(&[]))
        } else {
            None
        };
        let mut pattern = BTreeMap::new();
        for ((name, a), score) in ada.iter().zip(&scores) {
            let keep: Vec<bool> = match threshold {
                Some(t) => Vec::<f64>::try_from(score.to_kind(Kind::Double).to_device(tch::Device::Cpu))?.iter().map(|s| *s > t).collect(),
                None => vec![true; a.rank() as usize],
            };
            apply(a, &keep);
            *a.keep.borrow_mut() = Some(keep.clone());
            pattern.insert(name.to_string(), keep);
        }
        Ok(pattern)
    }

    /// After the optimizer step at 0-based `step` (gradients not yet cleared): the importances,
    /// and on an allocation step the new masks; returns `(budget, kept triplets per module)`
    /// when the masks changed.
    pub fn update_and_allocate(&mut self, net: &dyn Adapted, step: usize) -> Result<Option<(i64, BTreeMap<String, Vec<bool>>)>> {
        let final_start = self.total_step - self.schedule.tfinal;
        if step < final_start {
            self.update_importance(net);
            let (budget, allocate) = self.budget(step);
            return Ok(if allocate { Some((budget, self.mask_to_budget(net, budget)?)) } else { None });
        }
        if step == final_start {
            let (budget, _) = self.budget(step);
            let pattern = self.mask_to_budget(net, budget)?;
            self.ema.iter_mut().for_each(|e| *e = None);
            return Ok(Some((budget, pattern)));
        }
        let _g = tch::no_grad_guard();
        for (_, a) in modules(net) {
            if let Some(keep) = &*a.keep.borrow() {
                apply(a, keep);
            }
        }
        Ok(None)
    }
}

impl RankAllocator {
    /// What a checkpoint must hold beyond the adapter file to resume bit for bit: the full
    /// A, B, E (the adapter file keeps only the triplets kept), the smoothed importances, and
    /// each module's kept triplets (as 0/1).
    pub fn checkpoint_tensors(&self, net: &dyn Adapted) -> Vec<(String, Tensor)> {
        let mut v = vec![];
        for ((name, a), ema) in modules(net).into_iter().zip(&self.ema) {
            for (t, p) in ["lora_A", "lora_B", "lora_E"].iter().zip([&a.a, &a.b, &a.e]) {
                v.push((format!("adalora.param.base_model.model.{name}.{t}"), p.detach()));
            }
            if let Some(ema) = ema {
                for (t, (avg, unc)) in ["A", "B", "E"].iter().zip(ema) {
                    v.push((format!("adalora.avg.{name}.{t}"), avg.shallow_clone()));
                    v.push((format!("adalora.unc.{name}.{t}"), unc.shallow_clone()));
                }
            }
            if let Some(keep) = &*a.keep.borrow() {
                let k: Vec<u8> = keep.iter().map(|x| *x as u8).collect();
                v.push((format!("adalora.keep.{name}"), Tensor::from_slice(&k)));
            }
        }
        v
    }

    /// Restores what [`RankAllocator::checkpoint_tensors`] saved (the parameters are restored
    /// with the others, by `checkpoint::load`).
    pub fn restore(&mut self, net: &dyn Adapted, saved: &crate::nn::WeightSource) -> Result<()> {
        let _g = tch::no_grad_guard();
        for ((name, a), ema) in modules(net).into_iter().zip(self.ema.iter_mut()) {
            let key = |what: &str, t: &str| format!("adalora.{what}.{name}.{t}");
            *ema = if saved.contains(&key("avg", "A")) {
                let load = |what: &str, t: &str, p: &Tensor| saved.load(&key(what, t), &p.size(), p.kind(), p.device());
                Some([
                    (load("avg", "A", &a.a)?, load("unc", "A", &a.a)?),
                    (load("avg", "B", &a.b)?, load("unc", "B", &a.b)?),
                    (load("avg", "E", &a.e)?, load("unc", "E", &a.e)?),
                ])
            } else {
                None
            };
            let keep_key = format!("adalora.keep.{name}");
            *a.keep.borrow_mut() = if saved.contains(&keep_key) {
                let k = saved.load(&keep_key, &[a.rank()], Kind::Uint8, tch::Device::Cpu)?;
                Some(Vec::<u8>::try_from(k)?.into_iter().map(|x| x != 0).collect())
            } else {
                None
            };
        }
        Ok(())
    }
}

/// `Eᵢ = 0` for the triplets not kept.
fn apply(a: &AdaLora, keep: &[bool]) {
    let dropped: Vec<bool> = keep.iter().map(|k| !k).collect();
    let mask = Tensor::from_slice(&dropped).to_device(a.e.device()).view([-1, 1]);
    let mut e = a.e.shallow_clone();
    let _ = e.masked_fill_(&mask, 0.0);
}

/// Appends one allocation to `output_dir/adalora_ranks.jsonl`: the 0-based step it followed,
/// the budget, each module's rank and its kept triplets (peft's `rank_pattern`).
pub fn log_allocation(output_dir: &std::path::Path, step: usize, budget: i64, pattern: &BTreeMap<String, Vec<bool>>) -> Result<()> {
    use std::io::Write;
    let ranks: BTreeMap<&String, usize> = pattern.iter().map(|(k, v)| (k, v.iter().filter(|x| **x).count())).collect();
    let line = serde_json::json!({"global_step": step, "budget": budget, "ranks": ranks, "rank_pattern": pattern});
    let path = output_dir.join("adalora_ranks.jsonl");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    writeln!(f, "{line}")?;
    Ok(())
}
