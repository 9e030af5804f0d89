//! Datasets: JSON records (objects) loaded from JSONL or JSON-array files, shared cheaply
//! (`Rc`), shuffled and split with a seed.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

/// An immutable list of records (JSON objects); every operation returns a new dataset that
/// shares nothing mutable with the old one.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub records: Rc<Vec<Value>>,
    /// Where each record came from, kept through shuffles, splits and filters, for messages.
    places: Rc<Vec<Place>>,
    /// Where the records came from (a path, `a + b`, `array`), for messages.
    pub origin: String,
}

/// A record's source: a JSONL file's line (1-based), or its index in a JSON or Rhai array.
#[derive(Clone, Debug)]
pub struct Place {
    source: Rc<str>,
    line: Option<usize>,
    index: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.source),
            None => write!(f, "{} record {}", self.source, self.index),
        }
    }
}

impl Dataset {
    /// Records of an array (their places are their indices in it).
    pub fn from_records(records: Vec<Value>, origin: impl Into<String>) -> Dataset {
        let origin: String = origin.into();
        let source: Rc<str> = origin.as_str().into();
        let places = (0..records.len()).map(|index| Place { source: source.clone(), line: None, index }).collect();
        Dataset { records: Rc::new(records), places: Rc::new(places), origin }
    }

    /// Records with their places, e.g. a subset of another dataset's.
    pub fn with_places(records: Vec<(Value, Place)>, origin: impl Into<String>) -> Dataset {
        let (records, places) = records.into_iter().unzip();
        Dataset { records: Rc::new(records), places: Rc::new(places), origin: origin.into() }
    }

    /// Where record `i` came from: `file:line`, or `origin record i`.
    pub fn place(&self, i: usize) -> &Place {
        &self.places[i]
    }

    /// The records with their places.
    fn pairs(&self) -> impl Iterator<Item = (Value, Place)> + '_ {
        self.records.iter().cloned().zip(self.places.iter().cloned())
    }

    /// Reads a JSONL file (one object per line, blank lines skipped) or a JSON file whose top
    /// level is an array of objects. Errors name the file and line; no record is dropped.
    pub fn load(path: &Path) -> Result<Dataset> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("cannot open dataset {name}"))?;
        let mut reader = BufReader::new(file);
        // A JSON array is recognised by its first non-blank character, whatever the extension.
        let first = loop {
            let buf = reader.fill_buf().with_context(|| format!("cannot read {name}"))?;
            if buf.is_empty() {
                break None;
            }
            // skip a UTF-8 byte order mark and leading whitespace
            let skip = if buf.starts_with(&[0xEF, 0xBB, 0xBF]) { 3 } else { buf.iter().take_while(|b| b.is_ascii_whitespace()).count() };
            if skip == 0 {
                break Some(buf[0]);
            }
            reader.consume(skip);
        };
        Ok(match first {
            None => Dataset::from_records(vec![], name),
            Some(b'[') => Dataset::from_records(read_json_array(reader, &name)?, name),
            Some(_) => {
                let source: Rc<str> = name.as_str().into();
                let lines = read_jsonl(reader, &name)?;
                let places = lines.into_iter().enumerate().map(|(index, (v, line))| (v, Place { source: source.clone(), line: Some(line), index }));
                Dataset::with_places(places.collect(), name)
            }
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Value> {
        self.records.get(i)
    }

    /// The records in a seeded random order (the same seed gives the same order).
    pub fn shuffle(&self, seed: u64) -> Dataset {
        let mut records: Vec<(Value, Place)> = self.pairs().collect();
        records.shuffle(&mut StdRng::seed_from_u64(seed));
        Dataset::with_places(records, self.origin.clone())
    }

    /// `(train, eval)`: after a seeded shuffle, `eval` gets `round(len * fraction)` records and
    /// `train` the rest (both in shuffled order), like `datasets`' `train_test_split`.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&fraction) {
            bail!("split: fraction must be between 0 and 1, got {fraction}");
        }
        self.split_count((self.len() as f64 * fraction).round() as usize, seed)
    }

    /// `(train, eval)` with exactly `n_eval` records in `eval`, after a seeded shuffle.
    pub fn split_count(&self, n_eval: usize, seed: u64) -> Result<(Dataset, Dataset)> {
        if n_eval > self.len() {
            bail!("split: cannot take {n_eval} eval records from a dataset of {}", self.len());
        }
        let mut train: Vec<(Value, Place)> = self.shuffle(seed).pairs().collect();
        let eval: Vec<(Value, Place)> = train.drain(..n_eval).collect();
        Ok((
            Dataset::with_places(train, format!("{} (train split)", self.origin)),
            Dataset::with_places(eval, format!("{} (eval split)", self.origin)),
        ))
    }

    /// The records of `self` followed by those of `other`.
    pub fn concat(&self, other: &Dataset) -> Dataset {
        Dataset::with_places(self.pairs().chain(other.pairs()).collect(), format!("{} + {}", self.origin, other.origin))
    }

    /// The first `n` records (all of them if there are fewer).
    pub fn take(&self, n: usize) -> Dataset {
        Dataset::with_places(self.pairs().take(n).collect(), self.origin.clone())
    }
}

/// `expected value at line 1 column 5` → `expected value at column 5` (the line is ours).
fn line_error(e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    format!("{msg} at column {}", e.column())
}

/// The records of a JSONL stream, each with its 1-based line.
fn read_jsonl(mut reader: impl BufRead, name: &str) -> Result<Vec<(Value, usize)>> {
    let mut records = vec![];
    let mut bytes = Vec::new();
    let mut lineno = 0usize;
    loop {
        bytes.clear();
        let n = reader.read_until(b'\n', &mut bytes).with_context(|| format!("cannot read {name}"))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let mut line: &[u8] = &bytes;
        if lineno == 1 && line.starts_with(&[0xEF, 0xBB, 0xBF]) {
            line = &line[3..];
        }
        let line = std::str::from_utf8(line).map_err(|e| anyhow::anyhow!("{name}:{lineno}: not valid UTF-8 ({e})"))?;
        let line = line.trim_end();
        if line.trim_start().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{name}:{lineno}: {}", line_error(&e)))?;
        if !value.is_object() {
            bail!("{name}:{lineno}: expected a JSON object per line, found {}", kind(&value));
        }
        records.push((value, lineno));
    }
    Ok(records)
}

fn read_json_array(reader: impl Read, name: &str) -> Result<Vec<Value>> {
    let value: Value = serde_json::from_reader(reader).map_err(|e| {
        let mut msg = e.to_string();
        if let Some(i) = msg.rfind(" at line ") {
            msg.truncate(i);
        }
        anyhow::anyhow!("{name}:{}: {msg} at column {}", e.line(), e.column())
    })?;
    let Value::Array(items) = value else { unreachable!("the file starts with `[`") };
    for (i, v) in items.iter().enumerate() {
        if !v.is_object() {
            bail!("{name}: record {i} of the array is {}, expected a JSON object", kind(v));
        }
    }
    Ok(items)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn numbered(n: usize) -> Dataset {
        Dataset::from_records((0..n).map(|i| json!({ "i": i })).collect(), "test")
    }

    #[test]
    fn loads_jsonl_skipping_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.jsonl", "{\"a\": 1}\n\n  \n{\"a\": 2}\r\n{\"a\": 3}");
        let ds = Dataset::load(&p).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.get(2).unwrap()["a"], 3);
    }

    #[test]
    fn loads_json_array() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.json", "\u{feff}\n [ {\"a\": 1},\n {\"a\": 2} ]\n");
        let ds = Dataset::load(&p).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.get(1).unwrap()["a"], 2);
        let bad = write(dir.path(), "b.json", "[{\"a\": 1}, 7]");
        let e = Dataset::load(&bad).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("a number"), "{e}");
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "train.jsonl", "{\"a\": 1}\n\n{\"a\": }\n");
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains("train.jsonl:3: expected value at column 7"), "{e}");
        let p = write(dir.path(), "arr.jsonl", "{\"a\": 1}\n[1, 2]\n");
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains("arr.jsonl:2: expected a JSON object per line, found an array"), "{e}");
        let e = Dataset::load(&dir.path().join("missing.jsonl")).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn shuffle_is_deterministic_permutation() {
        let ds = numbered(50);
        let a = ds.shuffle(7);
        let b = ds.shuffle(7);
        let c = ds.shuffle(8);
        assert_eq!(a.records, b.records);
        assert_ne!(a.records, c.records);
        let mut ids: Vec<u64> = a.records.iter().map(|r| r["i"].as_u64().unwrap()).collect();
        assert_ne!(ids, (0..50).collect::<Vec<_>>());
        ids.sort();
        assert_eq!(ids, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn split_sizes_and_determinism() {
        let ds = numbered(10);
        let (train, eval) = ds.split(0.25, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (7, 3)); // round(2.5) = 3
        let (t2, e2) = ds.split(0.25, 3).unwrap();
        assert_eq!(train.records, t2.records);
        assert_eq!(eval.records, e2.records);
        let mut all: Vec<u64> = train.records.iter().chain(eval.records.iter()).map(|r| r["i"].as_u64().unwrap()).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(ds.split(0.0, 1).unwrap().1.len(), 0);
        assert_eq!(ds.split(1.0, 1).unwrap().0.len(), 0);
        assert!(ds.split(1.5, 1).is_err());
        assert_eq!(ds.split_count(4, 1).unwrap().1.len(), 4);
    }

    #[test]
    fn concat_and_take() {
        let a = numbered(3);
        let b = numbered(2);
        let c = a.concat(&b);
        assert_eq!(c.len(), 5);
        assert_eq!(c.get(3).unwrap()["i"], 0);
        assert_eq!(c.take(2).len(), 2);
        assert_eq!(c.take(20).len(), 5);
    }
}
