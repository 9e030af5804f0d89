//! RMSNorm, `w · x / √(mean(x²) + ε)` computed in fp32 as transformers does.

use super::fused;
use tch::{Kind, Tensor};

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
