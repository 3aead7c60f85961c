//! Global Response Normalization (ConvNeXt V2), dense and per sample over visible sites.
//!
//! The formula is timm's / the official dense `GRN` (METHODS.md 1.5), on channels-last input:
//! ```text
//! Gx = ||x||_2 over the spatial positions of each sample      (b, c)
//! Nx = Gx / (mean_c Gx + 1e-6)
//! y  = gamma * (x * Nx) + beta + x
//! ```
//! The sparse form takes a site matrix (n, c) whose rows are grouped by sample (a
//! [`crate::sparse::SiteMap`]'s `offsets()`), and normalises each sample over its visible sites
//! only (Project decision 2: per sample, as the JAX masked reference, not over the whole batch
//! as MinkowskiGRN does). With masked positions zeroed, that equals the dense formula.
//!
//! Where `Gx = 0` (a channel that is zero at every position of a sample) the norm has no
//! derivative; like PyTorch's `torch.norm`, the backward uses 0 there (the composed reference
//! would produce NaN through `sqrt`). The op keeps nothing for the backward but its inputs.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, is_cpu_f32, par_accumulate};

/// ConvNeXt V2's constant in the denominator.
pub const GRN_EPS: f64 = 1e-6;

/// Rows `offsets[i]..offsets[i + 1]` of an (n, c) matrix form sample `i`.
#[derive(Clone)]
struct Segments(Arc<Vec<usize>>);

impl Segments {
    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.0.windows(2).map(|w| (w[0], w[1]))
    }
    fn count(&self) -> usize {
        self.0.len().saturating_sub(1)
    }
    fn get(&self, i: usize) -> (usize, usize) {
        (self.0[i], self.0[i + 1])
    }
}

/// Per-sample `Gx` (the L2 norm over rows, per channel) and `Nx`.
fn norms(x: &[f32], c: usize, rows: (usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let mut s = vec![0f64; c];
    for r in rows.0..rows.1 {
        for (a, &v) in s.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += (v as f64) * (v as f64);
        }
    }
    let g: Vec<f64> = s.iter().map(|v| v.sqrt()).collect();
    let denom = g.iter().sum::<f64>() / c as f64 + GRN_EPS;
    (g.iter().map(|&v| v as f32).collect(), g.iter().map(|v| (v / denom) as f32).collect())
}

struct Grn(Segments);

impl CustomOp3 for Grn {
    fn name(&self) -> &'static str {
        "grn"
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
        let (n, c) = l1.shape().dims2()?;
        let x = f32_slice(s1, l1, "grn x")?;
        let (gamma, beta) = (f32_slice(s2, l2, "grn gamma")?, f32_slice(s3, l3, "grn beta")?);
        let mut out = vec![0f32; n * c];
        let chunks = split_by_segments(&mut out, &self.0, c);
        chunks.into_par_iter().for_each(|(rows, o)| {
            let (_, nx) = norms(x, c, rows);
            let scale: Vec<f32> = gamma.iter().zip(&nx).map(|(g, v)| 1.0 + g * v).collect();
            for (r, orow) in (rows.0..rows.1).zip(o.chunks_exact_mut(c)) {
                let xr = &x[r * c..(r + 1) * c];
                for k in 0..c {
                    orow[k] = xr[k] * scale[k] + beta[k];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(gamma, &grad, &GrnInputGrad(self.0.clone()))?;
        let dp = x.apply_op2_no_bwd(&grad, &GrnParamGrad(self.0.clone()))?;
        let c = gamma.dim(0)?;
        Ok((Some(dx), Some(dp.narrow(0, 0, c)?), Some(dp.narrow(0, c, c)?)))
    }
}

/// Splits an (n, c) buffer into the disjoint row blocks of the segments.
fn split_by_segments<'a>(buf: &'a mut [f32], seg: &Segments, c: usize) -> Vec<((usize, usize), &'a mut [f32])> {
    let mut out = Vec::with_capacity(seg.count());
    let mut rest = buf;
    for (a, b) in seg.iter() {
        let (head, tail) = rest.split_at_mut((b - a) * c);
        out.push(((a, b), head));
        rest = tail;
    }
    out
}

/// dx from (x, gamma, dy); see the module header for the formula it differentiates.
struct GrnInputGrad(Segments);

impl CustomOp3 for GrnInputGrad {
    fn name(&self) -> &'static str {
        "grn-dx"
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
        let (n, c) = l1.shape().dims2()?;
        let x = f32_slice(s1, l1, "grn dx: x")?;
        let gamma = f32_slice(s2, l2, "grn dx: gamma")?;
        let dy = f32_slice(s3, l3, "grn dx: dy")?;
        let mut dx = vec![0f32; n * c];
        split_by_segments(&mut dx, &self.0, c).into_par_iter().for_each(|(rows, d)| {
            let (g, nx) = norms(x, c, rows);
            // a_k = gamma_k * sum_rows dy * x: the gradient with respect to Nx_k.
            let mut a = vec![0f64; c];
            for r in rows.0..rows.1 {
                for k in 0..c {
                    a[k] += (dy[r * c + k] * x[r * c + k]) as f64;
                }
            }
            a.iter_mut().zip(gamma).for_each(|(v, &gm)| *v *= gm as f64);
            let denom = g.iter().map(|&v| v as f64).sum::<f64>() / c as f64 + GRN_EPS;
            let cross: f64 = a.iter().zip(&g).map(|(a, &g)| a * g as f64).sum::<f64>() / (c as f64 * denom * denom);
            // dL/dG_k, then dG_k/dx = x / G_k (0 where G_k = 0).
            let coef: Vec<f32> =
                (0..c).map(|k| if g[k] > 0.0 { ((a[k] / denom - cross) / g[k] as f64) as f32 } else { 0.0 }).collect();
            for (r, drow) in (rows.0..rows.1).zip(d.chunks_exact_mut(c)) {
                for k in 0..c {
                    let (xv, dv) = (x[r * c + k], dy[r * c + k]);
                    drow[k] = dv * (1.0 + gamma[k] * nx[k]) + coef[k] * xv;
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((n, c))))
    }
}

/// [dgamma, dbeta] = [sum dy * x * Nx, sum dy].
struct GrnParamGrad(Segments);

impl CustomOp2 for GrnParamGrad {
    fn name(&self) -> &'static str {
        "grn-dparams"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l1.shape().dims2()?;
        let (x, dy) = (f32_slice(s1, l1, "grn dparams: x")?, f32_slice(s2, l2, "grn dparams: dy")?);
        let acc = par_accumulate(self.0.count(), 2 * c, |i, acc| {
            let rows = self.0.get(i);
            let (_, nx) = norms(x, c, rows);
            let (dg, db) = acc.split_at_mut(c);
            for r in rows.0..rows.1 {
                for k in 0..c {
                    dg[k] += dy[r * c + k] * x[r * c + k] * nx[k];
                    db[k] += dy[r * c + k];
                }
            }
        });
        Ok((CpuStorage::F32(acc), Shape::from(2 * c)))
    }
}

fn check(c: usize, gamma: &Tensor, beta: &Tensor, what: &str) -> Result<()> {
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!("{what}: gamma {:?} and beta {:?} must both be ({c},)", gamma.shape(), beta.shape())
    }
    Ok(())
}

/// GRN of a site matrix `x` (n, c) whose sample `i` owns rows `offsets[i]..offsets[i + 1]`
/// (e.g. `SiteMap::offsets()`), normalising each sample over its rows only.
pub fn grn_sites(x: &Tensor, offsets: &[usize], gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (n, c) =
        x.dims2().map_err(|_| candle_core::Error::Msg(format!("grn_sites: x must be (n, c), got {:?}", x.shape())))?;
    check(c, gamma, beta, "grn_sites")?;
    if offsets.first() != Some(&0) || offsets.last() != Some(&n) || offsets.windows(2).any(|w| w[0] > w[1]) {
        candle_core::bail!("grn_sites: offsets must rise from 0 to the row count {n}, got {offsets:?}")
    }
    if !x.device().is_cpu() {
        return grn_sites_composed(x, offsets, gamma, beta);
    }
    if !is_cpu_f32(x) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return grn_sites(&f(x)?, offsets, &f(gamma)?, &f(beta)?)?.to_dtype(x.dtype());
    }
    let seg = Segments(Arc::new(offsets.to_vec()));
    x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Grn(seg))
}

/// GRN of a channels-last map xs (b, h, w, c); gamma, beta (c,) (timm's `grn.weight`/`grn.bias`).
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// let x = Tensor::ones((2, 3, 3, 4), DType::F32, &Device::Cpu)?;
/// let z = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
/// // gamma = beta = 0 (their initial values): GRN is the identity.
/// let y = selfsup_ops::grn::grn(&x, &z, &z)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.0; 72]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn grn(xs: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = xs
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("grn: input must be (b, h, w, c), got {:?}", xs.shape())))?;
    check(c, gamma, beta, "grn")?;
    if !xs.device().is_cpu() {
        return grn_reference(xs, gamma, beta);
    }
    let offsets: Vec<usize> = (0..=b).map(|i| i * h * w).collect();
    grn_sites(&xs.reshape((b * h * w, c))?, &offsets, gamma, beta)?.reshape((b, h, w, c))
}

/// Reference for [`grn`], composed from candle ops exactly as timm writes it.
pub fn grn_reference(xs: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let gx = xs.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    let nx = gx.broadcast_div(&(gx.mean_keepdim(3)? + GRN_EPS)?)?;
    xs.broadcast_mul(&nx)?.broadcast_mul(gamma)?.broadcast_add(beta)?.add(xs)
}

/// [`grn_sites`] from candle ops, sample by sample (the non-CPU path until a kernel exists).
fn grn_sites_composed(x: &Tensor, offsets: &[usize], gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let parts = offsets
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| grn_reference(&x.narrow(0, w[0], w[1] - w[0])?.reshape((1, 1, w[1] - w[0], c))?, gamma, beta))
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(x.clone());
    }
    Tensor::cat(&parts, 2)?.reshape(x.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::SiteMap;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    #[test]
    fn dense_matches_timm_formula() {
        for (i, shape) in [[2, 3, 4, 5], [1, 1, 1, 3], [3, 2, 5, 8]].into_iter().enumerate() {
            let inputs = [randn(&shape, i as u64), randn(&[shape[3]], 10), randn(&[shape[3]], 11)];
            compare_with_reference(
                &inputs,
                |t| grn(&t[0], &t[1], &t[2]),
                |t| grn_reference(&t[0], &t[1], &t[2]),
                1e-4,
                1e-4,
                &format!("grn {shape:?}"),
            );
        }
        let inputs = [randn(&[2, 2, 3, 4], 1), randn(&[4], 2), randn(&[4], 3)];
        check_finite_differences(&inputs, |t| grn(&t[0], &t[1], &t[2]), 1e-2, 2e-2, 1, "grn fd");
    }

    #[test]
    fn sparse_equals_masked_dense_per_sample() {
        let mut r = crate::rng::Rng::new(3);
        for ratio in [0.0, 0.6, 1.0] {
            let vis: Vec<bool> = (0..3 * 4 * 4).map(|_| r.uniform() >= ratio).collect();
            let map = SiteMap::from_visible(&vis, 3, 4, 4).unwrap();
            let inputs = [randn(&[map.len(), 6], 1), randn(&[6], 2), randn(&[6], 3)];
            compare_with_reference(
                &inputs,
                |t| grn_sites(&t[0], map.offsets(), &t[1], &t[2]),
                |t| map.gather(&grn_reference(&map.scatter(&t[0])?, &t[1], &t[2])?),
                1e-4,
                1e-4,
                &format!("grn_sites at mask ratio {ratio}"),
            );
            compare_with_reference(
                &inputs,
                |t| grn_sites_composed(&t[0], map.offsets(), &t[1], &t[2]),
                |t| grn_sites(&t[0], map.offsets(), &t[1], &t[2]),
                1e-4,
                1e-4,
                &format!("composed grn_sites at mask ratio {ratio}"),
            );
        }
    }

    #[test]
    fn zero_channel_gets_zero_gradient_not_nan() {
        let x = randn(&[1, 2, 2, 3], 1)
            .broadcast_mul(&Tensor::new(&[1f32, 0.0, 1.0], &candle_core::Device::Cpu).unwrap())
            .unwrap();
        let x = candle_core::Var::from_tensor(&x).unwrap();
        let (g, b) = (randn(&[3], 2), randn(&[3], 3));
        let gr = grn(&x, &g, &b).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = gr.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(dx.iter().all(|v| v.is_finite()), "{dx:?}");
    }

    #[test]
    fn bad_offsets_and_shapes_are_errors() {
        let (x, g) = (randn(&[5, 3], 1), randn(&[3], 2));
        let e = grn_sites(&x, &[0, 2, 4], &g, &g).unwrap_err().to_string();
        assert!(e.contains("row count 5"), "{e}");
        let e = grn(&randn(&[1, 2, 2, 4], 1), &g, &g).unwrap_err().to_string();
        assert!(e.contains("must both be (4,)"), "{e}");
    }
}
