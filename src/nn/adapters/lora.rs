//! Plain LoRA, the adapter every other kind builds on.

use tch::{Kind, Tensor};

/// A decoding step's `x · (s·A)ᵀ` for the prepared `s·A` `[r, in]`: the GEMV kernel of the base
/// projections where it fits (so the step's kernels follow each other without a cuBLAS launch
/// between them), else `matmul`.
pub(crate) fn down_rows(x: &Tensor, scaled_a: &Tensor) -> Tensor {
    crate::cuda::autograd::decode_linear(x, scaled_a, None, None).unwrap_or_else(|| x.matmul(&scaled_a.tr()))
}

/// A LoRA adapter (Hu et al., 2021) for a linear layer `W: [out, in]`:
///
/// `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`, `B: [out, r]`,
/// `s = alpha / r` (or `alpha / √r` with rsLoRA).
/// A starts Kaiming-uniform (`U(-1/√in, 1/√in)`, peft's `a=√5`), B starts at zero, so the
/// adapted layer starts equal to the base layer.
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// Fresh adapter; A is drawn from `rng` (seeded by the caller, so runs are reproducible).
    pub fn new(in_features: i64, out_features: i64, r: i64, scale: f64, dropout: f64, kind: Kind, device: tch::Device, rng: &mut impl rand::Rng) -> Lora {
        let bound = 1.0 / (in_features as f64).sqrt();
        let values: Vec<f32> = (0..r * in_features).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        let a = Tensor::from_slice(&values).view([r, in_features]).to_kind(kind).to_device(device).set_requires_grad(true);
        let b = Tensor::zeros([out_features, r], (kind, device)).set_requires_grad(true);
        Lora { a, b, scale, dropout }
    }

    /// `y + s · dropout(x) Aᵀ Bᵀ` for the base output `y` `[N, out]` of `x` `[N, in]`, added into
    /// `y` in place by one GEMM (`y += (s · dropout(x) Aᵀ) Bᵀ`: the scale applies to the
    /// `[N, r]` product, and no `[N, out]` delta is formed).
    pub fn add_to(&self, mut y: Tensor, x: &Tensor, train: bool) -> Tensor {
        let (xa, b) = self.down(x, train);
        let _ = y.addmm_(&xa, &b.tr());
        y
    }

    /// The update alone, `(s · dropout(x) Aᵀ) Bᵀ` `[N, out]`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        let (xa, b) = self.down(x, train);
        xa.matmul(&b.tr())
    }

    /// `s · dropout(x) Aᵀ` `[N, r]` and `B`, in `x`'s dtype (adapters may be kept in fp32 while the
    /// base runs in bf16/fp16; gradients flow back through the cast).
    pub(crate) fn down(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        if super::super::decode_fusion(x, train) {
            // a decoding step: `s·A` and `B` in x's dtype, made once per generation
            let ab = super::super::prepared(&self.a, "lora", || vec![self.scaled_a(x.kind()), self.b.to_kind(x.kind())]);
            return (down_rows(x, &ab[0]), ab[1].shallow_clone());
        }
        let x = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let (a, b) = if self.a.kind() == x.kind() {
            (self.a.shallow_clone(), self.b.shallow_clone())
        } else {
            (self.a.to_kind(x.kind()), self.b.to_kind(x.kind()))
        };
        (x.matmul(&a.tr()) * self.scale, b)
    }

    /// `s·A` in `kind`, the down projection a decoding step multiplies by.
    pub(crate) fn scaled_a(&self, kind: Kind) -> Tensor {
        (&self.a * self.scale).to_kind(kind)
    }

    /// The dense update `s · B A`, shaped like the base weight.
    pub fn merged_delta(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }
}
