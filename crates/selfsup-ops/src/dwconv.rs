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
//! The backward has two ops. The input gradient is, at stride 1, the forward conv of dy with
//! the kernel flipped (a gather, on the fast forward kernel); at stride 2 a loop per input row
//! (every task owns its row, so no atomics). The weight/bias gradient sums fixed 8-row blocks
//! in a fixed order (deterministic). With multiplier 1 and channels a multiple of 8, the
//! forward and the weight gradient run AVX2 kernels over zero-padded row blocks; everything
//! else runs portable loops. The reference is candle's grouped `conv2d` between permutes.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, fma_into, is_cpu_f32, multiversion};

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

    /// The geometry selfsup-kernels' CUDA kernels take, for input shape `x`.
    #[cfg(feature = "cuda")]
    fn kernel_geom(&self, x: &Shape) -> Result<selfsup_kernels::launch::DwGeom> {
        let (b, h, w, ci) = x.dims4()?;
        selfsup_kernels::launch::DwGeom::new((b, h, w, ci), (self.kh, self.kw), self.mult, self.stride, self.padding)
            .map_err(crate::cuda::err)
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

/// Register-blocked AVX2/FMA kernels for the common case (multiplier 1, channels a multiple of
/// 8, kernel height up to 16): the baseline loops above keep their accumulators in memory and
/// run at about a fifth of what the core can do; these keep 8-channel accumulators for four
/// output positions in registers across all taps.
// The kernels are pointer arithmetic from top to bottom; each documents its bounds once
// instead of wrapping every load in its own `unsafe` block.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx {
    use std::arch::x86_64::*;

    use super::{Dims, Dw};

    /// Whether the AVX2 kernels apply to this call on this CPU.
    pub(super) fn usable(g: &Dw, c: usize) -> bool {
        g.mult == 1
            && c.is_multiple_of(8)
            && g.kh <= 16
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }

    /// One output row of the forward over a zero-padded block (`g.padding == 0` and every tap
    /// of every output position inside `x`, as `super::pad_rows` makes it).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`usable`]); `x` is the padded block (h, w, c) of
    /// `d`, `wt` (taps, c), `bias` (c), `out` (wo, c).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fwd_row(
        g: Dw,
        d: Dims,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        oy: usize,
        out: &mut [f32],
    ) {
        debug_assert!(g.padding == 0 && (d.wo - 1) * g.stride + g.kw <= d.w && oy * g.stride + g.kh <= d.h);
        // Every offset below stays inside its slice: rows oy * s + ky < h, columns
        // ox * s + kx < w (the block is padded for that), channels cb + [0, 8) with c % 8 == 0.
        let c = d.co;
        let (xp, wp, op) = (x.as_ptr(), wt.as_ptr(), out.as_mut_ptr());
        // Positions outer, channel blocks inner: the input window of a few positions stays in
        // L1 while all its channel blocks are done (channel-outer order thrashed L1 at c >= 64).
        // Eight positions at a time (eight accumulators and the weight stay in registers), then
        // one at a time.
        let s = g.stride * c;
        let mut ox = 0;
        while ox < d.wo {
            let n = if d.wo - ox >= 8 { 8 } else { 1 };
            for cb in (0..c).step_by(8) {
                let b0 = match bias {
                    Some(b) => _mm256_loadu_ps(b.as_ptr().add(cb)),
                    None => _mm256_setzero_ps(),
                };
                let mut a = [b0; 8];
                for ky in 0..g.kh {
                    let base = xp.add(((oy * g.stride + ky) * d.w + ox * g.stride) * c + cb);
                    for kx in 0..g.kw {
                        let w = _mm256_loadu_ps(wp.add((ky * g.kw + kx) * c + cb));
                        let p = base.add(kx * c);
                        if n == 8 {
                            for (j, acc) in a.iter_mut().enumerate() {
                                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(j * s)), w, *acc);
                            }
                        } else {
                            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p), w, a[0]);
                        }
                    }
                }
                for (j, acc) in a.iter().enumerate().take(n) {
                    _mm256_storeu_ps(op.add((ox + j) * c + cb), *acc);
                }
            }
            ox += n;
        }
    }

    /// The weight (and bias) gradient of a zero-padded block (padding 0, every tap inside):
    /// for each kernel row and channel block, `KW` accumulators (one per kernel column) stay in
    /// registers over every output position of the block; each dy value is loaded once per
    /// kernel row.
    ///
    /// # Safety
    /// As [`fwd_row`]; `g.kw == KW`, `pad` holds the padded block `d`, `dy_rows` `n` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn wgrad_block<const KW: usize>(
        g: Dw,
        d: Dims,
        pad: &[f32],
        dy_rows: &[f32],
        n: usize,
        with_bias: bool,
        acc: &mut [f32],
    ) {
        let c = d.co;
        let (xp, dp, ap) = (pad.as_ptr(), dy_rows.as_ptr(), acc.as_mut_ptr());
        for ky in 0..g.kh {
            for cb in (0..c).step_by(8) {
                let mut a = [_mm256_setzero_ps(); KW];
                for oy in 0..n {
                    let xr = xp.add((oy * g.stride + ky) * d.w * c + cb);
                    let dr = dp.add(oy * d.wo * c + cb);
                    for ox in 0..d.wo {
                        let dv = _mm256_loadu_ps(dr.add(ox * c));
                        let xb = xr.add(ox * g.stride * c);
                        for (kx, acc) in a.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(dv, _mm256_loadu_ps(xb.add(kx * c)), *acc);
                        }
                    }
                }
                for (kx, v) in a.iter().enumerate() {
                    let p = ap.add((ky * KW + kx) * c + cb);
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *v));
                }
            }
        }
        if with_bias {
            let taps = g.kh * KW;
            for cb in (0..c).step_by(8) {
                let mut s0 = _mm256_setzero_ps();
                for i in 0..n * d.wo {
                    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(dp.add(i * c + cb)));
                }
                let p = ap.add(taps * c + cb);
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), s0));
            }
        }
    }
}

/// Output rows per weight-gradient task.
const WGRAD_ROWS: usize = 8;

/// Output rows per task: whole images when there are enough of them for every thread, else
/// images split into row blocks.
fn rows_per_task(b: usize, ho: usize) -> usize {
    let split = (2 * rayon::current_num_threads()).div_ceil(b.max(1)).max(1);
    ho.div_ceil(split).max(1)
}

/// Copies the input rows that output rows `r0..r1` read into `pad`, zero-padded so that every
/// tap lands inside it, and returns the geometry and sizes of the padded block (padding 0).
fn pad_rows(g: Dw, d: Dims, x_img: &[f32], r0: usize, r1: usize, pad: &mut Vec<f32>) -> (Dw, Dims) {
    let c = d.ci;
    let wp = (d.wo - 1) * g.stride + g.kw;
    let nrows = (r1 - r0 - 1) * g.stride + g.kh;
    // Every element is written below (zeros or input), so a reused buffer is not cleared first.
    pad.resize(nrows * wp * c, 0.0);
    let n = d.w.min(wp.saturating_sub(g.padding));
    for lr in 0..nrows {
        let row = &mut pad[lr * wp * c..(lr + 1) * wp * c];
        let Some(iy) = (r0 * g.stride + lr).checked_sub(g.padding).filter(|&iy| iy < d.h) else {
            row.fill(0.0);
            continue;
        };
        // input column ix sits at padded column ix + padding (n = 0 when that is past the end)
        let pl = g.padding.min(wp);
        row[..pl * c].fill(0.0);
        row[pl * c..(pl + n) * c].copy_from_slice(&x_img[iy * d.w * c..][..n * c]);
        row[(pl + n) * c..].fill(0.0);
    }
    (Dw { padding: 0, ..g }, Dims { h: nrows, w: wp, ho: r1 - r0, ..d })
}

/// Forward of output rows `r0..r1` of one image into `out` ((r1 - r0) * wo * co values).
fn fwd_rows(
    g: Dw,
    d: Dims,
    x_img: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    pad: &mut Vec<f32>,
) {
    let row = d.wo * d.co;
    #[cfg(target_arch = "x86_64")]
    if avx::usable(&g, d.co) {
        let (gp, dp) = pad_rows(g, d, x_img, r0, r1, pad);
        for (oy, o) in out.chunks_exact_mut(row).enumerate() {
            // SAFETY: `usable` checked the CPU; the padded block holds every row and column
            // the taps of these output rows read.
            unsafe { avx::fwd_row(gp, dp, pad, wt, bias, oy, o) };
        }
        return;
    }
    for (i, o) in out.chunks_exact_mut(row).enumerate() {
        fwd_row(g, d, x_img, wt, bias, r0 + i, o);
    }
}

/// Weight-gradient contribution of output rows `r0..r1` of one image.
fn wgrad_rows(
    g: Dw,
    d: Dims,
    x_img: &[f32],
    dy_rows: &[f32],
    r0: usize,
    r1: usize,
    with_bias: bool,
    acc: &mut [f32],
    pad: &mut Vec<f32>,
) {
    let row = d.wo * d.co;
    #[cfg(target_arch = "x86_64")]
    if avx::usable(&g, d.co) {
        let (gp, dp) = pad_rows(g, d, x_img, r0, r1, pad);
        let n = r1 - r0;
        // SAFETY (all three): as in fwd_rows; each call matches its const kernel width.
        match g.kw {
            3 => unsafe { avx::wgrad_block::<3>(gp, dp, pad, dy_rows, n, with_bias, acc) },
            5 => unsafe { avx::wgrad_block::<5>(gp, dp, pad, dy_rows, n, with_bias, acc) },
            7 => unsafe { avx::wgrad_block::<7>(gp, dp, pad, dy_rows, n, with_bias, acc) },
            _ => {
                for (i, dyr) in dy_rows.chunks_exact(row).enumerate() {
                    bwd_weight_row(g, d, x_img, dyr, r0 + i, with_bias, acc);
                }
            }
        }
        return;
    }
    for (i, dyr) in dy_rows.chunks_exact(row).enumerate() {
        bwd_weight_row(g, d, x_img, dyr, r0 + i, with_bias, acc);
    }
}

/// Runs `f(image, r0, r1, out_rows, scratch)` over row blocks of every image in parallel.
fn par_row_blocks(d: Dims, out: &mut [f32], f: impl Fn(usize, usize, usize, &mut [f32], &mut Vec<f32>) + Sync) {
    let per = rows_per_task(d.b, d.ho);
    let row = d.wo * d.co;
    out.par_chunks_mut(d.ho * row).enumerate().for_each(|(bi, img)| {
        img.par_chunks_mut(per * row).enumerate().for_each_init(Vec::new, |pad, (k, o)| {
            let r0 = k * per;
            f(bi, r0, r0 + o.len() / row, o, pad)
        })
    });
}

/// The forward op; implements `CustomOp2` (x, w) and `CustomOp3` (x, w, bias).
struct DwConv(Dw);

impl DwConv {
    fn forward(&self, x: &[f32], xl: &Layout, wt: &[f32], bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let d = g.dims(xl.shape())?;
        let wt = taps_last(wt, d.co, g.kh * g.kw);
        let mut out = vec![0f32; d.b * d.ho * d.wo * d.co];
        let img = d.h * d.w * d.ci;
        par_row_blocks(d, &mut out, |bi, r0, r1, o, pad| {
            fwd_rows(g, d, &x[bi * img..][..img], &wt, bias, r0, r1, o, pad)
        });
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.ho, d.wo, d.co))))
    }

    /// Gradients for x, w and (when `with_bias`) the bias.
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Result<Vec<Option<Tensor>>> {
        let g = self.0;
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &DwInputGrad { g, x_shape: x.shape().clone() })?;
        let dwb = grad.apply_op2_no_bwd(x, &DwWeightGrad { g, with_bias })?;
        let (kh, kw, co) = (g.kh, g.kw, w.dim(0)?);
        let dw = dwb.narrow(0, 0, kh * kw * co)?.reshape((co, 1, kh, kw))?;
        let mut out = vec![dx, dw];
        if with_bias {
            out.push(dwb.narrow(0, kh * kw * co, co)?);
        }
        Ok(out.into_iter().map(Some).collect())
    }
}

#[cfg(feature = "cuda")]
impl DwConv {
    fn cuda_forward(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        bias: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{err, kernels, same_dtype, view, with_float, zeros};
        let what = "depthwise-conv2d-nhwc";
        let geom = self.0.kernel_geom(l1.shape())?;
        let dev = s1.device.clone();
        let k = kernels(&dev)?;
        let mut all = vec![s1, s2];
        all.extend(bias.map(|b| b.0));
        with_float!(same_dtype(what, &all)?, what, |T| {
            let mut out = zeros::<T>(&dev, geom.out_len())?;
            let (x, w) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
            let b = bias.map(|(s, l)| view::<T>(s, l, what)).transpose()?;
            k.dw_fwd(&dev.cuda_stream(), &x, &w, b.as_ref(), &mut out.slice_mut(0..geom.out_len()), geom)
                .map_err(err)?;
            let shape = Shape::from((geom.b as usize, geom.ho as usize, geom.wo as usize, geom.co as usize));
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape))
        })
    }
}

crate::cpu::impl_optional_bias_op!(DwConv, "depthwise-conv2d-nhwc", cuda);

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
        if g.stride == 1 && g.mult == 1 && g.kh == g.kw && g.padding < g.kh {
            // With stride 1 the input gradient is the forward conv of dy with the kernel
            // flipped and padding k - 1 - p: a gather, and the fast forward kernel.
            let taps = g.kh * g.kw;
            let flipped: Vec<f32> = (0..taps).flat_map(|t| wt[(taps - 1 - t) * d.co..][..d.co].to_vec()).collect();
            let gt = Dw { padding: g.kh - 1 - g.padding, ..g };
            let dt = Dims { b: d.b, h: d.ho, w: d.wo, ci: d.co, co: d.co, ho: d.h, wo: d.w };
            let img = d.ho * d.wo * d.co;
            par_row_blocks(dt, &mut dx, |bi, r0, r1, o, pad| {
                fwd_rows(gt, dt, &dy[bi * img..][..img], &flipped, None, r0, r1, o, pad)
            });
            return Ok((CpuStorage::F32(dx), self.x_shape.clone()));
        }
        dx.par_chunks_mut(d.w * d.ci).enumerate().for_each(|(row, dx_row)| {
            let (bi, iy) = (row / d.h, row % d.h);
            bwd_input_row(g, d, &dy[bi * d.ho * d.wo * d.co..][..d.ho * d.wo * d.co], &wt, iy, dx_row);
        });
        Ok((CpuStorage::F32(dx), self.x_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{err, kernels, same_dtype, view, with_float, zeros};
        let what = "depthwise-conv2d-nhwc-dx";
        let geom = self.g.kernel_geom(&self.x_shape)?;
        let dev = s1.device.clone();
        let k = kernels(&dev)?;
        with_float!(same_dtype(what, &[s1, s2])?, what, |T| {
            let mut dx = zeros::<T>(&dev, geom.in_len())?;
            let (dy, w) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
            k.dw_dx(&dev.cuda_stream(), &dy, &w, &mut dx.slice_mut(0..geom.in_len()), geom).map_err(err)?;
            Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev), self.x_shape.clone()))
        })
    }
}

/// dy (b, ho, wo, co), x (b, h, w, ci) -> flat [dw (co, taps) (PyTorch's layout), db (co) if
/// with_bias].
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
        // A fixed row-block size (not one derived from the thread count) and an ordered sum
        // keep the gradient the same whatever the machine.
        let (per, row, img) = (WGRAD_ROWS, d.wo * d.co, d.h * d.w * d.ci);
        let blocks = d.ho.div_ceil(per);
        let mut acc = crate::cpu::par_accumulate_with(d.b * blocks, len, Vec::new, |t, pad, acc| {
            let (bi, r0) = (t / blocks, (t % blocks) * per);
            let r1 = (r0 + per).min(d.ho);
            let dy_rows = &dy[(bi * d.ho + r0) * row..(bi * d.ho + r1) * row];
            wgrad_rows(g, d, &x[bi * img..][..img], dy_rows, r0, r1, self.with_bias, acc, pad);
        });
        // Accumulated taps-major (contiguous channels per tap); returned channel-major.
        let taps = g.kh * g.kw;
        let dw = crate::sparse::taps_major_to_pytorch(&acc[..taps * d.co], d.co, taps);
        acc[..taps * d.co].copy_from_slice(&dw);
        Ok((CpuStorage::F32(acc), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{err, kernels, same_dtype, view, with_float, zeros};
        let what = "depthwise-conv2d-nhwc-dw";
        let geom = self.g.kernel_geom(l2.shape())?;
        let (co, taps) = (geom.co as usize, geom.taps());
        let len = taps * co + if self.with_bias { co } else { 0 };
        let dev = s1.device.clone();
        let k = kernels(&dev)?;
        with_float!(same_dtype(what, &[s1, s2])?, what, |T| {
            let mut out = zeros::<T>(&dev, len)?;
            let (dy, x) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
            let (mut dw, mut db) = out.split_at_mut(taps * co);
            let db = if self.with_bias { Some(&mut db) } else { None };
            k.dw_wgrad(&dev.cuda_stream(), &dy, &x, &mut dw, db, geom).map_err(err)?;
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
        })
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
/// f32 on the CPU runs the fast kernel; bf16/f16 on the CPU are computed in f32; f32/bf16/f16
/// on a CUDA device run selfsup-kernels' kernel (feature `cuda`); other devices use the reference.
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
    if xs.device().is_cuda() && crate::has_kernel(xs) {
        let (x, w) = (xs.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, DwConv(g)),
            None => x.apply_op2(&w, DwConv(g)),
        };
    }
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

    /// Random shapes, kernels, strides, paddings and multipliers: values always against candle;
    /// gradients against candle where its backward works (no stride remainder), else against
    /// finite differences.
    #[test]
    fn random_shapes_match_reference() {
        let mut r = crate::rng::Rng::new(2024);
        for case in 0..24 {
            let k = [3, 5, 7][r.below(3)];
            let (s, p) = (1 + r.below(2), r.below(k / 2 + 1));
            let m = if r.below(4) == 0 { 2 } else { 1 };
            let c = [1, 3, 8, 16, 5, 24][r.below(6)];
            let (b, h, w) = (1 + r.below(2), 1 + r.below(12), 1 + r.below(12));
            if h + 2 * p < k || w + 2 * p < k {
                continue;
            }
            let bias = r.below(2) == 0;
            let mut inputs = vec![randn(&[b, h, w, c], case), randn(&[c * m, 1, k, k], 100 + case)];
            if bias {
                inputs.push(randn(&[c * m], 200 + case));
            }
            let what = format!("case {case}: ({b}, {h}, {w}, {c}) k{k} s{s} p{p} m{m} bias {bias}");
            let f = |t: &[Tensor]| depthwise_conv2d_nhwc(&t[0], &t[1], t.get(2), s, p);
            let f_ref = |t: &[Tensor]| depthwise_conv2d_nhwc_reference(&t[0], &t[1], t.get(2), s, p);
            if (h + 2 * p - k).is_multiple_of(s) && (w + 2 * p - k).is_multiple_of(s) {
                compare_with_reference(&inputs, f, f_ref, 1e-4, 1e-4, &what);
            } else {
                crate::testing::assert_close(&f(&inputs).unwrap(), &f_ref(&inputs).unwrap(), 1e-4, 1e-4, &what);
                check_finite_differences(&inputs, f, 1e-2, 2e-2, 7, &what);
            }
        }
    }

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
            // channels a multiple of 8: the AVX2 kernels (interior blocks, borders, tails)
            (2, 9, 11, 8, 1, 7, 1, 3, true),
            (1, 9, 9, 16, 1, 3, 2, 1, true),
            (2, 6, 5, 8, 1, 5, 1, 2, false),
            (1, 3, 3, 8, 1, 7, 1, 3, true),
            (1, 7, 13, 24, 1, 3, 1, 0, true),
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
