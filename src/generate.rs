//! Text generation with a KV cache, and scoring.

use crate::data::format::IGNORE;
use crate::models::decoder::{AttnMask, KvCache, LayerInputs};
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
    /// On a GPU, replay the decoding step from a CUDA graph (off: op by op).
    pub cuda_graph: bool,
    /// The KV cache holds the whole generation (prompts and `max_new_tokens`) from the start
    /// when that takes at most this many bytes (and 4,096 positions, what the decoding attention
    /// kernel takes); a larger one starts with room for [`FIRST_ROOM`] new tokens and doubles
    /// when full.
    pub whole_cache_bytes: i64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0, stop: vec![], cuda_graph: true, whole_cache_bytes: 1 << 30 }
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
/// fixed-capacity KV cache for the batch, each row stopping at its own stop id (or, with stop
/// strings, once its decoded text holds one: then each step's tokens are read back to the host);
/// the next tokens are picked on the device (greedy: argmax; sampling: a draw from the processed
/// distribution, seeded). On a GPU the decoding step is replayed from a CUDA graph
/// ([`Decoding`]). Returns each row's new ids, the stop id left out.
pub fn generate_batch(model: &LoadedModel, prompts: &[Vec<i64>], s: &Sampling) -> Result<Vec<Vec<i64>>> {
    Ok(generate_scoring(model, prompts, None, s)?.0)
}

/// Tokens scored in the forward of a generation's prompt: `continuation` follows the prompt there
/// (its keys are left out of the cache the answer is decoded from, so the answer is the prompt's
/// alone), and `labels`, one per token of prompt and continuation, are the next-token targets
/// as in a training row (`labels[k]` is predicted at `k − 1`; -100: not scored).
#[derive(Debug, Clone, Copy)]
pub struct Scoring<'a> {
    pub continuation: &'a [i64],
    pub labels: &'a [i64],
}

/// [`generate_batch`], and with `scoring` (one per prompt) the summed next-token cross-entropy of
/// the scored tokens (fp32 scalar on the head's device), from the same forward as the prompts':
/// an evaluation's loss over prompt + reference and its generation from the prompt cost one
/// prefill instead of two.
pub fn generate_scoring(model: &LoadedModel, prompts: &[Vec<i64>], scoring: Option<&[Scoring]>, s: &Sampling) -> Result<(Vec<Vec<i64>>, Option<Tensor>)> {
    let _guard = tch::no_grad_guard();
    crate::nn::inference_kernels(|| generate_on(model, prompts, scoring, s))
}

/// [`generate_scoring`]'s work, inside its [`crate::nn::inference_kernels`] scope (the prompts'
/// forward and the steps on the fused kernels, on a GPU). A row is laid out as its padding, its
/// prompt, then (when scored) its continuation and the continuation's padding: the prompts end in
/// one column, after which decoding writes its tokens.
fn generate_on(model: &LoadedModel, prompts: &[Vec<i64>], scoring: Option<&[Scoring]>, s: &Sampling) -> Result<(Vec<Vec<i64>>, Option<Tensor>)> {
    let net = &model.net;
    let device = net.device;
    anyhow::ensure!(!prompts.is_empty(), "generate: no prompts");
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "generate: a prompt has no tokens");
    if let Some(sc) = scoring {
        anyhow::ensure!(sc.len() == prompts.len(), "generate: {} scored continuations for {} prompts", sc.len(), prompts.len());
        for (i, (p, c)) in prompts.iter().zip(sc).enumerate() {
            anyhow::ensure!(c.labels.len() == p.len() + c.continuation.len(), "generate: row {i} has {} labels for {} prompt and {} continuation tokens", c.labels.len(), p.len(), c.continuation.len());
        }
    }
    let (b, width) = (prompts.len() as i64, prompts.iter().map(Vec::len).max().unwrap_or(1) as i64);
    let longest = scoring.map_or(0, |sc| sc.iter().map(|c| c.continuation.len()).max().unwrap_or(0)) as i64;
    // a rotary scaling that depends on the length would rotate the prompts by the length of
    // prompt and continuation: the scored rows then get a forward of their own
    let shared = net.ropes.iter().all(|r| !r.depends_on_length());
    let after = if shared { longest } else { 0 };
    // tests of the out-of-memory policy: batches of more rows fail as out of memory
    if let Some(rows) = std::env::var("FTSCRIPT_INJECT_OOM_ROWS").ok().and_then(|v| v.parse::<i64>().ok()).filter(|r| b > *r) {
        anyhow::bail!("out of memory (FTSCRIPT_INJECT_OOM_ROWS: {b} rows > {rows})");
    }
    let ragged = prompts.iter().any(|p| p.len() as i64 != width);
    tracing::debug!("generate: {b} prompt(s) of {} to {width} tokens", prompts.iter().map(Vec::len).min().unwrap_or(0));
    let pad = model.tokenizer.pad_id;
    let mut ids = vec![];
    let mut valid = vec![];
    let (mut scored_ids, mut scored_valid, mut labels) = (vec![], vec![], vec![]);
    for (r, p) in prompts.iter().enumerate() {
        let n = width as usize - p.len();
        let row: Vec<i64> = std::iter::repeat_n(pad, n).chain(p.iter().copied()).collect();
        let real: Vec<bool> = std::iter::repeat_n(false, n).chain(std::iter::repeat_n(true, p.len())).collect();
        if let Some(c) = scoring.map(|sc| sc[r]) {
            let gap = longest as usize - c.continuation.len();
            scored_ids.extend(row.iter().chain(c.continuation).copied().chain(std::iter::repeat_n(pad, gap)));
            scored_valid.extend(real.iter().copied().chain(std::iter::repeat_n(true, c.continuation.len())).chain(std::iter::repeat_n(false, gap)));
            // a row's first token is predicted from nothing (here: from its padding)
            labels.extend(std::iter::repeat_n(IGNORE, n + 1).chain(c.labels[1..].iter().copied()).chain(std::iter::repeat_n(IGNORE, gap)));
        }
        ids.extend(row);
        valid.extend(real);
    }
    let input = Tensor::from_slice(&ids).view([b, width]).to_device(device);
    let valid = Tensor::from_slice(&valid).view([b, width]).to_device(device);
    // the cache's slots: the prompts', then the continuations', which are never valid: the new
    // tokens overwrite them from the prompts' end on (as if there had been no continuation)
    let slots = Tensor::cat(&[&valid, &Tensor::zeros([b, after], (Kind::Bool, device))], 1);
    let mut decoding = Decoding::new(net, &slots, width + after.max(s.max_new_tokens as i64), s);
    let scored_rows = || {
        let all = Tensor::from_slice(&scored_ids).view([b, width + longest]).to_device(device);
        let real = Tensor::from_slice(&scored_valid).view([b, width + longest]).to_device(device);
        let labels = Tensor::from_slice(&labels).view([b, width + longest]).to_device(device);
        (all, real, labels)
    };
    let (mut logits, loss) = match scoring {
        None => (decoding.prompts(&input, ragged)?, None),
        Some(_) if shared => {
            let (all, real, labels) = scored_rows();
            let h = decoding.prefill(&all, &real, true);
            (decoding.last_logits(&h.narrow(1, width - 1, 1)), Some(net.head_loss_sum(&h, &labels)))
        }
        Some(_) => {
            let (all, real, labels) = scored_rows();
            let h = net.hidden(&all, &real_positions(&real), &AttnMask::Padded(real), None, false);
            (decoding.prompts(&input, ragged)?, Some(net.head_loss_sum(&h, &labels)))
        }
    };
    // positions count real tokens only (a left-padded row starts at 0 where its prompt does)
    let mut next_position = valid.sum_dim_intlist([1].as_slice(), false, Kind::Int64);
    let mut seen = input;
    let stops = Tensor::from_slice(&stop_ids(model)).to_device(device);
    let mut finished = Tensor::zeros([b], (Kind::Bool, device));
    let mut generated = vec![];
    if s.temperature > 0.0 {
        tch::manual_seed(s.seed as i64);
    }
    for step in 0..s.max_new_tokens {
        let scores = process_logits(&logits, &seen.to_device(net.head_device), s).to_device(device);
        let next = if s.temperature > 0.0 { scores.softmax(-1, Kind::Float).multinomial(1, false).view([b]) } else { scores.argmax(-1, false) };
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
        if step + 1 == s.max_new_tokens {
            break;
        }
        // whether every row has finished, read once the next step is queued (the host does not
        // wait for the device between steps; after the last one a step is computed for nothing)
        let all_finished = crate::cuda::to_host(&finished.all())?;
        seen = Tensor::cat(&[&seen, &next.view([b, 1])], 1);
        let len = seen.size()[1];
        // LongRoPE turns to its long factors once a sequence passes the pretraining length; the
        // cache, rotated with the short ones, is computed again then (transformers' Phi-3 does)
        logits = match net.config.rope_scaling {
            crate::nn::rope::RopeScaling::LongRope { original_max_position_embeddings: o, .. } if len > o as i64 && len - 1 <= o as i64 => decoding.restart(&seen, ragged)?,
            _ => decoding.step(&next, &next_position, len - 1)?,
        };
        next_position = next_position + 1;
        if all_finished.wait()?.int64_value(&[]) != 0 {
            break;
        }
    }
    let all = Tensor::stack(&generated, 1).to_device(tch::Device::Cpu);
    let stops = stop_ids(model);
    let rows = (0..b)
        .map(|r| {
            let row = Vec::<i64>::try_from(all.get(r)).unwrap_or_default();
            row.into_iter().take_while(|t| !stops.contains(t)).collect()
        })
        .collect();
    Ok((rows, loss))
}

/// Each token's position `[B, T]` where `valid` `[B, T]` marks the real ones: real tokens count
/// from 0 (a left-padded row starts where its prompt does; padding sits at 0).
fn real_positions(valid: &Tensor) -> Tensor {
    (valid.cumsum(1, Kind::Int64) - 1).clamp_min(0)
}

/// Decoding steps replayed from CUDA graphs in this process (what tests and logs can check).
static GRAPH_REPLAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many decoding steps this process has replayed from a CUDA graph.
pub fn cuda_graph_replays() -> usize {
    GRAPH_REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// KV caches grown on this thread (what tests can check; a generation runs on its caller's thread).
    static CACHE_GROWTHS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times a generation on this thread has grown its KV cache.
pub fn cache_growths() -> usize {
    CACHE_GROWTHS.with(|n| n.get())
}

/// New tokens a generation's KV cache first has room for (beyond the prompts) where a cache for
/// the whole generation would take more than [`Sampling::whole_cache_bytes`]; the room doubles
/// when a step needs more, up to `max_new_tokens`.
const FIRST_ROOM: i64 = 64;

/// Decoding over a fixed-capacity [`KvCache`]: every step reads the same buffers (the tokens,
/// their positions, the slot they are written to, which slots hold keys) and has the same
/// shapes, so on a GPU the step is recorded once as a CUDA graph and replayed: one launch a
/// token instead of one per op. A cache for the whole generation that would take more than
/// [`Sampling::whole_cache_bytes`] starts with room for [`FIRST_ROOM`] new tokens and doubles
/// when full (the graph is then recorded again), so its memory follows the longest row rather
/// than `max_new_tokens`. Models split across GPUs, sparse models whose experts cannot
/// take the grouped GEMM (fp32, unaligned widths) and rotary scalings that depend on the
/// sequence's length decode op by op.
struct Decoding<'a> {
    net: &'a crate::models::decoder::Decoder,
    /// The most tokens a row may hold (prompt and new tokens).
    limit: i64,
    cache: KvCache,
    /// `[B, capacity]`: the slots holding a real token's keys.
    valid: Tensor,
    ids: Tensor,
    positions: Tensor,
    /// `[1]`: the slot a step writes.
    slot: Tensor,
    /// Each rotary table's `(cos, sin)` `[limit, d]` by position, when positions alone fix them.
    tables: Option<Vec<(Tensor, Tensor)>>,
    graph: Graph,
}

enum Graph {
    /// Not recorded yet: the next step records it.
    Pending,
    /// The recording and the logits each replay rewrites.
    Recorded(crate::cuda::graph::CudaGraph, Tensor),
    Off,
}

impl<'a> Decoding<'a> {
    /// Decoding of `valid.size()[0]` rows of up to `limit` tokens, the first `valid.size()[1]`
    /// of them the prompts (`valid` marks their real tokens).
    fn new(net: &'a crate::models::decoder::Decoder, valid: &Tensor, limit: i64, s: &Sampling) -> Decoding<'a> {
        let (b, width) = valid.size2().unwrap();
        let device = net.device;
        let cuda_graph = s.cuda_graph;
        // (a cache past the attention kernel's positions would keep every step off the kernel)
        let whole = limit * net.cache_bytes_per_position(b) <= s.whole_cache_bytes && limit <= crate::cuda::autograd::DECODE_MAX_CAP;
        let capacity = if whole { limit } else { limit.min(width + FIRST_ROOM) };
        let all = Tensor::zeros([b, capacity], (Kind::Bool, device));
        all.narrow(1, 0, width).copy_(valid);
        let fixed = net.ropes.iter().all(|r| !r.depends_on_length());
        let by_position = Tensor::arange(limit, (Kind::Int64, device)).view([1, limit]);
        let tables = fixed.then(|| net.ropes.iter().map(|r| r.cos_sin(&by_position, net.kind)).map(|(c, s)| (c.view([limit, -1]), s.view([limit, -1]))).collect());
        // a sparse block waits for the host unless its experts take the grouped GEMM
        let grouped = net.layers.iter().filter_map(|l| l.mlp.sparse()).all(|m| m.experts.groupable_as(device, net.kind));
        let graphable = device.is_cuda() && net.devices().len() == 1 && grouped && fixed;
        if device.is_cuda() && cuda_graph && !graphable {
            tracing::debug!("generate: decoding op by op (the model is split across GPUs, its experts are not grouped (fp32 or unaligned), or its rotary scaling depends on the length)");
        }
        Decoding {
            net,
            limit,
            cache: net.new_cache(b, capacity),
            valid: all,
            ids: Tensor::zeros([b, 1], (Kind::Int64, device)),
            positions: Tensor::zeros([b, 1], (Kind::Int64, device)),
            slot: Tensor::zeros([1], (Kind::Int64, device)),
            tables,
            graph: if cuda_graph && graphable { Graph::Pending } else { Graph::Off },
        }
    }

    /// Room in the cache for `len` tokens a row: a full cache is copied into one twice as large
    /// (at most `limit`), and the step's graph is recorded again for it.
    fn ensure(&mut self, len: i64) {
        let (b, capacity) = self.valid.size2().unwrap();
        if len <= capacity {
            return;
        }
        let grown = self.limit.min((2 * capacity).max(len));
        tracing::debug!("generate: the KV cache grows from {capacity} to {grown} positions");
        CACHE_GROWTHS.with(|n| n.set(n.get() + 1));
        let cache = self.net.new_cache(b, grown);
        for ((k, v), (gk, gv)) in self.cache.layers.iter().zip(&cache.layers) {
            gk.narrow(2, 0, capacity).copy_(k);
            gv.narrow(2, 0, capacity).copy_(v);
        }
        let valid = Tensor::zeros([b, grown], (Kind::Bool, self.valid.device()));
        valid.narrow(1, 0, capacity).copy_(&self.valid);
        self.cache = KvCache { at: self.cache.at.take(), ..cache };
        self.valid = valid;
        if !matches!(self.graph, Graph::Off) {
            self.graph = Graph::Pending;
        }
    }

    /// [`Decoding::prompts`] again, over every token so far `ids` `[B, len]` (the last one new).
    fn restart(&mut self, ids: &Tensor, ragged: bool) -> Result<Tensor> {
        let len = ids.size()[1];
        self.ensure(len);
        let _ = self.valid.narrow(1, len - 1, 1).fill_(1);
        self.prompts(ids, ragged)
    }

    /// The next-token logits `[B, V]` after the prompts `ids` `[B, T]` (left-padded when
    /// `ragged`), whose keys go to slots `0..T`.
    fn prompts(&mut self, ids: &Tensor, ragged: bool) -> Result<Tensor> {
        let t = ids.size()[1];
        let valid = self.valid.narrow(1, 0, t);
        let h = self.prefill(ids, &valid, ragged);
        Ok(self.last_logits(&h.narrow(1, t - 1, 1)))
    }

    /// The hidden states `[B, T, H]` of `ids` `[B, T]`, whose real tokens `valid` marks (each
    /// attends to the real ones before it; `ragged`: some are not real), their keys written to
    /// slots `0..T`; positions count real tokens only.
    fn prefill(&mut self, ids: &Tensor, valid: &Tensor, ragged: bool) -> Tensor {
        let positions = real_positions(valid);
        // without padding the causal mask serves (and costs no ops)
        let mask = if ragged { AttnMask::Padded(valid.shallow_clone()) } else { AttnMask::Causal };
        self.cache.at = None;
        let h = self.net.hidden(ids, &positions, &mask, Some(&self.cache), false);
        self.cache.at = Some(self.slot.shallow_clone());
        h
    }

    /// The next-token logits `[B, V]` of one position's hidden states `h` `[B, 1, H]` (only the
    /// row decoding needs goes through the head).
    fn last_logits(&self, h: &Tensor) -> Tensor {
        self.net.head(h, false).view([h.size()[0], -1])
    }

    /// The next-token logits `[B, V]` after one token a row, `next` `[B]` at `positions` `[B]`,
    /// its keys written to `slot`. A replayed graph's logits are rewritten by the next step.
    fn step(&mut self, next: &Tensor, positions: &Tensor, slot: i64) -> Result<Tensor> {
        self.ensure(slot + 1);
        let b = next.size()[0];
        self.ids.copy_(&next.view([b, 1]));
        self.positions.copy_(&positions.view([b, 1]));
        let _ = self.slot.fill_(slot);
        match std::mem::replace(&mut self.graph, Graph::Off) {
            Graph::Recorded(graph, logits) => {
                graph.replay()?;
                GRAPH_REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let out = logits.shallow_clone();
                self.graph = Graph::Recorded(graph, logits);
                Ok(out)
            }
            Graph::Pending => {
                let this = &*self;
                let (logits, recorded) = crate::cuda::graph::CudaGraph::record(self.net.device, || crate::script::options::catch_panic(|| Ok(this.forward())))?;
                match recorded {
                    Ok((graph, out)) => self.graph = Graph::Recorded(graph, out),
                    Err(e) => {
                        // said once a process (an evaluation generates batch after batch)
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| tracing::warn!("generate: decoding op by op (the step could not be recorded as a CUDA graph: {e:#})"));
                    }
                }
                Ok(logits)
            }
            Graph::Off => Ok(self.forward()),
        }
    }

    /// The step itself, on the buffers: marks the slot valid, writes the keys there and
    /// attends to every valid slot. On a GPU the decoder's layers and head run their fused
    /// kernels (RMSNorm with the residual add, RoPE, SwiGLU, attention over the cache: a few
    /// kernels a layer where the op path launches dozens).
    fn forward(&self) -> Tensor {
        let (net, b) = (self.net, self.ids.size()[0]);
        let _ = self.valid.shallow_clone().index_fill_(1, &self.slot, 1);
        let tables = match &self.tables {
            Some(tables) => {
                let at = |t: &Tensor| t.index_select(0, &self.positions.view([b])).view([b, 1, 1, -1]);
                tables.iter().map(|(cos, sin)| (at(cos), at(sin))).collect()
            }
            None => net.ropes.iter().map(|r| r.cos_sin(&self.positions, net.kind)).collect(),
        };
        let shared = LayerInputs::new(tables, &AttnMask::Padded(self.valid.shallow_clone()));
        let (h, _) = net.hidden_with(&self.ids, shared, Some(&self.cache), false);
        net.head(&h, false).view([b, -1])
    }
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
    let (h, routes) = net.hidden_routed(&input, &positions, &AttnMask::Causal, None, false);
    let loss = net.head_loss_sum(&h, &input) / (t - 1) as f64;
    // a sparse model adds its load-balancing loss, as transformers' does with `output_router_logits`
    let balance = net.balance_loss(&routes, net.model_aux_coef(), None).map_or(0.0, |b| b.double_value(&[]));
    Ok(loss.double_value(&[]) + balance)
}
