//! Shared by the golden tests.

use candle_core::Tensor;

/// Largest absolute difference relative to the largest magnitude of `want`.
pub fn max_rel(got: &Tensor, want: &Tensor) -> f32 {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (flat(got), flat(want));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f32::max)
}
