//! Run metrics on disk: `metrics.jsonl` (one JSON object per log/eval line) and a TensorBoard
//! event file (`events.out.tfevents.*`) in the run directory.
//!
//! TensorBoard files are TFRecord streams of `Event` protobufs: each record is
//! `len: u64 LE | masked_crc32c(len): u32 | data | masked_crc32c(data): u32`, with
//! `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. An `Event` holds `wall_time` (field 1,
//! double), `step` (2, varint), `file_version` (3, string, first record only) or `summary`
//! (5) = repeated `Value` (1) { `tag` (1, string), `simple_value` (2, float) }.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub struct RunLogger {
    jsonl: Option<File>,
    events: Option<File>,
}

/// CRC-32C (Castagnoli), bitwise.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn event(step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![0x09];
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = len.to_vec();
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

impl RunLogger {
    /// A logger that writes nothing (used off the main process).
    pub fn disabled() -> RunLogger {
        RunLogger { jsonl: None, events: None }
    }

    pub fn create(dir: &Path) -> Result<RunLogger> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))
            .with_context(|| format!("cannot open {}/metrics.jsonl", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        // TensorBoard reads a directory's files in name order: the nanoseconds keep a resumed
        // run's file after the interrupted one's when both started within a second
        let path = dir.join(format!("events.out.tfevents.{}.{:09}.{}.{}", now.as_secs(), now.subsec_nanos(), host.trim(), std::process::id()));
        let mut events = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        events.write_all(&record(&event(0, |e| bytes_field(3, b"brain.Event:2", e))))?;
        Ok(RunLogger { jsonl: Some(jsonl), events: Some(events) })
    }

    /// A run resumed from its checkpoint at `step` forgets what an interrupted run logged after
    /// it: metrics.jsonl keeps its whole lines up to `step` (rewritten under a temporary name, then
    /// renamed), and the event file opens with a `SessionLog.START` at `step + 1`, which makes
    /// TensorBoard's readers drop the older files' events from there on.
    pub fn resume_at(&mut self, dir: &Path, step: usize) -> Result<()> {
        if self.jsonl.is_none() {
            return Ok(());
        }
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        // a line a killed run left half-written does not parse: it goes too
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).ok().is_some_and(|v| v.get("step").and_then(|s| s.as_u64()).is_none_or(|s| s as usize <= step)))
            .collect();
        let dropped = text.lines().count() - kept.len();
        if dropped > 0 {
            let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
            crate::nn::weights::write_atomic(&path, body.as_bytes())?;
            self.jsonl = Some(std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?);
            tracing::info!("resume: dropped {dropped} metrics line(s) an interrupted run logged after step {step}");
        }
        if let Some(f) = &mut self.events {
            // Event.session_log (field 7) = SessionLog { status: START }
            f.write_all(&record(&event(step as i64 + 1, |e| bytes_field(7, &[0x08, 0x01], e))))?;
            f.flush()?;
        }
        Ok(())
    }

    /// Appends one metrics line; numeric entries (other than step/epoch) become TensorBoard scalars
    /// tagged `train/<name>` or `eval/<name>`.
    pub fn log(&mut self, step: usize, metrics: &Map<String, Value>) -> Result<()> {
        if let Some(f) = &mut self.jsonl {
            // one write per line, so that a kill leaves whole lines or a torn last one
            f.write_all(format!("{}\n", Value::Object(metrics.clone())).as_bytes())?;
            f.flush()?;
        }
        if let Some(f) = &mut self.events {
            let mut summary = vec![];
            for (k, v) in metrics {
                if k == "step" {
                    continue;
                }
                if let Some(x) = v.as_f64() {
                    let tag = if let Some(rest) = k.strip_prefix("eval_") { format!("eval/{rest}") } else { format!("train/{k}") };
                    let mut value = vec![];
                    bytes_field(1, tag.as_bytes(), &mut value);
                    value.push(0x15);
                    value.extend_from_slice(&(x as f32).to_le_bytes());
                    bytes_field(1, &value, &mut summary);
                }
            }
            f.write_all(&record(&event(step as i64, |e| bytes_field(5, &summary, e))))?;
            f.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_known_value() {
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
    }
}
