//! Learning-rate schedules as pure functions of the optimizer step (0-based), like
//! transformers' `get_*_schedule_with_warmup`: linear warmup from 0, then
//! constant / linear decay to 0 / half-cosine decay to 0 over the remaining steps.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> anyhow::Result<Schedule> {
        Ok(match s {
            "constant" | "constant_with_warmup" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            other => anyhow::bail!("unknown scheduler `{other}`; valid: constant, linear, cosine"),
        })
    }
}

/// The learning rate used for optimizer step `step` out of `total`, after `warmup` warmup steps:
/// `lr · step/warmup` during warmup, then `lr · f(p)` with `p = (step − warmup)/(total − warmup)` and
/// `f = 1` (constant), `1 − p` (linear), `½(1 + cos πp)` (cosine).
pub fn lr_at(schedule: Schedule, lr: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return lr * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => lr,
        Schedule::Linear => lr * (1.0 - progress).max(0.0),
        Schedule::Cosine => lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn shapes() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 10, 2), 0.0);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 1, 10, 2), 0.5);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 10, 2), 1.0);
        assert!((lr_at(Schedule::Linear, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 1.0, 9, 10, 2), 1.0);
    }
}
