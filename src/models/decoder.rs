//! The decoder every family builds (Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma 2 and 3), mirroring
//! transformers' `modeling_llama.py` (and the families' variants of it) op for op so logits match:
//!
//! ```text
//! h = embed(ids) (· √H)
//! for each layer:  h = h + (pa)(o(attn(rope(qn(q(n1(h)))), rope(kn(k(n1(h)))), v(n1(h)))))
//!                  h = h + (pm)(down(act(gate(n2(h))) * up(n2(h))))
//! logits = cap(lm_head(norm(h)))          (lm_head = embedᵀ when embeddings are tied)
//! ```
//! `n(x) = w · x / √(mean(x²) + ε)` computed in fp32 (RMSNorm; `(1 + w)` in Gemma); `qn`, `kn`
//! are RMSNorms over each head's `head_dim` (Qwen3), `pa`, `pm` the output norms of Gemma 2's
//! "sandwich" layers, `cap(z) = c·tanh(z/c)` Gemma 2's soft-cap (identity elsewhere); `act` is
//! SiLU or GELU-tanh. Attention is `softmax(q kᵀ · s + mask) v` (`s = 1/√d` unless the family
//! sets it) through libtorch's `scaled_dot_product_attention`, with grouped-query attention (k/v
//! heads shared by `heads / kv_heads` query heads) and a sliding window on the layers the config
//! marks (with its own RoPE base in Gemma 3); with soft-capped scores (Gemma 2) it is computed
//! op by op, as transformers' eager path.

use super::config::DecoderConfig;
use super::Checkpointing;
use super::placement::Placement;
pub use crate::nn::attention::{AttnMask, CacheSlot, FlashSaved, GpuKernel, KvCache, LayerInputs};
use crate::nn::attention::{flash_attention, flash_attention_backward, repeat_heads, softcapped_attention};
pub use crate::nn::mlp::Mlp;
pub use crate::nn::moe::{FeedForward, Routing, SparseMoe};
pub use crate::nn::norm::RmsNorm;
use crate::nn::linear::{Projections, Weight};
use crate::nn::quant::QuantConfig;
use crate::nn::loss;
use crate::nn::rope::{rotate, Rope};
use crate::nn::{Linear, WeightSource};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

pub struct Attention {
    /// `q_proj`, `k_proj`, `v_proj`, or Phi-3's fused `qkv_proj` (`[q | k | v]`).
    pub qkv: Projections,
    pub o_proj: Linear,
    /// Per-head RMSNorms of the query and key over `head_dim`, before RoPE (Qwen3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
    /// `qkᵀ`'s scale when not `1/√head_dim`.
    scale: Option<f64>,
    /// Scores soft-capped at ±this before the mask.
    softcap: Option<f64>,
}

/// The causal mask `[t, t]` of `t` positions: allowed(i, j) = j ≤ i (and i − j < w); and the
/// diagonal j = i.
fn causal(t: i64, window: Option<i64>, device: tch::Device) -> (Tensor, Tensor) {
    let qpos = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1);
    let kpos = qpos.view([1, t]);
    let mut m = kpos.le_tensor(&qpos);
    if let Some(w) = window {
        m = m.logical_and(&(&qpos - &kpos).lt(w));
    }
    (m, kpos.eq_tensor(&qpos))
}

impl Attention {
    /// The attention heads' output `[B, T, heads·d]`, before `o_proj`.
    fn heads(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<CacheSlot<'_>>,
        train: bool,
    ) -> Tensor {
        // a decoding step on the GPU: q, k and v from one GEMM, then one kernel for the norms,
        // RoPE and the cache's writes
        let step = cache.filter(|c| c.at.is_some() && crate::nn::decode_fusion(x, train));
        let joint = step.and_then(|_| self.qkv.forward_joint(x));
        let fused_step = step.zip(joint.as_ref()).and_then(|(c, qkv)| Some((self.decode_qkv(qkv, cos_sin, c)?, c)));
        let (q, k, v, step_at) = match fused_step {
            Some((q, c)) => (q, c.k.shallow_clone(), c.v.shallow_clone(), c.at),
            None => {
                let (q_size, kv_size) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
                let parts = match joint {
                    Some(qkv) => qkv.split_with_sizes([q_size, kv_size, kv_size], -1),
                    None => self.qkv.forward(x, train),
                };
                self.project_heads(parts, cos_sin, cache, train)
            }
        };
        self.attend(&q, &k, &v, step_at, mask, train)
    }

    /// [`Attention::heads`] of a training forward (no cache), also returning for the recomputation
    /// in backward the q, k and v projections' outputs (with `projections`: the
    /// [`Projections::outputs`](crate::nn::linear::Projections::outputs) of the normed input) and,
    /// with `attention` where FlashAttention serves ([`Attention::flashable`]), what attention's
    /// backward reads besides q, k, v and the output.
    pub fn heads_keeping(&self, normed: &Tensor, cos_sin: &(Tensor, Tensor), mask: &AttnMask, projections: bool, attention: bool, train: bool) -> (Tensor, Option<Vec<Tensor>>, Option<FlashSaved>) {
        let outputs = projections.then(|| self.qkv.outputs(normed, train));
        let parts = match &outputs {
            Some(o) => self.qkv.parts(o.iter().map(Tensor::shallow_clone).collect()),
            None => self.qkv.forward(normed, train),
        };
        let (q, k, v, _) = self.project_heads(parts, cos_sin, None, train);
        let flash = if attention && self.flashable(mask, q.size()[2]) { flash_attention(&q, &k, &v, self.scale_or_default()) } else { None };
        match flash {
            Some((y, saved)) => (y, outputs, Some(saved)),
            None => (self.attend(&q, &k, &v, None, mask, train), outputs, None),
        }
    }

    /// Whether attention over `t` positions under `mask` is plain causal attention, which
    /// [`flash_attention`] computes: no mask beyond causality, no window shorter than `t`, no
    /// soft-capped scores.
    fn flashable(&self, mask: &AttnMask, t: i64) -> bool {
        matches!(mask, AttnMask::Causal) && t > 1 && self.sliding_window.is_none_or(|w| w >= t) && self.softcap.is_none()
    }

    /// The scores' scale: the family's, or `1/√d`.
    fn scale_or_default(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// Attention of the rotated queries `q` `[B, heads, T, d]` over the keys `k` and values `v`
    /// `[B, kv_heads, S, d]` (a step over a fixed cache: written at slot `step_at`), as
    /// `[B, T, heads·d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, step_at: Option<&Tensor>, mask: &AttnMask, train: bool) -> Tensor {
        let (b, _, t, _) = q.size4().unwrap();
        let kv_len = k.size()[2];
        let window = self.sliding_window.filter(|w| *w < kv_len);
        // a decoding step on the GPU: one kernel over the cache (no mask
        // tensors to build)
        if let (Some(at), AttnMask::Padded(valid)) = (step_at, mask) {
            if crate::nn::fused(q, train) {
                let scale = self.scale_or_default();
                if let Some(y) = crate::cuda::autograd::decode_attention(q, k, v, valid, at, window, scale, self.softcap) {
                    return y;
                }
            }
        }
        let explicit: Option<Tensor> = match mask {
            _ if step_at.is_some() => {
                let AttnMask::Padded(valid) = mask else { unreachable!("a step over a fixed cache is masked by its valid slots") };
                // the slots written so far (the step's own included), within the window of the
                // step's slot
                let mut m = valid.view([b, 1, 1, kv_len]);
                if let Some(w) = window {
                    let behind = step_at.unwrap() - Tensor::arange(kv_len, (Kind::Int64, q.device()));
                    m = m.logical_and(&behind.lt(w).view([1, 1, 1, kv_len]));
                }
                Some(m)
            }
            AttnMask::Segments(seg) => {
                // allowed(i, j) = j ≤ i and seg[i] == seg[j]
                let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
                let causal = Tensor::ones([t, t], (Kind::Bool, q.device())).tril(0);
                let mut m = same.logical_and(&causal);
                if let Some(w) = window {
                    m = m.logical_and(&Tensor::ones([t, t], (Kind::Bool, q.device())).triu(-(w - 1)));
                }
                Some(m.unsqueeze(1))
            }
            AttnMask::SharedPrefix { segments: seg, positions } => {
                // allowed(i, j) = j ≤ i and (seg[j] == 0 or seg[i] == seg[j])
                let visible = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1)).logical_or(&seg.eq(0).unsqueeze(1));
                let mut m = visible.logical_and(&Tensor::ones([t, t], (Kind::Bool, q.device())).tril(0));
                if let Some(w) = window {
                    m = m.logical_and(&(positions.unsqueeze(2) - positions.unsqueeze(1)).lt(w));
                }
                Some(m.unsqueeze(1))
            }
            AttnMask::Padded(valid) => {
                // causal, key j valid; a padding query also sees itself, so that no row of
                // scores is all masked (NaN through SDPA)
                let (m, diagonal) = causal(kv_len, window, q.device());
                Some(m.unsqueeze(0).logical_and(&valid.unsqueeze(1)).logical_or(&diagonal.unsqueeze(0)).unsqueeze(1))
            }
            // SDPA's own causal mask serves; eager attention (soft-capped scores) needs it written out
            AttnMask::Causal if window.is_none() && self.softcap.is_none() => None,
            AttnMask::Causal => Some(causal(kv_len, window, q.device()).0),
        };
        let is_causal = explicit.is_none() && t > 1;
        let y = match self.softcap {
            // a prompt's or an evaluation's forward on the GPU: not by cuDNN's kernel, which
            // would plan each batch's new shape anew
            None if step_at.is_none() && crate::nn::decode_fusion(q, train) => {
                let (k, v) = (repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads));
                crate::cuda::autograd::attention_without_cudnn(q, &k, &v, explicit.as_ref(), is_causal, self.scale_or_default())
                    .unwrap_or_else(|| Tensor::scaled_dot_product_attention(q, &k, &v, explicit.as_ref(), 0.0, is_causal, self.scale, false))
            }
            None => Tensor::scaled_dot_product_attention(q, k, v, explicit.as_ref(), 0.0, is_causal, self.scale, self.n_kv_heads != self.n_heads),
            Some(cap) => {
                let (k, v) = (repeat_heads(k, self.n_heads), repeat_heads(v, self.n_heads));
                let allowed = explicit.expect("eager attention always has its mask written out");
                // without a cache, query i's keys are the row's first i + 1 tokens at most
                let causal_rows = step_at.is_none() && kv_len == t;
                softcapped_attention(q, &k, &v, &allowed, self.scale_or_default(), cap, causal_rows)
            }
        };
        y.transpose(1, 2).contiguous().view([b, t, self.n_heads * self.head_dim])
    }

    /// The rotated queries `[B, heads, T, d]`, the keys and values `[B, kv_heads, T, d]` to attend
    /// to (the cache's, written first, in a step over a fixed cache) and the slot such a step
    /// writes (`[1]` on the device), from the projections `parts` (q, k, v, each `[B, T, ·]`).
    fn project_heads<'c>(&self, parts: Vec<Tensor>, cos_sin: &(Tensor, Tensor), cache: Option<CacheSlot<'c>>, train: bool) -> (Tensor, Tensor, Tensor, Option<&'c Tensor>) {
        let [q, k, v]: [Tensor; 3] = parts.try_into().unwrap();
        let (b, t, _) = q.size3().unwrap();
        let q = rotate(self.head_norm(&self.q_norm, q, self.n_heads, train), self.n_heads, self.head_dim, cos_sin, train);
        let k = rotate(self.head_norm(&self.k_norm, k, self.n_kv_heads, train), self.n_kv_heads, self.head_dim, cos_sin, train);
        let v = v.view([b, t, self.n_kv_heads, self.head_dim]).transpose(1, 2);
        let Some(c) = cache else { return (q, k, v, None) };
        let (mut ck, mut cv) = (c.k.shallow_clone(), c.v.shallow_clone());
        match c.at {
            None => {
                ck.narrow(2, 0, t).copy_(&k);
                cv.narrow(2, 0, t).copy_(&v);
                (q, k, v, None)
            }
            Some(at) => {
                let _ = ck.index_copy_(2, at, &k);
                let _ = cv.index_copy_(2, at, &v);
                (q, ck, cv, Some(at))
            }
        }
    }

    /// A decoding step's rotated queries `[B, heads, 1, d]` from the joint projection `qkv`, its
    /// keys and values written into `cache`, in one kernel; `None` where it does not fit.
    fn decode_qkv(&self, qkv: &Tensor, (cos, sin): &(Tensor, Tensor), cache: CacheSlot<'_>) -> Option<Tensor> {
        let norms = match (&self.q_norm, &self.k_norm) {
            (None, None) => None,
            (Some(qn), Some(kn)) if qn.eps == kn.eps => Some((qn.fused_scale(qkv.kind()), kn.fused_scale(qkv.kind()), qn.eps)),
            _ => return None,
        };
        let norms = norms.as_ref().map(|(q, k, eps)| (q, k, *eps));
        crate::cuda::autograd::decode_qkv(qkv, (cos, sin), norms, cache.k, cache.v, cache.at?, self.n_heads)
    }

    /// `y` `[B, T, heads·d]` with each head normalized by `norm` over its `d` values, if given.
    fn head_norm(&self, norm: &Option<RmsNorm>, y: Tensor, heads: i64, train: bool) -> Tensor {
        match norm {
            None => y,
            Some(n) => {
                let (b, t, _) = y.size3().unwrap();
                n.forward(&y.view([b, t, heads, self.head_dim]), train).view([b, t, heads * self.head_dim])
            }
        }
    }
}

pub struct DecoderLayer {
    /// Where the layer's weights live (layers of one model may sit on different GPUs).
    pub device: Device,
    /// Which rotary table of [`Decoder::ropes`] the layer reads.
    pub rope: usize,
    /// Attention's input norm (`input_layernorm`).
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Attention's output norm, before the residual add (Gemma 2's `post_attention_layernorm`).
    pub attn_out_norm: Option<RmsNorm>,
    /// The MLP's input norm (Llama's `post_attention_layernorm`, Gemma 2's `pre_feedforward_layernorm`).
    pub mlp_norm: RmsNorm,
    /// A dense MLP, or a sparse mixture of experts (Qwen3-MoE).
    pub mlp: FeedForward,
    /// The MLP's output norm, before the residual add (Gemma 2's `post_feedforward_layernorm`).
    pub mlp_out_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    /// The layer's linear layers, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.self_attn.qkv.linears();
        v.push(&self.self_attn.o_proj);
        v.extend(self.mlp.linears());
        v
    }

    /// [`DecoderLayer::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.self_attn.qkv.linears_mut();
        v.push(&mut self.self_attn.o_proj);
        v.extend(self.mlp.linears_mut());
        v
    }

    /// The layer's groups of projections of one input (q/k/v; the dense MLP's gate/up).
    pub fn projections_mut(&mut self) -> Vec<&mut Projections> {
        let mut v = vec![&mut self.self_attn.qkv];
        if let FeedForward::Dense(m) = &mut self.mlp {
            v.push(&mut m.gate_up);
        }
        v
    }

    /// The layer's norms, in checkpoint order.
    pub fn norms(&self) -> Vec<&RmsNorm> {
        let a = &self.self_attn;
        [Some(&self.input_layernorm), a.q_norm.as_ref(), a.k_norm.as_ref(), self.attn_out_norm.as_ref(), Some(&self.mlp_norm), self.mlp_out_norm.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn norms_mut(&mut self) -> Vec<&mut RmsNorm> {
        let a = &mut self.self_attn;
        [Some(&mut self.input_layernorm), a.q_norm.as_mut(), a.k_norm.as_mut(), self.attn_out_norm.as_mut(), Some(&mut self.mlp_norm), self.mlp_out_norm.as_mut()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The MLP's contribution to the residual stream from its input `x`: `mlp(x)`, normalized
    /// by the output norm if the layer has one.
    pub fn mlp_block(&self, x: &Tensor, train: bool) -> Tensor {
        self.mlp_block_routed(x, train).0
    }

    /// [`DecoderLayer::mlp_block`], and where a sparse block routed each token.
    pub fn mlp_block_routed(&self, x: &Tensor, train: bool) -> (Tensor, Option<Routing>) {
        let (y, routing) = self.mlp.forward_routed(x, train);
        let y = match &self.mlp_out_norm {
            Some(n) => n.forward(&y, train),
            None => y,
        };
        (y, routing)
    }

    /// The dense MLP that the hand-written checkpointed backward knows ([`DecoderLayer::plain`] layers have one).
    fn dense_mlp(&self) -> Result<&Mlp> {
        self.mlp.dense().ok_or_else(|| anyhow::anyhow!("internal: the checkpointed MLP backward needs a dense MLP"))
    }

    /// Whether backward may take the hand-written checkpointed path ([`Mlp::recompute_backward`],
    /// [`DecoderLayer::attention_recompute_backward`]), which knows no output norms and no
    /// adapter but plain LoRA; otherwise the layer is recomputed whole under autograd.
    pub fn plain(&self) -> bool {
        self.attn_out_norm.is_none() && self.mlp_out_norm.is_none() && self.mlp.dense().is_some_and(Mlp::fusable) && self.self_attn.o_proj.fusable()
    }

    /// Whether the residual after attention, `x + o_proj(y)`, is rebuilt exactly from the layer
    /// input `x` and attention's output `y`: a plain layer whose `o_proj` draws no dropout (no
    /// adapter, or LoRA without dropout). Where attention's output is kept, the residual then is not.
    pub fn residual_from_attention(&self) -> bool {
        self.plain() && self.self_attn.o_proj.lora().is_none_or(|l| l.dropout == 0.0)
    }

    /// The layer up to its MLP, from its input `h + pending` (`pending`: the previous layer's
    /// MLP output, when its residual add is left to this layer's first norm, which fuses it):
    /// that input, the residual stream after attention `mid`, and the MLP's input
    /// `mlp_norm(mid)` (the layer's output is `mid + mlp_block(x)`).
    pub fn attention_block(
        &self,
        h: &Tensor,
        pending: Option<&Tensor>,
        cos_sin: &(Tensor, Tensor),
        mask: &AttnMask,
        cache: Option<CacheSlot<'_>>,
        train: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let (input, normed) = self.input_layernorm.forward_residual(h, pending, train);
        let (mid, x) = self.attention_output(&input, &self.self_attn.heads(&normed, cos_sin, mask, cache, train), train);
        (input, mid, x)
    }

    /// [`DecoderLayer::attention_block`] of a training forward (no cache), also returning what
    /// `keep` asks to keep for [`DecoderLayer::attention_recompute_backward`] to start from.
    pub fn attention_block_keeping(&self, h: &Tensor, pending: Option<&Tensor>, cos_sin: &(Tensor, Tensor), mask: &AttnMask, keep: Keep, train: bool) -> (Tensor, Tensor, Tensor, LayerKeeps) {
        let (input, normed) = self.input_layernorm.forward_residual(h, pending, train);
        let (heads, outputs, saved) = self.self_attn.heads_keeping(&normed, cos_sin, mask, keep.projections, keep.attention, train);
        let (mid, x) = self.attention_output(&input, &heads, train);
        let attention = saved.map(|s| (heads, s));
        (input, mid, x, LayerKeeps { outputs, attention })
    }

    /// The residual stream after attention, `input + o_proj(heads)` (output-normed if the layer
    /// has the norm), and the MLP's input, its `mlp_norm`.
    fn attention_output(&self, input: &Tensor, heads: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut a = self.self_attn.o_proj.forward(heads, train);
        if let Some(n) = &self.attn_out_norm {
            a = n.forward(&a, train);
        }
        self.mlp_norm.forward_residual(input, Some(&a), train)
    }

    /// Backward through the attention half, `h = x + o_proj(heads(input_layernorm(x)))`, from
    /// `∂L/∂h` `dh`, recomputing from the layer input `x` (with a graph) all but `o_proj`'s
    /// forward, whose output backward does not need: the roots to hand to autograd (the heads'
    /// output with `dh · W_o`, `x` with `dh` for the residual, `o_proj`'s adapter if any).
    /// What the forward kept ([`LayerKeeps`]) is not recomputed: with the q, k and v projections'
    /// `outputs`, their frozen weights' part (attention back-propagates from them, in one
    /// backward here, and the roots are the normed input with `Σ ∂yᵢ · Wᵢ`, each adapter's update
    /// with its projection's gradient, and `x` with `dh`); with attention's output and statistics
    /// (`attention()`, asked for once q, k and v are recomputed, so that their copy back can land
    /// meanwhile), attention's forward: its backward runs from them ([`flash_attention_backward`]).
    pub fn attention_recompute_backward(&self, x: &Tensor, dh: &Tensor, cos_sin: &(Tensor, Tensor), mask: &AttnMask, outputs: Option<Vec<Tensor>>, attention: impl FnOnce() -> Result<Option<(Tensor, FlashSaved)>>) -> Result<Vec<(Tensor, Tensor)>> {
        let (attn, o) = (&self.self_attn, &self.self_attn.o_proj);
        let normed = self.input_layernorm.forward(x, true);
        let dh2 = dh.reshape([-1, o.out_features()]);
        // kept projections' outputs become leaves; their adapters' updates are formed apart,
        // first, drawing their dropout masks in the forward's order
        let leaves = outputs.map(|outputs| {
            let updates: Vec<Option<Tensor>> = attn.qkv.linears().iter().map(|p| p.lora().map(|l| l.delta(&normed, true))).collect();
            (outputs.iter().map(|t| t.detach().set_requires_grad(true)).collect::<Vec<_>>(), updates)
        });
        let parts = match &leaves {
            Some((outputs, _)) => attn.qkv.parts(outputs.iter().map(Tensor::shallow_clone).collect()),
            None => attn.qkv.forward(&normed, true),
        };
        let (q, k, v, _) = attn.project_heads(parts, cos_sin, None, true);
        // attention's kept output and statistics, fetched once q, k and v are recomputed
        let mut roots = match attention()? {
            None => {
                let y2 = attn.attend(&q, &k, &v, None, mask, true).reshape([-1, o.in_features()]);
                let mut roots = vec![(y2.shallow_clone(), o.base_input_grad(&dh2))];
                if let Some(l) = o.lora() {
                    roots.push((l.delta(&y2, true), dh2));
                }
                roots
            }
            Some((y, saved)) => {
                // ∂L/∂y: through o_proj's frozen weight, and its adapter's update (whose own
                // gradients this backward accumulates)
                let mut dy = o.base_input_grad(&dh2);
                if let Some(l) = o.lora() {
                    let leaf = y.reshape([-1, o.in_features()]).detach().set_requires_grad(true);
                    crate::cuda::autograd::backward(&[(&l.delta(&leaf, true), &dh2)])?;
                    dy += leaf.grad();
                }
                let dy = dy.view_as(&y);
                match flash_attention_backward(&dy, &q, &k, &v, &y, &saved, attn.scale_or_default()) {
                    Ok((dq, dk, dv)) => vec![(q, dq), (k, dk), (v, dv)],
                    // the kernel refused (no later forward keeps attention): recomputed instead
                    Err(_) => vec![(attn.attend(&q, &k, &v, None, mask, true), dy)],
                }
            }
        };
        let Some((leaves, updates)) = leaves else {
            roots.insert(1, (x.shallow_clone(), dh.shallow_clone()));
            return Ok(roots);
        };
        crate::cuda::autograd::backward(&roots.iter().map(|(t, g)| (t, g)).collect::<Vec<_>>())?;
        drop(roots);
        let grads: Vec<Tensor> = leaves.iter().map(Tensor::grad).collect();
        let mut roots = vec![(normed.shallow_clone(), attn.qkv.base_input_grad(&grads)), (x.shallow_clone(), dh.shallow_clone())];
        roots.extend(updates.into_iter().zip(grads).filter_map(|(u, g)| Some((u?, g))));
        Ok(roots)
    }
}

/// What a checkpointed layer may keep from its forward, beyond its input and the residual, so
/// that backward need not recompute it: the q, k and v projections' outputs, and attention's
/// output with its statistics.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct Keep {
    pub projections: bool,
    pub attention: bool,
}

/// What [`DecoderLayer::attention_block_keeping`] kept (as [`Keep`] asked, where it could):
/// the q, k and v projections' outputs, and attention's output `[B, T, heads·d]` with what its
/// backward reads.
#[derive(Default)]
pub struct LayerKeeps {
    pub outputs: Option<Vec<Tensor>>,
    pub attention: Option<(Tensor, FlashSaved)>,
}

/// peft's trainable tokens (`trainable_token_indices`): rows `ids` of the embedding matrix (and
/// of the output head when it is tied to it) replaced by the trained `values` `[n, H]`; every
/// other row stays frozen.
pub struct TokenRows {
    pub ids: Vec<i64>,
    pub values: Tensor,
}

pub struct Decoder {
    pub config: DecoderConfig,
    pub embed_tokens: Tensor,
    /// Trainable rows of `embed_tokens`, if any.
    pub token_rows: Option<TokenRows>,
    /// A trained copy of the whole embedding matrix used in its place (peft's `modules_to_save`
    /// with `embed_tokens`), in the adapters' dtype.
    pub embed_copy: Option<Tensor>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// The rotary embeddings: the model's, and the sliding layers' own when they differ (Gemma 3).
    pub ropes: Vec<Rope>,
    pub kind: Kind,
    /// Where the embeddings live: inputs go here.
    pub device: Device,
    /// Where the final norm and output head live: logits come from here.
    pub head_device: Device,
}

impl Decoder {
    /// Builds the model from checkpoint tensors named as in transformers' state dict.
    pub fn load(config: DecoderConfig, weights: &WeightSource, kind: Kind, device: Device) -> Result<Decoder> {
        let placement = Placement::single(device, config.num_hidden_layers);
        Self::load_quantized(config, weights, kind, &placement, None)
    }

    /// [`Decoder::load`] onto the devices of `placement`, storing the decoder's linear layers in
    /// 4 bits per `quant`: each weight is read (in `kind`, on its device), quantized, and its
    /// dense copy dropped before the next is read, so at most one dense matrix exists at a time.
    pub fn load_quantized(config: DecoderConfig, weights: &WeightSource, kind: Kind, placement: &Placement, quant: Option<&QuantConfig>) -> Result<Decoder> {
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
                adapter: None,
                name,
            })
        };
        let norm_of = |name: String, width: i64, device: Device| -> Result<RmsNorm> {
            let mut weight = load(&format!("{name}.weight"), &[width], device)?;
            if c.norm_unit_offset && matches!(weights, WeightSource::Random { .. }) {
                weight = weight.zeros_like(); // transformers' init: `1 + w` starts at 1
            }
            Ok(RmsNorm { weight, eps: c.rms_norm_eps, unit_offset: c.norm_unit_offset, name })
        };
        let norm = |name: String, device: Device| norm_of(name, h, device);
        let sandwich = |name: String, device: Device| -> Result<Option<RmsNorm>> {
            if c.sandwich_norms { Ok(Some(norm(name, device)?)) } else { Ok(None) }
        };
        let head_norm = |name: String, device: Device| -> Result<Option<RmsNorm>> {
            if c.qk_norm { Ok(Some(norm_of(name, hd, device)?)) } else { Ok(None) }
        };
        let mut layers = vec![];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let d = placement.layers[l];
            let window = c.window_of(l).map(|w| w as i64);
            layers.push(DecoderLayer {
                device: d,
                rope: if c.local_rope.is_some() && window.is_some() { 1 } else { 0 },
                input_layernorm: norm(format!("{p}.input_layernorm"), d)?,
                self_attn: Attention {
                    qkv: if c.fused_projections {
                        let sizes = vec![nh * hd, nkv * hd, nkv * hd];
                        Projections::Fused { layer: linear(format!("{p}.self_attn.qkv_proj"), sizes.iter().sum(), h, c.qkv_bias, d)?, sizes }
                    } else {
                        Projections::separate_layers(vec![
                            linear(format!("{p}.self_attn.q_proj"), nh * hd, h, c.qkv_bias, d)?,
                            linear(format!("{p}.self_attn.k_proj"), nkv * hd, h, c.qkv_bias, d)?,
                            linear(format!("{p}.self_attn.v_proj"), nkv * hd, h, c.qkv_bias, d)?,
                        ])
                    },
                    o_proj: linear(format!("{p}.self_attn.o_proj"), h, nh * hd, c.o_bias, d)?,
                    q_norm: head_norm(format!("{p}.self_attn.q_norm"), d)?,
                    k_norm: head_norm(format!("{p}.self_attn.k_norm"), d)?,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    sliding_window: window,
                    scale: c.attn_scale,
                    softcap: c.attn_softcap,
                },
                attn_out_norm: sandwich(format!("{p}.post_attention_layernorm"), d)?,
                mlp_norm: norm(format!("{p}.{}", if c.sandwich_norms { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }), d)?,
                mlp: match c.moe.as_ref().filter(|m| m.sparse_layers[l]) {
                    Some(moe) => FeedForward::Sparse(SparseMoe::load(moe, format!("{p}.mlp"), h, c.activation, weights, kind, d)?),
                    None => FeedForward::Dense(Mlp {
                        gate_up: if c.fused_projections {
                            Projections::Fused { layer: linear(format!("{p}.mlp.gate_up_proj"), 2 * i, h, c.mlp_bias, d)?, sizes: vec![i, i] }
                        } else {
                            Projections::separate_layers(vec![linear(format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias, d)?, linear(format!("{p}.mlp.up_proj"), i, h, c.mlp_bias, d)?])
                        },
                        down_proj: linear(format!("{p}.mlp.down_proj"), h, i, c.mlp_bias, d)?,
                        act: c.activation,
                    }),
                },
                mlp_out_norm: sandwich(format!("{p}.post_feedforward_layernorm"), d)?,
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
        Ok(Decoder {
            ropes: std::iter::once((c.rope_theta, c.rope_scaling.clone())).chain(c.local_rope.clone()).map(|(theta, scaling)| Rope::new((hd as f64 * c.partial_rotary_factor) as i64, theta, scaling)).collect(),
            norm: norm("model.norm".into(), head_device)?,
            embed_tokens,
            token_rows: None,
            embed_copy: None,
            layers,
            lm_head,
            kind,
            device: placement.embed,
            head_device,
            config,
        })
    }

    /// What every layer reads in one forward at `positions`: each rotary table's cos/sin, the mask.
    pub fn layer_inputs(&self, positions: &Tensor, mask: &AttnMask) -> LayerInputs {
        LayerInputs::new(self.ropes.iter().map(|r| r.cos_sin(positions, self.kind)).collect(), mask)
    }

    /// Whether training reaches the embeddings (trainable token rows, or a trained copy).
    pub fn embeddings_train(&self) -> bool {
        self.token_rows.is_some() || self.embed_copy.is_some()
    }

    /// Grows the vocabulary to `rows`: the new rows of the embeddings (and of an untied output
    /// head) are the mean of the old ones. transformers' `resize_token_embeddings` (mean
    /// resizing) draws them from a normal around that mean with covariance `1e-9·Σ` of the old
    /// rows: the same rows to about `3e-5` of their spread.
    pub fn grow_vocab(&mut self, rows: i64) -> Result<()> {
        let _g = tch::no_grad_guard();
        let grow = |w: &Tensor| -> Tensor {
            let old = w.size()[0];
            let mean = w.to_kind(Kind::Float).mean_dim([0i64].as_slice(), true, Kind::Float).to_kind(w.kind());
            Tensor::cat(&[w.shallow_clone(), mean.expand([rows - old, w.size()[1]], false)], 0).contiguous()
        };
        self.embed_tokens = grow(&self.embed_tokens);
        if let Some(head) = &mut self.lm_head {
            anyhow::ensure!(head.bias.is_none(), "add_tokens: an output head with a bias is not supported");
            head.weight = match &head.weight {
                Weight::Dense(w) => Weight::Dense(grow(w)),
                _ => anyhow::bail!("add_tokens: the output head is quantized; load the model with lm_head dense"),
            };
        }
        self.config.vocab_size = rows as usize;
        Ok(())
    }

    /// The embedding matrix in use: its trained copy, or with the trainable token rows in place
    /// (`E.index_copy(ids, values)`), with a graph to what trains; the base matrix when adapters
    /// are switched off.
    pub fn embedding_weight(&self) -> Tensor {
        let e = &self.embed_tokens;
        if crate::nn::linear::adapters_disabled() {
            return e.shallow_clone();
        }
        match (&self.embed_copy, &self.token_rows) {
            (Some(c), _) => c.to_kind(e.kind()),
            (None, Some(t)) => e.index_copy(0, &Tensor::from_slice(&t.ids).to_device(e.device()), &t.values.to_kind(e.kind())),
            (None, None) => e.shallow_clone(),
        }
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let e = Tensor::embedding(&self.embedding_weight(), ids, -1, false, false);
        if self.config.embed_scale {
            // transformers multiplies by √H rounded to the weights' dtype (a host scalar: no
            // copy to the device)
            let scale = Tensor::from((self.config.hidden_size as f64).sqrt()).to_kind(e.kind()).double_value(&[]);
            e * scale
        } else {
            e
        }
    }

    /// Final norm and output projection: hidden `[B, T, H]` → logits `[B, T, V]` (on
    /// `head_device`).
    pub fn head(&self, h: &Tensor, train: bool) -> Tensor {
        let h = self.norm.forward(&h.to_device(self.head_device), train);
        let logits = match &self.lm_head {
            Some(l) => l.forward(&h, train),
            None => {
                let w = self.embedding_weight();
                let step = crate::nn::decode_fusion(&h, train).then(|| crate::cuda::autograd::decode_linear(&h, &w, None, None)).flatten();
                step.unwrap_or_else(|| h.matmul(&w.tr()))
            }
        };
        loss::softcap(&logits, self.config.final_softcap)
    }

    /// Hidden states after the last decoder layer (before the final norm).
    pub fn hidden(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, cache: Option<&KvCache>, train: bool) -> Tensor {
        self.hidden_routed(ids, positions, mask, cache, train).0
    }

    /// [`Decoder::hidden`], and the routings of the sparse layers.
    pub fn hidden_routed(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, cache: Option<&KvCache>, train: bool) -> (Tensor, Vec<Routing>) {
        self.hidden_with(ids, self.layer_inputs(positions, mask), cache, train)
    }

    /// [`Decoder::hidden_routed`] with the layers' rotary tables and mask given.
    pub fn hidden_with(&self, ids: &Tensor, mut shared: LayerInputs, cache: Option<&KvCache>, train: bool) -> (Tensor, Vec<Routing>) {
        self.run_layers(ids, &mut shared, cache, train, None, 0, &[], |_, _, _, _| Ok(())).expect("keeping nothing cannot fail")
    }

    /// The decoder layers over the embedded `ids`, the final norm left out, each layer's input
    /// moved to its device first; with a `seed`, dropout is drawn from `seed + 2l` for layer
    /// `l`'s attention and `+ 1` for its MLP. `keep(l, input, mid, outputs)` sees each layer's input and its
    /// residual after attention (for checkpointing), and where `projections[l]` its q, k and v
    /// projections' outputs (layers below `graph_from` that [`DecoderLayer::plain`] says the
    /// hand-written recomputation serves). Each layer leaves its output `mid + mlp(x)`
    /// unadded: the next layer's first norm adds it (one kernel on the GPU's fused path). The
    /// layers below `graph_from` run without a graph; layer `graph_from` (when above 0) then
    /// starts from a leaf that requires its gradient, the input `keep` sees. Also returns the
    /// sparse layers' routings, in layer order.
    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        ids: &Tensor,
        shared: &mut LayerInputs,
        cache: Option<&KvCache>,
        train: bool,
        seed: Option<i64>,
        graph_from: usize,
        keeps: &[Keep],
        mut keep: impl FnMut(usize, &Tensor, &Tensor, LayerKeeps) -> Result<()>,
    ) -> Result<(Tensor, Vec<Routing>)> {
        let mut routes = vec![];
        let mut h = {
            let _no_graph = (graph_from > 0).then(tch::no_grad_guard);
            self.embed(ids)
        };
        let mut pending: Option<Tensor> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let _no_graph = (l < graph_from).then(tch::no_grad_guard);
            h = h.to_device(layer.device);
            let mut added = pending.take().map(|p| p.to_device(layer.device));
            if l == graph_from && l > 0 {
                let sum = match added.take() {
                    Some(p) => &h + p,
                    None => h,
                };
                h = sum.detach().set_requires_grad(true);
            }
            if let Some(s) = seed {
                tch::manual_seed(s + 2 * l as i64);
            }
            let (cos_sin, mask) = shared.on(layer.device, layer.rope);
            let (input, mid, x, kept) = match keeps.get(l).filter(|k| **k != Keep::default() && l < graph_from && layer.plain()) {
                Some(&k) => layer.attention_block_keeping(&h, added.as_ref(), cos_sin, mask, k, train),
                None => {
                    let (input, mid, x) = layer.attention_block(&h, added.as_ref(), cos_sin, mask, cache.map(|c| c.slot(l)), train);
                    (input, mid, x, LayerKeeps::default())
                }
            };
            // the leaf itself, whose gradient backward reads (the fused norm may hand back a copy)
            keep(l, if l == graph_from && l > 0 { &h } else { &input }, &mid, kept)?;
            if let Some(s) = seed {
                tch::manual_seed(s + 2 * l as i64 + 1);
            }
            let (y, routing) = layer.mlp_block_routed(&x, train);
            routes.extend(routing);
            pending = Some(y);
            h = mid;
        }
        let h = match pending {
            Some(m) => h + m,
            None => h,
        };
        Ok((h, routes))
    }

    /// The bytes a [`KvCache`] of `b` rows takes a position: keys and values, `2 · b · kv_heads ·
    /// head_dim` elements each layer.
    pub fn cache_bytes_per_position(&self, b: i64) -> i64 {
        self.layers.iter().map(|l| 2 * b * l.self_attn.n_kv_heads * l.self_attn.head_dim).sum::<i64>() * self.kind.elt_size_in_bytes() as i64
    }

    /// An empty [`KvCache`] for `b` rows of `capacity` positions, each layer's on its device.
    pub fn new_cache(&self, b: i64, capacity: i64) -> KvCache {
        let shapes = self.layers.iter().map(|l| (l.device, l.self_attn.n_kv_heads, l.self_attn.head_dim));
        KvCache::new(shapes, b, capacity, self.kind)
    }

    /// [`DecoderLayer::attention_block`] of layer `l` (`h` and `pending` already on the layer's
    /// device).
    pub fn layer_attention_block(&self, l: usize, h: &Tensor, pending: Option<&Tensor>, shared: &mut LayerInputs, train: bool) -> (Tensor, Tensor, Tensor) {
        let layer = &self.layers[l];
        let (cos_sin, mask) = shared.on(layer.device, layer.rope);
        layer.attention_block(h, pending, cos_sin, mask, None, train)
    }

    /// [`DecoderLayer::attention_recompute_backward`] of layer `l` (`x` on the layer's device).
    pub fn layer_attention_recompute_backward(
        &self,
        l: usize,
        x: &Tensor,
        dh: &Tensor,
        shared: &mut LayerInputs,
        outputs: Option<Vec<Tensor>>,
        attention: impl FnOnce() -> Result<Option<(Tensor, FlashSaved)>>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let layer = &self.layers[l];
        let (cos_sin, mask) = shared.on(layer.device, layer.rope);
        layer.attention_recompute_backward(x, dh, cos_sin, mask, outputs, attention)
    }

    /// Final norm, output projection and summed next-token cross-entropy from the last hidden
    /// states `h` `[B, T, H]`, back-propagated (scaled by `weight`) into `h`'s graph; returns the
    /// summed loss (detached): the norm keeps its graph, the projection and the loss are
    /// [`loss::linear_cross_entropy_backward`] (through autograd when the projection has an adapter).
    pub fn head_loss_backward(&self, h: &Tensor, labels: &Tensor, weight: f64) -> Result<Tensor> {
        let (normed, target) = self.head_rows(h, labels);
        self.projection_loss_backward(&normed, &target, weight, None)
    }

    /// Summed next-token cross-entropy over label tokens, `Σ_t −log softmax(z_t)[labels[t+1]]`
    /// (fp32; -100: no loss) for the logits `z = head(h)` of `h` `[B, T, H]` (inference: no
    /// dropout, no graph), the head applied to [`loss::LOSS_CHUNK_ELEMENTS`] logits at a time: an
    /// evaluation's full logits would be B·T·V floats (16 GiB in fp32 for 16 rows of 2,048 tokens
    /// and a 128k vocabulary).
    pub fn head_loss_sum(&self, h: &Tensor, labels: &Tensor) -> Tensor {
        self.head_loss_sum_by(h, labels, loss::LOSS_CHUNK_ELEMENTS / self.config.vocab_size.max(1) as i64)
    }

    /// [`Decoder::head_loss_sum`], the head applied to `chunk` rows at a time.
    pub fn head_loss_sum_by(&self, h: &Tensor, labels: &Tensor, chunk: i64) -> Tensor {
        let (rows, target) = self.next_token_rows(h, labels);
        let (n, chunk) = (target.size()[0], chunk.max(1));
        let mut sum = Tensor::zeros([], (Kind::Float, self.head_device));
        for start in (0..n).step_by(chunk as usize) {
            let len = chunk.min(n - start);
            let z = self.head(&rows.narrow(0, start, len).unsqueeze(0), false).squeeze_dim(0).to_kind(Kind::Float);
            sum += z.cross_entropy_loss::<Tensor>(&target.narrow(0, start, len), None, tch::Reduction::Sum, -100, 0.0);
        }
        sum
    }

    /// The rows that predict a next token: `h[:, :-1]` through the final norm (keeping its graph)
    /// `[B·(T-1), H]`, and their targets `labels[:, 1:]` `[B·(T-1)]`, on `head_device`.
    fn head_rows(&self, h: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let (flat, target) = self.next_token_rows(h, labels);
        (self.norm.forward(&flat, true), target)
    }

    /// `h[:, :-1]` `[B·(T-1), H]` and the next tokens `labels[:, 1:]` `[B·(T-1)]`, on `head_device`.
    fn next_token_rows(&self, h: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let (b, t, hidden) = h.size3().unwrap();
        let n = b * (t - 1);
        let flat = h.narrow(1, 0, t - 1).reshape([n, hidden]).to_device(self.head_device);
        (flat, labels.narrow(1, 1, t - 1).reshape([n]).to_device(self.head_device))
    }

    /// [`loss::linear_cross_entropy_backward`] through the output projection, each row's
    /// gradient also scaled by `row_weight` if given.
    fn projection_loss_backward(&self, normed: &Tensor, target: &Tensor, weight: f64, row_weight: Option<&Tensor>) -> Result<Tensor> {
        let cap = self.config.final_softcap;
        match &self.lm_head {
            None => match &self.token_rows {
                // the tied head's trainable rows: their gradient gathered by the fused loss
                Some(t) if t.values.requires_grad() && !crate::nn::linear::adapters_disabled() => {
                    let w = self.embedding_weight().detach();
                    let ids = Tensor::from_slice(&t.ids).to_device(w.device());
                    let grad = Tensor::zeros([t.ids.len() as i64, w.size()[1]], (Kind::Float, w.device()));
                    let loss = loss::linear_cross_entropy_backward(normed, &w, None, target, weight, cap, row_weight, Some((&ids, &grad)))?;
                    crate::cuda::autograd::backward(&[(&t.values, &grad.to_kind(t.values.kind()))])?;
                    Ok(loss)
                }
                _ => loss::linear_cross_entropy_backward(normed, &self.embedding_weight(), None, target, weight, cap, row_weight, None),
            },
            Some(l) if l.adapter.is_none() => loss::linear_cross_entropy_backward(normed, &l.weight.for_input(normed.kind()), l.bias.as_ref(), target, weight, cap, row_weight, None),
            Some(l) => loss::linear_cross_entropy_backward_autograd(l, normed, target, weight, cap, row_weight),
        }
    }

    /// What the model predicts for each next token `labels[:, 1:]` from the last hidden states
    /// `h` `[B, T, H]`, without a graph ([`loss::NextTokenStats`], `[B, T-1]` each).
    pub fn next_token_stats(&self, h: &Tensor, labels: &Tensor) -> loss::NextTokenStats {
        let _g = tch::no_grad_guard();
        let (normed, target) = self.head_rows(h, labels);
        self.stats_of_rows(&normed, &target, h.size()[0])
    }

    /// [`loss::next_token_stats`] of [`Decoder::head_rows`]' rows, shaped `[b, rows / b]`.
    fn stats_of_rows(&self, normed: &Tensor, target: &Tensor, b: i64) -> loss::NextTokenStats {
        let vocab = self.embed_tokens.size()[0];
        loss::next_token_stats(normed, vocab, target, |x| self.project(x)).view(&[b, -1])
    }

    /// The output projection (soft-capped) of normed rows: logits.
    fn project(&self, normed: &Tensor) -> Tensor {
        let logits = match &self.lm_head {
            Some(l) => l.forward(normed, false),
            None => normed.matmul(&self.embedding_weight().tr()),
        };
        loss::softcap(&logits, self.config.final_softcap)
    }

    /// The head for an objective on sequence log-probabilities (DPO, ORPO, KTO), from the last
    /// hidden states `h` `[B, T, H]`: first, without a graph, what the model predicts for each
    /// next token `labels[:, 1:]` ([`loss::NextTokenStats`], `[B, T-1]` each); `loss_of` forms
    /// the objective's loss from them, its `logp` a leaf `ℓ`. Then `w = weight · ∂loss/∂ℓ` is
    /// back-propagated into `h`'s graph (when it has one) as a cross-entropy whose token `t`
    /// carries weight `−w_t` (`log p = −CE`), by the fused linear cross-entropy: full-vocabulary
    /// logits never exist. Returns what `loss_of` returns besides the loss.
    pub fn next_token_head_backward<R>(&self, h: &Tensor, labels: &Tensor, weight: f64, loss_of: impl FnOnce(&loss::NextTokenStats) -> Result<(Tensor, R)>) -> Result<R> {
        let (normed, target) = self.head_rows(h, labels);
        let stats = self.stats_of_rows(&normed, &target, h.size()[0]);
        let leaf = stats.logp.detach().set_requires_grad(normed.requires_grad());
        let (loss, out) = loss_of(&loss::NextTokenStats { logp: leaf.shallow_clone(), ..stats })?;
        if normed.requires_grad() {
            loss.backward();
            let g = leaf.grad();
            if g.defined() {
                let row_weight = (g * -weight).reshape([-1]);
                let _ = self.projection_loss_backward(&normed, &target, 1.0, Some(&row_weight))?;
            }
        }
        Ok(out)
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

    /// What the load-balancing loss weighted by `coef` adds to the loss of a forward with these
    /// routings ([`Decoder::load_balancing`]), over the rows `valid` marks.
    pub fn balance_loss(&self, routes: &[Routing], coef: f64, valid: Option<&Tensor>) -> Option<Tensor> {
        Some(self.load_balancing(routes, &AuxLoss { coef, weight: 1.0, valid: valid.map(Tensor::shallow_clone) })?.0)
    }

    /// The weight of the load-balancing loss in the model's own loss (transformers': config.json's
    /// `router_aux_loss_coef` when it sets `output_router_logits`); 0 for a dense model.
    pub fn model_aux_coef(&self) -> f64 {
        self.config.moe.as_ref().map_or(0.0, |m| m.model_aux_coef())
    }

    /// config.json's `router_aux_loss_coef` of a sparse model, whether or not it sets
    /// `output_router_logits` (TRL's default for its trainers); `None` for a dense model.
    pub fn router_aux_loss_coef(&self) -> Option<f64> {
        self.config.moe.as_ref().map(|m| m.router_aux_loss_coef)
    }

    /// Logits for token ids `[B, T]` at `positions` `[B, T]`.
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, cache: Option<&KvCache>, train: bool) -> Tensor {
        let h = self.hidden(ids, positions, mask, cache, train);
        self.head(&h, train)
    }

    /// Every linear layer with its checkpoint name, in model order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![];
        for l in &self.layers {
            v.extend(l.linears());
        }
        v.extend(self.lm_head.iter());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![];
        for l in &mut self.layers {
            v.extend(l.linears_mut());
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
            for n in l.norms_mut() {
                n.weight = n.weight.to_kind(kind);
            }
            if let Some(moe) = l.mlp.sparse_mut() {
                moe.set_dtype(kind);
            }
        }
        let cast = |lin: &mut Linear| {
            lin.weight = lin.weight.to_kind(kind);
            lin.bias = lin.bias.as_ref().map(|b| b.to_kind(kind));
        };
        // a layer at a time, its projections joined again before the next: the old joint
        // weights go as the new come
        for l in &mut self.layers {
            l.linears_mut().into_iter().for_each(cast);
            l.projections_mut().into_iter().for_each(Projections::join);
        }
        self.lm_head.iter_mut().for_each(cast);
        self.kind = kind;
    }

    /// Bytes of the weights by kind: `(quantized, dense, adapters)`.
    pub fn weight_bytes(&self) -> (usize, usize, usize) {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let quantized: usize = self.linears().iter().filter(|l| l.weight.is_quantized()).map(|l| l.weight.bytes()).sum();
        let dense: usize = self.state_dict().iter().map(|(_, t)| size(t)).sum();
        let adapters: usize = crate::nn::peft::adapter_tensors(self).iter().map(|(_, t)| size(t)).sum();
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
        for n in self.layers.iter().flat_map(|l| l.norms()) {
            v.push((format!("{}.weight", n.name), n.weight.shallow_clone()));
        }
        for lin in self.linears() {
            if let Weight::Dense(w) = &lin.weight {
                v.push((format!("{}.weight", lin.name), w.shallow_clone()));
            }
            if let Some(b) = &lin.bias {
                v.push((format!("{}.bias", lin.name), b.shallow_clone()));
            }
        }
        for moe in self.layers.iter().filter_map(|l| l.mlp.sparse()) {
            v.extend(moe.tensors());
        }
        v.push((format!("{}.weight", self.norm.name), self.norm.weight.shallow_clone()));
        v
    }
}

/// How a micro-batch's load-balancing loss is back-propagated (sparse models): `coef` × the loss
/// (none when 0), scaled by `weight` (the fp16 loss scale, over the window's units), over the rows
/// `valid` marks (`[B, T]`: 1 for a real token, 0 for padding, or how many sequences share the
/// token; all once when `None`).
pub struct AuxLoss {
    pub coef: f64,
    pub weight: f64,
    pub valid: Option<Tensor>,
}

/// How many bytes a training forward can copy to host memory per FLOP of its 16-bit GEMMs and
/// not wait for the copies: ~56 GB/s of PCIe 5 over the ~510 TFLOP/s a checkpointed forward
/// runs at on an H100 (attention and norms included). Measured there on Llama-2-7B's shape
/// (offloaded checkpoints, q+v LoRA): the q, k and v outputs of every layer (1.0e-4 bytes a
/// FLOP with the input and residual) ran 5.8% faster than none, those of 65% of the layers 3.9%;
/// the 1.1B (1.5e-4) keeping every layer's, under a 2.92 GiB budget, ran at 49k tok/s against
/// 63k keeping none (another call).
const HOST_BYTES_PER_FLOP: f64 = 1.1e-4;

/// The share of the host's memory that the offloaded tensors of the processes on it may pin
/// (each process `1/LOCAL_WORLD_SIZE` of it). At 0.6 of 128 GiB, Llama-2-7B's shape keeps
/// attention's output in every layer at 131,072 tokens (inputs and outputs: 64.5 GiB).
const HOST_SHARE: f64 = 0.6;

/// Given each layer's `(share, bytes)`: the share of layers like it that may keep a kind of
/// tensor (by the copies' pace) and the bytes it takes, which layers do: the shares accumulated
/// in layer order, a layer keeping it each time the sum passes a whole number (spread evenly),
/// while the bytes kept stay within `room`.
fn spread(layers: &[(f64, u64)], room: u64) -> Vec<bool> {
    let (mut sum, mut used) = (0.0f64, 0u64);
    layers
        .iter()
        .map(|&(share, bytes)| {
            let before = sum.floor();
            sum += share;
            let keep = sum.floor() > before && used + bytes <= room;
            if keep {
                used += bytes;
            }
            keep
        })
        .collect()
}

/// One layer's costs for [`plan_keeps`], per token: the bytes its copies may take while keeping
/// pace with its forward (after its checkpoints), `(bytes, FLOPs saved)` of keeping attention's
/// output and of keeping the projections' outputs (`None` where it cannot), and the bytes of the
/// checkpointed residual that kept attention replaces ([`DecoderLayer::residual_from_attention`];
/// else 0).
struct KeepCosts {
    pace: f64,
    attention: Option<(u64, f64)>,
    projections: Option<(u64, f64)>,
    replaced: u64,
}

/// What each layer keeps beyond its checkpoints ([`Keep`]) for `tokens` tokens, with `room` bytes
/// of host memory: the kind that saves more FLOPs a byte first, attention only where it saves
/// more than the projections (or nothing is copied: no pace to keep); each kind in the share of
/// layers the pace left after the kinds before allows, [`spread`] evenly, within the room they
/// left.
fn plan_keeps(layers: &[KeepCosts], tokens: u64, mut room: u64) -> Vec<Keep> {
    // (bytes, FLOPs saved) of keeping attention's output (`true`) or the projections' outputs
    let cost = |c: &KeepCosts, attention: bool| if attention { c.attention } else { c.projections };
    let value = |attention: bool| layers.iter().find_map(|c| cost(c, attention)).map(|(bytes, flops)| flops / bytes as f64);
    // the bytes a keep adds to the checkpoints (kept attention's, less the residual it replaces)
    let added = |c: &KeepCosts, attention: bool| cost(c, attention).map(|(bytes, _)| if attention { bytes.saturating_sub(c.replaced).max(1) } else { bytes });
    let attention_first = value(true).is_some_and(|a| value(false).is_none_or(|p| a > p));
    // with nothing to copy (off the GPU) there is no pace to keep: attention too
    let free = layers.iter().all(|c| c.pace.is_infinite());
    let mut keeps = vec![Keep::default(); layers.len()];
    let mut pace: Vec<f64> = layers.iter().map(|c| c.pace).collect();
    let kinds: &[bool] = if attention_first { &[true, false] } else if free { &[false, true] } else { &[false] };
    for &attention in kinds {
        let shares: Vec<(f64, u64)> = layers
            .iter()
            .zip(&pace)
            .map(|(c, &pace)| added(c, attention).map_or((0.0, 0), |bytes| ((pace / bytes as f64).clamp(0.0, 1.0), bytes * tokens)))
            .collect();
        for (l, kept) in spread(&shares, room).into_iter().enumerate() {
            let (share, bytes) = shares[l];
            pace[l] -= share * added(&layers[l], attention).map_or(0.0, |b| b as f64);
            if kept {
                room -= bytes;
                if attention {
                    keeps[l].attention = true;
                } else {
                    keeps[l].projections = true;
                }
            }
        }
    }
    keeps
}

/// A tensor kept from the forward for the recomputation in backward.
enum Kept {
    /// The first layer's input: the embeddings of the ids, looked up again when needed.
    Embedding,
    Device(Tensor),
    /// In pinned host memory, copied on a side stream.
    Host(crate::cuda::Offloaded),
}

impl Kept {
    /// `t` itself, or a host copy of it when `offload` and it is on a GPU.
    fn keep(t: &Tensor, offload: bool) -> Result<Kept> {
        Ok(if offload && t.device().is_cuda() { Kept::Host(crate::cuda::offload(t)?) } else { Kept::Device(t.shallow_clone()) })
    }

    /// Starts copying a host copy back (so it lands while the layer above runs backward).
    fn prefetch(&self) -> Result<Option<crate::cuda::Prefetch>> {
        match self {
            Kept::Host(o) => Ok(Some(o.prefetch()?)),
            _ => Ok(None),
        }
    }

    /// The tensor, on the GPU again, from `pending` (its prefetch) if started.
    fn get(&self, pending: Option<crate::cuda::Prefetch>, net: &Decoder, ids: &Tensor) -> Result<Tensor> {
        Ok(match (self, pending) {
            (Kept::Embedding, _) => net.embed(ids).to_device(net.layers[0].device),
            (Kept::Device(t), _) => t.shallow_clone(),
            (Kept::Host(_), Some(p)) => p.wait()?,
            (Kept::Host(o), None) => o.prefetch()?.wait()?,
        })
    }
}

/// What a checkpointed layer keeps from the forward: its input and, when offloading (host
/// memory is plentiful), what [`Keep`] asked for and the residual after attention (unless
/// attention's output, kept, rebuilds it: [`DecoderLayer::residual_from_attention`]).
struct KeptLayer {
    input: Kept,
    mid: Option<Kept>,
    /// The q, k and v projections' outputs.
    outputs: Option<Vec<Kept>>,
    /// Attention's output and statistics.
    attention: Option<KeptAttention>,
}

/// Attention's output and log-sum-exp as kept, and the GPU kernel that made them.
struct KeptAttention {
    output: Kept,
    lse: Kept,
    gpu: Option<GpuKernel>,
}

/// Kept tensors on their way back to the GPU (each `None` where nothing is copied).
type Fetching = Vec<Option<crate::cuda::Prefetch>>;

impl KeptLayer {
    /// Keeps what the forward of a layer (`mid`, the residual after attention, when offloading
    /// and `mid_from_attention` does not hold for kept attention; and `extra`) left for its
    /// backward, in host memory when offloading.
    fn new(input: Kept, mid: &Tensor, extra: LayerKeeps, offload: bool, mid_from_attention: bool) -> Result<KeptLayer> {
        let rebuilt = mid_from_attention && extra.attention.is_some();
        let mid = if offload && !rebuilt { Some(Kept::keep(mid, true)?) } else { None };
        let outputs = extra.outputs.map(|o| o.iter().map(|t| Kept::keep(t, true)).collect::<Result<Vec<_>>>()).transpose()?;
        let attention = match extra.attention {
            Some((y, saved)) => Some(KeptAttention { output: Kept::keep(&y, true)?, lse: Kept::keep(&saved.lse, true)?, gpu: saved.gpu }),
            None => None,
        };
        Ok(KeptLayer { input, mid, outputs, attention })
    }

    /// Starts copying the input and the residual back.
    fn prefetch(&self) -> Result<Fetching> {
        std::iter::once(&self.input).chain(&self.mid).map(Kept::prefetch).collect()
    }

    /// The input and the residual after attention, on the GPU again (from `pending`, their
    /// [`KeptLayer::prefetch`], where started).
    fn get(&self, pending: Fetching, net: &Decoder, ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let mut pending = pending.into_iter();
        let input = self.input.get(pending.next().flatten(), net, ids)?;
        let mid = match &self.mid {
            Some(m) => Some(m.get(pending.next().flatten(), net, ids)?),
            None => None,
        };
        Ok((input, mid))
    }

    /// Whether the layer kept more than its input and residual.
    fn keeps_more(&self) -> bool {
        self.outputs.is_some() || self.attention.is_some()
    }

    /// Starts copying the projections' outputs back, if kept.
    fn prefetch_outputs(&self) -> Result<Option<Fetching>> {
        self.outputs.as_ref().map(|o| o.iter().map(Kept::prefetch).collect()).transpose()
    }

    /// The projections' outputs on the GPU again, from their [`KeptLayer::prefetch_outputs`].
    fn outputs(&self, pending: Option<Fetching>, net: &Decoder, ids: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let (Some(outputs), Some(pending)) = (&self.outputs, pending) else { return Ok(None) };
        outputs.iter().zip(pending).map(|(k, p)| k.get(p, net, ids)).collect::<Result<Vec<_>>>().map(Some)
    }

    /// Starts copying attention's output and log-sum-exp back, if kept.
    fn prefetch_attention(&self) -> Result<Option<Fetching>> {
        self.attention.as_ref().map(|a| [&a.output, &a.lse].into_iter().map(Kept::prefetch).collect()).transpose()
    }

    /// Attention's output and statistics on the GPU again, from their
    /// [`KeptLayer::prefetch_attention`].
    fn attention(&self, pending: Option<Fetching>, net: &Decoder, ids: &Tensor) -> Result<Option<(Tensor, FlashSaved)>> {
        let (Some(a), Some(pending)) = (&self.attention, pending) else { return Ok(None) };
        let mut pending = pending.into_iter();
        let y = a.output.get(pending.next().flatten(), net, ids)?;
        let lse = a.lse.get(pending.next().flatten(), net, ids)?;
        Ok(Some((y, FlashSaved { lse, gpu: a.gpu.as_ref().map(GpuKernel::shallow_clone) })))
    }
}

/// The training path: each decoder layer kept or recomputed as `Checkpointing` says, the fused head.
impl Decoder {
    /// Forward and backward of one micro-batch (its tensors on the model's device); `weight`
    /// scales the summed loss (1/window tokens, times the fp16 loss scale). Returns the summed
    /// loss (detached). The trainer asks only this of the model.
    ///
    /// Dropout is seeded per half layer (`seed + 2l` for attention, `+ 1` for the MLP), so a run
    /// draws the same masks with and without checkpointing, whichever half is recomputed first.
    /// With gradient checkpointing, the forward runs without a graph keeping only each layer's
    /// input (the first layer's, the embeddings, is looked up again); backward then recomputes one
    /// layer at a time (`∂L/∂x_l` from `g = ∂L/∂x_{l+1}`); with `First(n)` only the layers below
    /// `n` are, and the layers from `n` up keep their graph, which starts at a leaf on layer `n`'s
    /// input whose gradient then enters the recomputation. Recomputed, only the attention block gets a graph:
    /// the MLP's part is formed directly ([`Mlp::recompute_backward`]). When offloading, the
    /// residual after attention, the q, k and v projections' outputs and, for rows longer than
    /// the model is wide, attention's output are kept too (host memory is plentiful; in the
    /// layers whose copies keep pace with the forward, [`Decoder::offloaded_keeps`]): the MLP's
    /// part starts from the residual, attention's recomputation from the projections, and its
    /// backward from its output, so that of the frozen weights only the MLP's gate and up run
    /// again, and attention's forward does not ([`DecoderLayer::attention_recompute_backward`]).
    ///
    /// A sparse model adds `aux.weight` × `aux.coef` × its load-balancing loss (`aux.coef` × the
    /// loss is returned beside the summed loss).
    pub fn loss_and_backward(&self, ids: &Tensor, labels: &Tensor, positions: &Tensor, mask: &AttnMask, weight: f64, aux: &AuxLoss, checkpointing: Checkpointing, seed: i64) -> Result<(Tensor, Option<Tensor>)> {
        self.backward_through_head(ids, positions, mask, checkpointing, seed, Some(aux), |h| self.head_loss_backward(h, labels, weight))
    }

    /// What the load-balancing loss of `routes` ([`crate::nn::moe::load_balancing`]) adds to the
    /// loss, `coef · aux`, and the gradient `aux.weight · coef · ∂aux/∂p` each sparse layer's
    /// probabilities take; `None` unless the model is sparse and `aux.coef` is not 0.
    pub fn load_balancing(&self, routes: &[Routing], aux: &AuxLoss) -> Option<(Tensor, Tensor)> {
        let moe = self.config.moe.as_ref().filter(|_| aux.coef != 0.0)?;
        let first = routes.first()?;
        let valid = aux.valid.as_ref().map(|v| v.to_device(first.probs.device()));
        let (loss, grad) = crate::nn::moe::load_balancing(routes, moe.num_experts as i64, valid.as_ref());
        Some((loss * aux.coef, grad * (aux.weight * aux.coef)))
    }

    /// The last hidden states as the training path computes them (its kernels, its dropout from
    /// `seed`), without a graph: a reference model that must agree with the trained one to the
    /// bit where their weights agree (DPO's, whose log-ratios are then exactly 0) runs this.
    pub fn training_hidden(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, seed: i64) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let mut shared = self.layer_inputs(positions, mask);
        Ok(self.run_layers(ids, &mut shared, None, true, Some(seed), 0, &[], |_, _, _, _| Ok(()))?.0)
    }

    /// What each layer keeps beyond its checkpoints when they go to host memory, for `rows` rows
    /// of `row_len` tokens under `mask` ([`plan_keeps`]): attention's output (where plain causal), whose forward costs `2·T·heads·d`
    /// FLOPs a token for `heads·d` values kept (causal, over `T` positions), where rows are long
    /// enough that it saves more than the q, k and v projections' outputs (`2·H·Σout` for
    /// `Σout`: about rows longer than the model is wide), then those, each as far as the copies
    /// keep pace with the forward, taking [`HOST_BYTES_PER_FLOP`] bytes a FLOP of the layer's
    /// GEMMs after its input and residual, and as the host has room ([`HOST_SHARE`] of its
    /// memory, the checkpoints counted first; kept attention in place of the residual where
    /// [`DecoderLayer::residual_from_attention`]). For Llama-2-7B in bf16: at 2,048 tokens a row the
    /// projections in every layer; at 65,536 and 131,072 attention in every layer and the
    /// projections in as many as the room leaves. For the 1.1B at 2,048, the projections in 29% of the layers.
    /// Off the GPU, everything; in fp32 on a GPU (where FlashAttention does not run), the
    /// projections in every layer.
    fn offloaded_keeps(&self, rows: u64, row_len: u64, mask: &AttnMask) -> Vec<Keep> {
        let elt = self.kind.elt_size_in_bytes() as u64;
        let per_flop = if self.kind == Kind::Float { 10.0 * HOST_BYTES_PER_FLOP } else { HOST_BYTES_PER_FLOP };
        let checkpoint = 2 * self.config.hidden_size as u64 * elt;
        let flops = |ls: &[&Linear]| -> f64 { ls.iter().map(|l| 2.0 * (l.in_features() * l.out_features()) as f64).sum() };
        let layers: Vec<KeepCosts> = self
            .layers
            .iter()
            .map(|layer| {
                let a = &layer.self_attn;
                let qkv = a.qkv.linears();
                let width = (a.n_heads * a.head_dim) as u64;
                let replaced = if layer.residual_from_attention() { self.config.hidden_size as u64 * elt } else { 0 };
                KeepCosts {
                    pace: if layer.device.is_cuda() { per_flop * flops(&layer.linears()) - checkpoint as f64 } else { f64::INFINITY },
                    attention: (a.flashable(mask, row_len as i64) && crate::nn::attention::flash_attention_serves(layer.device, self.kind, a.head_dim)).then_some((width * elt + 4 * a.n_heads as u64, 2.0 * (row_len * width) as f64)),
                    replaced,
                    projections: Some((qkv.iter().map(|l| l.out_features() as u64 * elt).sum(), flops(&qkv))),
                }
            })
            .collect();
        let tokens = rows * row_len;
        let ranks_here = crate::dist::env().map_or(1, |e| e.local_world_size.max(1));
        let host = crate::env::host_memory().map_or(u64::MAX, |m| (m as f64 * HOST_SHARE / ranks_here as f64) as u64);
        plan_keeps(&layers, tokens, host.saturating_sub(checkpoint * tokens * self.layers.len() as u64))
    }

    /// The training forward and backward of [`Decoder::loss_and_backward`] around any `head`:
    /// `head` receives the last hidden states `[B, T, H]` and back-propagates its loss into
    /// their graph (checkpointed: into a leaf whose gradient then flows down the layers). With
    /// `aux`, a sparse model's load-balancing loss ([`Decoder::load_balancing`]) is
    /// back-propagated too, and its value returned.
    pub fn backward_through_head<R>(&self, ids: &Tensor, positions: &Tensor, mask: &AttnMask, checkpointing: Checkpointing, seed: i64, aux: Option<&AuxLoss>, head: impl FnOnce(&Tensor) -> Result<R>) -> Result<(R, Option<Tensor>)> {
        let net = self;
        let offload = checkpointing == Checkpointing::Offload;
        // layers below `split` are checkpointed; those from it up keep their activations
        let split = checkpointing.checkpointed_layers(net.layers.len());
        let mut shared = net.layer_inputs(positions, mask);
        let mut kept: Vec<KeptLayer> = vec![];
        // the input of layer `split`, a leaf, when layers above the checkpointed ones keep theirs
        let mut boundary: Option<Tensor> = None;
        let row_len = ids.size().last().map_or(1, |&t| t.max(1) as u64);
        let keeps = if offload { net.offloaded_keeps(ids.numel() as u64 / row_len, row_len, mask) } else { vec![] };
        let (h, routes) = net.run_layers(ids, &mut shared, None, true, Some(seed), split, &keeps, |l, input, mid, extra| {
            if l == split && l > 0 {
                boundary = Some(input.shallow_clone());
            }
            if l >= split {
                return Ok(());
            }
            let input = if l == 0 { Kept::Embedding } else { Kept::keep(input, offload)? };
            kept.push(KeptLayer::new(input, mid, extra, offload, net.layers[l].residual_from_attention())?);
            Ok(())
        })?;
        let backward = |roots: Vec<(Tensor, Tensor)>| {
            let roots: Vec<(&Tensor, &Tensor)> = roots.iter().filter(|(t, _)| t.requires_grad()).map(|(t, g)| (t, g)).collect();
            crate::cuda::autograd::backward(&roots)
        };
        let balance = aux.and_then(|a| net.load_balancing(&routes, a));
        // the root of the load-balancing loss in a sparse layer's routing
        let balance_root = |routing: Option<Routing>, balance: &Option<(Tensor, Tensor)>| -> Option<(Tensor, Tensor)> {
            let (r, (_, g)) = (routing?, balance.as_ref()?);
            let g = g.to_device(r.probs.device());
            Some((r.probs, g))
        };
        let mut pending = match kept.last() {
            Some(k) => k.prefetch()?,
            None => vec![],
        };
        // the head's loss and the gradient at the top of the checkpointed layers
        let (loss, mut grad) = if split == 0 || boundary.is_some() {
            // `h` has a graph through the layers that kept theirs: the head back-propagates
            // into it, together with their routers' share of the load-balancing loss
            let out = if balance.is_none() {
                head(&h)?
            } else {
                // the head's gradient stops at a leaf, so that one backward carries it and the routers'
                let top = h.detach().set_requires_grad(true);
                let out = head(&top)?;
                let mut roots: Vec<(Tensor, Tensor)> = routes.into_iter().filter_map(|r| balance_root(Some(r), &balance)).collect();
                let g = top.grad();
                if g.defined() {
                    roots.push((h, g));
                }
                backward(roots)?;
                out
            };
            if split == 0 {
                return Ok((out, balance.map(|b| b.0)));
            }
            (out, boundary.as_ref().map_or_else(Tensor::new, Tensor::grad))
        } else {
            drop(routes);
            let top = h.detach().set_requires_grad(true);
            let out = head(&top)?;
            (out, top.grad())
        };
        if !grad.defined() {
            // the head's loss does not depend on the model
            return Ok((loss, balance.map(|b| b.0)));
        }
        for l in (0..split).rev() {
            let (x, mid) = kept[l].get(std::mem::take(&mut pending), net, ids)?;
            // the projections' outputs come back while the MLP's part runs, attention's output
            // after it, and only then the layer below's checkpoint, so that only one layer's kept
            // tensors hold GPU memory at once
            let outputs = kept[l].prefetch_outputs()?;
            if l > 0 && !kept[l].keeps_more() {
                pending = kept[l - 1].prefetch()?;
            }
            // the first layer's input is the embeddings, looked up again: with trainable token
            // rows it keeps its graph to them
            let x = if l == 0 && net.embeddings_train() { x } else { x.detach().set_requires_grad(l > 0) };
            let g = grad.to_device(x.device());
            let layer = &net.layers[l];
            // a layer that kept attention's output `y` in place of the residual after attention
            // rebuilds that: `x + o_proj(y)`, exactly as its forward did
            let mut attention_early = None;
            let mid = match mid {
                None if layer.plain() && kept[l].attention.is_some() => {
                    let fetching = kept[l].prefetch_attention()?;
                    let (y, saved) = kept[l].attention(fetching, net, ids)?.ok_or_else(|| anyhow::anyhow!("layer {l}: kept attention came back empty"))?;
                    let mid = tch::no_grad(|| layer.attention_output(&x, &y, true).0);
                    attention_early = Some((y, saved));
                    Some(mid)
                }
                mid => mid,
            };
            match mid {
                _ if !layer.plain() => {
                    // the whole layer under autograd, with the forward's dropout draws
                    tch::manual_seed(seed + 2 * l as i64);
                    let (_, h, xm) = net.layer_attention_block(l, &x, None, &mut shared, true);
                    tch::manual_seed(seed + 2 * l as i64 + 1);
                    let (y, routing) = layer.mlp_block_routed(&xm, true);
                    backward([(h + y, g)].into_iter().chain(balance_root(routing, &balance)).collect())?;
                }
                None => {
                    tch::manual_seed(seed + 2 * l as i64);
                    let (_, h, xm) = net.layer_attention_block(l, &x, None, &mut shared, true);
                    tch::manual_seed(seed + 2 * l as i64 + 1);
                    let mut roots = layer.dense_mlp()?.recompute_backward(&xm, &g)?;
                    drop(xm);
                    roots.push((h, g));
                    backward(roots)?;
                }
                Some(mid) => {
                    let mid = mid.detach().set_requires_grad(true);
                    tch::manual_seed(seed + 2 * l as i64 + 1);
                    let xm = layer.mlp_norm.forward(&mid, true);
                    backward(layer.dense_mlp()?.recompute_backward(&xm, &g)?)?;
                    drop(xm);
                    let dmid = g + mid.grad();
                    let attention = if attention_early.is_none() { kept[l].prefetch_attention()? } else { None };
                    if l > 0 && kept[l].keeps_more() {
                        pending = kept[l - 1].prefetch()?;
                    }
                    let outputs = kept[l].outputs(outputs, net, ids)?;
                    tch::manual_seed(seed + 2 * l as i64);
                    let layer_kept = &kept[l];
                    let attention = || match attention_early {
                        Some(a) => Ok(Some(a)),
                        None => layer_kept.attention(attention, net, ids),
                    };
                    backward(net.layer_attention_recompute_backward(l, &x, &dmid, &mut shared, outputs, attention)?)?;
                }
            }
            if l > 0 {
                grad = x.grad();
            }
        }
        Ok((loss, balance.map(|b| b.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::{plan_keeps, spread, Keep, KeepCosts};

    #[test]
    fn tensors_are_kept_where_the_copies_keep_pace_and_the_host_has_room() {
        let layers = |share: f64| vec![(share, 10u64); 8];
        assert_eq!(spread(&layers(1.0), u64::MAX), [true; 8]);
        assert_eq!(spread(&layers(0.0), u64::MAX), [false; 8]);
        // every other layer, then a quarter of them, spread evenly
        assert_eq!(spread(&layers(0.5), u64::MAX), [false, true, false, true, false, true, false, true]);
        assert_eq!(spread(&layers(0.25), u64::MAX).iter().filter(|&&k| k).count(), 2);
        // the host's room: the first three that would keep them
        assert_eq!(spread(&layers(1.0), 35), [true, true, true, false, false, false, false, false]);
        assert_eq!(spread(&layers(1.0), 0), [false; 8]);
    }

    /// Llama-2-7B's layers in bf16 on a GPU, per token: GEMMs of 404 MFLOP, checkpoints of 16 KiB,
    /// q/k/v outputs of 24 KiB saving 101 MFLOP, attention's output (8 KiB and 128 bytes of
    /// log-sum-exp) saving `2·T·4096` FLOPs at `T` tokens a row; o_proj with dropout, so that
    /// kept attention replaces no residual.
    fn llama_7b(row_len: u64) -> Vec<KeepCosts> {
        let pace = 1.1e-4 * 404.0e6 - 16384.0;
        (0..32).map(|_| KeepCosts { pace, attention: Some((8192 + 128, 2.0 * (row_len * 4096) as f64)), projections: Some((24576, 100.7e6)), replaced: 0 }).collect()
    }

    #[test]
    fn attention_is_kept_first_where_rows_are_longer_than_the_model_is_wide() {
        let count = |keeps: &[Keep], f: fn(&Keep) -> bool| keeps.iter().filter(|k| f(k)).count();
        // 4 rows of 2,048: the projections everywhere (the copies keep pace), attention nowhere
        let short = plan_keeps(&llama_7b(2048), 8192, u64::MAX);
        assert_eq!((count(&short, |k| k.projections), count(&short, |k| k.attention)), (32, 0));
        // one row of 65,536: attention everywhere, then the projections in the pace left (80%)
        let long = plan_keeps(&llama_7b(65536), 65536, u64::MAX);
        assert_eq!((count(&long, |k| k.attention), count(&long, |k| k.projections)), (32, 25));
        // with 20 GiB of host room: attention's 32 × 0.5 GiB first, the projections in what is left
        let room = plan_keeps(&llama_7b(65536), 65536, 20 << 30);
        assert_eq!((count(&room, |k| k.attention), count(&room, |k| k.projections)), (32, 2));
        // on the CPU (no pace to keep), both everywhere, short rows too
        for row_len in [2048, 65536] {
            let cpu: Vec<KeepCosts> = llama_7b(row_len).into_iter().map(|c| KeepCosts { pace: f64::INFINITY, ..c }).collect();
            assert!(plan_keeps(&cpu, row_len, u64::MAX).iter().all(|k| k.attention && k.projections));
        }
        // a family whose attention cannot be kept (soft-capped): the projections alone
        let capped: Vec<KeepCosts> = llama_7b(65536).into_iter().map(|c| KeepCosts { attention: None, ..c }).collect();
        assert_eq!(count(&plan_keeps(&capped, 65536, u64::MAX), |k| k.attention), 0);
        // where kept attention replaces the residual (8 KiB), it adds only its log-sum-exp: at
        // 131,072 tokens with 1 GiB of room, attention everywhere (16 MiB a layer), else nowhere
        let replacing: Vec<KeepCosts> = llama_7b(131072).into_iter().map(|c| KeepCosts { replaced: 8192, ..c }).collect();
        assert_eq!(count(&plan_keeps(&replacing, 131072, 1 << 30), |k| k.attention), 32);
        assert_eq!(count(&plan_keeps(&llama_7b(131072), 131072, 1 << 30), |k| k.attention), 0);
        // and short rows still keep the projections, not attention (valued by all it holds)
        let short: Vec<KeepCosts> = llama_7b(2048).into_iter().map(|c| KeepCosts { replaced: 8192, ..c }).collect();
        assert_eq!(count(&plan_keeps(&short, 8192, u64::MAX), |k| k.attention), 0);
    }
}
