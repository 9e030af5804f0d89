//! Rotary position embeddings: frequencies with their long-context scalings, and the rotation
//! of queries and keys.

use super::fused;
use tch::{Device, Kind, Tensor};

/// How rotary frequencies are rescaled for long contexts (`rope_type` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware: base grows as `theta * (factor*len/max_pos - (factor-1))^(d/(d-2))` once `len > max_pos`.
    Dynamic { factor: f64, original_max_position_embeddings: usize },
    /// Llama 3.1: low frequencies divided by `factor`, high kept, the band between interpolated.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// LongRoPE (Phi-3's 128k models): frequency `i` divided by `short_factor[i]`, or by
    /// `long_factor[i]` once a sequence passes `original_max_position_embeddings`; cos and sin
    /// scaled by `attention_factor`.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
}

/// Rotary position embedding: frequencies `θ^(-2i/d)`, rescaled per `rope_scaling`, over the
/// first `d` dimensions of each head (all of them, or `partial_rotary_factor` of them).
pub struct Rope {
    head_dim: i64,
    theta: f64,
    scaling: RopeScaling,
}

impl Rope {
    /// RoPE over the first `rotary_dim` dimensions of each head.
    pub fn new(rotary_dim: i64, theta: f64, scaling: RopeScaling) -> Rope {
        Rope { head_dim: rotary_dim, theta, scaling }
    }

    /// `1 / θ^(2i/d)` for `i < d/2`, computed in fp32 like transformers.
    fn base_inv_freq(&self, theta: f64) -> Tensor {
        let d = self.head_dim;
        let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
        Tensor::pow_scalar(theta, &exps).reciprocal()
    }

    /// Inverse frequencies for a sequence whose largest position is `max_pos`.
    pub fn inv_freq(&self, max_pos: i64) -> Tensor {
        match &self.scaling {
            RopeScaling::Default => self.base_inv_freq(self.theta),
            RopeScaling::Linear { factor } => self.base_inv_freq(self.theta) / *factor,
            RopeScaling::Dynamic { factor, original_max_position_embeddings } => {
                let len = (max_pos + 1).max(*original_max_position_embeddings as i64) as f64;
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((factor * len / *original_max_position_embeddings as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                self.base_inv_freq(base)
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let inv = self.base_inv_freq(self.theta);
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled = (&inv / *factor).where_self(&wavelen.gt(low_wavelen), &inv);
                let smooth = ((wavelen.reciprocal() * old) - *low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &scaled / *factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, .. } => {
                let ext = if max_pos + 1 > *original_max_position_embeddings as i64 { long_factor } else { short_factor };
                let ext = Tensor::from_slice(&ext.iter().map(|f| *f as f32).collect::<Vec<_>>());
                (ext * self.base_inv_freq(self.theta).reciprocal()).reciprocal()
            }
        }
    }

    /// Whether a position's rotation depends on the sequence's length too (dynamic NTK, LongRoPE).
    pub fn depends_on_length(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. })
    }

    /// `(cos, sin)` of shape `[B, 1, T, d]` for positions `[B, T]`, in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let max_pos = if self.depends_on_length() {
            positions.max().int64_value(&[])
        } else {
            0
        };
        let inv = crate::cuda::upload(&self.inv_freq(max_pos), positions.device());
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = match &self.scaling {
            RopeScaling::LongRope { attention_factor, .. } => (emb.cos() * *attention_factor, emb.sin() * *attention_factor),
            _ => (emb.cos(), emb.sin()),
        };
        (cos.to_kind(kind).unsqueeze(1), sin.to_kind(kind).unsqueeze(1))
    }
}

/// Projected queries or keys `[B, T, heads·d]` → rotated `[B, heads, T, d]`:
/// `x·cos + rotate_half(x)·sin`, where `rotate_half([a, b]) = [-b, a]` over the last dim; with
/// partial rotary (cos narrower than the head), over the first dimensions only, the rest passed
/// through.
pub fn rotate(y: Tensor, heads: i64, head_dim: i64, (cos, sin): &(Tensor, Tensor), train: bool) -> Tensor {
    let (b, t, _) = y.size3().unwrap();
    let y = y.view([b, t, heads, head_dim]);
    let rotary = *cos.size().last().unwrap();
    if rotary < head_dim {
        let x = y.transpose(1, 2);
        let (rot, pass) = (x.narrow(3, 0, rotary), x.narrow(3, rotary, head_dim - rotary));
        let (x1, x2) = (rot.narrow(3, 0, rotary / 2), rot.narrow(3, rotary / 2, rotary / 2));
        let rotated = Tensor::cat(&[&(-x2), &x1], 3);
        return Tensor::cat(&[&rot * cos + rotated * sin, pass], 3);
    }
    if fused(&y, train) {
        if let Some(r) = crate::cuda::autograd::rope(&y, &cos.squeeze_dim(1), &sin.squeeze_dim(1)) {
            return r.transpose(1, 2);
        }
    }
    let x = y.transpose(1, 2);
    let x1 = x.narrow(3, 0, head_dim / 2);
    let x2 = x.narrow(3, head_dim / 2, head_dim / 2);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    &x * cos + rotated * sin
}
