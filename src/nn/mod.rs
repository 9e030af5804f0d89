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

thread_local! {
    /// Set inside [`inference_kernels`].
    static INFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tensors derived once for the forwards of an [`inference_kernels`] scope (an adapter's
    /// scaled, cast weights), by the address of the tensor they derive from and what they are;
    /// [`forget_prepared`] drops them.
    static PREPARED: std::cell::RefCell<std::collections::HashMap<(usize, &'static str), Vec<Tensor>>> = Default::default();
}

/// What `make` derives from `from` (`what` names it), made on the first call of this
/// [`inference_kernels`] scope (see `PREPARED`).
pub(crate) fn prepared(from: &Tensor, what: &'static str, make: impl FnOnce() -> Vec<Tensor>) -> Vec<Tensor> {
    let key = (from.data_ptr() as usize, what);
    PREPARED.with(|p| p.borrow_mut().entry(key).or_insert_with(make).iter().map(Tensor::shallow_clone).collect())
}

/// Drops what [`prepared`] made (an [`inference_kernels`] scope ends: the adapters may train again).
pub fn forget_prepared() {
    PREPARED.with(|p| p.borrow_mut().clear());
}

/// Whether to use the fused kernels: on a GPU, while training and inside [`inference_kernels`]
/// (generation, and training's evaluation). SwiGLU and RoPE (`crate::cuda::autograd`) round
/// exactly like transformers' ops; RMSNorm rounds once where transformers rounds twice
/// ([`norm::RmsNorm`]). Other inference (`model.loss`, `logits`) keeps transformers' exact op
/// sequence.
pub(crate) fn fused(x: &Tensor, train: bool) -> bool {
    (train || inference()) && x.device().is_cuda()
}

/// Whether this thread is inside [`inference_kernels`].
pub(crate) fn inference() -> bool {
    INFERENCE.with(std::cell::Cell::get)
}

/// Whether a forward without dropout on a GPU over `x` fuses further: gate/up by one GEMM
/// (`Projections::forward_joint`) and `swiglu_halves`; in a decoding step also q/k/v by one GEMM
/// and `decode_qkv`, and at up to [`crate::cuda::autograd::DECODE_ROWS`] rows `decode_linear`,
/// of [`crate::cuda::autograd`] (`tests/fused.rs` checks each against the ops it replaces).
pub(crate) fn decode_fusion(x: &Tensor, train: bool) -> bool {
    !train && fused(x, train)
}

/// `f` with the fused kernels on for forwards without autograd or dropout: decoding steps,
/// where each op's launch costs more than its work, and a generation's prompts or an
/// evaluation's records, where transformers' op sequence passes over the activations several
/// times more. Off again however `f` ends; the outermost scope then forgets what its forwards
/// [`prepared`].
pub fn inference_kernels<T>(f: impl FnOnce() -> T) -> T {
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            forget_prepared();
        }
    }
    let _forget = (!inference()).then_some(Forget);
    with_flag(&INFERENCE, f)
}

/// `f` with the thread-local `flag` set, and back as it was however `f` ends (also by a panic).
pub(crate) fn with_flag<T>(flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>, f: impl FnOnce() -> T) -> T {
    struct Restore(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|c| c.replace(true)));
    f()
}

/// `f` without autograd, which comes back on when `f` ends, also by a panic (a CUDA
/// out-of-memory error arrives as one): `tch::no_grad` restores it only when `f` returns.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}
