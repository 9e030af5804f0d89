//! The gated MLP, `down(act(gate(x)) · up(x))` with `act` SiLU (SwiGLU: Llama, Qwen) or GELU's
//! tanh approximation (GeGLU: Gemma), with the fused SwiGLU and the checkpointed backward that
//! forms the frozen projections' input gradients directly.

use super::linear::Projections;
use super::{fused, Linear};
use anyhow::{bail, Result};
use tch::Tensor;

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `x · σ(x)` (config.json's `silu` / `swish`).
    Silu,
    /// `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// config.json's `hidden_act` / `hidden_activation` name.
    pub fn from_name(name: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => bail!("unsupported activation `{other}`; supported: silu, gelu_pytorch_tanh"),
        })
    }

    /// `act(gate) · up` (SwiGLU in one kernel each way when training on a GPU).
    pub fn gated(&self, gate: &Tensor, up: &Tensor, train: bool) -> Tensor {
        match self {
            Activation::Silu => {
                if fused(gate, train) {
                    if let Some(m) = crate::cuda::autograd::swiglu(gate, up) {
                        return m;
                    }
                }
                gate.silu() * up
            }
            Activation::GeluTanh => gate.gelu("tanh") * up,
        }
    }
}

pub struct Mlp {
    /// `gate_proj` and `up_proj`, or Phi-3's fused `gate_up_proj` (`[gate | up]`).
    pub gate_up: Projections,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    /// `act(gate) · up` from the gate and up projections: the input of `down_proj` (SwiGLU in
    /// one kernel each way when training on a GPU).
    pub fn gated(&self, gate: &Tensor, up: &Tensor, train: bool) -> Tensor {
        self.act.gated(gate, up, train)
    }

    /// `(∂L/∂gate, ∂L/∂up)` of [`Mlp::gated`] from `∂L/∂m`, without a graph: `∂up = ∂m · act(gate)`,
    /// `∂gate = ∂m · up · act′(gate)` (SiLU: `σ(gate)(1 + gate(1 − σ(gate)))`). On a GPU SwiGLU's
    /// are written over `gate` and `up` (whose memory is returned), elsewhere into new tensors.
    pub fn gated_grads(&self, dm: &Tensor, gate: Tensor, up: Tensor) -> (Tensor, Tensor) {
        let _g = tch::no_grad_guard();
        match self.act {
            Activation::Silu => {
                if crate::cuda::autograd::swiglu_backward_in_place(dm, &gate, &up) {
                    return (gate, up);
                }
                (gate.silu_backward(&(dm * &up)), dm * gate.silu())
            }
            Activation::GeluTanh => (gate.gelu_backward(&(dm * &up), "tanh"), dm * gate.gelu("tanh")),
        }
    }

    /// Whether [`Mlp::recompute_backward`] applies: separate gate and up projections, and
    /// every adapter plain LoRA (or absent).
    pub fn fusable(&self) -> bool {
        self.gate_up.separate().is_some() && self.linears().iter().all(|p| p.fusable())
    }

    /// The MLP's linear layers, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.gate_up.linears();
        v.push(&self.down_proj);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.gate_up.linears_mut();
        v.push(&mut self.down_proj);
        v
    }

    /// `down(act(gate(x)) · up(x))`; in a decoding step on a GPU, gate and up from one GEMM
    /// ([`Projections::forward_joint`]) and SwiGLU over its halves.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let joint = if super::decode_fusion(x, train) { self.gate_up.forward_joint(x) } else { None };
        if let (Some(gu), Activation::Silu) = (&joint, self.act) {
            if let Some(m) = crate::cuda::autograd::swiglu_halves(gu) {
                return self.down_proj.forward(&m, train);
            }
        }
        let [gate, up]: [Tensor; 2] = match joint {
            Some(gu) => gu.chunk(2, -1),
            None => self.gate_up.forward(x, train),
        }
        .try_into()
        .unwrap();
        self.down_proj.forward(&self.gated(&gate, &up, train), train)
    }

    /// The separate gate and up projections ([`Mlp::fusable`] MLPs have them).
    fn gate_and_up(&self) -> Result<(&Linear, &Linear)> {
        match self.gate_up.separate() {
            Some([gate, up]) => Ok((gate, up)),
            _ => bail!("internal: the checkpointed MLP backward needs separate gate and up projections"),
        }
    }

    /// Backward through the MLP from `∂L/∂y` at its output `dy`, recomputing what it needs from
    /// its input `x` (which has a graph), for checkpointed training: the roots to hand to
    /// autograd, `(x, ∂L/∂x through the frozen weights)` and one `(adapter output, gradient)` per
    /// adapter. The frozen projections run without a graph and their input gradients are formed
    /// directly (`∂x = ∂gate·W_gate + ∂up·W_up`, `∂m = dy·W_down`), the output `down(m)` is never
    /// computed, and with no adapter on gate/up the `[B, T, I]` tensors are freed before the
    /// rest of backward. Dropout draws in the order of the forward (gate, up, down).
    pub fn recompute_backward(&self, x: &Tensor, dy: &Tensor) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
        anyhow::ensure!(self.fusable(), "internal: the checkpointed MLP backward knows plain LoRA adapters only");
        let (gate_proj, up_proj) = self.gate_and_up()?;
        let x2 = x.reshape([-1, gate_proj.in_features()]);
        let dy2 = dy.reshape([-1, self.down_proj.out_features()]);
        if self.linears().iter().all(|p| p.adapter.is_none()) {
            return Ok(vec![(x2.shallow_clone(), self.frozen_input_grad((gate_proj, up_proj), &x2, &dy2))]);
        }
        let project = |p: &Linear| {
            let base = crate::nn::no_grad(|| x2.linear(&p.weight.for_input(x2.kind()), p.bias.as_ref()));
            match p.lora() {
                Some(l) => l.add_to(base, &x2, true),
                None => base,
            }
        };
        let (gate, up) = (project(gate_proj), project(up_proj));
        let mut dm = self.down_proj.base_input_grad(&dy2);
        if let Some(l) = self.down_proj.lora() {
            let m = crate::nn::no_grad(|| self.gated(&gate, &up, true)).set_requires_grad(true);
            let delta = l.delta(&m, true);
            crate::cuda::autograd::backward(&[(&delta, &dy2)])?;
            dm += m.grad();
        }
        let adapted = (gate_proj.adapter.is_some(), up_proj.adapter.is_some());
        let (dgate, dup) = self.gated_grads(&dm, gate.shallow_clone(), up.shallow_clone());
        drop(dm);
        let dx = x2.empty_like();
        crate::nn::no_grad(|| Mlp::gate_up_input_grad(&dgate, &dup, &(gate_proj.weight.for_input(x2.kind()), up_proj.weight.for_input(x2.kind())), &dx));
        let mut roots = vec![(x2, dx)];
        if adapted.0 {
            roots.push((gate, dgate));
        }
        if adapted.1 {
            roots.push((up, dup));
        }
        Ok(roots)
    }

    /// `∂L/∂x` of an MLP without adapters, for rows `x2` `[N, H]` and `∂L/∂y` `dy2`, in
    /// `RECOMPUTE_ROW_BLOCKS` blocks of rows, so that only one block's `[rows, I]` tensors exist
    /// at a time.
    fn frozen_input_grad(&self, (gate_proj, up_proj): (&Linear, &Linear), x2: &Tensor, dy2: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let w = (gate_proj.weight.for_input(x2.kind()), up_proj.weight.for_input(x2.kind()));
        let n = x2.size()[0];
        let rows = ((n + RECOMPUTE_ROW_BLOCKS - 1) / RECOMPUTE_ROW_BLOCKS).max(1);
        let dx = x2.empty_like();
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let xb = x2.narrow(0, start, len);
            let (gate, up) = (xb.linear(&w.0, gate_proj.bias.as_ref()), xb.linear(&w.1, up_proj.bias.as_ref()));
            let dm = self.down_proj.base_input_grad(&dy2.narrow(0, start, len));
            let (dgate, dup) = self.gated_grads(&dm, gate, up);
            Mlp::gate_up_input_grad(&dgate, &dup, &w, &dx.narrow(0, start, len));
            start += len;
        }
        dx
    }


    /// `out = ∂gate · W_gate + ∂up · W_up`, the input gradient through the frozen gate and up
    /// weights `(W_gate, W_up)`, written into `out` (no graph).
    fn gate_up_input_grad(dgate: &Tensor, dup: &Tensor, (wg, wu): &(Tensor, Tensor), out: &Tensor) {
        let mut out = out.shallow_clone();
        let _ = dgate.mm_out(&out, wg);
        let _ = out.addmm_(dup, wu);
    }
}

/// Blocks of rows in which [`Mlp::recompute_backward`] forms a frozen MLP's input gradient.
const RECOMPUTE_ROW_BLOCKS: i64 = 2;
