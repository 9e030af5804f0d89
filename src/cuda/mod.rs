//! What ftscript adds to libtorch in C++ (`src/cuda/*.cpp`): CUDA memory statistics from
//! PyTorch's caching allocator (`memory.cpp`), measured the way `torch.cuda.memory_allocated` /
//! `max_memory_allocated` measure them; ftscript's own kernels ([`kernels`]), fused training ops
//! with their backward ([`autograd`]); the profiler ([`profile`]).

pub mod autograd;
pub mod kernels;
pub mod profile;

extern "C" {
    fn ftscript_cuda_allocated(device: i32) -> i64;
    fn ftscript_cuda_peak_allocated(device: i32) -> i64;
    fn ftscript_cuda_reset_peak(device: i32) -> i64;
    fn ftscript_cuda_mem_info(device: i32, free: *mut i64, total: *mut i64) -> i64;
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

/// `(free, total)` bytes of device memory as the driver reports them (None off CUDA).
pub fn mem_info(device: tch::Device) -> Option<(u64, u64)> {
    let i = index(device)?;
    let (mut free, mut total) = (0i64, 0i64);
    let rc = unsafe { ftscript_cuda_mem_info(i, &mut free, &mut total) };
    (rc == 0).then_some((free as u64, total as u64))
}
