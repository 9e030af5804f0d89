//! Links libtorch so that CUDA works wherever a GPU exists.
//!
//! torch-sys links `libtorch_cuda.so` with the linker's default `--as-needed`, which drops it
//! because no symbol is referenced directly; CUDA then stays off without a word. We link it
//! again with `--no-as-needed`, and record an rpath to the wheel's `torch/lib` so the binary
//! runs without `LD_LIBRARY_PATH` (which still takes precedence, e.g. on the GPU machine).
//!
//! It also compiles `src/dist/shim.cpp`, the C ABI over PyTorch's c10d (TCPStore, Gloo, and
//! NCCL wherever its headers are installed), against the wheel's headers; Gloo's own headers come from Debian's
//! `libgloo-dev` (scripts/setup.sh), the symbols from `libtorch_cpu.so` / `libtorch_cuda.so`.
use std::path::{Path, PathBuf};

fn build_dist_shim(libtorch: &Path) {
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    println!("cargo:rerun-if-env-changed=FTSCRIPT_CUDA_INCLUDE");
    let include = libtorch.join("include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("src/dist/shim.cpp")
        .flag("-std=c++17")
        .flag_if_supported("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&include)
        .include(include.join("torch/csrc/api/include"));
    // NCCL whenever its headers and CUDA's are there (pip's nvidia-nccl-cu13, installed with torch,
    // and nvidia-cuda-crt / nvidia-cuda-cccl, which scripts/setup.sh installs), or when the
    // `nccl` feature asks for it; FTSCRIPT_NO_NCCL=1 builds Gloo only.
    println!("cargo:rerun-if-env-changed=FTSCRIPT_NO_NCCL");
    println!("cargo:rustc-check-cfg=cfg(ftscript_nccl)");
    let nvidia = libtorch.join("../nvidia");
    let headers = nvidia.join("nccl/include/nccl.h").exists() && nvidia.join("cu13/include/cuda_runtime.h").exists();
    let wanted = std::env::var_os("CARGO_FEATURE_NCCL").is_some() || (headers && std::env::var_os("FTSCRIPT_NO_NCCL").is_none());
    if wanted {
        println!("cargo:rustc-cfg=ftscript_nccl");
        for dir in ["nccl/include", "cu13/include", "cu13/include/cccl", "cuda_runtime/include"] {
            let d = nvidia.join(dir);
            if d.exists() {
                b.include(d);
            }
        }
        if let Ok(extra) = std::env::var("FTSCRIPT_CUDA_INCLUDE") {
            for d in extra.split(':').filter(|d| !d.is_empty()) {
                b.include(d);
            }
        }
        b.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    b.compile("ftscript_dist_shim");
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| ".venv/libtorch".into()));
    let lib = std::fs::canonicalize(libtorch.join("lib")).unwrap_or_else(|_| libtorch.join("lib"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    build_dist_shim(&std::fs::canonicalize(&libtorch).unwrap_or(libtorch.clone()));
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    cuda_shims(&libtorch, &lib);
}

/// Compiles `src/cuda/*.cpp` (allocator statistics, offloading, run-time compiled kernels and
/// their autograd functions, multi-tensor optimizer steps, the profiler) against the wheel's
/// headers.
fn cuda_shims(libtorch: &std::path::Path, lib: &std::path::Path) {
    const FILES: [&str; 7] = ["src/cuda/memory.cpp", "src/cuda/graph.cpp", "src/cuda/offload.cpp", "src/cuda/rtc.cpp", "src/cuda/autograd.cpp", "src/cuda/optim.cpp", "src/cuda/profile.cpp"];
    for f in FILES.iter().chain(&["src/cuda/guarded.h", "src/cuda/streams.h"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let root = std::fs::canonicalize(libtorch).unwrap_or_else(|_| libtorch.to_path_buf());
    // CUDA's headers (pip's nvidia-cuda-runtime) let memory.cpp reach the CUDA caching allocator
    let cuda: Vec<PathBuf> = ["cu13/include", "cuda_runtime/include"]
        .iter()
        .map(|d| root.join("../nvidia").join(d))
        .filter(|d| d.join("cuda_runtime_api.h").exists() && lib.join("libc10_cuda.so").exists())
        .take(1)
        .collect();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .includes(cuda.iter())
        .files(FILES)
        .compile("ftscript_cuda");
    if !cuda.is_empty() {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
