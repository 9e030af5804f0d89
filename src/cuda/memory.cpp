// CUDA caching-allocator statistics (what torch.cuda.memory_allocated / max_memory_allocated
// report), which tch does not bind. Every entry point catches C++ exceptions and returns -1.
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

namespace {
const size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
// The CUDA caching allocator, through c10's device-generic interface (no CUDA headers needed).
c10::DeviceAllocator* cuda() { return c10::getDeviceAllocator(c10::DeviceType::CUDA); }
}

extern "C" int64_t ftscript_cuda_allocated(int device) {
  try {
    return cuda()->getDeviceStats(device).allocated_bytes[kAggregate].current;
  } catch (...) {
    return -1;
  }
}

extern "C" int64_t ftscript_cuda_peak_allocated(int device) {
  try {
    return cuda()->getDeviceStats(device).allocated_bytes[kAggregate].peak;
  } catch (...) {
    return -1;
  }
}

extern "C" int64_t ftscript_cuda_reset_peak(int device) {
  try {
    cuda()->resetPeakStats(device);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Returns the caching allocator's unused blocks to the driver (torch.cuda.empty_cache), as after
// an out-of-memory error, so that a retry with less starts from a clean pool.
extern "C" int64_t ftscript_cuda_empty_cache() {
  try {
    cuda()->emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Free and total device memory (cudaMemGetInfo), looked up at run time in the CUDA runtime that
// libtorch_cuda already loaded, so no CUDA headers or extra link step are needed.
#include <dlfcn.h>
#include <cstddef>

extern "C" int64_t ftscript_cuda_mem_info(int device, int64_t* free_bytes, int64_t* total_bytes) {
  using SetDevice = int (*)(int);
  using MemGetInfo = int (*)(size_t*, size_t*);
  auto set_device = reinterpret_cast<SetDevice>(dlsym(RTLD_DEFAULT, "cudaSetDevice"));
  auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
  if (!set_device || !mem_get_info) return -1;
  if (set_device(device) != 0) return -1;
  size_t f = 0, t = 0;
  if (mem_get_info(&f, &t) != 0) return -1;
  *free_bytes = static_cast<int64_t>(f);
  *total_bytes = static_cast<int64_t>(t);
  return 0;
}

// Caps what the caching allocator may hold on `device` at `fraction` of its memory
// (torch.cuda.set_per_process_memory_fraction): past it, an allocation first frees cached blocks,
// then fails as out of memory. Needs CUDA's headers (pip's nvidia-cuda-runtime, installed with
// torch); built without them, it answers -2.
#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && __has_include(<cuda_runtime_api.h>)
#include <c10/cuda/CUDACachingAllocator.h>
extern "C" int64_t ftscript_cuda_set_memory_fraction(int device, double fraction) {
  try {
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
#else
extern "C" int64_t ftscript_cuda_set_memory_fraction(int, double) { return -2; }
#endif

// Sets the caching allocators' options at run time, in PYTORCH_CUDA_ALLOC_CONF's syntax
// (torch.cuda.memory._set_allocator_settings), e.g. "expandable_segments:True".
#include <c10/core/AllocatorConfig.h>
#include <string>
extern "C" int64_t ftscript_cuda_set_allocator_settings(const char* settings) {
  try {
    c10::CachingAllocator::setAllocatorSettings(std::string(settings));
    return 0;
  } catch (...) {
    return -1;
  }
}
