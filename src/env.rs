//! `ftscript env`: what this build and machine have, for bug reports (as `accelerate env` and
//! `torch.utils.collect_env` print them). Never prints the Hub token, only whether one is set.

/// The machine's memory in bytes (Linux's `/proc/meminfo` `MemTotal`, read once; `None` elsewhere).
pub fn host_memory() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse().ok())?;
        Some(kib * 1024)
    })
}

/// `(name, value)` rows: versions, what is compiled in, the GPUs, the Hub settings.
pub fn report() -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("ftscript", env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch", libtorch_version().unwrap_or_else(|| "unknown (libtorch_cpu.so not found in this process)".into())),
        ("tch", "0.24.0".into()),
        ("distributed", compiled_in()),
    ];
    let gpus = tch::Cuda::device_count();
    rows.push(("CUDA", if tch::Cuda::is_available() { format!("available, {gpus} GPU(s), cuDNN {}", yes_no(tch::Cuda::cudnn_is_available())) } else { "not available".into() }));
    for i in 0..gpus.max(0) as usize {
        if let Some((free, total)) = crate::cuda::mem_info(tch::Device::Cuda(i)) {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            rows.push(("GPU", format!("cuda:{i}: {:.1} GiB total, {:.1} GiB free", gib(total), gib(free))));
        }
    }
    rows.push(("NVRTC kernels", match crate::cuda::kernels::compile_check(90) {
        Ok(bytes) => format!("available (compiled for sm_90 here: {bytes} bytes of cubin)"),
        Err(e) => format!("unavailable: {}", e.lines().next().unwrap_or("")),
    }));
    let hub = crate::hub::HubConfig::from_env();
    rows.push(("Hub endpoint", hub.endpoint.clone()));
    rows.push(("Hub cache", hub.cache_dir.display().to_string()));
    rows.push(("Hub offline", yes_no(hub.offline).into()));
    rows.push(("Hub token", if hub.token.is_some() { "set".into() } else { "not set".into() }));
    rows
}

/// What `ftscript --version` prints after the name: the version, the distributed backends
/// compiled in and the architectures this build loads.
pub fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut families: Vec<&str> = crate::models::FAMILIES.iter().map(|f| f.architecture).collect();
        families.push("T5ForConditionalGeneration (encoder-decoder)");
        format!("{}\ndistributed: {}\narchitectures: {}", env!("CARGO_PKG_VERSION"), compiled_in(), families.join(", "))
    })
}

/// The distributed backends this binary can use.
fn compiled_in() -> String {
    if cfg!(ftscript_nccl) { "gloo, nccl".into() } else { "gloo (nccl not compiled in: its headers were not found when building; scripts/setup.sh installs them)".into() }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The version of the libtorch this process loaded: `torch/version.py` beside the
/// `lib/libtorch_cpu.so` mapped into it (Linux).
fn libtorch_version() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    let version_py = std::path::Path::new(lib).parent()?.parent()?.join("version.py");
    let text = std::fs::read_to_string(version_py).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split('\'').nth(1).or_else(|| line.split('"').nth(1))?.to_string())
}
