//! Losses: next-token cross-entropy, and the fused linear cross-entropy of the training head.

use tch::{Kind, Tensor};

/// Summed next-token cross-entropy over label tokens: `Σ −log softmax(logits[t])[labels[t+1]]`,
/// in fp32.
pub fn loss_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (b, t, v) = logits.size3().unwrap();
    let pred = logits.narrow(1, 0, t - 1).to_kind(Kind::Float).reshape([b * (t - 1), v]);
    let target = labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    pred.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Sum, -100, 0.0)
}

/// Logits computed at once by [`linear_cross_entropy_backward`]: rows × vocabulary (128 MiB in fp32; 1024
/// rows of a 32k vocabulary).
pub const LOSS_CHUNK_ELEMENTS: i64 = 1 << 25;

/// Summed cross-entropy of logits `z` `[n, V]` against `target` `[n]` (-100: no loss), and its
/// gradient scaled by `weight`, `weight · (softmax(z) − onehot(target))` (zero on ignored rows),
/// in the logits' dtype. Computed in fp32: on a GPU by one kernel
/// ([`crate::cuda::kernels::cross_entropy_grad_`]), elsewhere by ops. The logits are used up:
/// the gradient may be written over them.
pub fn cross_entropy_with_grad(logits: &Tensor, target: &Tensor, weight: f64) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    if let Some(loss) = crate::cuda::kernels::cross_entropy_grad_(logits, target, weight) {
        return (loss, logits.shallow_clone());
    }
    cross_entropy_with_grad_ops(logits, target, weight)
}

/// [`cross_entropy_with_grad`] by libtorch ops (off the GPU; the reference for the kernel), the
/// gradient in place over an fp32 copy of the logits — over the logits themselves when they
/// are fp32.
pub fn cross_entropy_with_grad_ops(logits: &Tensor, target: &Tensor, weight: f64) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let mut z = logits.to_kind(Kind::Float);
    let lse = z.logsumexp([-1].as_slice(), true);
    let valid = target.ne(-100).to_kind(Kind::Float).unsqueeze(1);
    let index = target.clamp_min(0).unsqueeze(1);
    let loss = ((&lse - z.gather(1, &index, false)) * &valid).sum(Kind::Float);
    let _ = z.g_sub_(&lse).exp_();
    let _ = z.scatter_add_(1, &index, &(-&valid));
    let _ = z.g_mul_(&(valid * weight));
    (loss, z.to_kind(logits.kind()))
}

/// Output projection and summed cross-entropy of the rows `normed` `[n, H]` against `target`
/// `[n]` (-100: no loss), back-propagated (scaled by `weight`) into `normed`'s graph; returns
/// the summed loss (detached). A fused linear cross-entropy: the frozen projection `(w, bias)`
/// and the loss run without a graph, `LOSS_CHUNK_ELEMENTS` logits at a time, each chunk's
/// `∂L/∂x = (∂L/∂z) W` formed directly, so neither full-vocabulary logits nor autograd's copies
/// of a chunk's softmax ever exist. With `softcap` `c` (Gemma 2) the loss sees `c·tanh(z/c)`,
/// whose gradient carries the factor `1 − tanh²(z/c)`.
pub fn linear_cross_entropy_backward(normed: &Tensor, w: &Tensor, bias: Option<&Tensor>, target: &Tensor, weight: f64, softcap: Option<f64>) -> anyhow::Result<Tensor> {
    let n = normed.size()[0];
    let chunk = (LOSS_CHUNK_ELEMENTS / w.size()[0]).max(1);
    let mut total = Tensor::zeros([], (Kind::Float, normed.device()));
    let dnormed = normed.empty_like(); // every row is written below
    let _g = tch::no_grad_guard();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = normed.narrow(0, start, len).linear(w, bias);
        let (loss, dlogits) = match softcap {
            None => cross_entropy_with_grad(&logits, &target.narrow(0, start, len), weight),
            Some(c) => {
                let t = (&logits / c).tanh();
                let (loss, d) = cross_entropy_with_grad(&(&t * c), &target.narrow(0, start, len), weight);
                (loss, d * (1.0 - t.square()))
            }
        };
        drop(logits);
        let _ = dlogits.mm_out(&dnormed.narrow(0, start, len), w);
        total += loss;
        start += len;
    }
    if normed.requires_grad() {
        crate::cuda::autograd::backward(&[(normed, &dnormed)])?;
    }
    Ok(total)
}

/// `c·tanh(z/c)`: logits soft-capped at ±`c` (Gemma 2's `final_logit_softcapping`), in
/// transformers' op order.
pub fn softcap(z: &Tensor, cap: Option<f64>) -> Tensor {
    match cap {
        None => z.shallow_clone(),
        Some(c) => (z / c).tanh() * c,
    }
}

/// [`linear_cross_entropy_backward`] through autograd, chunk by chunk, for an output projection
/// with an adapter (which needs its graph).
pub fn linear_cross_entropy_backward_autograd(head: &super::Linear, normed: &Tensor, target: &Tensor, weight: f64, cap: Option<f64>) -> anyhow::Result<Tensor> {
    let n = normed.size()[0];
    let rows = normed.detach().set_requires_grad(true);
    let chunk = (LOSS_CHUNK_ELEMENTS / head.out_features()).max(1);
    let mut total = Tensor::zeros([], (Kind::Float, normed.device()));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = softcap(&head.forward(&rows.narrow(0, start, len), true), cap);
        let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&target.narrow(0, start, len), None, tch::Reduction::Sum, -100, 0.0);
        (&loss * weight).backward();
        total += loss.detach();
        start += len;
    }
    let g = rows.grad();
    if normed.requires_grad() && g.defined() {
        crate::cuda::autograd::backward(&[(normed, &g)])?;
    }
    Ok(total)
}
