//! Tokenization of a whole dataset on worker threads, cached on disk by content: the same
//! texts, tokenizer and options load the ids back instead of tokenizing again.
//!
//! Cache file (`tokenized-<key>.bin`, little-endian): magic `FTSTOK01`, the 32-byte key, the
//! example count (u64), then per example its length (u32), the ids (i32 each) and the labels
//! (i32 each), and last a sha256 of everything before it. Files are written under a temporary
//! name and renamed, so a reader never sees half a file; anything that does not check out is
//! ignored with a warning and the data is tokenized again.

use super::format::{tokenize, Example, Formatted, TokenizeOptions};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bumped whenever `tokenize` or the formats change what they produce.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FTSTOK01";
/// Below this many examples no progress bar is drawn.
const PROGRESS_MIN: usize = 2000;

/// `$FTSCRIPT_CACHE`, else `$XDG_CACHE_HOME/ftscript`, else `~/.cache/ftscript`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("FTSCRIPT_CACHE") {
        return d;
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return d.join("ftscript");
    }
    var("HOME").unwrap_or_else(std::env::temp_dir).join(".cache").join("ftscript")
}

/// The cache key: a sha256 over the format version, the tokenizer, the options and every text.
pub fn cache_key(items: &[Formatted], tok: &Tokenizer, o: &TokenizeOptions) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ftscript-tokenized");
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(tok.fingerprint().as_bytes());
    h.update((o.max_length as u64).to_le_bytes());
    h.update([o.train_on_prompt as u8]);
    h.update((items.len() as u64).to_le_bytes());
    for f in items {
        let (tag, a, b) = f.parts();
        h.update([tag]);
        h.update((a.len() as u64).to_le_bytes());
        h.update(a.as_bytes());
        h.update((b.len() as u64).to_le_bytes());
        h.update(b.as_bytes());
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokenizes every item (in order), or loads the result from the cache.
/// Fails when no example keeps a token to learn from (every prompt reaches `max_length`).
pub fn tokenize_all(items: Vec<Formatted>, tok: &Tokenizer, o: &TokenizeOptions) -> Result<Vec<Example>> {
    let examples = tokenize_all_in(&cache_dir(), &items, tok, o)?;
    if !examples.is_empty() && examples.iter().all(|e| e.n_labelled() == 0) {
        let longest = items.iter().filter_map(|f| crate::data::format::prompt_tokens(f, tok)).max().unwrap_or(0);
        anyhow::bail!(
            "no example keeps a token to learn from: max_length {} ends every one inside its prompt (the longest prompt has {longest} tokens); raise max_length or shorten the prompts",
            o.max_length
        );
    }
    Ok(examples)
}

/// `tokenize_all` with an explicit cache directory.
pub fn tokenize_all_in(dir: &Path, items: &[Formatted], tok: &Tokenizer, o: &TokenizeOptions) -> Result<Vec<Example>> {
    let key = cache_key(items, tok, o);
    let path = dir.join(format!("tokenized-{}.bin", hex(&key)));
    if path.exists() {
        match read_cache(&path, &key) {
            Ok(examples) if examples.len() == items.len() => {
                tracing::info!("tokenized data: cache hit ({} examples)", examples.len());
                return Ok(examples);
            }
            Ok(examples) => tracing::warn!(
                "ignoring tokenized-data cache {}: {} examples, expected {}; tokenizing again",
                path.display(),
                examples.len(),
                items.len()
            ),
            Err(e) => tracing::warn!("ignoring tokenized-data cache {}: {e:#}; tokenizing again", path.display()),
        }
    }
    if tok.eos_id.is_none() {
        tracing::warn!("the tokenizer has no EOS token: examples end without one");
    }
    let started = std::time::Instant::now();
    let examples = tokenize_parallel(items, tok, o)?;
    let tokens: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let truncated = examples.iter().filter(|e| o.max_length > 0 && e.input_ids.len() == o.max_length).count();
    let unlabelled = examples.iter().filter(|e| e.n_labelled() == 0).count();
    tracing::info!(
        "tokenized {} examples ({tokens} tokens) in {:.1}s",
        examples.len(),
        started.elapsed().as_secs_f64()
    );
    if truncated > 0 {
        tracing::info!("{truncated} of {} examples reach max_length {} (cut at the end)", examples.len(), o.max_length);
    }
    if unlabelled > 0 {
        tracing::warn!(
            "{unlabelled} of {} examples have no tokens to learn from (the prompt fills max_length {})",
            examples.len(),
            o.max_length
        );
    }
    if let Err(e) = write_cache(dir, &path, &key, &examples) {
        tracing::warn!("could not write the tokenized-data cache {}: {e:#}", path.display());
    }
    Ok(examples)
}

/// Tokenizes on worker threads (one per core, at most 8), keeping the order; the first failing
/// record (lowest index) is the error.
fn tokenize_parallel(items: &[Formatted], tok: &Tokenizer, o: &TokenizeOptions) -> Result<Vec<Example>> {
    let n = items.len();
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8).min(n.max(1));
    if workers <= 1 || n < 64 {
        return items
            .iter()
            .enumerate()
            .map(|(i, f)| tokenize(f, tok, o).map_err(|e| anyhow::anyhow!("record {i}: {e:#}")))
            .collect();
    }
    let bar = if n >= PROGRESS_MIN {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("tokenizing {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    const CHUNK: usize = 64;
    let next = AtomicUsize::new(0);
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Vec<Result<Example>>)>(workers * 4);
    let mut out: Vec<Option<Example>> = vec![None; n];
    let mut first_error: Option<(usize, anyhow::Error)> = None;
    std::thread::scope(|s| {
        for _ in 0..workers {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || loop {
                let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                if start >= n {
                    break;
                }
                let end = (start + CHUNK).min(n);
                let chunk: Vec<Result<Example>> = items[start..end].iter().map(|f| tokenize(f, tok, o)).collect();
                if tx.send((start, chunk)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (start, chunk) in rx {
            let len = chunk.len();
            for (j, r) in chunk.into_iter().enumerate() {
                match r {
                    Ok(ex) => out[start + j] = Some(ex),
                    Err(e) => {
                        if first_error.as_ref().is_none_or(|(i, _)| start + j < *i) {
                            first_error = Some((start + j, e));
                        }
                        // stop handing out work
                        next.store(n, Ordering::Relaxed);
                    }
                }
            }
            if let Some(b) = &bar {
                b.inc(len as u64);
            }
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some((i, e)) = first_error {
        bail!("record {i}: {e:#}");
    }
    Ok(out.into_iter().map(|e| e.expect("every chunk was tokenized")).collect())
}

fn write_cache(dir: &Path, path: &Path, key: &[u8; 32], examples: &[Example]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let total: usize = examples.iter().map(|e| 4 + 8 * e.input_ids.len()).sum();
    let mut buf = Vec::with_capacity(8 + 32 + 8 + total + 32);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(key);
    buf.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    for e in examples {
        if e.labels.len() != e.input_ids.len() {
            bail!("internal: labels and input_ids differ in length");
        }
        buf.extend_from_slice(&(e.input_ids.len() as u32).to_le_bytes());
        for v in e.input_ids.iter().chain(e.labels.iter()) {
            let v = i32::try_from(*v).context("token id out of i32 range")?;
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    let digest = Sha256::digest(&buf);
    buf.extend_from_slice(&digest);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:?}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("tokenized"),
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, &buf).with_context(|| format!("cannot write {}", tmp.display()))?;
    crate::nn::weights::persist(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn read_cache(path: &Path, key: &[u8; 32]) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 8 + 32 + 8 + 32 {
        bail!("file too short");
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        bail!("checksum mismatch");
    }
    if &body[..8] != MAGIC {
        bail!("not a tokenized-data cache file (bad magic)");
    }
    if &body[8..40] != key {
        bail!("the key inside the file does not match its name");
    }
    let mut at = 40;
    let mut take = |k: usize| -> Result<&[u8]> {
        let s = body.get(at..at + k).context("file truncated")?;
        at += k;
        Ok(s)
    };
    let count = u64::from_le_bytes(take(8)?.try_into().unwrap()) as usize;
    let mut examples = Vec::with_capacity(count.min(1 << 24));
    let read_i32s = |b: &[u8]| -> Vec<i64> { b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect() };
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        let input_ids = read_i32s(take(4 * len)?);
        let labels = read_i32s(take(4 * len)?);
        examples.push(Example { input_ids, labels });
    }
    if at != body.len() {
        bail!("{} trailing bytes", body.len() - at);
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::tests::test_tokenizer;

    fn items(n: usize) -> Vec<Formatted> {
        let words = ["hello", "world", "good", "bye", "a", "b", "c"];
        (0..n)
            .map(|i| {
                let w = |k: usize| words[(i * 7 + k * 3) % words.len()];
                if i % 3 == 0 {
                    Formatted::Text(format!("{} {} {}", w(0), w(1), w(2)))
                } else {
                    Formatted::Pair { prompt: format!("{} {}", w(0), w(1)), response: w(2).to_string() }
                }
            })
            .collect()
    }

    #[test]
    fn parallel_matches_sequential_and_cache_hit_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let tok = test_tokenizer(None);
        let o = TokenizeOptions { max_length: 5, train_on_prompt: false };
        let items = items(3000);
        let expected: Vec<Example> = items.iter().map(|f| tokenize(f, &tok, &o).unwrap()).collect();
        let first = tokenize_all_in(dir.path(), &items, &tok, &o).unwrap();
        assert_eq!(first, expected);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let second = tokenize_all_in(dir.path(), &items, &tok, &o).unwrap();
        assert_eq!(second, expected);
        let key = cache_key(&items, &tok, &o);
        assert_eq!(read_cache(&dir.path().join(format!("tokenized-{}.bin", hex(&key))), &key).unwrap(), expected);
        // other options or texts are other keys
        assert_ne!(key, cache_key(&items, &tok, &TokenizeOptions { train_on_prompt: true, ..o.clone() }));
        assert_ne!(key, cache_key(&items[1..], &tok, &o));
    }

    #[test]
    fn corrupt_cache_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let tok = test_tokenizer(None);
        let o = TokenizeOptions::default();
        let items = items(10);
        let good = tokenize_all_in(dir.path(), &items, &tok, &o).unwrap();
        let key = cache_key(&items, &tok, &o);
        let path = dir.path().join(format!("tokenized-{}.bin", hex(&key)));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_cache(&path, &key).is_err());
        assert_eq!(tokenize_all_in(dir.path(), &items, &tok, &o).unwrap(), good);
        // rewritten, so it reads back now
        assert_eq!(read_cache(&path, &key).unwrap(), good);
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(tokenize_all_in(dir.path(), &items, &tok, &o).unwrap(), good);
    }

    #[test]
    fn small_and_empty_sets() {
        let dir = tempfile::tempdir().unwrap();
        let tok = test_tokenizer(None);
        let o = TokenizeOptions::default();
        let items = items(5);
        let examples = tokenize_all_in(dir.path(), &items, &tok, &o).unwrap();
        assert_eq!(examples.len(), 5);
        assert!(tokenize_all_in(dir.path(), &[], &tok, &o).unwrap().is_empty());
    }
}
