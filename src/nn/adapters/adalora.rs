//! AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose rank budget is re-allocated while
//! training, as peft's `AdaLoraModel` computes it.
//!
//! `y = x Wᵀ + b + s · dropout(x) (A ⊙ E)ᵀ Bᵀ` with `A: [r, in]`, `E: [r, 1]` (the singular
//! values), `B: [out, r]` and `s = alpha / (r₀ + 1e-5)`, `r₀` the initial rank (peft's
//! `ranknum`, kept when the adapter is cut down to its budget). A and B start `N(0, 0.02²)`, E at
//! zero. Training masks triplets `(Aᵢ, Eᵢ, Bᵢ)` by setting `Eᵢ = 0` (`crate::train::adalora`);
//! `keep` records which survive, and a saved adapter holds only those (peft's `rank_pattern`).

use tch::{Kind, Tensor};

pub struct AdaLora {
    pub a: Tensor,
    pub e: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// Which of the `r₀` triplets the last budget step kept (`None` before the first). The
    /// tensors hold all `r₀` while training, only the kept ones when loaded from a saved adapter.
    pub keep: std::cell::RefCell<Option<Vec<bool>>>,
}

impl AdaLora {
    /// Fresh triplets of rank `r`, drawn from `rng`.
    pub fn new(in_features: i64, out_features: i64, r: i64, alpha: f64, dropout: f64, kind: Kind, device: tch::Device, rng: &mut impl rand::Rng) -> AdaLora {
        // N(0, 0.02²) by Box–Muller
        let normal = |n: i64, rng: &mut dyn rand::RngCore| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let (u, v): (f64, f64) = (1.0 - rand::Rng::gen::<f64>(rng), rand::Rng::gen(rng));
                    (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        };
        let param = |v: Vec<f32>, shape: [i64; 2]| Tensor::from_slice(&v).view(shape).to_kind(kind).to_device(device).set_requires_grad(true);
        let a = param(normal(r * in_features, rng), [r, in_features]);
        let b = param(normal(out_features * r, rng), [out_features, r]);
        let e = Tensor::zeros([r, 1], (kind, device)).set_requires_grad(true);
        AdaLora { a, e, b, scale: Self::scale(alpha, r), dropout, keep: std::cell::RefCell::new(None) }
    }

    /// `alpha / (r₀ + 1e-5)` (peft's `scaling / ranknum`; alpha ≤ 0 means `r₀`).
    pub fn scale(alpha: f64, initial_rank: i64) -> f64 {
        let alpha = if alpha > 0.0 { alpha } else { initial_rank as f64 };
        alpha / (initial_rank as f64 + 1e-5)
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// `y + s · dropout(x) (A ⊙ E)ᵀ Bᵀ`.
    pub fn add_to(&self, y: Tensor, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let ae = (&self.a * &self.e).to_kind(x.kind());
        y + x.matmul(&ae.tr()).matmul(&self.b.to_kind(x.kind()).tr()) * self.scale
    }

    /// `s · B (A ⊙ E)`, shaped like the base weight.
    pub fn merged_delta(&self) -> Tensor {
        self.b.matmul(&(&self.a * &self.e)) * self.scale
    }
}
