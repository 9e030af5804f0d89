//! What a running recipe may touch outside itself. A recipe is often someone else's code, so
//! `ftscript run` confines it: it reads under its own directory, the current directory, the
//! Hugging Face cache and the paths given on the command line (`--set` values naming files or
//! directories); it writes under the current directory; it uses no network (a Hub model is taken
//! from the cache). `--allow-read PATH`, `--allow-write PATH` and `--allow-net` widen that;
//! `--allow-push` lets `hub_push` publish. Every host function that opens a path or a connection
//! asks here first; a refusal names the path and the flag that would allow it, never the file's
//! content. Outside `ftscript run` (the library, the other commands) nothing is confined.

use anyhow::{bail, Result};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// The roots a recipe may read and write under, and whether it may use the network.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    pub net: bool,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

impl Sandbox {
    /// The default confinement of a recipe in `recipe_dir` run from `cwd`, widened by the
    /// command line: `--set` values that name existing paths, `--allow-read`, `--allow-write`
    /// and `--allow-net`. Writable paths are readable too.
    pub fn for_recipe(recipe_dir: &Path, cwd: &Path, set_paths: &[PathBuf], allow_read: &[PathBuf], allow_write: &[PathBuf], allow_net: bool) -> Sandbox {
        let cache = crate::hub::HubConfig::from_env().cache_dir;
        let mut write: Vec<PathBuf> = [cwd].into_iter().chain(allow_write.iter().map(PathBuf::as_path)).map(absolute).collect();
        write.dedup();
        let mut read: Vec<PathBuf> = [recipe_dir, cache.as_path()].into_iter().chain(set_paths.iter().map(PathBuf::as_path)).chain(allow_read.iter().map(PathBuf::as_path)).map(absolute).collect();
        read.extend(write.iter().cloned());
        Sandbox { read, write, net: allow_net }
    }
}

/// Confines this process's recipe (once; `ftscript run` calls it before the recipe starts).
pub fn install(s: Sandbox) {
    tracing::debug!("sandbox: read {:?}, write {:?}, network {}", s.read, s.write, s.net);
    let _ = SANDBOX.set(s);
}

/// `p` made absolute against the current directory, with symbolic links and `..` resolved: the
/// longest existing ancestor is canonicalized and the rest appended (`..` there taken lexically).
pub fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let mut existing = joined.as_path();
    let mut rest = vec![];
    let mut base = loop {
        if let Ok(c) = existing.canonicalize() {
            break c;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break PathBuf::from("/"),
        }
    };
    for part in rest.iter().rev() {
        for c in Path::new(part).components() {
            match c {
                Component::ParentDir => {
                    base.pop();
                }
                Component::Normal(n) => base.push(n),
                _ => {}
            }
        }
    }
    base
}

fn within(p: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| p.starts_with(r))
}

/// May the recipe read `p`?
pub fn check_read(p: &Path) -> Result<()> {
    check(p, |s| &s.read, "reading", "a recipe reads under its own directory, the current directory, the Hub cache and the paths given with --set", "--allow-read")
}

/// May the recipe write `p` (a file or a directory to fill)?
pub fn check_write(p: &Path) -> Result<()> {
    check(p, |s| &s.write, "writing", "a recipe writes under the current directory", "--allow-write")
}

/// `p` lies under one of the `roots` of the installed sandbox, or an error saying what `rule`
/// the `verb` broke and the `flag` that allows it.
fn check(p: &Path, roots: impl Fn(&Sandbox) -> &Vec<PathBuf>, verb: &str, rule: &str, flag: &str) -> Result<()> {
    let Some(s) = SANDBOX.get() else { return Ok(()) };
    let abs = absolute(p);
    if !within(&abs, roots(s)) {
        bail!("{verb} {} is not allowed: {rule}; rerun with `{flag} {}` to allow it", abs.display(), abs.display());
    }
    Ok(())
}

/// May the recipe use the network (`what`: the function and what it would fetch)?
pub fn check_net(what: &str) -> Result<()> {
    match SANDBOX.get() {
        Some(s) if !s.net => bail!("{what} needs the network, which a recipe may not use by default; rerun with `--allow-net` to allow it"),
        _ => Ok(()),
    }
}

/// Whether the network is closed to this process's recipe.
pub fn net_closed() -> bool {
    SANDBOX.get().is_some_and(|s| !s.net)
}
