//! Option maps (`#{r: 8, alpha: 16}`) → `deny_unknown_fields` structs, with errors that name
//! the offending key and list the valid ones.

use rhai::{Dynamic, EvalAltResult, Map};
use serde::de::DeserializeOwned;

/// A Rhai value as JSON (custom types, such as datasets or models, become their type name).
pub fn to_json(value: &Dynamic) -> serde_json::Value {
    if value.is_map() {
        let map = value.read_lock::<Map>().unwrap();
        return serde_json::Value::Object(map.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect());
    }
    if value.is_array() {
        let arr = value.read_lock::<rhai::Array>().unwrap();
        return serde_json::Value::Array(arr.iter().map(to_json).collect());
    }
    if value.is_fnptr() {
        return serde_json::Value::String(format!("<function {}>", value.clone().cast::<rhai::FnPtr>().fn_name()));
    }
    match serde_json::to_value(value) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(format!("<{}>", value.type_name())),
    }
}

/// JSON → a Rhai value.
pub fn from_json(value: &serde_json::Value) -> Dynamic {
    match value {
        serde_json::Value::Null => Dynamic::UNIT,
        serde_json::Value::Bool(b) => Dynamic::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from(i),
            None => Dynamic::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Dynamic::from(s.clone()),
        serde_json::Value::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => {
            Dynamic::from_map(o.iter().map(|(k, v)| (k.as_str().into(), from_json(v))).collect())
        }
    }
}

/// Deserializes `map` into `T`; `what` names the call in the message (`add_lora: unknown field ...`).
pub fn parse<T: DeserializeOwned>(what: &str, map: &Map) -> Result<T, Box<EvalAltResult>> {
    let json = serde_json::Value::Object(map.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect());
    deserialize(json).map_err(|e| format!("{what}: {e}").into())
}

/// `T` from `json`; an error names the key where it arose (`` `lr`: invalid type ... ``), with
/// "did you mean" after a near-miss key or choice.
pub fn deserialize<T: DeserializeOwned>(json: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let msg = with_hint(e.into_inner());
        let named = path.rsplit('.').next().is_some_and(|last| msg.contains(&format!("`{last}`")));
        if path == "." || named { msg } else { format!("`{path}`: {msg}") }
    })
}

/// Checks a JSON object against `T` the way `parse` would, for `ftscript check`.
pub fn validate<T: DeserializeOwned>(json: &serde_json::Value) -> Result<(), String> {
    deserialize::<T>(json.clone()).map(|_| ())
}

/// serde's message, with "did you mean" after an unknown field or variant that is close to a valid one.
fn with_hint(e: serde_json::Error) -> String {
    let msg = e.to_string();
    let re = regex::Regex::new(r"unknown (?:field|variant) `([^`]*)`, expected (?:one of )?(.*)").expect("a valid regex");
    let hint = re.captures(&msg).and_then(|c| {
        let valid: Vec<&str> = c[2].split(", ").map(|v| v.trim_matches(|ch| ch == '`' || ch == ' ').trim_start_matches("or `").trim_end_matches('`')).collect();
        // the Python stack's name of an option, or a typo of it, points at ours
        let python: Vec<(&str, &str)> = PYTHON_NAMES.iter().copied().filter(|(_, ours)| valid.contains(ours)).collect();
        match did_you_mean(&c[1], valid.iter().copied().chain(python.iter().map(|(theirs, _)| *theirs))) {
            Some(near) => match python.iter().find(|(theirs, _)| *theirs == near) {
                Some((theirs, ours)) => Some(format!(" (did you mean `{ours}`? transformers and peft call it `{theirs}`)")),
                None => Some(format!(" (did you mean `{near}`?)")),
            },
            None => None,
        }
    });
    format!("{msg}{}", hint.unwrap_or_default())
}

/// Options as transformers, peft and TRL name them → as ftscript does.
const PYTHON_NAMES: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("per_device_train_batch_size", "batch_size"),
    ("per_device_eval_batch_size", "eval_batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("num_train_epochs", "epochs"),
    ("lr_scheduler_type", "scheduler"),
    ("logging_steps", "log_every"),
    ("eval_steps", "eval_every"),
    ("save_steps", "save_every"),
    ("gradient_checkpointing_enable", "gradient_checkpointing"),
    ("max_seq_length", "max_length"),
    ("lora_alpha", "alpha"),
    ("lora_dropout", "dropout"),
    ("target_modules", "targets"),
];

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo
/// (at most a third of the word's length, and at least one edit).
pub fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates.map(|c| (edit_distance(word, c), c)).filter(|(d, _)| *d <= limit).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

/// Levenshtein distance (insertions, deletions, substitutions; case-insensitive).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.to_lowercase().chars().collect(), b.to_lowercase().chars().collect());
    // d[i][j]: edits from a[..i] to b[..j]; an insertion, deletion, substitution or swap of two
    // neighbours ("dop" → "dpo") costs 1 (optimal string alignment)
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        d[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + (a[i - 1] != b[j - 1]) as usize);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Checks that `value` is one of `valid` for option `key`, with "did you mean" for a near miss.
pub fn one_of(key: &str, value: &str, valid: &[&str]) -> Result<(), String> {
    if valid.contains(&value) {
        return Ok(());
    }
    let hint = did_you_mean(value, valid.iter().copied()).map(|v| format!(" (did you mean \"{v}\"?)")).unwrap_or_default();
    Err(format!("{key} \"{value}\" is not one of {}{hint}", valid.join(", ")))
}

/// The kind of an error message, for recipes that branch on it (`e.kind`): `"oom"` (out of
/// memory, on a GPU or the host), `"permission"` (refused by the operating system, or a flag
/// such as `--allow-push` not given), `"not_found"` (a file, directory or Hub repository that
/// does not exist), else `"bad_input"`.
pub fn error_kind(message: &str) -> &'static str {
    let has = |needles: &[&str]| needles.iter().any(|n| message.contains(n));
    if has(&["out of memory", "can't allocate memory", "OutOfMemory"]) {
        "oom"
    } else if has(&["Permission denied", "--allow-", "permission denied"]) {
        "permission"
    } else if has(&["No such file or directory", "not found", "does not exist", "HTTP 404"]) && !message.contains("Function not found") {
        "not_found"
    } else {
        "bad_input"
    }
}

/// Turns any error into a Rhai runtime error carrying its full context chain.
pub fn rt<E: std::fmt::Display>(e: E) -> Box<EvalAltResult> {
    e.to_string().into()
}

/// `anyhow` errors with their causes, `outer: inner: innermost`.
pub fn rt_any(e: anyhow::Error) -> Box<EvalAltResult> {
    format!("{e:#}").into()
}

/// Runs `f`, turning a libtorch panic into a Rhai error (nothing panics across the script boundary).
pub fn guard<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, Box<EvalAltResult>> {
    catch_panic(f).map_err(|e| {
        let msg = format!("{e:#}");
        // a message that names the call already is not prefixed twice
        if msg.starts_with(&format!("{what}: ")) { msg.into() } else { format!("{what}: {msg}").into() }
    })
}

/// Runs `f`, a panic (libtorch's errors, a CUDA out-of-memory among them, arrive as panics from
/// tch) becoming an error with its readable message. A panic inside `crate::nn::no_grad(|| ...)` skips
/// its restoring of autograd's mode, so the mode `f` started in is restored here: a step retried
/// after running out of memory must record its graph again.
pub fn catch_panic<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    // SAFETY: plain setters of libtorch's thread-local grad mode; each returns the previous mode
    let grad_mode = unsafe { torch_sys::at_grad_set_enabled(1) };
    unsafe { torch_sys::at_grad_set_enabled(grad_mode) };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            unsafe { torch_sys::at_grad_set_enabled(grad_mode) };
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "internal error".into());
            anyhow::bail!("{}", panic_message(&msg))
        }
    }
}

/// The readable part of a panic's message: its first line, and for a libtorch error unwrapped
/// by tch (`called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. ...\nException
/// raised from ...")`) the first line of libtorch's own message.
fn panic_message(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or("");
    let inner = first.strip_prefix("called `Result::unwrap()` on an `Err` value: ").unwrap_or(first);
    match inner.strip_prefix("Torch(\"") {
        Some(torch) => {
            let end = [torch.find("\\n"), torch.rfind("\")")].into_iter().flatten().min().unwrap_or(torch.len());
            format!("libtorch: {}", torch[..end].trim_end())
        }
        None => inner.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An out-of-memory panic inside `tch::no_grad` (which restores autograd's mode only when its
    /// closure returns) leaves the retried step recording its graph: without the restore, every
    /// later step trained nothing (zero gradients, seen on a GPU under `memory_budget`).
    #[test]
    fn a_panic_inside_no_grad_leaves_gradients_recorded() {
        let caught = catch_panic(|| -> anyhow::Result<()> { crate::nn::no_grad(|| panic!("CUDA out of memory (as a test)")) });
        assert!(caught.unwrap_err().to_string().contains("CUDA out of memory"));
        let w = tch::Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        assert!((&w * 2.0).requires_grad(), "autograd stayed off after the caught panic");
        // and a panic where autograd was off on purpose leaves it off
        let _g = tch::no_grad_guard();
        let _ = catch_panic(|| -> anyhow::Result<()> { panic!("inside a guard") });
        assert!(!(&w * 2.0).requires_grad());
    }

    #[test]
    fn a_libtorch_panic_reads_as_libtorch_s_first_line() {
        let msg = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.3 GiB total)\\nException raised from malloc at alloc.cpp:1\")";
        assert_eq!(panic_message(msg), "libtorch: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.3 GiB total)");
        assert_eq!(panic_message("called `Result::unwrap()` on an `Err` value: Torch(\"shape mismatch\")"), "libtorch: shape mismatch");
        assert_eq!(panic_message("index out of bounds\nmore"), "index out of bounds");
    }

    #[test]
    fn near_misses_include_swapped_neighbours() {
        assert_eq!(edit_distance("dop", "dpo"), 1);
        assert_eq!(edit_distance("cosin", "cosine"), 1);
        assert_eq!(edit_distance("sigmod", "sigmoid"), 1);
        assert_eq!(did_you_mean("opro", ["sft", "dpo", "orpo", "kto"].into_iter()), Some("orpo"));
        assert_eq!(did_you_mean("xyz", ["sft", "dpo"].into_iter()), None);
    }
}

/// `"14GiB"`, `"500MB"`, `"1.5 GiB"`, `"2048"` → bytes: KiB/MiB/GiB/TiB are powers of 1024,
/// KB/MB/GB/TB of 1000 (as accelerate and transformers read `max_memory` and `max_shard_size`).
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => (1u64 << 30) as f64,
        "TIB" => (1u64 << 40) as f64,
        _ => anyhow::bail!("invalid size `{s}`: a number and a unit, e.g. \"14GiB\", \"500MB\""),
    };
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("invalid size `{s}`: a number and a unit, e.g. \"14GiB\", \"500MB\""))?;
    Ok((v * mult).round() as u64)
}
