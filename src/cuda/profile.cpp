// libtorch's Kineto profiler (what `torch.profiler` drives in Python) over a stretch of
// training: CPU ops and, with CUPTI, every CUDA kernel and copy. `stop` writes the Chrome trace
// (the format of `torch.profiler`'s `export_chrome_trace`) and returns the GPU activities as
// text lines `duration_ns \t name` for a summary. Errors come back as text.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdio>
#include <cstring>
#include <set>
#include <string>

namespace {
namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}
}  // namespace

extern "C" int ftscript_profile_start(int cuda, char* err, size_t err_len) {
  try {
    // with the ops' input shapes (a trace then tells which GEMM a kernel computed)
    ProfilerConfig config(ProfilerState::KINETO, true);
    prof::prepareProfiler(config, activities(cuda));
    prof::enableProfiler(config, activities(cuda));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  }
  return -1;
}

// Stops profiling, saves the trace to `path`, and returns (malloc'd, for ftscript_free_text) the
// device activities, one `duration_ns\tname` line each; NULL with `err` set on failure.
extern "C" char* ftscript_profile_stop(const char* path, char* err, size_t err_len) {
  try {
    auto result = prof::disableProfiler();
    std::string lines;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      lines += std::to_string(e.durationNs()) + "\t" + e.name() + "\n";
    }
    result->save(path);
    char* out = static_cast<char*>(std::malloc(lines.size() + 1));
    std::memcpy(out, lines.c_str(), lines.size() + 1);
    return out;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  }
  return nullptr;
}

extern "C" void ftscript_free_text(char* text) { std::free(text); }
