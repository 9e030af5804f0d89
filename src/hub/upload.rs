//! `push`: a folder → one commit on the Hub, the way huggingface_hub's `upload_folder` does it.
//!
//! 1. The repo is created if needed (hf-hub, `exist_ok`); a missing branch is created.
//! 2. `POST /api/models/{repo}/preupload/{rev}`: the Hub says which files go through LFS.
//!    Weights (`*.safetensors`, ...) and anything over 10 MB always do: never base64-inlined.
//! 3. `POST /{repo}.git/info/lfs/objects/batch`, offering `basic`, `multipart` and `xet`.
//!    - The Hub answers `xet` (huggingface.co does): the whole commit goes through hf-hub's
//!      `create_commit`, which uploads the large files to the Hub's Xet storage and commits.
//!      So does a folder with no LFS file at all.
//!    - The Hub offers only Git LFS (hf-hub would inline the files into the commit instead):
//!      each object's upload action, `basic` (one PUT) or `multipart` (a PUT per `chunk_size`
//!      part to the numbered URLs, then a POST of the parts' ETags to the completion URL), then
//!      `verify` if given; storage URLs never get the token. Then
//!      `POST /api/models/{repo}/commit/{rev}` with NDJSON: `header`, `file` (base64, small
//!      files), `lfsFile` (oid + size).
//!
//! Everything is uploaded before the single commit call, so a failed push leaves no partial commit.

use super::http::{read_json, Body, Client};
use super::{hub_error, quote, sha256_file, HubConfig, Progress};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Options of a push.
#[derive(Debug, Default, Clone)]
pub struct PushOptions {
    pub private: bool,
    /// Branch to commit to (default `main`; created from main if missing).
    pub revision: Option<String>,
    pub commit_message: Option<String>,
    /// Open a pull request instead of committing to the branch.
    pub create_pr: bool,
    /// Extra hyper-parameters for the generated model card.
    pub hyperparameters: Vec<(String, Value)>,
}

/// Files over this size always go through LFS.
pub const LFS_THRESHOLD: u64 = 10 * 1024 * 1024;
const LFS_EXTENSIONS: &[&str] = &[
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl", ".ot",
    ".model", ".parquet", ".arrow", ".zip", ".tar", ".gz", ".zst",
];

struct LocalFile {
    /// Path in the repo, `/`-separated.
    path: String,
    source: Source,
    size: u64,
    sha256: String,
    lfs: bool,
}

enum Source {
    Disk(PathBuf),
    Memory(Vec<u8>),
}

impl LocalFile {
    fn sample(&self) -> Result<Vec<u8>> {
        Ok(match &self.source {
            Source::Disk(p) => {
                let mut buf = Vec::with_capacity(512);
                std::fs::File::open(p)?.take(512).read_to_end(&mut buf)?;
                buf
            }
            Source::Memory(b) => b[..b.len().min(512)].to_vec(),
        })
    }
    fn bytes(&self) -> Result<Vec<u8>> {
        Ok(match &self.source {
            Source::Disk(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            Source::Memory(b) => b.clone(),
        })
    }
}

fn must_be_lfs(path: &str, size: u64) -> bool {
    size > LFS_THRESHOLD || LFS_EXTENSIONS.iter().any(|x| path.to_ascii_lowercase().ends_with(x))
}

/// Every file under `dir` (hidden files and folders, and `*.incomplete`/`*.lock`, left out).
fn collect(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name.ends_with(".incomplete") || name.ends_with(".lock") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Pushes the folder `dir` to `repo_id`; returns the commit URL (or the pull request's).
pub fn push(cfg: &HubConfig, dir: &Path, repo_id: &str, opts: &PushOptions) -> Result<String> {
    super::check_repo_id(repo_id)?;
    if cfg.offline {
        bail!("HF_HUB_OFFLINE is set: cannot push to the Hub");
    }
    if cfg.token.is_none() {
        bail!("pushing needs a Hugging Face token: set HF_TOKEN, or log in with `hf auth login` (which writes $HF_HOME/token)");
    }
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
    let client = Client::new(cfg.clone());

    // The files, hashed; a model card unless the folder has one.
    let mut files = vec![];
    for (path, p) in collect(dir)? {
        let size = std::fs::metadata(&p)?.len();
        let sha256 = sha256_file(&p)?;
        files.push(LocalFile { lfs: must_be_lfs(&path, size), path, source: Source::Disk(p), size, sha256 });
    }
    if files.is_empty() {
        bail!("{} is empty: nothing to push", dir.display());
    }
    if !files.iter().any(|f| f.path == "README.md") {
        let card = super::card::model_card(dir, repo_id, &opts.hyperparameters).into_bytes();
        files.push(LocalFile {
            path: "README.md".into(),
            size: card.len() as u64,
            sha256: super::sha256_hex(&card),
            lfs: false,
            source: Source::Memory(card),
        });
    }

    create_repo(cfg, repo_id, opts.private)?;
    if revision != "main" && !opts.create_pr {
        ensure_branch(cfg, repo_id, &revision)?;
    }

    // Which files the Hub wants through LFS (we also insist for weights and large files).
    let pr = if opts.create_pr { "?create_pr=1" } else { "" };
    for chunk in files.chunks_mut(256) {
        let payload = json!({"files": chunk.iter().map(|f| Ok(json!({
            "path": f.path,
            "sample": base64::engine::general_purpose::STANDARD.encode(f.sample()?),
            "size": f.size,
        }))).collect::<Result<Vec<_>>>()?});
        let v = client.json("POST", &format!("/api/models/{repo_id}/preupload/{}{pr}", quote(&revision)), Some(&payload))?;
        for m in v["files"].as_array().ok_or_else(|| anyhow!("preupload: malformed answer"))? {
            if m["uploadMode"] == "lfs" {
                if let Some(f) = chunk.iter_mut().find(|f| m["path"] == f.path.as_str()) {
                    f.lfs = true;
                }
            }
        }
    }
    for f in files.iter_mut() {
        if f.size == 0 {
            f.lfs = false; // the Hub stores empty files as regular blobs
        }
    }

    // LFS uploads, all before the commit; or the whole commit through hf-hub where the Hub
    // stores large files with Xet.
    let message = opts.commit_message.clone().unwrap_or_else(|| "Upload folder with ftscript".into());
    let lfs: Vec<&LocalFile> = files.iter().filter(|f| f.lfs).collect();
    if lfs.is_empty() {
        return commit_with_hf_hub(cfg, repo_id, &revision, opts.create_pr, &message, &files, "regular");
    }
    for chunk in lfs.chunks(100) {
        if upload_lfs(&client, repo_id, &revision, opts.create_pr, chunk)? == Transfer::Xet {
            return commit_with_hf_hub(cfg, repo_id, &revision, opts.create_pr, &message, &files, "Xet");
        }
    }

    // The single commit.
    let mut ndjson = Vec::new();
    let mut line = |v: Value| {
        ndjson.extend_from_slice(serde_json::to_string(&v).unwrap().as_bytes());
        ndjson.push(b'\n');
    };
    line(json!({"key": "header", "value": {"summary": message, "description": ""}}));
    for f in &files {
        if f.lfs {
            line(json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size}}));
        } else {
            let content = base64::engine::general_purpose::STANDARD.encode(f.bytes()?);
            line(json!({"key": "file", "value": {"content": content, "path": f.path, "encoding": "base64"}}));
        }
    }
    let url = client.url(&format!("/api/models/{repo_id}/commit/{}{pr}", quote(&revision)));
    let r = client
        .send("POST", &url, &[("Content-Type", "application/x-ndjson".into())], Body::Bytes(&ndjson))
        .with_context(|| format!("commit to {repo_id}"))?;
    let v = read_json(r, &url)?;
    let n_lfs = lfs.len();
    let commit_url = if opts.create_pr { v["pullRequestUrl"].as_str() } else { v["commitUrl"].as_str() }
        .map(String::from)
        .or_else(|| v["commitUrl"].as_str().map(String::from))
        .ok_or_else(|| anyhow!("commit: the Hub's answer has no commitUrl"))?;
    tracing::info!("pushed {} file(s) ({} through LFS) to {repo_id}: {commit_url}", files.len(), n_lfs);
    Ok(commit_url)
}

/// The commit through hf-hub: `Xet` (the Hub's answer to the LFS batch) or `regular` (no LFS
/// file) says which, for the log.
fn commit_with_hf_hub(cfg: &HubConfig, repo_id: &str, revision: &str, create_pr: bool, message: &str, files: &[LocalFile], how: &str) -> Result<String> {
    use hf_hub::repository::CommitOperation;
    let ops = files
        .iter()
        .map(|f| match &f.source {
            Source::Disk(p) => CommitOperation::add_file(f.path.clone(), p.clone()),
            Source::Memory(b) => CommitOperation::add_bytes(f.path.clone(), b.clone()),
        })
        .collect();
    let info = cfg
        .model(repo_id)?
        .create_commit()
        .operations(ops)
        .commit_message(message)
        .revision(revision)
        .create_pr(create_pr)
        .progress(Progress::new(repo_id))
        .send()
        .map_err(|e| hub_error(e, cfg, repo_id).context(format!("commit to {repo_id}")))?;
    let url = if create_pr { info.pr_url.clone().or(info.commit_url.clone()) } else { info.commit_url.clone() }
        .ok_or_else(|| anyhow!("commit to {repo_id}: the Hub's answer has no commit URL"))?;
    let n_lfs = files.iter().filter(|f| f.lfs).count();
    tracing::info!("pushed {} file(s) ({n_lfs} through {how}) to {repo_id}: {url}", files.len());
    Ok(url)
}

fn create_repo(cfg: &HubConfig, repo_id: &str, private: bool) -> Result<()> {
    cfg.client()?
        .create_repository()
        .repo_id(repo_id)
        .repo_type(hf_hub::repository::RepoTypeModel)
        .private(private)
        .exist_ok(true)
        .send()
        .map_err(|e| hub_error(e, cfg, repo_id).context(format!("cannot create the repo {repo_id}")))?;
    Ok(())
}

fn ensure_branch(cfg: &HubConfig, repo_id: &str, branch: &str) -> Result<()> {
    let repo = cfg.model(repo_id)?;
    if !repo.revision_exists().revision(branch).send().map_err(|e| hub_error(e, cfg, repo_id))? {
        repo.create_branch().branch(branch).send().map_err(|e| hub_error(e, cfg, repo_id).context(format!("cannot create the branch {branch}")))?;
        tracing::info!("created branch {branch} of {repo_id}");
    }
    Ok(())
}

fn str_map(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str().map(String::from).or_else(|| v.as_u64().map(|n| n.to_string()))?)))
        .collect()
}

/// What the Hub's LFS batch chose.
#[derive(Debug, PartialEq)]
enum Transfer {
    /// Uploaded here through Git LFS (`basic` or `multipart`).
    Lfs,
    /// Large files go through Xet: nothing was uploaded, hf-hub commits instead.
    Xet,
}

fn upload_lfs(client: &Client, repo_id: &str, revision: &str, create_pr: bool, files: &[&LocalFile]) -> Result<Transfer> {
    let mut payload = json!({
        "operation": "upload",
        "transfers": ["basic", "multipart", "xet"],
        "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
        "hash_algo": "sha256",
    });
    if !create_pr {
        payload["ref"] = json!({"name": revision});
    }
    let lfs_headers = [("Accept", "application/vnd.git-lfs+json".to_string()), ("Content-Type", "application/vnd.git-lfs+json".to_string())];
    let url = client.url(&format!("/{repo_id}.git/info/lfs/objects/batch"));
    let body = serde_json::to_vec(&payload)?;
    let r = client.send("POST", &url, &lfs_headers, Body::Bytes(&body)).context("LFS batch")?;
    let batch = read_json(r, &url)?;
    if batch["transfer"] == "xet" {
        return Ok(Transfer::Xet);
    }
    for obj in batch["objects"].as_array().ok_or_else(|| anyhow!("LFS batch: malformed answer"))? {
        let oid = obj["oid"].as_str().unwrap_or_default();
        let f = files.iter().find(|f| f.sha256 == oid).ok_or_else(|| anyhow!("LFS batch: unexpected object {oid}"))?;
        if let Some(err) = obj.get("error") {
            bail!("LFS batch refused {}: {}", f.path, err["message"].as_str().unwrap_or("error"));
        }
        let Some(upload) = obj["actions"].get("upload") else {
            tracing::info!("{}: already on the Hub", f.path);
            continue;
        };
        let Source::Disk(path) = &f.source else { bail!("internal: in-memory LFS file") };
        let href = upload["href"].as_str().ok_or_else(|| anyhow!("LFS batch: no href for {}", f.path))?;
        let header = str_map(&upload["header"]);
        let pb = indicatif::ProgressBar::with_draw_target(Some(f.size), indicatif::ProgressDrawTarget::stderr());
        pb.set_message(f.path.clone());
        if let Some(chunk) = header.iter().find(|(k, _)| k == "chunk_size").map(|(_, v)| v.parse::<u64>()) {
            let chunk = chunk.map_err(|_| anyhow!("LFS batch: bad chunk_size"))?;
            let mut parts: Vec<(u64, &str)> = header.iter().filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()))).collect();
            parts.sort();
            let n = f.size.div_ceil(chunk.max(1));
            if parts.len() as u64 != n || chunk == 0 {
                bail!("LFS multipart: {} part URLs for {} bytes in chunks of {chunk}", parts.len(), f.size);
            }
            let mut etags = vec![];
            for (i, (num, part_url)) in parts.iter().enumerate() {
                let offset = i as u64 * chunk;
                let len = chunk.min(f.size - offset);
                let r = client
                    .send_anonymous("PUT", part_url, &[], Body::File { path: path.clone(), offset, len })
                    .with_context(|| format!("uploading part {num} of {}", f.path))?;
                let etag = r.header("ETag").filter(|e| !e.is_empty()).ok_or_else(|| anyhow!("part {num} of {}: no ETag", f.path))?.to_string();
                etags.push(json!({"partNumber": num, "etag": etag}));
                pb.inc(len);
            }
            let body = serde_json::to_vec(&json!({"oid": oid, "parts": etags}))?;
            client.send_anonymous("POST", href, &lfs_headers, Body::Bytes(&body)).with_context(|| format!("completing the upload of {}", f.path))?;
            tracing::info!("uploaded {} ({} bytes, LFS multipart, {} parts)", f.path, f.size, parts.len());
        } else {
            let hs: Vec<(&str, String)> = header.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            client
                .send_anonymous("PUT", href, &hs, Body::File { path: path.clone(), offset: 0, len: f.size })
                .with_context(|| format!("uploading {}", f.path))?;
            pb.inc(f.size);
            tracing::info!("uploaded {} ({} bytes, LFS)", f.path, f.size);
        }
        pb.finish_and_clear();
        if let Some(verify) = obj["actions"].get("verify") {
            let vurl = verify["href"].as_str().ok_or_else(|| anyhow!("LFS verify: no href"))?;
            let mut hs: Vec<(&str, String)> = lfs_headers.to_vec();
            let extra = str_map(&verify["header"]);
            hs.extend(extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
            let body = serde_json::to_vec(&json!({"oid": oid, "size": f.size}))?;
            client.send("POST", vurl, &hs, Body::Bytes(&body)).with_context(|| format!("verifying {}", f.path))?;
        }
    }
    Ok(Transfer::Lfs)
}
