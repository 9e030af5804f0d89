//! Text generation with a KV cache, and scoring.

use crate::models::decoder::{AttnMask, KvCache};
use crate::models::LoadedModel;
use anyhow::Result;
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
    /// Divide a seen token's positive logit by it, multiply a negative one (CTRL's penalty; 1 = off).
    pub repetition_penalty: f64,
    pub seed: u64,
    /// A row stops once its text contains one of these (the text is cut before it).
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0, stop: vec![] }
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

/// Next-token logits `[B, V]` (fp32) filtered as transformers' logits processors do, in their
/// order: the repetition penalty over the ids each row has seen (`seen` `[B, S]`, prompt and
/// padding included, as transformers'), then temperature, top-k and top-p (which keeps the
/// smallest set of most likely tokens whose probability reaches `top_p`, at least one).
pub fn process_logits(logits: &Tensor, seen: &Tensor, s: &Sampling) -> Tensor {
    let mut z = logits.to_kind(Kind::Float);
    if s.repetition_penalty != 1.0 {
        let score = z.gather(1, seen, false);
        let score = (&score * s.repetition_penalty).where_self(&score.lt(0.0), &(&score / s.repetition_penalty));
        z = z.scatter(1, seen, &score);
    }
    if s.temperature > 0.0 {
        z = z / s.temperature;
    }
    if s.top_k > 0 && (s.top_k as i64) < z.size()[1] {
        let (kth, _) = z.topk(s.top_k as i64, -1, true, true);
        let threshold = kth.narrow(1, s.top_k as i64 - 1, 1);
        z = z.masked_fill(&z.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        let (sorted, order) = z.sort(-1, false);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cum.le(1.0 - s.top_p);
        let v = remove.size()[1];
        let _ = remove.narrow(1, v - 1, 1).fill_(0);
        let remove = remove.scatter(1, &order, &remove);
        z = z.masked_fill(&remove, f64::NEG_INFINITY);
    }
    z
}

/// Generates up to `max_new_tokens` after each prompt, in one batch: prompts left-padded, one
/// KV cache for the batch, each row stopping at its own stop id (or, with stop strings, once its
/// decoded text holds one: then each step's tokens are read back to the host); the next tokens
/// are picked on the device (greedy: argmax; sampling: a draw from the processed distribution,
/// seeded). Returns each row's new ids, the stop id left out.
pub fn generate_batch(model: &LoadedModel, prompts: &[Vec<i64>], s: &Sampling) -> Result<Vec<Vec<i64>>> {
    let _guard = tch::no_grad_guard();
    let net = &model.net;
    let device = net.device;
    anyhow::ensure!(!prompts.is_empty(), "generate: no prompts");
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "generate: a prompt has no tokens");
    let (b, width) = (prompts.len() as i64, prompts.iter().map(Vec::len).max().unwrap_or(1) as i64);
    let ragged = prompts.iter().any(|p| p.len() as i64 != width);
    let pad = model.tokenizer.pad_id;
    let mut ids = vec![];
    let mut valid = vec![];
    for p in prompts {
        let n = width as usize - p.len();
        ids.extend(std::iter::repeat(pad).take(n).chain(p.iter().copied()));
        valid.extend(std::iter::repeat(false).take(n).chain(std::iter::repeat(true).take(p.len())));
    }
    let mut input = Tensor::from_slice(&ids).view([b, width]).to_device(device);
    let mut valid = Tensor::from_slice(&valid).view([b, width]).to_device(device);
    // positions count real tokens only (a left-padded row starts at 0 where its prompt does)
    let mut positions = (valid.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let mut next_position = valid.sum_dim_intlist([1].as_slice(), false, Kind::Int64);
    let mut seen = input.shallow_clone();
    let stops = Tensor::from_slice(&stop_ids(model)).to_device(device);
    let mut finished = Tensor::zeros([b], (Kind::Bool, device));
    let mut cache = KvCache::default();
    let mut generated = vec![];
    if s.temperature > 0.0 {
        tch::manual_seed(s.seed as i64);
    }
    for step in 0..s.max_new_tokens {
        let t = input.size()[1];
        // without padding the causal mask serves (and costs no ops)
        let mask = if ragged { AttnMask::Padded(valid.shallow_clone()) } else { AttnMask::Causal };
        let h = net.hidden(&input, &positions, &mask, Some(&mut cache), false);
        // only the last position's logits are needed: project just that row
        let logits = process_logits(&net.head(&h.narrow(1, t - 1, 1), false).view([b, -1]), &seen.to_device(net.head_device), s).to_device(device);
        let next = if s.temperature > 0.0 { logits.softmax(-1, Kind::Float).multinomial(1, false).view([b]) } else { logits.argmax(-1, false) };
        // a finished row keeps emitting padding
        let next = Tensor::full([b], pad, (Kind::Int64, device)).where_self(&finished, &next);
        finished = finished.logical_or(&Tensor::isin(&next, &stops, false, false));
        generated.push(next.shallow_clone());
        if !s.stop.is_empty() {
            let rows = Tensor::stack(&generated, 1).to_device(tch::Device::Cpu);
            let mut done = Vec::<bool>::try_from(finished.to_device(tch::Device::Cpu))?;
            for (r, d) in done.iter_mut().enumerate().filter(|(_, d)| !**d) {
                let text = model.tokenizer.decode(&Vec::<i64>::try_from(rows.get(r as i64))?, true)?;
                *d = s.stop.iter().any(|stop| text.contains(stop.as_str()));
            }
            finished = Tensor::from_slice(&done).to_device(device);
        }
        // one flag read a step: stop when every row has
        if step + 1 == s.max_new_tokens || finished.all().int64_value(&[]) != 0 {
            break;
        }
        input = next.view([b, 1]);
        positions = next_position.view([b, 1]);
        next_position = next_position + 1;
        valid = Tensor::cat(&[valid, Tensor::ones([b, 1], (Kind::Bool, device))], 1);
        seen = Tensor::cat(&[seen, input.shallow_clone()], 1);
        // LongRoPE turns to its long factors once a sequence passes the pretraining length; the
        // cache, rotated with the short ones, is computed again then (transformers' Phi-3 does)
        if let crate::nn::rope::RopeScaling::LongRope { original_max_position_embeddings: original, .. } = net.config.rope_scaling {
            let len = seen.size()[1];
            if len > original as i64 && len - 1 <= original as i64 {
                cache = KvCache::default();
                input = seen.shallow_clone();
                positions = (valid.cumsum(1, Kind::Int64) - 1).clamp_min(0);
            }
        }
    }
    let all = Tensor::stack(&generated, 1).to_device(tch::Device::Cpu);
    let stops = stop_ids(model);
    Ok((0..b)
        .map(|r| {
            let row = Vec::<i64>::try_from(all.get(r)).unwrap_or_default();
            row.into_iter().take_while(|t| !stops.contains(t)).collect()
        })
        .collect())
}

/// `text` up to the first of the stop strings in it.
pub fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> &'a str {
    let end = stop.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    &text[..end]
}

/// [`generate_batch`] of one prompt.
pub fn generate_ids(model: &LoadedModel, prompt_ids: &[i64], s: &Sampling) -> Result<Vec<i64>> {
    Ok(generate_batch(model, &[prompt_ids.to_vec()], s)?.remove(0))
}

/// Mean next-token negative log-likelihood (natural log) of `ids` under the model.
pub fn loss_of_ids(model: &LoadedModel, ids: &[i64]) -> Result<f64> {
    anyhow::ensure!(ids.len() >= 2, "loss needs at least two tokens, got {}", ids.len());
    let _guard = tch::no_grad_guard();
    let net = &model.net;
    let input = Tensor::from_slice(ids).view([1, -1]).to_device(net.device);
    let t = ids.len() as i64;
    let positions = Tensor::arange(t, (Kind::Int64, net.device)).view([1, -1]);
    let (logits, routes) = net.forward_routed(&input, &positions, &AttnMask::Causal);
    let loss = crate::nn::loss::loss_sum(&logits, &input.to_device(logits.device())) / (t - 1) as f64;
    // a sparse model adds its load-balancing loss, as transformers' does with `output_router_logits`
    let balance = net.balance_loss(&routes, net.model_aux_coef(), None).map_or(0.0, |b| b.double_value(&[]));
    Ok(loss.double_value(&[]) + balance)
}
