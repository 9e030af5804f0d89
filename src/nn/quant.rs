//! 4-bit weights in bitsandbytes' format (NF4 and FP4, QLoRA's "double quantization"),
//! written from bitsandbytes' definitions so codes, scales and dequantized weights are the
//! same bits.
//!
//! # Format (bitsandbytes `quantize_4bit(A, blocksize=64, quant_type, compress_statistics)`)
//!
//! - The weight is flattened row-major and cut into blocks of 64 values (the last block may be
//!   shorter). Each block keeps `absmax = max |x|` in fp32.
//! - Each value is normalised, `x · (1 / absmax)` (the last, partial block divides: `x / absmax`),
//!   clamped to [-1, 1], and rounded to the nearest of 16 code values ([`code4`]). NF4's codes
//!   are the sorted normal-quantile table; FP4's are `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, …]/12`
//!   in bit-pattern order (1 sign, 2 exponent, 1 mantissa bit). Rounding is "bucketize into the
//!   midpoints of the sorted codes" (a value on a midpoint goes to the smaller code).
//! - Two 4-bit codes share a byte: element `2i` in the **high** nibble, `2i+1` in the low
//!   nibble (an odd count is padded with a zero code). The packed tensor is `uint8 [(n+1)/2, 1]`.
//! - Dequantization: `code[q] · absmax` in fp32, then cast to the weight's dtype. For FP4,
//!   code 8 dequantizes to `-0.0` (bitsandbytes' CUDA and native CPU kernels; its pure-torch
//!   fallback, used on CPU only when the last dimension is odd, gives `+0.0`).
//!
//! # Double quantization (`compress_statistics=True`)
//!
//! The fp32 absmax vector is replaced by: `offset = mean(absmax)` (a torch mean, fp32), and
//! `absmax - offset` quantized to 8 bits with bitsandbytes' signed dynamic map
//! ([`dynamic_map`], 256 values) in blocks of 256, each block with its own fp32 absmax
//! (`nested_absmax`). Dequantized: `absmax = dynamic[q8] · nested_absmax + offset` (fp32).
//!
//! # Where bitsandbytes' own backends differ (and which one we follow)
//!
//! bitsandbytes rounds slightly differently on CPU and on CUDA; [`Flavor`] picks which to
//! reproduce, and [`Flavor::of`] picks the one bitsandbytes itself would use on the tensor's
//! device:
//! - FP4 values within ±0.0026·absmax of zero: the CPU (torch) backend codes small positives
//!   as `8` (-0) and small negatives as `0` (+0); the CUDA kernel picks the sign from `x < 0`.
//!   They dequantize to the same number (±0).
//! - The 8-bit nested absmax: CUDA rounds to the nearest code (binary search, midpoint
//!   compares); the native CPU kernel looks the code up in a 65,536-entry table of the
//!   normalised range, `lut[⌊((v+1)·0.5)·65535 + 0.5⌋]`, which differs from nearest for values
//!   within ~1.5e-5 of a midpoint. A block whose absmax is 0 gets codes 0.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Block size of the 4-bit codes (bitsandbytes' default for `Linear4bit`).
pub const BLOCKSIZE: i64 = 64;
/// Block size of the 8-bit quantized absmax under double quantization.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// Which code: a 4-bit table, or 8-bit rows ([`Int8Rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
    Int8,
}

impl QuantType {
    pub fn parse(s: &str) -> Result<QuantType> {
        Ok(match s {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            "int8" => QuantType::Int8,
            other => bail!("unknown quantization `{other}`; valid: nf4, fp4, int8"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int8 => "int8",
        }
    }
}

/// Whose rounding to reproduce where bitsandbytes' CPU and CUDA backends differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// bitsandbytes on CPU: torch backend for 4-bit, native lookup table for the nested 8-bit.
    Cpu,
    /// bitsandbytes' CUDA kernels.
    Cuda,
}

impl Flavor {
    pub fn of(device: Device) -> Flavor {
        if device.is_cuda() { Flavor::Cuda } else { Flavor::Cpu }
    }
}

/// NF4: quantiles of N(0, 1) normalised to [-1, 1] (bitsandbytes' `get_4bit_type("nf4")`,
/// written as it prints them).
#[allow(clippy::excessive_precision)]
const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 (e2m1, bias 2) in bit-pattern order, before dividing by 12.
const FP4_RAW: [f32; 16] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// The codes of FP4 in increasing value (torch's argsort of the table on CPU, as
/// bitsandbytes' torch backend computes it; +0 (code 0) sorts before -0 (code 8)).
const FP4_ORDER: [i64; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];
/// FP4 magnitude codes in increasing value (for the CUDA rule: sign bit from `x < 0`).
const FP4_MAG_ORDER: [i64; 8] = [0, 1, 6, 7, 4, 5, 2, 3];
/// The thresholds bitsandbytes' CUDA kernel (`dQuantizeFP4`) compares `|x|` against, between
/// consecutive magnitudes of [`FP4_MAG_ORDER`]: the midpoints written as short float literals
/// (0.583333 is not the fp32 midpoint 7/12, and values such as a bf16 7/12 fall on the other
/// side of it).
#[allow(clippy::excessive_precision)]
const FP4_CUDA_PIVOTS: [f32; 7] = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333];

/// The 16 code values (fp32) as bitsandbytes' `get_4bit_type` returns them (FP4's code 8 is +0).
pub fn code4(q: QuantType, device: Device) -> Tensor {
    match q {
        QuantType::Int8 => Tensor::zeros([0], (Kind::Float, device)),
        QuantType::Nf4 => Tensor::from_slice(&NF4).to_device(device),
        QuantType::Fp4 => {
            let t = Tensor::from_slice(&FP4_RAW);
            let m = t.abs().max();
            (t / m).to_device(device)
        }
    }
}

/// The code values the dequantization kernels use (FP4 code 8 is -0.0), made once per device.
fn dequant_code4(q: QuantType, device: Device) -> Tensor {
    static CACHE: std::sync::Mutex<Vec<(QuantType, Device, Tensor)>> = std::sync::Mutex::new(vec![]);
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, _, t)) = cache.iter().find(|(k, d, _)| *k == q && *d == device) {
        return t.shallow_clone();
    }
    let c = code4(q, device);
    if q == QuantType::Fp4 {
        let mut eight = c.narrow(0, 8, 1);
        let _ = eight.fill_(-0.0);
    }
    cache.push((q, device, c.shallow_clone()));
    c
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for
/// exponents `e = 0..7`, `2^e` fraction means of `linspace(0.1, 1, 2^e + 1)` (fp32) scaled
/// by `±10^(e-6)`, plus 0 and 1, sorted (256 values in [-0.99297, 1]).
pub fn dynamic_map() -> Tensor {
    const SCALE: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = vec![];
    for (i, s) in SCALE.iter().enumerate() {
        let n = (1i64 << i) + 1;
        let b = Tensor::linspace(0.1, 1.0, n, (Kind::Float, Device::Cpu));
        let means = (b.narrow(0, 0, n - 1) + b.narrow(0, 1, n - 1)) / 2.0;
        let pos = &means * *s;
        let neg = &means * (-*s);
        data.extend(Vec::<f32>::try_from(&pos).unwrap());
        data.extend(Vec::<f32>::try_from(&neg).unwrap());
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Tensor::from_slice(&data)
}

/// The 8-bit quantized absmax of double quantization.
pub struct Nested {
    /// fp32 `[ceil(blocks / 256)]`: absmax of each block of (absmax − offset).
    pub absmax: Tensor,
    /// fp32 `[256]`: the dynamic map ([`dynamic_map`]).
    pub code: Tensor,
    /// `mean(absmax)`, subtracted before quantizing.
    pub offset: f32,
}

/// A 4-bit quantized tensor and its bitsandbytes `QuantState`.
pub struct Quant4 {
    pub qtype: QuantType,
    /// The original shape and dtype (dequantization returns them).
    pub shape: Vec<i64>,
    pub dtype: Kind,
    pub blocksize: i64,
    /// `uint8 [(n+1)/2, 1]`, element `2i` in the high nibble.
    pub packed: Tensor,
    /// fp32 `[blocks]`, or uint8 `[blocks]` codes into `nested.code` under double quantization.
    pub absmax: Tensor,
    pub nested: Option<Nested>,
}

/// Per-block absmax of a flat fp32 vector and the values normalised the way bitsandbytes'
/// torch backend does (`x · (1/absmax)` for full blocks, `x / absmax` for the tail, clamped).
fn normalise_blocks(a: &Tensor, blocksize: i64) -> (Tensor, Tensor) {
    let n = a.numel() as i64;
    let rem = n % blocksize;
    let full = n - rem;
    let mut absmax = Tensor::zeros([0], (Kind::Float, a.device()));
    let mut scaled = Tensor::zeros([0], (Kind::Float, a.device()));
    if full > 0 {
        let com = a.narrow(0, 0, full).view([full / blocksize, blocksize]);
        absmax = com.abs().amax([1i64].as_slice(), false);
        let inv = absmax.clamp_min(1e-38).reciprocal();
        scaled = (com * inv.unsqueeze(1)).clamp(-1.0, 1.0).view([full]);
    }
    if rem > 0 {
        let tail = a.narrow(0, full, rem);
        let am = tail.abs().max().clamp_min(1e-38);
        scaled = Tensor::cat(&[scaled, (&tail / &am).clamp(-1.0, 1.0)], 0);
        absmax = Tensor::cat(&[absmax, am.unsqueeze(0)], 0);
    }
    (absmax, scaled)
}

/// 4-bit codes (int64, one per value) of normalised values.
fn codes4(scaled: &Tensor, q: QuantType, flavor: Flavor) -> Tensor {
    let dev = scaled.device();
    let code = code4(q, dev);
    match (q, flavor) {
        (QuantType::Int8, _) => unreachable!("int8 is not a 4-bit code"),
        (QuantType::Nf4, _) => {
            let bounds = (code.narrow(0, 0, 15) + code.narrow(0, 1, 15)) / 2.0;
            scaled.bucketize(&bounds, false, false)
        }
        (QuantType::Fp4, Flavor::Cpu) => {
            let order = Tensor::from_slice(&FP4_ORDER).to_device(dev);
            let sorted = code.index_select(0, &order);
            let bounds = (sorted.narrow(0, 0, 15) + sorted.narrow(0, 1, 15)) / 2.0;
            order.index_select(0, &scaled.bucketize(&bounds, false, false).view([-1]))
        }
        (QuantType::Fp4, Flavor::Cuda) => {
            let order = Tensor::from_slice(&FP4_MAG_ORDER).to_device(dev);
            let bounds = Tensor::from_slice(&FP4_CUDA_PIVOTS).to_device(dev);
            let mag = order.index_select(0, &scaled.abs().bucketize(&bounds, false, false).view([-1]));
            mag + scaled.lt(0.0).to_kind(Kind::Int64) * 8
        }
    }
}

/// bitsandbytes' blockwise 8-bit quantization of a flat fp32 vector with a sorted 256-value
/// code: `(codes uint8, absmax fp32 per block)`.
fn quantize_blockwise_8bit(a: &Tensor, code: &Tensor, blocksize: i64, flavor: Flavor) -> (Tensor, Tensor) {
    let dev = a.device();
    let m = a.numel() as i64;
    let nb = (m + blocksize - 1) / blocksize;
    let padded = a.constant_pad_nd([0, nb * blocksize - m]).view([nb, blocksize]);
    let absmax = padded.abs().amax([1i64].as_slice(), false);
    let inv = absmax.reciprocal().unsqueeze(1);
    let normed = (&padded * &inv).view([-1]).narrow(0, 0, m);
    let mids = (code.narrow(0, 0, 255) + code.narrow(0, 1, 255)) * 0.5;
    let idx = match flavor {
        Flavor::Cuda => normed.bucketize(&mids, false, false),
        Flavor::Cpu => {
            // build_quantize_lut: lut[i] = #midpoints < (-1 + 2i/65535)
            let i = Tensor::arange(65536, (Kind::Float, dev));
            let vals = (i * 2.0) / 65535.0 - 1.0; // -1 + 2i/65535, in fp32
            let lut = vals.searchsorted(&mids, false, false, "left", None::<Tensor>);
            let li = ((normed.clamp(-1.0, 1.0) + 1.0) * 0.5 * 65535.0 + 0.5).to_kind(Kind::Int64).clamp(0, 65535);
            lut.index_select(0, &li)
        }
    };
    // a block whose absmax is 0 gets codes 0
    let zero = absmax.eq(0.0).repeat_interleave_self_int(blocksize, None, None).narrow(0, 0, m);
    let idx = idx.masked_fill(&zero, 0);
    (idx.to_kind(Kind::Uint8), absmax)
}

impl Quant4 {
    /// Quantizes `w` (any float dtype, any shape) like bitsandbytes' `quantize_4bit` with
    /// `blocksize=64`; `double_quant` is its `compress_statistics`.
    pub fn quantize(w: &Tensor, q: QuantType, double_quant: bool, flavor: Flavor) -> Result<Quant4> {
        Self::quantize_with_offset(w, q, double_quant, flavor, None)
    }

    /// [`Quant4::quantize`] with double quantization's offset given instead of computed as
    /// `mean(absmax)`: a mean's last bit depends on the device's reduction order, so a test
    /// reproducing bitsandbytes' CUDA results on the CPU takes the offset the GPU computed.
    pub fn quantize_with_offset(w: &Tensor, q: QuantType, double_quant: bool, flavor: Flavor, offset: Option<f32>) -> Result<Quant4> {
        let dtype = w.kind();
        if !matches!(dtype, Kind::Float | Kind::Half | Kind::BFloat16) {
            bail!("4-bit quantization needs a fp32/fp16/bf16 tensor, got {dtype:?}");
        }
        if q == QuantType::Int8 {
            bail!("int8 is not a 4-bit code (see Int8Rows)");
        }
        let _g = tch::no_grad_guard();
        let a = w.detach().reshape([-1]).to_kind(Kind::Float);
        if a.numel() == 0 {
            bail!("cannot quantize an empty tensor");
        }
        let (absmax, mut scaled) = normalise_blocks(&a, BLOCKSIZE);
        if scaled.numel() % 2 == 1 {
            scaled = scaled.constant_pad_nd([0, 1]);
        }
        let mut codes = codes4(&scaled, q, flavor);
        if flavor == Flavor::Cuda {
            // a block whose absmax is 0 scales to 0 · (1/0) = NaN on the GPU, which fails every
            // comparison of the kernel's search: code 0
            let zero = absmax.eq(0.0).repeat_interleave_self_int(BLOCKSIZE, None, None).narrow(0, 0, a.numel() as i64);
            let zero = zero.constant_pad_nd([0, codes.numel() as i64 - zero.numel() as i64]);
            codes = codes.masked_fill(&zero, 0);
        }
        let codes = codes.to_kind(Kind::Uint8).view([-1, 2]);
        let hi = codes.select(1, 0).bitwise_left_shift_tensor_scalar(4);
        let packed = hi.bitwise_or_tensor(&codes.select(1, 1)).unsqueeze(1);
        let (absmax, nested) = if double_quant {
            let offset = match offset {
                Some(o) => Tensor::from(o).to_device(absmax.device()),
                None => absmax.mean(Kind::Float),
            };
            let centered = &absmax - &offset;
            let code = dynamic_map().to_device(a.device());
            let (q8, nested_absmax) = quantize_blockwise_8bit(&centered, &code, NESTED_BLOCKSIZE, flavor);
            (q8, Some(Nested { absmax: nested_absmax, code, offset: offset.double_value(&[]) as f32 }))
        } else {
            (absmax, None)
        };
        Ok(Quant4 { qtype: q, shape: w.size(), dtype, blocksize: BLOCKSIZE, packed, absmax, nested })
    }

    /// Number of quantized values.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The fp32 absmax per block (decoding the nested 8-bit absmax if any).
    pub fn absmax_f32(&self) -> Tensor {
        match &self.nested {
            None => self.absmax.shallow_clone(),
            Some(n) => {
                let m = self.absmax.numel() as i64;
                let vals = n.code.to_device(self.absmax.device()).index_select(0, &self.absmax.to_kind(Kind::Int64));
                let scale = n.absmax.repeat_interleave_self_int(NESTED_BLOCKSIZE, None, None).narrow(0, 0, m);
                vals * scale + n.offset as f64
            }
        }
    }

    /// The weight, dequantized to `kind` (bitsandbytes' `dequantize_4bit` gives the stored
    /// dtype; other kinds are cast from fp32 directly).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let _g = tch::no_grad_guard();
        let absmax = self.absmax_f32();
        let code = dequant_code4(self.qtype, self.packed.device());
        match crate::cuda::kernels::dequant4(&self.packed, &absmax, &code, self.numel(), self.blocksize, kind) {
            Some(w) => w.view(self.shape.as_slice()),
            None => self.dequantize_with(&absmax, &code, kind),
        }
    }

    /// [`Quant4::dequantize`] with libtorch ops (the CPU path, and the reference the CUDA
    /// kernel is tested against).
    pub fn dequantize_ops(&self, kind: Kind) -> Tensor {
        let _g = tch::no_grad_guard();
        self.dequantize_with(&self.absmax_f32(), &dequant_code4(self.qtype, self.packed.device()), kind)
    }

    /// The op path from the fp32 absmax per block and the 16 code values.
    fn dequantize_with(&self, absmax: &Tensor, code: &Tensor, kind: Kind) -> Tensor {
        let dev = self.packed.device();
        let n = self.numel();
        // one lookup per byte: [code[b >> 4], code[b & 15]]
        let b = Tensor::arange(256, (Kind::Int64, dev));
        let pair = Tensor::stack(&[code.index_select(0, &b.bitwise_right_shift_tensor_scalar(4)), code.index_select(0, &b.bitwise_and(15))], 1);
        let vals = pair.index_select(0, &self.packed.view([-1]).to_kind(Kind::Int)).view([-1]);
        let vals = if vals.size()[0] != n { vals.narrow(0, 0, n) } else { vals };
        let out = if n % self.blocksize == 0 {
            (vals.view([-1, self.blocksize]) * absmax.unsqueeze(1)).view([n])
        } else {
            vals * absmax.repeat_interleave_self_int(self.blocksize, None, None).narrow(0, 0, n)
        };
        out.to_kind(kind).view(self.shape.as_slice())
    }

    /// Bytes held (codes, absmax, nested state).
    pub fn bytes(&self) -> usize {
        let t = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        t(&self.packed) + t(&self.absmax) + self.nested.as_ref().map(|n| t(&n.absmax) + t(&n.code) + 4).unwrap_or(0)
    }

    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> Quant4 {
        Quant4 {
            qtype: self.qtype,
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
            packed: self.packed.shallow_clone(),
            absmax: self.absmax.shallow_clone(),
            nested: self.nested.as_ref().map(|n| Nested { absmax: n.absmax.shallow_clone(), code: n.code.shallow_clone(), offset: n.offset }),
        }
    }

    pub fn to_device(&self, device: Device) -> Quant4 {
        Quant4 {
            qtype: self.qtype,
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
            packed: self.packed.to_device(device),
            absmax: self.absmax.to_device(device),
            nested: self.nested.as_ref().map(|n| Nested { absmax: n.absmax.to_device(device), code: n.code.to_device(device), offset: n.offset }),
        }
    }
}

/// Which linear layers `load_model(.., #{quantize})` stores in 4 bits, and how.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    pub qtype: QuantType,
    pub double_quant: bool,
    /// Modules kept dense: a name matches when it equals an entry or ends with `.entry`
    /// (e.g. `"o_proj"`, `"model.layers.0.mlp.down_proj"`). `lm_head` is always dense.
    pub skip: Vec<String>,
}

impl QuantConfig {
    /// Whether the linear layer `name` (e.g. `model.layers.3.self_attn.q_proj`) is quantized.
    pub fn applies(&self, name: &str) -> bool {
        name != "lm_head" && !self.skip.iter().any(|s| name == s || name.ends_with(&format!(".{s}")))
    }

    /// Quantizes a weight as it streams in (on its device; the dense copy is dropped by the caller).
    pub fn quantize(&self, w: &Tensor) -> Result<super::linear::Weight> {
        use super::linear::Weight;
        Ok(match self.qtype {
            QuantType::Int8 => Weight::Int8(Int8Rows::quantize(w)?),
            q => Weight::Quant4(Quant4::quantize(w, q, self.double_quant, Flavor::of(w.device()))?),
        })
    }
}

/// bitsandbytes' serialization of a `Linear4bit` weight (`QuantState.as_dict(packed=True)`),
/// as transformers writes and reads it, for module `name`:
///
/// | key | tensor |
/// |---|---|
/// | `name.weight` | uint8 `[(n+1)/2, 1]` packed codes |
/// | `name.weight.absmax` | fp32 `[blocks]` (uint8 with double quant) |
/// | `name.weight.quant_map` | fp32 `[16]` |
/// | `name.weight.nested_absmax`, `name.weight.nested_quant_map` | fp32 (double quant only) |
/// | `name.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | uint8 bytes of the JSON `{"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}` |
impl Quant4 {
    pub fn bnb_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        let p = format!("{name}.weight");
        let cpu = |t: &Tensor| t.to_device(Device::Cpu);
        let mut v = vec![
            (p.clone(), cpu(&self.packed)),
            (format!("{p}.absmax"), cpu(&self.absmax)),
            (format!("{p}.quant_map"), code4(self.qtype, Device::Cpu)),
        ];
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut json = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.qtype.name(),
            self.blocksize,
            dtype_name(self.dtype),
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            v.push((format!("{p}.nested_absmax"), cpu(&n.absmax)));
            v.push((format!("{p}.nested_quant_map"), cpu(&n.code)));
            json += &format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                serde_json::to_string(&(n.offset as f64)).unwrap()
            );
        }
        json.push('}');
        v.push((format!("{p}.quant_state.bitsandbytes__{}", self.qtype.name()), Tensor::from_slice(json.as_bytes())));
        v
    }

    /// Reads a weight saved by bitsandbytes / transformers (or [`Quant4::bnb_tensors`]);
    /// `None` when `name.weight` is not stored that way.
    pub fn from_bnb(get: &dyn Fn(&str) -> Result<Option<Tensor>>, name: &str, device: Device) -> Result<Option<Quant4>> {
        let p = format!("{name}.weight");
        let (qtype, state) = match (get(&format!("{p}.quant_state.bitsandbytes__nf4"))?, get(&format!("{p}.quant_state.bitsandbytes__fp4"))?) {
            (Some(s), _) => (QuantType::Nf4, s),
            (None, Some(s)) => (QuantType::Fp4, s),
            (None, None) => return Ok(None),
        };
        let bytes = Vec::<u8>::try_from(&state.to_kind(Kind::Uint8).view([-1]))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{p}: quant_state is not JSON: {e}"))?;
        let need = |k: &str| json.get(k).ok_or_else(|| anyhow::anyhow!("{p}: quant_state lacks `{k}`"));
        let blocksize = need("blocksize")?.as_i64().unwrap_or(0);
        if blocksize != BLOCKSIZE {
            bail!("{p}: blocksize {blocksize} is not supported (only {BLOCKSIZE})");
        }
        let shape: Vec<i64> = need("shape")?.as_array().map(|a| a.iter().filter_map(|d| d.as_i64()).collect()).unwrap_or_default();
        let dtype = match need("dtype")?.as_str().unwrap_or("") {
            "float32" => Kind::Float,
            "float16" => Kind::Half,
            "bfloat16" => Kind::BFloat16,
            other => bail!("{p}: unsupported dtype `{other}`"),
        };
        let tensor = |k: &str| -> Result<Tensor> {
            get(k)?.map(|t| t.to_device(device)).ok_or_else(|| anyhow::anyhow!("missing tensor `{k}`"))
        };
        let nested = match json.get("nested_offset") {
            None => None,
            Some(off) => {
                if json.get("nested_blocksize").and_then(|b| b.as_i64()) != Some(NESTED_BLOCKSIZE) {
                    bail!("{p}: nested_blocksize must be {NESTED_BLOCKSIZE}");
                }
                Some(Nested {
                    absmax: tensor(&format!("{p}.nested_absmax"))?.to_kind(Kind::Float),
                    code: tensor(&format!("{p}.nested_quant_map"))?.to_kind(Kind::Float),
                    offset: off.as_f64().unwrap_or(0.0) as f32,
                })
            }
        };
        let q = Quant4 { qtype, shape, dtype, blocksize, packed: tensor(&p)?.to_kind(Kind::Uint8), absmax: tensor(&format!("{p}.absmax"))?, nested };
        if q.packed.numel() as i64 != (q.numel() + 1) / 2 {
            bail!("{p}: {} packed bytes for shape {:?}", q.packed.numel(), q.shape);
        }
        Ok(Some(q))
    }
}

fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
}

/// 8-bit weights with one scale per output row, as bitsandbytes' `int8_vectorwise_quant`
/// (threshold 0) makes them for `Linear8bitLt`: `SCB = max |W[r, :]|` (fp32) and
/// `CB = round(W · (127 / SCB))` (int8, half to even); dequantized `CB · SCB · (1/127)` in fp32.
/// This is LLM.int8() **without** its outlier decomposition: every column is quantized, and the
/// matmul runs on the dequantized weight in the compute dtype.
pub struct Int8Rows {
    /// int8 `[out, in]`.
    pub q: Tensor,
    /// fp32 `[out]`: per-row absmax (bitsandbytes' `SCB`).
    pub scb: Tensor,
    /// The dtype of the weight that was quantized (dequantization returns it).
    pub dtype: Kind,
}

impl Int8Rows {
    pub fn quantize(w: &Tensor) -> Result<Int8Rows> {
        if w.dim() != 2 {
            bail!("int8 quantization needs a matrix, got shape {:?}", w.size());
        }
        let _g = tch::no_grad_guard();
        let w = w.detach();
        let scb = w.abs().amax([1i64].as_slice(), false).to_kind(Kind::Float);
        let scale = scb.reciprocal() * 127.0;
        let q = (&w * scale.unsqueeze(1)).round();
        // a row of zeros (SCB = 0) gives 0·∞ = NaN: code it 0
        let q = q.masked_fill(&q.isnan(), 0.0).to_kind(Kind::Int8);
        Ok(Int8Rows { q, scb, dtype: w.kind() })
    }

    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let _g = tch::no_grad_guard();
        (self.q.to_kind(Kind::Float) * self.scb.unsqueeze(1) * 7.874015718698502e-3).to_kind(kind)
    }

    pub fn bytes(&self) -> usize {
        self.q.numel() + self.scb.numel() * 4
    }

    pub fn shallow_clone(&self) -> Int8Rows {
        Int8Rows { q: self.q.shallow_clone(), scb: self.scb.shallow_clone(), dtype: self.dtype }
    }
}
