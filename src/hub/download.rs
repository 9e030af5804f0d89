//! `snapshot_download`: a repo revision into the huggingface_hub cache layout.
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!   refs/main                      commit hash the branch pointed to
//!   blobs/<etag>                   file contents: etag = sha256 for LFS files, git blob sha1 otherwise
//!   snapshots/<commit>/<path>      relative symlinks to ../../blobs/<etag>
//!   trees/<commit>.json            the tree listing (huggingface_hub's completeness check)
//! ```
//!
//! A blob is downloaded to `blobs/<etag>.incomplete` (resumed with `Range` if one is there),
//! checked (size; sha256 for LFS files) and renamed into place.

use super::http::{Body, Client};
use super::{is_commit_hash, quote, quote_path, HubConfig};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Which files of the repo to fetch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Filter {
    All,
    /// Skip other frameworks' weights (`*.bin`, `*.pt`, `*.h5`, `*.msgpack`, `*.onnx`, `*.gguf`,
    /// ...) when the repo has safetensors.
    Safetensors,
}

const OTHER_WEIGHTS: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".pkl"];

/// One file of the repo's tree.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    size: u64,
    blob_id: String,
    lfs_sha256: Option<String>,
}

impl Entry {
    /// The cache's blob name: what the Hub sends as the (linked) ETag.
    fn etag(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.blob_id)
    }
}

fn read_ref(repo_dir: &Path, revision: &str) -> Option<String> {
    if is_commit_hash(revision) {
        return Some(revision.to_string());
    }
    std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok().map(|s| s.trim().to_string())
}

/// The cached snapshot of `revision`, if the cache has it.
pub fn cached_snapshot(cfg: &HubConfig, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cfg.repo_cache(repo_id);
    let commit = read_ref(&repo_dir, revision)?;
    let snap = repo_dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// Downloads (or finds in the cache) `repo_id` at `revision` (default `main`) and returns the
/// snapshot directory.
pub fn snapshot_download(cfg: &HubConfig, repo_id: &str, revision: Option<&str>, filter: Filter) -> Result<PathBuf> {
    super::check_repo_id(repo_id)?;
    let revision = revision.unwrap_or("main");
    if cfg.offline {
        return cached_snapshot(cfg, repo_id, revision).ok_or_else(|| {
            anyhow!(
                "`{repo_id}` (revision {revision}) is not in the Hub cache {} and HF_HUB_OFFLINE is set, so it cannot be downloaded",
                cfg.cache_dir.display()
            )
        });
    }
    let mut client = Client::new(cfg.clone());
    client.attempts = 2; // resolving fails fast (like huggingface_hub), so the cache can answer
    let info = match client.json("GET", &format!("/api/models/{repo_id}/revision/{}", quote(revision)), None) {
        Ok(v) => v,
        Err(e) => {
            // Like huggingface_hub: with the Hub unreachable, a cached snapshot still serves.
            if super::http::status_of(&e).map(|s| s >= 500).unwrap_or(true) {
                if let Some(snap) = cached_snapshot(cfg, repo_id, revision) {
                    tracing::warn!("the Hub is unreachable ({e:#}); using the cached {}", snap.display());
                    return Ok(snap);
                }
            }
            return Err(e).with_context(|| format!("cannot resolve `{repo_id}` at revision {revision} on {}", cfg.endpoint));
        }
    };
    client.attempts = 5;
    let commit = info["sha"].as_str().ok_or_else(|| anyhow!("{repo_id}: the Hub's answer has no commit sha"))?.to_string();
    let entries = list_tree(&client, repo_id, &commit)?;
    let repo_dir = cfg.repo_cache(repo_id);
    let snap = repo_dir.join("snapshots").join(&commit);
    std::fs::create_dir_all(repo_dir.join("blobs")).with_context(|| format!("cannot create {}", repo_dir.display()))?;
    std::fs::create_dir_all(&snap)?;
    if revision != commit {
        let ref_path = repo_dir.join("refs").join(revision);
        std::fs::create_dir_all(ref_path.parent().unwrap())?;
        std::fs::write(&ref_path, &commit)?;
    }
    let has_safetensors = entries.iter().any(|e| e.path.ends_with(".safetensors"));
    let wanted: Vec<&Entry> = entries
        .iter()
        .filter(|e| filter == Filter::All || !has_safetensors || !OTHER_WEIGHTS.iter().any(|x| e.path.ends_with(x)))
        .collect();
    for e in &wanted {
        let link = snap.join(&e.path);
        if link.exists() {
            continue;
        }
        let blob = repo_dir.join("blobs").join(e.etag());
        if !blob.exists() {
            // the lock huggingface_hub takes too, so two downloaders never share an .incomplete file
            let _lock = lock_blob(cfg, repo_id, e.etag())?;
            if !blob.exists() {
                fetch_blob(&client, repo_id, &commit, e, &blob)?;
            }
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        symlink_blob(&blob, &link, &e.path, e.etag())?;
    }
    if wanted.len() == entries.len() {
        write_tree_cache(&repo_dir, &commit, &entries);
    }
    tracing::info!("{repo_id}@{revision}: {} file(s) in {}", wanted.len(), snap.display());
    Ok(snap)
}

/// Every file of the tree at `commit` (`/api/models/{repo}/tree/{commit}?recursive=true`, paginated).
fn list_tree(client: &Client, repo_id: &str, commit: &str) -> Result<Vec<Entry>> {
    let mut url = client.url(&format!("/api/models/{repo_id}/tree/{commit}?recursive=true&expand=false"));
    let mut out = vec![];
    loop {
        let r = client.send("GET", &url, &[], Body::Empty)?;
        let next = r.header("Link").and_then(next_link);
        let items = super::http::read_json(r, &url)?;
        for it in items.as_array().ok_or_else(|| anyhow!("{repo_id}: the tree listing is not an array"))? {
            if it["type"] != "file" {
                continue;
            }
            out.push(Entry {
                path: it["path"].as_str().unwrap_or_default().to_string(),
                size: it["size"].as_u64().unwrap_or(0),
                blob_id: it["oid"].as_str().unwrap_or_default().to_string(),
                lfs_sha256: it["lfs"]["oid"].as_str().map(String::from),
            });
        }
        match next {
            Some(n) => url = n,
            None => return Ok(out),
        }
    }
}

/// `<https://...>; rel="next"` from a Link header.
fn next_link(h: &str) -> Option<String> {
    h.split(',').find(|p| p.contains("rel=\"next\"")).and_then(|p| Some(p.split_once('<')?.1.split_once('>')?.0.to_string()))
}

fn progress(len: u64, name: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(name.to_string());
    pb
}

/// Downloads one blob, resuming a `.incomplete` file, and verifies it.
fn fetch_blob(client: &Client, repo_id: &str, commit: &str, e: &Entry, blob: &Path) -> Result<()> {
    let url = client.url(&format!("/{repo_id}/resolve/{commit}/{}", quote_path(&e.path)));
    let incomplete = PathBuf::from(format!("{}.incomplete", blob.display()));
    let mut tries = 0;
    loop {
        tries += 1;
        let have = std::fs::metadata(&incomplete).map(|m| m.len()).unwrap_or(0);
        if have > e.size {
            std::fs::remove_file(&incomplete)?;
            continue;
        }
        let result = (|| -> Result<()> {
            if have < e.size || e.size == 0 {
                let headers: Vec<(&str, String)> = if have > 0 { vec![("Range", format!("bytes={have}-"))] } else { vec![] };
                let r = client.send("GET", &url, &headers, Body::Empty)?;
                let resumed = r.status() == 206;
                if have > 0 {
                    tracing::info!("resuming {} at {have} bytes", e.path);
                }
                let mut f = std::fs::OpenOptions::new().create(true).write(true).append(resumed).truncate(!resumed).open(&incomplete)?;
                let pb = progress(e.size, &e.path);
                pb.set_position(if resumed { have } else { 0 });
                let mut reader = r.into_reader();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = reader.read(&mut buf).with_context(|| format!("downloading {}", e.path))?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n])?;
                    pb.inc(n as u64);
                }
                f.flush()?;
                pb.finish_and_clear();
            }
            Ok(())
        })();
        if let Err(err) = result {
            if tries < 3 {
                tracing::warn!("{}: {err:#}; resuming", e.path);
                continue;
            }
            return Err(err);
        }
        let got = std::fs::metadata(&incomplete)?.len();
        if got != e.size {
            if tries < 3 {
                continue;
            }
            bail!("{}: downloaded {got} bytes, expected {}", e.path, e.size);
        }
        if let Some(want) = &e.lfs_sha256 {
            let sha = super::sha256_file(&incomplete)?;
            if &sha != want {
                std::fs::remove_file(&incomplete)?;
                if tries < 3 {
                    tracing::warn!("{}: sha256 mismatch, downloading again", e.path);
                    continue;
                }
                bail!("{}: sha256 {sha} does not match the Hub's {want}", e.path);
            }
        }
        std::fs::rename(&incomplete, blob)?;
        return Ok(());
    }
}

/// An exclusive `flock` on `.locks/models--org--name/<etag>.lock` (as huggingface_hub's filelock
/// takes it), released when the returned file is dropped.
fn lock_blob(cfg: &HubConfig, repo_id: &str, etag: &str) -> Result<std::fs::File> {
    let dir = cfg.cache_dir.join(".locks").join(format!("models--{}", repo_id.replace('/', "--")));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{etag}.lock"));
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// `snapshots/<commit>/<path>` → `../../blobs/<etag>` (one more `..` per directory level).
fn symlink_blob(blob: &Path, link: &Path, path_in_repo: &str, etag: &str) -> Result<()> {
    let depth = path_in_repo.matches('/').count();
    let rel: PathBuf = std::iter::repeat("..").take(depth + 2).collect::<PathBuf>().join("blobs").join(etag);
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(&rel, link).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, link).with_context(|| format!("cannot place {}", link.display()))?;
    Ok(())
}

/// `trees/<commit>.json` as huggingface_hub writes it (format_version 1).
fn write_tree_cache(repo_dir: &Path, commit: &str, entries: &[Entry]) {
    let mut files = serde_json::Map::new();
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for e in sorted {
        let mut v = serde_json::json!({"size": e.size, "blob_id": e.blob_id});
        if let Some(s) = &e.lfs_sha256 {
            v["lfs_sha256"] = serde_json::json!(s);
            v["lfs_size"] = serde_json::json!(e.size);
        }
        files.insert(e.path.clone(), v);
    }
    let data = serde_json::json!({"format_version": 1, "files": files});
    let dir = repo_dir.join("trees");
    let path = dir.join(format!("{commit}.json"));
    if path.exists() {
        return;
    }
    let tmp = dir.join(format!(".{commit}.json.{}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(&tmp, serde_json::to_string_pretty(&data).unwrap()).is_ok()
        && std::fs::rename(&tmp, &path).is_ok();
    if !ok {
        tracing::debug!("could not write the tree cache {}", path.display());
    }
}

/// Sha256 hex of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}
