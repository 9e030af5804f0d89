//! The adapters a linear layer may carry, behind one enum: the model and the trainer ask an
//! [`Adapter`] for its contribution to a forward, its parameters (named as peft names them),
//! and its merged weight, and never branch on the kind. Plain LoRA also has fused training
//! kernels (`crate::cuda::autograd::projections`, the checkpointed MLP backward); a layer
//! whose adapters are not all plain LoRA takes the autograd path.
//!
//! Adding a kind: one file here, a variant below, and its arms in `Adapter`'s methods.

pub mod dora;
pub mod lora;

pub use dora::Dora;
pub use lora::Lora;

use super::linear::Weight;
use tch::Tensor;

pub enum Adapter {
    Lora(Lora),
    Dora(Dora),
}

impl Adapter {
    /// The low-rank pair every kind has (`A`, `B`, scale, dropout).
    pub fn low_rank(&self) -> &Lora {
        match self {
            Adapter::Lora(l) => l,
            Adapter::Dora(d) => &d.lora,
        }
    }

    /// The adapter when it is plain LoRA: what the fused kernels know.
    pub fn as_lora(&self) -> Option<&Lora> {
        match self {
            Adapter::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// The adapted output for `x` `[N, in]` from the base output `y = x Wᵀ + b` `[N, out]`.
    pub fn add_to(&self, y: Tensor, x: &Tensor, weight: &Weight, bias: Option<&Tensor>, train: bool) -> Tensor {
        match self {
            Adapter::Lora(l) => l.add_to(y, x, train),
            Adapter::Dora(d) => d.add_to(y, x, weight, bias, train),
        }
    }

    /// The weight with the adapter folded in, from the base weight `w`, in `w`'s dtype.
    pub fn merged_weight(&self, w: &Tensor) -> Tensor {
        match self {
            Adapter::Lora(l) => w + l.merged_delta().to_kind(w.kind()),
            Adapter::Dora(d) => d.merged_weight(w),
        }
    }

    /// The trainable tensors with the suffix peft gives each after the module's path.
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        let l = self.low_rank();
        let mut v = vec![("lora_A.weight", l.a.shallow_clone()), ("lora_B.weight", l.b.shallow_clone())];
        if let Adapter::Dora(d) = self {
            v.push(("lora_magnitude_vector", d.magnitude.shallow_clone()));
        }
        v
    }
}
