//! The one linear layer every projection of a model uses: a frozen base weight (dense, or
//! 4-bit in bitsandbytes' format), an optional bias, and an optional adapter on top.

use super::adapters::{Adapter, Lora};
use super::quant::{Int8Rows, Quant4};
use std::cell::Cell;
use tch::{Kind, Tensor};

thread_local! {
    /// Set inside [`without_adapters`].
    static ADAPTERS_OFF: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every adapter bypassed in forward passes on this thread: the base model,
/// as peft's `disable_adapter()` gives it (the reference model of DPO and KTO). Forward only:
/// training paths keep their adapters.
pub fn without_adapters<R>(f: impl FnOnce() -> R) -> R {
    super::with_flag(&ADAPTERS_OFF, f)
}

/// Whether this thread is inside [`without_adapters`].
pub fn adapters_disabled() -> bool {
    ADAPTERS_OFF.with(Cell::get)
}

/// A frozen base weight `[out, in]`: dense, or 4-bit ([`Quant4`], NF4/FP4) dequantized block
/// by block on every forward (`W = code[q] · absmax`, never kept dense between calls).
pub enum Weight {
    Dense(Tensor),
    Quant4(Quant4),
    /// 8 bits with a scale per row ([`Int8Rows`]), dequantized at each forward.
    Int8(Int8Rows),
}

impl Weight {
    pub fn size(&self) -> Vec<i64> {
        match self {
            Weight::Dense(t) => t.size(),
            Weight::Quant4(q) => q.shape.clone(),
            Weight::Int8(q) => q.q.size(),
        }
    }
    pub fn numel(&self) -> usize {
        self.size().iter().product::<i64>() as usize
    }
    /// The dtype of the (dequantized) weight.
    pub fn kind(&self) -> Kind {
        match self {
            Weight::Dense(t) => t.kind(),
            Weight::Quant4(q) => q.dtype,
            Weight::Int8(q) => q.dtype,
        }
    }
    pub fn device(&self) -> tch::Device {
        match self {
            Weight::Dense(t) => t.device(),
            Weight::Quant4(q) => q.packed.device(),
            Weight::Int8(q) => q.q.device(),
        }
    }
    /// The tensor of a dense weight.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            _ => None,
        }
    }
    pub fn is_quantized(&self) -> bool {
        !matches!(self, Weight::Dense(_))
    }
    /// Bytes held by the weight (codes and quantization state when quantized).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.numel() * t.kind().elt_size_in_bytes(),
            Weight::Quant4(q) => q.bytes(),
            Weight::Int8(q) => q.bytes(),
        }
    }
    /// A dense weight cast to `kind`; a quantized one unchanged (it dequantizes to the input's
    /// dtype at each forward).
    pub fn to_kind(&self, kind: Kind) -> Weight {
        match self {
            Weight::Dense(t) => Weight::Dense(t.to_kind(kind)),
            Weight::Quant4(q) => Weight::Quant4(q.shallow_clone()),
            Weight::Int8(q) => Weight::Int8(q.shallow_clone()),
        }
    }
    /// The weight as a dense tensor in its own dtype (dequantized: a new tensor each call).
    pub fn dense(&self) -> Tensor {
        match self {
            Weight::Dense(t) => t.shallow_clone(),
            Weight::Quant4(q) => q.dequantize(q.dtype),
            Weight::Int8(q) => q.dequantize(q.dtype),
        }
    }
    /// The dense weight for an input of dtype `kind`. Like bitsandbytes' `matmul_4bit`, a
    /// 4-bit weight is dequantized to its stored dtype, then cast to the compute dtype.
    pub fn for_input(&self, kind: Kind) -> Tensor {
        match self {
            Weight::Dense(t) => t.shallow_clone(),
            Weight::Quant4(q) if q.dtype == kind || q.dtype == Kind::Float => q.dequantize(kind),
            Weight::Quant4(q) => q.dequantize(q.dtype).to_kind(kind),
            Weight::Int8(q) if q.dtype == kind || q.dtype == Kind::Float => q.dequantize(kind),
            Weight::Int8(q) => q.dequantize(q.dtype).to_kind(kind),
        }
    }
}

/// A linear projection `y = x Wᵀ + b` named by its path in the checkpoint (e.g.
/// `model.layers.0.self_attn.q_proj`), with an optional adapter.
pub struct Linear {
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    /// The adapter when it is plain LoRA (what the fused kernels handle).
    pub fn lora(&self) -> Option<&Lora> {
        self.adapter.as_ref().and_then(Adapter::as_lora)
    }

    /// No adapter, or plain LoRA: the fused training paths apply.
    pub fn fusable(&self) -> bool {
        self.adapter.as_ref().is_none_or(|a| a.as_lora().is_some())
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x Wᵀ + b` (+ the adapter's update, or with the weight the adapter replaces) over the
    /// last dimension of `x`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if super::decode_fusion(x, train) {
            if let Some(y) = self.decode_forward(x) {
                return y;
            }
        }
        let mut shape = x.size();
        let x2 = x.reshape([-1, self.in_features()]);
        let adapter = self.adapter.as_ref().filter(|_| !ADAPTERS_OFF.with(Cell::get));
        let w = match adapter.and_then(Adapter::replaced_weight) {
            Some(w) => w.to_kind(x.kind()),
            None => self.weight.for_input(x.kind()),
        };
        let y = x2.linear(&w, self.bias.as_ref());
        let y = match adapter {
            Some(a) => a.add_to(y, &x2, &w, self.bias.as_ref(), train),
            None => y,
        };
        *shape.last_mut().unwrap() = self.out_features();
        y.view(shape.as_slice())
    }

    /// A decoding step's `x Wᵀ + b` (+ LoRA's update) in one kernel
    /// ([`crate::cuda::autograd::decode_linear`]), for a dense weight and no adapter but plain LoRA.
    fn decode_forward(&self, x: &Tensor) -> Option<Tensor> {
        let w = self.weight.as_dense()?;
        if x.numel() as i64 > crate::cuda::autograd::DECODE_ROWS * self.in_features() {
            return None;
        }
        let lora = match &self.adapter {
            _ if adapters_disabled() => None,
            None => None,
            Some(a) => Some(a.as_lora()?.down(x, false)),
        };
        crate::cuda::autograd::decode_linear(x, w, self.bias.as_ref(), lora.as_ref().map(|(xa, b)| (xa, b)))
    }

    /// `layers`' projections of one input `x` (q, k, v; or gate, up). While training on a GPU
    /// they form one autograd node whose backward sums the input's gradient from every
    /// projection and adapter in one buffer ([`crate::cuda::autograd::projections`]);
    /// otherwise (or when an adapter is not plain LoRA) each layer's [`Linear::forward`].
    /// Errors panic, as tch's ops do (the script layer turns them into errors).
    pub fn forward_shared(layers: &[&Linear], x: &Tensor, train: bool) -> Vec<Tensor> {
        if !(train && x.device().is_cuda()) || !layers.iter().all(|l| l.fusable()) {
            return layers.iter().map(|l| l.forward(x, train)).collect();
        }
        let mut shape = x.size();
        let x2 = x.reshape([-1, *shape.last().unwrap()]);
        let off = ADAPTERS_OFF.with(Cell::get);
        let parts: Vec<_> = layers
            .iter()
            .map(|l| (l.weight.for_input(x.kind()), l.bias.as_ref(), l.lora().filter(|_| !off).map(|a| (&a.a, &a.b, a.scale, a.dropout))))
            .collect();
        let ys = crate::cuda::autograd::projections(&x2, &parts).unwrap_or_else(|e| panic!("{e:#}"));
        ys.into_iter()
            .zip(layers)
            .map(|(y, l)| {
                *shape.last_mut().unwrap() = l.out_features();
                y.view(shape.as_slice())
            })
            .collect()
    }

    /// `∂L/∂x = ∂L/∂y · W` through the frozen base weight alone (the adapter's part and the
    /// weight's own gradient are autograd's business).
    pub fn base_input_grad(&self, dy: &Tensor) -> Tensor {
        dy.matmul(&self.weight.for_input(dy.kind()))
    }
}

/// Several projections of one input (q, k, v; gate, up): separate layers, or one fused layer
/// whose output is their concatenation in that order (Phi-3's `qkv_proj` and `gate_up_proj`,
/// adapted as one module, as peft does).
pub enum Projections {
    /// Separate layers; their dense weights (and biases) are stored as consecutive rows of one
    /// [`Joint`] tensor when they can be, so that a decoding step projects with one GEMM.
    Separate { layers: Vec<Linear>, joint: Option<Joint> },
    Fused { layer: Linear, sizes: Vec<i64> },
}

/// The separate layers' weights `[Σ out, in]` (and biases `[Σ out]`) in one tensor, of which each
/// layer's weight is a slice of rows.
pub struct Joint {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// `whole` when `parts` are, in order, its consecutive slices along the first dimension.
fn slices_of(whole: &Tensor, parts: &[Option<&Tensor>]) -> bool {
    let (mut at, row) = (whole.data_ptr() as usize, whole.stride()[0] as usize * whole.kind().elt_size_in_bytes());
    let mut rows = 0;
    for p in parts {
        let Some(p) = p else { return false };
        if p.data_ptr() as usize != at || !p.is_contiguous() || p.kind() != whole.kind() {
            return false;
        }
        at += p.size()[0] as usize * row;
        rows += p.size()[0];
    }
    rows == whole.size()[0]
}

impl Projections {
    /// Separate layers, their dense weights joined ([`Projections::join`]).
    pub fn separate_layers(layers: Vec<Linear>) -> Projections {
        let mut p = Projections::Separate { layers, joint: None };
        p.join();
        p
    }

    /// Stores separate layers' weights (and biases) as slices of one [`Joint`] tensor, if they
    /// are dense, of one dtype, on one device, and every layer or none has a bias (of that
    /// dtype); a joint that no longer holds the layers' weights (cast or replaced since) is
    /// dropped first. Costs one copy of the weights while it runs.
    pub fn join(&mut self) {
        let Projections::Separate { layers, joint } = self else { return };
        if joint.as_ref().is_some_and(|j| j.holds(layers)) {
            return;
        }
        *joint = None;
        let weights: Option<Vec<&Tensor>> = layers.iter().map(|l| l.weight.as_dense()).collect();
        let Some(weights) = weights else { return };
        let same = |f: &dyn Fn(&Tensor) -> String| weights.iter().all(|w| f(w) == f(weights[0]));
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        let biases_fit = match &biases {
            Some(b) => b.iter().all(|t| t.kind() == weights[0].kind()),
            None => layers.iter().all(|l| l.bias.is_none()),
        };
        if weights.len() < 2 || !biases_fit || !same(&|w| format!("{:?} {:?} {}", w.kind(), w.device(), w.size()[1])) {
            return;
        }
        let _g = tch::no_grad_guard();
        let weight = Tensor::cat(&weights, 0);
        let bias = biases.map(|b| Tensor::cat(&b, 0));
        let mut row = 0;
        for l in layers.iter_mut() {
            let n = l.out_features();
            l.weight = Weight::Dense(weight.narrow(0, row, n));
            if let Some(b) = &bias {
                l.bias = Some(b.narrow(0, row, n));
            }
            row += n;
        }
        *joint = Some(Joint { weight, bias });
    }

    /// Each projection of `x` ([`Linear::forward_shared`] for separate layers).
    pub fn forward(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        self.parts(self.outputs(x, train))
    }

    /// The output of each linear layer of [`Projections::linears`] for `x`, as computed (a fused
    /// layer's whole output, unsplit).
    pub fn outputs(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        match self {
            Projections::Separate { layers, .. } => Linear::forward_shared(&layers.iter().collect::<Vec<_>>(), x, train),
            Projections::Fused { layer, .. } => vec![layer.forward(x, train)],
        }
    }

    /// The projections (q, k, v; gate, up) from the layers' [`Projections::outputs`].
    pub fn parts(&self, outputs: Vec<Tensor>) -> Vec<Tensor> {
        match self {
            Projections::Separate { .. } => outputs,
            Projections::Fused { sizes, .. } => outputs[0].split_with_sizes(sizes.as_slice(), -1),
        }
    }

    /// `∂L/∂x` through the frozen base weights from each layer's output gradient `dys` (in the
    /// order of [`Projections::outputs`]): `Σᵢ ∂yᵢ · Wᵢ`, accumulated in one buffer.
    pub fn base_input_grad(&self, dys: &[Tensor]) -> Tensor {
        let linears = self.linears();
        let rows = |t: &Tensor| t.reshape([-1, *t.size().last().unwrap()]);
        let mut dx = linears[0].base_input_grad(&rows(&dys[0]));
        for (l, dy) in linears.iter().zip(dys).skip(1) {
            let dy = rows(dy);
            let _ = dx.addmm_(&dy, &l.weight.for_input(dy.kind()));
        }
        let mut shape = dys[0].size();
        *shape.last_mut().unwrap() = linears[0].in_features();
        dx.view(shape.as_slice())
    }

    /// Every projection of `x` side by side, `[.., Σ out]`, from one product by the joint weight
    /// (and, with LoRA adapters, one by the stacked `s·A`s and one by the block-diagonal `B`s; at
    /// up to 8 rows on a GPU each a `decode_linear` GEMV, the `B` product inside the joint one):
    /// for a decoding step, where each launch costs more than its work. `None` where the
    /// layers have no joint weight or an adapter other than plain LoRA.
    pub fn forward_joint(&self, x: &Tensor) -> Option<Tensor> {
        let (layers, joint) = match self {
            Projections::Fused { layer, .. } => return Some(layer.forward(x, false)),
            Projections::Separate { layers, joint } => (layers, joint.as_ref()?),
        };
        if !joint.holds(layers) || !layers.iter().all(Linear::fusable) || joint.weight.kind() != x.kind() {
            return None;
        }
        let mut shape = x.size();
        let x2 = x.reshape([-1, *shape.last().unwrap()]);
        let adapted: Vec<(usize, &Lora)> = layers.iter().enumerate().filter_map(|(i, l)| Some((i, l.lora()?))).collect();
        let lora = adapted.first().filter(|_| !adapters_disabled()).map(|&(_, first)| {
            super::prepared(&first.a, "joint lora", || {
                let a = Tensor::cat(&adapted.iter().map(|(_, l)| l.scaled_a(x.kind())).collect::<Vec<_>>(), 0);
                let b = Tensor::zeros([joint.weight.size()[0], a.size()[0]], (x.kind(), x.device()));
                let (mut row, mut col) = (0, 0);
                for (i, l) in layers.iter().enumerate() {
                    if let Some((_, lora)) = adapted.iter().find(|(j, _)| *j == i) {
                        b.narrow(0, row, l.out_features()).narrow(1, col, lora.rank()).copy_(&lora.b.to_kind(x.kind()));
                        col += lora.rank();
                    }
                    row += l.out_features();
                }
                vec![a, b]
            })
        });
        let xa = lora.as_ref().map(|ab| super::adapters::lora::down_rows(&x2, &ab[0]));
        let fused = crate::cuda::autograd::decode_linear(&x2, &joint.weight, joint.bias.as_ref(), xa.as_ref().zip(lora.as_ref().map(|ab| &ab[1])));
        let y = fused.unwrap_or_else(|| {
            let mut y = x2.linear(&joint.weight, joint.bias.as_ref());
            if let (Some(xa), Some(ab)) = (&xa, &lora) {
                let _ = y.addmm_(xa, &ab[1].tr());
            }
            y
        });
        *shape.last_mut().unwrap() = joint.weight.size()[0];
        Some(y.view(shape.as_slice()))
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Projections::Separate { layers, .. } => layers.iter().collect(),
            Projections::Fused { layer, .. } => vec![layer],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Projections::Separate { layers, .. } => layers.iter_mut().collect(),
            Projections::Fused { layer, .. } => vec![layer],
        }
    }

    /// The separate layers, if they are separate.
    pub fn separate(&self) -> Option<&[Linear]> {
        match self {
            Projections::Separate { layers, .. } => Some(layers),
            Projections::Fused { .. } => None,
        }
    }
}

impl Joint {
    /// Whether the layers' weights (and biases, if joined) are still this tensor's slices.
    fn holds(&self, layers: &[Linear]) -> bool {
        let weights: Vec<Option<&Tensor>> = layers.iter().map(|l| l.weight.as_dense()).collect();
        let biases: Vec<Option<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        slices_of(&self.weight, &weights)
            && match &self.bias {
                Some(b) => slices_of(b, &biases),
                None => biases.iter().all(Option::is_none),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn layer(out: i64, inp: i64, adapter: Option<f64>, bias: bool) -> Linear {
        let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu)) * 0.1;
        let lora = adapter.map(|dropout| {
            let mut l = Lora::new(inp, out, 4, 2.0, dropout, Kind::Float, Device::Cpu, &mut rand::thread_rng());
            l.b = (Tensor::randn([out, 4], (Kind::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
            l
        });
        Linear { name: "p".into(), weight: Weight::Dense(w), bias: bias.then(|| Tensor::randn([out], (Kind::Float, Device::Cpu))), adapter: lora.map(Adapter::Lora) }
    }

    /// Joined layers keep their outputs; the joint projection (one GEMM, the adapters' stacked
    /// `s·A` and block-diagonal `B`) gives every layer's output side by side; a cast breaks the
    /// joint and `join` makes it again in the new dtype.
    #[test]
    fn joined_projections_give_the_separate_layers_outputs() {
        tch::manual_seed(0);
        let separate = vec![layer(6, 8, Some(0.0), true), layer(5, 8, None, true), layer(4, 8, Some(0.0), true)];
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        let want: Vec<Tensor> = separate.iter().map(|l| l.forward(&x, false)).collect();
        let mut p = Projections::separate_layers(separate);
        let got = p.forward(&x, false);
        for (g, w) in got.iter().zip(&want) {
            assert!(g.equal(w), "a joined layer's output changed");
        }
        let joint = p.forward_joint(&x).expect("joined");
        crate::nn::forget_prepared();
        assert_eq!(joint.size(), [2, 3, 15]);
        let err = (joint - Tensor::cat(&want, -1)).abs().max().double_value(&[]);
        assert!(err < 1e-5, "joint projection differs by {err}");
        // a bias on some layers only: no joint (its GEMM would leave them out)
        let mixed = Projections::separate_layers(vec![layer(6, 8, None, true), layer(5, 8, None, false)]);
        assert!(mixed.forward_joint(&x).is_none(), "layers with and without a bias were joined");
        for l in p.linears_mut() {
            l.weight = l.weight.to_kind(Kind::Double);
            l.bias = l.bias.as_ref().map(|b| b.to_kind(Kind::Double));
        }
        assert!(p.forward_joint(&x.to_kind(Kind::Double)).is_none(), "a stale joint was used");
        p.join();
        let joint = p.forward_joint(&x.to_kind(Kind::Double)).expect("joined again");
        crate::nn::forget_prepared();
        let err = (joint - Tensor::cat(&want, -1).to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(err < 1e-5, "joint projection after the cast differs by {err}");
    }

    /// The fused projections node against separate layers through autograd: outputs and the
    /// gradients of the input and of every adapter, with and without dropout (the same masks:
    /// both draw them with `native_dropout`, in projection order, from the same seed).
    #[test]
    fn shared_projections_match_separate_layers() {
        tch::manual_seed(0);
        for dropout in [0.0, 0.3] {
            let layers = [layer(6, 8, Some(dropout), false), layer(5, 8, None, true), layer(6, 8, Some(dropout), false)];
            let refs: Vec<&Linear> = layers.iter().collect();
            let x0 = Tensor::randn([7, 8], (Kind::Float, Device::Cpu));
            let dys: Vec<Tensor> = layers.iter().map(|l| Tensor::randn([7, l.out_features()], (Kind::Float, Device::Cpu))).collect();
            let run = |fused: bool| {
                let x = x0.copy().set_requires_grad(true);
                tch::manual_seed(7);
                let ys: Vec<Tensor> = if fused {
                    let parts: Vec<_> = refs.iter().map(|l| (l.weight.dense(), l.bias.as_ref(), l.lora().map(|a| (&a.a, &a.b, a.scale, a.dropout)))).collect();
                    crate::cuda::autograd::projections(&x, &parts).unwrap()
                } else {
                    refs.iter()
                        .map(|l| {
                            let y = x.linear(&l.weight.dense(), l.bias.as_ref());
                            match l.lora() {
                                Some(a) => {
                                    let xd = if a.dropout > 0.0 { x.native_dropout(a.dropout, true).0 } else { x.shallow_clone() };
                                    y + xd.matmul(&a.a.tr()).matmul(&a.b.tr()) * a.scale
                                }
                                None => y,
                            }
                        })
                        .collect()
                };
                let roots: Vec<(&Tensor, &Tensor)> = ys.iter().zip(&dys).collect();
                for l in &layers {
                    if let Some(a) = l.lora() {
                        let (mut ga, mut gb) = (a.a.grad(), a.b.grad());
                        if ga.defined() {
                            let _ = (ga.zero_(), gb.zero_());
                        }
                    }
                }
                crate::cuda::autograd::backward(&roots).unwrap();
                let mut grads = vec![x.grad()];
                for l in &layers {
                    if let Some(a) = l.lora() {
                        grads.push(a.a.grad().copy());
                        grads.push(a.b.grad().copy());
                    }
                }
                (ys.into_iter().map(|y| y.detach()).collect::<Vec<_>>(), grads)
            };
            let (ys, gs) = run(true);
            let (ye, ge) = run(false);
            for (a, b) in ys.iter().zip(&ye).chain(gs.iter().zip(&ge)) {
                let err = (a - b).abs().max().double_value(&[]);
                assert!(err < 1e-5, "dropout {dropout}: differs by {err}");
            }
            assert!(gs[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }
}
