//! libtorch's profiler (Kineto, what `torch.profiler` drives) over chosen training steps
//! (`train(..., #{profile: #{start: 5, steps: 2}})`) or one generation (`generate(prompts,
//! #{profile: dir})`): a Chrome trace of CPU ops and GPU kernels (open it in Perfetto or
//! `chrome://tracing`), and a summary of GPU time by kind of kernel.

use super::message;
use anyhow::{bail, Result};
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::time::Instant;

extern "C" {
    fn ftscript_profile_start(cuda: i32, err: *mut c_char, err_len: usize) -> i32;
    fn ftscript_profile_stop(path: *const c_char, err: *mut c_char, err_len: usize) -> *mut c_char;
    fn ftscript_free_text(text: *mut c_char);
}

/// A running profile.
pub struct Profiler {
    started: Instant,
}

/// `f` profiled into `dir` (see [`Profiler::finish`]) when a `dir` is given; the profile is
/// written whether `f` succeeds or not, and an error of `f` comes first.
pub fn profiled<T>(dir: Option<&Path>, header: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(dir) = dir else { return f() };
    let running = start(tch::Cuda::is_available())?;
    let result = f();
    let written = running.finish(dir, header);
    let value = result?;
    written?;
    Ok(value)
}

/// Starts recording CPU ops, and GPU activity when `cuda`.
pub fn start(cuda: bool) -> Result<Profiler> {
    let mut err = vec![0u8; 4096];
    // SAFETY: err is writable for its length.
    if unsafe { ftscript_profile_start(cuda as i32, err.as_mut_ptr() as *mut c_char, err.len()) } != 0 {
        bail!("cannot start the profiler: {}", message(&err));
    }
    Ok(Profiler { started: Instant::now() })
}

/// GPU time of the profiled stretch, by kind of kernel and by kernel.
pub struct Summary {
    /// Wall-clock milliseconds between start and stop (the caller synchronizes the GPU first).
    pub wall_ms: f64,
    /// `(kind, milliseconds, launches)`, most time first.
    pub kinds: Vec<(String, f64, usize)>,
    /// `(kernel, milliseconds, launches)`, most time first.
    pub kernels: Vec<(String, f64, usize)>,
}

impl Profiler {
    /// Stops, writes the Chrome trace to `trace`, and summarizes the GPU activity.
    pub fn stop(self, trace: &Path) -> Result<Summary> {
        let wall_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let path = CString::new(trace.to_string_lossy().as_bytes())?;
        let mut err = vec![0u8; 4096];
        // SAFETY: path is NUL-terminated; the returned text is freed below.
        let text = unsafe { ftscript_profile_stop(path.as_ptr(), err.as_mut_ptr() as *mut c_char, err.len()) };
        if text.is_null() {
            bail!("profiler: cannot write {}: {}", trace.display(), message(&err));
        }
        let lines = unsafe { CStr::from_ptr(text) }.to_string_lossy().to_string();
        unsafe { ftscript_free_text(text) };
        let events = lines.lines().filter_map(|l| {
            let (ns, name) = l.split_once('\t')?;
            Some((name.to_string(), ns.parse::<f64>().ok()? / 1e6))
        });
        Ok(Summary::of(wall_ms, events))
    }

    /// Stops once the GPUs are idle and writes `trace.json` and `summary.txt` (headed by
    /// `header`; also logged) into `dir`.
    pub fn finish(self, dir: &Path, header: &str) -> Result<()> {
        for i in 0..tch::Cuda::device_count() {
            tch::Cuda::synchronize(i);
        }
        std::fs::create_dir_all(dir)?;
        let summary = self.stop(&dir.join("trace.json"))?;
        let text = format!("{header}\n{}", summary.table(25));
        crate::nn::weights::write_atomic(&dir.join("summary.txt"), text.as_bytes())?;
        tracing::info!("profile written to {}:\n{text}", dir.display());
        Ok(())
    }
}

/// What a kernel does, from its name (cuBLAS, flash-attention, ATen and ftscript kernels).
pub fn kind_of(kernel: &str) -> &'static str {
    let k = kernel.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| k.contains(w));
    if has(&["swiglu", "rope_", "dequant4", "lora_dx", "decode_linear", "decode_qkv"]) {
        "ftscript fused kernels"
    } else if has(&["flash", "fmha", "attention", "sdpa"]) {
        "attention"
    } else if has(&["gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_"]) {
        "matmul"
    } else if has(&["rms_norm", "rmsnorm"]) {
        "rms norm"
    } else if has(&["softmax", "cross_entropy", "nll_loss"]) {
        "loss"
    } else if has(&["dropout", "fused_dropout"]) {
        "dropout"
    } else if has(&["memcpy", "memset"]) {
        "copies"
    } else if has(&["multi_tensor", "adam", "foreach"]) {
        "optimizer"
    } else if has(&["reduce"]) {
        "reductions"
    } else if has(&["elementwise", "vectorized", "unrolled", "cat", "copy"]) {
        "elementwise"
    } else {
        "other"
    }
}

impl Summary {
    fn of(wall_ms: f64, events: impl Iterator<Item = (String, f64)>) -> Summary {
        let mut kernels: std::collections::HashMap<String, (f64, usize)> = Default::default();
        let mut kinds: std::collections::HashMap<&'static str, (f64, usize)> = Default::default();
        for (name, ms) in events {
            let k = kinds.entry(kind_of(&name)).or_default();
            k.0 += ms;
            k.1 += 1;
            let e = kernels.entry(name).or_default();
            e.0 += ms;
            e.1 += 1;
        }
        let sorted = |m: Vec<(String, (f64, usize))>| {
            let mut v: Vec<(String, f64, usize)> = m.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v
        };
        Summary {
            wall_ms,
            kinds: sorted(kinds.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
            kernels: sorted(kernels.into_iter().collect()),
        }
    }

    /// GPU milliseconds (kernels and copies; overlapping streams would count twice).
    pub fn gpu_ms(&self) -> f64 {
        self.kinds.iter().map(|k| k.1).sum()
    }

    /// The summary as a text table: kinds, then the `top` costliest kernels.
    pub fn table(&self, top: usize) -> String {
        let gpu = self.gpu_ms().max(1e-9);
        let mut s = format!("wall {:.1} ms, GPU busy {:.1} ms ({:.0}%)\n", self.wall_ms, gpu, 100.0 * gpu / self.wall_ms.max(1e-9));
        s += &format!("{:>9} {:>6} {:>8}  kind\n", "ms", "%", "launches");
        for (k, ms, n) in &self.kinds {
            s += &format!("{ms:>9.2} {:>6.1} {n:>8}  {k}\n", 100.0 * ms / gpu);
        }
        s += &format!("{:>9} {:>6} {:>8}  kernel\n", "ms", "%", "launches");
        for (k, ms, n) in self.kernels.iter().take(top) {
            let short: String = k.chars().take(110).collect();
            s += &format!("{ms:>9.2} {:>6.1} {n:>8}  {short}\n", 100.0 * ms / gpu);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_grouped_by_kind() {
        assert_eq!(kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT"), "matmul");
        assert_eq!(kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64"), "matmul");
        assert_eq!(kind_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>"), "attention");
        assert_eq!(kind_of("swiglu_bwd_bf16"), "ftscript fused kernels");
        assert_eq!(kind_of("lora_dx_bf16"), "ftscript fused kernels");
        assert_eq!(kind_of("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>"), "elementwise");
        assert_eq!(kind_of("Memcpy DtoD (Device -> Device)"), "copies");
        let s = Summary::of(10.0, vec![("a_gemm".to_string(), 3.0), ("a_gemm".to_string(), 1.0), ("Memset".to_string(), 1.0)].into_iter());
        assert_eq!(s.kinds[0], ("matmul".to_string(), 4.0, 2));
        assert_eq!(s.gpu_ms(), 5.0);
        assert!(s.table(5).contains("GPU busy 5.0 ms (50%)"), "{}", s.table(5));
    }

    /// On the CPU the profiler still records ops and writes a trace Perfetto can read.
    #[test]
    fn profiles_cpu_ops_into_a_chrome_trace() {
        let dir = tempfile::tempdir().unwrap();
        let p = start(false).unwrap();
        let x = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let _ = x.matmul(&x).sum(tch::Kind::Float);
        let trace = dir.path().join("trace.json");
        let s = p.stop(&trace).unwrap();
        assert_eq!(s.gpu_ms(), 0.0);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        let names: Vec<&str> = json["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(names.iter().any(|n| n.contains("matmul") || n.contains("mm")), "{names:?}");
    }
}
