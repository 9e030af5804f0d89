//! AdamW over the trainable tensors, as torch.optim.AdamW computes it (decoupled weight decay):
//!
//! ```text
//! p ← p·(1 − lr·λ)
//! m ← β₁m + (1−β₁)g          v ← β₂v + (1−β₂)g²
//! p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
//! ```

use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

// Multi-tensor versions (src/cuda/optim.cpp).
extern "C" {
    fn ftscript_adamw_fused(params: *const *const C_tensor, exp_avg: *const *const C_tensor, exp_avg_sq: *const *const C_tensor, n: i32, step: i64, lr: f64, beta1: f64, beta2: f64, weight_decay: f64, eps: f64, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_clip_grad_norm(params: *const *const C_tensor, n: i32, max_norm: f64, total: *mut *mut C_tensor, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_zero_grads(params: *const *const C_tensor, n: i32, err: *mut c_char, err_len: usize) -> i32;
}

fn ptrs(ts: &[Tensor]) -> Vec<*const C_tensor> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (t).
    pub step: i64,
    /// First and second moments, one pair per parameter, in parameter order.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Tensor], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: params.iter().map(|p| p.zeros_like()).collect(),
            v: params.iter().map(|p| p.zeros_like()).collect(),
        }
    }

    /// One update of every parameter from its `.grad()` at learning rate `lr`: on a GPU by
    /// torch's fused multi-tensor kernel (one launch per device instead of ~8 per parameter),
    /// elsewhere op by op.
    pub fn step(&mut self, params: &[Tensor], lr: f64) -> anyhow::Result<()> {
        if params.first().is_some_and(|p| p.device().is_cuda()) {
            self.step += 1;
            let (p, m, v) = (ptrs(params), ptrs(&self.m), ptrs(&self.v));
            // SAFETY: the pointers are live tensors borrowed for the call.
            return crate::cuda::call("AdamW", |err, len| unsafe {
                ftscript_adamw_fused(p.as_ptr(), m.as_ptr(), v.as_ptr(), p.len() as i32, self.step, lr, self.beta1, self.beta2, self.weight_decay, self.eps, err, len)
            });
        }
        let _g = tch::no_grad_guard();
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        for (i, p) in params.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            if self.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = self.m[i].lerp_(&g, 1.0 - self.beta1);
            let _ = self.v[i].g_mul_scalar_(self.beta2);
            let _ = self.v[i].g_add_(&(&g * &g * (1.0 - self.beta2)));
            let denom = self.v[i].sqrt() / bc2.sqrt() + self.eps;
            let _ = p.g_sub_(&(&self.m[i] / denom * (lr / bc1)));
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients; scales them down to `max_norm` when above it, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, clamped to 1),
/// with one multi-tensor kernel per device and dtype. Returns the norm before clipping (a 0-dim
/// tensor; no host sync).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> anyhow::Result<Tensor> {
    let p = ptrs(params);
    let mut total: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tensors borrowed for the call; `total` comes back allocated
    // with `new` and is owned by the result.
    crate::cuda::call("clip_grad_norm", |err, len| unsafe { ftscript_clip_grad_norm(p.as_ptr(), p.len() as i32, max_norm, &mut total, err, len) })?;
    Ok(unsafe { Tensor::from_ptr(total) })
}

/// Sets the parameters' gradients to zero (those that have one), with one multi-tensor kernel
/// per device and dtype instead of one per parameter.
pub fn zero_grads(params: &[Tensor]) -> anyhow::Result<()> {
    let p = ptrs(params);
    // SAFETY: the pointers are live tensors borrowed for the call.
    crate::cuda::call("zero_grads", |err, len| unsafe { ftscript_zero_grads(p.as_ptr(), p.len() as i32, err, len) })
}
