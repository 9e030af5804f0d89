//! Text generation with a KV cache, and scoring.

use crate::models::decoder::{AttnMask, KvCache};
use crate::models::LoadedModel;
use anyhow::Result;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability sums to at least `top_p` (1 = off).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// The ids generation stops at: config/generation_config `eos_token_id`s and the tokenizer's EOS.
pub fn stop_ids(model: &LoadedModel) -> Vec<i64> {
    let mut ids = model.net.config.eos_token_ids.clone();
    if let Some(g) = &model.generation_config {
        match g.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_i64()),
            Some(serde_json::Value::Array(a)) => ids.extend(a.iter().filter_map(|v| v.as_i64())),
            _ => {}
        }
    }
    ids.extend(model.tokenizer.eos_id);
    ids.sort();
    ids.dedup();
    ids
}

/// Picks the next token from fp32 logits `[V]` per the sampling settings.
fn choose(logits: &[f32], s: &Sampling, rng: &mut rand::rngs::StdRng) -> i64 {
    if s.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as i64;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let mut u: f64 = rng.gen();
    for (n, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[n] as i64;
        }
        u -= p;
    }
    idx[probs.len() - 1] as i64
}

/// Generates up to `max_new_tokens` after `prompt_ids`, stopping at EOS; returns the new ids.
pub fn generate_ids(model: &LoadedModel, prompt_ids: &[i64], s: &Sampling) -> Result<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let net = &model.net;
    let stops = stop_ids(model);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let mut cache = KvCache::default();
    let mut out = vec![];
    let mut input = Tensor::from_slice(prompt_ids).view([1, -1]).to_device(net.device);
    let mut pos = 0i64;
    for _ in 0..s.max_new_tokens {
        let t = input.size()[1];
        let positions = Tensor::arange_start(pos, pos + t, (Kind::Int64, net.device)).view([1, -1]);
        // only the last position's logits are needed: project just that row
        let h = net.hidden(&input, &positions, &AttnMask::Causal, Some(&mut cache), false);
        pos += t;
        let last = net.head(&h.narrow(1, t - 1, 1), false).view([-1]);
        let next = if s.temperature <= 0.0 {
            // greedy: pick on the device, move one integer instead of the vocabulary's logits
            last.argmax(0, false).int64_value(&[])
        } else {
            let v: Vec<f32> = Vec::<f32>::try_from(&last.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
            choose(&v, s, &mut rng)
        };
        if stops.contains(&next) {
            break;
        }
        out.push(next);
        input = Tensor::from_slice(&[next]).view([1, 1]).to_device(net.device);
    }
    Ok(out)
}

/// Mean next-token negative log-likelihood (natural log) of `ids` under the model.
pub fn loss_of_ids(model: &LoadedModel, ids: &[i64]) -> Result<f64> {
    anyhow::ensure!(ids.len() >= 2, "loss needs at least two tokens, got {}", ids.len());
    let _guard = tch::no_grad_guard();
    let net = &model.net;
    let input = Tensor::from_slice(ids).view([1, -1]).to_device(net.device);
    let t = ids.len() as i64;
    let positions = Tensor::arange(t, (Kind::Int64, net.device)).view([1, -1]);
    let logits = net.forward(&input, &positions, &AttnMask::Causal, None, false);
    let loss = crate::nn::loss::loss_sum(&logits, &input.to_device(logits.device())) / (t - 1) as f64;
    Ok(loss.double_value(&[]))
}
