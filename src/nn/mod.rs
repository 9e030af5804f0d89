//! Layers and weight files: the building blocks every model family shares.
pub mod adapters;
pub mod attention;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod peft;
pub mod quant;
pub mod rope;
pub mod weights;

pub use adapters::{Adapter, Lora};
pub use linear::Linear;
pub use weights::WeightSource;
use tch::Tensor;

/// Whether to use the fused training kernels: while training on a GPU. SwiGLU and RoPE
/// (`crate::cuda::autograd`) round exactly like transformers' ops; RMSNorm rounds once where
/// transformers rounds twice ([`norm::RmsNorm`]). Inference and evaluation keep transformers' exact
/// op sequence.
pub(crate) fn fused(x: &Tensor, train: bool) -> bool {
    train && x.device().is_cuda()
}

/// `f` without autograd, which comes back on when `f` ends, also by a panic (a CUDA
/// out-of-memory error arrives as one): `tch::no_grad` restores it only when `f` returns.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}
