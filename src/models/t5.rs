//! T5 (`T5ForConditionalGeneration`) as transformers computes it: an encoder and a decoder of
//! pre-norm blocks with T5's RMS norm (`w · x / √(mean(x²) + ε)`, no mean, no bias, in fp32),
//! attention without the `1/√d` scale whose scores get a learned bias per relative-position
//! bucket (computed by each stack's first block, bidirectional in the encoder, causal in the
//! decoder, shared by the later blocks), cross-attention over the encoder's output, and a
//! feed-forward that is `wo(relu(wi x))` (T5 v1.0) or `wo(gelu_tanh(wi_0 x) · wi_1 x)` (v1.1,
//! Flan-T5, mT5: `feed_forward_proj: "gated-gelu"`). The head's input is scaled by
//! `d_model^-½` where the head is the embedding matrix (v1.0); v1.1's own `lm_head` is not scaled.
//! In fp16, as transformers keeps them (`_keep_in_fp32_modules`), the feed-forwards' `wo` stay
//! fp32, so the residual stream is fp32 from the first feed-forward on (T5 overflows in fp16
//! otherwise), and fp16 sums are clamped below its largest value; in bf16 every weight is bf16.
//! Norms cast their output to the weights' dtype. Attention is libtorch's scaled-dot-product
//! attention with the bias as its additive mask, as transformers 5 runs T5 (`sdpa`). Tensor names are transformers' (`encoder.block.0.layer.0.SelfAttention.q.weight`, ...).

use crate::nn::linear::{Linear, Weight};
use crate::nn::norm::RmsNorm;
use crate::nn::WeightSource;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// A serde mirror of T5's config.json.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: usize,
    pub num_decoder_layers: Option<usize>,
    pub num_heads: i64,
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: i64,
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: i64,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
    /// Whether the head is the embedding matrix (T5 v1.0, and every T5 transformers 5 saves).
    pub tie_word_embeddings: Option<bool>,
    /// transformers 5's name for "the head's input is scaled by `d_model^-½`" (v1.0).
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub decoder_start_token_id: i64,
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: i64,
    #[serde(default = "dropout")]
    pub dropout_rate: f64,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
}

fn buckets() -> i64 {
    32
}
fn max_distance() -> i64 {
    128
}
fn eps() -> f64 {
    1e-6
}
fn relu() -> String {
    "relu".into()
}
fn dropout() -> f64 {
    0.1
}

impl Config {
    /// T5's config.json, checked: sizes a model can have, a known feed-forward.
    pub fn from_json(json: &serde_json::Value) -> Result<Config> {
        let c: Config = crate::script::options::deserialize(json.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let size = |v: i64| usize::try_from(v).unwrap_or(usize::MAX);
        super::config::check_sizes(&[
            ("vocab_size", size(c.vocab_size), 1 << 24),
            ("d_model", size(c.d_model), 1 << 17),
            ("d_kv", size(c.d_kv), 1 << 14),
            ("d_ff", size(c.d_ff), 1 << 20),
            ("num_heads", size(c.num_heads), 1 << 12),
            ("num_layers", c.num_layers, 1 << 12),
            ("num_decoder_layers", c.num_decoder_layers.unwrap_or(0), 1 << 12),
            ("relative_attention_num_buckets", size(c.relative_attention_num_buckets), 1 << 12),
        ])?;
        if c.relative_attention_num_buckets < 4 || c.relative_attention_max_distance < c.relative_attention_num_buckets / 2 {
            bail!("relative_attention_num_buckets {} / relative_attention_max_distance {}: T5 needs at least 4 buckets and a distance of half of them", c.relative_attention_num_buckets, c.relative_attention_max_distance);
        }
        c.activation()?;
        Ok(c)
    }

    /// `(gated, activation)` from `feed_forward_proj` (`relu`, `gelu`, `gated-gelu`, `gated-silu`, ...).
    pub fn activation(&self) -> Result<(bool, &str)> {
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, self.feed_forward_proj.as_str()),
            Some(_) => bail!("feed_forward_proj `{}` is neither `ACT` nor `gated-ACT`", self.feed_forward_proj),
        };
        match act {
            "relu" | "gelu" | "silu" | "gelu_new" => Ok((gated, act)),
            other => bail!("feed_forward_proj: activation `{other}` is not supported (relu, gelu, silu)"),
        }
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// The ids generation stops at (`eos_token_id`, a number or a list).
    pub fn eos_ids(&self) -> Vec<i64> {
        crate::models::config::token_ids(&self.eos_token_id)
    }

    fn scaled_head(&self) -> bool {
        self.scale_decoder_outputs.unwrap_or(self.tie_word_embeddings != Some(false))
    }
}

/// The bucket of each relative position `key − query` (T5's `_relative_position_bucket`): half
/// the buckets for each sign when bidirectional, exact below `buckets / 2` (of the half), then
/// logarithmic up to `max_distance`, in fp32 as transformers computes it.
fn relative_buckets(relative: &Tensor, bidirectional: bool, buckets: i64, max_distance: i64) -> Tensor {
    let (mut buckets, mut out) = (buckets, relative.zeros_like());
    let distance = if bidirectional {
        buckets /= 2;
        out += relative.gt(0).to_kind(Kind::Int64) * buckets;
        relative.abs()
    } else {
        -relative.clamp_max(0)
    };
    let exact = buckets / 2;
    let small = distance.lt(exact);
    let log = (distance.to_kind(Kind::Float) / exact as f64).log() / ((max_distance as f64 / exact as f64).ln()) * (buckets - exact) as f64;
    let large = (log.to_kind(Kind::Int64) + exact).clamp_max(buckets - 1);
    out + distance.where_self(&small, &large)
}

/// Attention with T5's unscaled scores; `bias` is the relative-position table `[buckets, heads]`
/// (only in a stack's first block).
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    bias: Option<Tensor>,
}

impl Attention {
    /// `x`'s queries, keys and values, split into heads `[B, H, T, D]`.
    fn qkv(&self, x: &Tensor, heads: i64, train: bool) -> (Tensor, Tensor, Tensor) {
        (self.heads(&self.q.forward(x, train), heads), self.heads(&self.k.forward(x, train), heads), self.heads(&self.v.forward(x, train), heads))
    }

    fn heads(&self, x: &Tensor, heads: i64) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        x.view([b, t, heads, -1]).transpose(1, 2)
    }

    /// `softmax(q kᵀ + bias) v` projected by `o`; `k`, `v` already split into heads `[B, H, S, D]`.
    /// libtorch's scaled-dot-product attention with the bias (masks included) as its additive
    /// mask and scale 1, as transformers 5 runs T5 (its default `sdpa`).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, dropout: f64, train: bool) -> Tensor {
        let bias = bias.expand([q.size()[0], q.size()[1], q.size()[2], k.size()[2]], false);
        let y = Tensor::scaled_dot_product_attention(q, k, v, Some(bias), if train { dropout } else { 0.0 }, false, 1.0, false);
        let (b, h, t, d) = y.size4().unwrap();
        self.o.forward(&y.transpose(1, 2).contiguous().view([b, t, h * d]), train)
    }
}

/// The feed-forward: `wo(act(wi x))`, or gated `wo(act(wi_0 x) · wi_1 x)`.
struct FeedForward {
    wi: Vec<Linear>,
    wo: Linear,
    activation: String,
}

/// T5's norm: `w · x / √(mean(x²) + ε)` normalized in fp32, cast to the weight's dtype when that is
/// half precision, then scaled (the residual may be fp32 while the weights are not).
fn norm(n: &RmsNorm, x: &Tensor) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let y = xf * (var + n.eps).rsqrt();
    let y = if matches!(n.weight.kind(), Kind::Half | Kind::BFloat16) { y.to_kind(n.weight.kind()) } else { y };
    &n.weight * y
}

/// `(h + delta, norm(h + delta))` (the fp16 sum clamped). Training on a GPU in bf16 or fp32
/// ([`crate::nn::fused`]) the add and the norm are one kernel each way
/// ([`RmsNorm::forward_residual`], rounding once where transformers rounds twice); otherwise
/// T5's op sequence.
fn add_norm(n: &RmsNorm, h: &Tensor, delta: Option<&Tensor>, train: bool) -> (Tensor, Tensor) {
    if crate::nn::fused(h, train) && h.kind() != Kind::Half && h.kind() == n.weight.kind() {
        return n.forward_residual(h, delta, train);
    }
    let h = match delta {
        Some(d) => clamp_fp16(h + d),
        None => h.shallow_clone(),
    };
    let x = norm(n, &h);
    (h, x)
}

/// transformers' `gelu_new`, `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, op by op as it computes
/// it (in half precision each op rounds, unlike libtorch's fused tanh-GELU).
fn gelu_new(x: &Tensor) -> Tensor {
    let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    (x * 0.5) * (inner.tanh() + 1.0)
}

/// An fp16 residual kept finite as transformers keeps it: clamped to ±(max − 1000) when it
/// holds an infinity, else to ±max.
fn clamp_fp16(h: Tensor) -> Tensor {
    if h.kind() != Kind::Half {
        return h;
    }
    let max = if h.isinf().any().int64_value(&[]) != 0 { 65504.0 - 1000.0 } else { 65504.0 };
    h.clamp(-max, max)
}

impl FeedForward {
    fn forward(&self, x: &Tensor, dropout: f64, train: bool) -> Tensor {
        let act = |t: Tensor| match self.activation.as_str() {
            "relu" => t.relu(),
            "silu" => t.silu(),
            "gelu" if self.wi.len() == 1 => t.gelu("none"),
            // `gated-gelu` is transformers' gelu_new: training on a GPU, libtorch's one-kernel
            // tanh-GELU (the same function, rounded once)
            _ if crate::nn::fused(&t, train) => t.gelu("tanh"),
            _ => gelu_new(&t),
        };
        let h = match self.wi.as_slice() {
            [wi] => act(wi.forward(x, train)),
            [wi_0, wi_1] => act(wi_0.forward(x, train)) * wi_1.forward(x, train),
            _ => unreachable!("one or two input projections"),
        };
        // `wo` is fp32 in an fp16 model
        self.wo.forward(&h.dropout(dropout, train).to_kind(self.wo.weight.kind()), train)
    }
}

/// One block: self-attention, cross-attention (decoder only), feed-forward, each pre-normed
/// and added to the residual.
struct Block {
    attn: Attention,
    attn_norm: RmsNorm,
    cross: Option<(Attention, RmsNorm)>,
    ff: FeedForward,
    ff_norm: RmsNorm,
}

/// An encoder or decoder stack.
struct Stack {
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    decoder: bool,
}

/// The decoder's cache for generation: per block, its self-attention keys and values so far,
/// and the cross-attention's keys and values of the encoder output (computed once).
pub struct DecoderCache {
    layers: Vec<((Tensor, Tensor), (Tensor, Tensor))>,
    len: i64,
}

pub struct T5 {
    pub config: Config,
    pub shared: Tensor,
    encoder: Stack,
    decoder: Stack,
    /// v1.1's own head; `None`: the head is `shared`.
    pub lm_head: Option<Linear>,
    pub kind: Kind,
    pub device: Device,
}

impl T5 {
    /// A T5 model directory (config.json, safetensors) in `dtype` (`auto`: the checkpoint's).
    pub fn from_dir(dir: &std::path::Path, dtype: &str, device: Device) -> Result<T5> {
        let path = dir.join("config.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let config = Config::from_json(&json).with_context(|| path.display().to_string())?;
        let kind = super::parse_dtype(dtype, config.torch_dtype.as_deref().or(config.dtype.as_deref()))?;
        T5::load(config, &WeightSource::open_dir(dir)?, kind, device)
    }

    /// The model's weights from `weights` in `kind` on `device` (transformers' names).
    pub fn load(config: Config, weights: &WeightSource, kind: Kind, device: Device) -> Result<T5> {
        let (d, inner, ff) = (config.d_model, config.num_heads * config.d_kv, config.d_ff);
        let (gated, activation) = config.activation()?;
        let dense_in = |name: String, shape: [i64; 2], kind: Kind| -> Result<Linear> {
            let w = weights.load(&format!("{name}.weight"), &shape, kind, device)?;
            Ok(Linear { name, weight: Weight::Dense(w), bias: None, adapter: None })
        };
        let dense = |name: String, shape: [i64; 2]| dense_in(name, shape, kind);
        let norm = |name: String| -> Result<RmsNorm> {
            let weight = weights.load(&format!("{name}.weight"), &[d], kind, device)?;
            Ok(RmsNorm { name, weight, eps: config.layer_norm_epsilon, unit_offset: false })
        };
        let attention = |p: String, first: bool| -> Result<Attention> {
            let bias = match first {
                true => Some(weights.load(&format!("{p}.relative_attention_bias.weight"), &[config.relative_attention_num_buckets, config.num_heads], kind, device)?),
                false => None,
            };
            Ok(Attention { q: dense(format!("{p}.q"), [inner, d])?, k: dense(format!("{p}.k"), [inner, d])?, v: dense(format!("{p}.v"), [inner, d])?, o: dense(format!("{p}.o"), [d, inner])?, bias })
        };
        let stack = |prefix: &str, layers: usize, decoder: bool| -> Result<Stack> {
            let mut blocks = vec![];
            for i in 0..layers {
                let p = format!("{prefix}.block.{i}.layer");
                let ffl = if decoder { 2 } else { 1 };
                let fp = format!("{p}.{ffl}.DenseReluDense");
                let wi = if gated { vec![dense(format!("{fp}.wi_0"), [ff, d])?, dense(format!("{fp}.wi_1"), [ff, d])?] } else { vec![dense(format!("{fp}.wi"), [ff, d])?] };
                blocks.push(Block {
                    attn: attention(format!("{p}.0.SelfAttention"), i == 0)?,
                    attn_norm: norm(format!("{p}.0.layer_norm"))?,
                    cross: if decoder { Some((attention(format!("{p}.1.EncDecAttention"), false)?, norm(format!("{p}.1.layer_norm"))?)) } else { None },
                    ff: FeedForward { wi, wo: dense_in(format!("{fp}.wo"), [d, ff], if kind == Kind::Half { Kind::Float } else { kind })?, activation: activation.to_string() },
                    ff_norm: norm(format!("{p}.{ffl}.layer_norm"))?,
                });
            }
            Ok(Stack { blocks, final_norm: norm(format!("{prefix}.final_layer_norm"))?, decoder })
        };
        let shared = weights.load("shared.weight", &[config.vocab_size, d], kind, device)?;
        let lm_head = match config.tie_word_embeddings {
            Some(false) => Some(dense("lm_head".into(), [config.vocab_size, d]).context("an untied T5 (tie_word_embeddings: false) needs lm_head.weight")?),
            _ => None,
        };
        let encoder = stack("encoder", config.num_layers, false)?;
        let decoder = stack("decoder", config.decoder_layers(), true)?;
        Ok(T5 { config, shared, encoder, decoder, lm_head, kind, device })
    }

    fn dropout(&self) -> f64 {
        self.config.dropout_rate
    }

    /// The relative-position bias `[1, H, Q, K]` of `queries` (their positions) against `keys`
    /// keys, from the stack's first block's table.
    fn position_bias(&self, stack: &Stack, queries: &Tensor, keys: i64) -> Tensor {
        let table = stack.blocks[0].attn.bias.as_ref().expect("a stack's first block holds the bias table");
        let memory = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0);
        let buckets = relative_buckets(&(memory - queries.unsqueeze(1)), !stack.decoder, self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance);
        Tensor::embedding(table, &buckets, -1, false, false).permute([2, 0, 1]).unsqueeze(0)
    }

    /// The additive mask `[B, 1, 1, K]` of a key padding mask `[B, K]` (1 = real): 0 or the
    /// lowest value of the dtype.
    fn padding_mask(&self, mask: &Tensor) -> Tensor {
        let low = lowest(self.kind);
        (mask.to_kind(self.kind) * -1.0 + 1.0).unsqueeze(1).unsqueeze(1) * low
    }

    /// The encoder's additive attention bias `[B, H, S, S]`: relative positions and key padding.
    fn encoder_bias(&self, mask: &Tensor) -> Tensor {
        let s = mask.size()[1];
        let positions = Tensor::arange(s, (Kind::Int64, self.device));
        self.position_bias(&self.encoder, &positions, s).to_kind(self.kind) + self.padding_mask(mask)
    }

    /// The decoder's self-attention bias `[1, H, T, start + T]` of queries at `start..start + t`:
    /// relative positions, causal.
    fn decoder_bias(&self, start: i64, t: i64) -> Tensor {
        let positions = Tensor::arange_start(start, start + t, (Kind::Int64, self.device));
        let keys = start + t;
        // causal: a query sees keys up to its own position
        let causal = Tensor::arange(keys, (Kind::Int64, self.device)).unsqueeze(0).gt_tensor(&positions.unsqueeze(1)).to_kind(self.kind) * lowest(self.kind);
        self.position_bias(&self.decoder, &positions, keys).to_kind(self.kind) + causal
    }

    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        Tensor::embedding(&self.shared, ids, -1, false, false).dropout(self.dropout(), train)
    }

    /// One encoder block: `h + attn(norm h)`, then `+ ff(norm h)`.
    fn encoder_block(&self, b: &Block, h: &Tensor, bias: &Tensor, train: bool) -> Tensor {
        let (_, x) = add_norm(&b.attn_norm, h, None, train);
        let (q, k, v) = b.attn.qkv(&x, self.config.num_heads, train);
        let attended = b.attn.attend(&q, &k, &v, bias, self.dropout(), train).dropout(self.dropout(), train);
        self.feed_forward(b, h, &attended, train)
    }

    /// `h + delta`, then the feed-forward block on it: `+ ff(norm(h + delta))`.
    fn feed_forward(&self, b: &Block, h: &Tensor, delta: &Tensor, train: bool) -> Tensor {
        let (h, x) = add_norm(&b.ff_norm, h, Some(delta), train);
        clamp_fp16(&h + b.ff.forward(&x, self.dropout(), train).dropout(self.dropout(), train))
    }

    /// A decoder block's cross-attention keys and values of `encoded`, split into heads.
    fn cross_kv(&self, b: &Block, encoded: &Tensor, train: bool) -> (Tensor, Tensor) {
        let (cross, _) = b.cross.as_ref().expect("decoder blocks cross-attend");
        let heads = self.config.num_heads;
        (cross.heads(&cross.k.forward(encoded, train), heads), cross.heads(&cross.v.forward(encoded, train), heads))
    }

    /// One decoder block: self-attention over the keys and values `joined` makes of the block's
    /// own (a cache prepends the earlier ones), cross-attention over `(ck, cv)`, feed-forward.
    #[allow(clippy::too_many_arguments)]
    fn decoder_block(&self, b: &Block, h: &Tensor, self_bias: &Tensor, cross_bias: &Tensor, (ck, cv): (&Tensor, &Tensor), joined: impl FnOnce(Tensor, Tensor) -> (Tensor, Tensor), train: bool) -> Tensor {
        let heads = self.config.num_heads;
        let (_, x) = add_norm(&b.attn_norm, h, None, train);
        let (q, k, v) = b.attn.qkv(&x, heads, train);
        let (k, v) = joined(k, v);
        let attended = b.attn.attend(&q, &k, &v, self_bias, self.dropout(), train).dropout(self.dropout(), train);
        let (cross, cross_norm) = b.cross.as_ref().expect("decoder blocks cross-attend");
        let (h, x) = add_norm(cross_norm, h, Some(&attended), train);
        let cq = cross.heads(&cross.q.forward(&x, train), heads);
        let attended = cross.attend(&cq, ck, cv, cross_bias, self.dropout(), train).dropout(self.dropout(), train);
        self.feed_forward(b, &h, &attended, train)
    }

    /// The encoder's output `[B, S, d]` for `ids` `[B, S]` with `mask` `[B, S]` (1 = real token).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let bias = self.encoder_bias(mask);
        let mut h = self.embed(ids, train);
        for b in &self.encoder.blocks {
            h = self.encoder_block(b, &h, &bias, train);
        }
        add_norm(&self.encoder.final_norm, &h, None, train).1.dropout(self.dropout(), train)
    }

    /// The decoder's hidden states `[B, T, d]` for `ids` `[B, T]` at positions `start..`, attending
    /// to `encoded` `[B, S, d]` (`enc_mask` `[B, S]`); with `cache`, the new keys and values are
    /// appended to it (and the cross-attention's are taken from it).
    pub fn decode(&self, ids: &Tensor, encoded: &Tensor, enc_mask: &Tensor, mut cache: Option<&mut DecoderCache>, train: bool) -> Tensor {
        let t = ids.size()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let self_bias = self.decoder_bias(start, t);
        let cross_bias = self.padding_mask(enc_mask);
        let mut h = self.embed(ids, train);
        for (l, b) in self.decoder.blocks.iter().enumerate() {
            let cached = cache.as_deref().and_then(|c| c.layers.get(l)).map(|(_, (ck, cv))| (ck.shallow_clone(), cv.shallow_clone()));
            let (ck, cv) = cached.unwrap_or_else(|| self.cross_kv(b, encoded, train));
            let joined = |k: Tensor, v: Tensor| match cache.as_deref_mut() {
                None => (k, v),
                Some(c) => match c.layers.get_mut(l) {
                    Some(((pk, pv), _)) => {
                        (*pk, *pv) = (Tensor::cat(&[&*pk, &k], 2), Tensor::cat(&[&*pv, &v], 2));
                        (pk.shallow_clone(), pv.shallow_clone())
                    }
                    None => {
                        c.layers.push(((k.shallow_clone(), v.shallow_clone()), (ck.shallow_clone(), cv.shallow_clone())));
                        (k, v)
                    }
                },
            };
            h = self.decoder_block(b, &h, &self_bias, &cross_bias, (&ck, &cv), joined, train);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        add_norm(&self.decoder.final_norm, &h, None, train).1.dropout(self.dropout(), train)
    }

    /// The training step of a micro-batch: the summed cross-entropy of `labels` (-100 ignored)
    /// given the sources `ids` (`mask` 1 = real), back-propagated scaled by `weight` into the
    /// adapters; returns the sum (detached, fp32). Dropout is drawn from `seed` (and `seed + 1 +
    /// block` inside each block). With `checkpointing`, only each block's input is kept and
    /// backward recomputes the block, the decoder's top down and then the encoder's, the
    /// gradient of the encoder's output gathered from every decoder block's cross-attention.
    pub fn loss_and_backward(&self, ids: &Tensor, mask: &Tensor, labels: &Tensor, weight: f64, checkpointing: bool, seed: i64) -> Result<Tensor> {
        let head_loss = |h: &Tensor| self.head_loss_backward(h, labels, weight);
        let (enc_bias, self_bias, cross_bias) = (self.encoder_bias(mask), self.decoder_bias(0, labels.size()[1]), self.padding_mask(mask));
        let (n_enc, n_dec) = (self.encoder.blocks.len() as i64, self.decoder.blocks.len() as i64);
        let enc_seed = |i: usize| seed + 1 + i as i64;
        let dec_seed = |l: usize| seed + 1 + n_enc + l as i64;
        let decoder_ids = self.shift_right(labels);
        let decoder_block = |l: usize, h: &Tensor, encoded: &Tensor| {
            let b = &self.decoder.blocks[l];
            let (ck, cv) = self.cross_kv(b, encoded, true);
            self.decoder_block(b, h, &self_bias, &cross_bias, (&ck, &cv), |k, v| (k, v), true)
        };
        if !checkpointing {
            tch::manual_seed(seed);
            let mut h = self.embed(ids, true);
            for (i, b) in self.encoder.blocks.iter().enumerate() {
                tch::manual_seed(enc_seed(i));
                h = self.encoder_block(b, &h, &enc_bias, true);
            }
            tch::manual_seed(seed + 1 + n_enc + n_dec);
            let encoded = add_norm(&self.encoder.final_norm, &h, None, true).1.dropout(self.dropout(), true);
            let mut h = self.embed(&decoder_ids, true);
            for l in 0..self.decoder.blocks.len() {
                tch::manual_seed(dec_seed(l));
                h = decoder_block(l, &h, &encoded);
            }
            tch::manual_seed(seed + 2 + n_enc + n_dec);
            return head_loss(&add_norm(&self.decoder.final_norm, &h, None, true).1.dropout(self.dropout(), true));
        }
        // forward without a graph, each block's input kept
        let (mut enc_inputs, mut dec_inputs) = (vec![], vec![]);
        let enc_top = crate::nn::no_grad(|| {
            tch::manual_seed(seed);
            let mut h = self.embed(ids, true);
            for (i, b) in self.encoder.blocks.iter().enumerate() {
                enc_inputs.push(h.shallow_clone());
                tch::manual_seed(enc_seed(i));
                h = self.encoder_block(b, &h, &enc_bias, true);
            }
            h
        });
        let enc_top = enc_top.detach().set_requires_grad(true);
        tch::manual_seed(seed + 1 + n_enc + n_dec);
        let encoded = add_norm(&self.encoder.final_norm, &enc_top, None, true).1.dropout(self.dropout(), true);
        let encoded_leaf = encoded.detach().set_requires_grad(true);
        let dec_top = crate::nn::no_grad(|| {
            let mut h = self.embed(&decoder_ids, true);
            for l in 0..self.decoder.blocks.len() {
                dec_inputs.push(h.shallow_clone());
                tch::manual_seed(dec_seed(l));
                h = decoder_block(l, &h, &encoded_leaf);
            }
            h
        });
        let top = dec_top.detach().set_requires_grad(true);
        tch::manual_seed(seed + 2 + n_enc + n_dec);
        let loss = head_loss(&add_norm(&self.decoder.final_norm, &top, None, true).1.dropout(self.dropout(), true))?;
        // each block recomputed with its graph and back-propagated, top down
        let mut grad = top.grad();
        for l in (0..dec_inputs.len()).rev() {
            let x = dec_inputs[l].detach().set_requires_grad(l > 0);
            tch::manual_seed(dec_seed(l));
            let out = decoder_block(l, &x, &encoded_leaf);
            crate::cuda::autograd::backward(&[(&out, &grad)])?;
            if l > 0 {
                grad = x.grad();
            }
        }
        let encoded_grad = encoded_leaf.grad();
        if encoded_grad.defined() {
            crate::cuda::autograd::backward(&[(&encoded, &encoded_grad)])?;
            let mut grad = enc_top.grad();
            for i in (0..enc_inputs.len()).rev() {
                let x = enc_inputs[i].detach().set_requires_grad(i > 0);
                tch::manual_seed(enc_seed(i));
                let out = self.encoder_block(&self.encoder.blocks[i], &x, &enc_bias, true);
                crate::cuda::autograd::backward(&[(&out, &grad)])?;
                if i > 0 {
                    grad = x.grad();
                }
            }
        }
        Ok(loss.detach())
    }

    /// The summed cross-entropy of `labels` (-100 ignored) over the logits of the decoder's last
    /// hidden states `h`, back-propagated scaled by `weight` into `h`'s graph; returns the sum
    /// (detached, fp32). A frozen head is a fused linear cross-entropy
    /// ([`crate::nn::loss::linear_cross_entropy_backward`]: chunks of logits, their softmax and
    /// gradient formed in place, no full-vocabulary logits kept); a trained one (LoRA on
    /// `lm_head`) goes through autograd.
    fn head_loss_backward(&self, h: &Tensor, labels: &Tensor, weight: f64) -> Result<Tensor> {
        let d = self.config.d_model;
        let frozen = match &self.lm_head {
            Some(head) if head.adapter.is_none() => Some(head.weight.dense()),
            Some(_) => None,
            None => Some(self.shared.shallow_clone()),
        };
        match frozen {
            Some(w) => {
                crate::nn::loss::linear_cross_entropy_backward(&self.head_input(h).reshape([-1, d]), &w, None, &labels.reshape([-1]), weight, None, None, None)
            }
            None => {
                let logits = self.head(h, true);
                let loss = logits.view([-1, logits.size()[2]]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&labels.view([-1]), None, tch::Reduction::Sum, -100, 0.0);
                crate::cuda::autograd::backward(&[(&loss, &Tensor::from(weight as f32).to_device(loss.device()))])?;
                Ok(loss.detach())
            }
        }
    }

    /// Logits `[B, T, V]` of decoder hidden states (scaled by `d_model^-½` first for T5 v1.0).
    pub fn head(&self, h: &Tensor, train: bool) -> Tensor {
        let h = self.head_input(h);
        match &self.lm_head {
            Some(head) => head.forward(&h, train),
            None => h.matmul(&self.shared.tr()),
        }
    }

    /// The output projection's input: `h`, scaled by `d_model^-½` for T5 v1.0 (tied embeddings).
    fn head_input(&self, h: &Tensor) -> Tensor {
        if self.config.scaled_head() { h * (self.config.d_model as f64).powf(-0.5) } else { h.shallow_clone() }
    }

    /// `labels` `[B, T]` shifted right behind `decoder_start_token_id`, -100 read as padding:
    /// the decoder's input when training on them.
    pub fn shift_right(&self, labels: &Tensor) -> Tensor {
        let b = labels.size()[0];
        let start = Tensor::full([b, 1], self.config.decoder_start_token_id, (Kind::Int64, labels.device()));
        let body = labels.narrow(1, 0, labels.size()[1] - 1);
        let body = body.masked_fill(&body.eq(-100), self.config.pad_token_id);
        Tensor::cat(&[start, body], 1)
    }

    /// Logits `[B, T, V]` of `labels`' positions given the sources `ids` (`mask` 1 = real).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, labels: &Tensor, train: bool) -> Tensor {
        let encoded = self.encode(ids, mask, train);
        self.head(&self.decode(&self.shift_right(labels), &encoded, mask, None, train), train)
    }

    /// Mean cross-entropy over the label tokens (-100 ignored), as transformers' `loss`.
    pub fn loss(&self, ids: &Tensor, mask: &Tensor, labels: &Tensor, train: bool) -> Tensor {
        let logits = self.forward(ids, mask, labels, train);
        let v = logits.size()[2];
        logits.view([-1, v]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&labels.view([-1]), None, tch::Reduction::Mean, -100, 0.0)
    }

    /// Greedy or sampled decoding of `sources` in one batch, as transformers' `generate` does it
    /// for an encoder-decoder: the sources right-padded with `pad_token_id` (masked from the
    /// encoder and the cross-attention), the encoder run once; the decoder step by step from
    /// `decoder_start_token_id` with its cache, a finished row fed `pad_token_id`, until every
    /// row met an id of `stops` (left out) or `max_new_tokens`. Repetition penalties see the
    /// decoder's ids (the start token and what was generated), not the source, as transformers'
    /// logits processors do. Returns each row's new ids.
    pub fn generate(&self, sources: &[Vec<i64>], s: &crate::generate::Sampling, stops: &[i64]) -> Result<Vec<Vec<i64>>> {
        let _guard = tch::no_grad_guard();
        anyhow::ensure!(sources.iter().all(|ids| !ids.is_empty()), "generate: a source has no tokens");
        let (b, len) = (sources.len() as i64, sources.iter().map(Vec::len).max().unwrap_or(0));
        let pad = self.config.pad_token_id;
        let padded: Vec<i64> = sources.iter().flat_map(|ids| ids.iter().copied().chain(std::iter::repeat_n(pad, len - ids.len()))).collect();
        let real: Vec<i64> = sources.iter().flat_map(|ids| std::iter::repeat_n(1, ids.len()).chain(std::iter::repeat_n(0, len - ids.len()))).collect();
        let src = Tensor::from_slice(&padded).view([b, len as i64]).to_device(self.device);
        let mask = Tensor::from_slice(&real).view([b, len as i64]).to_device(self.device);
        let encoded = self.encode(&src, &mask, false);
        let mut cache = DecoderCache { layers: vec![], len: 0 };
        let mut next = Tensor::full([b, 1], self.config.decoder_start_token_id, (Kind::Int64, self.device));
        let mut seen = next.shallow_clone();
        let mut out = vec![vec![]; sources.len()];
        let mut done = vec![false; sources.len()];
        if s.temperature > 0.0 {
            tch::manual_seed(s.seed as i64);
        }
        for _ in 0..s.max_new_tokens {
            let h = self.decode(&next, &encoded, &mask, Some(&mut cache), false);
            let logits = crate::generate::process_logits(&self.head(&h, false).view([b, -1]), &seen, s);
            let ids = if s.temperature > 0.0 { logits.softmax(-1, Kind::Float).multinomial(1, false) } else { logits.argmax(-1, false) }.view([b]);
            let mut fed = Vec::<i64>::try_from(&ids)?;
            for (r, id) in fed.iter_mut().enumerate() {
                if !done[r] && stops.contains(id) {
                    done[r] = true;
                } else if !done[r] {
                    out[r].push(*id);
                }
                if done[r] {
                    *id = pad;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            next = Tensor::from_slice(&fed).view([b, 1]).to_device(self.device);
            seen = Tensor::cat(&[&seen, &next], 1);
        }
        Ok(out)
    }

    /// Every linear layer, mutably (for adapters), in [`T5::linears`]' order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![];
        for stack in [&mut self.encoder, &mut self.decoder] {
            for b in &mut stack.blocks {
                v.extend([&mut b.attn.q, &mut b.attn.k, &mut b.attn.v, &mut b.attn.o]);
                if let Some((c, _)) = &mut b.cross {
                    v.extend([&mut c.q, &mut c.k, &mut c.v, &mut c.o]);
                }
                v.extend(b.ff.wi.iter_mut());
                v.push(&mut b.ff.wo);
            }
        }
        v.extend(self.lm_head.iter_mut());
        v
    }

    /// Every linear layer, in checkpoint order (encoder, decoder, head).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![];
        for stack in [&self.encoder, &self.decoder] {
            for b in &stack.blocks {
                v.extend([&b.attn.q, &b.attn.k, &b.attn.v, &b.attn.o]);
                if let Some((c, _)) = &b.cross {
                    v.extend([&c.q, &c.k, &c.v, &c.o]);
                }
                v.extend(b.ff.wi.iter());
                v.push(&b.ff.wo);
            }
        }
        v.extend(self.lm_head.iter());
        v
    }
}

/// The lowest finite value of `kind` (transformers' additive mask).
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

impl crate::nn::peft::Adapted for T5 {
    fn linears(&self) -> Vec<&Linear> {
        T5::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        T5::linears_mut(self)
    }
    fn blocks(&self) -> usize {
        self.config.num_layers + self.config.decoder_layers()
    }
    fn task_type(&self) -> &'static str {
        "SEQ_2_SEQ_LM"
    }
}

impl crate::train::trainer::TrainModel for T5 {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn devices(&self) -> Vec<Device> {
        vec![self.device]
    }
    fn head_device(&self) -> Device {
        self.device
    }
    /// `row_len` counts source and target tokens together. Per token and block a T5 keeps about
    /// `12·d + 3·d_ff` values (norms, q/k/v, attention outputs, residuals, the feed-forward's
    /// inputs and activations; a decoder block's cross-attention about as many again, counted
    /// by treating every token as passing two blocks' worth) plus its `[heads, T, T]` scores
    /// and their softmax, which the position bias keeps off the fused attention kernels.
    /// Checkpointed, each block's input (`d`) and one block's activations; no offloading.
    fn activation_needs(&self, rows: u64, row_len: u64) -> crate::train::memory::Needs {
        let c = &self.config;
        let blocks = (c.num_layers + 2 * c.decoder_layers()) as u64;
        let elt = self.kind.elt_size_in_bytes() as u64;
        let block = rows * row_len * (12 * c.d_model as u64 + 3 * c.d_ff as u64) * elt + 2 * rows * c.num_heads as u64 * row_len * row_len * elt;
        let input = rows * row_len * c.d_model as u64 * elt;
        crate::train::memory::Needs { off: blocks * block, on: blocks * input + block, offload: None, per_layer: None }
    }
    fn set_dtype(&mut self, kind: Kind) {
        T5::set_dtype(self, kind)
    }
}

impl T5 {
    /// Casts the frozen weights to `kind` (in fp16 the feed-forwards' `wo` stay fp32, as
    /// transformers keeps them); adapters are left as they are.
    pub fn set_dtype(&mut self, kind: Kind) {
        let _g = tch::no_grad_guard();
        self.shared = self.shared.to_kind(kind);
        for stack in [&mut self.encoder, &mut self.decoder] {
            stack.final_norm.weight = stack.final_norm.weight.to_kind(kind);
            for b in &mut stack.blocks {
                for n in [&mut b.attn_norm, &mut b.ff_norm].into_iter().chain(b.cross.as_mut().map(|(_, n)| n)) {
                    n.weight = n.weight.to_kind(kind);
                }
                if let Some(t) = &mut b.attn.bias {
                    *t = t.to_kind(kind);
                }
            }
        }
        let wo_kind = if kind == Kind::Half { Kind::Float } else { kind };
        let names: Vec<bool> = self.linears().iter().map(|l| l.name.ends_with(".wo")).collect();
        for (lin, is_wo) in self.linears_mut().into_iter().zip(names) {
            lin.weight = Weight::Dense(lin.weight.dense().to_kind(if is_wo { wo_kind } else { kind }));
        }
        self.kind = kind;
    }

    /// Parameters of the base model (the embedding counted once).
    pub fn num_params(&self) -> i64 {
        let linears: i64 = self.linears().iter().map(|l| l.out_features() * l.in_features()).sum();
        let norms = (self.config.num_layers * 2 + self.config.decoder_layers() * 3 + 2) as i64 * self.config.d_model;
        let biases = 2 * self.config.relative_attention_num_buckets * self.config.num_heads;
        self.shared.numel() as i64 + linears + norms + biases
    }
}

impl T5 {
    /// Every tensor of the model by transformers' name (the linear layers' adapters folded
    /// in), in `kind` on the CPU, each made when its shard is written: what `save_merged` writes.
    pub(crate) fn merged_tensors(&self, kind: Kind) -> Vec<super::save::LazyTensor<'_>> {
        let shape = |t: &Tensor| t.size().into_iter().map(|d| d as usize).collect::<Vec<_>>();
        let plain = |name: String, t: &Tensor| -> super::save::LazyTensor<'_> {
            let t = t.shallow_clone();
            (name, shape(&t), Box::new(move || t.detach().to_kind(kind).to_device(Device::Cpu)))
        };
        let mut v = vec![plain("shared.weight".into(), &self.shared)];
        for stack in [&self.encoder, &self.decoder] {
            for b in &stack.blocks {
                if let Some(table) = &b.attn.bias {
                    let prefix = b.attn.q.name.trim_end_matches(".q");
                    v.push(plain(format!("{prefix}.relative_attention_bias.weight"), table));
                }
                for n in [&b.attn_norm, &b.ff_norm].into_iter().chain(b.cross.as_ref().map(|(_, n)| n)) {
                    v.push(plain(format!("{}.weight", n.name), &n.weight));
                }
            }
            v.push(plain(format!("{}.weight", stack.final_norm.name), &stack.final_norm.weight));
        }
        for lin in self.linears() {
            v.push((format!("{}.weight", lin.name), shape(&lin.weight.dense()), Box::new(move || super::save::merged_weight(lin, kind))));
        }
        v
    }
}
