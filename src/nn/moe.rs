//! The sparse mixture-of-experts feed-forward (Qwen3-MoE's `Qwen3MoeSparseMoeBlock`), and the
//! feed-forward slot of a decoder layer that holds either it or a dense [`Mlp`]:
//!
//! ```text
//! p = softmax(x Wrᵀ)   (fp32)               router probabilities over E experts, [N, E]
//! (w, e) = topk(p, k);  w ← w / Σw  (norm_topk_prob)
//! y = Σⱼ wⱼ · down_eⱼ(act(gate_eⱼ(x)) · up_eⱼ(x))
//! ```
//! Experts run grouped: the N·k (token, expert) pairs are sorted by expert, each expert's rows
//! are one contiguous block, and each projection is one grouped GEMM over all experts
//! (`torch._grouped_mm` on a GPU in bf16/fp16; elsewhere one GEMM per expert's block), never a
//! gather per expert. The outputs, scaled by `w`, go back to their tokens and each token's `k`
//! are summed in fp32.
//!
//! Expert weights are stacks, as transformers 5 holds them: `gate_up_proj` `[E, 2I, H]` (gate
//! rows first) and `down_proj` `[E, H, I]`; checkpoints store them per expert
//! (`experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`) or as the stacks.
//!
//! The load-balancing loss is transformers' `load_balancing_loss_func` over the sparse layers
//! `l` and the rows `n` that are not padding (mask `m`):
//! `aux = E · Σₑ f_e · P_e`, `f_e = Σ_{l,n} m_n·[e ∈ topk(p_ln)] / T`, `P_e = Σ_{l,n} m_n·p_lne / T`,
//! `T = L · Σ m`. `f` has no gradient, so `∂aux/∂p_lne = E · f_e · m_n / T` for every layer.

use super::mlp::{Activation, Mlp};
use super::{Linear, WeightSource};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// LoRA on a stack of expert weights `[E, out, in]`, in peft's layout (its `ParamWrapper` on
/// a 3-D parameter, no dropout): `A` `[E·r, in]` (expert `e`'s rows `e·r..(e+1)·r`) and `B`
/// `[out, r·E]` (expert `e`'s rank-`j` column at `j·E + e`); expert `e`'s update is
/// `s · B_e A_e`.
pub struct ExpertLora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl ExpertLora {
    /// Fresh adapter for `experts` stacked `[out, in]` weights: A Kaiming-uniform as peft draws
    /// `lora_A` (`U(±1/√in)`), B zero.
    pub fn new(experts: i64, out: i64, inp: i64, r: i64, scale: f64, kind: Kind, device: tch::Device, rng: &mut impl rand::Rng) -> ExpertLora {
        let bound = 1.0 / (inp as f64).sqrt();
        let values: Vec<f32> = (0..experts * r * inp).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        let a = Tensor::from_slice(&values).view([experts * r, inp]).to_kind(kind).to_device(device).set_requires_grad(true);
        let b = Tensor::zeros([out, r * experts], (kind, device)).set_requires_grad(true);
        ExpertLora { a, b, scale }
    }

    /// `(A, B)` per expert, `[E, r, in]` and `[E, out, r]`, in `kind`.
    fn stacks(&self, experts: i64, kind: Kind) -> (Tensor, Tensor) {
        let (a, b) = (self.a.to_kind(kind), self.b.to_kind(kind));
        let (out, inp) = (b.size()[0], a.size()[1]);
        let r = a.size()[0] / experts;
        (a.view([experts, r, inp]), b.view([out, r, experts]).permute([2, 0, 1]))
    }

    /// Expert `e`'s update `s · B_e A_e` `[out, in]`, in fp32.
    pub fn delta(&self, experts: i64, e: i64) -> Tensor {
        let (a, b) = self.stacks(experts, Kind::Float);
        b.get(e).matmul(&a.get(e)) * self.scale
    }
}

/// The experts' weights, their adapters, and their activation.
pub struct Experts {
    /// `[E, 2I, H]`: each expert's gate rows, then its up rows.
    pub gate_up: Tensor,
    /// `[E, H, I]`.
    pub down: Tensor,
    pub gate_up_lora: Option<ExpertLora>,
    pub down_lora: Option<ExpertLora>,
    pub act: Activation,
}

/// How the rows of a sorted batch fall to the experts.
struct Groups {
    /// Rows per expert, on the host (the per-expert path).
    counts: Vec<i64>,
    /// The end row of each expert's block, `int32` on the device (the grouped GEMM's `offs`).
    ends: Option<Tensor>,
}

impl Experts {
    pub fn count(&self) -> i64 {
        self.gate_up.size()[0]
    }

    /// `x` `[M, in]` (rows sorted by expert, blocks as `groups` says) through each block's
    /// expert of `w` `[E, out, in]`: `[M, out]`.
    fn grouped(x: &Tensor, w: &Tensor, groups: &Groups) -> Tensor {
        if let Some(ends) = &groups.ends {
            return x.internal_grouped_mm(&w.transpose(1, 2), Some(ends), None, None);
        }
        let mut start = 0;
        let blocks: Vec<Tensor> = groups
            .counts
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                let y = x.narrow(0, start, n).matmul(&w.get(e as i64).tr());
                start += n;
                y
            })
            .collect();
        Tensor::cat(&blocks, 0)
    }

    /// One stack's projection of sorted rows, its adapter added.
    fn project(&self, x: &Tensor, w: &Tensor, lora: &Option<ExpertLora>, groups: &Groups) -> Tensor {
        let y = Self::grouped(x, w, groups);
        match lora {
            None => y,
            Some(l) => {
                let (a, b) = l.stacks(self.count(), x.kind());
                let (a, b) = if groups.ends.is_some() { (a.contiguous(), b.contiguous()) } else { (a, b) };
                y + Self::grouped(&(Self::grouped(x, &a, groups) * l.scale), &b, groups)
            }
        }
    }

    /// Whether rows of `xs` can take the grouped GEMM: bf16/fp16 on a GPU, every matrix's rows
    /// 16-byte aligned (the adapters' ranks too).
    pub fn groupable(&self, xs: &Tensor) -> bool {
        self.groupable_as(xs.device(), xs.kind())
    }

    /// Whether rows on `device` in `kind` can take the grouped GEMM (see [`Experts::groupable`]).
    /// Grouped, a block never waits for the host, so a decoding step can be recorded as a CUDA graph.
    pub fn groupable_as(&self, device: Device, kind: Kind) -> bool {
        let aligned = |t: &Tensor| t.size()[1..].iter().all(|d| d % 8 == 0);
        let lora_ranks_aligned = [&self.gate_up_lora, &self.down_lora].iter().all(|l| l.as_ref().is_none_or(|l| (l.a.size()[0] / self.count()) % 8 == 0));
        device.is_cuda() && matches!(kind, Kind::BFloat16 | Kind::Half) && aligned(&self.gate_up) && aligned(&self.down) && lora_ranks_aligned
    }

    /// Rows sorted by expert, `counts` `[E]` of them each, through their experts: `[M, H]`; as
    /// one grouped GEMM per projection if `grouped` (see [`Experts::groupable`]), else one GEMM
    /// per expert's block of rows.
    pub fn forward(&self, xs: &Tensor, counts: &Tensor, grouped: bool, train: bool) -> Tensor {
        let groups = if grouped {
            Groups { counts: vec![], ends: Some(counts.cumsum(0, Kind::Int)) }
        } else {
            Groups { counts: Vec::<i64>::try_from(counts.to_device(tch::Device::Cpu)).unwrap(), ends: None }
        };
        let gu = self.project(xs, &self.gate_up.to_kind(xs.kind()), &self.gate_up_lora, &groups);
        let half = gu.size()[1] / 2;
        let (gate, up) = (gu.narrow(1, 0, half), gu.narrow(1, half, half));
        let m = self.act.gated(&gate.contiguous(), &up.contiguous(), train);
        self.project(&m, &self.down.to_kind(xs.kind()), &self.down_lora, &groups)
    }
}

/// Where a batch's tokens were sent: the router's probabilities `[N, E]` (fp32, with a graph
/// when the forward has one) and the experts chosen for each token `[N, k]`.
pub struct Routing {
    pub probs: Tensor,
    pub selected: Tensor,
}

pub struct SparseMoe {
    /// The router's weight `[E, H]` (`mlp.gate.weight`).
    pub router: Tensor,
    pub experts: Experts,
    pub top_k: i64,
    /// Renormalize the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
    /// The block's path (`model.layers.0.mlp`).
    pub name: String,
}

impl SparseMoe {
    /// The block `name` (`model.layers.0.mlp`) of hidden width `hidden` from `weights`: the
    /// experts' stacks as saved (`experts.gate_up_proj`, `experts.down_proj`) or stacked from
    /// per-expert weights.
    pub fn load(c: &crate::models::config::MoeConfig, name: String, hidden: i64, act: Activation, weights: &WeightSource, kind: Kind, device: Device) -> Result<SparseMoe> {
        let (n, i) = (c.num_experts as i64, c.intermediate_size as i64);
        let stacked = format!("{name}.experts.gate_up_proj");
        let (gate_up, down) = if weights.contains(&stacked) || matches!(weights, WeightSource::Random { .. }) {
            (weights.load(&stacked, &[n, 2 * i, hidden], kind, device)?, weights.load(&format!("{name}.experts.down_proj"), &[n, hidden, i], kind, device)?)
        } else {
            let mut gate_up = Vec::with_capacity(n as usize);
            let mut down = Vec::with_capacity(n as usize);
            for e in 0..n {
                let w = |proj: &str, shape: &[i64]| weights.load(&format!("{name}.experts.{e}.{proj}.weight"), shape, kind, device);
                gate_up.push(Tensor::cat(&[w("gate_proj", &[i, hidden])?, w("up_proj", &[i, hidden])?], 0));
                down.push(w("down_proj", &[hidden, i])?);
            }
            (Tensor::stack(&gate_up, 0), Tensor::stack(&down, 0))
        };
        Ok(SparseMoe {
            router: weights.load(&format!("{name}.gate.weight"), &[n, hidden], kind, device)?,
            experts: Experts { gate_up, down, gate_up_lora: None, down_lora: None, act },
            top_k: c.top_k as i64,
            norm_topk_prob: c.norm_topk_prob,
            name,
        })
    }

    /// The block's output for `x` `[.., H]`, and where it routed each token.
    pub fn forward_routed(&self, x: &Tensor, train: bool) -> (Tensor, Routing) {
        let shape = x.size();
        let h = *shape.last().unwrap();
        let x2 = x.reshape([-1, h]);
        let logits = x2.matmul(&self.router.to_kind(x2.kind()).tr());
        let probs = logits.softmax(-1, Kind::Float);
        let (top, selected) = probs.topk(self.top_k, -1, true, true);
        let top = if self.norm_topk_prob { &top / top.sum_dim_intlist(-1, true, Kind::Float) } else { top };
        let weights = top.to_kind(x2.kind());
        // the (token, expert) pairs sorted by expert
        let flat = selected.reshape([-1]);
        let order = flat.argsort_stable(true, 0, false);
        let token = order.floor_divide_scalar(self.top_k);
        // rows per expert, counted on the device without a wait for the host (`bincount` on a
        // GPU reads the largest id back first)
        let counts = Tensor::zeros([self.experts.count()], (Kind::Int64, flat.device())).scatter_add(0, &flat, &flat.ones_like());
        let xs = x2.index_select(0, &token);
        let y = self.experts.forward(&xs, &counts, self.experts.groupable(&xs), train);
        // back in (token, slot) order, weighted, each token's k outputs summed in fp32 (no
        // atomic adds: deterministic, and one rounding to the model's dtype)
        let y = y.index_select(0, &order.argsort(0, false)).view([-1, self.top_k, h]);
        let out = (y * weights.unsqueeze(2)).sum_dim_intlist(1, false, Kind::Float).to_kind(x2.kind());
        (out.view(shape.as_slice()), Routing { probs, selected })
    }

    /// The checkpoint's tensors of the block as transformers saves them: the router, then each
    /// expert's `gate_proj`, `up_proj`, `down_proj` (views into the stacks).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(format!("{}.gate.weight", self.name), self.router.shallow_clone())];
        let half = self.experts.gate_up.size()[1] / 2;
        for e in 0..self.experts.count() {
            for (proj, t) in self.expert_tensors(e, half) {
                v.push((format!("{}.experts.{e}.{proj}.weight", self.name), t));
            }
        }
        v
    }

    fn expert_tensors(&self, e: i64, half: i64) -> [(&'static str, Tensor); 3] {
        let gu = self.experts.gate_up.get(e);
        [("gate_proj", gu.narrow(0, 0, half)), ("up_proj", gu.narrow(0, half, half)), ("down_proj", self.experts.down.get(e))]
    }

    /// Expert weight `name` (one of [`SparseMoe::tensors`]) with its adapter folded in, in fp32,
    /// if it is an expert weight of this block with an adapter.
    pub fn merged(&self, name: &str) -> Option<Tensor> {
        let rest = name.strip_prefix(&format!("{}.experts.", self.name))?;
        let (e, proj) = rest.strip_suffix(".weight")?.split_once('.')?;
        let e: i64 = e.parse().ok()?;
        let half = self.experts.gate_up.size()[1] / 2;
        let _g = tch::no_grad_guard();
        let n = self.experts.count();
        let (base, lora, rows) = match proj {
            "gate_proj" => (self.experts.gate_up.get(e), self.experts.gate_up_lora.as_ref()?, Some(0)),
            "up_proj" => (self.experts.gate_up.get(e), self.experts.gate_up_lora.as_ref()?, Some(half)),
            "down_proj" => (self.experts.down.get(e), self.experts.down_lora.as_ref()?, None),
            _ => return None,
        };
        let w = base.to_kind(Kind::Float) + lora.delta(n, e);
        Some(match rows {
            Some(start) => w.narrow(0, start, half),
            None => w,
        })
    }

    /// The adapters on the stacks with peft's key suffix after the block's path: peft wraps
    /// `gate_up_proj` first, so with both adapted its adapter sits one `base_layer` deeper.
    pub fn adapter_keys(&self) -> Vec<(String, &ExpertLora)> {
        let both = self.experts.gate_up_lora.is_some() && self.experts.down_lora.is_some();
        let mut v = vec![];
        if let Some(l) = &self.experts.gate_up_lora {
            v.push((format!("{}.experts{}", self.name, if both { ".base_layer" } else { "" }), l));
        }
        if let Some(l) = &self.experts.down_lora {
            v.push((format!("{}.experts", self.name), l));
        }
        v
    }

    /// Rows `start..start + len` of every expert's `gate_up` weights (with `down`, of its down
    /// weights) in fp32, the adapter folded in (`W_e + s·B_e A_e`): `[E, len, in]`.
    pub fn merged_rows(&self, down: bool, start: i64, len: i64) -> Tensor {
        let _g = tch::no_grad_guard();
        let (w, lora) = if down { (&self.experts.down, &self.experts.down_lora) } else { (&self.experts.gate_up, &self.experts.gate_up_lora) };
        let w = w.narrow(1, start, len).to_kind(Kind::Float);
        match lora {
            Some(l) => {
                let (a, b) = l.stacks(self.experts.count(), Kind::Float);
                w + b.narrow(1, start, len).matmul(&a) * l.scale
            }
            None => w,
        }
    }

    /// Folds the experts' adapters into their stacks (`W_e ← W_e + s·B_e A_e`) and removes them.
    pub fn merge_adapters(&mut self) {
        let kind = self.experts.gate_up.kind();
        let rows = |w: &Tensor| w.size()[1];
        let (gate_up, down) = (self.merged_rows(false, 0, rows(&self.experts.gate_up)).to_kind(kind), self.merged_rows(true, 0, rows(&self.experts.down)).to_kind(kind));
        (self.experts.gate_up, self.experts.down) = (gate_up, down);
        self.experts.gate_up_lora = None;
        self.experts.down_lora = None;
    }

    pub fn set_dtype(&mut self, kind: Kind) {
        self.router = self.router.to_kind(kind);
        self.experts.gate_up = self.experts.gate_up.to_kind(kind);
        self.experts.down = self.experts.down.to_kind(kind);
    }
}

/// The feed-forward half of a decoder layer.
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    /// The output for `x`, and the routing when the block is sparse.
    pub fn forward_routed(&self, x: &Tensor, train: bool) -> (Tensor, Option<Routing>) {
        match self {
            FeedForward::Dense(m) => (m.forward(x, train), None),
            FeedForward::Sparse(s) => {
                let (y, r) = s.forward_routed(x, train);
                (y, Some(r))
            }
        }
    }

    /// The dense MLP, if this is one.
    pub fn dense(&self) -> Option<&Mlp> {
        match self {
            FeedForward::Dense(m) => Some(m),
            FeedForward::Sparse(_) => None,
        }
    }

    pub fn sparse(&self) -> Option<&SparseMoe> {
        match self {
            FeedForward::Sparse(s) => Some(s),
            FeedForward::Dense(_) => None,
        }
    }

    pub fn sparse_mut(&mut self) -> Option<&mut SparseMoe> {
        match self {
            FeedForward::Sparse(s) => Some(s),
            FeedForward::Dense(_) => None,
        }
    }

    /// The linear layers (a sparse block's experts are stacks, not linear layers).
    pub fn linears(&self) -> Vec<&Linear> {
        self.dense().map(Mlp::linears).unwrap_or_default()
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            FeedForward::Dense(m) => m.linears_mut(),
            FeedForward::Sparse(_) => vec![],
        }
    }
}

/// The load-balancing loss of [`Routing`]s of one forward (module doc), and the gradient
/// `∂aux/∂p` `[N, E]` every layer's probabilities share; `valid` `[N]` weighs the rows (0 for
/// padding, 1 for a token, n for a token n sequences share; all 1 when `None`).
pub fn load_balancing(routes: &[Routing], experts: i64, valid: Option<&Tensor>) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let probs0 = &routes[0].probs;
    let device = probs0.device();
    let n = probs0.size()[0];
    let mask = match valid {
        Some(v) => v.reshape([-1]).to_kind(Kind::Float).to_device(device),
        None => Tensor::ones([n], (Kind::Float, device)),
    };
    let k = routes[0].selected.size()[1];
    let mut counts = Tensor::zeros([experts], (Kind::Float, device));
    let mut prob_sum = Tensor::zeros([experts], (Kind::Float, device));
    for r in routes {
        let _ = counts.scatter_add_(0, &r.selected.reshape([-1]), &mask.repeat_interleave_self_int(k, 0, None));
        prob_sum += (r.probs.detach() * mask.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Float);
    }
    let total = mask.sum(Kind::Float) * routes.len() as f64;
    let f = counts / &total;
    let aux = (&f * (prob_sum / &total)).sum(Kind::Float) * experts as f64;
    let grad = mask.unsqueeze(1) * (f * experts as f64).unsqueeze(0) / total;
    (aux, grad)
}
