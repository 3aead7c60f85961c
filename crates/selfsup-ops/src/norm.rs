//! Batch normalisation over the last (channel) axis, composed from candle ops.
//!
//! candle's `batch_norm` wants channels on axis 1; selfsup's conv stacks run channels-last, and
//! the projector heads are (b, d) matrices, which are the same case with one spatial position.
//! Composed ops keep autograd exact (CANDLE.md 1.3: candle's fused norms drop gradients).
//! Statistics match PyTorch: the batch variance used to normalise is biased, the one folded
//! into the running estimate is unbiased.
//!
//! [`batch_norm_train`] is the fast path: on CPU one fused op computes the statistics, the
//! normalisation and (optionally) the ReLU in two passes, and its backward in two more. The
//! composed version ([`batch_norm_train_reference`]) allocates about ten full-size temporaries
//! forward and backward; it is the specification the fused op is tested against, and the path
//! used on non-CPU devices.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{alloc_uninit, f32_slice, multiversion};

/// Batch statistics of a normalisation in training mode.
pub struct BatchStats {
    /// (c,) mean over all positions.
    pub mean: Tensor,
    /// (c,) unbiased variance, for the running estimate.
    pub var_unbiased: Tensor,
}

/// Training-mode batch norm, optionally followed by ReLU. xs: (..., c); weight, bias: (c,).
/// Returns the activations and the (detached) batch statistics.
pub fn batch_norm_train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    if !xs.device().is_cpu() || xs.dtype() != candle_core::DType::F32 {
        let (ys, stats) = batch_norm_train_reference(xs, weight, bias, eps)?;
        return Ok((if relu { ys.relu()? } else { ys }, stats));
    }
    let c = *xs.dims().last().unwrap_or(&0);
    let m = xs.elem_count() / c.max(1);
    if m < 2 {
        candle_core::bail!("batch_norm: need more than one value per channel, got shape {:?}", xs.shape())
    }
    let saved = Arc::new(Mutex::new(None));
    let op = BnTrain { eps, relu, saved: saved.clone() };
    let ys = xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let Saved { mean, var } = saved.lock().expect("bn lock").clone().expect("set by cpu_fwd");
    let dev = xs.device();
    let var_unbiased: Vec<f32> = var.iter().map(|v| v * m as f32 / (m - 1) as f32).collect();
    let stats =
        BatchStats { mean: Tensor::from_vec(mean, c, dev)?, var_unbiased: Tensor::from_vec(var_unbiased, c, dev)? };
    Ok((ys, stats))
}

/// Per-channel statistics kept from the forward pass for the backward.
#[derive(Clone)]
struct Saved {
    mean: Vec<f32>,
    var: Vec<f32>,
}

/// Fused training-mode batch norm (+ ReLU) over the last axis. Inputs x (m, c) contiguous,
/// weight (c,), bias (c,).
struct BnTrain {
    eps: f64,
    relu: bool,
    /// Written by the forward: batch mean and biased variance. Read by the caller (running
    /// statistics) and by the backward.
    saved: Arc<Mutex<Option<Saved>>>,
}

/// Rows per block: per-block partial sums are f32 (vectorised), blocks are summed in f64.
const ROWS: usize = 128;

/// Per-channel sums (length `len`) over the `m` rows, block by block: `f(first_row, rows, acc)`
/// adds a block's f32 partial sums into `acc`; blocks run on any thread, their sums are added
/// in f64 in block order.
fn channel_sums(m: usize, len: usize, f: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f64> {
    // Fixed blocks, partial sums collected in block order and added in that order: the result
    // does not depend on thread scheduling (a resumed run must repeat bit for bit).
    let blocks = m.div_ceil(ROWS);
    let parts: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|bi| {
            let mut part = vec![0f32; len];
            f(bi * ROWS, ROWS.min(m - bi * ROWS), &mut part);
            part
        })
        .collect();
    let mut acc = vec![0f64; len];
    for part in parts {
        acc.iter_mut().zip(&part).for_each(|(a, p)| *a += *p as f64);
    }
    acc
}

multiversion! {
    /// acc[0..c] += x, acc[c..2c] += x^2 over a block of rows, shifted by `pivot` (the first
    /// row's values) so that the variance does not cancel catastrophically.
    fn moments_block(x: &[f32], pivot: &[f32], c: usize, acc: &mut [f32]) {
        let (s1, s2) = acc.split_at_mut(c);
        for row in x.chunks_exact(c) {
            for j in 0..c {
                let d = row[j] - pivot[j];
                s1[j] += d;
                s2[j] += d * d;
            }
        }
    }
}

multiversion! {
    /// y = x * scale + shift (then ReLU) over a block of rows.
    fn apply_block(x: &[f32], scale: &[f32], shift: &[f32], relu: bool, c: usize, y: &mut [f32]) {
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for j in 0..c {
                let v = xr[j] * scale[j] + shift[j];
                yr[j] = if relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// Per-channel constants of the backward.
struct BwdConsts<'a> {
    invstd: &'a [f32],
    shift: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    relu: bool,
}

/// (xhat, gradient reaching the normalisation) of one value. With ReLU the gradient passes
/// only where the output gamma * xhat + beta was positive.
#[inline(always)]
fn bwd_at(k: &BwdConsts, j: usize, x: f32, g: f32) -> (f32, f32) {
    let xh = x * k.invstd[j] + k.shift[j];
    (xh, if k.relu && k.gamma[j] * xh + k.beta[j] <= 0.0 { 0.0 } else { g })
}

multiversion! {
    /// acc[0..c] += g, acc[c..2c] += g * xhat over a block of rows.
    fn bwd_sums_block(x: &[f32], dy: &[f32], k: &BwdConsts, c: usize, acc: &mut [f32]) {
        let (sg, sgx) = acc.split_at_mut(c);
        for (xr, dr) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
            for j in 0..c {
                let (xh, g) = bwd_at(k, j, xr[j], dr[j]);
                sg[j] += g;
                sgx[j] += g * xh;
            }
        }
    }
}

multiversion! {
    /// dx = coef * (m * g - db - xhat * dg) over a block of rows.
    fn dx_block(x: &[f32], dy: &[f32], k: &BwdConsts, coef: &[f32], db: &[f32], dg: &[f32], m: f32, c: usize, dx: &mut [f32]) {
        for ((xr, dr), out) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            for j in 0..c {
                let (xh, g) = bwd_at(k, j, xr[j], dr[j]);
                out[j] = coef[j] * (m * g - db[j] - xh * dg[j]);
            }
        }
    }
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch_norm x")?;
        let (gamma, beta) = (f32_slice(s2, l2, "batch_norm weight")?, f32_slice(s3, l3, "batch_norm bias")?);
        let c = gamma.len();
        if beta.len() != c || c == 0 || x.len() % c != 0 {
            candle_core::bail!("batch_norm: x {:?} with weight ({c},) and bias ({},)", l1.shape(), beta.len())
        }
        let m = x.len() / c;
        let pivot = &x[..c];
        let sums =
            channel_sums(m, 2 * c, |first, rows, acc| moments_block(&x[first * c..(first + rows) * c], pivot, c, acc));
        let mean: Vec<f64> = (0..c).map(|j| pivot[j] as f64 + sums[j] / m as f64).collect();
        let var: Vec<f64> = (0..c).map(|j| (sums[c + j] / m as f64 - (sums[j] / m as f64).powi(2)).max(0.0)).collect();
        let scale: Vec<f32> = var.iter().zip(gamma).map(|(v, g)| (*g as f64 / (v + self.eps).sqrt()) as f32).collect();
        let shift: Vec<f32> = (0..c).map(|j| beta[j] - (mean[j] as f32) * scale[j]).collect();
        // SAFETY: apply_block writes every element (x.len() is a multiple of c).
        let mut y = unsafe { alloc_uninit(x.len()) };
        let relu = self.relu;
        y.par_chunks_mut(c * ROWS)
            .zip(x.par_chunks(c * ROWS))
            .for_each(|(yb, xb)| apply_block(xb, &scale, &shift, relu, c, yb));
        *self.saved.lock().expect("bn lock") = Some(Saved {
            mean: mean.iter().map(|v| *v as f32).collect(),
            var: var.iter().map(|v| *v as f32).collect(),
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("bn lock").clone();
        let Some(saved) = saved else { candle_core::bail!("batch_norm backward without a forward") };
        let c = weight.elem_count();
        let m = x.elem_count() / c;
        let op = BnBwd { eps: self.eps, relu: self.relu, saved };
        let params = Tensor::stack(&[weight, bias], 0)?;
        // One op computes all three gradients: rows 0..m are dx, row m dweight, row m+1 dbias.
        let out = x.reshape((m, c))?.apply_op3_no_bwd(&grad.contiguous()?.reshape((m, c))?, &params, &op)?;
        let dx = out.narrow(0, 0, m)?.reshape(x.shape())?;
        let dw = out.narrow(0, m, 1)?.reshape(c)?;
        let db = out.narrow(0, m + 1, 1)?.reshape(c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`BnTrain`]: inputs x (m, c), dy (m, c), [weight; bias] (2, c); output
/// (m + 2, c) = [dx; dweight; dbias].
struct BnBwd {
    eps: f64,
    relu: bool,
    saved: Saved,
}

impl CustomOp3 for BnBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy, gb) =
            (f32_slice(s1, l1, "bn bwd x")?, f32_slice(s2, l2, "bn bwd dy")?, f32_slice(s3, l3, "bn bwd params")?);
        let c = gb.len() / 2;
        let (gamma, beta) = gb.split_at(c);
        let m = x.len() / c;
        let invstd: Vec<f32> = self.saved.var.iter().map(|v| (1.0 / (*v as f64 + self.eps).sqrt()) as f32).collect();
        let shift: Vec<f32> = (0..c).map(|j| -self.saved.mean[j] * invstd[j]).collect();
        let k = BwdConsts { invstd: &invstd, shift: &shift, gamma, beta, relu: self.relu };
        let sums = channel_sums(m, 2 * c, |first, rows, acc| {
            let span = first * c..(first + rows) * c;
            bwd_sums_block(&x[span.clone()], &dy[span], &k, c, acc)
        });
        let (db, dg): (Vec<f32>, Vec<f32>) =
            (sums[..c].iter().map(|v| *v as f32).collect(), sums[c..].iter().map(|v| *v as f32).collect());
        let coef: Vec<f32> = (0..c).map(|j| gamma[j] * invstd[j] / m as f32).collect();
        // SAFETY: dx_block writes the m rows of dx, and the two copies below the last two rows.
        let mut out = unsafe { alloc_uninit((m + 2) * c) };
        let (dx, tail) = out.split_at_mut(m * c);
        dx.par_chunks_mut(c * ROWS).enumerate().for_each(|(bi, block)| {
            let span = bi * ROWS * c..bi * ROWS * c + block.len();
            dx_block(&x[span.clone()], &dy[span], &k, &coef, &db, &dg, m as f32, c, block)
        });
        tail[..c].copy_from_slice(&dg);
        tail[c..].copy_from_slice(&db);
        Ok((CpuStorage::F32(out), Shape::from((m + 2, c))))
    }
}

/// Composed reference for [`batch_norm_train`] (without the ReLU).
pub fn batch_norm_train_reference(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let c = *xs.dims().last().unwrap_or(&0);
    let m = xs.elem_count() / c.max(1);
    if m < 2 {
        candle_core::bail!("batch_norm: need more than one value per channel, got shape {:?}", xs.shape())
    }
    let flat = xs.reshape((m, c))?;
    let mean = flat.mean_keepdim(0)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    let scale = (&var + eps)?.sqrt()?.recip()?.broadcast_mul(&weight.reshape((1, c))?)?;
    let ys = centred.broadcast_mul(&scale)?.broadcast_add(&bias.reshape((1, c))?)?;
    let var_unbiased = (var.detach() * (m as f64 / (m - 1) as f64))?.reshape(c)?;
    let stats = BatchStats { mean: mean.detach().reshape(c)?, var_unbiased };
    ys.reshape(xs.shape()).map(|ys| (ys, stats))
}

/// Evaluation-mode batch norm with running statistics. xs: (..., c); all others (c,).
pub fn batch_norm_eval(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let scale = (running_var + eps)?.sqrt()?.recip()?.mul(weight)?;
    let shift = (bias - running_mean.mul(&scale)?)?;
    xs.broadcast_mul(&scale)?.broadcast_add(&shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};

    #[test]
    fn train_matches_candle_batch_norm_values_and_grads() {
        let dev = Device::Cpu;
        let mut r = crate::rng::Rng::new(5);
        let v: Vec<f32> = (0..2 * 3 * 4 * 5).map(|_| (r.normal() * 2.0 + 1.0) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 4, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::new(&[0.5f32, 1.5, -1.0, 2.0, 1.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, 0.3, -0.4, 0.0], &dev).unwrap()).unwrap();
        let (y, stats) = batch_norm_train_reference(&x, &w, &b, 1e-5).unwrap();
        // Reference: candle's channels-first batch norm in training mode.
        let nchw = x.permute((0, 3, 1, 2)).unwrap();
        let rm = Var::zeros(5, candle_core::DType::F32, &dev).unwrap();
        let rv = Var::ones(5, candle_core::DType::F32, &dev).unwrap();
        let bn = candle_nn::BatchNorm::new(
            5,
            rm.as_tensor().clone(),
            rv.as_tensor().clone(),
            w.as_tensor().clone(),
            b.as_tensor().clone(),
            1e-5,
        )
        .unwrap();
        let y_ref = candle_nn::ModuleT::forward_t(&bn, &nchw, true).unwrap().permute((0, 2, 3, 1)).unwrap();
        let d = (&y - &y_ref).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        let probe = Tensor::arange(0f32, 120., &dev).unwrap().reshape((2, 3, 4, 5)).unwrap().sin().unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let d = (g.get(v).unwrap() - g_ref.get(v).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-3);
        }
        // candle's running update uses momentum 0.1 from (0, 1): recover its batch stats.
        let rm_ref = (rm.as_tensor() / 0.1).unwrap();
        let dm = (&stats.mean - rm_ref).unwrap().abs().unwrap().max(0).unwrap();
        assert!(dm.to_scalar::<f32>().unwrap() < 1e-4);
        let rv_ref = ((rv.as_tensor() - 0.9).unwrap() / 0.1).unwrap();
        let dv = (&stats.var_unbiased - rv_ref).unwrap().abs().unwrap().max(0).unwrap();
        assert!(dv.to_scalar::<f32>().unwrap() < 1e-3);
    }

    /// The fused op (with and without ReLU) against the composed reference: values, all three
    /// gradients and the batch statistics.
    #[test]
    fn fused_matches_reference() {
        let dev = Device::Cpu;
        let mut r = crate::rng::Rng::new(8);
        for (shape, relu) in [((3usize, 5usize, 7usize), false), ((3, 5, 7), true), ((130, 1, 3), true)] {
            let n = shape.0 * shape.1 * shape.2;
            let v: Vec<f32> = (0..n).map(|_| (r.normal() * 3.0 - 1.0) as f32).collect();
            let c = shape.2;
            let x = Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(
                &Tensor::from_vec((0..c).map(|i| 0.5 + i as f32 * 0.3).collect::<Vec<_>>(), c, &dev).unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &Tensor::from_vec((0..c).map(|i| i as f32 * 0.2 - 0.3).collect::<Vec<_>>(), c, &dev).unwrap(),
            )
            .unwrap();
            let (y, s) = batch_norm_train(&x, &w, &b, 1e-5, relu).unwrap();
            let (y_ref, s_ref) = batch_norm_train_reference(&x, &w, &b, 1e-5).unwrap();
            let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
            let md = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(md(&y, &y_ref) < 1e-4, "{shape:?} {relu}: y");
            assert!(md(&s.mean, &s_ref.mean) < 1e-5 && md(&s.var_unbiased, &s_ref.var_unbiased) < 1e-4);
            let probe = Tensor::arange(0f32, n as f32, &dev).unwrap().reshape(shape).unwrap().cos().unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let d = md(g.get(v).unwrap(), g_ref.get(v).unwrap());
                assert!(d < 1e-3, "{shape:?} relu={relu}: grad {name} differs by {d}");
            }
        }
    }

    #[test]
    fn eval_uses_running_stats() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let one = Tensor::new(&[1f32, 2.], &dev).unwrap();
        let zero = Tensor::new(&[0f32, 1.], &dev).unwrap();
        let y = batch_norm_eval(&x, &one, &zero, &zero, &Tensor::new(&[4f32, 1.], &dev).unwrap(), 0.0).unwrap();
        // channel 0: x / 2 * 1 + 0; channel 1: (x - 1) / 1 * 2 + 1
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![0.5, 3.0], vec![1.5, 7.0]]);
    }

    #[test]
    fn one_value_per_channel_is_an_error() {
        let x = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(batch_norm_train(&x, &w, &w, 1e-5, false).is_err());
        assert!(batch_norm_train_reference(&x, &w, &w, 1e-5).is_err());
    }
}
