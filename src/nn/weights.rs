//! Reading checkpoint tensors: safetensors files (single or sharded with
//! `model.safetensors.index.json`), memory-mapped, and in-memory tensor maps (GGUF imports).

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Maps a safetensors dtype string to a libtorch kind.
pub fn kind_of(dtype: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

pub struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// Where the weights of a model come from.
pub enum WeightSource {
    /// Memory-mapped safetensors files and the location of every tensor in them.
    Safetensors { files: Vec<(PathBuf, Mmap)>, index: HashMap<String, Entry> },
    /// Tensors already in memory (e.g. dequantized from GGUF).
    Memory(HashMap<String, Tensor>),
    /// No checkpoint: fresh weights as transformers' `_init_weights` makes them for Llama —
    /// linear layers and embeddings `N(0, std²)`, norms 1, biases 0 — drawn on the target
    /// device from a seed derived from `seed` and the tensor's name, so a tensor's values do
    /// not depend on load order or device placement (every rank of a data-parallel run gets
    /// the same model).
    Random { std: f64, seed: u64 },
}

impl WeightSource {
    /// Opens every safetensors file of a model directory (sharded or not).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing key `weight_map`", index_path.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = vec![];
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: checkpoint files are not modified while we read them.
            let mmap = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: invalid safetensors file: {e:?}", path.display()))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() {
                    bail!("{}: truncated: tensor `{name}` ends past the end of the file", path.display());
                }
                index.insert(
                    name.clone(),
                    Entry {
                        file: i,
                        kind: kind_of(info.dtype).with_context(|| format!("{}: tensor `{name}`", path.display()))?,
                        shape: info.shape.iter().map(|&d| d as i64).collect(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(WeightSource::Safetensors { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Safetensors { index, .. } => index.contains_key(name),
            WeightSource::Memory(m) => m.contains_key(name),
            WeightSource::Random { .. } => false,
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match self {
            WeightSource::Safetensors { index, .. } => index.keys().cloned().collect(),
            WeightSource::Memory(m) => m.keys().cloned().collect(),
            WeightSource::Random { .. } => vec![],
        };
        v.sort();
        v
    }

    /// Where a tensor lives, for error messages.
    fn origin(&self, name: &str) -> String {
        match self {
            WeightSource::Safetensors { files, index } => match index.get(name) {
                Some(e) => files[e.file].0.display().to_string(),
                None => files.first().map(|f| f.0.display().to_string()).unwrap_or_default(),
            },
            WeightSource::Memory(_) => "imported weights".into(),
            WeightSource::Random { .. } => "random init".into(),
        }
    }

    /// Loads tensor `name`, checks its shape, converts it to `kind` and moves it to `device`.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        if let WeightSource::Random { std, seed } = self {
            return Ok(random_init(name, shape, *std, *seed, kind, device));
        }
        let t = self.load_any(name)?;
        if t.size() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                self.origin(name),
                t.size(),
                shape
            );
        }
        let floating = matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16);
        if t.is_floating_point() != floating {
            bail!("{}: tensor `{name}` is {:?}, expected a {} tensor", self.origin(name), t.kind(), if floating { "floating-point" } else { "integer" });
        }
        Ok(t.to_device(device).to_kind(kind))
    }

    /// Loads tensor `name` as stored (on the CPU).
    pub fn load_any(&self, name: &str) -> Result<Tensor> {
        match self {
            WeightSource::Safetensors { files, index } => {
                let e = index
                    .get(name)
                    .with_context(|| format!("{}: missing tensor `{name}`", self.origin(name)))?;
                let bytes = &files[e.file].1[e.start..e.end];
                let numel: i64 = e.shape.iter().product();
                if numel as usize * e.kind.elt_size_in_bytes() != bytes.len() {
                    bail!("{}: tensor `{name}` has {} bytes, its shape needs {}", files[e.file].0.display(), bytes.len(), numel as usize * e.kind.elt_size_in_bytes());
                }
                Ok(Tensor::f_from_data_size(bytes, &e.shape, e.kind)?)
            }
            WeightSource::Memory(m) => m
                .get(name)
                .map(|t| t.shallow_clone())
                .with_context(|| format!("imported weights: missing tensor `{name}`")),
            WeightSource::Random { .. } => bail!("random init: tensor `{name}` has no stored form"),
        }
    }
}

/// One tensor of [`WeightSource::Random`].
fn random_init(name: &str, shape: &[i64], std: f64, seed: u64, kind: Kind, device: Device) -> Tensor {
    if name.ends_with("norm.weight") {
        return Tensor::ones(shape, (kind, device));
    }
    if name.ends_with(".bias") {
        return Tensor::zeros(shape, (kind, device));
    }
    // FNV-1a of the name, mixed with the seed
    let h = name.bytes().fold(0xcbf29ce484222325u64 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    tch::manual_seed((h >> 1) as i64);
    (Tensor::randn(shape, (Kind::Float, device)) * std).to_kind(kind)
}

/// Writes tensors to a safetensors file atomically (temporary name, then rename).
pub fn save_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views: Vec<(String, TensorBytes)> = vec![];
    for (name, t) in tensors {
        views.push((name.clone(), TensorBytes::from_tensor(t)?));
    }
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e:?}", tmp.display()))?;
    persist(&tmp, path)
}

/// Moves the finished temporary file `tmp` to `path` so that a crash leaves the old file or
/// the whole new one: the data is fsynced, the file renamed, and the directory fsynced (so
/// the rename itself survives a power loss).
pub fn persist(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // a directory that cannot be opened for syncing (some filesystems) keeps the rename anyway
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>` next to `path`, for write-then-rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file atomically (a temporary name, fsynced, renamed: [`persist`]).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    persist(&tmp, path)
}

/// A tensor's bytes on the CPU, contiguous, for safetensors serialization.
pub struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorBytes {
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        use safetensors::Dtype as D;
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => D::F32,
            Kind::Half => D::F16,
            Kind::BFloat16 => D::BF16,
            Kind::Double => D::F64,
            Kind::Int64 => D::I64,
            Kind::Int => D::I32,
            Kind::Int8 => D::I8,
            Kind::Uint8 => D::U8,
            Kind::Bool => D::BOOL,
            k => bail!("cannot save a tensor of kind {k:?}"),
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        if numel > 0 {
            t.f_copy_data_u8(&mut data, numel)?;
        }
        Ok(TensorBytes { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
