//! What attention layers share: the mask kind, the per-forward inputs every layer reads (rotary
//! cos/sin and the mask, copied to each device of a split model), and the KV cache.

use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// Which keys each query may attend to.
pub enum AttnMask {
    /// Causal over the whole row (right padding needs nothing more: labels mask the pads).
    Causal,
    /// Causal within segments: `[B, T]` ids; several packed examples share a row.
    Segments(Tensor),
    /// Causal, and only over the keys marked valid: `[B, K]` bool over the whole KV cache
    /// (left-padded prompts in batched generation).
    Padded(Tensor),
    /// Several sequences sharing a prefix in one row (a preference pair's prompt, then its two
    /// completions): `segments` `[B, T]`, 0 the prefix, seen by every later token of its row; any
    /// other segment sees the prefix and itself, causally. `positions` `[B, T]` (each sequence's
    /// own) measure a sliding window.
    SharedPrefix { segments: Tensor, positions: Tensor },
}

impl AttnMask {
    pub fn to_device(&self, d: Device) -> AttnMask {
        match self {
            AttnMask::Causal => AttnMask::Causal,
            AttnMask::Segments(s) => AttnMask::Segments(s.to_device(d)),
            AttnMask::Padded(v) => AttnMask::Padded(v.to_device(d)),
            AttnMask::SharedPrefix { segments, positions } => AttnMask::SharedPrefix { segments: segments.to_device(d), positions: positions.to_device(d) },
        }
    }
}

/// What causal attention's backward reads besides its inputs and output, kept from a forward by
/// [`flash_attention`]: each row's log-sum-exp of its scaled scores (fp32), and on a GPU which
/// kernel ran.
pub struct FlashSaved {
    pub lse: Tensor,
    pub gpu: Option<GpuKernel>,
}

/// The GPU kernel of a [`flash_attention`] forward, whose backward must match it: cuDNN's or
/// FlashAttention-2's, with its RNG state (unused without dropout, handed back as given), and
/// whether it read shared key/value heads as they are (`false`: repeated for each query head).
pub struct GpuKernel {
    pub cudnn: bool,
    pub seed: Tensor,
    pub offset: Tensor,
    pub shared_heads: bool,
}

impl GpuKernel {
    pub fn shallow_clone(&self) -> GpuKernel {
        GpuKernel { cudnn: self.cudnn, seed: self.seed.shallow_clone(), offset: self.offset.shallow_clone(), shared_heads: self.shared_heads }
    }
}

/// Causal attention `softmax(q kᵀ · scale) v` of `q` `[B, H, T, d]` over `k`, `v` `[B, H_kv, T, d]`
/// (each key/value head shared by `H / H_kv` query heads), without a graph: the output as
/// `[B, T, H·d]` and what [`flash_attention_backward`] needs, so that backward need not run the
/// forward again. libtorch's kernels: on a GPU in bf16/fp16 the one its SDPA picks (cuDNN's on
/// H100/H200, else FlashAttention-2), which read shared key/value heads as they are, on the CPU
/// its FlashAttention in any float type, over the heads repeated; `None` where they do not serve
/// (fp32 on a GPU, `d` not a multiple of 8 or above 256).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Option<(Tensor, FlashSaved)> {
    let (b, h, t, d) = q.size4().ok()?;
    if !flash_attention_serves(q.device(), q.kind(), d) {
        return None;
    }
    let _no_graph = tch::no_grad_guard();
    let (out, saved) = if q.device().is_cuda() {
        if GPU_KERNELS_FAILED.load(Ordering::Relaxed) {
            return None;
        }
        let shared = k.size()[1] != h && !SHARED_HEADS_REFUSED.load(Ordering::Relaxed);
        let kernel = |shared: bool| {
            let (k, v) = if shared { (k.shallow_clone(), v.shallow_clone()) } else { (repeat_heads(k, h), repeat_heads(v, h)) };
            crate::cuda::autograd::flash_attention(q, &k, &v, scale)
        };
        let ran = match kernel(shared) {
            Err(e) if shared => {
                shared_heads_refused(&e);
                kernel(false).map(|r| (r, false))
            }
            r => r.map(|r| (r, shared)),
        };
        let (([out, lse, seed, offset], cudnn), shared_heads) = ran.inspect_err(gpu_kernels_failed).ok()?;
        (out, FlashSaved { lse, gpu: Some(GpuKernel { cudnn, seed, offset, shared_heads }) })
    } else {
        let (k, v) = (repeat_heads(k, h), repeat_heads(v, h));
        let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, &k, &v, 0.0, true, None::<Tensor>, scale).ok()?;
        (out, FlashSaved { lse, gpu: None })
    };
    Some((out.transpose(1, 2).contiguous().view([b, t, h * d]), saved))
}

/// Whether [`flash_attention`] has a kernel for heads of `head_dim` in `kind` on `device`: `d` a
/// multiple of 8 up to 256, and on a GPU bf16 or fp16 (any float type on the CPU).
pub fn flash_attention_serves(device: Device, kind: Kind, head_dim: i64) -> bool {
    head_dim % 8 == 0 && head_dim <= 256 && (!device.is_cuda() || matches!(kind, Kind::BFloat16 | Kind::Half))
}

/// Set once a GPU attention kernel called without a graph has failed: no later forward keeps
/// attention's output (backward recomputes attention instead).
static GPU_KERNELS_FAILED: AtomicBool = AtomicBool::new(false);

fn gpu_kernels_failed(e: &anyhow::Error) {
    if !GPU_KERNELS_FAILED.swap(true, Ordering::Relaxed) {
        tracing::warn!("attention's kernels refused a kept forward or its backward; attention is recomputed in backward from now on: {e:#}");
    }
}

/// Set once a GPU attention kernel has refused key/value heads shared by several query heads:
/// from then on they are repeated for each query head first.
static SHARED_HEADS_REFUSED: AtomicBool = AtomicBool::new(false);

fn shared_heads_refused(e: &anyhow::Error) {
    if !SHARED_HEADS_REFUSED.swap(true, Ordering::Relaxed) {
        tracing::info!("attention's kernel refused shared key/value heads; they are repeated for each query head from now on: {e:#}");
    }
}

/// `(∂q, ∂k, ∂v)` of [`flash_attention`] (in the inputs' shapes) from the gradient `dy` of its
/// output `y` `[B, T, H·d]`, given its inputs and `saved`; without a graph.
pub fn flash_attention_backward(dy: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, y: &Tensor, saved: &FlashSaved, scale: f64) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (b, h, t, d) = q.size4()?;
    let kv_heads = k.size()[1];
    let _no_graph = tch::no_grad_guard();
    let heads = |x: &Tensor| x.view([b, t, h, d]).transpose(1, 2);
    let (dout, out) = (heads(dy), heads(y));
    // a shared key/value head's gradient sums those of the query heads that read it
    let fold = |g: Tensor| if g.size()[1] == kv_heads { g } else { g.reshape([b, kv_heads, h / kv_heads, t, d]).sum_dim_intlist(2, false, g.kind()) };
    let repeated = || (repeat_heads(k, h), repeat_heads(v, h));
    let [dq, dk, dv] = match &saved.gpu {
        Some(g) => {
            // the forward's output and statistics serve whichever form of k and v the backward reads
            let kernel = |(k, v): (Tensor, Tensor)| crate::cuda::autograd::flash_attention_backward(&dout, q, &k, &v, [&out, &saved.lse, &g.seed, &g.offset], g.cudnn, scale);
            let grads = match g.shared_heads {
                true => kernel((k.shallow_clone(), v.shallow_clone())).or_else(|e| {
                    shared_heads_refused(&e);
                    kernel(repeated())
                }),
                false => kernel(repeated()),
            };
            grads.inspect_err(gpu_kernels_failed)?
        }
        None => {
            let (kr, vr) = repeated();
            let (dq, dk, dv) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(&dout, q, &kr, &vr, &out, &saved.lse, 0.0, true, None::<Tensor>, scale)?;
            [dq, dk, dv]
        }
    };
    Ok((dq, fold(dk), fold(dv)))
}

/// Soft-capped attention as transformers' eager path computes it (Gemma 2): `softmax(cap ·
/// tanh(q kᵀ · scale / cap))` over the keys `allowed` marks (`[T, S]`, or `[B or 1, 1, T, S]`),
/// in fp32, times `v`; `q` `[B, H, T, d]`, `k`, `v` `[B, H, S, d]`. With `causal_rows` (no
/// query sees a key after its own position, S = T) the queries go in blocks that each leave out
/// the keys after the block's last query: at 8 blocks 56% of the scores' FLOPs and memory.
pub fn softcapped_attention(q: &Tensor, k: &Tensor, v: &Tensor, allowed: &Tensor, scale: f64, cap: f64, causal_rows: bool) -> Tensor {
    let t = q.size()[2];
    let blocks = if causal_rows { (t / SOFTCAP_BLOCK_ROWS).clamp(1, 8) } else { 1 };
    let rows = (t + blocks - 1) / blocks;
    let parts: Vec<Tensor> = (0..t).step_by(rows as usize).map(|start| {
        let (len, keys) = if blocks == 1 { (t, k.size()[2]) } else { (rows.min(t - start), (start + rows).min(t)) };
        let (q, k, v) = (q.narrow(2, start, len), k.narrow(2, 0, keys), v.narrow(2, 0, keys));
        let allowed = allowed.narrow(-2, start, len).narrow(-1, 0, keys);
        let raw = q.matmul(&k.transpose(2, 3));
        let (b, tq, tk) = (raw.size()[0], raw.size()[2], raw.size()[3]);
        let fused = if raw.device().is_cuda() { crate::cuda::autograd::softcap_softmax(&raw, &allowed.expand([b, 1, tq, tk], false), scale, cap) } else { None };
        let probs = fused.unwrap_or_else(|| {
            let scores = crate::nn::loss::softcap(&(raw * scale), Some(cap));
            scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Float).to_kind(q.kind())
        });
        probs.matmul(&v)
    }).collect();
    if parts.len() == 1 { parts.into_iter().next().unwrap() } else { Tensor::cat(&parts, 2) }
}

/// Query rows a block of [`softcapped_attention`] holds at least.
const SOFTCAP_BLOCK_ROWS: i64 = 256;

/// `x` `[B, H_kv, T, d]` with each head repeated to make `heads` (itself when they are as many).
pub fn repeat_heads(x: &Tensor, heads: i64) -> Tensor {
    let kv_heads = x.size()[1];
    if kv_heads == heads {
        x.shallow_clone()
    } else {
        x.repeat_interleave_self_int(heads / kv_heads, 1, None)
    }
}

/// What every layer of one forward shares (rotary cos/sin tables, the attention mask), with a
/// copy on each device of a model split across GPUs. Most models have one rotary table; Gemma 3
/// has a second for its sliding-window layers.
pub struct LayerInputs {
    copies: Vec<(Device, Vec<(Tensor, Tensor)>, AttnMask)>,
}

impl LayerInputs {
    pub fn new(tables: Vec<(Tensor, Tensor)>, mask: &AttnMask) -> LayerInputs {
        let d = tables[0].0.device();
        LayerInputs { copies: vec![(d, tables, mask.to_device(d))] }
    }

    /// Rotary table `table` and the mask on `d`, copied there on first use.
    pub fn on(&mut self, d: Device, table: usize) -> (&(Tensor, Tensor), &AttnMask) {
        let i = match self.copies.iter().position(|c| c.0 == d) {
            Some(i) => i,
            None => {
                let (_, tables, mask) = &self.copies[0];
                let tables = tables.iter().map(|(cos, sin)| (cos.to_device(d), sin.to_device(d))).collect();
                let copy = (d, tables, mask.to_device(d));
                self.copies.push(copy);
                self.copies.len() - 1
            }
        };
        let (_, tables, m) = &self.copies[i];
        (&tables[table], m)
    }
}

/// Keys and values for incremental decoding, in buffers of a fixed capacity per layer
/// (`[B, kv_heads, capacity, head_dim]`), so that every decoding step has the same shapes and
/// reads and writes the same memory (what a CUDA graph replays). A forward over the prompts
/// (`at` None) writes slots `0..T` and attends to the prompts alone; a one-token step writes slot
/// `at` (`[1]` int64, on the device) and attends to the slots its [`AttnMask::Padded`] marks valid.
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
    pub at: Option<Tensor>,
}

/// One layer's part of a [`KvCache`].
#[derive(Clone, Copy)]
pub struct CacheSlot<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub at: Option<&'a Tensor>,
}

impl KvCache {
    /// Zeroed buffers for `b` rows of `capacity` positions; `layers` gives each layer's device
    /// and `(kv_heads, head_dim)`.
    pub fn new(layers: impl IntoIterator<Item = (Device, i64, i64)>, b: i64, capacity: i64, kind: tch::Kind) -> KvCache {
        let zeros = |d, h, hd| Tensor::zeros([b, h, capacity, hd], (kind, d));
        KvCache { layers: layers.into_iter().map(|(d, h, hd)| (zeros(d, h, hd), zeros(d, h, hd))).collect(), at: None }
    }

    /// Layer `l`'s buffers and where this forward writes.
    pub fn slot(&self, l: usize) -> CacheSlot<'_> {
        let (k, v) = &self.layers[l];
        CacheSlot { k, v, at: self.at.as_ref() }
    }
}

#[cfg(test)]
mod tests {
    use super::softcapped_attention;
    use tch::{Device, Kind, Tensor};

    /// Blocks of queries over the keys up to each block's end give whole rows' outputs and
    /// gradients: a causal mask, and packed segments (ragged blocks: 600 rows in 2 of 300).
    #[test]
    fn soft_capped_attention_in_query_blocks_equals_whole_rows() {
        tch::manual_seed(7);
        let (b, h, t, d) = (2, 3, 600, 8);
        let opts = (Kind::Double, Device::Cpu);
        let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
        let seg = Tensor::arange(t, (Kind::Int64, Device::Cpu)).divide_scalar_mode(250, "floor").unsqueeze(0).repeat([b, 1]);
        let segments = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1)).logical_and(&causal).unsqueeze(1);
        for allowed in [causal.shallow_clone(), segments] {
            let run = |blocked: bool| {
                let [q, k, v] = [0, 1, 2].map(|_| (Tensor::randn([b, h, t, d], opts) * 3.0).set_requires_grad(true));
                let y = softcapped_attention(&q, &k, &v, &allowed, 0.35, 5.0, blocked);
                let dy = Tensor::randn([b, h, t, d], opts);
                (y * &dy).sum(Kind::Double).backward();
                (q.grad(), k.grad(), v.grad())
            };
            tch::manual_seed(11);
            let whole = run(false);
            tch::manual_seed(11);
            let blocked = run(true);
            for (a, e) in [(&blocked.0, &whole.0), (&blocked.1, &whole.1), (&blocked.2, &whole.2)] {
                let diff = (a - e).abs().max().double_value(&[]);
                assert!(diff < 1e-10, "gradients differ by {diff}");
            }
        }
    }
}
