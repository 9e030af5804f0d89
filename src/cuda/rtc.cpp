// Run-time compiled CUDA kernels: NVRTC (the libnvrtc that ships beside torch's CUDA runtime)
// turns src/cuda/kernels.cu into a cubin for each GPU it is used on; the driver API loads it
// and launches on torch's current stream of that GPU. Everything is looked up with dlopen/dlsym,
// so building needs no CUDA toolkit and a CPU-only machine never touches any of it. Errors
// come back as text; no C++ exception crosses the C boundary.
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <dirent.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace {
typedef int (*nvrtcCreateProgram_t)(void**, const char*, const char*, int, const char* const*, const char* const*);
typedef int (*nvrtcCompileProgram_t)(void*, int, const char* const*);
typedef int (*nvrtcGetSize_t)(void*, size_t*);
typedef int (*nvrtcGetData_t)(void*, char*);
typedef int (*nvrtcDestroyProgram_t)(void**);
typedef int (*cuInit_t)(unsigned);
typedef int (*cuDeviceGet_t)(int*, int);
typedef int (*cuDeviceGetAttribute_t)(int*, int, int);
typedef int (*cuModuleLoadData_t)(void**, const void*);
typedef int (*cuModuleGetFunction_t)(void**, void*, const char*);
typedef int (*cuLaunchKernel_t)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
typedef int (*cuDevicePrimaryCtxRetain_t)(void**, int);
typedef int (*cuCtxGetCurrent_t)(void**);
typedef int (*cuCtxSetCurrent_t)(void*);
// cuda.h's CUlaunchConfig and CUlaunchAttribute, for cuLaunchKernelEx
struct LaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    long long align8;
    int programmatic_stream_serialization;
  } value;
};
struct LaunchConfig {
  unsigned grid[3], block[3], shared;
  void* stream;
  LaunchAttribute* attrs;
  unsigned n_attrs;
};
typedef int (*cuLaunchKernelEx_t)(const LaunchConfig*, void*, void**, void**);
const int kProgrammaticStreamSerialization = 6;  // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

struct Api {
  nvrtcCreateProgram_t create;
  nvrtcCompileProgram_t compile;
  nvrtcGetSize_t log_size, cubin_size;
  nvrtcGetData_t log, cubin;
  nvrtcDestroyProgram_t destroy;
  cuInit_t init;
  cuDeviceGet_t device_get;
  cuDeviceGetAttribute_t attribute;
  cuModuleLoadData_t load;
  cuModuleGetFunction_t function;
  cuLaunchKernel_t launch;
  cuLaunchKernelEx_t launch_ex;  // null on a driver before CUDA 12
  cuDevicePrimaryCtxRetain_t primary_ctx;
  cuCtxGetCurrent_t get_ctx;
  cuCtxSetCurrent_t set_ctx;
};

const char* const kNvrtcNames[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};

std::mutex mutex;
std::string load_error;
Api* api = nullptr;
bool tried = false;
std::map<int, void*> modules;                        // device → module
std::map<int, void*> contexts;                       // device → its primary context
std::map<std::pair<int, std::string>, void*> funcs;  // (device, kernel) → function
std::map<int, int> archs;                            // device → compute capability, major·10 + minor

// libnvrtc sits beside the libcudart that libtorch_cuda loaded (torch's pip wheels keep both
// in nvidia/cu13/lib); fall back to the loader's search path. NVRTC opens its builtins library
// by name, which that directory is not on: load it first by its full path.
void* open_nvrtc() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto at = line.find('/');
    auto lib = line.find("libcudart.so");
    if (at == std::string::npos || lib == std::string::npos) continue;
    std::string dir = line.substr(at, lib - at);
    if (DIR* d = opendir(dir.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name.rfind("libnvrtc-builtins.so.", 0) == 0) dlopen((dir + name).c_str(), RTLD_NOW | RTLD_GLOBAL);
      }
      closedir(d);
    }
    for (const char* name : kNvrtcNames) {
      if (void* h = dlopen((dir + name).c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    }
  }
  for (const char* name : kNvrtcNames) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_GLOBAL)) return h;
  }
  return nullptr;
}

// NVRTC, and the driver unless `compile_only`.
Api* get_api(bool compile_only = false) {
  if (tried) return api;
  void* nvrtc = open_nvrtc();
  void* cuda = compile_only ? nullptr : dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!nvrtc || (!cuda && !compile_only)) {
    tried = true;
    load_error = !nvrtc ? "libnvrtc not found beside libcudart or on the library path" : "libcuda.so.1 (the driver) not found";
    return nullptr;
  }
  Api a;
  bool ok = true;
  auto sym = [&](void* lib, const char* name) {
    void* s = dlsym(lib, name);
    if (!s) {
      ok = false;
      load_error = std::string("missing symbol ") + name;
    }
    return s;
  };
  a.create = (nvrtcCreateProgram_t)sym(nvrtc, "nvrtcCreateProgram");
  a.compile = (nvrtcCompileProgram_t)sym(nvrtc, "nvrtcCompileProgram");
  a.log_size = (nvrtcGetSize_t)sym(nvrtc, "nvrtcGetProgramLogSize");
  a.log = (nvrtcGetData_t)sym(nvrtc, "nvrtcGetProgramLog");
  a.cubin_size = (nvrtcGetSize_t)sym(nvrtc, "nvrtcGetCUBINSize");
  a.cubin = (nvrtcGetData_t)sym(nvrtc, "nvrtcGetCUBIN");
  a.destroy = (nvrtcDestroyProgram_t)sym(nvrtc, "nvrtcDestroyProgram");
  if (compile_only) {
    static Api nvrtc_only;
    nvrtc_only = a;
    return ok ? &nvrtc_only : nullptr;
  }
  tried = true;
  a.init = (cuInit_t)sym(cuda, "cuInit");
  a.device_get = (cuDeviceGet_t)sym(cuda, "cuDeviceGet");
  a.attribute = (cuDeviceGetAttribute_t)sym(cuda, "cuDeviceGetAttribute");
  a.load = (cuModuleLoadData_t)sym(cuda, "cuModuleLoadData");
  a.function = (cuModuleGetFunction_t)sym(cuda, "cuModuleGetFunction");
  a.launch = (cuLaunchKernel_t)sym(cuda, "cuLaunchKernel");
  a.launch_ex = (cuLaunchKernelEx_t)dlsym(cuda, "cuLaunchKernelEx");
  a.primary_ctx = (cuDevicePrimaryCtxRetain_t)sym(cuda, "cuDevicePrimaryCtxRetain");
  a.get_ctx = (cuCtxGetCurrent_t)sym(cuda, "cuCtxGetCurrent");
  a.set_ctx = (cuCtxSetCurrent_t)sym(cuda, "cuCtxSetCurrent");
  if (!ok || a.init(0) != 0) {
    if (ok) load_error = "cuInit failed";
    return nullptr;
  }
  api = new Api(a);
  return api;
}

// `src` compiled by NVRTC for sm_<arch> into `cubin`; false with the log in `err`. The
// environment's FTSCRIPT_NVRTC_DEFINES ("NAME=VALUE ...") adds `-D` defines: the kernels' tuning
// knobs (kernels.cu's DECODE_BULK, DECODE_BATCH...), for benchmarks to compare.
bool compile(Api* a, const char* src, int arch, std::vector<char>& cubin, std::string& err) {
  std::vector<std::string> flags = {"--gpu-architecture=sm_" + std::to_string(arch), "--std=c++17", "--fmad=false"};
  if (const char* defines = std::getenv("FTSCRIPT_NVRTC_DEFINES")) {
    std::istringstream words(defines);
    for (std::string d; words >> d;) flags.push_back("-D" + d);
  }
  std::vector<const char*> opts;
  for (auto& f : flags) opts.push_back(f.c_str());
  void* prog = nullptr;
  if (a->create(&prog, src, "ftscript_kernels.cu", 0, nullptr, nullptr) != 0) {
    err = "nvrtcCreateProgram failed";
    return false;
  }
  bool ok = a->compile(prog, (int)opts.size(), opts.data()) == 0;
  if (!ok) {
    size_t n = 0;
    a->log_size(prog, &n);
    std::string log(n, '\0');
    a->log(prog, &log[0]);
    err = "NVRTC could not compile the kernels for sm_" + std::to_string(arch) + ": " + log;
  } else {
    size_t n = 0;
    a->cubin_size(prog, &n);
    cubin.resize(n);
    a->cubin(prog, cubin.data());
  }
  a->destroy(&prog);
  return ok;
}

// The module for `device` (current), compiled from `src` on first use.
void* module_for(int device, const char* src, std::string& err) {
  auto it = modules.find(device);
  if (it != modules.end()) return it->second;
  int dev = 0, major = 0, minor = 0;
  api->device_get(&dev, device);
  api->attribute(&major, 75, dev);  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
  api->attribute(&minor, 76, dev);  // ..._MINOR
  std::vector<char> cubin;
  archs[device] = major * 10 + minor;
  if (!compile(api, src, major * 10 + minor, cubin, err)) return nullptr;
  void* module = nullptr;
  if (api->load(&module, cubin.data()) != 0) {
    err = "cuModuleLoadData failed for sm_" + std::to_string(major * 10 + minor);
    return nullptr;
  }
  modules[device] = module;
  return module;
}
}  // namespace

// Launches kernel `name` of `src` on GPU `device` over a 1-D grid, on torch's current stream
// there; `programmatic` (for kernels that call kernels.cu's pdl_wait before touching what the
// kernel before wrote) lets it start while that kernel finishes, on sm_90 and later. Returns 0,
// or -1 with a message in `err`.
extern "C" int ftscript_rtc_launch(const char* src, int device, const char* name, unsigned grid, unsigned block,
                                   void** params, int programmatic, char* err, size_t err_len) {
  std::string msg;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (!get_api()) {
      msg = load_error;
    } else {
      auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
      c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
      c10::Device previous = impl->exchangeDevice(d);
      // the runtime (torch) makes the device's primary context current lazily, per thread; a
      // thread of autograd's engine may not have one yet: the driver API needs it current
      auto ctx = contexts.find(device);
      if (ctx == contexts.end()) {
        int dev = 0;
        void* c = nullptr;
        api->device_get(&dev, device);
        if (api->primary_ctx(&c, dev) == 0) ctx = contexts.emplace(device, c).first;
      }
      void* current = nullptr;
      if (ctx != contexts.end() && (api->get_ctx(&current) != 0 || current != ctx->second)) api->set_ctx(ctx->second);
      void* fn = nullptr;
      auto key = std::make_pair(device, std::string(name));
      auto it = funcs.find(key);
      if (it != funcs.end()) {
        fn = it->second;
      } else if (void* module = module_for(device, src, msg)) {
        if (api->function(&fn, module, name) != 0) msg = std::string("no kernel ") + name;
        else funcs[key] = fn;
      }
      if (fn) {
        void* stream = impl->getStream(d).native_handle();
        int rc = 0;
        if (programmatic && api->launch_ex && archs[device] >= 90) {
          LaunchAttribute pdl{};
          pdl.id = kProgrammaticStreamSerialization;
          pdl.value.programmatic_stream_serialization = 1;
          LaunchConfig config{{grid, 1, 1}, {block, 1, 1}, 0, stream, &pdl, 1};
          rc = api->launch_ex(&config, fn, params, nullptr);
        } else {
          rc = api->launch(fn, grid, 1, 1, block, 1, 1, 0, stream, params, nullptr);
        }
        if (rc != 0) msg = std::string("launch of ") + name + " failed (CUDA error " + std::to_string(rc) + ")";
      }
      impl->setDevice(previous);
    }
  } catch (const std::exception& e) {
    msg = e.what();
  } catch (...) {
    msg = "unknown C++ exception";
  }
  if (msg.empty()) return 0;
  std::snprintf(err, err_len, "%s", msg.c_str());
  return -1;
}

// Compiles `src` for sm_<arch> without a GPU (a check for the build machine): the cubin's size,
// or -1 with a message in `err`.
extern "C" int64_t ftscript_rtc_compile(const char* src, int arch, char* err, size_t err_len) {
  std::string msg;
  std::vector<char> cubin;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    Api* a = get_api(true);
    if (!a) msg = load_error.empty() ? "libnvrtc not found" : load_error;
    else if (compile(a, src, arch, cubin, msg)) return static_cast<int64_t>(cubin.size());
  } catch (...) {
    msg = "unknown C++ exception";
  }
  std::snprintf(err, err_len, "%s", msg.c_str());
  return -1;
}
