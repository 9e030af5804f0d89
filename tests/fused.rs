//! The fused training kernels (src/cuda/kernels.cu, with their autograd functions in
//! src/cuda/autograd.cpp) against the libtorch ops they replace, on a GPU: the forward gives
//! the same bits (each op's rounding is reproduced), the backward the same values up to the
//! last bit where libtorch's own kernel fuses a multiply-add. Skipped without CUDA (CI).

mod common;
use common::*;
use ftscript::cuda::autograd;
use tch::{Device, Kind, Tensor};

/// The GPU, with [`RNG`] held for the test's duration; `None` (the test skips) without CUDA.
fn cuda() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    if tch::Cuda::is_available() {
        Some((Device::Cuda(0), RNG.lock().unwrap_or_else(|e| e.into_inner())))
    } else {
        eprintln!("skipped: needs CUDA");
        None
    }
}

/// The largest difference in units of the dtype's precision at each element's magnitude (plus
/// 1% of the mean magnitude, so that values cancelling to ~0 do not count as infinitely far),
/// and the fraction of elements that differ at all.
fn ulps(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let eps = match a.kind() {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    };
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let diff = (&a - &b).abs();
    let scale = (b.abs() + b.abs().mean(Kind::Double) * 0.01).clamp_min(1e-30) * eps;
    let worst = (&diff / scale).max().double_value(&[]);
    let differing = diff.gt(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    (worst, differing)
}

/// Held by every test here (taken by [`cuda`]): they draw from libtorch's global generators, and the projections
/// test needs the same dropout masks in two runs, which a test drawing on another thread would
/// change.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

#[test]
fn fused_swiglu_matches_silu_times_up() {
    let Some((dev, _rng)) = cuda() else { return };
    tch::manual_seed(1);
    for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
        // a transformer's shape, and one whose size is not a multiple of 8
        for shape in [[2i64, 128, 11008], [3, 37, 1001]] {
            let g0 = Tensor::randn(shape, (Kind::Float, dev)).to_kind(kind) * 3.0;
            let u0 = Tensor::randn(shape, (kind, dev));
            let dy = Tensor::randn(shape, (kind, dev));
            let (g, u) = (leaf(&g0), leaf(&u0));
            let fused = autograd::swiglu(&g, &u).unwrap_or_else(|| panic!("kernel unavailable: {:?}", ftscript::cuda::kernels::unavailable_reason()));
            let (g2, u2) = (leaf(&g0), leaf(&u0));
            let ops = g2.silu() * &u2;
            assert!(same_bits(&fused, &ops), "{kind:?} {shape:?}: forward differs, {:?}", ulps(&fused, &ops));
            autograd::backward(&[(&fused, &dy)]).unwrap();
            autograd::backward(&[(&ops, &dy)]).unwrap();
            let (dg, du) = (g0.copy(), u0.copy());
            assert!(autograd::swiglu_backward_in_place(&dy, &dg, &du));
            assert!(same_bits(&dg, &g.grad()) && same_bits(&du, &u.grad()), "swiglu_backward_in_place differs from the autograd function's");
            for (name, a, b) in [("gate", g.grad(), g2.grad()), ("up", u.grad(), u2.grad())] {
                let (worst, differing) = ulps(&a, &b);
                println!("swiglu {kind:?} {shape:?} d{name}: worst {worst:.2} ulp, {:.4}% of elements differ", differing * 100.0);
                assert!(worst <= 2.0 && differing < 0.01, "{kind:?} {shape:?} d{name}: {worst} ulp, {differing} differ");
            }
        }
    }
}

#[test]
fn fused_rope_matches_the_rotate_half_ops() {
    let Some((dev, _rng)) = cuda() else { return };
    tch::manual_seed(2);
    for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
        for (b, t, heads, d) in [(2i64, 256i64, 32i64, 128i64), (3, 17, 5, 64)] {
            let x0 = Tensor::randn([b, t, heads, d], (kind, dev));
            let positions = Tensor::randint(4096, [b, t], (Kind::Int64, dev));
            let inv = Tensor::arange_start_step(0, d, 2, (Kind::Float, dev)).divide_scalar(d as f64).multiply_scalar(-(10000f64.ln())).exp();
            let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv.view([1, 1, -1]);
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
            // the gradient arrives as SDPA's does: [B, heads, T, d] over [B, T, heads, d] memory
            let dy = Tensor::randn([b, t, heads, d], (kind, dev)).transpose(1, 2);

            let x = leaf(&x0);
            let fused = autograd::rope(&x, &cos, &sin).expect("kernel unavailable").transpose(1, 2);
            let x2 = leaf(&x0);
            let xt = x2.transpose(1, 2);
            let (c4, s4) = (cos.unsqueeze(1), sin.unsqueeze(1));
            let rotated = Tensor::cat(&[&(-xt.narrow(3, d / 2, d / 2)), &xt.narrow(3, 0, d / 2)], 3);
            let ops = &xt * &c4 + rotated * &s4;
            assert!(same_bits(&fused.contiguous(), &ops.contiguous()), "{kind:?} {:?}: forward differs, {:?}", x0.size(), ulps(&fused, &ops));
            autograd::backward(&[(&fused, &dy)]).unwrap();
            autograd::backward(&[(&ops, &dy)]).unwrap();
            let (worst, differing) = ulps(&x.grad(), &x2.grad());
            println!("rope {kind:?} {:?}: backward worst {worst:.2} ulp, {:.4}% differ", x0.size(), differing * 100.0);
            assert!(worst == 0.0, "{kind:?} {:?}: backward differs by {worst} ulp ({differing})", x0.size());
        }
    }
}

/// The projections of one input as one autograd node (`autograd::projections`, whose backward
/// accumulates LoRA's masked input gradient with the `lora_dx` kernel) against separate
/// layers through autograd: outputs and the gradients of the input and the adapters, with the
/// same dropout masks (both draw them with `native_dropout` in projection order).
#[test]
fn shared_projections_match_separate_layers_on_the_gpu() {
    let Some((dev, _rng)) = cuda() else { return };
    for kind in [Kind::BFloat16, Kind::Float] {
        // rows aligned for the kernel (256 columns), and not (100: the ops' fallback)
        for (inp, rank) in [(256i64, 8i64), (256, 5), (100, 8)] {
            tch::manual_seed(3);
            let x0 = Tensor::randn([300, inp], (kind, dev));
            let outs = [192i64, 64, 192];
            let w: Vec<Tensor> = outs.iter().map(|&o| Tensor::randn([o, inp], (kind, dev)) * 0.05).collect();
            let adapters: Vec<Option<(Tensor, Tensor)>> = outs
                .iter()
                .enumerate()
                .map(|(i, &o)| (i != 1).then(|| (leaf(&(Tensor::randn([rank, inp], (Kind::Float, dev)) * 0.1)), leaf(&(Tensor::randn([o, rank], (Kind::Float, dev)) * 0.1)))))
                .collect();
            let dys: Vec<Tensor> = outs.iter().map(|&o| Tensor::randn([300, o], (kind, dev))).collect();
            let run = |fused: bool| -> Vec<Tensor> {
                for (a, b) in adapters.iter().flatten() {
                    for t in [a, b] {
                        let mut g = t.grad();
                        if g.defined() {
                            let _ = g.zero_();
                        }
                    }
                }
                let x = leaf(&x0);
                tch::manual_seed(11);
                let ys: Vec<Tensor> = if fused {
                    let parts: Vec<_> = w.iter().zip(&adapters).map(|(w, a)| (w.shallow_clone(), None, a.as_ref().map(|(a, b)| (a, b, 2.0, 0.25)))).collect();
                    autograd::projections(&x, &parts).unwrap()
                } else {
                    w.iter()
                        .zip(&adapters)
                        .map(|(w, a)| {
                            let y = x.linear(w, None::<&Tensor>);
                            match a {
                                Some((a, b)) => y + x.native_dropout(0.25, true).0.matmul(&a.to_kind(kind).tr()).matmul(&b.to_kind(kind).tr()) * 2.0,
                                None => y,
                            }
                        })
                        .collect()
                };
                let roots: Vec<(&Tensor, &Tensor)> = ys.iter().zip(&dys).collect();
                autograd::backward(&roots).unwrap();
                let mut all: Vec<Tensor> = ys.iter().map(|y| y.detach()).collect();
                all.push(x.grad());
                for (a, b) in adapters.iter().flatten() {
                    all.extend([a.grad().copy(), b.grad().copy()]);
                }
                all
            };
            let (fused, ops) = (run(true), run(false));
            let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            let errs: Vec<f64> = fused
                .iter()
                .zip(&ops)
                .map(|(f, o)| {
                    let (f, o) = (f.to_kind(Kind::Double), o.to_kind(Kind::Double));
                    (&f - &o).abs().max().double_value(&[]) / o.abs().max().double_value(&[]).max(1e-30)
                })
                .collect();
            assert!(errs.iter().all(|e| *e < tol), "{kind:?} in {inp} r {rank}: outputs, input gradient, adapter gradients differ by {errs:?} (relative to the largest value)");
        }
    }
}
