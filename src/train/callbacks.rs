//! Callback logic that ships with ftscript (the recipe-facing wrappers are in `api::callbacks`).

/// Early stopping: stop when `metric` has not improved by more than `min_delta` for
/// `patience` consecutive reports. For `mode = min`, a value `v` improves on the best `b`
/// when `v < b − min_delta` (`v > b + min_delta` for `max`); the first report always improves.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    pub metric: String,
    pub patience: usize,
    pub min_delta: f64,
    pub maximize: bool,
    pub best: Option<f64>,
    pub bad_reports: usize,
}

impl EarlyStopping {
    pub fn new(metric: &str, patience: usize, min_delta: f64, maximize: bool) -> Self {
        EarlyStopping { metric: metric.into(), patience: patience.max(1), min_delta, maximize, best: None, bad_reports: 0 }
    }

    /// Records one report of the metric; returns true when training should stop.
    pub fn update(&mut self, value: f64) -> bool {
        let improved = match self.best {
            None => true,
            Some(b) if self.maximize => value > b + self.min_delta,
            Some(b) => value < b - self.min_delta,
        };
        if improved {
            self.best = Some(value);
            self.bad_reports = 0;
            false
        } else {
            self.bad_reports += 1;
            self.bad_reports >= self.patience
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn stops_after_patience_bad_reports() {
        let mut e = EarlyStopping::new("eval_loss", 2, 0.01, false);
        assert!(!e.update(1.0));
        assert!(!e.update(0.9)); // improves
        assert!(!e.update(0.895)); // within min_delta: bad 1
        assert!(e.update(0.95)); // bad 2 → stop
    }
    #[test]
    fn maximize() {
        let mut e = EarlyStopping::new("acc", 1, 0.0, true);
        assert!(!e.update(0.5));
        assert!(!e.update(0.6));
        assert!(e.update(0.6));
    }
}
