// A small C ABI over PyTorch's c10d: TCPStore rendezvous and a process group (Gloo on CPU,
// NCCL on CUDA when built with USE_C10D_NCCL). Every entry point catches every C++ exception
// and returns it as a malloc'ed error string (freed with ftd_free_string); 0 means success.
//
// Tensors arrive as `at::Tensor*`, the pointer behind a tch `Tensor`.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  bool cuda;
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception in c10d");
  }
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("collective timed out");
  }
}

}  // namespace

extern "C" {

void ftd_free_string(char* s) { std::free(s); }

// Rendezvous at host:port and create the process group. `store_is_client`: connect to an
// existing store (torchrun's agent store) instead of hosting one on rank 0. `prefix`: key prefix
// in the store (torchrun's agent store is shared with the agent). `device_index` < 0: Gloo on
// CPU; otherwise NCCL on cuda:device_index.
char* ftd_init(const char* host, int port, int rank, int world, int store_is_client, const char* prefix,
               int device_index, long long timeout_ms, void** out) {
  *out = nullptr;
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = !store_is_client && rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    opts.multiTenant = store_is_client;
    c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto g = new Group{store, {}, timeout, device_index >= 0};
    try {
      if (device_index < 0) {
        auto o = c10d::ProcessGroupGloo::Options::create(timeout);
        const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
        if (ifname && *ifname) {
          o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
        } else {
          o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
        }
        g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
      } else {
#ifdef USE_C10D_NCCL
        c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
        auto o = c10d::ProcessGroupNCCL::Options::create();
        o->timeout = timeout;
        auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
        pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
        g->backend = pg;
#else
        throw std::runtime_error(
            "this ftscript was built without NCCL (its headers were not found); rebuild after scripts/setup.sh installs them, or set FTSCRIPT_DIST_BACKEND=gloo");
#endif
      }
    } catch (...) {
      delete g;
      throw;
    }
    *out = g;
  });
}

void ftd_destroy(void* h) {
  if (!h) return;
  auto g = static_cast<Group*>(h);
  try {
    delete g;
  } catch (...) {
  }
}

// In-place sum over ranks.
char* ftd_all_reduce_sum(void* h, void* tensor) {
  return guarded([&] {
    auto g = static_cast<Group*>(h);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    wait(g->backend->allreduce(ts, o), g->timeout);
  });
}

// In-place broadcast from `root`.
char* ftd_broadcast(void* h, void* tensor, int root) {
  return guarded([&] {
    auto g = static_cast<Group*>(h);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    wait(g->backend->broadcast(ts, o), g->timeout);
  });
}

// Blocks until every rank reaches it.
char* ftd_barrier(void* h) {
  return guarded([&] {
    auto g = static_cast<Group*>(h);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g->backend->barrier(o), g->timeout);
  });
}

}  // extern "C"
