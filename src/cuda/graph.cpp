// CUDA graphs (torch.cuda.CUDAGraph): a sequence of kernels recorded once and replayed with one
// launch. Recording runs on a side stream; what the recorded ops allocate comes from the graph's
// private memory pool and stays valid (and is rewritten) at each replay. Needs CUDA's headers
// (pip's nvidia-cuda-runtime, installed with torch); built without them, `ftscript_graph_new`
// answers with an error.
#include "guarded.h"
#include "streams.h"

#include <cstdint>
#include <stdexcept>

#if __has_include(<ATen/cuda/CUDAGraph.h>) && __has_include(<cuda_runtime_api.h>)
#include <ATen/cuda/CUDAGraph.h>

#include <dlfcn.h>
#include <optional>

namespace {
// The streams go through c10's device-generic interface (streams.h): CUDA's stream guard
// would call the CUDA runtime directly, which this binary does not link.
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::Stream stream;
  // the stream that was current before `ftscript_graph_enter`
  std::optional<c10::Stream> previous;
  bool capturing = false;
  explicit Graph(int device)
      : stream(ftscript_cuda()->getStreamFromGlobalPool(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)), false)) {}
};

// Clears the error a failed capture leaves behind, so that the next checked CUDA call does not
// report it as its own (cudaGetLastError, looked up in the runtime libtorch_cuda loaded).
void clear_cuda_error() {
  using GetLastError = int (*)();
  if (auto f = reinterpret_cast<GetLastError>(dlsym(RTLD_DEFAULT, "cudaGetLastError"))) f();
}
}  // namespace

// A graph for GPU `device`, with its own side stream.
extern "C" int ftscript_graph_new(int device, void** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] { *out = new Graph(device); });
}

// Makes the graph's stream current (after the work queued so far on the current stream): ops
// from here on run there, eagerly until `ftscript_graph_begin`, recorded after it.
extern "C" int ftscript_graph_enter(void* g, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    auto* graph = static_cast<Graph*>(g);
    if (graph->previous) throw std::runtime_error("internal: the graph's stream is current already");
    ftscript_cuda()->synchronizeStream(ftscript_cuda()->getStream(graph->stream.device()));
    graph->previous = ftscript_cuda()->exchangeStream(graph->stream);
  });
}

extern "C" int ftscript_graph_begin(void* g, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    auto* graph = static_cast<Graph*>(g);
    if (!graph->previous) throw std::runtime_error("internal: capture begun off the graph's stream");
    graph->graph.capture_begin();
    graph->capturing = true;
  });
}

// Ends the recording (`ok`: keep it; otherwise it is dropped, as after an op that failed while
// recording) and goes back to the stream that was current before `ftscript_graph_enter`, once
// the graph's stream is idle.
extern "C" int ftscript_graph_end(void* g, int ok, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    auto* graph = static_cast<Graph*>(g);
    std::optional<std::string> failure;
    if (graph->capturing) {
      graph->capturing = false;
      try {
        graph->graph.capture_end();
      } catch (const std::exception& e) {
        failure = e.what();
      }
      if (!ok || failure) {
        clear_cuda_error();
        try {
          graph->graph.reset();
        } catch (...) {
        }
      }
    }
    if (graph->previous) {
      ftscript_cuda()->synchronizeStream(graph->stream);
      ftscript_cuda()->exchangeStream(*graph->previous);
      graph->previous.reset();
    }
    if (failure && ok) throw std::runtime_error(*failure);
  });
}

// Replays the recorded kernels on the current stream.
extern "C" int ftscript_graph_replay(void* g, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] { static_cast<Graph*>(g)->graph.replay(); });
}

extern "C" void ftscript_graph_free(void* g) {
  try {
    delete static_cast<Graph*>(g);
  } catch (...) {
  }
}
#else
extern "C" int ftscript_graph_new(int, void**, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [] { throw std::runtime_error("this ftscript was built without CUDA's headers: no CUDA graphs"); });
}
extern "C" int ftscript_graph_enter(void*, char*, size_t) { return -1; }
extern "C" int ftscript_graph_begin(void*, char*, size_t) { return -1; }
extern "C" int ftscript_graph_end(void*, int, char*, size_t) { return -1; }
extern "C" int ftscript_graph_replay(void*, char*, size_t) { return -1; }
extern "C" void ftscript_graph_free(void*) {}
#endif
