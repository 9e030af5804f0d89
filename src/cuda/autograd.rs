//! Fused training ops with their own backward (`src/cuda/autograd.cpp`, C++
//! `torch::autograd::Function`s around the kernels of `src/cuda/kernels.cu`), and backward from
//! several roots at once. The fused ops return `None` off the GPU or when the kernels cannot be
//! built, and callers then use the equivalent libtorch ops.

use super::kernels::{checked, SOURCE};
use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ftscript_swiglu(src: *const c_char, gate: *const C_tensor, up: *const C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_swiglu_backward_(src: *const c_char, dout: *const C_tensor, gate: *const C_tensor, up: *const C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_rope(src: *const c_char, x: *const C_tensor, cos: *const C_tensor, sin: *const C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_projections(src: *const c_char, x: *const C_tensor, weights: *const *const C_tensor, biases: *const *const C_tensor, adapter_of: *const i64, n: i32, a: *const *const C_tensor, b: *const *const C_tensor, scales: *const f64, dropouts: *const f64, m: i32, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_add_rms_norm(src: *const c_char, h: *const C_tensor, delta: *const C_tensor, w: *const C_tensor, eps: f64, sum: *mut *mut C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_decode_attention(src: *const c_char, q: *const C_tensor, k: *const C_tensor, v: *const C_tensor, valid: *const C_tensor, at: *const C_tensor, window: i64, scale: f64, softcap: f64, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_decode_qkv(src: *const c_char, qkv: *const C_tensor, cos: *const C_tensor, sin: *const C_tensor, qw: *const C_tensor, kw: *const C_tensor, eps: f64, kc: *const C_tensor, vc: *const C_tensor, at: *const C_tensor, heads: i64, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_decode_linear(src: *const c_char, x: *const C_tensor, w: *const C_tensor, bias: *const C_tensor, xa: *const C_tensor, lb: *const C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_swiglu_halves(src: *const c_char, gu: *const C_tensor, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_softcap_softmax(src: *const c_char, x: *const C_tensor, allowed: *const C_tensor, scale: f64, cap: f64, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_overlap_lora(on: i32);
    fn ftscript_flash_attention(q: *const C_tensor, k: *const C_tensor, v: *const C_tensor, scale: f64, out: *mut *mut C_tensor, lse: *mut *mut C_tensor, seed: *mut *mut C_tensor, offset: *mut *mut C_tensor, cudnn: *mut i32, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_flash_attention_backward(dout: *const C_tensor, q: *const C_tensor, k: *const C_tensor, v: *const C_tensor, out: *const C_tensor, lse: *const C_tensor, seed: *const C_tensor, offset: *const C_tensor, cudnn: i32, scale: f64, dq: *mut *mut C_tensor, dk: *mut *mut C_tensor, dv: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_attention_without_cudnn(q: *const C_tensor, k: *const C_tensor, v: *const C_tensor, mask: *const C_tensor, causal: i32, scale: f64, out: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_backward(roots: *const *const C_tensor, grads: *const *const C_tensor, n: i32, err: *mut c_char, err_len: usize) -> i32;
}

/// Whether [`projections`] run LoRA's kernels on a second stream of the GPU, beside the frozen
/// weights' GEMMs (whose tails leave SMs idle for them): 0.8% faster at 7B, but cuBLAS keeps a
/// workspace for each stream (~64 MiB more at the peak). Off at start.
pub fn overlap_lora(on: bool) {
    // SAFETY: sets an atomic flag.
    unsafe { ftscript_overlap_lora(on as i32) }
}

/// Whether `t`'s data starts on a 16-byte boundary (the kernels move 16-byte words).
fn aligned16(t: &Tensor) -> bool {
    (t.data_ptr() as usize).is_multiple_of(16)
}

/// Runs a C entry point that creates one tensor.
fn fused(on: &Tensor, call: impl FnOnce(*mut *mut C_tensor, *mut c_char, usize) -> i32) -> Option<Tensor> {
    if !on.device().is_cuda() {
        return None;
    }
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: on success `out` is a tensor allocated with `new`, owned (and freed) by the result.
    checked(|err, len| call(&mut out, err, len)).then(|| unsafe { Tensor::from_ptr(out) })
}

/// `silu(gate) · up` in one kernel each way, saving `gate` and `up` for backward (the unfused
/// ops also keep `silu(gate)`). Same rounding as the ops in the forward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Option<Tensor> {
    fused(gate, |out, err, len| unsafe { ftscript_swiglu(SOURCE.as_ptr() as *const c_char, gate.as_ptr(), up.as_ptr(), out, err, len) })
}

/// SwiGLU's backward on its own, in place: `(∂L/∂gate, ∂L/∂up)` of `silu(gate) · up` from
/// `∂L/∂out`, written over `gate` and `up` (contiguous, on a GPU; the kernel of [`swiglu`]'s
/// backward, no graph). False, with nothing written, when it cannot run.
pub fn swiglu_backward_in_place(dout: &Tensor, gate: &Tensor, up: &Tensor) -> bool {
    if !gate.device().is_cuda() || !gate.is_contiguous() || !up.is_contiguous() {
        return false;
    }
    checked(|err, len| unsafe { ftscript_swiglu_backward_(SOURCE.as_ptr() as *const c_char, dout.as_ptr(), gate.as_ptr(), up.as_ptr(), err, len) })
}

/// Rotary embedding of `x` `[B, T, heads, d]` by `cos`, `sin` `[B, T, d]`:
/// `x·cos + rotate_half(x)·sin` in one kernel each way, output laid out like `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
    fused(x, |out, err, len| unsafe { ftscript_rope(SOURCE.as_ptr() as *const c_char, x.as_ptr(), cos.as_ptr(), sin.as_ptr(), out, err, len) })
}

/// Soft-capped attention probabilities (Gemma 2): `softmax(cap · tanh(x · scale / cap))` over
/// the keys `allowed` `[B, 1, tq, tk]` (bool) lets each query see, from raw scores `x`
/// `[B, heads, tq, tk]`, in fp32, stored in `x`'s dtype; one kernel each way, saving `x` and the
/// probabilities. `None` off the GPU.
pub fn softcap_softmax(x: &Tensor, allowed: &Tensor, scale: f64, cap: f64) -> Option<Tensor> {
    fused(x, |out, err, len| unsafe { ftscript_softcap_softmax(SOURCE.as_ptr() as *const c_char, x.as_ptr(), allowed.as_ptr(), scale, cap, out, err, len) })
}

/// The most cache positions [`decode_attention`] takes (kernels.cu's DECODE_MAX_CAP).
pub const DECODE_MAX_CAP: i64 = 4096;
/// The largest head size [`decode_attention`] takes (kernels.cu's DECODE_MAX_DIM).
pub const DECODE_MAX_DIM: i64 = 256;

/// One decoding step's attention over a fixed-capacity KV cache, in one kernel (no autograd):
/// `q` `[B, heads, 1, d]`, `k`, `v` `[B, kv_heads, cap, d]`, the keys `valid` `[B, cap]` marks and,
/// with a `window`, those fewer than `window` slots behind `at` (`[1]`, the step's slot);
/// `softmax(q kᵀ · scale)` (soft-capped at ±`softcap` first, if given) times `v`, in fp32.
/// Returns `[B, 1, heads·d]`; `None` off the GPU or past the kernel's sizes (cap
/// [`DECODE_MAX_CAP`], d [`DECODE_MAX_DIM`] and a multiple of 8).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, valid: &Tensor, at: &Tensor, window: Option<i64>, scale: f64, softcap: Option<f64>) -> Option<Tensor> {
    if k.size()[2] > DECODE_MAX_CAP || k.size()[3] > DECODE_MAX_DIM || k.size()[3] % 8 != 0 {
        return None;
    }
    let (window, softcap) = (window.unwrap_or(0), softcap.unwrap_or(0.0));
    fused(q, |out, err, len| unsafe {
        ftscript_decode_attention(SOURCE.as_ptr() as *const c_char, q.as_ptr(), k.as_ptr(), v.as_ptr(), valid.as_ptr(), at.as_ptr(), window, scale, softcap, out, err, len)
    })
}

/// Attention without autograd of `q` `[B, H, T, d]` over `k`, `v` `[B, H, S, d]` (as many heads),
/// `[B, H, T, d]`: causal, or by `mask` (`[B, 1, T, S]` bool, true where a key is seen), by
/// libtorch's SDPA without cuDNN's kernel (`src/cuda/autograd.cpp` says why).
/// `None` off the GPU or if libtorch fails.
pub fn attention_without_cudnn(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> Option<Tensor> {
    let mask = mask.map_or(std::ptr::null(), |m| m.as_ptr());
    // SAFETY: the inputs are live tensors (the mask null or one); on success `out` is allocated with `new`.
    fused(q, |out, err, len| unsafe { ftscript_attention_without_cudnn(q.as_ptr(), k.as_ptr(), v.as_ptr(), mask, causal as i32, scale, out, err, len) })
}

/// A decoding step's heads from the output of a joint q/k/v projection, in one kernel (no
/// autograd): `qkv` `[B, 1, heads·d + 2·kv_heads·d]`; the query and key heads normalized over `d`
/// by `norms` `(w_q, w_k, ε)` if given (Qwen3; rounded once, as [`add_rms_norm`]) and rotated by
/// `cos`, `sin` `[B, 1, d]` (as [`rope`]); the keys and values written into slot `at` (`[1]`) of
/// the caches `k_cache`, `v_cache` `[B, kv_heads, cap, d]`. Returns the queries `[B, heads, 1, d]`;
/// `None` off the GPU or where the kernel does not fit (d a multiple of 16 up to 256).
#[allow(clippy::too_many_arguments)]
pub fn decode_qkv(qkv: &Tensor, (cos, sin): (&Tensor, &Tensor), norms: Option<(&Tensor, &Tensor, f64)>, k_cache: &Tensor, v_cache: &Tensor, at: &Tensor, heads: i64) -> Option<Tensor> {
    let d = k_cache.size()[3];
    let kind = qkv.kind();
    let aligned = [qkv, cos, sin, k_cache, v_cache].iter().all(|t| t.is_contiguous() && t.kind() == kind && aligned16(t));
    let norms_fit = norms.is_none_or(|(q, k, _)| [q, k].iter().all(|w| w.is_contiguous() && w.kind() == kind && w.numel() == d as usize && aligned16(w)));
    if d % 16 != 0 || d > 256 || *cos.size().last()? != d || qkv.size().last()? % 8 != 0 || !aligned || !norms_fit || at.kind() != tch::Kind::Int64 {
        return None;
    }
    let (qw, kw, eps) = norms.map_or((std::ptr::null(), std::ptr::null(), 0.0), |(q, k, e)| (q.as_ptr(), k.as_ptr(), e));
    fused(qkv, |out, err, len| unsafe {
        ftscript_decode_qkv(SOURCE.as_ptr() as *const c_char, qkv.as_ptr(), cos.as_ptr(), sin.as_ptr(), qw, kw, eps, k_cache.as_ptr(), v_cache.as_ptr(), at.as_ptr(), heads, out, err, len)
    })
}

/// The most rows [`decode_linear`] takes.
pub const DECODE_ROWS: i64 = 8;

/// `x Wᵀ + bias` then `+ xa Bᵀ` (a LoRA update, `xa = s·x·Aᵀ` `[rows, r]`, `lora_b` `[out, r]`), each
/// rounded, in one kernel for at most [`DECODE_ROWS`] rows of `x` `[.., in]` (decoding steps, where cuBLAS's
/// GEMV leaves bandwidth unused and the update would be another launch). No autograd; `None`
/// off the GPU or where the kernel does not fit (more rows, `in` not a multiple of 8).
pub fn decode_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<(&Tensor, &Tensor)>) -> Option<Tensor> {
    let (size, (out, inp)) = (x.size(), (w.size()[0], w.size()[1]));
    let kind = x.kind();
    let fits = |t: &Tensor| t.is_contiguous() && t.kind() == kind;
    let rows = x.numel() as i64 / inp.max(1);
    if size.last() != Some(&inp)
        || !(1..=DECODE_ROWS).contains(&rows)
        || inp % 8 != 0
        || ![x, w].iter().all(|t| fits(t) && aligned16(t))
        || !bias.is_none_or(|b| fits(b) && b.numel() == out as usize)
        || !lora.is_none_or(|(xa, b)| {
            let rank = *xa.size().last().unwrap_or(&0);
            fits(xa) && fits(b) && b.size() == [out, rank] && xa.numel() as i64 == rows * rank
        })
    {
        return None;
    }
    let (xa, lb) = lora.map_or((std::ptr::null(), std::ptr::null()), |(xa, b)| (xa.as_ptr(), b.as_ptr()));
    let b = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    fused(x, |o, err, len| unsafe { ftscript_decode_linear(SOURCE.as_ptr() as *const c_char, x.as_ptr(), w.as_ptr(), b, xa, lb, o, err, len) })
}

/// `silu(gate) · up` for `gu` `[.., 2·I]` holding each row's gate and up side by side (the
/// output of a joint gate/up projection), in one kernel, no autograd; `[.., I]`.
pub fn swiglu_halves(gu: &Tensor) -> Option<Tensor> {
    if !gu.is_contiguous() || gu.size().last()? % 16 != 0 {
        return None;
    }
    fused(gu, |out, err, len| unsafe { ftscript_swiglu_halves(SOURCE.as_ptr() as *const c_char, gu.as_ptr(), out, err, len) })
}

/// RMSNorm after a residual add, `(s, w ⊙ s / √(mean(s²) + ε))` for `s = h + delta` (or `h`), over
/// the last dimension, one kernel each way; backward adds the norm's input gradient to the
/// sum's own. The norm rounds once, as libtorch's `_fused_rms_norm`; `w` must be frozen and in
/// `h`'s dtype, rows a multiple of 8 wide and at most 8192. `None` where it cannot run.
pub fn add_rms_norm(h: &Tensor, delta: Option<&Tensor>, w: &Tensor, eps: f64) -> Option<(Tensor, Tensor)> {
    let width = *h.size().last()?;
    if !h.device().is_cuda() || w.requires_grad() || w.kind() != h.kind() || width % 8 != 0 || width > 8192 {
        return None;
    }
    let (mut sum, mut out): (*mut C_tensor, *mut C_tensor) = (std::ptr::null_mut(), std::ptr::null_mut());
    let d = delta.map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: on success `out` (and `sum`, given a delta) are tensors allocated with `new`.
    checked(|err, len| unsafe { ftscript_add_rms_norm(SOURCE.as_ptr() as *const c_char, h.as_ptr(), d, w.as_ptr(), eps, &mut sum, &mut out, err, len) })
        .then(|| unsafe { (if sum.is_null() { h.shallow_clone() } else { Tensor::from_ptr(sum) }, Tensor::from_ptr(out)) })
}

/// Back-propagates `Σᵢ ⟨rootᵢ, gradᵢ⟩` into the leaves' `.grad` (what `backward(gradient=…)`
/// does for one root), without forming the products. Roots that do not require a gradient are
/// skipped.
pub fn backward(roots: &[(&Tensor, &Tensor)]) -> anyhow::Result<()> {
    let roots: Vec<&(&Tensor, &Tensor)> = roots.iter().filter(|(t, _)| t.requires_grad()).collect();
    if roots.is_empty() {
        return Ok(());
    }
    let r: Vec<*const C_tensor> = roots.iter().map(|(t, _)| t.as_ptr()).collect();
    let g: Vec<*const C_tensor> = roots.iter().map(|(_, g)| g.as_ptr()).collect();
    // SAFETY: the pointers are live tensors borrowed for the call.
    super::call("backward", |err, len| unsafe { ftscript_backward(r.as_ptr(), g.as_ptr(), r.len() as i32, err, len) })
}

/// libtorch's causal FlashAttention on a GPU (bf16 or fp16; q `[B, H, T, d]`, k and v
/// `[B, H_kv, T, d]`, `H` a multiple of `H_kv`), without a graph, by the kernel SDPA picks (cuDNN's or FlashAttention-2's):
/// `([out, lse, seed, offset], cudnn)`, the output `[B, H, T, d]`, each row's log-sum-exp of its
/// scores (fp32), the kernel's RNG state, and whether cuDNN's kernel ran: what
/// [`flash_attention_backward`] reads. An error where the kernel refuses the inputs.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> anyhow::Result<([Tensor; 4], bool)> {
    let mut o: [*mut C_tensor; 4] = [std::ptr::null_mut(); 4];
    let [a, b, c, d] = &mut o;
    let mut cudnn = 0i32;
    // SAFETY: the inputs are live tensors; on success the four outputs are allocated with `new`.
    super::call("flash attention", |err, len| unsafe { ftscript_flash_attention(q.as_ptr(), k.as_ptr(), v.as_ptr(), scale, a, b, c, d, &mut cudnn, err, len) })?;
    Ok((o.map(|p| unsafe { Tensor::from_ptr(p) }), cudnn != 0))
}

/// `[∂q, ∂k, ∂v]` of [`flash_attention`] from the output's gradient `dout` (`[B, H, T, d]`, the
/// output's layout), given its inputs, `[out, lse, seed, offset]` and which kernel ran.
pub fn flash_attention_backward(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, saved: [&Tensor; 4], cudnn: bool, scale: f64) -> anyhow::Result<[Tensor; 3]> {
    let mut o: [*mut C_tensor; 3] = [std::ptr::null_mut(); 3];
    let [a, b, c] = &mut o;
    let [out, lse, seed, offset] = saved.map(Tensor::as_ptr);
    // SAFETY: the inputs are live tensors; on success the three outputs are allocated with `new`.
    super::call("flash attention backward", |err, len| unsafe {
        ftscript_flash_attention_backward(dout.as_ptr(), q.as_ptr(), k.as_ptr(), v.as_ptr(), out, lse, seed, offset, cudnn as i32, scale, a, b, c, err, len)
    })?;
    Ok(o.map(|p| unsafe { Tensor::from_ptr(p) }))
}

/// A LoRA adapter as [`projections`] takes it: `(A, B, scale, dropout)`.
pub type Adapter<'a> = (&'a Tensor, &'a Tensor, f64, f64);

/// The projections of one input `x` `[N, in]`, `y_i = x W_iᵀ + b_i (+ s · (dropout(x) Aᵀ) Bᵀ)`,
/// as one autograd node (`src/cuda/autograd.cpp`, `Projections`), whose backward accumulates
/// `∂L/∂x` from every projection and adapter into one buffer. Works on any device.
pub fn projections(x: &Tensor, parts: &[(Tensor, Option<&Tensor>, Option<Adapter>)]) -> anyhow::Result<Vec<Tensor>> {
    let weights: Vec<*const C_tensor> = parts.iter().map(|p| p.0.as_ptr()).collect();
    let biases: Vec<*const C_tensor> = parts.iter().map(|p| p.1.map_or(std::ptr::null(), |b| b.as_ptr())).collect();
    let adapters: Vec<&Adapter> = parts.iter().filter_map(|p| p.2.as_ref()).collect();
    let mut next = 0;
    let adapter_of: Vec<i64> = parts.iter().map(|p| if p.2.is_some() { next += 1; next - 1 } else { -1 }).collect();
    let a: Vec<*const C_tensor> = adapters.iter().map(|l| l.0.as_ptr()).collect();
    let b: Vec<*const C_tensor> = adapters.iter().map(|l| l.1.as_ptr()).collect();
    let scales: Vec<f64> = adapters.iter().map(|l| l.2).collect();
    let dropouts: Vec<f64> = adapters.iter().map(|l| l.3).collect();
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); parts.len()];
    // SAFETY: the pointers are live tensors borrowed for the call; on success every `out[i]` is a
    // tensor allocated with `new`, owned (and freed) by the result.
    super::call("projections", |err, len| unsafe {
        ftscript_projections(
            SOURCE.as_ptr() as *const c_char,
            x.as_ptr(),
            weights.as_ptr(),
            biases.as_ptr(),
            adapter_of.as_ptr(),
            parts.len() as i32,
            a.as_ptr(),
            b.as_ptr(),
            scales.as_ptr(),
            dropouts.as_ptr(),
            adapters.len() as i32,
            out.as_mut_ptr(),
            err,
            len,
        )
    })?;
    Ok(out.into_iter().map(|t| unsafe { Tensor::from_ptr(t) }).collect())
}
