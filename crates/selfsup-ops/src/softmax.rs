//! Softmax over the last axis with a backward.
//!
//! Why: candle's fused `softmax_last_dim` has no backward and drops gradients silently, and
//! the composed `candle_nn::ops::softmax` makes five full-size temporaries (CANDLE.md 1.3).
//! This op is one pass forward (max, exp-sum, scale per row) and one pass backward,
//! `dx = y * (dy - sum(dy * y))`, from the saved output. Attention inside windows has its own
//! fused op ([`crate::attention`]); this one serves heads, SegNetr's spatial attention and
//! anything else that needs a softmax.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{exp_shifted_sum, f32_slice, is_cpu_f32};

/// Rows per rayon task, sized so short rows are not scheduled one at a time.
fn rows_per_task(n: usize) -> usize {
    (8192 / n.max(1)).max(1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax x")?;
        let n = *l.shape().dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(n) * n;
        out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                o.copy_from_slice(x);
                let inv = 1.0 / exp_shifted_sum(o, m);
                o.iter_mut().for_each(|v| *v *= inv);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y * (dy - sum(dy * y)) per row, from (y, dy).
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-last-dim-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (f32_slice(s1, l1, "softmax bwd y")?, f32_slice(s2, l2, "softmax bwd dy")?);
        let n = *l1.shape().dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        let per = rows_per_task(n) * n;
        dx.par_chunks_mut(per).zip(y.par_chunks(per)).zip(dy.par_chunks(per)).for_each(|((d, y), g)| {
            for ((d, y), g) in d.chunks_exact_mut(n).zip(y.chunks_exact(n)).zip(g.chunks_exact(n)) {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = y * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last axis, with a backward. f32 on the CPU is fused; other dtypes on the
/// CPU are computed in f32; other devices use the composed reference.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0f32, 0.0], [1.0, 1.0]], &Device::Cpu)?;
/// let y = selfsup_ops::softmax::softmax_last_dim(&x)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.5, 0.5], vec![0.5, 0.5]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.rank() == 0 {
        candle_core::bail!("softmax_last_dim: needs at least one axis, got a scalar")
    }
    if !xs.device().is_cpu() {
        return softmax_reference(xs);
    }
    if !is_cpu_f32(xs) {
        return softmax_last_dim(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype());
    }
    xs.contiguous()?.apply_op1(Softmax)
}

/// Reference for [`softmax_last_dim`]: candle-nn's composed softmax.
pub fn softmax_reference(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(xs, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    #[test]
    fn matches_reference_and_finite_differences() {
        for (i, shape) in [vec![3, 7], vec![2, 3, 1], vec![5000, 3], vec![2, 2, 300]].into_iter().enumerate() {
            let x = (randn(&shape, i as u64) * 4.0).unwrap();
            compare_with_reference(
                &[x],
                |t| softmax_last_dim(&t[0]),
                |t| softmax_reference(&t[0]),
                1e-5,
                1e-4,
                &format!("{shape:?}"),
            );
        }
        check_finite_differences(&[randn(&[3, 5], 1)], |t| softmax_last_dim(&t[0]), 1e-2, 1e-2, 1, "softmax fd");
    }

    #[test]
    fn large_logits_stay_finite() {
        let x = Tensor::new(&[[1000f32, 0.0, -1000.0]], &candle_core::Device::Cpu).unwrap();
        assert_eq!(softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0, 0.0]]);
        assert!(softmax_last_dim(&Tensor::new(1f32, &candle_core::Device::Cpu).unwrap()).is_err());
    }
}
