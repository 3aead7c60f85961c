//! Depthwise 2-D convolution on channels-last maps, forward and backward.
//!
//! Why: candle runs a grouped conv as one convolution per group plus a `cat`, so a depthwise
//! 7x7 conv costs seconds where it should cost milliseconds, forward and backward (CANDLE.md
//! 1.2, candle issue #3389). ConvNeXt's 7x7, CvT's q/k/v projections, MBConv and Mobile-Former's
//! blocks all run on this op.
//!
//! Layout: activations (b, h, w, c) so that the inner loop runs over contiguous channels (and
//! vectorises); weights keep PyTorch's `(c * multiplier, 1, kh, kw)` so timm checkpoints load
//! unchanged. With a channel multiplier `m`, output channel `o` reads input channel `o / m`
//! (PyTorch's `groups = c_in`, `c_out = m * c_in`). Padding is zeros, dilation 1.
//!
//! The backward has two ops: the input gradient is a gather per input row (every task owns
//! its output row, so no atomics), and the weight/bias gradient is a per-thread reduction.
//! The reference is candle's grouped `conv2d` between permutes.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, fma_into, is_cpu_f32, multiversion, par_accumulate};

/// Geometry of a depthwise convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dw {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    /// Channel multiplier: output channels per input channel.
    mult: usize,
}

/// Sizes of one call, derived from the input and the weight.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    w: usize,
    ci: usize,
    co: usize,
    ho: usize,
    wo: usize,
}

impl Dw {
    fn dims(&self, x: &Shape) -> Result<Dims> {
        let (b, h, w, ci) = x.dims4()?;
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if hp < self.kh || wp < self.kw {
            candle_core::bail!("depthwise_conv2d: kernel {}x{} larger than padded input {hp}x{wp}", self.kh, self.kw)
        }
        let ho = (hp - self.kh) / self.stride + 1;
        let wo = (wp - self.kw) / self.stride + 1;
        Ok(Dims { b, h, w, ci, co: ci * self.mult, ho, wo })
    }

    /// Input coordinate of output position `o` at tap `k`, if it lies inside the input.
    #[inline(always)]
    fn src(&self, o: usize, k: usize, n: usize) -> Option<usize> {
        let i = (o * self.stride + k).checked_sub(self.padding)?;
        (i < n).then_some(i)
    }

    /// The output positions `lo..hi` whose tap `k` reads inside an input of length `n`.
    #[inline(always)]
    fn valid_range(&self, k: usize, n: usize, n_out: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride);
        // ix = o*s + k - p <= n - 1  <=>  o <= (n - 1 + p - k) / s
        let hi = if n + self.padding > k { ((n - 1 + self.padding - k) / self.stride + 1).min(n_out) } else { 0 };
        (lo, hi.max(lo))
    }
}

/// Weights (co, 1, kh, kw) -> (kh, kw, co), so a tap's weights are one contiguous slice.
fn taps_last(wt: &[f32], co: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0f32; wt.len()];
    for o in 0..co {
        for t in 0..taps {
            out[t * co + o] = wt[o * taps + t];
        }
    }
    out
}

/// `out[c*m + j] += x[c] * w[c*m + j]`: one tap of a multiplier-m depthwise conv.
#[inline(always)]
fn fma_mult(out: &mut [f32], x: &[f32], w: &[f32], m: usize) {
    for (c, &xv) in x.iter().enumerate() {
        for j in 0..m {
            out[c * m + j] += xv * w[c * m + j];
        }
    }
}

/// `dx[c] += sum_j dy[c*m + j] * w[c*m + j]`: the adjoint of [`fma_mult`] for the input.
#[inline(always)]
fn dot_mult(dx: &mut [f32], dy: &[f32], w: &[f32], m: usize) {
    for (c, d) in dx.iter_mut().enumerate() {
        let mut s = 0f32;
        for j in 0..m {
            s += dy[c * m + j] * w[c * m + j];
        }
        *d += s;
    }
}

multiversion! {
    /// One output row `oy` of image `x` (h, w, ci) into `out` (wo, co).
    fn fwd_row(g: Dw, d: Dims, x: &[f32], wt: &[f32], bias: Option<&[f32]>, oy: usize, out: &mut [f32]) {
        match bias {
            Some(bv) => out.chunks_exact_mut(d.co).for_each(|o| o.copy_from_slice(bv)),
            None => out.fill(0.0),
        }
        for ky in 0..g.kh {
            let Some(iy) = g.src(oy, ky, d.h) else { continue };
            let xrow = &x[iy * d.w * d.ci..(iy + 1) * d.w * d.ci];
            for kx in 0..g.kw {
                let wk = &wt[(ky * g.kw + kx) * d.co..][..d.co];
                let (lo, hi) = g.valid_range(kx, d.w, d.wo);
                for ox in lo..hi {
                    let ix = ox * g.stride + kx - g.padding;
                    let (o, xs) = (&mut out[ox * d.co..][..d.co], &xrow[ix * d.ci..][..d.ci]);
                    if g.mult == 1 { fma_into(o, xs, wk) } else { fma_mult(o, xs, wk, g.mult) }
                }
            }
        }
    }
}

multiversion! {
    /// The input gradient of one input row `iy`: dx_row (w, ci) from dy (ho, wo, co).
    fn bwd_input_row(g: Dw, d: Dims, dy: &[f32], wt: &[f32], iy: usize, dx_row: &mut [f32]) {
        dx_row.fill(0.0);
        for ky in 0..g.kh {
            // oy * s + ky - p = iy
            let Some(num) = (iy + g.padding).checked_sub(ky) else { continue };
            if !num.is_multiple_of(g.stride) || num / g.stride >= d.ho {
                continue;
            }
            let dyrow = &dy[(num / g.stride) * d.wo * d.co..][..d.wo * d.co];
            for kx in 0..g.kw {
                let wk = &wt[(ky * g.kw + kx) * d.co..][..d.co];
                let (lo, hi) = g.valid_range(kx, d.w, d.wo);
                for ox in lo..hi {
                    let ix = ox * g.stride + kx - g.padding;
                    let (dx, dyv) = (&mut dx_row[ix * d.ci..][..d.ci], &dyrow[ox * d.co..][..d.co]);
                    if g.mult == 1 { fma_into(dx, dyv, wk) } else { dot_mult(dx, dyv, wk, g.mult) }
                }
            }
        }
    }
}

multiversion! {
    /// Adds one output row's contribution to the tap-major weight gradient `acc` (taps, co)
    /// and, when `with_bias`, to the bias gradient stored after it.
    fn bwd_weight_row(g: Dw, d: Dims, x: &[f32], dyrow: &[f32], oy: usize, with_bias: bool, acc: &mut [f32]) {
        let taps = g.kh * g.kw;
        for ky in 0..g.kh {
            let Some(iy) = g.src(oy, ky, d.h) else { continue };
            let xrow = &x[iy * d.w * d.ci..(iy + 1) * d.w * d.ci];
            for kx in 0..g.kw {
                let a = &mut acc[(ky * g.kw + kx) * d.co..][..d.co];
                let (lo, hi) = g.valid_range(kx, d.w, d.wo);
                for ox in lo..hi {
                    let ix = ox * g.stride + kx - g.padding;
                    let (dyv, xs) = (&dyrow[ox * d.co..][..d.co], &xrow[ix * d.ci..][..d.ci]);
                    if g.mult == 1 { fma_into(a, dyv, xs) } else { fma_mult(a, xs, dyv, g.mult) }
                }
            }
        }
        if with_bias {
            let db = &mut acc[taps * d.co..][..d.co];
            for ox in 0..d.wo {
                db.iter_mut().zip(&dyrow[ox * d.co..][..d.co]).for_each(|(a, v)| *a += v);
            }
        }
    }
}

/// The forward op; implements `CustomOp2` (x, w) and `CustomOp3` (x, w, bias).
struct DwConv(Dw);

impl DwConv {
    fn forward(&self, x: &[f32], xl: &Layout, wt: &[f32], bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let d = g.dims(xl.shape())?;
        let wt = taps_last(wt, d.co, g.kh * g.kw);
        let mut out = vec![0f32; d.b * d.ho * d.wo * d.co];
        out.par_chunks_mut(d.wo * d.co).enumerate().for_each(|(row, o)| {
            let (bi, oy) = (row / d.ho, row % d.ho);
            fwd_row(g, d, &x[bi * d.h * d.w * d.ci..][..d.h * d.w * d.ci], &wt, bias, oy, o);
        });
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.ho, d.wo, d.co))))
    }

    /// Gradients for x, w and (when `with_bias`) the bias.
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Result<Vec<Tensor>> {
        let g = self.0;
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &DwInputGrad { g, x_shape: x.shape().clone() })?;
        let dwb = grad.apply_op2_no_bwd(x, &DwWeightGrad { g, with_bias })?;
        let (kh, kw, co) = (g.kh, g.kw, w.dim(0)?);
        // (taps, co) -> (co, 1, kh, kw)
        let dw = dwb.narrow(0, 0, kh * kw * co)?.reshape((kh * kw, co))?.t()?.reshape((co, 1, kh, kw))?;
        let mut out = vec![dx, dw];
        if with_bias {
            out.push(dwb.narrow(0, kh * kw * co, co)?);
        }
        Ok(out)
    }
}

impl CustomOp2 for DwConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(f32_slice(s1, l1, "depthwise_conv2d x")?, l1, f32_slice(s2, l2, "depthwise_conv2d w")?, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(x, w, grad, false)?.into_iter();
        Ok((g.next(), g.next()))
    }
}

impl CustomOp3 for DwConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc-bias"
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
        let bias = f32_slice(s3, l3, "depthwise_conv2d bias")?;
        self.forward(f32_slice(s1, l1, "depthwise_conv2d x")?, l1, f32_slice(s2, l2, "depthwise_conv2d w")?, Some(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(x, w, grad, true)?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

/// dy (b, ho, wo, co), w (co, 1, kh, kw) -> dx (b, h, w, ci).
struct DwInputGrad {
    g: Dw,
    x_shape: Shape,
}

impl CustomOp2 for DwInputGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc-dx"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let d = g.dims(&self.x_shape)?;
        let (dy, wt) = (f32_slice(s1, l1, "depthwise dx: dy")?, f32_slice(s2, l2, "depthwise dx: w")?);
        let wt = taps_last(wt, d.co, g.kh * g.kw);
        let mut dx = vec![0f32; d.b * d.h * d.w * d.ci];
        dx.par_chunks_mut(d.w * d.ci).enumerate().for_each(|(row, dx_row)| {
            let (bi, iy) = (row / d.h, row % d.h);
            bwd_input_row(g, d, &dy[bi * d.ho * d.wo * d.co..][..d.ho * d.wo * d.co], &wt, iy, dx_row);
        });
        Ok((CpuStorage::F32(dx), self.x_shape.clone()))
    }
}

/// dy (b, ho, wo, co), x (b, h, w, ci) -> flat [dw (taps, co), db (co) if with_bias].
struct DwWeightGrad {
    g: Dw,
    with_bias: bool,
}

impl CustomOp2 for DwWeightGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc-dw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let d = g.dims(l2.shape())?;
        let (dy, x) = (f32_slice(s1, l1, "depthwise dw: dy")?, f32_slice(s2, l2, "depthwise dw: x")?);
        let len = g.kh * g.kw * d.co + if self.with_bias { d.co } else { 0 };
        let acc = par_accumulate(d.b * d.ho, len, |row, acc| {
            let (bi, oy) = (row / d.ho, row % d.ho);
            let x_img = &x[bi * d.h * d.w * d.ci..][..d.h * d.w * d.ci];
            bwd_weight_row(g, d, x_img, &dy[row * d.wo * d.co..][..d.wo * d.co], oy, self.with_bias, acc);
        });
        Ok((CpuStorage::F32(acc), Shape::from(len)))
    }
}

/// Checks shapes and returns the geometry of a call.
fn geometry(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Dw> {
    let (_, _, _, ci) = xs.dims4().map_err(|_| {
        candle_core::Error::Msg(format!("depthwise_conv2d: input must be (b, h, w, c), got {:?}", xs.shape()))
    })?;
    let (co, one, kh, kw) = weight.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "depthwise_conv2d: weight must be (c_out, 1, kh, kw), got {:?}",
            weight.shape()
        ))
    })?;
    if one != 1 || ci == 0 || !co.is_multiple_of(ci) || co == 0 {
        candle_core::bail!(
            "depthwise_conv2d: weight {:?} does not fit an input with {ci} channels (need (m * {ci}, 1, kh, kw))",
            weight.shape()
        )
    }
    if let Some(b) = bias {
        if b.dims() != [co] {
            candle_core::bail!("depthwise_conv2d: bias must be ({co},), got {:?}", b.shape())
        }
    }
    if stride == 0 {
        candle_core::bail!("depthwise_conv2d: stride must be positive")
    }
    let g = Dw { kh, kw, stride, padding, mult: co / ci };
    g.dims(xs.shape())?;
    Ok(g)
}

/// Depthwise convolution of a channels-last map.
///
/// `xs`: (b, h, w, c); `weight`: (m * c, 1, kh, kw) (PyTorch layout, `m` the channel
/// multiplier); `bias`: (m * c,). Returns (b, ho, wo, m * c). Gradients flow to all three.
/// f32 on the CPU runs the fast kernel; bf16/f16 on the CPU are computed in f32; other devices
/// use the reference until a kernel exists.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let x = Tensor::zeros((2, 14, 14, 8), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((8, 1, 7, 7), candle_core::DType::F32, &Device::Cpu)?;
/// let y = selfsup_ops::dwconv::depthwise_conv2d_nhwc(&x, &w, None, 1, 3)?;
/// assert_eq!(y.dims(), &[2, 14, 14, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn depthwise_conv2d_nhwc(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = geometry(xs, weight, bias, stride, padding)?;
    if !xs.device().is_cpu() {
        return depthwise_conv2d_nhwc_reference(xs, weight, bias, stride, padding);
    }
    if !is_cpu_f32(xs) {
        let dt = xs.dtype();
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let b32 = bias.map(f).transpose()?;
        return depthwise_conv2d_nhwc(&f(xs)?, &f(weight)?, b32.as_ref(), stride, padding)?.to_dtype(dt);
    }
    let (x, w) = (xs.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, DwConv(g)),
        None => x.apply_op2(&w, DwConv(g)),
    }
}

/// Reference for [`depthwise_conv2d_nhwc`]: candle's grouped NCHW conv2d between permutes.
pub fn depthwise_conv2d_nhwc_reference(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let c = xs.dim(3)?;
    let y = xs.permute((0, 3, 1, 2))?.contiguous()?.conv2d(weight, padding, stride, 1, c)?.permute((0, 2, 3, 1))?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => y.contiguous(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    #[test]
    fn matches_reference_values_and_grads() {
        // (b, h, w, c, mult, k, stride, pad, bias)
        let cases = [
            (2, 7, 6, 5, 1, 3, 1, 1, true),
            (1, 9, 9, 3, 1, 7, 1, 3, false),
            (2, 8, 8, 4, 1, 5, 2, 2, true),
            (1, 6, 5, 3, 2, 3, 1, 1, true),
            (2, 5, 5, 2, 3, 3, 1, 0, false),
            (1, 4, 4, 9, 1, 7, 1, 3, true),
            (1, 1, 1, 4, 1, 3, 1, 1, true),
        ];
        for (i, &(b, h, w, c, m, k, s, p, with_bias)) in cases.iter().enumerate() {
            let mut inputs = vec![randn(&[b, h, w, c], i as u64), randn(&[c * m, 1, k, k], 50 + i as u64)];
            if with_bias {
                inputs.push(randn(&[c * m], 90 + i as u64));
            }
            compare_with_reference(
                &inputs,
                |t| depthwise_conv2d_nhwc(&t[0], &t[1], t.get(2), s, p),
                |t| depthwise_conv2d_nhwc_reference(&t[0], &t[1], t.get(2), s, p),
                1e-4,
                1e-4,
                &format!("depthwise case {i}"),
            );
        }
    }

    /// Stride 2 with a remainder (candle's conv backward fails there) and a multiplier.
    #[test]
    fn gradients_match_finite_differences_on_uneven_strides() {
        for (i, &(h, w, c, m, k, s, p)) in
            [(7, 6, 3, 1, 3, 2, 1), (6, 7, 2, 2, 5, 2, 2), (9, 8, 2, 1, 7, 2, 3)].iter().enumerate()
        {
            let inputs = [randn(&[2, h, w, c], i as u64), randn(&[c * m, 1, k, k], 7 + i as u64), randn(&[c * m], 9)];
            let f = |t: &[Tensor]| depthwise_conv2d_nhwc(&t[0], &t[1], Some(&t[2]), s, p);
            let y_ref = depthwise_conv2d_nhwc_reference(&inputs[0], &inputs[1], Some(&inputs[2]), s, p).unwrap();
            crate::testing::assert_close(&f(&inputs).unwrap(), &y_ref, 1e-4, 1e-4, "uneven stride forward");
            check_finite_differences(&inputs, f, 1e-2, 1e-2, 3, &format!("uneven stride case {i}"));
        }
    }

    #[test]
    fn half_precision_runs_in_f32() {
        let x = randn(&[1, 6, 6, 4], 1).to_dtype(DType::BF16).unwrap();
        let w = randn(&[4, 1, 3, 3], 2).to_dtype(DType::BF16).unwrap();
        let y = depthwise_conv2d_nhwc(&x, &w, None, 1, 1).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y_ref = depthwise_conv2d_nhwc_reference(
            &x.to_dtype(DType::F32).unwrap(),
            &w.to_dtype(DType::F32).unwrap(),
            None,
            1,
            1,
        )
        .unwrap();
        crate::testing::assert_close(&y, &y_ref, 0.1, 0.02, "bf16");
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let x = randn(&[1, 6, 6, 4], 1);
        let e = depthwise_conv2d_nhwc(&x, &randn(&[6, 1, 3, 3], 2), None, 1, 1).unwrap_err().to_string();
        assert!(e.contains("[6, 1, 3, 3]") && e.contains("4 channels"), "{e}");
        let e =
            depthwise_conv2d_nhwc(&x, &randn(&[4, 1, 3, 3], 2), Some(&randn(&[3], 3)), 1, 1).unwrap_err().to_string();
        assert!(e.contains("bias must be (4,)"), "{e}");
        let e = depthwise_conv2d_nhwc(&x, &randn(&[4, 1, 9, 9], 2), None, 1, 0).unwrap_err().to_string();
        assert!(e.contains("larger than padded input"), "{e}");
        let e = depthwise_conv2d_nhwc(&randn(&[6, 6, 4], 1), &randn(&[4, 1, 3, 3], 2), None, 1, 1).unwrap_err();
        assert!(e.to_string().contains("(b, h, w, c)"), "{e}");
    }
}
