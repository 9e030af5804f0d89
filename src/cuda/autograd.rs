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
    fn ftscript_backward(roots: *const *const C_tensor, grads: *const *const C_tensor, n: i32, err: *mut c_char, err_len: usize) -> i32;
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
