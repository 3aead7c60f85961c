//! GELU (erf form, PyTorch's default `nn.GELU()`) with a backward, in parallel.
//!
//! Why: candle's `gelu_erf` runs `erf` from libm one element at a time on one thread; in a
//! ViT-Tiny forward at 224 px it was a third of the time (measured: 290 ms of 814 ms per batch
//! of 32). This op splits the tensor across rayon tasks and evaluates erf with the rational
//! approximation of Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, about f32's
//! resolution of erf near 1; one exp and a few multiply-adds). The exp is `cpu::exp_fast` and
//! the loops are compiled for AVX2+FMA as well (`cpu::multiversion`), so they run 8 lanes wide:
//! with libm's scalar `expf` the op was still about 10 % of that forward.
//! Forward `y = x Phi(x)`, backward `dy/dx = Phi(x) + x phi(x)` (phi the normal density).
//! The reference is candle's `gelu_erf`; a test holds the two together (values and gradients).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cpu::{exp_fast, f32_slice, is_cpu_f32, multiversion};

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// erf(x) with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_fast(-a * a);
    y.copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

multiversion! {
    /// `out = gelu(x)` elementwise, into uninitialised memory (a zeroed buffer costs a pass).
    fn gelu_chunk(out: &mut [MaybeUninit<f32>], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2)));
        }
    }
}

multiversion! {
    /// `dx = dy * gelu'(x)` elementwise.
    fn gelu_bwd_chunk(dx: &mut [f32], x: &[f32], dy: &[f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp_fast(-0.5 * v * v);
            *d = g * (cdf + v * pdf);
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu x")?;
        let mut out = Vec::with_capacity(x.len());
        out.spare_capacity_mut().par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| gelu_chunk(o, x));
        // SAFETY: the chunks cover all x.len() elements and `gelu_chunk` wrote every one.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// dx = dy * (Phi(x) + x phi(x)), from (x, dy).
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_slice(s1, l1, "gelu bwd x")?, f32_slice(s2, l2, "gelu bwd dy")?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(dy.par_chunks(CHUNK))
            .for_each(|((d, x), g)| gelu_bwd_chunk(d, x, g));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU, erf form, with a backward. f32 on the CPU runs in parallel; anything else takes
/// candle's `gelu_erf`.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.0, 1.0], &Device::Cpu)?;
/// let y = selfsup_ops::gelu::gelu_erf(&x)?.to_vec1::<f32>()?;
/// assert!((y[2] - 0.841_344_7).abs() < 1e-6 && y[1] == 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{compare_with_reference, randn};

    #[test]
    fn erf_is_within_a_few_f32_ulps() {
        for i in -400..=400 {
            let x = i as f64 / 100.0;
            // libm's erf in f64 as the reference.
            let want = libm_erf(x);
            assert!((erf(x as f32) as f64 - want).abs() < 4e-7, "erf({x}): {} vs {want}", erf(x as f32));
        }
    }

    /// erf via its series / continued fraction in f64 (reference for the test only).
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz & Stegun 7.1.5 series: accurate to 1e-15 for |x| <= 4 with enough terms.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while n < 200.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn matches_candle_values_and_gradients() {
        let x = (randn(&[37, 129], 3) * 3.0).unwrap();
        compare_with_reference(&[x], |t| gelu_erf(&t[0]), |t| t[0].gelu_erf(), 1e-6, 1e-5, "gelu");
    }
}
