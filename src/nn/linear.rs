//! The one linear layer every projection of a model uses: a frozen base weight (dense, or
//! 4-bit in bitsandbytes' format), an optional bias, and an optional LoRA adapter on top.

use super::quant::{Int8Rows, Quant4};
use tch::{Kind, Tensor};

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

/// A LoRA adapter (Hu et al., 2021) for a linear layer `W: [out, in]`:
///
/// `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`, `B: [out, r]`,
/// `s = alpha / r` (or `alpha / √r` with rsLoRA).
/// A starts Kaiming-uniform (`U(-1/√in, 1/√in)`, peft's `a=√5`), B starts at zero, so the
/// adapted layer starts equal to the base layer.
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// Fresh adapter; A is drawn from `rng` (seeded by the caller, so runs are reproducible).
    pub fn new(in_features: i64, out_features: i64, r: i64, scale: f64, dropout: f64, kind: Kind, device: tch::Device, rng: &mut impl rand::Rng) -> Lora {
        let bound = 1.0 / (in_features as f64).sqrt();
        let values: Vec<f32> = (0..r * in_features).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        let a = Tensor::from_slice(&values).view([r, in_features]).to_kind(kind).to_device(device).set_requires_grad(true);
        let b = Tensor::zeros([out_features, r], (kind, device)).set_requires_grad(true);
        Lora { a, b, scale, dropout }
    }

    /// `y + s · dropout(x) Aᵀ Bᵀ` for the base output `y` `[N, out]` of `x` `[N, in]`, added into
    /// `y` in place by one GEMM (`y += (s · dropout(x) Aᵀ) Bᵀ`: the scale applies to the
    /// `[N, r]` product, and no `[N, out]` delta is formed). Computed in `x`'s dtype (adapters
    /// may be kept in fp32 while the base runs in bf16/fp16; gradients flow back through the
    /// cast).
    pub fn add_to(&self, mut y: Tensor, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let (a, b) = if self.a.kind() == x.kind() {
            (self.a.shallow_clone(), self.b.shallow_clone())
        } else {
            (self.a.to_kind(x.kind()), self.b.to_kind(x.kind()))
        };
        let _ = y.addmm_(&(x.matmul(&a.tr()) * self.scale), &b.tr());
        y
    }

    /// The dense update `s · B A`, shaped like the base weight.
    pub fn merged_delta(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale
    }
}

/// A linear projection `y = x Wᵀ + b` named by its path in the checkpoint (e.g.
/// `model.layers.0.self_attn.q_proj`), with an optional LoRA adapter.
pub struct Linear {
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x Wᵀ + b` (+ the adapter's update) over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut shape = x.size();
        let x2 = x.reshape([-1, self.in_features()]);
        let y = x2.linear(&self.weight.for_input(x.kind()), self.bias.as_ref());
        let y = match &self.lora {
            Some(l) => l.add_to(y, &x2, train),
            None => y,
        };
        *shape.last_mut().unwrap() = self.out_features();
        y.view(shape.as_slice())
    }

    /// `∂L/∂x = ∂L/∂y · W` through the frozen base weight alone (the adapter's part and the
    /// weight's own gradient are autograd's business).
    pub fn base_input_grad(&self, dy: &Tensor) -> Tensor {
        dy.matmul(&self.weight.for_input(dy.kind()))
    }
}
