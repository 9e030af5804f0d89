//! The Llama family decoder (Llama 1/2/3, Mistral, Qwen2), mirroring transformers'
//! `modeling_llama.py` op for op so logits match:
//!
//! ```text
//! h = embed(ids)
//! for each layer:  h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))))
//!                  h = h + down(silu(gate(n2(h))) * up(n2(h)))
//! logits = lm_head(norm(h))          (lm_head = embedᵀ when embeddings are tied)
//! ```
//! `n(x) = w · x / √(mean(x²) + ε)` computed in fp32 (RMSNorm); attention is
//! `softmax(q kᵀ / √d + mask) v` through libtorch's `scaled_dot_product_attention`, with
//! grouped-query attention (k/v heads shared by `heads / kv_heads` query heads).

use super::config::{LlamaConfig, RopeScaling};
use super::placement::Placement;
use crate::nn::linear::Weight;
use crate::nn::quant::QuantConfig;
use crate::nn::{Linear, WeightSource};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// RMSNorm as transformers computes it: normalise in fp32, cast back, then scale. When training
/// on a GPU it is one kernel each way (ftscript's `add_rms_norm`, or libtorch's
/// `_fused_rms_norm` where that cannot run) instead of ~8 elementwise kernels, scaling before
/// the cast (one rounding instead of two; the fp32 sum may round differently in the last bit);
/// inference and evaluation use transformers' exact op sequence.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_residual(x, None, train).1
    }

    /// The residual add before the norm, `(h + delta, norm(h + delta))` (`(h, norm(h))` without
    /// `delta`). Training on a GPU, the add is part of the norm's kernel each way (and backward
    /// adds the norm's input gradient to the residual's); otherwise the add, then the norm.
    pub fn forward_residual(&self, h: &Tensor, delta: Option<&Tensor>, train: bool) -> (Tensor, Tensor) {
        let fused = fused(h, train);
        if fused {
            if let Some(r) = crate::cuda::autograd::add_rms_norm(h, delta, &self.weight, self.eps) {
                return r;
            }
        }
        let sum = match delta {
            Some(d) => h + d,
            None => h.shallow_clone(),
        };
        if fused {
            let width = self.weight.size()[0];
            let normed = sum.internal_fused_rms_norm([width].as_slice(), Some(&self.weight), self.eps).0;
            return (sum, normed);
        }
        // transformers' op sequence
        let kind = sum.kind();
        let xf = sum.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(kind);
        (sum, normed)
    }
}

/// Rotary position embedding: frequencies `θ^(-2i/d)`, rescaled per `rope_scaling`.
pub struct Rope {
    head_dim: i64,
    theta: f64,
    scaling: RopeScaling,
}

impl Rope {
    /// `1 / θ^(2i/d)` for `i < d/2`, computed in fp32 like transformers.
    fn base_inv_freq(&self, theta: f64) -> Tensor {
        let d = self.head_dim;
        let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
        Tensor::pow_scalar(theta, &exps).reciprocal()
    }

    /// Inverse frequencies for a sequence whose largest position is `max_pos`.
    pub fn inv_freq(&self, max_pos: i64) -> Tensor {
        match &self.scaling {
            RopeScaling::Default => self.base_inv_freq(self.theta),
            RopeScaling::Linear { factor } => self.base_inv_freq(self.theta) / *factor,
            RopeScaling::Dynamic { factor, original_max_position_embeddings } => {
                let len = (max_pos + 1).max(*original_max_position_embeddings as i64) as f64;
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((factor * len / *original_max_position_embeddings as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                self.base_inv_freq(base)
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let inv = self.base_inv_freq(self.theta);
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled = (&inv / *factor).where_self(&wavelen.gt(low_wavelen), &inv);
                let smooth = ((wavelen.reciprocal() * old) - *low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / *factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
        }
    }

    /// `(cos, sin)` of shape `[B, 1, T, d]` for positions `[B, T]`, in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let max_pos = if matches!(self.scaling, RopeScaling::Dynamic { .. }) {
            positions.max().int64_value(&[])
        } else {
            0
        };
        let inv = crate::cuda::upload(&self.inv_freq(max_pos), positions.device());
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind).unsqueeze(1), emb.sin().to_kind(kind).unsqueeze(1))
    }
}

/// Whether to use the fused training kernels: while training on a GPU. SwiGLU and RoPE
/// (`crate::cuda::autograd`) round exactly like transformers' ops; RMSNorm rounds once where
/// transformers rounds twice ([`RmsNorm`]). Inference and evaluation keep transformers' exact
/// op sequence.
fn fused(x: &Tensor, train: bool) -> bool {
    train && x.device().is_cuda()
}

/// Projected queries or keys `[B, T, heads·d]` → rotated `[B, heads, T, d]`:
/// `x·cos + rotate_half(x)·sin`, where `rotate_half([a, b]) = [-b, a]` over the last dim.
fn rotate(y: Tensor, heads: i64, head_dim: i64, (cos, sin): &(Tensor, Tensor), train: bool) -> Tensor {
    let (b, t, _) = y.size3().unwrap();
    let y = y.view([b, t, heads, head_dim]);
    if fused(&y, train) {
        if let Some(r) = crate::cuda::autograd::rope(&y, &cos.squeeze_dim(1), &sin.squeeze_dim(1)) {
            return r.transpose(1, 2);
        }
    }
    let x = y.transpose(1, 2);
    let x1 = x.narrow(3, 0, head_dim / 2);
    let x2 = x.narrow(3, head_dim / 2, head_dim / 2);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    &x * cos + rotated * sin
}

/// Which keys each query may attend to.
pub enum AttnMask {
    /// Causal over the whole row (right padding needs nothing more: labels mask the pads).
    Causal,
    /// Causal within segments: `[B, T]` ids; several packed examples share a row.
    Segments(Tensor),
}

impl AttnMask {
    pub fn to_device(&self, d: Device) -> AttnMask {
        match self {
            AttnMask::Causal => AttnMask::Causal,
            AttnMask::Segments(s) => AttnMask::Segments(s.to_device(d)),
        }
    }
}

/// What every layer of one forward shares (rotary cos/sin, the attention mask), with a copy
/// on each device of a model split across GPUs.
pub struct LayerInputs {
    copies: Vec<(Device, (Tensor, Tensor), AttnMask)>,
}

impl LayerInputs {
    pub fn new(cos_sin: (Tensor, Tensor), mask: &AttnMask) -> LayerInputs {
        let d = cos_sin.0.device();
        LayerInputs { copies: vec![(d, cos_sin, mask.to_device(d))] }
    }

    /// The shared inputs on `d`, copied there on first use.
    fn on(&mut self, d: Device) -> (&(Tensor, Tensor), &AttnMask) {
        let i = match self.copies.iter().position(|c| c.0 == d) {
            Some(i) => i,
            None => {
                let (_, (cos, sin), mask) = &self.copies[0];
                let copy = (d, (cos.to_device(d), sin.to_device(d)), mask.to_device(d));
                self.copies.push(copy);
                self.copies.len() - 1
            }
        };
        let (_, cs, m) = &self.copies[i];
        (cs, m)
    }
}

/// Keys and values seen so far, per layer, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.size()[2]).unwrap_or(0)
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
}

impl Attention {
    /// The attention heads' output `[B, T, heads·d]`, before `o_proj`.
    fn heads(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x, train).try_into().unwrap();
        let q = rotate(q, self.n_heads, self.head_dim, cos_sin, train);
        let mut k = rotate(k, self.n_kv_heads, self.head_dim, cos_sin, train);
        let mut v = v.view([b, t, self.n_kv_heads, self.head_dim]).transpose(1, 2);
        let mut past = 0;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                past = pk.size()[2];
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let kv_len = past + t;
        let window = self.sliding_window.filter(|w| *w < kv_len);
        let explicit: Option<Tensor> = match mask {
            AttnMask::Segments(seg) => {
                // allowed(i, j) = j ≤ i and seg[i] == seg[j]
                let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
                let causal = Tensor::ones([t, t], (Kind::Bool, x.device())).tril(0);
                let mut m = same.logical_and(&causal);
                if let Some(w) = window {
                    m = m.logical_and(&Tensor::ones([t, t], (Kind::Bool, x.device())).triu(-(w - 1)));
                }
                Some(m.unsqueeze(1))
            }
            AttnMask::Causal if past == 0 && window.is_none() => None,
            AttnMask::Causal if t == 1 && window.is_none() => None,
            AttnMask::Causal => {
                // query i sits at position past+i: allowed(i, j) = j ≤ past+i (and past+i−j < w)
                let qpos = Tensor::arange_start(past, kv_len, (Kind::Int64, x.device())).unsqueeze(1);
                let kpos = Tensor::arange(kv_len, (Kind::Int64, x.device())).unsqueeze(0);
                let mut m = kpos.le_tensor(&qpos);
                if let Some(w) = window {
                    m = m.logical_and(&(&qpos - &kpos).lt(w));
                }
                Some(m)
            }
        };
        let is_causal = explicit.is_none() && t > 1;
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            explicit.as_ref(),
            0.0,
            is_causal,
            None,
            self.n_kv_heads != self.n_heads,
        );
        y.transpose(1, 2).contiguous().view([b, t, self.n_heads * self.head_dim])
    }
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `silu(gate) · up` from the gate and up projections: the input of `down_proj`.
    pub fn swiglu(gate: &Tensor, up: &Tensor, train: bool) -> Tensor {
        if fused(gate, train) {
            if let Some(m) = crate::cuda::autograd::swiglu(gate, up) {
                return m;
            }
        }
        gate.silu() * up
    }

    /// `(∂L/∂gate, ∂L/∂up)` of [`Mlp::swiglu`] from `∂L/∂m`, without a graph:
    /// `∂up = ∂m · silu(gate)`, `∂gate = ∂m · up · σ(gate)(1 + gate(1 − σ(gate)))`. On a GPU they
    /// are written over `gate` and `up` (whose memory is returned), elsewhere into new tensors.
    pub fn swiglu_grads(dm: &Tensor, gate: Tensor, up: Tensor) -> (Tensor, Tensor) {
        let _g = tch::no_grad_guard();
        if crate::cuda::autograd::swiglu_backward_in_place(dm, &gate, &up) {
            return (gate, up);
        }
        (gate.silu_backward(&(dm * &up)), dm * gate.silu())
    }

    /// `down(silu(gate(x)) · up(x))`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let [gate, up]: [Tensor; 2] = Linear::forward_shared(&[&self.gate_proj, &self.up_proj], x, train).try_into().unwrap();
        self.down_proj.forward(&Mlp::swiglu(&gate, &up, train), train)
    }

    /// Backward through the MLP from `∂L/∂y` at its output `dy`, recomputing what it needs from
    /// its input `x` (which has a graph), for checkpointed training: the roots to hand to
    /// autograd, `(x, ∂L/∂x through the frozen weights)` and one `(adapter output, gradient)` per
    /// adapter. The frozen projections run without a graph and their input gradients are formed
    /// directly (`∂x = ∂gate·W_gate + ∂up·W_up`, `∂m = dy·W_down`), the output `down(m)` is never
    /// computed, and with no adapter on gate/up the `[B, T, I]` tensors are freed before the
    /// rest of backward. Dropout draws in the order of the forward (gate, up, down).
    pub fn recompute_backward(&self, x: &Tensor, dy: &Tensor) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
        let x2 = x.reshape([-1, self.gate_proj.in_features()]);
        let dy2 = dy.reshape([-1, self.down_proj.out_features()]);
        if [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|p| p.lora.is_none()) {
            return Ok(vec![(x2.shallow_clone(), self.frozen_input_grad(&x2, &dy2))]);
        }
        let project = |p: &Linear| {
            let base = tch::no_grad(|| x2.linear(&p.weight.for_input(x2.kind()), p.bias.as_ref()));
            match &p.lora {
                Some(l) => l.add_to(base, &x2, true),
                None => base,
            }
        };
        let (gate, up) = (project(&self.gate_proj), project(&self.up_proj));
        let mut dm = self.down_proj.base_input_grad(&dy2);
        if let Some(l) = &self.down_proj.lora {
            let m = tch::no_grad(|| Mlp::swiglu(&gate, &up, true)).set_requires_grad(true);
            let delta = l.delta(&m, true);
            crate::cuda::autograd::backward(&[(&delta, &dy2)])?;
            dm += m.grad();
        }
        let adapted = (self.gate_proj.lora.is_some(), self.up_proj.lora.is_some());
        let (dgate, dup) = Mlp::swiglu_grads(&dm, gate.shallow_clone(), up.shallow_clone());
        drop(dm);
        let dx = x2.empty_like();
        tch::no_grad(|| Mlp::gate_up_input_grad(&dgate, &dup, &self.gate_up_weights(x2.kind()), &dx));
        let mut roots = vec![(x2, dx)];
        if adapted.0 {
            roots.push((gate, dgate));
        }
        if adapted.1 {
            roots.push((up, dup));
        }
        Ok(roots)
    }

    /// `∂L/∂x` of an MLP without adapters, for rows `x2` `[N, H]` and `∂L/∂y` `dy2`, in
    /// `RECOMPUTE_ROW_BLOCKS` blocks of rows, so that only one block's `[rows, I]` tensors exist
    /// at a time.
    fn frozen_input_grad(&self, x2: &Tensor, dy2: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let w = self.gate_up_weights(x2.kind());
        let n = x2.size()[0];
        let rows = ((n + RECOMPUTE_ROW_BLOCKS - 1) / RECOMPUTE_ROW_BLOCKS).max(1);
        let dx = x2.empty_like();
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let xb = x2.narrow(0, start, len);
            let (gate, up) = (xb.linear(&w.0, self.gate_proj.bias.as_ref()), xb.linear(&w.1, self.up_proj.bias.as_ref()));
            let dm = self.down_proj.base_input_grad(&dy2.narrow(0, start, len));
            let (dgate, dup) = Mlp::swiglu_grads(&dm, gate, up);
            Mlp::gate_up_input_grad(&dgate, &dup, &w, &dx.narrow(0, start, len));
            start += len;
        }
        dx
    }

    /// The frozen gate and up weights for inputs of dtype `kind` (4-bit ones dequantized).
    fn gate_up_weights(&self, kind: Kind) -> (Tensor, Tensor) {
        (self.gate_proj.weight.for_input(kind), self.up_proj.weight.for_input(kind))
    }

    /// `out = ∂gate · W_gate + ∂up · W_up`, the input gradient through the frozen gate and up
    /// weights `(W_gate, W_up)`, written into `out` (no graph).
    fn gate_up_input_grad(dgate: &Tensor, dup: &Tensor, (wg, wu): &(Tensor, Tensor), out: &Tensor) {
        let mut out = out.shallow_clone();
        let _ = dgate.mm_out(&out, wg);
        let _ = out.addmm_(dup, wu);
    }
}

/// Blocks of rows in which [`Mlp::recompute_backward`] forms a frozen MLP's input gradient.
const RECOMPUTE_ROW_BLOCKS: i64 = 2;

pub struct DecoderLayer {
    /// Where the layer's weights live (layers of one model may sit on different GPUs).
    pub device: Device,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(
        &self,
        h: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Tensor {
        let (_, h, x) = self.attention_block(h, None, cos_sin, mask, cache, train);
        h + self.mlp.forward(&x, train)
    }

    /// The layer up to its MLP, from its input `h + pending` (`pending`: the previous layer's
    /// MLP output, when its residual add is left to this layer's first norm, which fuses it):
    /// that input, the residual stream after attention `mid`, and the MLP's input
    /// `post_attention_layernorm(mid)` (the layer's output is `mid + mlp(x)`).
    pub fn attention_block(
        &self,
        h: &Tensor,
        pending: Option<&Tensor>,
        cos_sin: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let attn = &self.self_attn;
        let (input, normed) = self.input_layernorm.forward_residual(h, pending, train);
        let a = attn.o_proj.forward(&attn.heads(&normed, cos_sin, mask, cache, train), train);
        let (mid, x) = self.post_attention_layernorm.forward_residual(&input, Some(&a), train);
        (input, mid, x)
    }

    /// Backward through the attention half, `h = x + o_proj(heads(input_layernorm(x)))`, from
    /// `∂L/∂h` `dh`, recomputing from the layer input `x` (with a graph) all but `o_proj`'s
    /// forward, whose output backward does not need: the roots to hand to autograd (the heads'
    /// output with `dh · W_o`, `x` with `dh` for the residual, `o_proj`'s adapter if any).
    pub fn attention_recompute_backward(&self, x: &Tensor, dh: &Tensor, cos_sin: &(Tensor, Tensor), mask: &AttnMask) -> Vec<(Tensor, Tensor)> {
        let o = &self.self_attn.o_proj;
        let y = self.self_attn.heads(&self.input_layernorm.forward(x, true), cos_sin, mask, None, true);
        let (y2, dh2) = (y.reshape([-1, o.in_features()]), dh.reshape([-1, o.out_features()]));
        let mut roots = vec![(y2.shallow_clone(), o.base_input_grad(&dh2)), (x.shallow_clone(), dh.shallow_clone())];
        if let Some(l) = &o.lora {
            roots.push((l.delta(&y2, true), dh2));
        }
        roots
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Linear>,
    pub rope: Rope,
    pub kind: Kind,
    /// Where the embeddings live: inputs go here.
    pub device: Device,
    /// Where the final norm and output head live: logits come from here.
    pub head_device: Device,
}

impl Llama {
    /// Builds the model from checkpoint tensors named as in transformers' state dict.
    pub fn load(config: LlamaConfig, weights: &WeightSource, kind: Kind, device: Device) -> Result<Llama> {
        let placement = Placement::single(device, config.num_hidden_layers);
        Self::load_quantized(config, weights, kind, &placement, None)
    }

    /// [`Llama::load`] onto the devices of `placement`, storing the decoder's linear layers in
    /// 4 bits per `quant`: each weight is read (in `kind`, on its device), quantized, and its
    /// dense copy dropped before the next is read, so at most one dense matrix exists at a time.
    pub fn load_quantized(config: LlamaConfig, weights: &WeightSource, kind: Kind, placement: &Placement, quant: Option<&QuantConfig>) -> Result<Llama> {
        let c = &config;
        let (h, i) = (c.hidden_size as i64, c.intermediate_size as i64);
        let (nh, nkv, hd) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let load = |name: &str, shape: &[i64], device: Device| weights.load(name, shape, kind, device);
        let linear = |name: String, out: i64, inp: i64, bias: bool, device: Device| -> Result<Linear> {
            // a 4-bit weight saved in bitsandbytes' format loads as it is (no re-quantizing)
            let get = |k: &str| -> Result<Option<Tensor>> { if weights.contains(k) { Ok(Some(weights.load_any(k)?)) } else { Ok(None) } };
            let weight = if let Some(q) = crate::nn::quant::Quant4::from_bnb(&get, &name, device)? {
                if q.shape != [out, inp] {
                    anyhow::bail!("4-bit tensor `{name}.weight` has shape {:?}, expected {:?}", q.shape, [out, inp]);
                }
                Weight::Quant4(q)
            } else {
                let dense = load(&format!("{name}.weight"), &[out, inp], device)?;
                match quant.filter(|q| q.applies(&name)) {
                    Some(q) => q.quantize(&dense)?,
                    None => Weight::Dense(dense),
                }
            };
            Ok(Linear {
                weight,
                bias: if bias { Some(load(&format!("{name}.bias"), &[out], device)?) } else { None },
                lora: None,
                name,
            })
        };
        let norm = |name: String, device: Device| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: load(&format!("{name}.weight"), &[h], device)?, eps: c.rms_norm_eps })
        };
        let mut layers = vec![];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let d = placement.layers[l];
            let window = c.sliding_window.filter(|_| l >= c.sliding_window_from_layer).map(|w| w as i64);
            layers.push(DecoderLayer {
                device: d,
                input_layernorm: norm(format!("{p}.input_layernorm"), d)?,
                self_attn: Attention {
                    q_proj: linear(format!("{p}.self_attn.q_proj"), nh * hd, h, c.qkv_bias, d)?,
                    k_proj: linear(format!("{p}.self_attn.k_proj"), nkv * hd, h, c.qkv_bias, d)?,
                    v_proj: linear(format!("{p}.self_attn.v_proj"), nkv * hd, h, c.qkv_bias, d)?,
                    o_proj: linear(format!("{p}.self_attn.o_proj"), h, nh * hd, c.o_bias, d)?,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    sliding_window: window,
                },
                post_attention_layernorm: norm(format!("{p}.post_attention_layernorm"), d)?,
                mlp: Mlp {
                    gate_proj: linear(format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias, d)?,
                    up_proj: linear(format!("{p}.mlp.up_proj"), i, h, c.mlp_bias, d)?,
                    down_proj: linear(format!("{p}.mlp.down_proj"), h, i, c.mlp_bias, d)?,
                },
            });
        }
        let vocab = c.vocab_size as i64;
        let embed_tokens = load("model.embed_tokens.weight", &[vocab, h], placement.embed)?;
        let head_device = if c.tie_word_embeddings { placement.embed } else { placement.head };
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(linear("lm_head".into(), vocab, h, false, head_device)?)
        };
        Ok(Llama {
            rope: Rope { head_dim: hd, theta: c.rope_theta, scaling: c.rope_scaling.clone() },
            norm: norm("model.norm".into(), head_device)?,
            embed_tokens,
            layers,
            lm_head,
            kind,
            device: placement.embed,
            head_device,
            config,
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// Final norm and output projection: hidden `[B, T, H]` → logits `[B, T, V]` (on
    /// `head_device`).
    pub fn head(&self, h: &Tensor, train: bool) -> Tensor {
        let h = self.norm.forward(&h.to_device(self.head_device), train);
        match &self.lm_head {
            Some(l) => l.forward(&h, train),
            None => h.matmul(&self.embed_tokens.tr()),
        }
    }

    /// Hidden states after the last decoder layer (before the final norm).
    pub fn hidden(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let mut shared = LayerInputs::new(self.rope.cos_sin(positions, self.kind), mask);
        let mut h = self.embed(ids);
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        for l in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            h = self.layer_forward(l, &h, &mut shared, slot, train);
        }
        h
    }

    /// Decoder layer `l` on hidden states `h`, moved first to the layer's device if needed.
    pub fn layer_forward(&self, l: usize, h: &Tensor, shared: &mut LayerInputs, cache: Option<&mut Option<(Tensor, Tensor)>>, train: bool) -> Tensor {
        let layer = &self.layers[l];
        let (cos_sin, mask) = shared.on(layer.device);
        layer.forward(&h.to_device(layer.device), cos_sin, mask, cache, train)
    }

    /// [`DecoderLayer::attention_block`] of layer `l` (`h` and `pending` already on the layer's
    /// device).
    pub fn layer_attention_block(&self, l: usize, h: &Tensor, pending: Option<&Tensor>, shared: &mut LayerInputs, train: bool) -> (Tensor, Tensor, Tensor) {
        let layer = &self.layers[l];
        let (cos_sin, mask) = shared.on(layer.device);
        layer.attention_block(h, pending, cos_sin, mask, None, train)
    }

    /// [`DecoderLayer::attention_recompute_backward`] of layer `l` (`x` on the layer's device).
    pub fn layer_attention_recompute_backward(&self, l: usize, x: &Tensor, dh: &Tensor, shared: &mut LayerInputs) -> Vec<(Tensor, Tensor)> {
        let layer = &self.layers[l];
        let (cos_sin, mask) = shared.on(layer.device);
        layer.attention_recompute_backward(x, dh, cos_sin, mask)
    }

    /// The devices the model uses, each once (one, unless split across GPUs).
    pub fn devices(&self) -> Vec<Device> {
        let mut v = vec![self.device];
        for d in self.layers.iter().map(|l| l.device).chain([self.head_device]) {
            if !v.contains(&d) {
                v.push(d);
            }
        }
        v
    }

    /// Logits for token ids `[B, T]` at `positions` `[B, T]`.
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let h = self.hidden(ids, positions, mask, cache, train);
        self.head(&h, train)
    }

    /// Every linear layer with its checkpoint name, in model order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![];
        for l in &self.layers {
            let a = &l.self_attn;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            v.extend([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]);
        }
        v.extend(self.lm_head.iter());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![];
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            v.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut l.mlp;
            v.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        v.extend(self.lm_head.iter_mut());
        v
    }

    /// Casts the dense weights (embeddings, norms, dense linear layers) to `kind`; 4-bit
    /// weights stay as they are and dequantize to the input's dtype.
    pub fn set_dtype(&mut self, kind: Kind) {
        let _g = tch::no_grad_guard();
        self.embed_tokens = self.embed_tokens.to_kind(kind);
        self.norm.weight = self.norm.weight.to_kind(kind);
        for l in &mut self.layers {
            l.input_layernorm.weight = l.input_layernorm.weight.to_kind(kind);
            l.post_attention_layernorm.weight = l.post_attention_layernorm.weight.to_kind(kind);
        }
        for lin in self.linears_mut() {
            lin.weight = lin.weight.to_kind(kind);
            lin.bias = lin.bias.as_ref().map(|b| b.to_kind(kind));
        }
        self.kind = kind;
    }

    /// Bytes of the weights by kind: `(quantized, dense, adapters)`.
    pub fn weight_bytes(&self) -> (usize, usize, usize) {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let quantized: usize = self.linears().iter().filter(|l| l.weight.is_quantized()).map(|l| l.weight.bytes()).sum();
        let dense: usize = self.state_dict().iter().map(|(_, t)| size(t)).sum();
        let adapters: usize = self.linears().iter().filter_map(|l| l.lora.as_ref()).map(|l| size(&l.a) + size(&l.b)).sum();
        (quantized, dense, adapters)
    }

    /// Number of base parameters (quantized weights count their dequantized elements).
    pub fn num_params(&self) -> usize {
        let quantized: usize = self.linears().iter().filter(|l| l.weight.is_quantized()).map(|l| l.weight.numel()).sum();
        quantized + self.state_dict().iter().map(|(_, t)| t.numel()).sum::<usize>()
    }

    /// The dense tensors of the state dict, named as in transformers (LoRA not merged).
    /// 4-bit weights are not in it (they would have to be dequantized): see [`Linear::weight`].
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.shallow_clone())];
        for (i, l) in self.layers.iter().enumerate() {
            v.push((format!("model.layers.{i}.input_layernorm.weight"), l.input_layernorm.weight.shallow_clone()));
            v.push((format!("model.layers.{i}.post_attention_layernorm.weight"), l.post_attention_layernorm.weight.shallow_clone()));
        }
        for lin in self.linears() {
            if let Weight::Dense(w) = &lin.weight {
                v.push((format!("{}.weight", lin.name), w.shallow_clone()));
            }
            if let Some(b) = &lin.bias {
                v.push((format!("{}.bias", lin.name), b.shallow_clone()));
            }
        }
        v.push(("model.norm.weight".into(), self.norm.weight.shallow_clone()));
        v
    }
}
