//! ftscript's own CUDA kernels (`src/cuda/kernels.cu`), compiled at run time by NVRTC for the
//! GPU in use and launched on torch's current stream (`src/cuda/rtc.cpp`). Each wrapper returns
//! `None` when the tensors are not on a GPU or the kernels cannot be built (no libnvrtc: the
//! reason is logged once), and the caller falls back to libtorch ops with the same results.

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

pub(super) const SOURCE: &str = concat!(include_str!("kernels.cu"), "\0");

extern "C" {
    fn ftscript_rtc_compile(src: *const c_char, arch: i32, err: *mut c_char, err_len: usize) -> i64;
    fn ftscript_rtc_launch(src: *const c_char, device: i32, name: *const c_char, grid: u32, block: u32, params: *mut *mut c_void, programmatic: i32, err: *mut c_char, err_len: usize) -> i32;
}

static DISABLED: AtomicBool = AtomicBool::new(false);
static REASON: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Why the kernels are not in use, once a launch failed.
pub fn unavailable_reason() -> Option<String> {
    REASON.lock().unwrap().clone()
}

/// Runs `call` (a C entry point that writes an error message and returns non-zero on failure)
/// unless the kernels are known to be unavailable (or `FTSCRIPT_KERNELS=0` turns them off); on
/// failure logs the reason once, and from then on every caller falls back to libtorch ops. True
/// if it ran. Running out of memory is no reason to give the kernels up: that call falls back
/// alone (and the ops, short of memory too, raise the error the trainer handles).
pub(super) fn checked(call: impl FnOnce(*mut c_char, usize) -> i32) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if DISABLED.load(Ordering::Relaxed) || *OFF.get_or_init(|| std::env::var("FTSCRIPT_KERNELS").is_ok_and(|v| v == "0")) {
        return false;
    }
    let mut err = vec![0u8; 4096];
    if call(err.as_mut_ptr() as *mut c_char, err.len()) != 0 {
        let msg = super::message(&err);
        if msg.contains("out of memory") {
            return false;
        }
        tracing::warn!("CUDA kernels unavailable, using libtorch ops instead: {msg}");
        *REASON.lock().unwrap() = Some(msg);
        DISABLED.store(true, Ordering::Relaxed);
        return false;
    }
    true
}

/// Launches `name` over `threads` threads (blocks of 256) on GPU `device`; false if the
/// kernels are unavailable.
fn launch(device: usize, name: &str, threads: i64, params: &mut [*mut c_void]) -> bool {
    if threads <= 0 {
        return false;
    }
    let block = 256i64;
    let grid = (threads + block - 1) / block;
    let name_c = CString::new(name).unwrap();
    // SAFETY: params point at live argument values matching the kernel's signature; the
    // tensors they reference outlive the launch (stream-ordered by the caching allocator).
    checked(|err, len| unsafe { ftscript_rtc_launch(SOURCE.as_ptr() as *const c_char, device as i32, name_c.as_ptr(), grid as u32, block as u32, params.as_mut_ptr(), 0, err, len) })
}

/// Compiles the kernels for compute capability `arch` (e.g. 90) without a GPU: the cubin's
/// size in bytes, or NVRTC's error.
pub fn compile_check(arch: i32) -> Result<usize, String> {
    let mut err = vec![0u8; 8192];
    // SAFETY: SOURCE is NUL-terminated; err is writable for its length.
    let n = unsafe { ftscript_rtc_compile(SOURCE.as_ptr() as *const c_char, arch, err.as_mut_ptr() as *mut c_char, err.len()) };
    if n < 0 {
        return Err(super::message(&err));
    }
    Ok(n as usize)
}

fn ptr<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// 4-bit dequantization in one pass: `out[i] = code[nibble i] · absmax[i / blocksize]` (fp32,
/// then cast to `kind`), from `packed` (uint8, two codes per byte, high nibble first), `absmax`
/// (fp32 per block) and `code` (16 fp32 values), all on one GPU. Bit-identical to the op path
/// of [`crate::nn::quant::Quant4::dequantize`].
pub fn dequant4(packed: &Tensor, absmax: &Tensor, code: &Tensor, n: i64, blocksize: i64, kind: Kind) -> Option<Tensor> {
    let Device::Cuda(d) = packed.device() else { return None };
    let name = match kind {
        Kind::BFloat16 => "dequant4_bf16",
        Kind::Half => "dequant4_f16",
        Kind::Float => "dequant4_f32",
        _ => return None,
    };
    let (packed, absmax, code) = (packed.contiguous(), absmax.contiguous(), code.contiguous());
    let out = Tensor::empty([n], (kind, packed.device()));
    let (mut p, mut a, mut c, mut o) = (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr());
    let (mut n_, mut bs) = (n, blocksize as i32);
    let mut params = [ptr(&mut p), ptr(&mut a), ptr(&mut c), ptr(&mut o), ptr(&mut n_), ptr(&mut bs)];
    launch(d, name, (n + 7) / 8, &mut params).then_some(out)
}

/// Cross-entropy of `logits` `[n, V]` (contiguous, on a GPU) against `target` `[n]` (-100: no
/// loss) in one kernel: the summed loss (fp32 scalar), and `weight · (softmax(z) − onehot(target))`
/// (zero on ignored rows) written over `logits`. The same fp32 math as the ops of
/// [`crate::nn::loss::cross_entropy_with_grad`] in two passes over the row instead of ~15,
/// with no fp32 copy. `None` (nothing written) where it cannot run.
pub fn cross_entropy_grad_(logits: &Tensor, target: &Tensor, weight: f64) -> Option<Tensor> {
    let Device::Cuda(d) = logits.device() else { return None };
    let name = match logits.kind() {
        Kind::BFloat16 => "cross_entropy_bf16",
        Kind::Half => "cross_entropy_f16",
        Kind::Float => "cross_entropy_f32",
        _ => return None,
    };
    let (n, vocab) = logits.size2().ok()?;
    if !logits.is_contiguous() || vocab >= 1 << 31 {
        return None;
    }
    let target = target.to_kind(Kind::Int64).contiguous();
    let loss = Tensor::empty([n], (Kind::Float, logits.device()));
    let row_bytes = vocab * logits.kind().elt_size_in_bytes() as i64;
    let mut vec = (row_bytes % 16 == 0 && (logits.data_ptr() as usize).is_multiple_of(16)) as i32;
    let (mut z, mut t, mut l) = (logits.data_ptr(), target.data_ptr(), loss.data_ptr());
    let (mut v, mut w) = (vocab as i32, weight as f32);
    let mut params = [ptr(&mut z), ptr(&mut t), ptr(&mut l), ptr(&mut v), ptr(&mut w), ptr(&mut vec)];
    // one block (kernels.cu's CE_THREADS = 256 threads) per row
    launch(d, name, n * 256, &mut params).then(|| loss.sum(Kind::Float))
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles for the GPUs we run on (Ampere, Hopper), with the NVRTC that
    /// ships beside torch's CUDA runtime, on a machine without a GPU.
    #[test]
    fn kernels_compile_for_turing_ampere_and_hopper() {
        for arch in [75, 80, 90] {
            let size = super::compile_check(arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            assert!(size > 1000, "sm_{arch}: cubin of {size} bytes");
        }
    }
}
