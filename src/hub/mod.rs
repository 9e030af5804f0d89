//! The Hugging Face Hub: downloads through the same cache huggingface_hub uses
//! (`models--org--name/{blobs,refs,snapshots}`), so a model fetched by one is found by the other,
//! and uploads as the Hub's commit API expects them (preupload → LFS batch → one NDJSON commit).
//!
//! Settings come from the same environment variables as Python's client, read once into a
//! [`HubConfig`] that is then passed explicitly: `HF_ENDPOINT`, `HF_TOKEN` (or the token file,
//! `$HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_CACHE` (or `$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) and `HF_HUB_OFFLINE`.
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
        HubConfig { endpoint, token, cache_dir, offline }
    }

    /// `models--org--name` under the cache.
    pub fn repo_cache(&self, repo_id: &str) -> PathBuf {
        self.cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
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

/// A 40-hex-digit commit hash.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
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

/// Percent-encodes a path in a repo, keeping `/`.
pub fn quote_path(s: &str) -> String {
    s.split('/').map(quote).collect::<Vec<_>>().join("/")
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
        assert_eq!(quote_path("a b/c.json"), "a%20b/c.json");
    }

    #[test]
    fn token_is_hidden() {
        let t = Token::new("hf_abc").unwrap();
        assert!(!format!("{t:?}").contains("hf_abc"));
    }
}
