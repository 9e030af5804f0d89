//! The adapters a linear layer may carry, behind one enum: the model and the trainer ask an
//! [`Adapter`] for its contribution to a forward (or the weight it replaces), its parameters
//! (named as peft names them), and its merged weight, and never branch on the kind. Plain LoRA also has fused training
//! kernels (`crate::cuda::autograd::projections`, the checkpointed MLP backward); a layer
//! whose adapters are not all plain LoRA takes the autograd path.
//!
//! Adding a kind: one file here, a variant below, and its arms in `Adapter`'s methods.

pub mod adalora;
pub mod dora;
pub mod lora;

pub use adalora::AdaLora;
pub use dora::Dora;
pub use lora::Lora;

use tch::Tensor;

pub enum Adapter {
    Lora(Lora),
    Dora(Dora),
    AdaLora(AdaLora),
    /// peft's `modules_to_save`: a trained copy of the whole weight replaces it (kept in the
    /// adapters' dtype, fp32 under mixed precision).
    Copy(Tensor),
}

impl Adapter {
    /// The low-rank pair (`A`, `B`, scale, dropout) of LoRA and DoRA.
    pub fn low_rank(&self) -> Option<&Lora> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dora(d) => Some(&d.lora),
            Adapter::AdaLora(_) | Adapter::Copy(_) => None,
        }
    }

    /// The dropout probability on the adapter's input (none for a trained copy of the weight).
    pub fn dropout(&self) -> f64 {
        match self {
            Adapter::Lora(l) => l.dropout,
            Adapter::Dora(d) => d.lora.dropout,
            Adapter::AdaLora(a) => a.dropout,
            Adapter::Copy(_) => 0.0,
        }
    }

    /// The weight used in place of the base weight, for a kind that replaces it.
    pub fn replaced_weight(&self) -> Option<&Tensor> {
        match self {
            Adapter::Copy(w) => Some(w),
            _ => None,
        }
    }

    /// The adapter when it is plain LoRA: what the fused kernels know.
    pub fn as_lora(&self) -> Option<&Lora> {
        match self {
            Adapter::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// The adapted output for `x` `[N, in]` from the layer's output `y = x Wᵀ + b` `[N, out]`,
    /// `w` being the dense `W` that computed it, in `x`'s dtype (the [replaced
    /// weight](Adapter::replaced_weight) where there is one).
    pub fn add_to(&self, y: Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, train: bool) -> Tensor {
        match self {
            Adapter::Lora(l) => l.add_to(y, x, train),
            Adapter::Dora(d) => d.add_to(y, x, w, bias, train),
            Adapter::AdaLora(a) => a.add_to(y, x, train),
            Adapter::Copy(_) => y,
        }
    }

    /// The weight with the adapter folded in, from the base weight `w`, in `w`'s dtype.
    pub fn merged_weight(&self, w: &Tensor) -> Tensor {
        match self {
            Adapter::Lora(l) => w + l.merged_delta().to_kind(w.kind()),
            Adapter::Dora(d) => d.merged_weight(w),
            Adapter::AdaLora(a) => w + a.merged_delta().to_kind(w.kind()),
            Adapter::Copy(c) => c.to_kind(w.kind()),
        }
    }

    /// The trainable tensors with the suffix peft gives each after the module's path.
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        let mut v = vec![];
        if let Some(l) = self.low_rank() {
            v.extend([("lora_A.weight", l.a.shallow_clone()), ("lora_B.weight", l.b.shallow_clone())]);
        }
        match self {
            Adapter::Dora(d) => v.push(("lora_magnitude_vector", d.magnitude.shallow_clone())),
            Adapter::Copy(w) => v.push(("weight", w.shallow_clone())),
            Adapter::AdaLora(a) => v.extend([("lora_A", a.a.shallow_clone()), ("lora_B", a.b.shallow_clone()), ("lora_E", a.e.shallow_clone())]),
            Adapter::Lora(_) => {}
        }
        v
    }
}
