//! Channels-last 2-D max and average pooling with PyTorch's semantics and a backward for any
//! kernel, stride and padding.
//!
//! Why: candle's `max_pool2d` / `avg_pool2d` take no padding and have no backward when the
//! kernel differs from the stride (CANDLE.md 1.3), which rules out ResNet's 3x3 stride-2
//! padding-1 stem pool and every overlapping average pool. The ops here follow
//! `torch.nn.MaxPool2d` / `AvgPool2d` with `ceil_mode=False`, dilation 1:
//! - max pooling pads with -inf; the output is the first maximum in scan order (row by row,
//!   left to right), a NaN wins over any number, and the backward routes the whole gradient to
//!   that element (PyTorch's `max_pool2d_with_indices_backward`). The forward saves the argmax
//!   indices for the backward.
//! - average pooling pads with zeros; the divisor is `kernel^2` when `count_include_pad`
//!   (PyTorch's default) and the number of real (unpadded) elements in the window otherwise.
//! - `padding <= kernel / 2` as PyTorch requires, so every window holds a real element.
//!
//! Both directions run on CPU f32 with rayon: forward over output rows, backward over images
//! (each image's input gradient is written by one thread only). Other devices and dtypes are
//! converted to CPU f32 and back. The references are candle's NCHW pools between permutes,
//! with explicit padding.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, on_cpu_f32};

/// Square window: kernel size, stride and padding on both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Window {
    /// Checks PyTorch's constraints and returns the output height and width for `h x w`.
    fn out_hw(&self, what: &str, h: usize, w: usize) -> Result<(usize, usize)> {
        let Window { kernel: k, stride: s, padding: p } = *self;
        if k == 0 || s == 0 {
            candle_core::bail!("{what}: kernel ({k}) and stride ({s}) must be positive")
        }
        if p > k / 2 {
            candle_core::bail!("{what}: padding {p} must be at most half the kernel size {k}")
        }
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("{what}: kernel {k}x{k} larger than the padded input {}x{}", h + 2 * p, w + 2 * p)
        }
        Ok(((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1))
    }

    /// Input rows (or columns) covered by output position `o`, clipped to `0..n`.
    #[inline]
    fn span(&self, o: usize, n: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = (start + self.kernel as isize).min(n as isize);
        (start.max(0) as usize, end as usize)
    }
}

/// Checks the input of a pool and returns its dims and the output size.
fn check(xs: &Tensor, g: &Window, what: &str) -> Result<(usize, usize)> {
    if xs.rank() != 4 {
        candle_core::bail!("{what}: expected a (b, h, w, c) input, got shape {:?}", xs.shape())
    }
    let (_, h, w, _) = xs.dims4()?;
    g.out_hw(what, h, w)
        .map_err(|e| candle_core::Error::Msg(format!("{e} (input shape {:?}, channels last)", xs.shape())))
}

/// Max pooling forward: (b, h, w, c) -> (b, ho, wo, c), saving the argmax of every output
/// element as a flat spatial index `iy * w + ix` into its image.
struct MaxPool {
    g: Window,
    argmax: Arc<Mutex<Option<Arc<Vec<u32>>>>>,
}

/// Max pooling backward: scatters (b, ho, wo, c) gradients onto the saved argmax positions.
struct MaxPoolBwd {
    argmax: Arc<Vec<u32>>,
    h: usize,
    w: usize,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (b, h, w, c) = l.shape().dims4()?;
        let x = f32_slice(s, l, "max_pool2d_nhwc")?;
        let (ho, wo) = g.out_hw("max_pool2d_nhwc", h, w)?;
        if h * w > u32::MAX as usize {
            candle_core::bail!("max_pool2d_nhwc: {h}x{w} image too large for u32 indices")
        }
        let mut out = vec![0f32; b * ho * wo * c];
        let mut idx = vec![0u32; b * ho * wo * c];
        // One chunk per output row (b, oy): rows are independent.
        out.par_chunks_mut(wo * c).zip(idx.par_chunks_mut(wo * c)).enumerate().for_each(|(row, (dst, ids))| {
            let (bi, oy) = (row / ho, row % ho);
            let img = &x[bi * h * w * c..(bi + 1) * h * w * c];
            let (y0, y1) = g.span(oy, h);
            for ox in 0..wo {
                let (x0, x1) = g.span(ox, w);
                let (m, am) = (&mut dst[ox * c..(ox + 1) * c], &mut ids[ox * c..(ox + 1) * c]);
                m.fill(f32::NEG_INFINITY);
                am.fill((y0 * w + x0) as u32);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let p = iy * w + ix;
                        for ((mv, av), &v) in m.iter_mut().zip(am.iter_mut()).zip(&img[p * c..(p + 1) * c]) {
                            // PyTorch's rule: strictly greater keeps the first maximum; NaN wins.
                            if v > *mv || v.is_nan() {
                                *mv = v;
                                *av = p as u32;
                            }
                        }
                    }
                }
            }
        });
        *self.argmax.lock().expect("max pool lock") = Some(Arc::new(idx));
        Ok((CpuStorage::F32(out), Shape::from((b, ho, wo, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let argmax = self.argmax.lock().expect("max pool lock").clone();
        let Some(argmax) = argmax else { candle_core::bail!("max_pool2d_nhwc: backward without a forward") };
        let (_, h, w, _) = arg.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&MaxPoolBwd { argmax, h, w })?))
    }
}

impl CustomOp1 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "max-pool2d-nhwc-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, ho, wo, c) = l.shape().dims4()?;
        let (h, w) = (self.h, self.w);
        let dy = f32_slice(s, l, "max_pool2d_nhwc backward")?;
        if dy.len() != self.argmax.len() {
            candle_core::bail!(
                "max_pool2d_nhwc backward: gradient {:?} but {} saved indices",
                l.shape(),
                self.argmax.len()
            )
        }
        let per_out = ho * wo * c;
        let mut dx = vec![0f32; b * h * w * c];
        // One chunk per image: an image's gradient is only written from its own outputs.
        dx.par_chunks_mut(h * w * c).enumerate().for_each(|(bi, img)| {
            let (g, ids) = (&dy[bi * per_out..(bi + 1) * per_out], &self.argmax[bi * per_out..(bi + 1) * per_out]);
            for (gp, ip) in g.chunks(c).zip(ids.chunks(c)) {
                for (ch, (&gv, &p)) in gp.iter().zip(ip).enumerate() {
                    img[p as usize * c + ch] += gv;
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// Average pooling forward: (b, h, w, c) -> (b, ho, wo, c).
struct AvgPool {
    g: Window,
    count_include_pad: bool,
}

/// Average pooling backward: (b, ho, wo, c) gradient -> (b, h, w, c).
struct AvgPoolBwd {
    g: Window,
    count_include_pad: bool,
    h: usize,
    w: usize,
}

/// The divisor of a window covering rows `y0..y1` and columns `x0..x1` of the real input.
#[inline]
fn divisor(g: &Window, count_include_pad: bool, (y0, y1): (usize, usize), (x0, x1): (usize, usize)) -> f32 {
    if count_include_pad {
        // With ceil_mode false every window lies inside the padded input.
        (g.kernel * g.kernel) as f32
    } else {
        ((y1 - y0) * (x1 - x0)) as f32
    }
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg-pool2d-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (b, h, w, c) = l.shape().dims4()?;
        let x = f32_slice(s, l, "avg_pool2d_nhwc")?;
        let (ho, wo) = g.out_hw("avg_pool2d_nhwc", h, w)?;
        let mut out = vec![0f32; b * ho * wo * c];
        out.par_chunks_mut(wo * c).enumerate().for_each(|(row, dst)| {
            let (bi, oy) = (row / ho, row % ho);
            let img = &x[bi * h * w * c..(bi + 1) * h * w * c];
            let ys = g.span(oy, h);
            for ox in 0..wo {
                let xs = g.span(ox, w);
                let acc = &mut dst[ox * c..(ox + 1) * c];
                for iy in ys.0..ys.1 {
                    for ix in xs.0..xs.1 {
                        let p = iy * w + ix;
                        acc.iter_mut().zip(&img[p * c..(p + 1) * c]).for_each(|(a, v)| *a += v);
                    }
                }
                let d = divisor(&g, self.count_include_pad, ys, xs);
                acc.iter_mut().for_each(|a| *a /= d);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, ho, wo, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, h, w, _) = arg.dims4()?;
        let op = AvgPoolBwd { g: self.g, count_include_pad: self.count_include_pad, h, w };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "avg-pool2d-nhwc-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let AvgPoolBwd { g, count_include_pad, h, w } = *self;
        let (b, ho, wo, c) = l.shape().dims4()?;
        if g.out_hw("avg_pool2d_nhwc backward", h, w)? != (ho, wo) {
            candle_core::bail!("avg_pool2d_nhwc backward: gradient {:?} does not match input {h}x{w}", l.shape())
        }
        let dy = f32_slice(s, l, "avg_pool2d_nhwc backward")?;
        let mut dx = vec![0f32; b * h * w * c];
        // One chunk per image: an image's gradient is only written from its own outputs.
        dx.par_chunks_mut(h * w * c).enumerate().for_each(|(bi, img)| {
            for oy in 0..ho {
                let ys = g.span(oy, h);
                for ox in 0..wo {
                    let xs = g.span(ox, w);
                    let d = divisor(&g, count_include_pad, ys, xs);
                    let gp = &dy[((bi * ho + oy) * wo + ox) * c..][..c];
                    for iy in ys.0..ys.1 {
                        for ix in xs.0..xs.1 {
                            let p = iy * w + ix;
                            img[p * c..(p + 1) * c].iter_mut().zip(gp).for_each(|(a, v)| *a += v / d);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// 2-D max pooling on a channels-last input, like `torch.nn.MaxPool2d(kernel, stride,
/// padding)`: square window, padding with -inf, `ceil_mode=False`. Gradients flow to `xs` for
/// any kernel and stride; each output's gradient goes to the first maximum of its window.
///
/// xs: (b, h, w, c); returns (b, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1, c). Errors when
/// `padding > kernel / 2`, the kernel exceeds the padded input, or `xs` is not 4-D.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// // ResNet's stem pool: 3x3, stride 2, padding 1.
/// let xs = Tensor::randn(0f32, 1., (2, 8, 8, 4), &Device::Cpu)?;
/// let ys = selfsup_ops::max_pool2d_nhwc(&xs, 3, 2, 1)?;
/// assert_eq!(ys.dims(), &[2, 4, 4, 4]);
/// # Ok(())
/// # }
/// ```
pub fn max_pool2d_nhwc(xs: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let g = Window { kernel, stride, padding };
    check(xs, &g, "max_pool2d_nhwc")?;
    on_cpu_f32(xs, |xs| xs.contiguous()?.apply_op1(MaxPool { g, argmax: Arc::new(Mutex::new(None)) }))
}

/// 2-D average pooling on a channels-last input, like `torch.nn.AvgPool2d(kernel, stride,
/// padding, count_include_pad=...)` with `ceil_mode=False`: zero padding, and the divisor is
/// `kernel^2` when `count_include_pad` (PyTorch's default) or the number of real input
/// elements in the window otherwise. Gradients flow to `xs` for any kernel and stride.
///
/// xs: (b, h, w, c); returns (b, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1, c). Errors as
/// [`max_pool2d_nhwc`].
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let xs = Tensor::ones((1, 2, 2, 1), candle_core::DType::F32, &Device::Cpu)?;
/// // 3x3 window, stride 1, padding 1: corners see 4 real elements out of 9.
/// let with_pad = selfsup_ops::avg_pool2d_nhwc(&xs, 3, 1, 1, true)?;
/// let without = selfsup_ops::avg_pool2d_nhwc(&xs, 3, 1, 1, false)?;
/// assert_eq!(with_pad.flatten_all()?.to_vec1::<f32>()?, vec![4. / 9.; 4]);
/// assert_eq!(without.flatten_all()?.to_vec1::<f32>()?, vec![1.; 4]);
/// # Ok(())
/// # }
/// ```
pub fn avg_pool2d_nhwc(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    count_include_pad: bool,
) -> Result<Tensor> {
    let g = Window { kernel, stride, padding };
    check(xs, &g, "avg_pool2d_nhwc")?;
    on_cpu_f32(xs, |xs| xs.contiguous()?.apply_op1(AvgPool { g, count_include_pad }))
}

/// Pads the two spatial axes of an NCHW tensor by `p` on every side with `value`.
fn pad_nchw(xs: &Tensor, p: usize, value: f64) -> Result<Tensor> {
    if p == 0 {
        return Ok(xs.clone());
    }
    let (b, c, h, w) = xs.dims4()?;
    let full = |shape: (usize, usize, usize, usize)| Tensor::full(value, shape, xs.device())?.to_dtype(xs.dtype());
    let side = full((b, c, h, p))?;
    let xs = Tensor::cat(&[&side, xs, &side], 3)?;
    let top = full((b, c, p, w + 2 * p))?;
    Tensor::cat(&[&top, &xs, &top], 2)
}

/// Reference for [`max_pool2d_nhwc`]: candle's NCHW `max_pool2d_with_stride` on an input
/// padded with -inf, between permutes. Values for any geometry; candle's backward exists only
/// when `kernel == stride`, and 0.11.1 scales it by `1 / kernel^2` (a candle bug), so use it for
/// values only.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// use selfsup_ops::pool::{max_pool2d_nhwc, max_pool2d_nhwc_reference};
/// # fn main() -> candle_core::Result<()> {
/// let xs = Tensor::randn(0f32, 1., (1, 7, 5, 3), &Device::Cpu)?;
/// let fast = max_pool2d_nhwc(&xs, 3, 2, 1)?;
/// let reference = max_pool2d_nhwc_reference(&xs, 3, 2, 1)?;
/// assert_eq!(fast.flatten_all()?.to_vec1::<f32>()?, reference.flatten_all()?.to_vec1::<f32>()?);
/// # Ok(())
/// # }
/// ```
pub fn max_pool2d_nhwc_reference(xs: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    check(xs, &Window { kernel, stride, padding }, "max_pool2d_nhwc_reference")?;
    let nchw = pad_nchw(&xs.permute((0, 3, 1, 2))?.contiguous()?, padding, f64::NEG_INFINITY)?;
    nchw.max_pool2d_with_stride(kernel, stride)?.permute((0, 2, 3, 1))?.contiguous()
}

/// Reference for [`avg_pool2d_nhwc`]: candle's NCHW `avg_pool2d_with_stride` on a zero-padded
/// input, divided by the real-element count when `!count_include_pad`. Values for any
/// geometry; candle's backward only when `kernel == stride`.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// use selfsup_ops::pool::{avg_pool2d_nhwc, avg_pool2d_nhwc_reference};
/// # fn main() -> candle_core::Result<()> {
/// let xs = Tensor::randn(0f32, 1., (1, 6, 6, 2), &Device::Cpu)?;
/// let fast = avg_pool2d_nhwc(&xs, 3, 2, 1, false)?;
/// let reference = avg_pool2d_nhwc_reference(&xs, 3, 2, 1, false)?;
/// let diff = (fast - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok(())
/// # }
/// ```
pub fn avg_pool2d_nhwc_reference(
    xs: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    count_include_pad: bool,
) -> Result<Tensor> {
    check(xs, &Window { kernel, stride, padding }, "avg_pool2d_nhwc_reference")?;
    let nchw = xs.permute((0, 3, 1, 2))?.contiguous()?;
    let mean = pad_nchw(&nchw, padding, 0.)?.avg_pool2d_with_stride(kernel, stride)?;
    let ys = if count_include_pad {
        mean
    } else {
        // Fraction of each window that is real input, from pooling a padded map of ones.
        let ones = Tensor::ones((1, 1, nchw.dim(2)?, nchw.dim(3)?), DType::F32, xs.device())?.to_dtype(xs.dtype())?;
        let frac = pad_nchw(&ones, padding, 0.)?.avg_pool2d_with_stride(kernel, stride)?;
        mean.broadcast_div(&frac)?
    };
    ys.permute((0, 2, 3, 1))?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_finite_differences, compare_with_reference, randn};
    use candle_core::{Device, Var};

    /// A tensor whose elements are a shuffled `0, 0.05, 0.1, ...`: all distinct and at least
    /// 0.05 apart, so max pooling is differentiable there and finite differences are exact.
    fn distinct(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - n as f32 * 0.025).collect();
        crate::rng::Rng::new(seed).shuffle(&mut v);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    // (b, h, w, c, kernel, stride, padding): overlapping, strided, padded and odd shapes.
    const GEOMETRIES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
        (2, 8, 8, 3, 3, 2, 1),
        (1, 7, 5, 2, 3, 2, 1),
        (2, 6, 7, 4, 3, 1, 1),
        (1, 9, 9, 1, 5, 2, 2),
        (3, 5, 6, 2, 2, 1, 0),
        (1, 6, 4, 3, 2, 3, 1),
        (2, 4, 4, 2, 4, 4, 0),
    ];

    #[test]
    fn values_match_candle_on_every_geometry() {
        for (i, &(b, h, w, c, k, s, p)) in GEOMETRIES.iter().enumerate() {
            let x = randn(&[b, h, w, c], i as u64);
            let what = format!("case {i} k{k} s{s} p{p}");
            let y = max_pool2d_nhwc(&x, k, s, p).unwrap();
            assert_close(&y, &max_pool2d_nhwc_reference(&x, k, s, p).unwrap(), 1e-6, 0.0, &format!("max {what}"));
            for include in [true, false] {
                let y = avg_pool2d_nhwc(&x, k, s, p, include).unwrap();
                let y_ref = avg_pool2d_nhwc_reference(&x, k, s, p, include).unwrap();
                assert_close(&y, &y_ref, 1e-5, 1e-5, &format!("avg {what} count_include_pad={include}"));
            }
        }
    }

    /// kernel == stride without padding: candle has a backward, so average-pool gradients are
    /// compared with it. Max pooling is held to finite differences instead: candle 0.11.1's
    /// max-pool backward scales the gradient by 1 / k^2 (see the next test).
    #[test]
    fn grads_match_candle_and_finite_differences_when_kernel_equals_stride() {
        for (i, &(b, h, w, c, k)) in [(2, 6, 4, 3, 2), (1, 9, 6, 2, 3)].iter().enumerate() {
            let x = distinct(&[b, h, w, c], 40 + i as u64);
            check_finite_differences(
                std::slice::from_ref(&x),
                |t| max_pool2d_nhwc(&t[0], k, k, 0),
                1e-3,
                1e-2,
                1,
                "max",
            );
            compare_with_reference(
                &[x],
                |t| avg_pool2d_nhwc(&t[0], k, k, 0, true),
                |t| avg_pool2d_nhwc_reference(&t[0], k, k, 0, true),
                1e-6,
                1e-5,
                &format!("avg k{k}"),
            );
        }
    }

    /// Pins the candle bug that keeps its max pool out of the gradient comparison: for a 2x2
    /// window with one maximum the true gradient is 1, candle's is 1/4. If a candle upgrade
    /// fixes it, this fails and the max-pool gradients can be compared with candle again.
    #[test]
    fn candle_max_pool_gradient_is_scaled_by_one_over_k_squared() {
        let x = Var::from_tensor(&Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap()).unwrap();
        let nchw = x.reshape((1, 1, 2, 2)).unwrap();
        let g = nchw.max_pool2d(2).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), vec![0., 0., 0., 0.25]);
        let g = max_pool2d_nhwc(&x.reshape((1, 2, 2, 1)).unwrap(), 2, 2, 0).unwrap().sum_all().unwrap();
        let g = g.backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), vec![0., 0., 0., 1.]);
    }

    /// Overlapping windows with padding, where candle has no backward.
    #[test]
    fn grads_match_finite_differences_on_overlapping_windows() {
        for (i, &(b, h, w, c, k, s, p)) in GEOMETRIES.iter().take(4).enumerate() {
            let what = format!("case {i} k{k} s{s} p{p}");
            let x = distinct(&[b, h, w, c], 60 + i as u64);
            check_finite_differences(&[x], |t| max_pool2d_nhwc(&t[0], k, s, p), 1e-3, 1e-2, 3, &format!("max {what}"));
            let x = randn(&[b, h, w, c], 70 + i as u64);
            for include in [true, false] {
                check_finite_differences(
                    std::slice::from_ref(&x),
                    |t| avg_pool2d_nhwc(&t[0], k, s, p, include),
                    1e-2,
                    1e-2,
                    3,
                    &format!("avg {what} count_include_pad={include}"),
                );
            }
        }
    }

    /// Ties go to the first maximum in scan order (PyTorch), not split as candle does; padding
    /// never wins even when every real value is -inf.
    #[test]
    fn ties_route_the_gradient_to_the_first_maximum() {
        let x = Var::from_tensor(&Tensor::ones((1, 3, 3, 1), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = max_pool2d_nhwc(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2, 1]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Windows start at (-1,-1), (-1,1), (1,-1), (1,1): first real elements (0,0), (0,1),
        // (1,0), (1,1).
        assert_eq!(gx, vec![1., 1., 0., 1., 1., 0., 0., 0., 0.]);
        let x = Tensor::full(f32::NEG_INFINITY, (1, 2, 2, 1), &Device::Cpu).unwrap();
        let y: Vec<f32> = max_pool2d_nhwc(&x, 2, 1, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(y.iter().all(|v| *v == f32::NEG_INFINITY));
        let mut v = vec![1f32; 4];
        v[3] = f32::NAN;
        let x = Tensor::from_vec(v, (1, 2, 2, 1), &Device::Cpu).unwrap();
        let y: Vec<f32> = max_pool2d_nhwc(&x, 2, 2, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(y[0].is_nan(), "NaN propagates like in PyTorch");
    }

    /// Other dtypes go through CPU f32 and keep their gradient.
    #[test]
    fn f64_input_round_trips_with_gradient() {
        let x32 = distinct(&[1, 5, 5, 2], 9);
        let x = Var::from_tensor(&x32.to_dtype(DType::F64).unwrap()).unwrap();
        let y = max_pool2d_nhwc(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let y32 = max_pool2d_nhwc(&x32, 3, 2, 1).unwrap();
        assert_close(&y.to_dtype(DType::F32).unwrap(), &y32, 1e-6, 0.0, "f64 max pool");
        let g = avg_pool2d_nhwc(&x, 3, 1, 1, false).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().dtype(), DType::F64);
    }

    #[test]
    fn bad_geometry_is_an_error_naming_the_shape() {
        let x = randn(&[1, 4, 4, 2], 0);
        let e = max_pool2d_nhwc(&x, 3, 2, 2).unwrap_err().to_string();
        assert!(e.contains("padding 2") && e.contains("[1, 4, 4, 2]"), "{e}");
        let e = avg_pool2d_nhwc(&x, 7, 1, 1, true).unwrap_err().to_string();
        assert!(e.contains("larger than the padded input 6x6"), "{e}");
        let e = max_pool2d_nhwc(&randn(&[4, 4, 2], 0), 2, 2, 0).unwrap_err().to_string();
        assert!(e.contains("[4, 4, 2]"), "{e}");
        assert!(avg_pool2d_nhwc(&x, 2, 0, 0, true).is_err());
    }
}
