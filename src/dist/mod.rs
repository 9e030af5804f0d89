//! Data-parallel training across processes, on PyTorch's own c10d engine: a TCPStore
//! rendezvous and a process group (ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA where the
//! build found NCCL's headers), through the C ABI in `shim.cpp`.
//!
//! Processes find each other through torchrun's environment variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), set by `ftscript launch` or
//! by torchrun itself. Under torchrun's agent store (`TORCHELASTIC_USE_AGENT_STORE=True`) every
//! rank connects to the agent's store as a client; otherwise rank 0 hosts it.
//!
//! Every rank must issue the same collectives in the same order (tensors are always taken in
//! the adapters' sorted-name order); a mismatch hangs until the timeout
//! (`FTSCRIPT_DIST_TIMEOUT`, seconds, default 600) and then fails.

pub mod launch;

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn ftd_free_string(s: *mut c_char);
    fn ftd_init(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        store_is_client: c_int,
        prefix: *const c_char,
        device_index: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ftd_destroy(h: *mut c_void);
    fn ftd_all_reduce_sum(h: *mut c_void, tensor: *mut c_void) -> *mut c_char;
    fn ftd_broadcast(h: *mut c_void, tensor: *mut c_void, root: c_int) -> *mut c_char;
    fn ftd_barrier(h: *mut c_void) -> *mut c_char;
}

/// Turns the shim's error string (null = success) into a `Result`.
fn check(err: *mut c_char, what: &str) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { ftd_free_string(err) };
    let msg = msg.lines().next().unwrap_or("").to_string();
    bail!("distributed {what} failed (rank {}): {msg}", env().map(|e| e.rank).unwrap_or(0))
}

/// This process's place among its peers, from torchrun's environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's elastic agent hosts the store; connect as a client.
    pub agent_store: bool,
    pub restart_count: usize,
}

fn var<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|_| anyhow!("environment variable {name}={v:?} is not valid")),
        _ => Ok(None),
    }
}

impl DistEnv {
    /// Reads the environment; `None` when this is a single process (`WORLD_SIZE` unset or 1).
    pub fn from_env() -> Result<Option<DistEnv>> {
        let world_size: usize = var("WORLD_SIZE")?.unwrap_or(1);
        if world_size <= 1 {
            return Ok(None);
        }
        let rank: usize = var("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
        if rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let local_rank = var("LOCAL_RANK")?.unwrap_or(rank);
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size: var("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
            master_addr: std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into()),
            master_port: var("MASTER_PORT")?.unwrap_or(29500),
            agent_store: std::env::var("TORCHELASTIC_USE_AGENT_STORE").map(|v| v.eq_ignore_ascii_case("true") || v == "1").unwrap_or(false),
            restart_count: var("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0),
        }))
    }
}

/// The environment, read once (an invalid one reads as a single process; `group()` reports it).
pub fn env() -> Option<&'static DistEnv> {
    static ENV: OnceLock<Option<DistEnv>> = OnceLock::new();
    ENV.get_or_init(|| DistEnv::from_env().ok().flatten()).as_ref()
}

/// Whether a launcher (`ftscript launch`, torchrun) started this process, even as a world of one.
pub fn launched() -> bool {
    std::env::var_os("WORLD_SIZE").is_some()
}

pub fn rank() -> usize {
    env().map(|e| e.rank).unwrap_or(0)
}

pub fn world_size() -> usize {
    env().map(|e| e.world_size).unwrap_or(1)
}

pub fn is_main_process() -> bool {
    rank() == 0
}

/// The CUDA device this rank trains on (`cuda:LOCAL_RANK`), or `None` without CUDA.
pub fn local_cuda_device() -> Option<Device> {
    if !tch::Cuda::is_available() {
        return None;
    }
    let n = tch::Cuda::device_count().max(1) as usize;
    Some(Device::Cuda(env().map(|e| e.local_rank).unwrap_or(0) % n))
}

/// A process group over all ranks.
pub struct ProcessGroup {
    handle: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
    /// Where collective buffers live: CPU for Gloo, the rank's GPU for NCCL.
    pub device: Device,
}

// The c10d backend is thread-safe for our use (one caller at a time, in program order).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Rendezvous with the other ranks. NCCL when this rank has a GPU (unless
    /// `FTSCRIPT_DIST_BACKEND=gloo`), Gloo otherwise.
    pub fn init(e: &DistEnv) -> Result<ProcessGroup> {
        let timeout_s: f64 = var("FTSCRIPT_DIST_TIMEOUT")?.unwrap_or(600.0);
        let backend = std::env::var("FTSCRIPT_DIST_BACKEND").unwrap_or_default();
        let device = match backend.as_str() {
            "gloo" => Device::Cpu,
            "" | "auto" | "nccl" => match local_cuda_device() {
                Some(d) => d,
                None if backend == "nccl" => bail!("FTSCRIPT_DIST_BACKEND=nccl but CUDA is not available"),
                None => Device::Cpu,
            },
            other => bail!("FTSCRIPT_DIST_BACKEND={other}: valid values are auto, gloo, nccl"),
        };
        let device_index = match device {
            Device::Cuda(i) => i as c_int,
            _ => -1,
        };
        // torchrun's agent store is shared with the agent (and outlives a restart): keep to our
        // own namespace, per attempt
        let prefix = if e.agent_store { format!("/worker/attempt_{}/ftscript", e.restart_count) } else { "ftscript".to_string() };
        let host = CString::new(e.master_addr.clone())?;
        let prefix = CString::new(prefix)?;
        let mut handle = std::ptr::null_mut();
        tracing::debug!("rank {}/{}: rendezvous at {}:{}", e.rank, e.world_size, e.master_addr, e.master_port);
        check(
            unsafe {
                ftd_init(
                    host.as_ptr(),
                    e.master_port as c_int,
                    e.rank as c_int,
                    e.world_size as c_int,
                    e.agent_store as c_int,
                    prefix.as_ptr(),
                    device_index,
                    (timeout_s * 1000.0) as i64,
                    &mut handle,
                )
            },
            &format!("rendezvous at {}:{}", e.master_addr, e.master_port),
        )?;
        tracing::info!(
            "rank {}/{}: process group ready ({} on {:?})",
            e.rank,
            e.world_size,
            if device_index >= 0 { "NCCL" } else { "Gloo" },
            device
        );
        Ok(ProcessGroup { handle, rank: e.rank, world_size: e.world_size, device })
    }

    /// Runs `f` on `t` moved to the group's device (contiguous), copying the result back.
    fn on_device(&self, t: &Tensor, what: &str, f: impl Fn(*mut c_void) -> *mut c_char) -> Result<()> {
        let same = t.device() == self.device && t.is_contiguous();
        let buf = if same { t.shallow_clone() } else { t.to_device(self.device).contiguous() };
        check(f(buf.as_ptr() as *mut c_void), what)?;
        if !same {
            let _g = tch::no_grad_guard();
            t.shallow_clone().copy_(&buf);
        }
        Ok(())
    }

    /// In-place sum over all ranks.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.on_device(t, "all_reduce", |p| unsafe { ftd_all_reduce_sum(self.handle, p) })
    }

    /// In-place mean over all ranks.
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<()> {
        self.all_reduce_sum(t)?;
        let _g = tch::no_grad_guard();
        let _ = t.shallow_clone().g_div_scalar_(self.world_size as f64);
        Ok(())
    }

    /// In-place broadcast of rank `root`'s values.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.on_device(t, "broadcast", |p| unsafe { ftd_broadcast(self.handle, p, root as c_int) })
    }

    pub fn barrier(&self) -> Result<()> {
        check(unsafe { ftd_barrier(self.handle) }, "barrier")
    }

    /// Sums f64 statistics over ranks (one small all-reduce).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }

    /// Applies a collective to many tensors through one flat buffer per dtype (in the given
    /// order, which must be the same on every rank), writing the results back.
    pub fn bucketed(&self, tensors: &[Tensor], op: impl Fn(&Tensor) -> Result<()>) -> Result<()> {
        let _g = tch::no_grad_guard();
        let mut kinds: Vec<Kind> = vec![];
        for t in tensors {
            if !kinds.contains(&t.kind()) {
                kinds.push(t.kind());
            }
        }
        for kind in kinds {
            let group: Vec<&Tensor> = tensors.iter().filter(|t| t.kind() == kind).collect();
            let flat = Tensor::cat(&group.iter().map(|t| t.reshape([-1]).to_device(self.device)).collect::<Vec<_>>(), 0);
            op(&flat)?;
            let mut offset = 0;
            for t in group {
                let n = t.numel() as i64;
                t.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(t));
                offset += n;
            }
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ftd_destroy(self.handle) }
    }
}

/// The process group of this run, created on first use; `None` for a single process.
pub fn group() -> Result<Option<&'static ProcessGroup>> {
    static GROUP: OnceLock<ProcessGroup> = OnceLock::new();
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(g) = GROUP.get() {
        return Ok(Some(g));
    }
    let Some(e) = DistEnv::from_env()? else { return Ok(None) };
    let _lock = INIT.lock().unwrap();
    if let Some(g) = GROUP.get() {
        return Ok(Some(g));
    }
    let g = ProcessGroup::init(&e)?;
    let _ = GROUP.set(g);
    Ok(GROUP.get())
}
