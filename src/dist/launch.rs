//! `ftscript launch`: one `ftscript run` process per local rank, with torchrun's environment
//! variables. If a rank fails, the others are stopped and the launcher exits non-zero with that
//! rank's error; Ctrl-C (or SIGTERM) stops all. Children are also tied to the launcher's life
//! (`PR_SET_PDEATHSIG`), so none outlives it.

use anyhow::{bail, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: a free port on a single node, 29500 across nodes.
    pub master_port: Option<u16>,
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Copies a child's output to ours line by line, prefixed `[rank N]` off rank 0, remembering
/// its last `error:` line.
fn pump(src: impl std::io::Read + Send + 'static, rank: usize, to_stderr: bool, last_error: Arc<Mutex<Option<String>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let prefix = if rank == 0 { String::new() } else { format!("[rank {rank}] ") };
        for line in BufReader::new(src).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("error:") {
                *last_error.lock().unwrap() = Some(line.clone());
            }
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    })
}

fn stop_all(children: &mut [(usize, Child)], grace: Duration) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// Runs `ftscript <run_args>` once per local rank and waits for all of them.
pub fn launch(o: &LaunchOptions, run_args: &[String]) -> Result<()> {
    if o.nproc_per_node == 0 || o.nnodes == 0 {
        bail!("launch: --nproc-per-node and --nnodes must be at least 1");
    }
    if o.node_rank >= o.nnodes {
        bail!("launch: --node-rank {} must be below --nnodes {}", o.node_rank, o.nnodes);
    }
    let port = match o.master_port {
        Some(p) => p,
        None if o.nnodes == 1 => free_port()?,
        None => 29500,
    };
    let world = o.nproc_per_node * o.nnodes;
    let exe: PathBuf = std::env::current_exe()?;
    unsafe {
        libc::signal(libc::SIGINT, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    tracing::info!("launch: {} process(es) on this node (node {}/{}), world size {world}, master {}:{port}", o.nproc_per_node, o.node_rank, o.nnodes, o.master_addr);
    let mut children: Vec<(usize, Child)> = vec![];
    let mut pumps = vec![];
    let errors: Vec<Arc<Mutex<Option<String>>>> = (0..o.nproc_per_node).map(|_| Arc::new(Mutex::new(None))).collect();
    for local in 0..o.nproc_per_node {
        let rank = o.node_rank * o.nproc_per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.args(run_args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", o.nproc_per_node.to_string())
            .env("GROUP_RANK", o.node_rank.to_string())
            .env("MASTER_ADDR", &o.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children, Duration::from_secs(3));
                bail!("launch: cannot start rank {rank}: {e}");
            }
        };
        pumps.push(pump(child.stdout.take().unwrap(), rank, false, errors[local].clone()));
        pumps.push(pump(child.stderr.take().unwrap(), rank, true, errors[local].clone()));
        children.push((rank, child));
    }
    let mut failure: Option<(usize, String)> = None;
    loop {
        let sig = SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            eprintln!("launch: interrupted, stopping all ranks");
            stop_all(&mut children, Duration::from_secs(5));
            bail!("launch: interrupted by signal {sig}");
        }
        let mut running = 0;
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            match c.try_wait()? {
                None => running += 1,
                Some(s) if s.success() => {}
                Some(s) => {
                    failure = Some((i, format!("rank {rank} failed ({s})")));
                    break;
                }
            }
        }
        if failure.is_some() || running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some((i, what)) = failure {
        stop_all(&mut children, Duration::from_secs(3));
        for p in pumps {
            let _ = p.join();
        }
        let err = errors[i].lock().unwrap().clone();
        match err {
            Some(e) => bail!("launch: {what}: {}", e.trim_start_matches("error:").trim()),
            None => bail!("launch: {what}"),
        }
    }
    for p in pumps {
        let _ = p.join();
    }
    Ok(())
}
