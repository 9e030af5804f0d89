//! DoRA (Liu et al., 2024): LoRA's update on the weight's direction, with each output row's
//! length learnt on its own, as peft's `use_dora` computes it.
//!
//! `W' = m ⊙ (W + s·BA) / ‖W + s·BA‖` (row norms, `m: [out]`), so
//! `y = x W'ᵀ + b = y_base + (g − 1) ⊙ (x Wᵀ) + g ⊙ s·(x Aᵀ Bᵀ)` with `g = m / ‖W + s·BA‖`.
//! As in peft, the norm is detached (no gradient flows through it; the paper's §4.3), `m`
//! starts as `‖W‖` (B starts at zero, so the layer starts unchanged), and with dropout `x`
//! is dropped out in both the `x Wᵀ` and the LoRA term (the base output keeps the full `x`).

use super::Lora;
use crate::nn::linear::Weight;
use tch::{Kind, Tensor};

pub struct Dora {
    pub lora: Lora,
    /// `m` `[out]`, peft's `lora_magnitude_vector`.
    pub magnitude: Tensor,
}

/// `‖w‖` over each row `[out]` (`torch.linalg.norm(w, dim=1)`), in `w`'s dtype.
fn row_norms(w: &Tensor) -> Tensor {
    w.linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>)
}

impl Dora {
    /// DoRA on `lora` for the base weight `weight`: `m = ‖W + s·BA‖` (`‖W‖` for a fresh adapter),
    /// in the adapter's dtype.
    pub fn new(lora: Lora, weight: &Weight) -> Dora {
        let magnitude = crate::nn::no_grad(|| {
            let w = weight.dense().to_kind(lora.a.kind());
            row_norms(&(w + lora.merged_delta())).to_kind(lora.a.kind())
        });
        Dora { magnitude: magnitude.set_requires_grad(true), lora }
    }

    /// `g = m / ‖W + s·BA‖` `[1, out]` in `kind`, the norm detached and taken in `kind` (as peft
    /// takes it in the input's dtype).
    fn gain(&self, w: &Tensor, kind: Kind) -> Tensor {
        let norm = crate::nn::no_grad(|| {
            let ba = self.lora.b.matmul(&self.lora.a).to_kind(kind);
            row_norms(&(w + ba * self.lora.scale))
        });
        (&self.magnitude / norm.to_kind(self.magnitude.kind())).to_kind(kind).view([1, -1])
    }

    /// `y + (g − 1)·(x' Wᵀ) + g·s·(x' Aᵀ Bᵀ)` for the base output `y` `[N, out]` of `x`
    /// `[N, in]` (bias included) by the dense weight `w` (in `x`'s dtype), `x'` being
    /// `dropout(x)` while training.
    pub fn add_to(&self, y: Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, train: bool) -> Tensor {
        let g = self.gain(w, x.kind());
        let (x, base) = if train && self.lora.dropout > 0.0 {
            let x = x.dropout(self.lora.dropout, true);
            let base = x.matmul(&w.tr());
            (x, base)
        } else {
            let base = match bias {
                Some(b) => &y - b,
                None => y.shallow_clone(),
            };
            (x.shallow_clone(), base)
        };
        let (a, b) = (self.lora.a.to_kind(x.kind()), self.lora.b.to_kind(x.kind()));
        let update = x.matmul(&a.tr()).matmul(&b.tr()) * self.lora.scale;
        y + (&g - 1.0) * base + g * update
    }

    /// The merged weight `m ⊙ (W + s·BA) / ‖W + s·BA‖` for the base weight `w`, in `w`'s dtype.
    pub fn merged_weight(&self, w: &Tensor) -> Tensor {
        let adapted = w + self.lora.merged_delta().to_kind(w.kind());
        let g = &self.magnitude.to_kind(w.kind()) / row_norms(&adapted);
        adapted * g.unsqueeze(1)
    }
}
