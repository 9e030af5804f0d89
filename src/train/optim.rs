//! AdamW over the trainable tensors, as torch.optim.AdamW computes it (decoupled weight decay):
//!
//! ```text
//! p ← p·(1 − lr·λ)
//! m ← β₁m + (1−β₁)g          v ← β₂v + (1−β₂)g²
//! p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
//! ```

use tch::Tensor;

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

    /// One update of every parameter from its `.grad()` at learning rate `lr`.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
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
    }
}

/// Global L2 norm of the gradients; scales them down to `max_norm` when above it, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, clamped to 1).
/// Returns the norm before clipping (a 0-dim tensor; no host sync).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    let _g = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return Tensor::from(0.0f32);
    }
    // (gradients of a model split across GPUs live on several devices: reduce on the first)
    let first = grads[0].device();
    let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(tch::Kind::Float).norm().to_device(first)).collect();
    let total = Tensor::stack(&norms, 0).norm();
    if max_norm > 0.0 {
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for g in &grads {
            let mut g = g.shallow_clone();
            let _ = g.g_mul_(&coef.to_kind(g.kind()).to_device(g.device()));
        }
    }
    total
}
