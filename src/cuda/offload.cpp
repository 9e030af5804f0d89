// Moving activations between a GPU and pinned host memory on a side stream, overlapped with the
// compute on torch's current stream (for gradient checkpointing with the checkpoints kept in host
// memory). Device-generic c10 interfaces only: no CUDA headers. Errors come back as text.
#include <ATen/ATen.h>
#include "guarded.h"
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdio>
#include <map>
#include <mutex>

namespace {
const c10::impl::DeviceGuardImplInterface* cuda() { return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA); }

// One side stream per GPU, taken once from torch's pool.
c10::Stream side_stream(c10::Device d) {
  static std::mutex m;
  static std::map<int, c10::Stream> streams;
  std::lock_guard<std::mutex> lock(m);
  auto it = streams.find(d.index());
  if (it == streams.end()) it = streams.emplace(d.index(), cuda()->getStreamFromGlobalPool(d, false)).first;
  return it->second;
}

// `to` (on `side`) waits for the work queued so far on `from`.
void after(const c10::Stream& from, const c10::Stream& to) {
  c10::Event e(c10::DeviceType::CUDA);
  e.record(from);
  e.block(to);
}
}  // namespace

// Copies GPU tensor `t` into new pinned host memory on the side stream, once the current
// stream has produced it; `t`'s memory is not reused before the copy is done.
extern "C" int ftscript_offload(const at::Tensor* t, at::Tensor** host, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::Device d = t->device();
    c10::Stream main = cuda()->getStream(d), side = side_stream(d);
    at::Tensor h = at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true));
    after(main, side);
    {
      c10::StreamGuard guard(side);
      h.copy_(*t, /*non_blocking=*/true);
    }
    cuda()->recordDataPtrOnStream(t->storage().data_ptr(), side);
    *host = new at::Tensor(h);
  });
}

// Starts copying `host` (from ftscript_offload) back to GPU `device` on the side stream; the
// tensor may be used once ftscript_prefetch_wait(*event) was called.
extern "C" int ftscript_prefetch(const at::Tensor* host, int device, at::Tensor** out, void** event, char* err,
                                 size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    c10::Stream main = cuda()->getStream(d), side = side_stream(d);
    at::Tensor t = at::empty(host->sizes(), host->options().device(d).pinned_memory(false));
    after(main, side);  // t's memory is free in the current stream's order
    {
      c10::StreamGuard guard(side);
      t.copy_(*host, /*non_blocking=*/true);
    }
    auto* done = new c10::Event(c10::DeviceType::CUDA);
    done->record(side);
    *out = new at::Tensor(t);
    *event = done;
  });
}

// The current stream waits for a prefetch to land; frees the event.
extern "C" int ftscript_prefetch_wait(void* event, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    auto* done = static_cast<c10::Event*>(event);
    done->block(cuda()->getStream(done->device()));
    delete done;
  });
}

// Starts copying GPU tensor `t` into new pinned host memory on the current stream, after the
// work queued so far; `*event` marks the copy's end (ftscript_host_wait).
extern "C" int ftscript_to_host(const at::Tensor* t, at::Tensor** host, void** event, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    at::Tensor h = at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true));
    h.copy_(*t, /*non_blocking=*/true);
    auto* done = new c10::Event(c10::DeviceType::CUDA);
    done->record(cuda()->getStream(t->device()));
    *host = new at::Tensor(h);
    *event = done;
  });
}

// Blocks the host until the copy of ftscript_to_host has landed; frees the event.
extern "C" int ftscript_host_wait(void* event, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    auto* done = static_cast<c10::Event*>(event);
    done->synchronize();
    delete done;
  });
}
