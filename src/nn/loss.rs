//! Losses: next-token cross-entropy, and the fused linear cross-entropy of the training head.

use tch::{Kind, Tensor};

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
/// whose gradient carries the factor `1 − tanh²(z/c)`. `row_weight` `[n]` (if given) scales each
/// row's gradient besides `weight` (the returned loss is unweighted). `rows_grad` `(ids, g)`:
/// the gradient of the weight's rows `ids` is added into `g` `[ids, H]` (fp32),
/// `g += (∂L/∂z)[:, ids]ᵀ x` (trainable token rows of a tied head).
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy_backward(
    normed: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    target: &Tensor,
    weight: f64,
    softcap: Option<f64>,
    row_weight: Option<&Tensor>,
    rows_grad: Option<(&Tensor, &Tensor)>,
) -> anyhow::Result<Tensor> {
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
        let dlogits = match row_weight {
            Some(r) => {
                let r = r.narrow(0, start, len).unsqueeze(1).to_kind(dlogits.kind());
                dlogits * r
            }
            None => dlogits,
        };
        let _ = dlogits.mm_out(&dnormed.narrow(0, start, len), w);
        if let Some((ids, g)) = rows_grad {
            let mut g = g.shallow_clone();
            let _ = g.addmm_(&dlogits.index_select(1, ids).tr().to_kind(Kind::Float), &normed.narrow(0, start, len).to_kind(Kind::Float));
        }
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
pub fn linear_cross_entropy_backward_autograd(head: &super::Linear, normed: &Tensor, target: &Tensor, weight: f64, cap: Option<f64>, row_weight: Option<&Tensor>) -> anyhow::Result<Tensor> {
    let n = normed.size()[0];
    let rows = normed.detach().set_requires_grad(true);
    let chunk = (LOSS_CHUNK_ELEMENTS / head.out_features()).max(1);
    let mut total = Tensor::zeros([], (Kind::Float, normed.device()));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = softcap(&head.forward(&rows.narrow(0, start, len), true), cap);
        let per_row = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(&target.narrow(0, start, len), None, tch::Reduction::None, -100, 0.0);
        let loss = per_row.sum(Kind::Float);
        match row_weight {
            Some(r) => (per_row * r.narrow(0, start, len) * weight).sum(Kind::Float).backward(),
            None => (&loss * weight).backward(),
        }
        total += loss.detach();
        start += len;
    }
    let g = rows.grad();
    if normed.requires_grad() && g.defined() {
        crate::cuda::autograd::backward(&[(normed, &g)])?;
    }
    Ok(total)
}

/// What the output layer predicts at each row of `normed` `[n, H]` for the next tokens `target`
/// `[n]` (-100: none), each `[n]` in fp32: `log p(target)` (0 where there is none), the mean
/// logit over the vocabulary, the entropy `−Σ p log p`, and whether the target is the most
/// likely token. Computed without a graph, `LOSS_CHUNK_ELEMENTS` logits at a time
/// (`logits_of` maps a chunk of rows to its logits, `vocab` wide).
pub struct NextTokenStats {
    pub logp: Tensor,
    pub mean_logit: Tensor,
    pub entropy: Tensor,
    pub top1: Tensor,
}

pub fn next_token_stats(normed: &Tensor, vocab: i64, target: &Tensor, logits_of: impl Fn(&Tensor) -> Tensor) -> NextTokenStats {
    let _g = tch::no_grad_guard();
    let n = normed.size()[0];
    let chunk = (LOSS_CHUNK_ELEMENTS / vocab).max(1);
    let (mut logp, mut mean_logit, mut entropy, mut top1) = (vec![], vec![], vec![], vec![]);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let z = logits_of(&normed.narrow(0, start, len)).to_kind(Kind::Float);
        let t = target.narrow(0, start, len);
        let valid = t.ne(-100);
        let lse = z.logsumexp([-1].as_slice(), false);
        let picked = z.gather(1, &t.clamp_min(0).unsqueeze(1), false).squeeze_dim(1);
        logp.push((&picked - &lse) * valid.to_kind(Kind::Float));
        mean_logit.push(z.mean_dim([-1].as_slice(), false, Kind::Float));
        let p = (&z - lse.unsqueeze(1)).exp();
        entropy.push(&lse - (&p * &z).sum_dim_intlist([-1].as_slice(), false, Kind::Float));
        top1.push(z.argmax(-1, false).eq_tensor(&t));
        start += len;
    }
    NextTokenStats { logp: Tensor::cat(&logp, 0), mean_logit: Tensor::cat(&mean_logit, 0), entropy: Tensor::cat(&entropy, 0), top1: Tensor::cat(&top1, 0) }
}

impl NextTokenStats {
    /// Each statistic reshaped to `shape` (e.g. `[B, T-1]`).
    pub fn view(self, shape: &[i64]) -> NextTokenStats {
        NextTokenStats { logp: self.logp.view(shape), mean_logit: self.mean_logit.view(shape), entropy: self.entropy.view(shape), top1: self.top1.view(shape) }
    }
}
