//! What ftscript adds to libtorch in C++ (`src/cuda/*.cpp`): CUDA memory statistics from
//! PyTorch's caching allocator (`memory.cpp`), measured the way `torch.cuda.memory_allocated` /
//! `max_memory_allocated` measure them; ftscript's own kernels ([`kernels`]), fused training ops
//! with their backward ([`autograd`]); the profiler ([`profile`]).

pub mod autograd;
pub mod graph;
pub mod kernels;
pub mod profile;

extern "C" {
    fn ftscript_cuda_allocated(device: i32) -> i64;
    fn ftscript_cuda_peak_allocated(device: i32) -> i64;
    fn ftscript_cuda_reset_peak(device: i32) -> i64;
    fn ftscript_cuda_mem_info(device: i32, free: *mut i64, total: *mut i64) -> i64;
    fn ftscript_cuda_empty_cache() -> i64;
    fn ftscript_cuda_set_memory_fraction(device: i32, fraction: f64) -> i64;
    fn ftscript_cuda_set_allocator_settings(settings: *const std::ffi::c_char) -> i64;
}

fn index(device: tch::Device) -> Option<i32> {
    match device {
        tch::Device::Cuda(i) if tch::Cuda::is_available() => Some(i as i32),
        _ => None,
    }
}

/// Bytes currently allocated by tensors on `device` (None off CUDA).
pub fn allocated(device: tch::Device) -> Option<u64> {
    index(device).map(|i| unsafe { ftscript_cuda_allocated(i) }).filter(|&b| b >= 0).map(|b| b as u64)
}

/// The most bytes allocated at once since start or the last `reset_peak`.
pub fn peak_allocated(device: tch::Device) -> Option<u64> {
    index(device).map(|i| unsafe { ftscript_cuda_peak_allocated(i) }).filter(|&b| b >= 0).map(|b| b as u64)
}

pub fn reset_peak(device: tch::Device) {
    if let Some(i) = index(device) {
        unsafe { ftscript_cuda_reset_peak(i) };
    }
}

/// Hands the caching allocator's unused blocks back to the driver (`torch.cuda.empty_cache`).
pub fn empty_cache() {
    if tch::Cuda::is_available() {
        unsafe { ftscript_cuda_empty_cache() };
    }
}

/// `(free, total)` bytes of device memory as the driver reports them (None off CUDA).
pub fn mem_info(device: tch::Device) -> Option<(u64, u64)> {
    let i = index(device)?;
    let (mut free, mut total) = (0i64, 0i64);
    let rc = unsafe { ftscript_cuda_mem_info(i, &mut free, &mut total) };
    (rc == 0).then_some((free as u64, total as u64))
}

/// Caps the caching allocator on `device` at `bytes` until the returned guard drops: past the
/// cap an allocation frees cached blocks, then fails as out of memory. Off CUDA it does nothing.
/// While the cap holds the allocator grows and shrinks its segments in place (PyTorch's
/// `expandable_segments`), so what it reserves stays near what tensors take, unless the user set
/// `PYTORCH_CUDA_ALLOC_CONF`.
pub fn limit_memory(device: tch::Device, bytes: u64) -> anyhow::Result<MemoryCap> {
    let (Some(i), Some((_, total))) = (index(device), mem_info(device)) else { return Ok(MemoryCap(None)) };
    let fraction = (bytes as f64 / total as f64).min(1.0);
    match unsafe { ftscript_cuda_set_memory_fraction(i, fraction) } {
        0 => {
            let mut caps = LIVE_CAPS.lock().unwrap_or_else(|e| e.into_inner());
            if *caps == 0 {
                set_allocator_settings(c"expandable_segments:True");
            }
            *caps += 1;
            Ok(MemoryCap(Some(i)))
        }
        -2 => anyhow::bail!("this ftscript was built without CUDA's headers, so it cannot cap the GPU memory it uses (memory_budget); rebuild after scripts/setup.sh"),
        _ => anyhow::bail!("could not cap the CUDA caching allocator on {device:?} at {fraction:.3} of its memory"),
    }
}

/// Sets the caching allocator's options (`PYTORCH_CUDA_ALLOC_CONF`'s syntax), unless the user
/// set that variable: theirs stand.
fn set_allocator_settings(settings: &std::ffi::CStr) {
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() && unsafe { ftscript_cuda_set_allocator_settings(settings.as_ptr()) } != 0 {
        tracing::debug!("could not set the CUDA caching allocator's {settings:?}");
    }
}

/// How many [`MemoryCap`]s hold: the allocator's settings are process-wide while caps are per
/// device, so expandable segments go off only when the last cap drops.
static LIVE_CAPS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// A cap of [`limit_memory`]; dropping it lifts the cap, and the last one to drop turns
/// expandable segments off again.
pub struct MemoryCap(Option<i32>);

impl Drop for MemoryCap {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            unsafe { ftscript_cuda_set_memory_fraction(i, 1.0) };
            let mut caps = LIVE_CAPS.lock().unwrap_or_else(|e| e.into_inner());
            *caps -= 1;
            if *caps == 0 {
                set_allocator_settings(c"expandable_segments:False");
            }
        }
    }
}

extern "C" {
    fn ftscript_offload(t: *const torch_sys::C_tensor, host: *mut *mut torch_sys::C_tensor, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_prefetch(host: *const torch_sys::C_tensor, device: i32, out: *mut *mut torch_sys::C_tensor, event: *mut *mut std::ffi::c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_prefetch_wait(event: *mut std::ffi::c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_to_host(t: *const torch_sys::C_tensor, host: *mut *mut torch_sys::C_tensor, event: *mut *mut std::ffi::c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_pin_memory(t: *const torch_sys::C_tensor, out: *mut *mut torch_sys::C_tensor, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_host_wait(event: *mut std::ffi::c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
}

/// The NUL-terminated message a C entry point wrote into `err`.
pub(crate) fn message(err: &[u8]) -> String {
    String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(err.len())]).to_string()
}

/// Runs a C entry point of `src/cuda/*.cpp` that returns non-zero with a message on failure.
pub(crate) fn call(what: &str, f: impl FnOnce(*mut std::ffi::c_char, usize) -> i32) -> anyhow::Result<()> {
    let mut err = vec![0u8; 4096];
    if f(err.as_mut_ptr() as *mut std::ffi::c_char, err.len()) != 0 {
        anyhow::bail!("{what}: {}", message(&err));
    }
    Ok(())
}

/// A GPU tensor kept in pinned host memory ([`offload`]) until it is needed again.
pub struct Offloaded {
    host: tch::Tensor,
    device: usize,
}

/// A tensor on its way back to the GPU ([`Offloaded::prefetch`]).
pub struct Prefetch {
    tensor: tch::Tensor,
    event: *mut std::ffi::c_void,
}

/// Copies GPU tensor `t` to pinned host memory on a side stream, overlapping the compute that
/// follows; `t`'s device memory is released once the copy is done (if nothing else holds it).
pub fn offload(t: &tch::Tensor) -> anyhow::Result<Offloaded> {
    let tch::Device::Cuda(device) = t.device() else { anyhow::bail!("offload: {:?} is not a GPU", t.device()) };
    let mut host = std::ptr::null_mut();
    // SAFETY: `t` is live for the call; `host` comes back allocated with `new`, owned below.
    call("offload", |err, len| unsafe { ftscript_offload(t.as_ptr(), &mut host, err, len) })?;
    Ok(Offloaded { host: unsafe { tch::Tensor::from_ptr(host) }, device })
}

impl Offloaded {
    /// Starts the copy back to the GPU on the side stream.
    pub fn prefetch(&self) -> anyhow::Result<Prefetch> {
        let (mut out, mut event) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the host tensor is live; `out` and `event` come back owned by the result.
        call("prefetch", |err, len| unsafe { ftscript_prefetch(self.host.as_ptr(), self.device as i32, &mut out, &mut event, err, len) })?;
        Ok(Prefetch { tensor: unsafe { tch::Tensor::from_ptr(out) }, event })
    }
}

impl Prefetch {
    /// The tensor, once the current stream has waited for the copy.
    pub fn wait(self) -> anyhow::Result<tch::Tensor> {
        // SAFETY: the event came from ftscript_prefetch and is freed by this call, once.
        call("prefetch", |err, len| unsafe { ftscript_prefetch_wait(self.event, err, len) })?;
        Ok(self.tensor)
    }
}

/// Host tensor `t` on `device`. To a GPU through pinned memory, in the stream's order: the host
/// does not wait for the work queued before, as a copy from pageable memory would.
pub fn upload(t: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    if device.is_cuda() && !t.device().is_cuda() {
        let mut pinned = std::ptr::null_mut();
        // SAFETY: `t` is live for the call; `pinned` comes back allocated with `new`, owned below.
        match call("pin_memory", |err, len| unsafe { ftscript_pin_memory(t.as_ptr(), &mut pinned, err, len) }) {
            Ok(()) => unsafe { tch::Tensor::from_ptr(pinned) }.to_device_(device, t.kind(), true, false),
            Err(_) => t.to_device(device),
        }
    } else {
        t.to_device(device)
    }
}

/// A GPU tensor on its way to pinned host memory, copied in the current stream's order: reading
/// it waits for the work queued before the copy, not for what was queued after.
pub struct HostCopy {
    host: tch::Tensor,
    event: Option<std::ptr::NonNull<std::ffi::c_void>>,
}

/// Starts copying `t` to the host ([`HostCopy::wait`] for it); a CPU tensor is kept as is.
pub fn to_host(t: &tch::Tensor) -> anyhow::Result<HostCopy> {
    if !t.device().is_cuda() {
        return Ok(HostCopy { host: t.shallow_clone(), event: None });
    }
    let (mut host, mut event) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: `t` is live for the call; `host` and `event` come back owned by the result.
    call("to_host", |err, len| unsafe { ftscript_to_host(t.as_ptr(), &mut host, &mut event, err, len) })?;
    Ok(HostCopy { host: unsafe { tch::Tensor::from_ptr(host) }, event: std::ptr::NonNull::new(event) })
}

impl HostCopy {
    /// The host tensor, once the copy has landed.
    pub fn wait(mut self) -> anyhow::Result<tch::Tensor> {
        if let Some(e) = self.event.take() {
            // SAFETY: the event came from ftscript_to_host and is freed by this call, once.
            call("to_host", |err, len| unsafe { ftscript_host_wait(e.as_ptr(), err, len) })?;
        }
        Ok(self.host.shallow_clone())
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        if let Some(e) = self.event.take() {
            // SAFETY: as in `wait`; a copy never waited for is waited for here, freeing its event.
            let _ = call("to_host", |err, len| unsafe { ftscript_host_wait(e.as_ptr(), err, len) });
        }
    }
}
