//! LayerNorm with a backward: over the last axis (channels-last maps, token sequences, site
//! matrices) and over axis 1 of NCHW maps (timm's `LayerNorm2d`, ConvNeXt's "channels_first").
//!
//! Why: candle's `LayerNorm` module and `ops::layer_norm` are fused ops with **no backward**; a
//! model built on them trains with its norms and everything before them frozen, silently
//! (CANDLE.md 1.3). These fused ops compute the statistics in one pass per row (in f64) and
//! recompute them in the backward from x, so nothing but the inputs is kept for it.
//! The reference is the composed formula from candle ops (what `layer_norm_slow` does).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{f32_slice, is_cpu_f32, multiversion, par_accumulate};

/// Which axis is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// (..., c): rows of `c` contiguous values.
    Last,
    /// (b, c, h, w): `c` values `h * w` apart.
    Channels,
}

/// Row geometry: `groups` independent blocks of `c` channels by `inner` positions; channel `k`
/// of position `p` in group `g` sits at `(g * c + k) * inner + p`. Last-axis norms have
/// `inner = 1` after folding rows into groups.
#[derive(Debug, Clone, Copy)]
struct Geom {
    groups: usize,
    c: usize,
    inner: usize,
}

impl Geom {
    fn of(shape: &Shape, axis: Axis) -> Result<Self> {
        match axis {
            Axis::Last => {
                let c = *shape.dims().last().unwrap_or(&0);
                Ok(Self { groups: shape.elem_count() / c.max(1), c, inner: 1 })
            }
            Axis::Channels => {
                let (b, c, h, w) = shape.dims4()?;
                Ok(Self { groups: b, c, inner: h * w })
            }
        }
    }
}

/// Per-task buffers, sized to one group's positions and reused for every group of the task.
struct Scratch {
    s1: Vec<f64>,
    s2: Vec<f64>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    m1: Vec<f32>,
    m2: Vec<f32>,
}

impl Scratch {
    fn new(inner: usize) -> Self {
        let z = vec![0f32; inner];
        Self { s1: vec![0.0; inner], s2: vec![0.0; inner], mean: z.clone(), rstd: z.clone(), m1: z.clone(), m2: z }
    }

    /// Mean and 1/std of each of the `inner` positions of one group (block `c * inner`).
    fn stats(&mut self, x: &[f32], g: Geom, eps: f64) {
        self.s1.fill(0.0);
        self.s2.fill(0.0);
        for k in 0..g.c {
            let row = &x[k * g.inner..(k + 1) * g.inner];
            for p in 0..g.inner {
                let v = row[p] as f64;
                self.s1[p] += v;
                self.s2[p] += v * v;
            }
        }
        let n = g.c as f64;
        for p in 0..g.inner {
            let m = self.s1[p] / n;
            self.mean[p] = m as f32;
            self.rstd[p] = (1.0 / ((self.s2[p] / n - m * m).max(0.0) + eps).sqrt()) as f32;
        }
    }
}

/// Groups per rayon task for last-axis norms (one row each is too fine-grained).
fn rows_per_task(g: Geom) -> usize {
    if g.inner == 1 {
        (4096 / g.c.max(1)).max(1)
    } else {
        1
    }
}

struct LayerNorm {
    axis: Axis,
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let x = f32_slice(s1, l1, "layer_norm x")?;
        let (w, b) = (f32_slice(s2, l2, "layer_norm weight")?, f32_slice(s3, l3, "layer_norm bias")?);
        let g = Geom::of(l1.shape(), self.axis)?;
        let block = g.c * g.inner;
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(g);
        if g.inner == 1 {
            let eps = self.eps as f32;
            out.par_chunks_mut(block * per)
                .zip(x.par_chunks(block * per))
                .for_each(|(o, x)| rows_fwd(x, w, b, g.c, eps, o));
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(block * per).zip(x.par_chunks(block * per)).for_each(|(o, x)| {
            let mut sc = Scratch::new(g.inner);
            for (o, x) in o.chunks_exact_mut(block).zip(x.chunks_exact(block)) {
                sc.stats(x, g, self.eps);
                let (mean, rstd) = (&sc.mean, &sc.rstd);
                for k in 0..g.c {
                    let (xr, or) = (&x[k * g.inner..][..g.inner], &mut o[k * g.inner..][..g.inner]);
                    for p in 0..g.inner {
                        or[p] = (xr[p] - mean[p]) * rstd[p] * w[k] + b[k];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let c = w.dim(0)?;
        if self.axis == Axis::Last {
            let all = x.apply_op3_no_bwd(w, &grad, &RowsBwd { eps: self.eps as f32 })?;
            let n = x.elem_count();
            return Ok((
                Some(all.narrow(0, 0, n)?.reshape(x.shape())?),
                Some(all.narrow(0, n, c)?),
                Some(all.narrow(0, n + c, c)?),
            ));
        }
        let dx = x.apply_op3_no_bwd(w, &grad, &LayerNormInputGrad { axis: self.axis, eps: self.eps })?;
        let dwb = x.apply_op2_no_bwd(&grad, &LayerNormParamGrad { axis: self.axis, eps: self.eps })?;
        Ok((Some(dx), Some(dwb.narrow(0, 0, c)?), Some(dwb.narrow(0, c, c)?)))
    }
}

/// `sum_i f(a[i], b[i])` in eight lanes over `chunks_exact` (so the bounds checks vanish and
/// the loop vectorises; a plain `.sum()` must keep the serial order).
#[inline(always)]
fn lanes2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum_i a[i] * b[i] * (c[i] - m)` in eight lanes.
#[inline(always)]
fn dot3_centered(a: &[f32], b: &[f32], c: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f32 =
        ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()).map(|((x, y), z)| x * y * (z - m)).sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l] * (z[l] - m);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Mean and 1/std of one row (two passes over a row that sits in L1).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lanes2(x, x, |v, _| v) / n;
    let var = lanes2(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// Last-axis forward over a block of rows of `c` values.
    fn rows_fwd(x: &[f32], w: &[f32], b: &[f32], c: usize, eps: f32, out: &mut [f32]) {
        for (x, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let (mean, rstd) = row_stats(x, eps);
            for k in 0..c {
                o[k] = (x[k] - mean) * rstd * w[k] + b[k];
            }
        }
    }
}

multiversion! {
    /// Last-axis backward over a block of rows: writes dx, adds into dw and db.
    fn rows_bwd(x: &[f32], w: &[f32], dy: &[f32], c: usize, eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
        let inv = 1.0 / c as f32;
        for ((x, dy), dx) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let (mean, rstd) = row_stats(x, eps);
            let m1 = lanes2(dy, w, |d, w| d * w) * inv;
            let m2 = dot3_centered(dy, w, x, mean) * rstd * inv;
            for k in 0..c {
                let xhat = (x[k] - mean) * rstd;
                dx[k] = rstd * (dy[k] * w[k] - m1 - xhat * m2);
                dw[k] += dy[k] * xhat;
                db[k] += dy[k];
            }
        }
    }
}

/// The fused last-axis backward: (x, w, dy) -> flat [dx, dw, db] in one pass over x and dy.
struct RowsBwd {
    eps: f32,
}

impl CustomOp3 for RowsBwd {
    fn name(&self) -> &'static str {
        "layer-norm-rows-bwd"
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
        let x = f32_slice(s1, l1, "layer_norm bwd: x")?;
        let w = f32_slice(s2, l2, "layer_norm bwd: w")?;
        let dy = f32_slice(s3, l3, "layer_norm bwd: dy")?;
        let c = w.len();
        let n = x.len();
        let mut out = vec![0f32; n + 2 * c];
        let (dx, tail) = out.split_at_mut(n);
        let per = rows_per_task(Geom { groups: 0, c, inner: 1 }) * c;
        // Fixed chunks and an ordered sum of their parameter gradients: deterministic.
        let parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(dy.par_chunks(per))
            .map(|((dx, x), dy)| {
                let mut acc = vec![0f32; 2 * c];
                let (dw, db) = acc.split_at_mut(c);
                rows_bwd(x, w, dy, c, self.eps, dx, dw, db);
                acc
            })
            .collect();
        let params = parts.into_iter().fold(vec![0f32; 2 * c], crate::cpu::sum_vecs);
        tail.copy_from_slice(&params);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

/// dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)), per normalised vector.
struct LayerNormInputGrad {
    axis: Axis,
    eps: f64,
}

impl CustomOp3 for LayerNormInputGrad {
    fn name(&self) -> &'static str {
        "layer-norm-dx"
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
        let x = f32_slice(s1, l1, "layer_norm dx: x")?;
        let w = f32_slice(s2, l2, "layer_norm dx: w")?;
        let dy = f32_slice(s3, l3, "layer_norm dx: dy")?;
        let g = Geom::of(l1.shape(), self.axis)?;
        let block = g.c * g.inner;
        let per = rows_per_task(g);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(block * per).zip(x.par_chunks(block * per)).zip(dy.par_chunks(block * per)).for_each(
            |((dx, x), dy)| {
                let mut sc = Scratch::new(g.inner);
                for ((dx, x), dy) in dx.chunks_exact_mut(block).zip(x.chunks_exact(block)).zip(dy.chunks_exact(block)) {
                    sc.stats(x, g, self.eps);
                    let Scratch { mean, rstd, m1, m2, .. } = &mut sc;
                    m1.fill(0.0);
                    m2.fill(0.0);
                    for k in 0..g.c {
                        for p in 0..g.inner {
                            let i = k * g.inner + p;
                            let dyw = dy[i] * w[k];
                            m1[p] += dyw;
                            m2[p] += dyw * (x[i] - mean[p]) * rstd[p];
                        }
                    }
                    let inv = 1.0 / g.c as f32;
                    for k in 0..g.c {
                        for p in 0..g.inner {
                            let i = k * g.inner + p;
                            let xhat = (x[i] - mean[p]) * rstd[p];
                            dx[i] = rstd[p] * (dy[i] * w[k] - m1[p] * inv - xhat * m2[p] * inv);
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// [dw, db] = [sum dy * xhat, sum dy] over all normalised vectors.
struct LayerNormParamGrad {
    axis: Axis,
    eps: f64,
}

impl candle_core::CustomOp2 for LayerNormParamGrad {
    fn name(&self) -> &'static str {
        "layer-norm-dw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm dw: x")?;
        let dy = f32_slice(s2, l2, "layer_norm dw: dy")?;
        let g = Geom::of(l1.shape(), self.axis)?;
        let block = g.c * g.inner;
        let acc = par_accumulate(g.groups, 2 * g.c, |gi, acc| {
            let (x, dy) = (&x[gi * block..][..block], &dy[gi * block..][..block]);
            let (dw, db) = acc.split_at_mut(g.c);
            if g.inner == 1 {
                // A row: no scratch allocation per row.
                let (s1, s2) = x.iter().fold((0f64, 0f64), |(a, b), &v| (a + v as f64, b + (v as f64).powi(2)));
                let m = s1 / g.c as f64;
                let (mean, rstd) = (m as f32, (1.0 / ((s2 / g.c as f64 - m * m).max(0.0) + self.eps).sqrt()) as f32);
                for k in 0..g.c {
                    dw[k] += dy[k] * (x[k] - mean) * rstd;
                    db[k] += dy[k];
                }
                return;
            }
            let mut sc = Scratch::new(g.inner);
            sc.stats(x, g, self.eps);
            let (mean, rstd) = (&sc.mean, &sc.rstd);
            for k in 0..g.c {
                for p in 0..g.inner {
                    let i = k * g.inner + p;
                    dw[k] += dy[i] * (x[i] - mean[p]) * rstd[p];
                    db[k] += dy[i];
                }
            }
        });
        Ok((CpuStorage::F32(acc), Shape::from(2 * g.c)))
    }
}

fn run(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, axis: Axis) -> Result<Tensor> {
    let c = match axis {
        Axis::Last => *xs.dims().last().unwrap_or(&0),
        Axis::Channels => {
            xs.dims4()
                .map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "layer_norm_nchw: input must be (b, c, h, w), got {:?}",
                        xs.shape()
                    ))
                })?
                .1
        }
    };
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must both be ({c},) for input {:?}",
            weight.shape(),
            bias.shape(),
            xs.shape()
        )
    }
    if !xs.device().is_cpu() {
        return match axis {
            Axis::Last => layer_norm_reference(xs, weight, bias, eps),
            Axis::Channels => layer_norm_nchw_reference(xs, weight, bias, eps),
        };
    }
    if !is_cpu_f32(xs) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return run(&f(xs)?, &f(weight)?, &f(bias)?, eps, axis)?.to_dtype(xs.dtype());
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { axis, eps })
}

/// LayerNorm over the last axis: xs (..., c), weight and bias (c,). Gradients flow to all.
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((2, 4))?;
/// let (w, b) = (Tensor::ones(4, DType::F32, &Device::Cpu)?, Tensor::zeros(4, DType::F32, &Device::Cpu)?);
/// let y = selfsup_ops::layer_norm::layer_norm(&x, &w, &b, 1e-6)?;
/// let row: Vec<f32> = y.get(0)?.to_vec1()?;
/// assert!((row[0] + 1.3416).abs() < 1e-3);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    run(xs, weight, bias, eps, Axis::Last)
}

/// LayerNorm over the channels of an NCHW map (timm `LayerNorm2d`): xs (b, c, h, w).
pub fn layer_norm_nchw(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    run(xs, weight, bias, eps, Axis::Channels)
}

/// Reference for [`layer_norm`], composed from candle ops (biased variance, as PyTorch).
pub fn layer_norm_reference(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Reference for [`layer_norm_nchw`]: the last-axis reference between permutes.
pub fn layer_norm_nchw_reference(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_reference(&xs.permute((0, 2, 3, 1))?, weight, bias, eps)?.permute((0, 3, 1, 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    #[test]
    fn last_axis_matches_reference() {
        for (i, shape) in [vec![3, 5], vec![2, 3, 4, 7], vec![1, 1], vec![700, 9]].into_iter().enumerate() {
            let c = *shape.last().unwrap();
            let x = (randn(&shape, i as u64) * 3.0).unwrap().affine(1.0, 2.0).unwrap();
            let inputs = [x, randn(&[c], 10), randn(&[c], 11)];
            compare_with_reference(
                &inputs,
                |t| layer_norm(&t[0], &t[1], &t[2], 1e-6),
                |t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-6),
                1e-4,
                1e-4,
                &format!("layer_norm {shape:?}"),
            );
        }
    }

    #[test]
    fn channels_first_matches_reference_and_finite_differences() {
        for (i, shape) in [[2, 5, 3, 4], [1, 3, 1, 1], [3, 8, 5, 1]].into_iter().enumerate() {
            let inputs = [randn(&shape, i as u64), randn(&[shape[1]], 10), randn(&[shape[1]], 11)];
            compare_with_reference(
                &inputs,
                |t| layer_norm_nchw(&t[0], &t[1], &t[2], 1e-6),
                |t| layer_norm_nchw_reference(&t[0], &t[1], &t[2], 1e-6),
                1e-4,
                1e-4,
                &format!("layer_norm_nchw {shape:?}"),
            );
        }
        let inputs = [randn(&[2, 4, 2, 3], 1), randn(&[4], 2), randn(&[4], 3)];
        check_finite_differences(&inputs, |t| layer_norm_nchw(&t[0], &t[1], &t[2], 1e-5), 1e-2, 2e-2, 1, "ln2d fd");
    }

    #[test]
    fn bf16_and_shape_errors() {
        let x = randn(&[4, 6], 1).to_dtype(DType::BF16).unwrap();
        let (w, b) = (randn(&[6], 2), randn(&[6], 3));
        let y = layer_norm(&x, &w.to_dtype(DType::BF16).unwrap(), &b.to_dtype(DType::BF16).unwrap(), 1e-6).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let e = layer_norm(&randn(&[4, 5], 1), &w, &b, 1e-6).unwrap_err().to_string();
        assert!(e.contains("must both be (5,)"), "{e}");
        let e = layer_norm_nchw(&randn(&[4, 6], 1), &w, &b, 1e-6).unwrap_err().to_string();
        assert!(e.contains("(b, c, h, w)"), "{e}");
    }
}
