//! Links libtorch so that CUDA works wherever a GPU exists.
//!
//! torch-sys links `libtorch_cuda.so` with the linker's default `--as-needed`, which drops it
//! because no symbol is referenced directly; CUDA then stays off without a word. We link it
//! again with `--no-as-needed`, and record an rpath to the wheel's `torch/lib` so the binary
//! runs without `LD_LIBRARY_PATH` (which still takes precedence, e.g. on the GPU machine).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| ".venv/libtorch".into()));
    let lib = std::fs::canonicalize(libtorch.join("lib")).unwrap_or_else(|_| libtorch.join("lib"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
