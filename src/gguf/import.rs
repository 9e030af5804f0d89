//! GGUF import: a reader for llama.cpp's GGUF container and a translator from a GGUF
//! llama.cpp checkpoint (llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3) to a Hugging Face model directory (config.json, F32
//! model.safetensors, tokenizer.json, ...).
//!
//! File layout (GGUF v2/v3, little endian):
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x       { key: string, type: u32, value }
//! n_tensors x  { name: string, n_dims: u32, ne: u64 x n_dims, ggml_type: u32, offset: u64 }
//! padding to `general.alignment` (default 32), then the tensor data; each tensor's
//! offset is relative to the start of that data section.
//! string = u64 length + UTF-8 bytes; array = elem type u32 + count u64 + elements.
//! ```
//! `ne[0]` is the fastest-varying dimension, so the PyTorch shape is `ne` reversed and
//! the bytes are already in row-major order for that shape.
//!
//! This module does not depend on tch; it produces plain `Vec<f32>` data.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One GGUF metadata value. Type ids: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32,
/// 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Array of values of one element type (nested arrays are allowed by the format).
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Integer value (any integer type or bool), if it fits in i64 / is non-negative u64.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            GgufValue::U8(v) => v as i64,
            GgufValue::I8(v) => v as i64,
            GgufValue::U16(v) => v as i64,
            GgufValue::I16(v) => v as i64,
            GgufValue::U32(v) => v as i64,
            GgufValue::I32(v) => v as i64,
            GgufValue::U64(v) => i64::try_from(v).ok()?,
            GgufValue::I64(v) => v,
            GgufValue::Bool(v) => v as i64,
            _ => return None,
        })
    }
    /// Non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }
    /// Numeric value as f64 (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The value as JSON (arrays become JSON arrays; non-finite floats become null).
    pub fn to_json(&self) -> Value {
        match self {
            GgufValue::F32(v) => json!(*v as f64),
            GgufValue::F64(v) => json!(v),
            GgufValue::Bool(v) => json!(v),
            GgufValue::String(s) => json!(s),
            GgufValue::Array(a) => Value::Array(a.iter().map(|v| v.to_json()).collect()),
            GgufValue::U64(v) => json!(v),
            other => json!(other.as_i64()),
        }
    }
}

/// Where one tensor lives in the file and how it is encoded.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (`ne[0]` fastest).
    pub ne: Vec<u64>,
    /// ggml type id (see [`ggml_type_info`]).
    pub ggml_type: u32,
    /// Byte offset relative to the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Shape in PyTorch order (reversed `ne`).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// An opened (memory-mapped) GGUF file.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
    mmap: memmap2::Mmap,
}

/// ggml tensor type: (name, elements per block, bytes per block).
pub fn ggml_type_info(t: u32) -> Option<(&'static str, usize, usize)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 40),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        if n > left {
            bail!(
                "{}: truncated GGUF file: need {} bytes for {} at offset {}, but the file has {} bytes",
                self.path.display(),
                n,
                what,
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().unwrap())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            bail!(
                "{}: truncated or corrupt GGUF file: {} claims {} bytes at offset {}, only {} left",
                self.path.display(),
                what,
                len,
                self.pos,
                self.remaining()
            );
        }
        let bytes = self.take(len as usize, what)?;
        // Vocabularies may contain invalid UTF-8 pieces; keep them lossily rather than failing.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(what)?[0]),
            1 => GgufValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => GgufValue::Bool(self.arr::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth > 8 {
                    bail!("{}: GGUF array nesting too deep in {}", self.path.display(), what);
                }
                let ety = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size: u64 = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10 | 11 | 12 | 8 => 8,
                    9 => 12,
                    other => bail!(
                        "{}: unknown GGUF metadata element type {} in array {}",
                        self.path.display(),
                        other,
                        what
                    ),
                };
                if count.saturating_mul(min_size) > self.remaining() as u64 {
                    bail!(
                        "{}: truncated or corrupt GGUF file: array {} claims {} elements at offset {}",
                        self.path.display(),
                        what,
                        count,
                        self.pos
                    );
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(what)?)),
            other => bail!("{}: unknown GGUF metadata type {} for {}", self.path.display(), other, what),
        })
    }
}

impl GgufFile {
    /// Maps and parses a GGUF v2/v3 little-endian file; validates that every tensor's data
    /// lies inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; like every mmap user we assume the file is not truncated
        // underneath us while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping GGUF file {}", path.display()))?;
        let mut r = Reader { buf: &mmap, pos: 0, path };
        let magic = r.take(4, "magic").map_err(|_| {
            anyhow!("{}: not a GGUF file (only {} bytes long)", path.display(), mmap.len())
        })?;
        if magic != GGUF_MAGIC {
            bail!(
                "{}: not a GGUF file: bad magic {:02x?} (expected \"GGUF\")",
                path.display(),
                magic
            );
        }
        let version = r.u32("version")?;
        if version == 1 {
            bail!("{}: GGUF version 1 is not supported (only v2 and v3)", path.display());
        }
        if version != 2 && version != 3 {
            if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                bail!("{}: big-endian GGUF files are not supported", path.display());
            }
            bail!("{}: unsupported GGUF version {} (only v2 and v3)", path.display(), version);
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        if n_kv > r.remaining() as u64 / 12 || n_tensors > r.remaining() as u64 / 24 {
            bail!(
                "{}: truncated or corrupt GGUF header: {} metadata entries / {} tensors cannot fit in the file",
                path.display(),
                n_kv,
                n_tensors
            );
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of metadata {key}"))?;
            let v = r.value(ty, &format!("metadata {key}"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("dims of tensor {name}"))?;
            if n_dims > 8 {
                bail!("{}: tensor {} has {} dimensions (corrupt file?)", path.display(), name, n_dims);
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64(&format!("shape of tensor {name}"))?);
            }
            let ggml_type = r.u32(&format!("type of tensor {name}"))?;
            let offset = r.u64(&format!("offset of tensor {name}"))?;
            if index.insert(name.clone(), tensors.len()).is_some() {
                bail!("{}: duplicate tensor name {}", path.display(), name);
            }
            tensors.push(GgufTensorInfo { name, ne, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| anyhow!("{}: invalid general.alignment {:?}", path.display(), v))?,
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        for t in &tensors {
            let (tname, bs, ts) = ggml_type_info(t.ggml_type).ok_or_else(|| {
                anyhow!("{}: tensor {} has unknown ggml type {}", path.display(), t.name, t.ggml_type)
            })?;
            let n = t
                .ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| anyhow!("{}: tensor {} shape overflows", path.display(), t.name))?;
            if t.ne.first().is_some_and(|&d| d % bs as u64 != 0) {
                bail!(
                    "{}: tensor {} ({}): row length {} is not a multiple of the block size {}",
                    path.display(),
                    t.name,
                    tname,
                    t.ne[0],
                    bs
                );
            }
            let nbytes = n / bs as u64 * ts as u64;
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(nbytes));
            if end.is_none_or(|e| e > file_len) {
                bail!(
                    "{}: truncated GGUF file: tensor {} needs bytes up to {} but the file has {}",
                    path.display(),
                    t.name,
                    data_start.saturating_add(t.offset).saturating_add(nbytes),
                    file_len
                );
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, index, data_start: data_start as usize, mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }
    /// Tensor names in file order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    /// Raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {}", self.path.display(), name))?;
        let (_, bs, ts) = ggml_type_info(t.ggml_type).unwrap();
        let start = self.data_start + t.offset as usize;
        let len = t.n_elements() as usize / bs * ts;
        Ok(&self.mmap[start..start + len])
    }
    /// Dequantized values in row-major order, with the shape in PyTorch order (GGUF stores dims
    /// reversed: ne[0] is the fastest dim).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {}", self.path.display(), name))?;
        let bytes = self.tensor_bytes(name)?;
        let data = dequantize(t.ggml_type, bytes, t.n_elements() as usize)
            .with_context(|| format!("{}: tensor {}", self.path.display(), name))?;
        Ok((t.shape(), data))
    }
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(|v| v.as_u64())
    }
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(|v| v.as_f64())
    }
    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        self.metadata.get(key).and_then(|v| v.as_bool())
    }
}

// ---------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}
#[inline]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Dequantizes `n` elements of ggml type `ty` from `data`.
///
/// Supported: F32, F16, BF16, F64, I8/I16/I32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K,
/// Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL. Anything else is an error naming the type.
pub fn dequantize(ty: u32, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let (name, bs, ts) = ggml_type_info(ty).ok_or_else(|| anyhow!("unknown ggml type {ty}"))?;
    if !n.is_multiple_of(bs) {
        bail!("{name}: element count {n} is not a multiple of the block size {bs}");
    }
    let need = n / bs * ts;
    if data.len() < need {
        bail!("{name}: need {need} bytes for {n} elements, got {}", data.len());
    }
    let data = &data[..need];
    let mut out = Vec::with_capacity(n);
    let blocks = data.chunks_exact(ts);
    match ty {
        0 => out.extend(blocks.map(|b| f32_at(b, 0))),
        1 => out.extend(blocks.map(|b| f16_at(b, 0))),
        30 => out.extend(blocks.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        28 => out.extend(blocks.map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)),
        24 => out.extend(blocks.map(|b| b[0] as i8 as f32)),
        25 => out.extend(blocks.map(|b| i16::from_le_bytes([b[0], b[1]]) as f32)),
        26 => out.extend(blocks.map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)),
        2 => blocks.for_each(|b| deq_q4_0(b, &mut out)),
        3 => blocks.for_each(|b| deq_q4_1(b, &mut out)),
        6 => blocks.for_each(|b| deq_q5_0(b, &mut out)),
        7 => blocks.for_each(|b| deq_q5_1(b, &mut out)),
        8 => blocks.for_each(|b| deq_q8_0(b, &mut out)),
        9 => blocks.for_each(|b| deq_q8_1(b, &mut out)),
        10 => blocks.for_each(|b| deq_q2_k(b, &mut out)),
        11 => blocks.for_each(|b| deq_q3_k(b, &mut out)),
        12 => blocks.for_each(|b| deq_q4_k(b, &mut out)),
        13 => blocks.for_each(|b| deq_q5_k(b, &mut out)),
        14 => blocks.for_each(|b| deq_q6_k(b, &mut out)),
        15 => blocks.for_each(|b| deq_q8_k(b, &mut out)),
        20 => blocks.for_each(|b| deq_iq4_nl(b, &mut out)),
        _ => bail!("unsupported ggml tensor type {name} (id {ty}) for dequantization"),
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

/// Q4_0, 32 values in 18 bytes: `d: f16, qs: [u8; 16]`; value j (j<16) is
/// `((qs[j] & 15) - 8) * d`, value j+16 is `((qs[j] >> 4) - 8) * d`.
fn deq_q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// Q4_1, 32 values in 20 bytes: `d: f16, m: f16, qs: [u8; 16]`; value = `q * d + m` with the
/// low nibbles giving values 0..16 and the high nibbles values 16..32.
fn deq_q4_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 15) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// Q5_0, 32 values in 22 bytes: `d: f16, qh: u32 (LE), qs: [u8; 16]`; the 5th bit of value j
/// is bit j of qh; value = `(q - 16) * d`.
fn deq_q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..16).map(|j| {
        let q = (qs[j] & 15) as u32 | (((qh >> j) & 1) << 4);
        (q as i32 - 16) as f32 * d
    }));
    out.extend((0..16).map(|j| {
        let q = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        (q as i32 - 16) as f32 * d
    }));
}

/// Q5_1, 32 values in 24 bytes: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; value = `q * d + m`.
fn deq_q5_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..16).map(|j| ((qs[j] & 15) as u32 | (((qh >> j) & 1) << 4)) as f32 * d + m));
    out.extend((0..16).map(|j| ((qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as f32 * d + m));
}

/// Q8_0, 32 values in 34 bytes: `d: f16, qs: [i8; 32]`; value = `q * d`.
fn deq_q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// Q8_1, 32 values in 40 bytes (the GGUF file layout): `d: f32, s: f32, qs: [i8; 32]`;
/// value = `q * d` (s is a precomputed sum, unused here).
fn deq_q8_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f32_at(b, 0);
    out.extend(b[8..40].iter().map(|&q| q as i8 as f32 * d));
}

/// K-quant 6-bit scale/min pair `j` (0..8) packed in 12 bytes: the first four pairs use the
/// low 6 bits of bytes j and j+4; the last four combine a nibble of byte j+4 with the top two
/// bits of bytes j-4 (scale) and j (min).
#[inline]
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = super::quants::get_scale_min_k4(j, s);
    (sc as f32, m as f32)
}

/// Q2_K, 256 values in 84 bytes: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`; 16
/// sub-blocks of 16, each with a 4-bit scale (low nibble) and 4-bit min (high nibble);
/// value = `d * sc * q - dmin * m`, q being 2-bit fields taken at shifts 0,2,4,6 of 32-byte runs.
fn deq_q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 15) as f32;
                let ml = dmin * (sc >> 4) as f32;
                out.extend(q[part * 16..part * 16 + 16].iter().map(|&x| dl * ((x >> shift) & 3) as f32 - ml));
            }
        }
    }
}

/// Q3_K, 256 values in 110 bytes: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`;
/// 16 signed 6-bit scales (stored +32, low 4 bits from nibbles of bytes 0..8, high 2 bits
/// from bytes 8..12); value = `d * (sc - 32) * (q2 - (hbit ? 0 : 4))`.
fn deq_q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let s = &b[96..108];
    let d = f16_at(b, 108);
    let mut scales = [0i32; 16];
    for (i, sc) in scales.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 15 } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *sc = (low | (high << 4)) as i32 - 32;
    }
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in part * 16..part * 16 + 16 {
                    let v = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                    out.push(dl * v as f32);
                }
            }
            m <<= 1;
        }
    }
}

/// Q4_K, 256 values in 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`;
/// 8 sub-blocks of 32 with 6-bit scale/min ([`scale_min_k4`]); each 32-byte run of qs holds
/// two sub-blocks (low nibbles first); value = `d * sc * q - dmin * m`.
fn deq_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let q = &qs[j * 32..j * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * j, s);
        let (sc2, m2) = scale_min_k4(2 * j + 1, s);
        let (d1, m1) = (d * sc1, dmin * m1);
        let (d2, m2) = (d * sc2, dmin * m2);
        out.extend(q.iter().map(|&x| d1 * (x & 15) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
    }
}

/// Q5_K, 256 values in 176 bytes: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32],
/// qs: [u8; 128]`; like Q4_K plus a 5th bit: bit (2j) / (2j+1) of qh[l] for sub-blocks 2j / 2j+1.
fn deq_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let q = &qs[j * 32..j * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * j, s);
        let (sc2, m2) = scale_min_k4(2 * j + 1, s);
        let (d1, m1) = (d * sc1, dmin * m1);
        let (d2, m2) = (d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * j), 1u8 << (2 * j + 1));
        out.extend((0..32).map(|l| d1 * ((q[l] & 15) + if qh[l] & u1 != 0 { 16 } else { 0 }) as f32 - m1));
        out.extend((0..32).map(|l| d2 * ((q[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 }) as f32 - m2));
    }
}

/// Q6_K, 256 values in 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`;
/// per 128-value half: value l+32k takes a nibble of ql (low for k=0,1, high for k=2,3) and
/// 2 bits of qh[l] at shift 2k; value = `d * scale[l/16 + 2k] * (q - 32)`.
fn deq_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
        out.extend_from_slice(&y);
    }
}

/// Q8_K, 256 values in 292 bytes: `d: f32, qs: [i8; 256], bsums: [i16; 16]`; value = `q * d`.
fn deq_q8_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f32_at(b, 0);
    out.extend(b[4..260].iter().map(|&q| q as i8 as f32 * d));
}

/// IQ4_NL, 32 values in 18 bytes: `d: f16, qs: [u8; 16]`, nibbles (low = first 16) index a
/// fixed non-linear 16-entry codebook; value = `d * codebook[nibble]`.
fn deq_iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    const K: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| d * K[(q & 15) as usize] as f32));
    out.extend(qs.iter().map(|&q| d * K[(q >> 4) as usize] as f32));
}

// ---------------------------------------------------------------------------------------
// Hugging Face import
// ---------------------------------------------------------------------------------------

/// A GGUF model translated to Hugging Face form.
pub struct HfImport {
    /// config.json for LlamaForCausalLM.
    pub config: Value,
    /// (HF name, PyTorch shape, row-major F32 data).
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// tokenizer.json (tokenizers library format).
    pub tokenizer_json: String,
    pub tokenizer_config: Value,
    pub generation_config: Value,
}

/// The GGUF architectures imported, each as the transformers family llama.cpp converts from.
const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3"];

/// Moves q/k projection rows between transformers' rotary order (per head, the two halves of
/// the rotary pairs contiguous: row `i·d + j`) and llama.cpp's (pairs interleaved: row `2j + i`),
/// `d = head_dim / 2`; `to_llama_cpp` picks the direction. `data` is row-major with
/// `rows = shape[0]`.
pub fn permute_rotary_rows(data: &[f32], rows: usize, n_head: usize, to_llama_cpp: bool) -> Result<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || !data.len().is_multiple_of(rows.max(1)) {
        bail!("cannot permute a tensor with {rows} rows over {n_head} heads");
    }
    let cols = data.len() / rows;
    let d = rows / n_head / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d {
                let (hf, llama_cpp) = (h * 2 * d + i * d + j, h * 2 * d + 2 * j + i);
                let (dst, src) = if to_llama_cpp { (llama_cpp, hf) } else { (hf, llama_cpp) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The transformers name of GGUF tensor `gguf` in architecture `arch` (llama.cpp's names; Gemma's
/// sandwich norms, Phi-3's fused projections).
fn hf_tensor_name(gguf: &str, arch: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let gemma = arch.starts_with("gemma");
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_gate_inp" => "mlp.gate",
        "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Reads a GGUF model (of [`SUPPORTED_ARCHS`]) and translates config, weights (dequantized to
/// F32; Llama's q/k un-permuted, Gemma's `1 + w` norms back to `w`) and tokenizer to Hugging
/// Face form, as llama.cpp computes the file: Gemma's queries scaled by `1/√head_dim`
/// (`1/√(hidden/heads)` for Gemma 2 27B's 46 layers), Gemma 3's every sixth layer global,
/// Phi-3's LongRoPE factors from its `rope_factors_*` tensors.
pub fn import(path: &Path) -> Result<HfImport> {
    let g = GgufFile::open(path)?;
    let arch = g
        .meta_str("general.architecture")
        .ok_or_else(|| anyhow!("{}: no general.architecture in GGUF metadata", path.display()))?
        .to_string();
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        bail!(
            "{}: unsupported GGUF architecture {:?}; supported: {}",
            path.display(),
            arch,
            SUPPORTED_ARCHS.join(", ")
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need_u64 = |k: &str| -> Result<u64> {
        g.meta_u64(&key(k)).ok_or_else(|| anyhow!("{}: GGUF metadata {} missing", path.display(), key(k)))
    };
    let hidden = need_u64("embedding_length")? as usize;
    let n_layers = need_u64("block_count")? as usize;
    let n_head = need_u64("attention.head_count")? as usize;
    let n_kv = g.meta_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(n_head);
    let ff = need_u64("feed_forward_length")? as usize;
    let ctx = g.meta_u64(&key("context_length")).unwrap_or(2048);
    let eps = g.meta_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let theta = g.meta_f64(&key("rope.freq_base")).unwrap_or(10000.0);
    if n_head == 0 || n_kv == 0 {
        bail!("{}: head counts must be positive", path.display());
    }

    let embd = g
        .tensor_info("token_embd.weight")
        .ok_or_else(|| anyhow!("{}: no token_embd.weight tensor", path.display()))?;
    let vocab_size = embd.shape().first().copied().unwrap_or(0);
    let head_dim = match g.tensor_info("blk.0.attn_q.weight") {
        Some(q) => q.shape()[0] / n_head,
        None => g.meta_u64(&key("attention.key_length")).map(|v| v as usize).unwrap_or(hidden / n_head),
    };
    let head_dim = match g.tensor_info("blk.0.attn_qkv.weight") {
        Some(_) => g.meta_u64(&key("attention.key_length")).map(|v| v as usize).unwrap_or(hidden / n_head),
        None => head_dim,
    };
    let tied = g.tensor_info("output.weight").is_none();
    let attention_bias = g.tensor_info("blk.0.attn_q.bias").is_some();
    let gemma = arch.starts_with("gemma");

    // Tensors.
    let mut tensors = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        if ["rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"].contains(&t.name.as_str()) {
            continue; // RoPE frequency factors: read into the config, not HF weights
        }
        if let Some((layer, proj)) = expert_stack(&t.name) {
            // llama.cpp's stack of every expert's projection, `[E, out, in]`: one tensor an expert
            let (shape, data) = g.tensor_f32(&t.name)?;
            let per_expert = shape[1] * shape[2];
            for (e, chunk) in data.chunks(per_expert).enumerate() {
                tensors.push((format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight"), shape[1..].to_vec(), chunk.to_vec()));
            }
            continue;
        }
        let hf = hf_tensor_name(&t.name, &arch).ok_or_else(|| {
            anyhow!("{}: tensor {} has no Hugging Face {arch} equivalent", path.display(), t.name)
        })?;
        let (shape, mut data) = g.tensor_f32(&t.name)?;
        if gemma && t.name.ends_with("norm.weight") {
            data.iter_mut().for_each(|w| *w -= 1.0); // llama.cpp's Gemma norms hold 1 + w
        }
        let permute_heads = if arch != "llama" {
            None
        } else if t.name.contains(".attn_q.") {
            Some(n_head)
        } else if t.name.contains(".attn_k.") {
            Some(n_kv)
        } else {
            None
        };
        if let Some(h) = permute_heads {
            data = permute_rotary_rows(&data, shape[0], h, false).with_context(|| format!("{}: tensor {}", path.display(), t.name))?;
        }
        tensors.push((hf, shape, data));
    }
    // Stable, readable order: embeddings, layers by index, norm, head.
    tensors.sort_by_key(|(n, _, _)| hf_sort_key(n));

    // Tokenizer.
    let tok = build_tokenizer(&g)?;

    let (architecture, model_type) = match arch.as_str() {
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "qwen3moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        "gemma2" => ("Gemma2ForCausalLM", "gemma2"),
        "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
        "phi3" => ("Phi3ForCausalLM", "phi3"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let mut config = Map::new();
    config.insert("architectures".into(), json!([architecture]));
    config.insert("model_type".into(), json!(model_type));
    config.insert("vocab_size".into(), json!(vocab_size));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert("intermediate_size".into(), json!(ff));
    config.insert("num_hidden_layers".into(), json!(n_layers));
    config.insert("num_attention_heads".into(), json!(n_head));
    config.insert("num_key_value_heads".into(), json!(n_kv));
    config.insert("head_dim".into(), json!(head_dim));
    config.insert("hidden_act".into(), json!("silu"));
    config.insert("max_position_embeddings".into(), json!(ctx));
    config.insert("rms_norm_eps".into(), json!(round_f32(eps)));
    config.insert("rope_theta".into(), json!(round_f32(theta)));
    let rope = match g.tensor_info("rope_freqs.weight") {
        Some(_) => {
            let factors = g.tensor_f32("rope_freqs.weight")?.1;
            llama3_scaling(&factors, theta).with_context(|| format!("{}: rope_freqs.weight", path.display()))?
        }
        None => rope_scaling(&g, &arch),
    };
    config.insert("rope_scaling".into(), rope);
    config.insert("attention_bias".into(), json!(attention_bias));
    config.insert("attention_dropout".into(), json!(0.0));
    config.insert("mlp_bias".into(), json!(false));
    config.insert("initializer_range".into(), json!(0.02));
    config.insert("tie_word_embeddings".into(), json!(tied));
    config.insert("bos_token_id".into(), json!(tok.bos_id));
    config.insert("eos_token_id".into(), json!(tok.eos_id));
    if let Some(p) = tok.pad_id {
        config.insert("pad_token_id".into(), json!(p));
    }
    config.insert("torch_dtype".into(), json!("float32"));
    config.insert("use_cache".into(), json!(true));
    family_config(&g, &arch, &mut config, (hidden, n_head, n_layers, head_dim, ctx))?;

    let mut gen = Map::new();
    gen.insert("_from_model_config".into(), json!(true));
    if let Some(b) = tok.bos_id {
        gen.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = tok.eos_id {
        gen.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = tok.pad_id {
        gen.insert("pad_token_id".into(), json!(p));
    }

    let mut tc = tok.config;
    tc.insert("model_max_length".into(), json!(ctx));

    Ok(HfImport {
        config: Value::Object(config),
        tensors,
        tokenizer_json: serde_json::to_string_pretty(&tok.json)?,
        tokenizer_config: Value::Object(tc),
        generation_config: Value::Object(gen),
    })
}

/// The config.json keys of the family beside Llama's, from the GGUF's metadata and llama.cpp's
/// rules where the file says nothing.
fn family_config(g: &GgufFile, arch: &str, config: &mut Map<String, Value>, (hidden, n_head, n_layers, head_dim, ctx): (usize, usize, usize, usize, u64)) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    let f32_of = |k: &str| g.meta_f64(&key(k)).map(round_f32);
    let window = g.meta_u64(&key("attention.sliding_window"));
    match arch {
        "gemma2" | "gemma3" => {
            for k in ["attention_bias", "mlp_bias", "hidden_act", "rope_scaling"] {
                config.remove(k);
            }
            config.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            let scalar = if arch == "gemma2" && n_layers == 46 { hidden / n_head } else { head_dim };
            config.insert("query_pre_attn_scalar".into(), json!(scalar));
            config.insert("sliding_window".into(), json!(window.unwrap_or(4096)));
            if arch == "gemma2" {
                // llama.cpp's defaults when the file has no soft-caps
                config.insert("attn_logit_softcapping".into(), json!(f32_of("attn_logit_softcapping").unwrap_or(50.0)));
                config.insert("final_logit_softcapping".into(), json!(f32_of("final_logit_softcapping").unwrap_or(30.0)));
                config.remove("rope_theta");
                config.insert("rope_theta".into(), json!(10000.0));
            } else {
                config.insert("final_logit_softcapping".into(), f32_of("final_logit_softcapping").map_or(Value::Null, |c| json!(c)));
                config.insert("attn_logit_softcapping".into(), Value::Null);
                config.insert("layer_types".into(), json!((0..n_layers).map(|l| if (l + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>()));
                let global = f32_of("rope.freq_base").unwrap_or(1e6);
                let mut full = json!({"rope_type": "default", "rope_theta": global});
                if let (Some("linear"), Some(f)) = (g.meta_str(&key("rope.scaling.type")), f32_of("rope.scaling.factor")) {
                    full = json!({"rope_type": "linear", "factor": f, "rope_theta": global});
                }
                config.remove("rope_theta");
                config.insert("rope_parameters".into(), json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": f32_of("rope.freq_base_swa").unwrap_or(10000.0)}}));
            }
        }
        "phi3" => {
            config.remove("head_dim");
            config.remove("attention_bias");
            if let Some(rot) = g.meta_u64(&key("rope.dimension_count")) {
                config.insert("partial_rotary_factor".into(), json!(rot as f64 / head_dim as f64));
            }
            config.insert("sliding_window".into(), window.map_or(Value::Null, |w| json!(w)));
            let factors = |name: &str| -> Result<Option<Vec<f64>>> {
                match g.tensor_info(name) {
                    Some(_) => Ok(Some(g.tensor_f32(name)?.1.into_iter().map(|x| round_f32(x as f64)).collect())),
                    None => Ok(None),
                }
            };
            if let (Some(long), Some(short)) = (factors("rope_factors_long.weight")?, factors("rope_factors_short.weight")?) {
                let original = g.meta_u64(&key("rope.scaling.original_context_length")).unwrap_or(ctx);
                let mut scaling = json!({"type": "longrope", "long_factor": long, "short_factor": short});
                // the converter writes the factor transformers derives, √(1 + ln(ctx/L₀) / ln L₀); another one is kept
                let derived = if ctx > original { (1.0 + (ctx as f64 / original as f64).ln() / (original as f64).ln()).sqrt() } else { 1.0 };
                if let Some(a) = f32_of("rope.scaling.attn_factor").filter(|a| (a - derived).abs() > 1e-6) {
                    scaling["attention_factor"] = json!(a);
                }
                config.insert("rope_scaling".into(), scaling);
                config.insert("original_max_position_embeddings".into(), json!(original));
            }
        }
        "qwen3moe" => {
            let need = |k: &str| g.meta_u64(&key(k)).ok_or_else(|| anyhow!("{}: GGUF metadata {} missing", g.path.display(), key(k)));
            config.insert("num_experts".into(), json!(need("expert_count")?));
            config.insert("num_experts_per_tok".into(), json!(need("expert_used_count")?));
            config.insert("moe_intermediate_size".into(), json!(need("expert_feed_forward_length")?));
            // llama.cpp renormalizes the top-k weights and has no dense layers
            config.insert("norm_topk_prob".into(), json!(true));
            config.insert("decoder_sparse_step".into(), json!(1));
            config.insert("mlp_only_layers".into(), json!([]));
            config.insert("use_sliding_window".into(), json!(false));
        }
        "qwen2" | "qwen3" => {
            config.insert("use_sliding_window".into(), json!(false));
            config.insert("attention_bias".into(), json!(arch == "qwen2" || config["attention_bias"] == json!(true)));
        }
        _ => {}
    }
    Ok(())
}

/// Llama 3's `rope_scaling` from the per-frequency divisors llama.cpp stores (`rope_freqs.weight`,
/// one for each `f_i = θ^(-i/n)`, `n` of them): 1 for wavelengths `λ = 2π/f` below `L/high`,
/// `factor` above `L/low`, and `1/((1 − s)/factor + s)` with `s = (L/λ − low)/(high − low)` between.
/// The file keeps the divisors only, and any `(L, low, high)` on the same line of `s` against
/// `1/λ` gives them: `low` is taken as 1 (as Llama 3.x has it), `L` and `high` from two
/// frequencies in the transition (or its edges, with `high` 4 when one is missing). The result
/// is checked against the divisors. All divisors 1: no scaling (null).
fn llama3_scaling(factors: &[f32], theta: f64) -> Result<Value> {
    let n = factors.len();
    let factor = factors.iter().fold(1f64, |m, &f| m.max(f as f64));
    if factor <= 1.0 + 1e-6 {
        return Ok(Value::Null);
    }
    let u = |i: usize| theta.powf(-(i as f64) / n as f64) / (2.0 * std::f64::consts::PI); // 1/λ
    let s = |f: f64| (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor);
    let between: Vec<usize> = (0..n).filter(|&i| (factors[i] as f64) > 1.0 + 1e-6 && (factors[i] as f64) < factor * (1.0 - 1e-6)).collect();
    let low = 1.0;
    let (l, high) = match between.as_slice() {
        [first, .., last] => {
            // s = (L·u − 1)/(high − 1) through two points
            let (s1, s2, u1, u2) = (s(factors[*first] as f64), s(factors[*last] as f64), u(*first), u(*last));
            let high = 1.0 + (u2 / u1 - 1.0) / (s2 - s1 * u2 / u1);
            ((s1 * (high - 1.0) + 1.0) / u1, high)
        }
        [one] => {
            let high = 4.0;
            ((s(factors[*one] as f64) * (high - 1.0) + 1.0) / u(*one), high)
        }
        [] => {
            // the edges: the last frequency divided by `factor` at or beyond λ = L/low, the first undivided at λ = L/high
            let scaled = (0..n).filter(|&i| (factors[i] as f64) >= factor * (1.0 - 1e-6)).map(u).fold(0f64, f64::max);
            let l = (1.0 / scaled).floor();
            let high = (0..n).filter(|&i| (factors[i] as f64) <= 1.0 + 1e-6).map(|i| l * u(i)).fold(f64::INFINITY, f64::min);
            (l, if high.is_finite() { high } else { 4.0 })
        }
    };
    // config.json's original length is a whole number of tokens
    let l = l.round();
    let check = (0..n).all(|i| {
        let lu = l * u(i);
        let want = if lu > high { 1.0 } else if lu < low { factor } else { 1.0 / ((1.0 - (lu - low) / (high - low)) / factor + (lu - low) / (high - low)) };
        (want - factors[i] as f64).abs() <= 1e-4 * want
    });
    if !check || !(l.is_finite() && l > 0.0 && high > low) {
        bail!("these divisors do not follow Llama 3's rope scaling, the only kind of rope_freqs read");
    }
    Ok(json!({"rope_type": "llama3", "factor": round_f32(factor), "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": l.round() as u64}))
}

/// `(layer, projection)` of a stack of expert weights (`blk.3.ffn_up_exps.weight` → `(3, "up_proj")`).
fn expert_stack(gguf: &str) -> Option<(usize, &'static str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let proj = match rest {
        "ffn_gate_exps.weight" => "gate_proj",
        "ffn_up_exps.weight" => "up_proj",
        "ffn_down_exps.weight" => "down_proj",
        _ => return None,
    };
    Some((layer.parse().ok()?, proj))
}

/// GGUF stores these as f32 (1e-5 becomes 9.99999974e-06); report the shortest decimal that
/// round-trips through f32, as the original config.json had it.
fn round_f32(x: f64) -> f64 {
    let s = format!("{}", x as f32);
    s.parse().unwrap_or(x)
}

fn rope_scaling(g: &GgufFile, arch: &str) -> Value {
    let ty = g.meta_str(&format!("{arch}.rope.scaling.type"));
    let factor = g.meta_f64(&format!("{arch}.rope.scaling.factor"));
    match (ty, factor) {
        (Some("linear"), Some(f)) if f != 1.0 => json!({"rope_type": "linear", "factor": round_f32(f)}),
        (Some("yarn"), Some(f)) => {
            let mut m = Map::new();
            m.insert("rope_type".into(), json!("yarn"));
            m.insert("factor".into(), json!(round_f32(f)));
            if let Some(o) = g.meta_u64(&format!("{arch}.rope.scaling.original_context_length")) {
                m.insert("original_max_position_embeddings".into(), json!(o));
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}

fn hf_sort_key(name: &str) -> (usize, usize, String) {
    if name == "model.embed_tokens.weight" {
        (0, 0, String::new())
    } else if let Some(rest) = name.strip_prefix("model.layers.") {
        let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
        (1, n.parse().unwrap_or(usize::MAX), tail.to_string())
    } else if name == "model.norm.weight" {
        (2, 0, String::new())
    } else {
        (3, 0, name.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------

struct BuiltTokenizer {
    json: Value,
    config: Map<String, Value>,
    bos_id: Option<u64>,
    eos_id: Option<u64>,
    pad_id: Option<u64>,
}

fn string_array(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(GgufValue::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: {} is not an array of strings", g.path.display(), key))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => bail!("{}: {} is not an array", g.path.display(), key),
    }
}

/// Builds tokenizer.json the way transformers' GGUF llama converter does
/// (`GGUFLlamaConverter` + `TokenizersBackend.update_post_processor`):
/// - model: BPE over `tokenizer.ggml.tokens` (id = index) and `tokenizer.ggml.merges`
///   (built from scores when absent), `fuse_unk` on, `byte_fallback` on for sentencepiece;
/// - added tokens: every token of type 3 (control) as a special, non-normalized token;
/// - `tokenizer.ggml.model == "gpt2"` (byte-level BPE): empty normalizer, ByteLevel
///   pre-tokenizer (GPT-2 regex, no prefix space), decoder ByteLevel (transformers writes
///   ByteFallback+Fuse+Replace+ByteLevel and `byte_fallback`, which decode and encode the same
///   for byte-level BPE but make llama.cpp's converter take the vocabulary for sentencepiece);
/// - `"llama"` (sentencepiece BPE): normalizer Prepend("▁") (if add_space_prefix) + Replace
///   (" " -> "▁"), no pre-tokenizer, decoder Replace+ByteFallback... as transformers;
/// - post-processor: TemplateProcessing that adds nothing, as in transformers, which ignores
///   `tokenizer.ggml.add_bos_token` / `add_eos_token` (llama.cpp follows them).
fn build_tokenizer(g: &GgufFile) -> Result<BuiltTokenizer> {
    let p = g.path.display();
    let model = g.meta_str("tokenizer.ggml.model").unwrap_or("llama").to_string();
    if model != "gpt2" && model != "llama" {
        bail!("{p}: unsupported GGUF tokenizer model {model:?}; supported: gpt2, llama");
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("{p}: GGUF has no tokenizer.ggml.tokens"))?;
    let token_types: Vec<i64> = match g.metadata.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let scores: Vec<f64> = match g.metadata.get("tokenizer.ggml.scores") {
        Some(GgufValue::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        _ => Vec::new(),
    };
    let merges: Vec<(String, String)> = match string_array(g, "tokenizer.ggml.merges")? {
        Some(m) => m
            .iter()
            .map(|s| {
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("{p}: malformed merge {s:?}"))
            })
            .collect::<Result<_>>()?,
        None => {
            if scores.len() != tokens.len() {
                bail!("{p}: GGUF has no tokenizer.ggml.merges and no scores to build them from");
            }
            merges_from_scores(&tokens, &scores)
        }
    };
    let tok_id = |key: &str| -> Result<Option<u64>> {
        match g.meta_u64(key) {
            Some(i) if (i as usize) < tokens.len() => Ok(Some(i)),
            Some(i) => bail!("{p}: {key} = {i} is outside the vocabulary ({} tokens)", tokens.len()),
            None => Ok(None),
        }
    };
    let bos_id = tok_id("tokenizer.ggml.bos_token_id")?;
    let eos_id = tok_id("tokenizer.ggml.eos_token_id")?;
    let unk_id = tok_id("tokenizer.ggml.unknown_token_id")?;
    let pad_id = tok_id("tokenizer.ggml.padding_token_id")?;
    let name = |id: Option<u64>| id.map(|i| tokens[i as usize].clone());
    let (bos, eos, unk, pad) = (name(bos_id), name(eos_id), name(unk_id), name(pad_id));
    let add_prefix_space = g.meta_bool("tokenizer.ggml.add_space_prefix");

    // Special (control) tokens; without type information, fall back to unk/bos/eos.
    let added_entry = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let mut added: Vec<(usize, String)> = Vec::new();
    if token_types.is_empty() {
        for id in [unk_id, bos_id, eos_id].into_iter().flatten() {
            if !added.iter().any(|(i, _)| *i == id as usize) {
                added.push((id as usize, tokens[id as usize].clone()));
            }
        }
    } else {
        for (i, t) in token_types.iter().enumerate() {
            if *t == 3 && i < tokens.len() {
                added.push((i, tokens[i].clone()));
            }
        }
    }

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let merges_json: Vec<Value> = merges.iter().map(|(a, b)| json!([a, b])).collect();

    let (normalizer, pre_tokenizer, decoder) = if model == "gpt2" {
        (
            json!({"type": "Sequence", "normalizers": []}),
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        )
    } else {
        let aps = add_prefix_space.unwrap_or(true);
        let mut norms = Vec::new();
        if aps {
            norms.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decs = vec![
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        ];
        if aps {
            decs.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (json!({"type": "Sequence", "normalizers": norms}), Value::Null, json!({"type": "Sequence", "decoders": decs}))
    };

    // TemplateProcessing as transformers' update_post_processor writes it with add_bos_token
    // and add_eos_token off: the sequences as they are.
    let piece = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let post = json!({"type": "TemplateProcessing", "single": [piece("A", 0)], "pair": [piece("A", 0), piece("B", 1)],
                      "special_tokens": {}});

    let mut tj = Map::new();
    tj.insert("version".into(), json!("1.0"));
    tj.insert("truncation".into(), Value::Null);
    tj.insert("padding".into(), Value::Null);
    tj.insert("added_tokens".into(), Value::Array(added.iter().map(|(i, c)| added_entry(*i, c)).collect()));
    tj.insert("normalizer".into(), normalizer);
    tj.insert("pre_tokenizer".into(), pre_tokenizer);
    tj.insert("post_processor".into(), post);
    tj.insert("decoder".into(), decoder);
    tj.insert(
        "model".into(),
        json!({
            "type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": model != "gpt2", "ignore_merges": false,
            "vocab": Value::Object(vocab), "merges": merges_json,
        }),
    );

    // tokenizer_config.json
    let mut decoder_map = Map::new();
    for (i, c) in &added {
        decoder_map.insert(
            i.to_string(),
            json!({"content": c, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true}),
        );
    }
    let mut tc = Map::new();
    // transformers (v5) does not carry tokenizer.ggml.add_bos_token / add_eos_token over to
    // the converted tokenizer, so its GGUF tokenizer never adds bos/eos; same ids here
    tc.insert("add_bos_token".into(), json!(false));
    tc.insert("add_eos_token".into(), json!(false));
    tc.insert("add_prefix_space".into(), json!(if model == "gpt2" { false } else { add_prefix_space.unwrap_or(true) }));
    tc.insert("added_tokens_decoder".into(), Value::Object(decoder_map));
    tc.insert("bos_token".into(), json!(bos));
    tc.insert("eos_token".into(), json!(eos));
    tc.insert("unk_token".into(), json!(unk));
    tc.insert("pad_token".into(), json!(pad));
    if let Some(t) = g.meta_str("tokenizer.chat_template") {
        tc.insert("chat_template".into(), json!(t));
    }
    tc.insert("clean_up_tokenization_spaces".into(), json!(model == "gpt2"));
    tc.insert("legacy".into(), json!(model != "gpt2"));
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));

    Ok(BuiltTokenizer { json: Value::Object(tj), config: tc, bos_id, eos_id, pad_id })
}

/// Merges for a sentencepiece vocabulary without explicit merges, as transformers'
/// `GGUFTokenizerSkeleton` derives them: every split of a token into two vocabulary pieces,
/// per token sorted by (score(left), score(right)) descending, then all stably sorted by the
/// merged token's score, descending.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // Python builds `{token: score}` (last duplicate wins) and iterates in first-insertion order.
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (t, s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), *s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(String, String, f64)> = Vec::new();
    for merge in order {
        let score = score_of[merge];
        let mut local = Vec::new();
        for (idx, _) in merge.char_indices().skip(1) {
            let (l, r) = merge.split_at(idx);
            if let (Some(sl), Some(sr)) = (score_of.get(l), score_of.get(r)) {
                local.push((l, r, *sl, *sr));
            }
        }
        local.sort_by(|a, b| (b.2, b.3).partial_cmp(&(a.2, a.3)).unwrap_or(std::cmp::Ordering::Equal));
        merges.extend(local.into_iter().map(|(l, r, _, _)| (l.to_string(), r.to_string(), score)));
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(a, b, _)| (a, b)).collect()
}

// ---------------------------------------------------------------------------------------
// Writing a Hugging Face directory
// ---------------------------------------------------------------------------------------

struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: f32 has no padding and any byte pattern is a valid u8; alignment of u8 is 1.
            Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(self.data.as_ptr() as *const u8, std::mem::size_of_val(self.data))
            })
        }
        #[cfg(not(target_endian = "little"))]
        {
            Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("writing {}", p.display()))
}

/// Writes config.json, model.safetensors (F32, written to a temp name then renamed),
/// tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json.
pub fn write_hf_dir(import: &HfImport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, shape, data) in &import.tensors {
        if shape.iter().product::<usize>() != data.len() {
            bail!("tensor {name}: shape {shape:?} does not match {} values", data.len());
        }
    }
    let views = import
        .tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), F32View { shape: s, data: d }));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let tmp = dir.join(format!(".model.safetensors.tmp{}", std::process::id()));
    let fin = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &fin).with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;

    write_json(dir, "config.json", &import.config)?;
    let tp = dir.join("tokenizer.json");
    std::fs::write(&tp, &import.tokenizer_json).with_context(|| format!("writing {}", tp.display()))?;
    write_json(dir, "tokenizer_config.json", &import.tokenizer_config)?;
    let mut stm = Map::new();
    for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(v) = import.tokenizer_config.get(k).filter(|v| !v.is_null()) {
            stm.insert(k.into(), v.clone());
        }
    }
    write_json(dir, "special_tokens_map.json", &Value::Object(stm))?;
    write_json(dir, "generation_config.json", &import.generation_config)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {

    /// Llama 3.1's rope scaling (head_dim 128, θ 500,000, factor 8, low 1, high 4, original
    /// 8,192) comes back from the divisors llama.cpp's converter derives from it.
    #[test]
    fn llama3_scaling_comes_back_from_its_divisors() {
        let (theta, n, l, factor) = (500000f64, 64usize, 8192f64, 8f64);
        let factors: Vec<f32> = (0..n)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * theta.powf(i as f64 / n as f64);
                let f = if wavelen < l / 4.0 {
                    1.0
                } else if wavelen > l {
                    factor
                } else {
                    let s = (l / wavelen - 1.0) / 3.0;
                    1.0 / ((1.0 - s) / factor + s)
                };
                f as f32
            })
            .collect();
        let v = llama3_scaling(&factors, theta).unwrap();
        assert_eq!(v["original_max_position_embeddings"], 8192, "{v}");
        assert_eq!(v["factor"], 8.0, "{v}");
        assert!((v["high_freq_factor"].as_f64().unwrap() - 4.0).abs() < 1e-3, "{v}");
        assert!(llama3_scaling(&[1.0, 3.0, 1.5, 8.0], theta).is_err(), "divisors off Llama 3's curve are refused");
        assert_eq!(llama3_scaling(&[1.0; 8], theta).unwrap(), Value::Null);
    }

    use super::*;

    fn h(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_block() {
        let mut b = Vec::new();
        b.extend(h(0.5));
        // qs[j] = low nibble j, high nibble 15-j
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(2, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(v[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_block() {
        let mut b = Vec::new();
        b.extend(h(0.25));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let v = dequantize(3, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], j as f32 * 0.25 - 1.0);
            assert_eq!(v[j + 16], 3.0 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1_blocks() {
        let qh: u32 = 0x8000_0001; // high bit set for value 0 and value 31
        let mut b = Vec::new();
        b.extend(h(2.0));
        b.extend(qh.to_le_bytes());
        b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
        let v = dequantize(6, &b, 32).unwrap();
        assert_eq!(v[0], (17.0 - 16.0) * 2.0);
        assert_eq!(v[1], (1.0 - 16.0) * 2.0);
        assert_eq!(v[16], (2.0 - 16.0) * 2.0);
        assert_eq!(v[31], (18.0 - 16.0) * 2.0);

        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(1.0));
        b.extend(qh.to_le_bytes());
        b.extend([0x21u8; 16]);
        let v = dequantize(7, &b, 32).unwrap();
        assert_eq!(v[0], 17.0 * 0.5 + 1.0);
        assert_eq!(v[1], 1.0 * 0.5 + 1.0);
        assert_eq!(v[31], 18.0 * 0.5 + 1.0);
    }

    #[test]
    fn q8_0_and_float_types() {
        let mut b = Vec::new();
        b.extend(h(0.125));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(8, &b, 32).unwrap();
        assert_eq!(v, (0..32).map(|i| (i as f32 - 16.0) * 0.125).collect::<Vec<_>>());

        let f: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(0, &f, 2).unwrap(), vec![1.5, -2.0]);
        let f: Vec<u8> = [h(1.5), h(-2.0)].concat();
        assert_eq!(dequantize(1, &f, 2).unwrap(), vec![1.5, -2.0]);
        let f: Vec<u8> = [half::bf16::from_f32(3.0).to_le_bytes(), half::bf16::from_f32(-0.5).to_le_bytes()].concat();
        assert_eq!(dequantize(30, &f, 2).unwrap(), vec![3.0, -0.5]);
    }

    #[test]
    fn q4_k_block() {
        let mut b = Vec::new();
        b.extend(h(1.0));
        b.extend(h(0.5));
        // scales: sub-block j (j<4): sc = j+1, m = j; j>=4: sc = j+1 via nibble, m = 2 via nibble.
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = (j + 1) as u8;
            s[j + 4] = j as u8;
        }
        for j in 4..8 {
            s[j + 4] = ((j + 1) as u8 & 15) | (2 << 4);
        }
        b.extend(s);
        b.extend([0x73u8; 128]); // low nibble 3, high 7
        let v = dequantize(12, &b, 256).unwrap();
        for sub in 0..8 {
            let (sc, m) = if sub < 4 { ((sub + 1) as f32, sub as f32) } else { ((sub + 1) as f32, 2.0) };
            let q = if sub % 2 == 0 { 3.0 } else { 7.0 };
            for l in 0..32 {
                assert_eq!(v[sub * 32 + l], sc * q - 0.5 * m, "sub {sub} l {l}");
            }
        }
    }

    #[test]
    fn q6_k_block() {
        let mut b = vec![0u8; 210];
        // ql all 0x21 (low 1, high 2), qh all 0b11_10_01_00 -> k=0:0, k=1:1, k=2:2, k=3:3
        b[..128].fill(0x21);
        b[128..192].fill(0b1110_0100);
        for i in 0..16 {
            b[192 + i] = (i as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&h(0.5));
        let v = dequantize(14, &b, 256).unwrap();
        for half_ in 0..2 {
            for k in 0..4 {
                for l in 0..32 {
                    let nib = if k < 2 { 1 } else { 2 };
                    let q = (nib | ((k as i32) << 4)) - 32;
                    let sc = (half_ * 8 + l / 16 + 2 * k) as f32 - 8.0;
                    assert_eq!(v[half_ * 128 + k * 32 + l], 0.5 * sc * q as f32);
                }
            }
        }
    }

    #[test]
    fn q2_k_and_q3_k_shapes() {
        let mut b = vec![0u8; 84];
        b[..16].fill(0x21); // scale 1, min 2
        b[16..80].fill(0b11_10_01_00);
        b[80..82].copy_from_slice(&h(1.0));
        b[82..84].copy_from_slice(&h(0.5));
        let v = dequantize(10, &b, 256).unwrap();
        // 128-value half: 4 shifts x 32 values; shift k gives q = k
        for k in 0..4 {
            assert_eq!(v[k * 32], k as f32 - 1.0);
            assert_eq!(v[128 + k * 32 + 31], k as f32 - 1.0);
        }
        let mut b = vec![0u8; 110];
        b[..32].fill(0xff); // all high bits set -> no -4
        b[32..96].fill(0b11_10_01_00);
        // all scales = 33 -> sc - 32 = 1: low nibble 1 everywhere, high bits 2 (=> 0b10 << 4 = 32)
        b[96..104].fill(0x11);
        b[104..108].fill(0b1010_1010);
        b[108..110].copy_from_slice(&h(2.0));
        let v = dequantize(11, &b, 256).unwrap();
        for k in 0..4 {
            assert_eq!(v[k * 32 + 5], 2.0 * k as f32);
        }
        b[..32].fill(0);
        let v = dequantize(11, &b, 256).unwrap();
        assert_eq!(v[0], 2.0 * -4.0);
    }

    #[test]
    fn unsupported_and_short_inputs() {
        let e = dequantize(16, &[0u8; 66], 256).unwrap_err().to_string();
        assert!(e.contains("IQ2_XXS"), "{e}");
        assert!(dequantize(2, &[0u8; 17], 32).is_err());
        assert!(dequantize(2, &[0u8; 18], 31).is_err());
    }

    #[test]
    fn rotary_rows_from_llama_cpp_match_the_definition() {
        // 2 heads, head dim 4 (dim=2 per half), 1 column; llama.cpp permuted row order per
        // head is [0, 2, 1, 3] of the HF order, so un-permuting must restore 0..8.
        let permuted = [0., 2., 1., 3., 4., 6., 5., 7.];
        assert_eq!(permute_rotary_rows(&permuted, 8, 2, false).unwrap(), vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    }

    #[test]
    fn parses_minimal_file_and_rejects_bad_ones() {
        let mut f = Vec::new();
        f.extend(b"GGUF");
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes()); // tensors
        f.extend(2u64.to_le_bytes()); // kv
        let s = |f: &mut Vec<u8>, x: &str| {
            f.extend((x.len() as u64).to_le_bytes());
            f.extend(x.as_bytes());
        };
        s(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        s(&mut f, "llama");
        s(&mut f, "arr");
        f.extend(9u32.to_le_bytes());
        f.extend(5u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(7i32.to_le_bytes());
        f.extend((-1i32).to_le_bytes());
        s(&mut f, "t");
        f.extend(2u32.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(0u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        while f.len() % 32 != 0 {
            f.push(0);
        }
        for i in 0..6 {
            f.extend((i as f32).to_le_bytes());
        }
        let dir = std::env::temp_dir().join(format!("gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ok.gguf");
        std::fs::write(&p, &f).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.metadata()["general.architecture"].as_str(), Some("llama"));
        assert_eq!(g.metadata()["arr"], GgufValue::Array(vec![GgufValue::I32(7), GgufValue::I32(-1)]));
        assert_eq!(g.tensor_names(), vec!["t".to_string()]);
        let (shape, data) = g.tensor_f32("t").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(data, vec![0., 1., 2., 3., 4., 5.]);

        let p2 = dir.join("trunc.gguf");
        std::fs::write(&p2, &f[..f.len() - 4]).unwrap();
        let e = GgufFile::open(&p2).err().unwrap().to_string();
        assert!(e.contains("trunc.gguf") && e.contains("truncated"), "{e}");
        std::fs::write(&p2, &f[..40]).unwrap();
        let e = GgufFile::open(&p2).err().unwrap().to_string();
        assert!(e.contains("trunc.gguf") && e.contains("truncated"), "{e}");
        let p3 = dir.join("bad.gguf");
        std::fs::write(&p3, b"GGML\x03\0\0\0").unwrap();
        let e = GgufFile::open(&p3).err().unwrap().to_string();
        assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");
        // import of a non-llama architecture names it
        let mut f2 = f.clone();
        let pos = f2.windows(5).position(|w| w == b"llama").unwrap();
        f2[pos..pos + 5].copy_from_slice(b"phi_x");
        let p4 = dir.join("arch.gguf");
        std::fs::write(&p4, &f2).unwrap();
        let e = import(&p4).err().unwrap().to_string();
        assert!(e.contains("phi_x") && e.contains("llama"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
