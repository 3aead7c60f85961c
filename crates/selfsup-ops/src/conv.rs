//! Channels-last 2-D convolution as blocked im2col + GEMM, forward and both gradients.
//!
//! Why: candle's CPU conv2d backward computes the input gradient with a direct-loop
//! `conv_transpose2d` (no GEMM) and costs 4-7x the forward (CANDLE.md 1.2); a first version of
//! this op materialised the whole im2col matrix (231 MB for a 3x3 64-channel conv on 32 images at
//! 56 px) and ran at 40 % of PyTorch's rate, bound by memory traffic.
//!
//! Now every direction works block by block, each block small enough to stay in cache:
//! - forward: for a block of output positions, im2col into a per-thread buffer (block x K, K =
//!   kh * kw * c_in), then one GEMM writes the block's rows of the output;
//! - weight gradient: the same im2col blocks, `dW += dY_block^T . cols`, summed over threads;
//! - input gradient: per image, `dcols = dY_block . W`, then col2im into that image's gradient
//!   (one task per image, so no two threads write the same element).
//!
//! The GEMMs are the `gemm` crate's (what candle's matmul uses), single-threaded inside rayon
//! tasks. Small maps are the exception ([`Tiling`]): every GEMM packs the whole weight, so a
//! block holds at least 256 rows (whole images for the input gradient), and a call with fewer
//! blocks than threads runs them in turn with the threads inside each GEMM. At 64 px, where
//! ResNet-18's layer4 is 2x2, this took its fwd+bwd from about 1.6x PyTorch's time to par.
//! 1x1 stride-1 convs skip im2col: they are one matmul of the (b*h*w, c) matrix.
//!
//! Activations stay channels-last (b, h, w, c): the GEMM output is already in the layout the
//! next layer wants. Weights keep PyTorch's layout `(c_out, c_in, kh, kw)` so timm checkpoints
//! load unchanged. The reference is candle's own NCHW `conv2d` between two permutes. (candle's
//! conv2d backward fails with a shape error when the stride leaves a remainder, e.g. 8 px, k 3,
//! s 2, p 1; those gradients are checked against finite differences instead.)

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{alloc_uninit, f32_slice, mm_par};

/// Kernel size, stride and zero padding of a 2-D convolution (the same on both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Output height and width for an input of `h x w`, or an error naming the shapes.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.stride == 0 {
            candle_core::bail!("conv2d: stride must be positive")
        }
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if hp < self.kh || wp < self.kw {
            candle_core::bail!("conv2d: kernel {}x{} larger than padded input {hp}x{wp}", self.kh, self.kw)
        }
        Ok(((hp - self.kh) / self.stride + 1, (wp - self.kw) / self.stride + 1))
    }
}

/// Signed input coordinate of output position `o`, kernel tap `k`.
#[inline]
fn src(o: usize, k: usize, g: &Geometry) -> isize {
    (o * g.stride + k) as isize - g.padding as isize
}

/// The taps `lo..hi` of a kernel row at output column `ox` that fall inside an input of width
/// `w`, and the input column of tap `lo`. Channels-last stores those taps' input columns as one
/// span of `(hi - lo) * c_in` values, in the order of the (kx, c_in) part of an im2col row, so
/// im2col and col2im move one span per kernel row instead of one `c_in` piece per tap.
#[inline]
fn row_span(ox: usize, w: usize, g: &Geometry) -> (usize, usize, usize) {
    let ix0 = src(ox, 0, g);
    let (lo, hi) = ((-ix0).clamp(0, g.kw as isize) as usize, (w as isize - ix0).clamp(0, g.kw as isize) as usize);
    (lo, hi, (ix0 + lo as isize).max(0) as usize)
}

/// All sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    g: Geometry,
    b: usize,
    h: usize,
    w: usize,
    ci: usize,
    co: usize,
    ho: usize,
    wo: usize,
}

/// How the rows of one call (output positions) are cut into GEMMs.
///
/// Each GEMM packs the whole weight matrix (K x c_out) once, so a GEMM over few rows is mostly
/// packing: at 64 px ResNet-18's layer4 is 2x2, and per-image or 16-row GEMMs there packed its
/// 9.4 MB weight for every 4 or 16 rows. Blocks therefore hold at least `min_rows` rows (whole
/// images for the input gradient), and otherwise about `budget` im2col values, so a block's
/// columns stay near the cache at large maps. When a call has fewer blocks than threads, the
/// blocks run one after another with every thread inside each GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    budget: usize,
    min_rows: usize,
}

/// The tiling every public entry point uses; tests run others against it.
const TILING: Tiling = Tiling { budget: 1 << 18, min_rows: 256 };

/// Calls with at most this many weight-gradient blocks sum them in one accumulator (one GEMM
/// after another, all threads inside each); more blocks go through the grouped per-thread
/// reduction. A shape rule, not a thread-count rule, so the sum order never depends on the
/// machine.
const DW_SEQUENTIAL_BLOCKS: usize = 4;

impl Dims {
    /// Columns of the im2col matrix: (ky, kx, c_in).
    fn k(&self) -> usize {
        self.g.kh * self.g.kw * self.ci
    }
    /// Rows per GEMM for `n` rows in all, under tiling `t`.
    fn block(&self, n: usize, t: Tiling) -> usize {
        (t.budget / self.k().max(1)).max(t.min_rows).min(n).max(1)
    }
}

/// Writes im2col rows for output positions `first..first + rows` (flat over b, ho, wo) into
/// `cols` (rows x K); taps outside the input are zero.
fn im2col_block(d: &Dims, x: &[f32], first: usize, rows: usize, cols: &mut [f32]) {
    let (g, k, c) = (d.g, d.k(), d.ci);
    for r in 0..rows {
        let pos = first + r;
        let (bi, oy, ox) = (pos / (d.ho * d.wo), (pos / d.wo) % d.ho, pos % d.wo);
        let row = &mut cols[r * k..(r + 1) * k];
        // One copy per kernel row; taps outside the input are zeros.
        let (lo, hi, ix) = row_span(ox, d.w, &g);
        for ky in 0..g.kh {
            let iy = src(oy, ky, &g);
            let dst = &mut row[ky * g.kw * c..][..g.kw * c];
            if iy < 0 || iy >= d.h as isize || lo >= hi {
                dst.fill(0.0);
                continue;
            }
            let s0 = ((bi * d.h + iy as usize) * d.w + ix) * c;
            dst[..lo * c].fill(0.0);
            dst[lo * c..hi * c].copy_from_slice(&x[s0..s0 + (hi - lo) * c]);
            dst[hi * c..].fill(0.0);
        }
    }
}

/// [`im2col_block`] split over the rayon threads (for blocks that run one at a time).
fn im2col_block_par(d: &Dims, x: &[f32], first: usize, rows: usize, cols: &mut [f32]) {
    const CHUNK: usize = 16;
    let k = d.k();
    cols[..rows * k].par_chunks_mut(CHUNK * k).enumerate().for_each(|(i, c)| {
        im2col_block(d, x, first + i * CHUNK, c.len() / k, c);
    });
}

/// Adds the rows of `dcols` (rows x K) for output positions `first..first + rows` (flat over
/// the images of `dx`, then ho, wo) into the input gradient `dx` (images, h, w, c_in).
fn col2im_block(d: &Dims, dcols: &[f32], first: usize, rows: usize, dx: &mut [f32]) {
    let (g, k, c) = (d.g, d.k(), d.ci);
    for r in 0..rows {
        let pos = first + r;
        let (bi, oy, ox) = (pos / (d.ho * d.wo), (pos / d.wo) % d.ho, pos % d.wo);
        let dx_img = &mut dx[bi * d.h * d.w * c..][..d.h * d.w * c];
        let row = &dcols[r * k..(r + 1) * k];
        // One span per kernel row, as in `im2col_block`.
        let (lo, hi, ix) = row_span(ox, d.w, &g);
        if lo >= hi {
            continue;
        }
        for ky in 0..g.kh {
            let iy = src(oy, ky, &g);
            if iy < 0 || iy >= d.h as isize {
                continue;
            }
            let dst = &mut dx_img[(iy as usize * d.w + ix) * c..][..(hi - lo) * c];
            let taps = &row[(ky * g.kw + lo) * c..][..(hi - lo) * c];
            dst.iter_mut().zip(taps).for_each(|(a, v)| *a += v);
        }
    }
}

/// (c_out, c_in, kh, kw) -> (c_out, K) with K ordered (ky, kx, c_in), matching im2col rows.
/// One output channel per task: it runs for every forward and input-gradient call, and at 64 px
/// a ResNet-18 step transposes its 11 M weights about ten times.
fn weight_rows(w: &[f32], d: &Dims) -> Vec<f32> {
    let (taps, ci, k) = (d.g.kh * d.g.kw, d.ci, d.k());
    // SAFETY: the loops below write every element (a permutation of w).
    let mut out = unsafe { alloc_uninit(w.len()) };
    out.par_chunks_mut(k).zip(w.par_chunks(k)).with_min_len(8).for_each(|(o, src)| {
        for (c, s) in src.chunks_exact(taps).enumerate() {
            for (t, &v) in s.iter().enumerate() {
                o[t * ci + c] = v;
            }
        }
    });
    out
}

/// (c_out, K) ordered (ky, kx, c_in) -> (c_out, c_in, kh, kw).
fn weight_from_rows(rows: &[f32], d: &Dims) -> Vec<f32> {
    let (taps, ci, k) = (d.g.kh * d.g.kw, d.ci, d.k());
    // SAFETY: the loops below write every element (a permutation of rows).
    let mut out = unsafe { alloc_uninit(rows.len()) };
    out.par_chunks_mut(k).zip(rows.par_chunks(k)).with_min_len(8).for_each(|(o, src)| {
        for (c, dst) in o.chunks_exact_mut(taps).enumerate() {
            for (t, v) in dst.iter_mut().enumerate() {
                *v = src[t * ci + c];
            }
        }
    });
    out
}

/// The convolution: x (b, h, w, c_in), w (c_out, c_in, kh, kw) -> (b, ho, wo, c_out).
struct Conv {
    g: Geometry,
    tiling: Tiling,
}

impl Conv {
    fn dims(g: Geometry, x: &Shape, w: &Shape) -> Result<Dims> {
        let (b, h, wd, ci) = x.dims4()?;
        let (co, _, _, _) = w.dims4()?;
        let (ho, wo) = g.out_hw(h, wd)?;
        Ok(Dims { g, b, h, w: wd, ci, co, ho, wo })
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-nhwc"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Conv::dims(self.g, l1.shape(), l2.shape())?;
        let (x, w) = (f32_slice(s1, l1, "conv2d x")?, f32_slice(s2, l2, "conv2d w")?);
        let wr = weight_rows(w, &d);
        let n = d.b * d.ho * d.wo;
        let (k, blk) = (d.k(), d.block(n, self.tiling));
        // SAFETY (this and the scratch `cols` below): each block's GEMM writes all of its rows
        // of `out` without reading them, and reads only the rows x K of `cols` that im2col wrote.
        let mut out = unsafe { alloc_uninit(n * d.co) };
        // o (rows x co) = cols (rows x K) . wr^T (K x co)
        let block = |bi: usize, o: &mut [f32], cols: &mut [f32], parallel: bool| {
            let rows = o.len() / d.co;
            if parallel {
                im2col_block_par(&d, x, bi * blk, rows, cols);
            } else {
                im2col_block(&d, x, bi * blk, rows, cols);
            }
            // SAFETY: o holds rows * co values, cols rows * K, wr co * K.
            unsafe {
                mm_par(
                    rows,
                    d.co,
                    k,
                    o.as_mut_ptr(),
                    d.co as isize,
                    false,
                    cols.as_ptr(),
                    k as isize,
                    1,
                    wr.as_ptr(),
                    1,
                    k as isize,
                    1.0,
                    parallel,
                )
            };
        };
        if n.div_ceil(blk) < rayon::current_num_threads() {
            let mut cols = unsafe { alloc_uninit(blk * k) };
            out.chunks_mut(blk * d.co).enumerate().for_each(|(bi, o)| block(bi, o, &mut cols, true));
        } else {
            out.par_chunks_mut(blk * d.co)
                .enumerate()
                .for_each_init(|| unsafe { alloc_uninit(blk * k) }, |cols, (bi, o)| block(bi, o, cols, false));
        }
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.ho, d.wo, d.co))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (g, tiling) = (self.g, self.tiling);
        // An operand outside the graph gets no gradient: the stem's input is the images, and
        // its dx (a GEMM and a col2im pass over the full-resolution input) would be thrown away.
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvInputGrad { g, tiling, x_shape: x.shape().clone() })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(x, &ConvWeightGrad { g, tiling, w_shape: w.shape().clone() })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// dy (b, ho, wo, c_out), w -> dx (b, h, w, c_in): for a group of whole images, dcols = dY . W,
/// then col2im into those images' gradient (groups write disjoint images, so no two threads
/// write the same element).
struct ConvInputGrad {
    g: Geometry,
    tiling: Tiling,
    x_shape: Shape,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-dx"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Conv::dims(self.g, &self.x_shape, l2.shape())?;
        let (dy, w) = (f32_slice(s1, l1, "conv2d dx: dy")?, f32_slice(s2, l2, "conv2d dx: w")?);
        let wr = weight_rows(w, &d);
        let (k, per_img, img_len) = (d.k(), d.ho * d.wo, d.h * d.w * d.ci);
        // Whole images per group: at least `min_rows` rows, so small maps share one GEMM.
        let imgs = self.tiling.min_rows.div_ceil(per_img.max(1)).clamp(1, d.b.max(1));
        let group_rows = imgs * per_img;
        let blk = d.block(group_rows, self.tiling);
        let mut dx = vec![0f32; d.b * img_len];
        let group = |gi: usize, dx_group: &mut [f32], dcols: &mut [f32], parallel: bool| {
            let rows_here = dx_group.len() / img_len * per_img;
            let dy_group = &dy[gi * group_rows * d.co..][..rows_here * d.co];
            for first in (0..rows_here).step_by(blk) {
                let rows = blk.min(rows_here - first);
                let dyb = &dy_group[first * d.co..][..rows * d.co];
                // dcols (rows x K) = dyb (rows x co) . wr (co x K)
                // SAFETY: dcols holds blk * K >= rows * K values; dyb rows * co; wr co * K.
                unsafe {
                    mm_par(
                        rows,
                        k,
                        d.co,
                        dcols.as_mut_ptr(),
                        k as isize,
                        false,
                        dyb.as_ptr(),
                        d.co as isize,
                        1,
                        wr.as_ptr(),
                        k as isize,
                        1,
                        1.0,
                        parallel,
                    )
                };
                col2im_block(&d, dcols, first, rows, dx_group);
            }
        };
        if d.b.div_ceil(imgs) < rayon::current_num_threads() {
            // SAFETY (and below): the GEMM writes the rows x K of `dcols` that col2im reads.
            let mut dcols = unsafe { alloc_uninit(blk * k) };
            dx.chunks_mut(imgs * img_len).enumerate().for_each(|(gi, dxg)| group(gi, dxg, &mut dcols, true));
        } else {
            dx.par_chunks_mut(imgs * img_len)
                .enumerate()
                .for_each_init(|| unsafe { alloc_uninit(blk * k) }, |dcols, (gi, dxg)| group(gi, dxg, dcols, false));
        }
        Ok((CpuStorage::F32(dx), self.x_shape.clone()))
    }
}

/// dy (b, ho, wo, c_out), x -> dw (c_out, c_in, kh, kw): sum over blocks of dY^T . cols.
struct ConvWeightGrad {
    g: Geometry,
    tiling: Tiling,
    w_shape: Shape,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-dw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Conv::dims(self.g, l2.shape(), &self.w_shape)?;
        let (dy, x) = (f32_slice(s1, l1, "conv2d dw: dy")?, f32_slice(s2, l2, "conv2d dw: x")?);
        let n = d.b * d.ho * d.wo;
        let (k, blk) = (d.k(), d.block(n, self.tiling));
        let blocks = n.div_ceil(blk);
        // acc (co x K) += dyb^T (co x rows) . cols (rows x K)
        let block = |bi: usize, cols: &mut [f32], acc: &mut [f32], parallel: bool| {
            let (first, rows) = (bi * blk, blk.min(n - bi * blk));
            if parallel {
                im2col_block_par(&d, x, first, rows, cols);
            } else {
                im2col_block(&d, x, first, rows, cols);
            }
            let dyb = &dy[first * d.co..][..rows * d.co];
            // SAFETY: acc holds co * K values, dyb rows * co, cols rows * K.
            unsafe {
                mm_par(
                    d.co,
                    k,
                    rows,
                    acc.as_mut_ptr(),
                    k as isize,
                    true,
                    dyb.as_ptr(),
                    1,
                    d.co as isize,
                    cols.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    parallel,
                )
            };
        };
        let acc = if blocks <= DW_SEQUENTIAL_BLOCKS {
            // SAFETY (and below): im2col writes the rows x K of `cols` that the GEMM reads.
            let (mut acc, mut cols) = (vec![0f32; d.co * k], unsafe { alloc_uninit(blk * k) });
            (0..blocks).for_each(|bi| block(bi, &mut cols, &mut acc, true));
            acc
        } else {
            crate::cpu::par_accumulate_with(
                blocks,
                d.co * k,
                || unsafe { alloc_uninit(blk * k) },
                |bi, cols, acc| block(bi, cols, acc, false),
            )
        };
        Ok((CpuStorage::F32(weight_from_rows(&acc, &d)), self.w_shape.clone()))
    }
}

/// 2-D convolution on a channels-last input.
///
/// xs: (b, h, w, c_in); weight: (c_out, c_in, kh, kw) (PyTorch layout); returns
/// (b, ho, wo, c_out). Gradients flow to both `xs` and `weight`. CPU f32 runs the blocked
/// kernel; other dtypes on the CPU compute in f32; other devices use candle's own conv2d (the
/// reference) until a kernel exists.
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// let x = Tensor::ones((2, 8, 8, 3), DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu)?;
/// let y = selfsup_ops::conv2d_nhwc(&x, &w, 2, 1)?;
/// assert_eq!(y.dims(), &[2, 4, 4, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn conv2d_nhwc(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, h, w, c) = xs
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("conv2d: input must be (b, h, w, c), got {:?}", xs.shape())))?;
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if c != c_in {
        candle_core::bail!("conv2d: input has {c} channels but weight {:?} expects {c_in}", weight.shape())
    }
    let g = Geometry { kh, kw, stride, padding };
    g.out_hw(h, w)?;
    if !xs.device().is_cpu() {
        return conv2d_nhwc_reference(xs, weight, stride, padding);
    }
    if xs.dtype() != candle_core::DType::F32 {
        let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        return conv2d_nhwc(&f(xs)?, &f(weight)?, stride, padding)?.to_dtype(xs.dtype());
    }
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        // A pointwise conv is one matmul; candle's is multi-threaded and has its backward.
        return xs.reshape((b * h * w, c))?.matmul(&weight.reshape((c_out, c_in))?.t()?)?.reshape((b, h, w, c_out));
    }
    xs.contiguous()?.apply_op2(&weight.contiguous()?, Conv { g, tiling: TILING })
}

/// Reference for [`conv2d_nhwc`]: candle's NCHW conv2d between permutes.
pub fn conv2d_nhwc_reference(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let nchw = xs.permute((0, 3, 1, 2))?.contiguous()?;
    nchw.conv2d(weight, padding, stride, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, max_abs_diff, randn as rand};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn matches_reference_values_and_grads_on_odd_shapes() {
        // (b, h, w, c_in, c_out, k, stride, pad)
        let cases = [
            (2, 7, 5, 3, 4, 3, 1, 1),
            (3, 9, 8, 2, 5, 3, 2, 1),
            (1, 6, 6, 4, 3, 1, 2, 0),
            (2, 5, 7, 3, 2, 1, 1, 0),
            (2, 11, 10, 1, 6, 7, 2, 3),
            (1, 4, 4, 2, 2, 3, 1, 0),
            // Kernel rows cut on both sides: a 3x3 over one pixel, a 5x5 over a 3x2 map.
            (2, 1, 1, 3, 2, 3, 1, 1),
            (1, 3, 2, 2, 3, 5, 1, 2),
        ];
        for (i, &(b, h, w, ci, co, k, s, p)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&rand(&[b, h, w, ci], i as u64)).unwrap();
            let wt = Var::from_tensor(&rand(&[co, ci, k, k], 100 + i as u64)).unwrap();
            let probe = rand(&[b, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1, co], 7);
            let y = conv2d_nhwc(&x, &wt, s, p).unwrap();
            let y_ref = conv2d_nhwc_reference(&x, &wt, s, p).unwrap();
            assert_eq!(y.dims(), y_ref.dims(), "case {i}");
            assert!(max_diff(&y, &y_ref) < 1e-4, "case {i} forward");
            if (h + 2 * p - k) % s != 0 || (w + 2 * p - k) % s != 0 {
                // candle's conv2d backward may fail with a shape error here; these
                // gradients are held to finite differences in the test below.
                continue;
            }
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &wt)] {
                let (a, r) = (g.get(v).unwrap(), g_ref.get(v).unwrap());
                assert!(max_diff(a, r) < 1e-3, "case {i} grad {name}: {}", max_diff(a, r));
            }
        }
    }

    /// Central differences on a shape where stride 2 leaves a remainder.
    #[test]
    fn gradients_match_finite_differences_on_uneven_strides() {
        let (b, h, w, ci, co, k, s, p) = (2, 6, 5, 2, 3, 3, 2, 1);
        let x = Var::from_tensor(&rand(&[b, h, w, ci], 11)).unwrap();
        let wt = Var::from_tensor(&rand(&[co, ci, k, k], 12)).unwrap();
        let probe = rand(&[b, 3, 3, co], 13);
        let f = |x: &Tensor, wt: &Tensor| -> f64 {
            let y = conv2d_nhwc(x, wt, s, p).unwrap();
            (y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let g = (conv2d_nhwc(&x, &wt, s, p).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, is_x) in [(&x, true), (&wt, false)] {
            let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let grad: Vec<f32> = g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for idx in (0..base.len()).step_by(5) {
                let eps = 1e-2f32;
                let mut plus = base.clone();
                plus[idx] += eps;
                let mut minus = base.clone();
                minus[idx] -= eps;
                let t = |d: Vec<f32>| Tensor::from_vec(d, v.shape(), &Device::Cpu).unwrap();
                let (fp, fm) =
                    if is_x { (f(&t(plus), &wt), f(&t(minus), &wt)) } else { (f(&x, &t(plus)), f(&x, &t(minus))) };
                let fd = (fp - fm) / (2.0 * eps as f64);
                assert!((fd - grad[idx] as f64).abs() < 2e-2 * (1.0 + fd.abs()), "idx {idx}: fd {fd} vs {}", grad[idx]);
            }
        }
    }

    /// Forward, input gradient and weight gradient of one call under tiling `t`.
    fn run_tiled(t: Tiling, x: &Tensor, w: &Tensor, dy: &Tensor, s: usize, p: usize) -> [Vec<f32>; 3] {
        let (_, _, kh, kw) = w.dims4().unwrap();
        let g = Geometry { kh, kw, stride: s, padding: p };
        let y = x.apply_op2_no_bwd(w, &Conv { g, tiling: t }).unwrap();
        assert_eq!(y.dims(), dy.dims());
        let dx = dy.apply_op2_no_bwd(w, &ConvInputGrad { g, tiling: t, x_shape: x.shape().clone() }).unwrap();
        let dw = dy.apply_op2_no_bwd(x, &ConvWeightGrad { g, tiling: t, w_shape: w.shape().clone() }).unwrap();
        [y, dx, dw].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    }

    /// Every way of cutting rows into GEMMs gives the reference's values: many small blocks on
    /// the threads (groups of fewer images than a block, partial last blocks), one block with
    /// every thread inside its GEMM, and the default tiling.
    #[test]
    fn every_tiling_matches_the_reference() {
        // (b, h, w, c_in, c_out, k, stride, pad)
        for (i, &(b, h, w, ci, co, k, s, p)) in
            [(5, 9, 7, 6, 8, 3, 2, 1), (3, 4, 4, 16, 12, 3, 1, 1)].iter().enumerate()
        {
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let x = Var::from_tensor(&rand(&[b, h, w, ci], 40 + i as u64)).unwrap();
            let wt = Var::from_tensor(&rand(&[co, ci, k, k], 50 + i as u64)).unwrap();
            let dy = rand(&[b, ho, wo, co], 60 + i as u64);
            let y_ref = conv2d_nhwc_reference(&x, &wt, s, p).unwrap();
            let g_ref = (&y_ref * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = [flat(&y_ref), flat(g_ref.get(&x).unwrap()), flat(g_ref.get(&wt).unwrap())];
            let tilings = [
                TILING,
                Tiling { budget: 64, min_rows: 3 },
                Tiling { budget: 1, min_rows: 1 },
                Tiling { budget: usize::MAX / 2, min_rows: 1 << 20 },
            ];
            for t in tilings {
                let got = run_tiled(t, &x, &wt, &dy, s, p);
                for (what, (a, r)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                    let diff = a.iter().zip(r).map(|(a, r)| (a - r).abs()).fold(0f32, f32::max);
                    assert!(diff < 1e-3, "case {i} {t:?} {what}: {diff}");
                }
            }
        }
    }

    /// The thread count changes how the work is split, never the result, bit for bit: a resumed
    /// run on another machine repeats the same sums.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // One call whose weight gradient sums few blocks with every thread inside each GEMM, and
        // one that takes the grouped per-thread reduction.
        for (i, &(b, h, ci, co, t)) in
            [(4, 8, 32, 64, TILING), (6, 10, 8, 16, Tiling { budget: 256, min_rows: 8 })].iter().enumerate()
        {
            let x = rand(&[b, h, h, ci], 70 + i as u64);
            let w = rand(&[co, ci, 3, 3], 80 + i as u64);
            let dy = rand(&[b, h, h, co], 90 + i as u64);
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| run_tiled(t, &x, &w, &dy, 1, 1))
            };
            let one = on(1);
            for threads in [2, 3] {
                assert!(on(threads) == one, "case {i}: {threads} threads differ from 1");
            }
        }
    }

    /// A constant input (the images into the stem) gets no gradient, and the weight's gradient
    /// is the reference's.
    #[test]
    fn a_constant_input_gets_no_gradient() {
        let x = rand(&[2, 7, 7, 3], 21);
        let wt = Var::from_tensor(&rand(&[4, 3, 3, 3], 22)).unwrap();
        let probe = rand(&[2, 4, 4, 4], 23);
        let grads = |f: fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>| {
            (f(&x, &wt, 2, 1).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (g, g_ref) = (grads(conv2d_nhwc), grads(conv2d_nhwc_reference));
        assert!(g.get(&x).is_none());
        assert_close(g.get(&wt).unwrap(), g_ref.get(&wt).unwrap(), 1e-4, 1e-4, "weight gradient");
    }

    #[test]
    fn rejects_channel_mismatch_and_oversized_kernel() {
        let x = rand(&[1, 4, 4, 3], 0);
        let e = conv2d_nhwc(&x, &rand(&[2, 2, 3, 3], 1), 1, 1).unwrap_err().to_string();
        assert!(e.contains("3 channels"), "{e}");
        let e = conv2d_nhwc(&x, &rand(&[2, 3, 7, 7], 1), 1, 0).unwrap_err().to_string();
        assert!(e.contains("larger than padded input"), "{e}");
    }
}
