//! ggml's block quantizers in pure Rust, bit-identical to ggml's reference C quantizers
//! (`quantize_row_*_ref` in ggml/src/ggml-quants.c, which `ggml_quantize_chunk` and so
//! `llama-quantize` use when no importance matrix is given).
//!
//! Block layouts (all little-endian; `f16` is IEEE half; `QK_K` = 256):
//! - F32:  1 × f32; x = v
//! - F16:  1 × f16; x ≈ v (IEEE round-to-nearest-even)
//! - BF16: 1 × bf16 (upper half of the f32); x ≈ v (round-to-nearest-even, NaN kept quiet)
//! - Q8_0: f16 d, 32 × i8 q; x ≈ d·q
//! - Q4_0: f16 d, 16 bytes of 4-bit q (element j in the low nibble of byte j, j+16 in the high one); x ≈ d·(q − 8)
//! - Q5_0: f16 d, u32 qh (bit j: fifth bit of element j), 16 bytes of low 4 bits as Q4_0; x ≈ d·(q − 16)
//! - Q5_1: f16 d, f16 m, u32 qh, 16 bytes of low 4 bits as Q5_0; x ≈ d·q + m
//! - Q4_K: f16 d, f16 dmin, 12 bytes of eight 6-bit (sc, m) pairs, 128 bytes of 4-bit q
//!   (64-element chunks: byte l holds element l in its low nibble and l+32 in its high one);
//!   x ≈ d·sc_s·q − dmin·m_s for the 32-element sub-block s
//! - Q5_K: f16 d, f16 dmin, 12 bytes of scales as Q4_K, 32 bytes qh (bit 2c / 2c+1 of qh[l]: fifth bit
//!   of element 64c+l / 64c+32+l), 128 bytes of low 4 bits as Q4_K; x ≈ d·sc_s·q − dmin·m_s, q in 0..32
//! - Q6_K: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 × i8 scales, f16 d;
//!   x ≈ d·sc_s·(q − 32) for the 16-element sub-block s, q in 0..64
//!
//! The 6-bit K-quant scales (`get_scale_min_k4`): for sub-block j < 4, sc = b[j] & 63 and
//! m = b[j+4] & 63; for j ≥ 4, sc = (b[j+4] & 15) | (b[j−4] >> 6) << 4 and
//! m = (b[j+4] >> 4) | (b[j] >> 6) << 4.
//!
//! Every float operation is done in the order and precision of the C code (f32 throughout, no
//! fused multiply-add, as ggml-base is built for baseline x86-64), and float→int conversions
//! follow x86's truncating conversion (out of range or NaN gives `i32::MIN`), so the bytes
//! match ggml's exactly.

/// The tensor types ftscript writes into GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

impl QuantType {
    /// Every type, in the order of the table in the module doc.
    pub const ALL: [QuantType; 10] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// ggml's `enum ggml_type` id (the GGUF tensor type).
    pub fn ggml_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::BF16 => 30,
        }
    }

    /// The type with ggml id `id`, if it is one of ours.
    pub fn from_ggml_type(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_type() == id)
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q5_1 => 32,
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// The type named `name` (case-insensitive), if it is one of ours.
    pub fn from_name(name: &str) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block size).
    pub fn row_size(self, n: usize) -> usize {
        assert!(n.is_multiple_of(self.block_size()), "{n} elements are not whole {} blocks of {}", self.name(), self.block_size());
        n / self.block_size() * self.type_size()
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes `x` (whole blocks; blocks are independent, so a tensor's rows may be concatenated)
/// into `ty`'s bytes, as ggml's `quantize_row_*_ref` (and `ggml_quantize_chunk` without an
/// importance matrix) does.
pub fn quantize(ty: QuantType, x: &[f32]) -> Vec<u8> {
    let bs = ty.block_size();
    assert!(x.len().is_multiple_of(bs), "{} values are not whole {} blocks of {bs}", x.len(), ty.name());
    let mut out = Vec::with_capacity(ty.row_size(x.len()));
    match ty {
        QuantType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        QuantType::F16 => x.iter().for_each(|&v| out.extend_from_slice(&f32_to_f16(v).to_le_bytes())),
        QuantType::BF16 => x.iter().for_each(|&v| out.extend_from_slice(&f32_to_bf16(v).to_le_bytes())),
        QuantType::Q8_0 => x.chunks_exact(32).for_each(|b| quantize_block_q8_0(b, &mut out)),
        QuantType::Q4_0 => x.chunks_exact(32).for_each(|b| quantize_block_q4_0(b, &mut out)),
        QuantType::Q5_0 => x.chunks_exact(32).for_each(|b| quantize_block_q5_0(b, &mut out)),
        QuantType::Q5_1 => x.chunks_exact(32).for_each(|b| quantize_block_q5_1(b, &mut out)),
        QuantType::Q4_K => x.chunks_exact(QK_K).for_each(|b| quantize_block_qk_x(b, 15, &mut out)),
        QuantType::Q5_K => x.chunks_exact(QK_K).for_each(|b| quantize_block_qk_x(b, 31, &mut out)),
        QuantType::Q6_K => x.chunks_exact(QK_K).for_each(|b| quantize_block_q6_k(b, &mut out)),
    }
    debug_assert_eq!(out.len(), ty.row_size(x.len()));
    out
}

// ---------------------------------------------------------------------------------------------
// scalar conversions

/// f32 → IEEE half, round to nearest even (ggml's `ggml_compute_fp32_to_fp16`, the FP16
/// library's trick: scaling by 2^112·2^−110 rounds the mantissa in the f32 adder; NaN → 0x7E00
/// with the sign kept).
pub fn f32_to_f16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x7C00;
    let mantissa_bits = bits & 0x0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// IEEE half → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = if exp == 0x1F {
        sign | 0x7F80_0000 | (man << 13)
    } else if exp != 0 {
        sign | ((exp + 112) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // subnormal: man · 2^−24, exact in f32
        let v = man as f32 * f32::from_bits(0x3380_0000);
        return if sign != 0 { -v } else { v };
    };
    f32::from_bits(bits)
}

/// f32 → bfloat16 as ggml's `ggml_compute_fp32_to_bf16`: NaN → its upper half with the quiet
/// bit set; otherwise round to nearest even on the upper 16 bits (subnormals kept).
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// bfloat16 → f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}


fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f32_to_f16(v).to_le_bytes());
}

/// ggml's `nearest_int`: adding 1.5·2^23 puts round-to-nearest-even(v) in the low mantissa bits
/// (valid for |v| ≤ 2^22 − 1; other inputs give what the bits give, as in C).
fn nearest_int(v: f32) -> i32 {
    let val = v + 12582912.0;
    let i = val.to_bits() as i32;
    (i & 0x007F_FFFF) - 0x0040_0000
}

/// C's float → int conversion as x86 does it (`cvttss2si`): truncation toward zero, and
/// `i32::MIN` for NaN or a value out of range.
fn cvtt(v: f32) -> i32 {
    if !(-2147483648.0..2147483648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element blocks

/// Q8_0: d = amax/127, q = round_half_away(x/d) (x·(1/d) in f32).
fn quantize_block_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a }; // C's MAX(amax, fabsf(v))
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(x.iter().map(|&v| cvtt((v * id).round()) as u8));
}

/// Q4_0: d = m/−8 where m is the value of largest magnitude (first one on ties),
/// q = min(15, trunc(x/d + 8.5)) (x·(1/d) in f32).
fn quantize_block_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let q = |v: f32| -> u8 { ((cvtt(v * id + 8.5) as i8).min(15)) as u8 };
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

/// Q5_0: as Q4_0 with 5 bits: d = m/−16, q = min(31, trunc(x/d + 16.5)).
fn quantize_block_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let q: Vec<u8> = x.iter().map(|&v| (cvtt(v * id + 16.5) as i8).min(31) as u8).collect();
    push_q5(&q, out);
}

/// Q5_1: d = (max − min)/31, m = min, q = trunc((x − min)/d + 0.5) ((x − min)·(1/d) in f32).
fn quantize_block_q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let q: Vec<u8> = x.iter().map(|&v| cvtt((v - min) * id + 0.5) as u8).collect();
    push_q5(&q, out);
}

/// The u32 of fifth bits and the 16 bytes of low nibbles of Q5_0/Q5_1.
fn push_q5(q: &[u8], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= (((q[j] & 0x10) >> 4) as u32) << j;
        qh |= (((q[j + 16] & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
}

// ---------------------------------------------------------------------------------------------
// K-quants

/// ggml's `make_qkx2_quants`: fits x ≈ scale·L − the_min with L in 0..=nmax, weights w, by
/// least squares over the grid of inverse scales (rmin + rdelta·is + nmax)/(max − min),
/// is = 0..=nstep, keeping the best weighted error (|e| with `use_mad`, else e²). min ≤ 0.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l_out: &mut [u8], the_min: &mut f32, laux: &mut [u8], rmin: f32, rdelta: f32, nstep: i32, use_mad: bool) -> f32 {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        *the_min = -min;
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, nmax) as u8;
        let mut diff = scale * l_out[i] as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        *the_min = -min;
        return scale;
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let mut diff = this_scale * laux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    scale
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights: fits x ≈ scale·(L − nmax)
/// with L − nmax in −nmax..nmax, weights x², trying inverse scales −(nmax + 0.1·is)/max for
/// is = −9..=9 (max: the value of largest magnitude) and keeping the least-squares scale with
/// the largest (Σwxl)²/Σwl².
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let lf = nearest_int(iscale * xi).clamp(-nmax, nmax - 1) as f32;
            let w = xi * xi;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]);
                l_out[i] = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The (sc, m) 6-bit pair of sub-block j from the 12 packed scale bytes of Q4_K/Q5_K.
pub(crate) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K (nmax 15) and Q5_K (nmax 31): each 32-element sub-block j is fitted by
/// `make_qkx2_quants` with weights rms(x_j) + |x| (Q4_K: rmin −1, rdelta 0.1, 20 steps; Q5_K:
/// −0.5, 0.1, 15); the scales and mins are quantized to 6 bits against d = max_scale/63 and
/// dmin = max_min/63, and x is requantized as q = round((x + dmin·m)/(d·sc)).
fn quantize_block_qk_x(x: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let (rmin, rdelta, nstep) = if nmax == 15 { (-1.0f32, 0.1f32, 20) } else { (-0.5f32, 0.1f32, 15) };
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        scales[j] = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], &mut mins[j], &mut laux, rmin, rdelta, nstep, false);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc_bytes = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc_bytes[j] = ls;
            sc_bytes[j + 4] = lm;
        } else {
            sc_bytes[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc_bytes[j - 4] |= (ls >> 4) << 6;
            sc_bytes[j] |= (lm >> 4) << 6;
        }
    }
    let d16 = f32_to_f16(max_scale / 63.0);
    let dmin16 = f32_to_f16(max_min / 63.0);
    let (df, dminf) = (f16_to_f32(d16), f16_to_f32(dmin16));
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &sc_bytes);
        let d = df * sc as f32;
        if d == 0.0 {
            continue; // keeps make_qkx2_quants' L, as C does
        }
        let dm = dminf * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    out.extend_from_slice(&d16.to_le_bytes());
    out.extend_from_slice(&dmin16.to_le_bytes());
    out.extend_from_slice(&sc_bytes);
    if nmax == 15 {
        for c in l.chunks_exact(64) {
            out.extend((0..32).map(|i| c[i] | (c[i + 32] << 4)));
        }
    } else {
        let mut qh = [0u8; 32];
        let mut ql = [0u8; 128];
        let (mut m1, mut m2) = (1u8, 2u8);
        for (k, c) in l.chunks_exact(64).enumerate() {
            for j in 0..32 {
                let (mut l1, mut l2) = (c[j], c[j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * k + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        out.extend_from_slice(&qh);
        out.extend_from_slice(&ql);
    }
}

/// Q6_K: each 16-element sub-block is fitted by `make_qx_quants` (nmax 32); the scales are
/// quantized to i8 against d = max_scale/−128 (max_scale: largest magnitude) and x is
/// requantized as q = round(x/(d·sc)) + 32 in 0..64. A block whose scales are all below 1e−15
/// is all zeros.
fn quantize_block_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = f32_to_f16(1.0 / iscale);
    let df = f16_to_f32(d16);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let d = df * sc[j] as f32;
        if d == 0.0 {
            continue; // keeps make_qx_quants' L, as C does
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (k, c) in l.chunks_exact(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * k..64 * k + 64], &mut qh[32 * k..32 * k + 32]);
        for i in 0..32 {
            let (a, b, e, f) = (c[i] as u8, c[i + 32] as u8, c[i + 64] as u8, c[i + 96] as u8);
            ql[i] = (a & 0xF) | ((e & 0xF) << 4);
            ql[i + 32] = (b & 0xF) | ((f & 0xF) << 4);
            qh[i] = ((c[i] >> 4) as u8) | (((c[i + 32] >> 4) as u8) << 2) | (((c[i + 64] >> 4) as u8) << 4) | (((c[i + 96] >> 4) as u8) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d16.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(t: QuantType, bytes: &[u8]) -> Vec<f32> {
        crate::gguf::dequantize(t.ggml_type(), bytes, bytes.len() / t.type_size() * t.block_size()).unwrap()
    }

    /// Deterministic N(0, 1) samples (splitmix64 + Box–Muller).
    fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n).map(|_| ((-2.0 * (1.0 - next()).ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32).collect()
    }

    fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn sizes_and_ids() {
        let sizes: Vec<(usize, usize)> = QuantType::ALL.iter().map(|t| (t.block_size(), t.type_size())).collect();
        assert_eq!(sizes, [(1, 4), (1, 2), (1, 2), (32, 34), (32, 18), (32, 22), (32, 24), (256, 144), (256, 176), (256, 210)]);
        for t in QuantType::ALL {
            assert_eq!(QuantType::from_ggml_type(t.ggml_type()), Some(t));
            assert_eq!(QuantType::from_name(&t.name().to_lowercase()), Some(t));
            let x = normals(512, 7);
            assert_eq!(quantize(t, &x).len(), t.row_size(512));
            assert_eq!(deq(t, &quantize(t, &x)).len(), 512);
        }
    }

    #[test]
    fn zeros_quantize_to_zeros() {
        let x = vec![0f32; 512];
        for t in QuantType::ALL {
            assert!(quantize(t, &x).iter().all(|&b| b == 0 || matches!(t, QuantType::Q4_0 | QuantType::Q5_0)), "{t}");
            assert!(deq(t, &quantize(t, &x)).iter().all(|&v| v == 0.0), "{t}");
        }
        // Q4_0 stores zero as 8 in each nibble, with d = 0/−8 = −0
        assert!(quantize(QuantType::Q4_0, &x).chunks(18).all(|b| b[..2] == [0, 0x80] && b[2..].iter().all(|&q| q == 0x88)));
        // Q5_0 stores it as 16: fifth bits set, low nibbles 0
        assert!(quantize(QuantType::Q5_0, &x).chunks(22).all(|b| b[..2] == [0, 0x80] && b[2..6] == [0xFF; 4] && b[6..].iter().all(|&q| q == 0)));
    }

    #[test]
    fn dequantized_error_is_small() {
        let x: Vec<f32> = normals(QK_K * 16, 3).iter().map(|v| v * 0.02).collect();
        for (t, tol) in [
            (QuantType::F32, 0.0),
            (QuantType::F16, 1e-3),
            (QuantType::BF16, 5e-3),
            (QuantType::Q8_0, 0.01),
            (QuantType::Q4_0, 0.12),
            (QuantType::Q5_0, 0.06),
            (QuantType::Q5_1, 0.05),
            (QuantType::Q4_K, 0.1),
            (QuantType::Q5_K, 0.06),
            (QuantType::Q6_K, 0.03),
        ] {
            let e = rel_rms(&deq(t, &quantize(t, &x)), &x);
            assert!(e <= tol, "{t}: relative rms error {e} > {tol}");
        }
    }

    #[test]
    fn scalar_conversions() {
        for (v, h) in [(0.0f32, 0u16), (-0.0, 0x8000), (1.0, 0x3C00), (65504.0, 0x7BFF), (65520.0, 0x7C00), (f32::INFINITY, 0x7C00), (5.960_464_5e-8, 1), (2.9e-8, 0), (1.0 + 1.0 / 2048.0, 0x3C00), (1.0 + 3.0 / 2048.0, 0x3C02)] {
            assert_eq!(f32_to_f16(v), h, "{v}");
        }
        assert_eq!(f32_to_f16(f32::NAN) & 0x7E00, 0x7E00);
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if !f.is_nan() {
                assert_eq!(f32_to_f16(f), h, "{h:#x}");
            }
        }
        assert_eq!(f16_to_f32(1), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x8001), -5.960_464_5e-8);
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80); // tie → even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
    }
}
