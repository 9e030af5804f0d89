// Moving activations between a GPU and pinned host memory on a side stream, overlapped with the
// compute on torch's current stream (for gradient checkpointing with the checkpoints kept in host
// memory). Device-generic c10 interfaces only: no CUDA headers. Errors come back as text.
#include <ATen/ATen.h>
#include "guarded.h"
#include "streams.h"
#include <c10/core/StreamGuard.h>

#include <cstdio>

// Copies GPU tensor `t` into new pinned host memory on the side stream, once the current
// stream has produced it; `t`'s memory is not reused before the copy is done.
extern "C" int ftscript_offload(const at::Tensor* t, at::Tensor** host, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::Device d = t->device();
    c10::Stream main = ftscript_cuda()->getStream(d), side = ftscript_side_stream(d, SideUse::Offload);
    at::Tensor h = at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true));
    ftscript_after(main, side);
    {
      c10::StreamGuard guard(side);
      h.copy_(*t, /*non_blocking=*/true);
    }
    ftscript_cuda()->recordDataPtrOnStream(t->storage().data_ptr(), side);
    *host = new at::Tensor(h);
  });
}

// Starts copying `host` (from ftscript_offload) back to GPU `device` on the side stream; the
// tensor may be used once ftscript_prefetch_wait(*event) was called.
extern "C" int ftscript_prefetch(const at::Tensor* host, int device, at::Tensor** out, void** event, char* err,
                                 size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    c10::Stream main = ftscript_cuda()->getStream(d), side = ftscript_side_stream(d, SideUse::Offload);
    at::Tensor t = at::empty(host->sizes(), host->options().device(d).pinned_memory(false));
    ftscript_after(main, side);  // t's memory is free in the current stream's order
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
    done->block(ftscript_cuda()->getStream(done->device()));
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
    done->record(ftscript_cuda()->getStream(t->device()));
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

// A copy of CPU tensor `t` in pinned host memory (`Tensor.pin_memory()` without the device
// argument, which torch 2.11 warns about at each call).
extern "C" int ftscript_pin_memory(const at::Tensor* t, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] { *out = new at::Tensor(t->pin_memory()); });
}
