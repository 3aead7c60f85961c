//! Schedules as pure functions of the step, so a resumed run computes the same values.

pub use selfsup_objectives::ema_momentum;

/// Linear warm-up from `base / warmup` to `base` over `warmup` steps, then a half cosine from
/// `base` to `min` at `total` steps (the MAE/BYOL/CARE recipe, per iteration).
pub fn warmup_cosine(step: usize, total: usize, warmup: usize, base: f64, min: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f64 / span as f64).min(1.0);
    min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Fraction of training done before `step`: 0 at the first step, 1 after the last.
pub fn progress(step: usize, total: usize) -> f64 {
    step as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_shape() {
        assert!((warmup_cosine(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((warmup_cosine(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(0, 100, 0, 2.0, 0.0) - 2.0).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for s in 10..=100 {
            let v = warmup_cosine(s, 100, 10, 1.0, 0.0);
            assert!(v <= prev);
            prev = v;
        }
        assert_eq!(progress(0, 10), 0.0);
        assert_eq!(progress(10, 10), 1.0);
    }
}
