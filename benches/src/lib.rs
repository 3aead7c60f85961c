//! Shared inputs for the criterion benches (`cargo xtask bench` runs them and prints a table).
//!
//! Each bench group pairs a fast path with its reference (`fast` / `reference`) so the summary
//! can print their ratio from the same run: the machines are noisy, ratios less so.

use candle_core::{Device, Tensor};

/// A deterministic normal tensor.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = selfsup_ops::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
}
