//! The Hugging Face Hub, through huggingface's own Rust client (the `hf-hub` crate): downloads
//! into the cache huggingface_hub uses (`models--org--name/{blobs,refs,snapshots}`, so a model
//! fetched by one is found by the other), repo creation, and commits, with Xet transfers where
//! the Hub offers Xet. Where an endpoint offers only Git LFS (hf-hub would inline the files into
//! the commit), [`upload`] keeps its own LFS upload and NDJSON commit.
//!
//! Settings come from the same environment variables as Python's client, read once into a
//! [`HubConfig`] that is then passed explicitly (also to hf-hub, which is given the endpoint,
//! token and cache directory rather than reading them itself): `HF_ENDPOINT`, `HF_TOKEN` (or the
//! token file, `$HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_CACHE` (or `$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) and `HF_HUB_OFFLINE` (cache only: `local_files_only`).
//!
//! The token only ever travels in the `Authorization` header of requests to the endpoint's own
//! host; it is never formatted into a message, logged, or written to disk.

pub mod card;
pub mod download;
pub mod http;
pub mod upload;

use anyhow::{bail, Result};
use std::path::PathBuf;

pub use download::{cached_snapshot, snapshot_download, Filter};
pub use upload::{push, PushOptions};

/// A Hub access token. Has no `Display`, and `Debug` hides it, so it cannot end up in a message.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(s: &str) -> Option<Token> {
        let s = s.trim();
        (!s.is_empty()).then(|| Token(s.to_string()))
    }
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
    fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// Where the Hub is and who we are.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// `https://huggingface.co`, without a trailing slash.
    pub endpoint: String,
    pub token: Option<Token>,
    /// The hub cache directory (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never touch the network, use the cache only.
    pub offline: bool,
    /// `FTSCRIPT_HUB_BACKOFF_MS`: the first retry delay (tests shorten it); else each client's own.
    pub backoff: Option<std::time::Duration>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
}

impl HubConfig {
    /// Reads the settings from the environment, the way huggingface_hub does.
    pub fn from_env() -> HubConfig {
        let home_dir = || env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let hf_home = env("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home_dir().join(".cache")).join("huggingface"));
        let cache_dir = env("HF_HUB_CACHE")
            .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token = env("HF_TOKEN")
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| Token::new(&t))
            .or_else(|| std::fs::read_to_string(&token_file).ok().and_then(|t| Token::new(&t)));
        let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string();
        let offline = env("HF_HUB_OFFLINE").map(|v| truthy(&v)).unwrap_or(false);
        let backoff = env("FTSCRIPT_HUB_BACKOFF_MS").and_then(|v| v.parse().ok()).map(std::time::Duration::from_millis);
        HubConfig { endpoint, token, cache_dir, offline, backoff }
    }

    /// An hf-hub client for these settings (endpoint, token and cache directory given explicitly).
    pub fn client(&self) -> Result<hf_hub::HFClientSync> {
        let mut b = hf_hub::HFClient::builder()
            .endpoint(self.endpoint.clone())
            .cache_dir(self.cache_dir.clone())
            .user_agent(format!("ftscript/{}", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.token {
            b = b.token(t.secret());
        }
        if let Some(d) = self.backoff {
            b = b.retry_base_delay(d);
        }
        b.build_sync().map_err(|e| anyhow::anyhow!("cannot set up the Hub client for {}: {e}", self.endpoint))
    }

    /// The hf-hub handle of the model repo `org/name`.
    pub fn model(&self, repo_id: &str) -> Result<hf_hub::HFRepositorySync<hf_hub::repository::RepoTypeModel>> {
        check_repo_id(repo_id)?;
        let (org, name) = repo_id.split_once('/').unwrap();
        Ok(self.client()?.model(org, name))
    }
}

/// An hf-hub error as ftscript says it: naming the repo (and the file), with what to check.
pub fn hub_error(e: hf_hub::HFError, cfg: &HubConfig, repo_id: &str) -> anyhow::Error {
    use hf_hub::HFError as E;
    // hf-hub names the error after the request (a revision's listing), the Hub's code after the cause
    let repo_missing = match &e {
        E::RepoNotFound { .. } => true,
        E::RevisionNotFound { context: Some(c), .. } | E::EntryNotFound { context: Some(c), .. } => c.error_code.as_deref() == Some("RepoNotFound"),
        _ => false,
    };
    match e {
        _ if repo_missing => anyhow::anyhow!("`{repo_id}` was not found on {} (a private or gated repo needs HF_TOKEN)", cfg.endpoint),
        E::RevisionNotFound { revision, .. } => anyhow::anyhow!("revision {revision} of `{repo_id}` was not found on {}", cfg.endpoint),
        E::EntryNotFound { path, .. } => anyhow::anyhow!("{path} was not found in `{repo_id}` on {}", cfg.endpoint),
        E::AuthRequired { .. } => anyhow::anyhow!("{repo_id}: the Hub refused the credentials (check HF_TOKEN or the token file)"),
        E::Forbidden { .. } => anyhow::anyhow!("{repo_id}: forbidden (the token lacks permission; check HF_TOKEN)"),
        E::LocalEntryNotFound { .. } if cfg.offline => anyhow::anyhow!(
            "`{repo_id}` is not in the Hub cache {} and HF_HUB_OFFLINE is set, so it cannot be downloaded",
            cfg.cache_dir.display()
        ),
        E::LocalEntryNotFound { .. } => anyhow::anyhow!("`{repo_id}` is not in the Hub cache {}", cfg.cache_dir.display()),
        e => anyhow::anyhow!("{repo_id}: {e}"),
    }
}

/// True for errors where the Hub could not be reached or failed (connection, timeout, 5xx).
pub fn unreachable(e: &hf_hub::HFError) -> bool {
    match e {
        hf_hub::HFError::Request { .. } => true,
        hf_hub::HFError::Http { context } => context.status.as_u16() >= 500,
        _ => false,
    }
}

/// hf-hub's progress events as one byte bar on stderr, and a log line per finished file.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    files: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Progress {
    pub(crate) fn new(what: &str) -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        Progress { bar, files: Default::default() }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

impl hf_hub::progress::ProgressHandler for Progress {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent as D, FileStatus, ProgressEvent as P, UploadEvent as U};
        match event {
            P::Download(D::Start { total_bytes, .. }) | P::Upload(U::Start { total_bytes, .. }) => self.bar.set_length(*total_bytes),
            P::Download(D::Progress { files }) => {
                let mut seen = self.files.lock().unwrap();
                for f in files {
                    let before = seen.insert(f.filename.clone(), f.bytes_completed).unwrap_or(0);
                    self.bar.inc(f.bytes_completed.saturating_sub(before));
                    if f.status == FileStatus::Complete && f.total_bytes > 0 {
                        tracing::info!("downloaded {} ({} bytes)", f.filename, f.total_bytes);
                    }
                }
            }
            P::Download(D::AggregateProgress { bytes_completed, total_bytes, .. }) => {
                self.bar.set_length(*total_bytes);
                self.bar.set_position(*bytes_completed);
            }
            P::Upload(U::Progress { bytes_completed, .. }) => self.bar.set_position(*bytes_completed),
            _ => {}
        }
    }
}

/// `org/name` as the Hub accepts it (letters, digits, `-`, `_`, `.`; no `--` or `..`).
pub fn is_repo_id(s: &str) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    match s.split_once('/') {
        Some((org, name)) => ok_part(org) && ok_part(name),
        None => false,
    }
}

pub fn check_repo_id(s: &str) -> Result<()> {
    if !is_repo_id(s) {
        bail!("`{s}` is not a Hub repo id (expected `org/name`: letters, digits, `-`, `_`, `.`)");
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters (`quote(s, safe="")`).
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Hex sha256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(data))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("meta-llama/Llama-2-7b-hf"));
        assert!(is_repo_id("org/tiny.v1_2"));
        assert!(!is_repo_id("tiny"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("org/na--me"));
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn token_is_hidden() {
        let t = Token::new("hf_abc").unwrap();
        assert!(!format!("{t:?}").contains("hf_abc"));
    }
}
