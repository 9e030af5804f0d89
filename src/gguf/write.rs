//! Writing a GGUF file (the layout is in [`super::import`]'s header): metadata in the order it
//! was added, tensor infos with offsets aligned to `general.alignment` (32), then each
//! tensor's bytes, made one tensor at a time so a model is never held twice. The file is
//! written to a temporary name, fsynced, and renamed into place.

use super::quants::QuantType;
use super::GgufValue;
use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

pub const ALIGNMENT: u64 = 32;

/// The bytes of one tensor, made when the writer reaches it.
pub type TensorBytes<'a> = Box<dyn Fn() -> Result<Vec<u8>> + 'a>;

struct TensorEntry<'a> {
    name: String,
    /// Dimensions in GGUF order (`ne[0]` fastest: a PyTorch `[rows, cols]` is `[cols, rows]`).
    ne: Vec<u64>,
    ty: QuantType,
    bytes: TensorBytes<'a>,
}

/// A GGUF file being assembled.
#[derive(Default)]
pub struct GgufWriter<'a> {
    kv: Vec<(String, GgufValue)>,
    tensors: Vec<TensorEntry<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self { kv: vec![], tensors: vec![] }
    }

    /// Adds (or replaces, keeping its place) one metadata entry.
    pub fn set(&mut self, key: &str, value: GgufValue) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.kv.iter().map(|(k, _)| k.as_str())
    }

    /// Adds a tensor of PyTorch shape `shape` stored as `ty`; `bytes` makes its encoded data.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], ty: QuantType, bytes: TensorBytes<'a>) -> Result<()> {
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if !(ne[0] as usize).is_multiple_of(ty.block_size()) {
            bail!("tensor {name}: a row of {} elements is not a whole number of {} blocks of {}", ne[0], ty.name(), ty.block_size());
        }
        if self.tensors.iter().any(|t| t.name == name) {
            bail!("tensor {name} added twice");
        }
        self.tensors.push(TensorEntry { name: name.to_string(), ne, ty, bytes });
        Ok(())
    }

    /// Writes the file: `path` appears complete or not at all.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = crate::nn::weights::tmp_path(path);
        let result = self.write_to(&tmp);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return result;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn write_to(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let ctx = || format!("cannot write {}", path.display());
        w.write_all(b"GGUF").with_context(ctx)?;
        w.write_all(&3u32.to_le_bytes()).with_context(ctx)?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes()).with_context(ctx)?;
        w.write_all(&(self.kv.len() as u64).to_le_bytes()).with_context(ctx)?;
        let mut head = vec![];
        for (k, v) in &self.kv {
            put_str(&mut head, k);
            head.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut sizes = vec![];
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.ggml_type().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            let n: u64 = t.ne.iter().product();
            let size = n / t.ty.block_size() as u64 * t.ty.type_size() as u64;
            sizes.push(size);
            offset += size.next_multiple_of(ALIGNMENT);
        }
        let written = 24 + head.len() as u64;
        head.resize(head.len() + (written.next_multiple_of(ALIGNMENT) - written) as usize, 0);
        w.write_all(&head).with_context(ctx)?;
        for (t, &size) in self.tensors.iter().zip(&sizes) {
            let bytes = (t.bytes)().with_context(|| format!("tensor {}", t.name))?;
            if bytes.len() as u64 != size {
                bail!("tensor {}: {} bytes made for {} expected ({} {:?})", t.name, bytes.len(), size, t.ty.name(), t.ne);
            }
            w.write_all(&bytes).with_context(ctx)?;
            w.write_all(&vec![0u8; (size.next_multiple_of(ALIGNMENT) - size) as usize]).with_context(ctx)?;
        }
        let file = w.into_inner().map_err(|e| e.into_error()).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type id of a value (see [`GgufValue`]).
fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => {
            // an empty array's element type is not recorded anywhere else; the converter
            // writes such arrays as arrays of strings
            out.extend_from_slice(&a.first().map(value_type).unwrap_or(8).to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.set("general.architecture", GgufValue::String("llama".into()));
        w.set("llama.block_count", GgufValue::U32(2));
        w.set("tokenizer.ggml.tokens", GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("b".into())]));
        let data: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor("x.weight", &[2, 3], QuantType::F32, Box::new(move || Ok(bytes.clone()))).unwrap();
        w.add_tensor("y.weight", &[3], QuantType::F32, Box::new(|| Ok(vec![0u8; 12]))).unwrap();
        w.write(&path).unwrap();
        let g = super::super::GgufFile::open(&path).unwrap();
        assert_eq!(g.meta_str("general.architecture"), Some("llama"));
        assert_eq!(g.meta_u64("llama.block_count"), Some(2));
        let (shape, x) = g.tensor_f32("x.weight").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(x, data);
        assert_eq!(g.tensor_info("y.weight").unwrap().offset % ALIGNMENT, 0);
        assert!(!crate::nn::weights::tmp_path(&path).exists());
    }
}
