//! Blocking HTTP for the Git LFS path of [`super::upload`] (ureq + rustls), used where the Hub
//! offers only LFS, which hf-hub does not upload through: retries with backoff on 429/5xx and
//! connection errors, Hub error messages (`X-Error-Message`, `{"error": ...}`) in the returned
//! errors, and the token attached only to requests for the endpoint's own host.

use super::HubConfig;
use anyhow::{anyhow, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

/// What a request sends.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset` (re-read on every attempt).
    File { path: PathBuf, offset: u64, len: u64 },
}

/// An HTTP status the Hub answered with (after retries), with its message.
#[derive(Debug)]
pub struct StatusError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}
impl std::error::Error for StatusError {}

pub struct Client {
    pub cfg: HubConfig,
    agent: ureq::Agent,
    /// Attempts per request (first try included).
    attempts: u32,
    /// First backoff delay; doubles each retry.
    backoff: Duration,
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

impl Client {
    pub fn new(cfg: HubConfig) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(300))
            .user_agent(&format!("ftscript/{}", env!("CARGO_PKG_VERSION")))
            .redirects(0)
            .build();
        let backoff = cfg.backoff.unwrap_or(Duration::from_secs(1));
        Client { cfg, agent, attempts: 5, backoff }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.cfg.endpoint, path)
    }

    /// True for URLs on the endpoint's host: only those get the token.
    fn is_hub(&self, url: &str) -> bool {
        host_of(url) == host_of(&self.cfg.endpoint)
    }

    /// Sends a request, following redirects by hand (the token is dropped when the host
    /// changes) and retrying 429/5xx and transport errors with exponential backoff.
    pub fn send(&self, method: &str, url: &str, headers: &[(&str, String)], body: Body) -> Result<ureq::Response> {
        self.send_with(method, url, headers, body, true)
    }

    /// `send` to a storage URL (LFS upload actions): never with the token, like huggingface_hub.
    pub fn send_anonymous(&self, method: &str, url: &str, headers: &[(&str, String)], body: Body) -> Result<ureq::Response> {
        self.send_with(method, url, headers, body, false)
    }

    fn send_with(&self, method: &str, url: &str, headers: &[(&str, String)], body: Body, auth: bool) -> Result<ureq::Response> {
        if self.cfg.offline {
            return Err(anyhow!("HF_HUB_OFFLINE is set: refusing to contact {}", host_of(url)));
        }
        let mut delay = self.backoff;
        let mut url = url.to_string();
        let mut redirects = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.agent.request(method, &url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if auth && self.is_hub(&url) {
                if let Some(t) = &self.cfg.token {
                    req = req.set("Authorization", &t.bearer());
                }
            }
            let result = match &body {
                Body::Empty => req.call(),
                Body::Bytes(b) => req.send_bytes(b),
                Body::File { path, offset, len } => {
                    let mut f = std::fs::File::open(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
                    f.seek(SeekFrom::Start(*offset))?;
                    req.set("Content-Length", &len.to_string()).send(f.take(*len))
                }
            };
            let retry_after = |r: &ureq::Response| r.header("Retry-After").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
            match result {
                Ok(r) if (300..400).contains(&r.status()) && r.header("Location").is_some() && redirects < 5 => {
                    let loc = r.header("Location").unwrap().to_string();
                    url = if loc.starts_with('/') { format!("{}{}", url.split_once("://").map(|(s, rest)| format!("{s}://{}", host_of(rest))).unwrap_or_default(), loc) } else { loc };
                    redirects += 1;
                    attempt -= 1;
                }
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(code, r)) => {
                    let retryable = code == 429 || (500..600).contains(&code);
                    if retryable && attempt < self.attempts {
                        let wait = retry_after(&r).unwrap_or(delay).min(Duration::from_secs(60));
                        tracing::warn!("{method} {}: HTTP {code}, retrying in {:.1}s ({attempt}/{})", strip_query(&url), wait.as_secs_f64(), self.attempts - 1);
                        std::thread::sleep(wait);
                        delay *= 2;
                        continue;
                    }
                    return Err(status_error(method, &url, code, r).into());
                }
                Err(ureq::Error::Transport(t)) => {
                    if attempt < self.attempts {
                        tracing::warn!("{method} {}: {}, retrying in {:.1}s", strip_query(&url), t.kind(), delay.as_secs_f64());
                        std::thread::sleep(delay);
                        delay *= 2;
                        continue;
                    }
                    return Err(anyhow!("{method} {}: {t}", strip_query(&url)));
                }
            }
        }
    }

    pub fn json(&self, method: &str, path_or_url: &str, payload: Option<&serde_json::Value>) -> Result<serde_json::Value> {
        let url = if path_or_url.starts_with("http") { path_or_url.to_string() } else { self.url(path_or_url) };
        let bytes = payload.map(|p| serde_json::to_vec(p).unwrap());
        let r = match &bytes {
            Some(b) => self.send(method, &url, &[("Content-Type", "application/json".into())], Body::Bytes(b))?,
            None => self.send(method, &url, &[], Body::Empty)?,
        };
        read_json(r, &url)
    }
}

pub fn read_json(r: ureq::Response, url: &str) -> Result<serde_json::Value> {
    let mut s = String::new();
    r.into_reader().take(256 << 20).read_to_string(&mut s)?;
    if s.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&s).map_err(|e| anyhow!("{}: invalid JSON answer: {e}", strip_query(url)))
}

/// A URL without its query string (presigned storage URLs carry signatures there).
pub fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn status_error(method: &str, url: &str, code: u16, r: ureq::Response) -> StatusError {
    let header_msg = r.header("X-Error-Message").map(String::from);
    let error_code = r.header("X-Error-Code").map(String::from);
    let mut body = String::new();
    let _ = r.into_reader().take(64 << 10).read_to_string(&mut body);
    let body_msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str().map(String::from)))
        .or_else(|| (!body.trim().is_empty() && body.len() < 300).then(|| body.trim().to_string()));
    let detail = header_msg.or(body_msg).unwrap_or_default();
    let hint = match code {
        401 => " (check HF_TOKEN or the token file)",
        403 => " (the token lacks permission)",
        404 if error_code.as_deref() == Some("RepoNotFound") => " (a private or gated repo needs HF_TOKEN)",
        _ => "",
    };
    StatusError {
        status: code,
        message: format!("{method} {}: HTTP {code}{}{hint}", strip_query(url), if detail.is_empty() { String::new() } else { format!(": {detail}") }),
    }
}
