//! Channels-last resizing that matches PyTorch's `F.interpolate(x, size=(out_h, out_w), mode)`
//! for `mode="nearest"` and `mode="bilinear"` (both `align_corners`), forward and backward.
//!
//! Why: candle's `upsample_nearest2d` has a backward only for integer factors and
//! `upsample_bilinear2d` has none (CANDLE.md 1.3); position-embedding resizing and the dense
//! heads of DenseCL / CARE need both, at arbitrary sizes.
//!
//! Index rules, copied from ATen's `UpSample.h` for the `size=` form (no `scale_factor`), all in
//! float32 like ATen's CPU kernels for float inputs:
//! - nearest: `src = min(floor(dst * (in / out)), in - 1)` with the scale `in / out` rounded
//!   to f32 first. This differs from exact arithmetic at some sizes (26 -> 22: output 11 reads
//!   input 12, not 13); the golden fixture pins such a case.
//! - bilinear, `align_corners=false`: `src = max((dst + 0.5) * (in / out) - 0.5, 0)`;
//!   `align_corners=true`: `src = dst * (in - 1) / (out - 1)` (0 when `out == 1`). Then
//!   `i0 = min(floor(src), in - 1)`, `i1 = min(i0 + 1, in - 1)`, `l1 = clamp(src - i0, 0, 1)`,
//!   `l0 = 1 - l1`; an axis whose size is unchanged is copied.
//!
//! Each axis becomes a table of (source index, weight) taps; the 2-D resize is their outer
//! product, `y = sum_ty w_ty * (sum_tx w_tx * x)` as ATen nests it. The backward is the adjoint
//! with the same weights, computed as a gather over the transposed tables, so every thread
//! writes only its own input rows. Other devices and dtypes are converted to CPU f32 and back.
//! Tests: candle's `upsample_nearest2d` for integer factors (values and gradients), a PyTorch
//! golden fixture (`tests/fixtures/make_resize_fixtures.py`) and finite differences.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, on_cpu_f32};

/// Interpolation mode of [`interpolate_nhwc`], as PyTorch's `mode` / `align_corners`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// `mode="nearest"`: copy the pixel at `floor(dst * in / out)`.
    Nearest,
    /// `mode="bilinear"`: linear along each axis, with half-pixel centres unless
    /// `align_corners`.
    Bilinear { align_corners: bool },
}

/// (source index, weight) taps of one axis, forward (per output index) and transposed (per
/// input index, listing the outputs that read it).
#[derive(Debug)]
struct Axis {
    fwd: Vec<Vec<(usize, f32)>>,
    bwd: Vec<Vec<(usize, f32)>>,
}

impl Axis {
    fn new(n_in: usize, n_out: usize, mode: Resize) -> Self {
        let fwd: Vec<Vec<(usize, f32)>> = (0..n_out).map(|o| taps(o, n_in, n_out, mode)).collect();
        let mut bwd = vec![Vec::new(); n_in];
        for (o, ts) in fwd.iter().enumerate() {
            for &(i, wt) in ts {
                bwd[i].push((o, wt));
            }
        }
        Axis { fwd, bwd }
    }
}

/// The taps of output index `o` on an axis resized from `n_in` to `n_out` (ATen's
/// `nearest_idx` and `compute_source_index_and_lambda`).
fn taps(o: usize, n_in: usize, n_out: usize, mode: Resize) -> Vec<(usize, f32)> {
    if n_in == n_out {
        return vec![(o, 1.0)];
    }
    match mode {
        Resize::Nearest => {
            let src = if n_out == 2 * n_in {
                o >> 1
            } else {
                let scale = n_in as f32 / n_out as f32;
                ((o as f32 * scale).floor() as usize).min(n_in - 1)
            };
            vec![(src, 1.0)]
        }
        Resize::Bilinear { align_corners } => {
            let src = if align_corners {
                let scale = if n_out > 1 { (n_in - 1) as f32 / (n_out - 1) as f32 } else { 0.0 };
                scale * o as f32
            } else {
                let scale = n_in as f32 / n_out as f32;
                (scale * (o as f32 + 0.5) - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            vec![(i0, 1.0 - l1), (i1, l1)]
        }
    }
}

/// Forward: (b, h, w, c) -> (b, out_h, out_w, c).
struct Interp {
    ys: Arc<Axis>,
    xs: Arc<Axis>,
}

/// Backward: (b, out_h, out_w, c) gradient -> (b, h, w, c), the adjoint of [`Interp`].
struct InterpBwd {
    ys: Arc<Axis>,
    xs: Arc<Axis>,
}

impl CustomOp1 for Interp {
    fn name(&self) -> &'static str {
        "interpolate-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let (ys, xs) = (&self.ys, &self.xs);
        let (oh, ow) = (ys.fwd.len(), xs.fwd.len());
        if ys.bwd.len() != h || xs.bwd.len() != w {
            candle_core::bail!(
                "interpolate_nhwc: input {:?} but tables for {}x{}",
                l.shape(),
                ys.bwd.len(),
                xs.bwd.len()
            )
        }
        let x = f32_slice(s, l, "interpolate_nhwc")?;
        let mut out = vec![0f32; b * oh * ow * c];
        // One chunk per output row (b, oy): rows are independent.
        out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
            let (bi, oy) = (row / oh, row % oh);
            let img = &x[bi * h * w * c..(bi + 1) * h * w * c];
            let mut inner = vec![0f32; c];
            for (ox, d) in dst.chunks_mut(c).enumerate() {
                for &(iy, wy) in &ys.fwd[oy] {
                    inner.fill(0.0);
                    for &(ix, wx) in &xs.fwd[ox] {
                        let p = (iy * w + ix) * c;
                        inner.iter_mut().zip(&img[p..p + c]).for_each(|(a, v)| *a += wx * v);
                    }
                    d.iter_mut().zip(&inner).for_each(|(a, v)| *a += wy * v);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, oh, ow, c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = InterpBwd { ys: self.ys.clone(), xs: self.xs.clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for InterpBwd {
    fn name(&self) -> &'static str {
        "interpolate-nhwc-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, oh, ow, c) = l.shape().dims4()?;
        let (ys, xs) = (&self.ys, &self.xs);
        let (h, w) = (ys.bwd.len(), xs.bwd.len());
        if ys.fwd.len() != oh || xs.fwd.len() != ow {
            candle_core::bail!(
                "interpolate_nhwc backward: gradient {:?} but output {}x{}",
                l.shape(),
                ys.fwd.len(),
                xs.fwd.len()
            )
        }
        let dy = f32_slice(s, l, "interpolate_nhwc backward")?;
        let mut dx = vec![0f32; b * h * w * c];
        // One chunk per input row (b, iy), gathering from the outputs that read it: no two
        // threads write the same element.
        dx.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
            let (bi, iy) = (row / h, row % h);
            let g = &dy[bi * oh * ow * c..(bi + 1) * oh * ow * c];
            for (ix, d) in dst.chunks_mut(c).enumerate() {
                for &(oy, wy) in &ys.bwd[iy] {
                    for &(ox, wx) in &xs.bwd[ix] {
                        let p = (oy * ow + ox) * c;
                        let wt = wy * wx;
                        d.iter_mut().zip(&g[p..p + c]).for_each(|(a, v)| *a += wt * v);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// Resizes a channels-last batch to `out_h x out_w` like PyTorch's
/// `F.interpolate(x, size=(out_h, out_w), mode=...)` (see the module docs for the exact index
/// rules). Gradients flow to `xs` for every mode and any up- or down-scaling factor.
///
/// xs: (b, h, w, c); returns (b, out_h, out_w, c). Errors when `xs` is not 4-D or a size is 0.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// use selfsup_ops::{interpolate_nhwc, Resize};
/// # fn main() -> candle_core::Result<()> {
/// let xs = Tensor::new(&[0f32, 1., 2.], &Device::Cpu)?.reshape((1, 1, 3, 1))?;
/// let up = interpolate_nhwc(&xs, 1, 4, Resize::Nearest)?;
/// assert_eq!(up.flatten_all()?.to_vec1::<f32>()?, vec![0., 0., 1., 2.]);
/// let lin = interpolate_nhwc(&xs, 1, 5, Resize::Bilinear { align_corners: true })?;
/// assert_eq!(lin.flatten_all()?.to_vec1::<f32>()?, vec![0., 0.5, 1., 1.5, 2.]);
/// # Ok(())
/// # }
/// ```
pub fn interpolate_nhwc(xs: &Tensor, out_h: usize, out_w: usize, mode: Resize) -> Result<Tensor> {
    if xs.rank() != 4 {
        candle_core::bail!("interpolate_nhwc: expected a (b, h, w, c) input, got shape {:?}", xs.shape())
    }
    let (_, h, w, _) = xs.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!("interpolate_nhwc: cannot resize input {:?} (channels last) to {out_h}x{out_w}", xs.shape())
    }
    let op = Interp { ys: Arc::new(Axis::new(h, out_h, mode)), xs: Arc::new(Axis::new(w, out_w, mode)) };
    on_cpu_f32(xs, |xs| xs.contiguous()?.apply_op1(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_finite_differences, compare_with_reference, randn};
    use candle_core::{DType, Device, Var};

    /// Integer factors, the same on both axes (all candle's backward supports): candle's NCHW
    /// nearest upsampling agrees exactly, values and gradients.
    #[test]
    fn nearest_integer_upsampling_matches_candle() {
        for (i, &(b, h, w, c, oh, ow)) in
            [(2, 3, 4, 3, 6, 8), (1, 2, 5, 2, 6, 15), (1, 1, 1, 4, 3, 3)].iter().enumerate()
        {
            compare_with_reference(
                &[randn(&[b, h, w, c], i as u64)],
                |t| interpolate_nhwc(&t[0], oh, ow, Resize::Nearest),
                |t| {
                    let nchw = t[0].permute((0, 3, 1, 2))?.upsample_nearest2d(oh, ow)?;
                    nchw.permute((0, 2, 3, 1))?.contiguous()
                },
                1e-6,
                1e-6,
                &format!("nearest {h}x{w} -> {oh}x{ow}"),
            );
        }
    }

    /// The committed PyTorch fixture: values and input gradients for non-integer nearest
    /// resizing and bilinear resizing with both `align_corners`.
    #[test]
    fn matches_pytorch_golden_fixture() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/resize.json")).expect("fixture is JSON");
        let cases = doc["cases"].as_array().expect("cases");
        assert!(cases.len() >= 10, "fixture has {} cases", cases.len());
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
        };
        let dims = |v: &serde_json::Value| -> Vec<usize> {
            v.as_array().expect("array").iter().map(|x| x.as_u64().expect("size") as usize).collect()
        };
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let mode = match (case["mode"].as_str(), case["align_corners"].as_bool()) {
                (Some("nearest"), None) => Resize::Nearest,
                (Some("bilinear"), Some(align_corners)) => Resize::Bilinear { align_corners },
                other => panic!("{name}: unknown mode {other:?}"),
            };
            let shape = dims(&case["input_shape"]);
            let out_hw = dims(&case["out_hw"]);
            let (b, c) = (shape[0], shape[3]);
            let t = |v, s: &[usize]| Tensor::from_vec(floats(v), s, &Device::Cpu).unwrap();
            let x = Var::from_tensor(&t(&case["x"], &shape)).unwrap();
            let out_shape = [b, out_hw[0], out_hw[1], c];
            let y = interpolate_nhwc(&x, out_hw[0], out_hw[1], mode).unwrap();
            assert_close(&y, &t(&case["y"], &out_shape), 1e-5, 0.0, &format!("{name}: forward"));
            let g = (y * t(&case["grad_out"], &out_shape)).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(g.get(&x).unwrap(), &t(&case["grad_in"], &shape), 1e-5, 0.0, &format!("{name}: gradient"));
        }
    }

    #[test]
    fn grads_match_finite_differences() {
        // Interpolation is linear, so a large step is exact up to rounding.
        let modes =
            [Resize::Nearest, Resize::Bilinear { align_corners: false }, Resize::Bilinear { align_corners: true }];
        for (i, &(h, w, oh, ow)) in [(5, 4, 7, 3), (3, 6, 2, 11), (4, 4, 1, 9)].iter().enumerate() {
            for mode in modes {
                let x = randn(&[2, h, w, 3], 20 + i as u64);
                check_finite_differences(
                    &[x],
                    |t| interpolate_nhwc(&t[0], oh, ow, mode),
                    0.1,
                    1e-3,
                    1,
                    &format!("{mode:?} {h}x{w} -> {oh}x{ow}"),
                );
            }
        }
    }

    #[test]
    fn same_size_is_the_identity_and_f64_keeps_its_gradient() {
        let x = randn(&[2, 3, 5, 2], 3);
        for mode in
            [Resize::Nearest, Resize::Bilinear { align_corners: false }, Resize::Bilinear { align_corners: true }]
        {
            assert_close(&interpolate_nhwc(&x, 3, 5, mode).unwrap(), &x, 0.0, 0.0, &format!("{mode:?} identity"));
        }
        let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let y = interpolate_nhwc(&x64, 4, 7, Resize::Bilinear { align_corners: false }).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let g = y.sum_all().unwrap().backward().unwrap();
        // Bilinear weights sum to one per output, so the input gradient sums to the output count.
        let total = g.get(&x64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((total - (2 * 4 * 7 * 2) as f64).abs() < 1e-4, "{total}");
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_shape() {
        let e = interpolate_nhwc(&randn(&[3, 4, 2], 0), 2, 2, Resize::Nearest).unwrap_err().to_string();
        assert!(e.contains("[3, 4, 2]"), "{e}");
        let e = interpolate_nhwc(&randn(&[1, 3, 4, 2], 0), 0, 2, Resize::Nearest).unwrap_err().to_string();
        assert!(e.contains("[1, 3, 4, 2]") && e.contains("0x2"), "{e}");
    }
}
