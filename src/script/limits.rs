//! Limits that keep a shared recipe from hanging or exhausting the host. Rhai counts every
//! operation (an expression, a call, a turn of a loop); a callback (a training hook, a format,
//! map or filter function) may spend at most `per_callback` of them in one call, and the
//! recipe's own code outside its callbacks at most `total` in all. Past a budget the recipe
//! stops (a recipe cannot catch it) with an error that names the flag raising that budget. Time
//! inside ftscript's own functions (training, loading, generating) is not counted. Calls nest at
//! most `call_depth` deep, and a Rhai string, array or map holds at most `string_size` bytes,
//! `array_size` or `map_size` entries, and while it runs the process holds at most `memory`
//! bytes (90% of the machine's by default); each error names its flag ([`explain`]).

use rhai::Dynamic;
use std::cell::Cell;

/// The budgets, in Rhai operations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The recipe's own code, outside its callbacks (`--max-operations`).
    pub total: u64,
    /// One call of a callback (`--max-callback-operations`).
    pub per_callback: u64,
    /// Nested function calls (`--max-call-depth`).
    pub call_depth: usize,
    /// Bytes of one string (`--max-string-size`).
    pub string_size: usize,
    /// Entries of one array (`--max-array-size`).
    pub array_size: usize,
    /// Entries of one object map (`--max-map-size`).
    pub map_size: usize,
    /// Bytes the process may hold while the recipe's own code runs (`--max-memory`).
    pub memory: u64,
}

impl Default for Limits {
    /// Generous for real recipes (Rhai runs some 10⁷–10⁸ operations a second): a billion per
    /// callback call, ten billion for the rest; calls 64 deep; 64 MiB strings, 2²⁴-entry
    /// arrays (a dataset's records as an array), 2²⁰-key maps.
    fn default() -> Self {
        Limits { total: 10_000_000_000, per_callback: 1_000_000_000, call_depth: 64, string_size: 64 << 20, array_size: 1 << 24, map_size: 1 << 20, memory: default_memory() }
    }
}

/// The engine's call-depth and size limits set from the current [`Limits`].
pub fn apply(engine: &mut rhai::Engine) {
    let l = current();
    engine.set_max_call_levels(l.call_depth);
    engine.set_max_string_size(l.string_size);
    engine.set_max_array_size(l.array_size);
    engine.set_max_map_size(l.map_size);
}

/// The limits of recipes run on this thread.
pub fn current() -> Limits {
    LIMITS.with(Cell::get)
}

/// Rhai's message for a call-depth or size limit, with the flag that raises it; `None` for
/// other errors.
pub fn explain(err: &rhai::EvalAltResult) -> Option<String> {
    let l = current();
    match err {
        rhai::EvalAltResult::ErrorStackOverflow(_) => Some(format!("calls nest more than {} deep: endless recursion? (raise the limit with --max-call-depth)", l.call_depth)),
        rhai::EvalAltResult::ErrorDataTooLarge(what, _) => {
            let (limit, flag) = if what.contains("string") {
                (l.string_size, "--max-string-size")
            } else if what.contains("array") {
                (l.array_size, "--max-array-size")
            } else {
                (l.map_size, "--max-map-size")
            };
            Some(format!("{what} is over the limit of {limit} (raise it with {flag})"))
        }
        _ => None,
    }
}

thread_local! {
    static LIMITS: Cell<Limits> = Cell::new(Limits::default());
    /// The operation count Rhai last reported.
    static SEEN: Cell<u64> = const { Cell::new(0) };
    /// Operations spent inside finished callbacks (not charged to `total`).
    static IN_CALLBACKS: Cell<u64> = const { Cell::new(0) };
    /// While a callback runs: the count at which it is over its budget.
    static DEADLINE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Sets the budgets of recipes run on this thread.
pub fn set(limits: Limits) {
    LIMITS.with(|l| l.set(limits));
}

/// Rhai's progress hook: `Some(reason)` stops the recipe.
pub fn on_progress(ops: u64) -> Option<Dynamic> {
    SEEN.with(|s| s.set(ops));
    let limits = LIMITS.with(Cell::get);
    // the process's memory, every 2^16 operations: a recipe growing data without end is stopped
    // before the host runs out (a map grown by `m[k] = v` escapes Rhai's size check)
    if ops & 0xffff == 0 && resident_bytes().is_some_and(|b| b > limits.memory) {
        return Some(format!("the process holds more than {} MiB while the recipe's code runs: data growing without end? (raise the limit with --max-memory)", limits.memory >> 20).into());
    }
    match DEADLINE.with(Cell::get) {
        Some(deadline) if ops > deadline => Some(
            format!("a callback ran more than {} operations in one call: an endless loop? (raise the budget with --max-callback-operations)", limits.per_callback).into(),
        ),
        Some(_) => None,
        None if ops.saturating_sub(IN_CALLBACKS.with(Cell::get)) > limits.total => Some(
            format!("the recipe ran more than {} operations outside its callbacks: an endless loop? (raise the budget with --max-operations)", limits.total).into(),
        ),
        None => None,
    }
}

/// The process's resident memory (Linux's `/proc/self/statm`; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// 90% of the machine's memory (Linux's `/proc/meminfo`; unlimited elsewhere).
fn default_memory() -> u64 {
    crate::env::host_memory().map_or(u64::MAX, |b| b / 10 * 9)
}

/// Runs `f`, a call of one of the recipe's closures, under the per-callback budget.
pub fn callback<R>(f: impl FnOnce() -> R) -> R {
    let start = SEEN.with(Cell::get);
    let per_callback = LIMITS.with(Cell::get).per_callback;
    let outer = DEADLINE.with(|d| d.replace(Some(start.saturating_add(per_callback))));
    let result = f();
    DEADLINE.with(|d| d.set(outer));
    if outer.is_none() {
        let spent = SEEN.with(Cell::get).saturating_sub(start);
        IN_CALLBACKS.with(|c| c.set(c.get() + spent));
    }
    result
}
