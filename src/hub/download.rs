//! `snapshot_download`: a repo revision into the huggingface_hub cache layout, through hf-hub.
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!   refs/main                      commit hash the branch pointed to
//!   blobs/<etag>                   file contents: etag = sha256 for LFS/Xet files, git blob sha1 otherwise
//!   snapshots/<commit>/<path>      relative symlinks to ../../blobs/<etag>
//! ```
//!
//! hf-hub fetches files stored with Xet through Xet and the others with plain GETs, each blob
//! into `blobs/<etag>.incomplete` (started over, not resumed) under huggingface_hub's lock,
//! then renamed into place.

use super::{hub_error, unreachable, HubConfig, Progress};
use anyhow::Result;
use std::path::PathBuf;

/// Which files of the repo to fetch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Filter {
    All,
    /// Skip other frameworks' weights (`*.bin`, `*.pt`, `*.h5`, `*.msgpack`, `*.onnx`, `*.gguf`,
    /// ...) when the repo has safetensors.
    Safetensors,
}

const OTHER_WEIGHTS: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".pkl"];

/// The cached snapshot of `revision`, if the cache has it.
pub fn cached_snapshot(cfg: &HubConfig, repo_id: &str, revision: &str) -> Option<PathBuf> {
    cfg.model(repo_id).ok()?.snapshot_download().revision(revision).local_files_only(true).send().ok()
}

/// Downloads (or finds in the cache) `repo_id` at `revision` (default `main`) and returns the
/// snapshot directory.
pub fn snapshot_download(cfg: &HubConfig, repo_id: &str, revision: Option<&str>, filter: Filter) -> Result<PathBuf> {
    let repo = cfg.model(repo_id)?;
    let revision = revision.unwrap_or("main");
    let from_cache = || repo.snapshot_download().revision(revision).local_files_only(true).send();
    if cfg.offline {
        return from_cache().map_err(|e| hub_error(e, cfg, repo_id));
    }
    let online = || -> Result<PathBuf, hf_hub::HFError> {
        let mut ignore = vec![];
        if filter == Filter::Safetensors {
            let tree = repo.list_tree().revision(revision).recursive(true).send()?;
            let paths: Vec<&str> = tree
                .iter()
                .filter_map(|e| match e {
                    hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path.as_str()),
                    _ => None,
                })
                .collect();
            if paths.iter().any(|p| p.ends_with(".safetensors")) {
                ignore = OTHER_WEIGHTS.iter().map(|x| format!("*{x}")).collect();
            }
        }
        let progress = Progress::new(repo_id);
        repo.snapshot_download().revision(revision).ignore_patterns(ignore).progress(progress).send()
    };
    match online() {
        Ok(snap) => {
            tracing::info!("{repo_id}@{revision}: {}", snap.display());
            Ok(snap)
        }
        // Like huggingface_hub: with the Hub unreachable, a cached snapshot still serves.
        Err(e) if unreachable(&e) => match from_cache() {
            Ok(snap) => {
                tracing::warn!("the Hub is unreachable ({e}); using the cached {}", snap.display());
                Ok(snap)
            }
            Err(_) => Err(hub_error(e, cfg, repo_id).context(format!("cannot download `{repo_id}` at revision {revision} from {}", cfg.endpoint))),
        },
        Err(e) => Err(hub_error(e, cfg, repo_id).context(format!("cannot download `{repo_id}` at revision {revision}"))),
    }
}
