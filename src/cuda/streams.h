// CUDA streams through c10's device-generic interface (no CUDA headers), shared by
// src/cuda/*.cpp: side streams taken once from torch's pool, and one stream waiting for another.
#pragma once
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <map>
#include <mutex>
#include <utility>

inline const c10::impl::DeviceGuardImplInterface* ftscript_cuda() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

// The side streams of ftscript's uses, each with its own stream on every GPU (a use's work never
// queues behind another's).
enum class SideUse { Offload, Lora };

// `use`'s side stream on GPU `d`, taken from torch's pool the first time.
inline c10::Stream ftscript_side_stream(c10::Device d, SideUse use) {
  static std::mutex m;
  static std::map<std::pair<int, int>, c10::Stream> streams;
  std::lock_guard<std::mutex> lock(m);
  const std::pair<int, int> key{(int)use, (int)d.index()};
  auto it = streams.find(key);
  if (it == streams.end()) it = streams.emplace(key, ftscript_cuda()->getStreamFromGlobalPool(d, false)).first;
  return it->second;
}

// `to` waits for the work queued so far on `from`.
inline void ftscript_after(const c10::Stream& from, const c10::Stream& to) {
  c10::Event e(c10::DeviceType::CUDA);
  e.record(from);
  e.block(to);
}
