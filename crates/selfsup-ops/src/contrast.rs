//! InfoNCE over a positive and a queue of negatives, fused, with a backward: the contrastive
//! loss of MoCo v2 and of both DenseCL terms.
//!
//! `info_nce(pos, neg, T)` is the mean over the n rows of the cross-entropy of the logits
//! `[pos_i, neg_i1, ..., neg_iK] / T` with the positive as the target class, as the references
//! compute it (`CrossEntropyLoss` on the concatenated logits, label 0).
//!
//! Why: the negatives are a query against a whole queue (K = 65,536 in the papers), so the
//! logits are large: 160 rows of 65,537 per DenseCL step at batch 32 and 64 px. The composed
//! loss ([`info_nce_reference`]: cat, divide by T, max, subtract, exp, sum, log) makes six
//! full-size temporaries forward and as many backward, each a zero-filled fresh buffer, and
//! its exp is libm's scalar `expf`. In a DenseCL step those passes were about 15 % of the time
//! (perf, 2026-11-24: memset, candle's element-wise maps, `expf`). Here the forward reads each
//! row twice (its maximum, then the sum of exponentials in eight lanes with
//! [`crate::cpu::exp_fast`]) and keeps the row's log-sum-exp; the backward writes
//! `dneg = g softmax(neg) / (n T)` and `dpos = g (softmax(pos) - 1) / (n T)` in one pass.
//! Other devices and dtypes use the reference; a test holds the two together in values and
//! gradients.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{exp_fast, exp_scaled_sum, f32_slice, is_cpu_f32, multiversion, row_max};

struct InfoNce {
    inv_t: f32,
    /// Each row's `logsumexp(logits / T)`, written by the forward for the backward.
    lse: OnceLock<Vec<f32>>,
}

impl CustomOp2 for InfoNce {
    fn name(&self) -> &'static str {
        "info-nce"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (pos, neg) = (f32_slice(s1, l1, "info_nce pos")?, f32_slice(s2, l2, "info_nce neg")?);
        let k = neg.len() / pos.len();
        let inv_t = self.inv_t;
        let lse: Vec<f32> = pos
            .par_iter()
            .zip(neg.par_chunks(k))
            .map(|(&p, row)| {
                let m = row_max(row).max(p);
                m * inv_t + (exp_fast((p - m) * inv_t) + exp_scaled_sum(row, m, inv_t)).ln()
            })
            .collect();
        // In order, in f64: the loss does not depend on the thread count.
        let total: f64 = lse.iter().zip(pos).map(|(&l, &p)| f64::from(l - p * inv_t)).sum();
        let loss = (total / pos.len() as f64) as f32;
        // A fresh op per call, so the forward runs once; a second run would recompute the same.
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        pos: &Tensor,
        neg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else { candle_core::bail!("info_nce: backward before the forward") };
        let (n, k) = neg.dims2()?;
        let c = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? * self.inv_t / n as f32;
        let inv_t = self.inv_t;
        let dpos = if pos.track_op() {
            let p = pos.flatten_all()?.to_vec1::<f32>()?;
            let d: Vec<f32> = p.iter().zip(lse).map(|(&p, &l)| c * (exp_fast(p * inv_t - l) - 1.0)).collect();
            Some(Tensor::from_vec(d, (n, 1), pos.device())?)
        } else {
            None
        };
        let dneg = if neg.track_op() {
            let (s, l) = neg.storage_and_layout();
            let neg_v = crate::cpu::cpu_f32(&s, l, "info_nce neg")?;
            let mut d: Vec<f32> = Vec::with_capacity(n * k);
            d.spare_capacity_mut()
                .par_chunks_mut(k)
                .zip(neg_v.par_chunks(k))
                .zip(lse)
                .for_each(|((out, row), &l)| softmax_scaled_into(out, row, inv_t, l, c));
            // SAFETY: the loop above wrote each of the n rows of k values.
            unsafe { d.set_len(n * k) };
            Some(Tensor::from_vec(d, (n, k), neg.device())?)
        } else {
            None
        };
        Ok((dpos, dneg))
    }
}

multiversion! {
    /// `out[i] = c * exp(row[i] * s - shift)` (eight lanes).
    fn softmax_scaled_into(out: &mut [MaybeUninit<f32>], row: &[f32], s: f32, shift: f32, c: f32) {
        for (o, &v) in out.iter_mut().zip(row) {
            o.write(c * exp_fast(v * s - shift));
        }
    }
}

/// The mean over rows of `-log softmax([pos_i, neg_i..] / t)[0]`: InfoNCE with `pos` (n, 1)
/// the positive logits and `neg` (n, K) the negative ones, at temperature `t`. Fused on the CPU
/// in f32; [`info_nce_reference`] elsewhere.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let pos = Tensor::new(&[[1f32]], &Device::Cpu)?;
/// let neg = Tensor::new(&[[1f32, 1.0, 1.0]], &Device::Cpu)?;
/// let loss = selfsup_ops::contrast::info_nce(&pos, &neg, 0.2)?.to_scalar::<f32>()?;
/// assert!((loss - 4f32.ln()).abs() < 1e-6); // four equal logits
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn info_nce(pos: &Tensor, neg: &Tensor, t: f64) -> Result<Tensor> {
    let (n, one) = pos.dims2()?;
    let (rows, k) = neg.dims2()?;
    if one != 1 || rows != n || n == 0 || k == 0 {
        candle_core::bail!(
            "info_nce: positives must be (n, 1) and negatives (n, K) with n, K >= 1, got {:?} and {:?}",
            pos.dims(),
            neg.dims()
        )
    }
    if !(t.is_finite() && t > 0.0) {
        candle_core::bail!("info_nce: temperature must be positive and finite, got {t}")
    }
    if !(is_cpu_f32(pos) && is_cpu_f32(neg)) {
        return info_nce_reference(pos, neg, t);
    }
    let op = InfoNce { inv_t: (1.0 / t) as f32, lse: OnceLock::new() };
    pos.contiguous()?.apply_op2(&neg.contiguous()?, op)
}

/// Reference for [`info_nce`], composed from candle ops.
pub fn info_nce_reference(pos: &Tensor, neg: &Tensor, t: f64) -> Result<Tensor> {
    let logits = (Tensor::cat(&[pos, neg], 1)? / t)?;
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
    (lse - logits.narrow(1, 0, 1)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};
    use candle_core::Device;

    #[test]
    fn matches_reference_and_finite_differences() {
        // Logits of unit vectors' dot products: in [-1, 1]; at T = 0.2 as the objectives use.
        // 19 negatives exercise the eight-lane tails; 3000 is a long row over several tasks.
        for (i, (n, k)) in [(1, 1), (3, 19), (5, 3000), (64, 40)].into_iter().enumerate() {
            let pos = randn(&[n, 1], i as u64).tanh().unwrap();
            let neg = randn(&[n, k], 100 + i as u64).tanh().unwrap();
            compare_with_reference(
                &[pos, neg],
                |t| info_nce(&t[0], &t[1], 0.2),
                |t| info_nce_reference(&t[0], &t[1], 0.2),
                1e-5,
                1e-4,
                &format!("info_nce ({n}, {k})"),
            );
        }
        check_finite_differences(
            &[randn(&[4, 1], 7), randn(&[4, 9], 8)],
            |t| info_nce(&t[0], &t[1], 0.5),
            1e-2,
            1e-2,
            1,
            "info_nce fd",
        );
    }

    #[test]
    fn matches_cross_entropy_by_hand_and_stays_finite() {
        let pos = Tensor::new(&[[0.5f32], [0.1]], &Device::Cpu).unwrap();
        let neg = Tensor::new(&[[0.2f32, -0.3], [0.4, 0.0]], &Device::Cpu).unwrap();
        let got = info_nce(&pos, &neg, 0.2).unwrap().to_scalar::<f32>().unwrap();
        let ce = |row: [f32; 3]| {
            let z: f32 = row.iter().map(|v| (v / 0.2).exp()).sum();
            z.ln() - row[0] / 0.2
        };
        let want = (ce([0.5, 0.2, -0.3]) + ce([0.1, 0.4, 0.0])) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Logits of 1000 / 0.05: exp would overflow without the row maximum.
        let big = Tensor::new(&[[1000f32, 0.0, -1000.0]], &Device::Cpu).unwrap();
        let got = info_nce(&big.narrow(1, 0, 1).unwrap(), &big.narrow(1, 1, 2).unwrap(), 0.05).unwrap();
        assert_eq!(got.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// Only the operands in the graph get a gradient; a constant positive column gets none.
    #[test]
    fn gradients_only_where_needed_and_bad_input_is_named() {
        let pos = randn(&[3, 1], 1);
        let neg = candle_core::Var::from_tensor(&randn(&[3, 5], 2)).unwrap();
        let grads = info_nce(&pos, &neg, 0.2).unwrap().backward().unwrap();
        assert!(grads.get(&pos).is_none());
        // Row i of dneg sums to (1 - softmax_0) / (n T): the softmax sums to 1 over the row.
        let (p, q) = (pos.to_vec2::<f32>().unwrap(), neg.as_tensor().to_vec2::<f32>().unwrap());
        let sums = grads.get(&neg).unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        for ((s, p), q) in sums.iter().zip(&p).zip(&q) {
            let e0 = (p[0] / 0.2).exp();
            let want = (1.0 - e0 / (e0 + q.iter().map(|v| (v / 0.2).exp()).sum::<f32>())) / 0.6;
            assert!((s - want).abs() < 1e-5, "{s} vs {want}");
        }
        let err = |p: &[usize], q: &[usize], t: f64| info_nce(&randn(p, 1), &randn(q, 2), t).unwrap_err().to_string();
        assert!(err(&[3, 2], &[3, 5], 0.2).contains("[3, 2]"));
        assert!(err(&[3, 1], &[4, 5], 0.2).contains("[4, 5]"));
        assert!(err(&[3, 1], &[3, 0], 0.2).contains("K >= 1"));
        assert!(err(&[3, 1], &[3, 5], 0.0).contains("temperature"));
    }
}
