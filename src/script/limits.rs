//! Operation budgets that keep a shared recipe from hanging the host. Rhai counts every
//! operation (an expression, a call, a turn of a loop); a callback (a training hook, a format,
//! map or filter function) may spend at most `per_callback` of them in one call, and the
//! recipe's own code outside its callbacks at most `total` in all. Past a budget the recipe
//! stops (a recipe cannot catch it) with an error that names the flag raising that budget. Time
//! inside ftscript's own functions (training, loading, generating) is not counted.

use rhai::Dynamic;
use std::cell::Cell;

/// The budgets, in Rhai operations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The recipe's own code, outside its callbacks (`--max-operations`).
    pub total: u64,
    /// One call of a callback (`--max-callback-operations`).
    pub per_callback: u64,
}

impl Default for Limits {
    /// Generous for real recipes (Rhai runs some 10⁷–10⁸ operations a second): a billion per
    /// callback call, ten billion for the rest.
    fn default() -> Self {
        Limits { total: 10_000_000_000, per_callback: 1_000_000_000 }
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
