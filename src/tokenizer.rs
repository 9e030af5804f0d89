//! A model's tokenizer: `tokenizer.json` (the `tokenizers` format) plus the special tokens and
//! chat template from `tokenizer_config.json`.

use anyhow::{Context, Result};
use std::path::Path;

/// Files that make up a Hugging Face tokenizer, copied verbatim when a model is saved.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<i64>,
    pub eos_id: Option<i64>,
    /// The padding id: the tokenizer's pad token, else EOS (as fine-tuning recipes do).
    pub pad_id: i64,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The tokenizer files as read, written back unchanged by `save`.
    files: Vec<(String, Vec<u8>)>,
}

/// `"<s>"` or `{"content": "<s>", ...}` (an AddedToken) → `"<s>"`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Reads the tokenizer files of a model directory.
    pub fn from_dir(dir: &Path, bos_fallback: Option<i64>, eos_fallback: Option<i64>, pad_fallback: Option<i64>) -> Result<Self> {
        let mut files = vec![];
        for name in TOKENIZER_FILES {
            let p = dir.join(name);
            if p.exists() {
                files.push((name.to_string(), std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?));
            }
        }
        if !files.iter().any(|(n, _)| n == "tokenizer.json") {
            anyhow::bail!("{}: missing tokenizer.json", dir.display());
        }
        Self::from_files(files, &dir.display().to_string(), bos_fallback, eos_fallback, pad_fallback)
    }

    /// Builds a tokenizer from in-memory files (name → bytes); `origin` names them in errors.
    pub fn from_files(
        files: Vec<(String, Vec<u8>)>,
        origin: &str,
        bos_fallback: Option<i64>,
        eos_fallback: Option<i64>,
        pad_fallback: Option<i64>,
    ) -> Result<Self> {
        let get = |n: &str| files.iter().find(|(f, _)| f == n).map(|(_, b)| b.as_slice());
        let json = get("tokenizer.json").with_context(|| format!("{origin}: missing tokenizer.json"))?;
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| anyhow::anyhow!("{origin}/tokenizer.json: {e}"))?;
        let config: serde_json::Value = match get("tokenizer_config.json") {
            Some(b) => serde_json::from_slice(b).with_context(|| format!("{origin}/tokenizer_config.json: not valid JSON"))?,
            None => serde_json::json!({}),
        };
        let special: serde_json::Value = match get("special_tokens_map.json") {
            Some(b) => serde_json::from_slice(b).unwrap_or(serde_json::json!({})),
            None => serde_json::json!({}),
        };
        let token = |key: &str| token_string(config.get(key)).or_else(|| token_string(special.get(key)));
        let id_of = |t: &Option<String>| t.as_ref().and_then(|t| inner.token_to_id(t)).map(|i| i as i64);
        let bos_token = token("bos_token");
        let eos_token = token("eos_token");
        let pad_token = token("pad_token");
        let bos_id = id_of(&bos_token).or(bos_fallback);
        let eos_id = id_of(&eos_token).or(eos_fallback);
        let pad_id = id_of(&pad_token).or(pad_fallback).or(eos_id).unwrap_or(0);
        let chat_template = match get("chat_template.jinja") {
            Some(b) => Some(String::from_utf8_lossy(b).to_string()),
            None => match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            },
        };
        Ok(Tokenizer { inner, bos_id, eos_id, pad_id, chat_template, bos_token, eos_token, files })
    }

    /// Token ids of `text`; with `add_special`, BOS/EOS as the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Token ids of a text the model continues (a prompt, a training text's start):
    /// `encode(text, true)` without a doubled BOS (a chat template that writes `bos_token`
    /// itself) and without an EOS the post-processor appends (it belongs after the response).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode(text, true)?;
        if let Some(bos) = self.bos_id {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
            }
        }
        if let (Some(eos), Some(&last)) = (self.eos_id, ids.last()) {
            if last == eos && self.encode(text, false)?.last() != Some(&eos) {
                ids.pop();
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` and, per token, the byte range of `text` it covers (empty for a
    /// special token the post-processor adds).
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<i64>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok((enc.get_ids().iter().map(|&i| i as i64).collect(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    /// A sha256 (hex) over the tokenizer files and the resolved special ids: two tokenizers with
    /// the same fingerprint turn text into the same ids (cache keys use it).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut files: Vec<&(String, Vec<u8>)> = self.files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, bytes) in files {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        h.update(format!("bos={:?} eos={:?} pad={}", self.bos_id, self.eos_id, self.pad_id).as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Adds `tokens` to the vocabulary as transformers' `tokenizer.add_tokens(tokens,
    /// special_tokens=special)` does: each new one gets the next id (`len(tokenizer)`) and is
    /// matched whole before the model's own tokenization (a special one is also skipped when
    /// decoding); a token the tokenizer already has keeps its id. Both `tokenizer.json`
    /// (`added_tokens`) and `tokenizer_config.json` (`added_tokens_decoder`) record it, so the
    /// saved tokenizer loads the same in transformers. Returns each token's id.
    pub fn add_tokens(&mut self, tokens: &[String], special: bool) -> Result<Vec<i64>> {
        let mut json: serde_json::Value = serde_json::from_slice(self.file("tokenizer.json").context("no tokenizer.json")?).context("tokenizer.json: not valid JSON")?;
        let mut config: serde_json::Value = match self.file("tokenizer_config.json") {
            Some(b) => serde_json::from_slice(b).context("tokenizer_config.json: not valid JSON")?,
            None => serde_json::json!({}),
        };
        let mut next = self.vocab_size() as i64;
        let mut ids = vec![];
        for token in tokens {
            anyhow::ensure!(!token.is_empty(), "add_tokens: a token cannot be empty");
            if let Some(id) = self.token_to_id(token).or_else(|| tokens.iter().position(|t| t == token).and_then(|i| ids.get(i).copied())) {
                ids.push(id);
                continue;
            }
            let entry = serde_json::json!({"id": next, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": !special, "special": special});
            json["added_tokens"].as_array_mut().context("tokenizer.json has no `added_tokens` list")?.push(entry);
            let decoder = config.as_object_mut().context("tokenizer_config.json is not an object")?.entry("added_tokens_decoder").or_insert_with(|| serde_json::json!({}));
            decoder[next.to_string()] = serde_json::json!({"content": token, "lstrip": false, "normalized": !special, "rstrip": false, "single_word": false, "special": special});
            ids.push(next);
            next += 1;
        }
        let mut files = self.files.clone();
        for (name, bytes) in files.iter_mut() {
            match name.as_str() {
                "tokenizer.json" => *bytes = serde_json::to_vec_pretty(&json)?,
                "tokenizer_config.json" => *bytes = serde_json::to_vec_pretty(&config)?,
                _ => {}
            }
        }
        if !files.iter().any(|(n, _)| n == "tokenizer_config.json") {
            files.push(("tokenizer_config.json".into(), serde_json::to_vec_pretty(&config)?));
        }
        *self = Self::from_files(files, "the tokenizer", self.bos_id, self.eos_id, Some(self.pad_id))?;
        Ok(ids)
    }

    /// One of the tokenizer files as read (`tokenizer.json`, `tokenizer_config.json`, ...).
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
    }

    /// Writes the tokenizer files into `dir` (each atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        for (name, bytes) in &self.files {
            crate::nn::weights::write_atomic(&dir.join(name), bytes)?;
        }
        Ok(())
    }
}
