//! CUDA graphs (`graph.cpp`, over `at::cuda::CUDAGraph`): a function's kernels recorded once and
//! replayed with one launch, for work whose per-op launch cost dwarfs its kernels (a decoding
//! step of a few tokens). The recorded function reads its inputs from, and leaves its outputs
//! in, tensors whose addresses stay fixed: a replay rewrites the outputs the recording returned.

use super::call;
use std::ffi::c_void;

extern "C" {
    fn ftscript_graph_new(device: i32, out: *mut *mut c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_graph_enter(g: *mut c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_graph_begin(g: *mut c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_graph_end(g: *mut c_void, ok: i32, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_graph_replay(g: *mut c_void, err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn ftscript_graph_free(g: *mut c_void);
}

/// A recorded sequence of GPU work; [`CudaGraph::replay`] runs it again.
pub struct CudaGraph(*mut c_void);

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ftscript_graph_new and is freed once, here.
        unsafe { ftscript_graph_free(self.0) }
    }
}

impl CudaGraph {
    /// Runs `f` once eagerly on the graph's side stream (which warms up what runs once: kernel
    /// compilation, cuBLAS workspaces), then records a second call of `f` without running it.
    /// Returns the eager call's result, and the graph with the recorded call's result (the
    /// tensors each replay rewrites). `f` must not read the device's values on the host nor copy
    /// from pageable host memory, and must turn its panics into errors. A failure while recording
    /// (`f`'s error, or CUDA refusing an op) drops the recording and comes back as the error
    /// beside the eager result.
    pub fn record<R>(device: tch::Device, mut f: impl FnMut() -> anyhow::Result<R>) -> anyhow::Result<(R, anyhow::Result<(CudaGraph, R)>)> {
        let tch::Device::Cuda(i) = device else { anyhow::bail!("CUDA graphs need a GPU, not {device:?}") };
        let mut g = std::ptr::null_mut();
        // SAFETY: `g` comes back allocated, owned by the CudaGraph below.
        call("CUDA graph", |err, len| unsafe { ftscript_graph_new(i as i32, &mut g, err, len) })?;
        let graph = CudaGraph(g);
        call("CUDA graph", |err, len| unsafe { ftscript_graph_enter(graph.0, err, len) })?;
        let eager = f();
        let recorded = eager.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|_| {
            call("CUDA graph capture", |err, len| unsafe { ftscript_graph_begin(graph.0, err, len) })?;
            let out = f();
            let end = call("CUDA graph capture", |err, len| unsafe { ftscript_graph_end(graph.0, out.is_ok() as i32, err, len) });
            let out = out?;
            end?;
            Ok(out)
        });
        // back on the caller's stream whatever happened (a second end is a no-op but for that)
        let left = call("CUDA graph", |err, len| unsafe { ftscript_graph_end(graph.0, 0, err, len) });
        let eager = eager?;
        left?;
        Ok((eager, recorded.map(|out| (graph, out))))
    }

    /// Runs the recorded work again on the current stream.
    pub fn replay(&self) -> anyhow::Result<()> {
        // SAFETY: the graph is live and holds a finished recording.
        call("CUDA graph replay", |err, len| unsafe { ftscript_graph_replay(self.0, err, len) })
    }
}
