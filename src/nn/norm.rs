//! RMSNorm, `w · x / √(mean(x²) + ε)` computed in fp32 as transformers does (Gemma's variant:
//! `(1 + w) · x / √(mean(x²) + ε)`).

use super::fused;
use tch::{Kind, Tensor};

/// RMSNorm as transformers computes it: normalise in fp32, cast back, then scale. When training
/// on a GPU, and in generation and training's evaluation there ([`super::inference_kernels`]), it
/// is one kernel each way (ftscript's `add_rms_norm`, or libtorch's `_fused_rms_norm` where that
/// cannot run) instead of ~8 elementwise kernels, scaling before the cast (one rounding instead
/// of two; the fp32 sum may round differently in the last bit); other inference (`model.loss`,
/// `logits`) uses transformers' exact op sequence.
pub struct RmsNorm {
    /// The checkpoint name of the norm (`model.layers.0.input_layernorm`); its tensor is `{name}.weight`.
    pub name: String,
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma's norms scale by `1 + w` (their weights are stored centred on 0), multiplying in
    /// fp32 before the cast back: `((x / rms) · (1 + w)).to(dtype)`; Llama's cast first,
    /// `w · (x / rms).to(dtype)`.
    pub unit_offset: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_residual(x, None, train).1
    }

    /// The weight the fused kernels scale by, in `kind`: `w`, or Gemma's `1 + w` rounded to
    /// `kind` (made once an [`super::inference_kernels`] scope).
    pub(crate) fn fused_scale(&self, kind: Kind) -> Tensor {
        if !self.unit_offset {
            return self.weight.shallow_clone();
        }
        let make = || (self.weight.to_kind(Kind::Float) + 1.0).to_kind(kind);
        if super::inference() { super::prepared(&self.weight, "unit offset", || vec![make()]).remove(0) } else { make() }
    }

    /// The residual add before the norm, `(h + delta, norm(h + delta))` (`(h, norm(h))` without
    /// `delta`). Training on a GPU, the add is part of the norm's kernel each way (and backward
    /// adds the norm's input gradient to the residual's); otherwise the add, then the norm.
    pub fn forward_residual(&self, h: &Tensor, delta: Option<&Tensor>, train: bool) -> (Tensor, Tensor) {
        let fused = fused(h, train);
        let scale = if fused { self.fused_scale(h.kind()) } else { self.weight.shallow_clone() };
        if fused {
            if let Some(r) = crate::cuda::autograd::add_rms_norm(h, delta, &scale, self.eps) {
                return r;
            }
        }
        let sum = match delta {
            Some(d) => h + d,
            None => h.shallow_clone(),
        };
        if fused {
            let width = self.weight.size()[0];
            let normed = sum.internal_fused_rms_norm([width].as_slice(), Some(&scale), self.eps).0;
            return (sum, normed);
        }
        // transformers' op sequence
        let kind = sum.kind();
        let xf = sum.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = if self.unit_offset {
            (xf * (var + self.eps).rsqrt() * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
        } else {
            &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(kind)
        };
        (sum, normed)
    }
}
