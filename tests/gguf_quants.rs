//! ftscript's block quantizers (src/gguf/quants.rs) against real ggml: the bytes of every type
//! equal those of llama.cpp's libggml-base (`ggml_quantize_chunk`, as llama-quantize calls it
//! without an importance matrix) and those of the gguf package where it implements the type, on
//! pseudo-random weights and hard cases; dequantized, they are close to the input.

mod common;
use common::*;
use ftscript::gguf::quants::{quantize, QuantType, QK_K};

/// The importer's dequantization (`ftscript::gguf::dequantize`) of whole blocks.
fn dequantize(ty: QuantType, bytes: &[u8]) -> Vec<f32> {
    ftscript::gguf::dequantize(ty.ggml_type(), bytes, bytes.len() / ty.type_size() * ty.block_size()).unwrap()
}
use std::path::Path;

const N_PER_ROW: usize = 4 * QK_K;

/// splitmix64: deterministic uniforms in [0, 1) and N(0, 1) samples.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn normals(&mut self, n: usize, sigma: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * sigma) as f32).collect()
    }
}

/// Super-blocks of QK_K values, each with a label: hard cases first, then random weights of
/// several kinds and scales; "typical" ones are N(0, σ²) with σ in [1e-3, 1].
fn test_data() -> Vec<(String, Vec<f32>)> {
    let mut r = Rng(0x5EED_0F_66_4D4C);
    let mut cases: Vec<(String, Vec<f32>)> = Vec::new();
    let mut add = |name: &str, v: Vec<f32>| {
        assert_eq!(v.len(), QK_K, "{name}");
        cases.push((name.to_string(), v));
    };
    add("zeros", vec![0.0; QK_K]);
    add("constant 0.37", vec![0.37; QK_K]);
    add("constant -1.25", vec![-1.25; QK_K]);
    add("normal σ=0.02", r.normals(QK_K, 0.02));
    add("normal σ=1", r.normals(QK_K, 1.0));
    let mut v = r.normals(QK_K, 0.02);
    v[5] = 50.0;
    v[100] = -1000.0;
    v[200] = 7.5;
    add("outliers", v);
    let mut v = r.normals(QK_K, 0.02);
    v[37] = 3.0;
    add("one outlier", v);
    add("tiny 1e-8", r.normals(QK_K, 1e-8));
    add("tiny 1e-14", r.normals(QK_K, 1e-14));
    add("tiny 1e-20", r.normals(QK_K, 1e-20));
    add("f32 subnormals", r.normals(QK_K, 1e-40));
    add("negative only", r.normals(QK_K, 0.05).iter().map(|v| -v.abs()).collect());
    add("positive only", r.normals(QK_K, 0.05).iter().map(|v| v.abs()).collect());
    add("offset 100 + small", r.normals(QK_K, 0.01).iter().map(|v| 100.0 + v).collect());
    // Q8_0 with d = 1: x/d at ±k.5, roundf's ties
    add("ties amax 127", (0..QK_K).map(|i| if i % 32 == 0 { if i % 64 == 0 { 127.0 } else { -127.0 } } else { ((i * 37) % 127) as f32 - 63.5 }).collect());
    // Q4_0 with d = 1 (max = −8): x/d + 8.5 at integers
    add("ties max -8", (0..QK_K).map(|i| if i % 32 == 0 { -8.0 } else { ((i * 7) % 16) as f32 - 7.5 }).collect());
    add("±0.5 and ±1", (0..QK_K).map(|i| [0.5, -0.5, 0.0, 1.0, -1.0, 0.25, -0.25][i % 7]).collect());
    add("small integers", (0..QK_K).map(|i| ((i * 5) % 9) as f32 - 4.0).collect());
    add("alternating ±0.3", (0..QK_K).map(|i| if i % 2 == 0 { 0.3 } else { -0.3 }).collect());
    add("uniform [-1, 1)", (0..QK_K).map(|_| (r.uniform() * 2.0 - 1.0) as f32).collect());
    let mut v = vec![0.0; QK_K];
    v[3] = 0.7;
    v[130] = -0.2;
    v[255] = 1e-3;
    add("sparse", v);
    let mut v = Vec::new();
    v.extend(vec![0.0; 32]);
    v.extend(r.normals(32, 0.02));
    v.extend(vec![0.11; 32]);
    v.extend(r.normals(32, 1e-8));
    v.extend(r.normals(32, 1e3));
    v.extend(r.normals(32, 0.05).iter().map(|v| -v.abs()));
    v.extend((0..32).map(|i| if i == 9 { 2.0 } else { 0.0 }));
    v.extend(r.normals(32, 0.02));
    add("mixed sub-blocks", v);
    let edges = [65504.0, 65519.0, 65520.0, 70000.0, -1e5, 6e-8, 3e-8, 2.98e-8, 1e-40, -0.0, 1e-45, 6.1035156e-5, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000), -f32::from_bits(0x3F80_8000), f32::MAX, f32::MIN_POSITIVE];
    add("f16/bf16 edges", (0..QK_K).map(|i| edges[i % edges.len()] * if i % 3 == 0 { -1.0 } else { 1.0 }).collect());
    add("large σ=1e4", r.normals(QK_K, 1e4));
    add("overflow σ=1e8", r.normals(QK_K, 1e8));
    // random weights with log-uniform scales, of ten kinds
    while cases.len() < 1024 {
        let k = cases.len();
        let s = 10f64.powf(-6.0 + 7.0 * r.uniform());
        let (kind, v): (&str, Vec<f32>) = match k % 10 {
            0 => ("typical", {
                let sigma = 10f64.powf(-3.0 + 3.0 * r.uniform());
                r.normals(QK_K, sigma)
            }),
            1 => ("normal", r.normals(QK_K, s)),
            2 => ("heavy-tailed", (0..QK_K).map(|_| (r.normal() * s / (r.uniform() + 0.02).sqrt()) as f32).collect()),
            3 => ("outliers ×1000", {
                let mut v = r.normals(QK_K, s);
                for _ in 0..4 {
                    let i = (r.uniform() * QK_K as f64) as usize;
                    v[i] *= 1000.0;
                }
                v
            }),
            4 => ("bf16-rounded", r.normals(QK_K, s).iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect()),
            5 => ("few levels", (0..QK_K).map(|_| ((r.normal() * 4.0).round() * s) as f32).collect()),
            6 => ("half-integers", (0..QK_K).map(|_| (((r.normal() * 8.0).round() + 0.5) * s) as f32).collect()),
            7 => ("sub-block scales", (0..QK_K).map(|i| (r.normal() * s * 10f64.powi(-((i / 32) as i32 % 5))) as f32).collect()),
            8 => ("one-signed", {
                let sign = if r.uniform() < 0.5 { -1.0 } else { 1.0 };
                r.normals(QK_K, s).iter().map(|v| sign * v.abs()).collect()
            }),
            _ => ("sparse", (0..QK_K).map(|_| if r.uniform() < 0.7 { 0.0 } else { (r.normal() * s) as f32 }).collect()),
        };
        cases.push((format!("{kind} s={s:.3e} #{k}"), v));
    }
    cases
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Panics with the first differing block (and its case) if `ours` ≠ `theirs`.
fn assert_same_blocks(ty: QuantType, what: &str, ours: &[u8], theirs: &[u8], cases: &[(String, Vec<f32>)], x: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{ty}: {what} has {} bytes, we have {}", theirs.len(), ours.len());
    let ts = ty.type_size();
    let bad: Vec<usize> = (0..ours.len() / ts).filter(|&b| ours[b * ts..(b + 1) * ts] != theirs[b * ts..(b + 1) * ts]).collect();
    if let Some(&b) = bad.first() {
        let e0 = b * ty.block_size();
        let elems = &x[e0..e0 + ty.block_size()];
        panic!(
            "{ty}: {} of {} blocks differ from {what}; first: block {b} (elements {e0}.., super-block {} \"{}\")\n  ours:   {:02x?}\n  {what}: {:02x?}\n  input: {:?}",
            bad.len(),
            ours.len() / ts,
            e0 / QK_K,
            cases[e0 / QK_K].0,
            &ours[b * ts..(b + 1) * ts],
            &theirs[b * ts..(b + 1) * ts],
            &elems[..elems.len().min(32)],
        );
    }
}

#[test]
fn quantizers_match_ggml_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases = test_data();
    let x: Vec<f32> = cases.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    assert_eq!(x.len() % N_PER_ROW, 0);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(d.join("x.f32"), bytes).unwrap();

    let names: Vec<&str> = QuantType::ALL.iter().map(|t| t.name()).collect();
    let mut args = vec![d.join("x.f32").to_str().unwrap().to_string(), d.to_str().unwrap().to_string()];
    args.extend(names.iter().map(|s| s.to_string()));
    args.extend(["--n-per-row".to_string(), N_PER_ROW.to_string()]);
    let out = py("ggml_quants_reference.py", &args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();

    let mut with_gguf_py = Vec::new();
    for ty in QuantType::ALL {
        let ours = quantize(ty, &x);
        // row by row is the same as the whole tensor
        let rows: Vec<u8> = x.chunks(N_PER_ROW).flat_map(|r| quantize(ty, r)).collect();
        assert_eq!(rows, ours, "{ty}: row-wise quantization differs");

        let ggml = std::fs::read(d.join(format!("{ty}.ggml"))).unwrap();
        assert_same_blocks(ty, "ggml", &ours, &ggml, &cases, &x);

        let py_path = d.join(format!("{ty}.gguf-py"));
        assert_eq!(py_path.exists(), summary[ty.name()]["gguf_py"].as_bool().unwrap());
        if py_path.exists() {
            assert_same_blocks(ty, "gguf-py", &ours, &std::fs::read(&py_path).unwrap(), &cases, &x);
            with_gguf_py.push(ty.name());
        }

        // dequantized: ours equals the gguf package's dequantization of ggml's bytes…
        let deq = read_f32(&d.join(format!("{ty}.deq.f32")));
        let our_deq = dequantize(ty, &ours);
        assert_eq!(deq.len(), x.len());
        if let Some(i) = (0..deq.len()).find(|&i| deq[i].to_bits() != our_deq[i].to_bits() && !(deq[i].is_nan() && our_deq[i].is_nan())) {
            panic!("{ty}: dequantized element {i} (\"{}\") is {} in gguf, {} in ours", cases[i / QK_K].0, deq[i], our_deq[i]);
        }
        // …and close to the input on typical weights
        let tol = match ty {
            QuantType::F32 => 0.0,
            QuantType::F16 => 1e-3,
            QuantType::BF16 => 5e-3,
            QuantType::Q8_0 => 0.01,
            QuantType::Q4_0 => 0.15,
            QuantType::Q5_0 => 0.08,
            QuantType::Q5_1 => 0.06,
            QuantType::Q4_K => 0.1,
            QuantType::Q5_K => 0.06,
            QuantType::Q6_K => 0.03,
        };
        let mut worst = (0f64, "");
        for (k, (name, v)) in cases.iter().enumerate() {
            if !(name.starts_with("typical") || name.starts_with("normal σ") || name.starts_with("uniform")) {
                continue;
            }
            let got = &deq[k * QK_K..(k + 1) * QK_K];
            let num: f64 = got.iter().zip(v).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = v.iter().map(|b| (*b as f64).powi(2)).sum();
            let e = (num / den).sqrt();
            if e > worst.0 {
                worst = (e, name);
            }
        }
        assert!(worst.0 <= tol, "{ty}: relative rms error {} on \"{}\" > {tol}", worst.0, worst.1);
        // every case whose scales stay in f16 range dequantizes to finite values within
        // (1 + slack)·(max|x| + 1e-4) (the K-quants' least-squares scales and 6-bit mins may overshoot)
        let slack = match ty {
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => 0.1,
            _ => 0.01,
        };
        let mut worst_range = (0f32, "");
        for (k, (name, v)) in cases.iter().enumerate() {
            if name.contains("overflow") || name.contains("edges") {
                continue;
            }
            let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
            let got = &deq[k * QK_K..(k + 1) * QK_K];
            assert!(got.iter().all(|g| g.is_finite()), "{ty}: \"{name}\" dequantizes to non-finite values");
            // 1e-4: f16 scales of tiny blocks are subnormal, with an absolute error up to 2^-25
            let ratio = got.iter().fold(0f32, |m, g| m.max(g.abs())) / (amax + 1e-4);
            if ratio > worst_range.0 {
                worst_range = (ratio, name);
            }
        }
        assert!(worst_range.0 <= 1.0 + slack, "{ty}: \"{}\" dequantizes up to {}·(max|x| + 1e-4)", worst_range.1, worst_range.0);
        eprintln!(
            "{ty}: {} blocks identical to ggml{}; worst relative rms error {:.2e}; max |deq|/(max|x| + 1e-4) {:.3} (\"{}\")",
            ours.len() / ty.type_size(),
            if py_path.exists() { " and gguf-py" } else { "" },
            worst.0,
            worst_range.0,
            worst_range.1
        );
    }
    for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1"] {
        assert!(with_gguf_py.contains(&t), "the gguf package no longer quantizes {t}");
    }
}
