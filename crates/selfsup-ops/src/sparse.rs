//! Submanifold sparse convolution over the visible sites of a masked map (FCMAE's encoder).
//!
//! METHODS.md, Project decision 1: the sparse encoder keeps only the visible sites as an
//! `(n_visible, C)` matrix, and the 7x7 depthwise conv is *submanifold*: it has an output only
//! at visible sites and reads only visible neighbours. That equals the masked-dense reference
//! (zero masked positions, dense conv, zero masked positions again) exactly, and at mask ratio
//! 0.6 it does about 40 % of the dense work.
//!
//! The pieces:
//! - [`SiteMap`]: which sites of a (b, h, w) grid are visible, in raster order (b, y, x), so the
//!   sites of one sample are a contiguous block of rows (per-sample GRN and drop-path use that).
//!   Built once per mask and resolution; [`SiteMap::upsample`] and [`SiteMap::downsample2`] give
//!   the maps of the other stages.
//! - [`Neighbours`]: the gather map of a k x k submanifold conv: for each site and tap, the row
//!   of the neighbour, or [`NONE`]. The CUDA kernel (selfsup-kernels) reads the same table.
//! - [`sparse_depthwise_conv`]: the conv itself, forward and backward. Because the neighbour
//!   relation of a "same" conv is symmetric (b is a's neighbour at offset t iff a is b's at -t),
//!   the input gradient is a gather with the flipped kernel: no atomics, no scatter.
//! - [`sparse_downsample`]: the 2x2 stride-2 conv between stages (an output site exists where any
//!   of its four children is visible, as in MinkowskiEngine; with FCMAE's aligned masks that is
//!   all four or none), as gather + GEMM.
//! - [`SiteMap::gather`] / [`SiteMap::scatter`]: between site matrices and dense maps,
//!   differentiable (candle's `index_select` / `index_add`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, fma_into, multiversion, par_accumulate};

/// Marks "no visible neighbour" in [`Neighbours`] and "not a site" in lookups.
pub const NONE: u32 = u32::MAX;

/// The visible sites of a (batch, h, w) grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteMap {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    /// Flat dense index `(b * h + y) * w + x` of each site, ascending.
    sites: Vec<u32>,
    /// `batch + 1` entries: the sites of sample `i` are rows `offsets[i]..offsets[i + 1]`.
    offsets: Vec<usize>,
    /// Dense index -> site row, or [`NONE`].
    lookup: Vec<u32>,
}

impl SiteMap {
    /// From a visibility flag per position, laid out (batch, h, w).
    pub fn from_visible(visible: &[bool], batch: usize, h: usize, w: usize) -> Result<Self> {
        if visible.len() != batch * h * w {
            candle_core::bail!("SiteMap: {} flags for a ({batch}, {h}, {w}) grid", visible.len())
        }
        if batch * h * w >= NONE as usize {
            candle_core::bail!("SiteMap: grid ({batch}, {h}, {w}) too large for u32 indices")
        }
        let mut sites = Vec::new();
        let mut offsets = vec![0];
        let mut lookup = vec![NONE; visible.len()];
        for (i, &v) in visible.iter().enumerate() {
            if v {
                lookup[i] = sites.len() as u32;
                sites.push(i as u32);
            }
            if (i + 1).is_multiple_of(h * w) {
                offsets.push(sites.len());
            }
        }
        if h * w == 0 {
            offsets = vec![0; batch + 1];
        }
        Ok(Self { batch, h, w, sites, offsets, lookup })
    }

    /// From a (batch, h, w) tensor whose non-zero entries mark *visible* positions.
    pub fn from_visible_tensor(visible: &Tensor) -> Result<Self> {
        let (b, h, w) = visible.dims3().map_err(|_| {
            candle_core::Error::Msg(format!("SiteMap: visibility must be (batch, h, w), got {:?}", visible.shape()))
        })?;
        let flags: Vec<f32> = visible.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Self::from_visible(&flags.iter().map(|&v| v != 0.0).collect::<Vec<_>>(), b, h, w)
    }

    /// Number of visible sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Rows of each sample: sample `i` owns `offsets()[i]..offsets()[i + 1]`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Flat dense index of each site.
    pub fn sites(&self) -> &[u32] {
        &self.sites
    }

    /// Whether dense position (b, y, x) is visible.
    pub fn is_visible(&self, b: usize, y: usize, x: usize) -> bool {
        self.lookup[(b * self.h + y) * self.w + x] != NONE
    }

    /// The same mask at `factor` times the resolution (each position becomes a block), as FCMAE
    /// upsamples its 32-px patch mask to the stem's output.
    pub fn upsample(&self, factor: usize) -> Result<Self> {
        let (h, w) = (self.h * factor, self.w * factor);
        let mut vis = vec![false; self.batch * h * w];
        for b in 0..self.batch {
            for y in 0..h {
                for x in 0..w {
                    vis[(b * h + y) * w + x] = self.is_visible(b, y / factor, x / factor);
                }
            }
        }
        Self::from_visible(&vis, self.batch, h, w)
    }

    /// The map after a 2x2 stride-2 conv, and for each coarse site its four children
    /// (row-major (ky, kx) order) as rows of this map, [`NONE`] where a child is masked. A coarse
    /// site is visible when any child is. An odd last row/column is dropped, as the conv does.
    pub fn downsample2(&self) -> Result<(Self, Vec<u32>)> {
        let (h, w) = (self.h / 2, self.w / 2);
        let child =
            |b: usize, y: usize, x: usize, k: usize| self.lookup[(b * self.h + 2 * y + k / 2) * self.w + 2 * x + k % 2];
        let mut vis = vec![false; self.batch * h * w];
        for b in 0..self.batch {
            for y in 0..h {
                for x in 0..w {
                    vis[(b * h + y) * w + x] = (0..4).any(|k| child(b, y, x, k) != NONE);
                }
            }
        }
        let coarse = Self::from_visible(&vis, self.batch, h, w)?;
        let mut children = Vec::with_capacity(coarse.len() * 4);
        for &s in &coarse.sites {
            let s = s as usize;
            let (b, y, x) = (s / (h * w), (s / w) % h, s % w);
            children.extend((0..4).map(|k| child(b, y, x, k)));
        }
        Ok((coarse, children))
    }

    /// The gather map of a k x k "same" submanifold conv (k odd).
    pub fn neighbours(&self, k: usize) -> Result<Neighbours> {
        if k.is_multiple_of(2) {
            candle_core::bail!("SiteMap::neighbours: kernel {k} must be odd (a 'same' submanifold conv)")
        }
        let r = (k / 2) as isize;
        let taps = k * k;
        let mut idx = vec![NONE; self.len() * taps];
        idx.par_chunks_mut(taps).zip(&self.sites).for_each(|(row, &s)| {
            let s = s as usize;
            let (b, y, x) = (s / (self.h * self.w), ((s / self.w) % self.h) as isize, (s % self.w) as isize);
            for (t, slot) in row.iter_mut().enumerate() {
                let (ny, nx) = (y + (t / k) as isize - r, x + (t % k) as isize - r);
                if ny >= 0 && nx >= 0 && (ny as usize) < self.h && (nx as usize) < self.w {
                    *slot = self.lookup[(b * self.h + ny as usize) * self.w + nx as usize];
                }
            }
        });
        Ok(Neighbours {
            k,
            n: self.len(),
            idx: Arc::new(idx),
            #[cfg(feature = "cuda")]
            device: Default::default(),
        })
    }

    /// (batch, h, w, 1) f32 tensor: 1 at visible positions, 0 at masked ones.
    pub fn visible_mask(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.lookup.iter().map(|&l| if l == NONE { 0.0 } else { 1.0 }).collect();
        Tensor::from_vec(v, (self.batch, self.h, self.w, 1), device)
    }

    fn site_ids(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.sites, self.len(), device)
    }

    /// Dense (batch, h, w, c) -> site matrix (n, c). Differentiable.
    pub fn gather(&self, dense: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = dense.dims4()?;
        if (b, h, w) != (self.batch, self.h, self.w) {
            candle_core::bail!(
                "SiteMap::gather: map is ({}, {}, {}), tensor {:?}",
                self.batch,
                self.h,
                self.w,
                dense.shape()
            )
        }
        dense.reshape((b * h * w, c))?.index_select(&self.site_ids(dense.device())?, 0)
    }

    /// Site matrix (n, c) -> dense (batch, h, w, c) with zeros at masked positions. Differentiable.
    pub fn scatter(&self, sites: &Tensor) -> Result<Tensor> {
        let (n, c) = sites.dims2()?;
        if n != self.len() {
            candle_core::bail!("SiteMap::scatter: map has {} sites, tensor {:?}", self.len(), sites.shape())
        }
        let zeros = Tensor::zeros((self.batch * self.h * self.w, c), sites.dtype(), sites.device())?;
        zeros.index_add(&self.site_ids(sites.device())?, sites, 0)?.reshape((self.batch, self.h, self.w, c))
    }
}

/// For each site and tap of a k x k kernel, the row of the visible neighbour, or [`NONE`].
/// Laid out (n, k * k), taps row-major (ky, kx).
#[derive(Debug, Clone)]
pub struct Neighbours {
    pub k: usize,
    pub n: usize,
    pub idx: Arc<Vec<u32>>,
    /// `idx` on the GPU, uploaded by the first CUDA call and shared by every clone.
    #[cfg(feature = "cuda")]
    device: Arc<crate::cuda::DeviceCopy>,
}

multiversion! {
    /// out[s] = bias + sum_t w[t] * x[nb[s, t]] for the sites of one block.
    fn sparse_fwd_block(x: &[f32], wt: &[f32], bias: Option<&[f32]>, nb: &[u32], c: usize, out: &mut [f32]) {
        let taps = wt.len() / c;
        for (row, o) in out.chunks_exact_mut(c).enumerate() {
            match bias {
                Some(b) => o.copy_from_slice(b),
                None => o.fill(0.0),
            }
            for (t, &j) in nb[row * taps..(row + 1) * taps].iter().enumerate() {
                if j != NONE {
                    fma_into(o, &x[j as usize * c..][..c], &wt[t * c..][..c]);
                }
            }
        }
    }
}

multiversion! {
    /// Weight (and bias) gradient contribution of site `s`: acc[t] += dy[s] * x[nb[s, t]].
    fn sparse_wgrad_site(x: &[f32], dy: &[f32], nb: &[u32], c: usize, with_bias: bool, acc: &mut [f32]) {
        let taps = nb.len();
        for (t, &j) in nb.iter().enumerate() {
            if j != NONE {
                fma_into(&mut acc[t * c..][..c], dy, &x[j as usize * c..][..c]);
            }
        }
        if with_bias {
            acc[taps * c..].iter_mut().zip(dy).for_each(|(a, d)| *a += d);
        }
    }
}

/// Sites per rayon task.
const BLOCK: usize = 64;

/// (c, 1, k, k) -> taps-major (k*k, c), optionally with the kernel flipped (for the adjoint).
fn taps_major(w: &[f32], c: usize, taps: usize, flip: bool) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for ch in 0..c {
        for t in 0..taps {
            let tt = if flip { taps - 1 - t } else { t };
            out[tt * c + ch] = w[ch * taps + t];
        }
    }
    out
}

/// (k*k, c) taps-major -> (c, k*k), PyTorch's layout of a depthwise weight.
pub(crate) fn taps_major_to_pytorch(t: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    for tap in 0..taps {
        for ch in 0..c {
            out[ch * taps + tap] = t[tap * c + ch];
        }
    }
    out
}

fn sparse_conv(x: &[f32], wt: &[f32], bias: Option<&[f32]>, nb: &Neighbours, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; nb.n * c];
    let taps = nb.k * nb.k;
    out.par_chunks_mut(BLOCK * c).enumerate().for_each(|(blk, o)| {
        let first = blk * BLOCK;
        let rows = o.len() / c;
        sparse_fwd_block(x, wt, bias, &nb.idx[first * taps..(first + rows) * taps], c, o);
    });
    out
}

/// The submanifold depthwise conv op: CustomOp2 (x, w) or CustomOp3 (x, w, bias).
struct SparseDw(Neighbours);

impl SparseDw {
    fn forward(&self, x: &[f32], xl: &Layout, w: &[f32], bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, c) = xl.shape().dims2()?;
        let taps = self.0.k * self.0.k;
        Ok((CpuStorage::F32(sparse_conv(x, &taps_major(w, c, taps, false), bias, &self.0, c)), Shape::from((n, c))))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Result<Vec<Option<Tensor>>> {
        let grad = grad.contiguous()?;
        // dx = the same conv of dy with the flipped kernel (the neighbour relation is symmetric).
        let dx = grad.apply_op2_no_bwd(w, &SparseDwInputGrad(self.0.clone()))?;
        let dwb = grad.apply_op2_no_bwd(x, &SparseDwWeightGrad { nb: self.0.clone(), with_bias })?;
        let (c, k) = (x.dim(1)?, self.0.k);
        let dw = dwb.narrow(0, 0, k * k * c)?.reshape((c, 1, k, k))?;
        let mut out = vec![dx, dw];
        if with_bias {
            out.push(dwb.narrow(0, k * k * c, c)?);
        }
        Ok(out.into_iter().map(Some).collect())
    }
}

#[cfg(feature = "cuda")]
impl SparseDw {
    fn cuda_forward(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        bias: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        sparse_cuda(&self.0, s1, l1, s2, l2, bias, false, "sparse-depthwise-conv")
    }
}

crate::cpu::impl_optional_bias_op!(SparseDw, "sparse-depthwise-conv", cuda);

/// dy (n, c), w (c, 1, k, k) -> dx (n, c).
struct SparseDwInputGrad(Neighbours);

impl CustomOp2 for SparseDwInputGrad {
    fn name(&self) -> &'static str {
        "sparse-depthwise-conv-dx"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (dy, w) = (f32_slice(s1, l1, "sparse dx: dy")?, f32_slice(s2, l2, "sparse dx: w")?);
        let taps = self.0.k * self.0.k;
        Ok((CpuStorage::F32(sparse_conv(dy, &taps_major(w, c, taps, true), None, &self.0, c)), Shape::from((n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        sparse_cuda(&self.0, s1, l1, s2, l2, None, true, "sparse-depthwise-conv-dx")
    }
}

/// The sparse conv (or, with `flip`, its input gradient) on the GPU.
#[cfg(feature = "cuda")]
fn sparse_cuda(
    nb: &Neighbours,
    s1: &candle_core::CudaStorage,
    l1: &Layout,
    s2: &candle_core::CudaStorage,
    l2: &Layout,
    bias: Option<(&candle_core::CudaStorage, &Layout)>,
    flip: bool,
    what: &str,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use crate::cuda::{err, kernels, same_dtype, view, with_float, zeros};
    let (n, c) = l1.shape().dims2()?;
    let taps = nb.k * nb.k;
    let dev = s1.device.clone();
    let k = kernels(&dev)?;
    let idx = nb.device.get(&dev, &nb.idx)?;
    let nb_len = nb.idx.len();
    let mut all = vec![s1, s2];
    all.extend(bias.map(|b| b.0));
    let dt = same_dtype(what, &all)?;
    with_float!(dt, what, |T| {
        let mut out = zeros::<T>(&dev, n * c)?;
        let (x, w) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
        let b = bias.map(|(s, l)| view::<T>(s, l, what)).transpose()?;
        k.sparse_dw_fwd(
            &dev.cuda_stream(),
            &x,
            &w,
            b.as_ref(),
            &idx.slice(0..nb_len),
            &mut out.slice_mut(0..n * c),
            n,
            c,
            taps,
            flip,
        )
        .map_err(err)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, c))))
    })
}

/// dy (n, c), x (n, c) -> flat [dw (c, taps) (PyTorch's layout), db (c) if with_bias].
struct SparseDwWeightGrad {
    nb: Neighbours,
    with_bias: bool,
}

impl CustomOp2 for SparseDwWeightGrad {
    fn name(&self) -> &'static str {
        "sparse-depthwise-conv-dw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l1.shape().dims2()?;
        let (dy, x) = (f32_slice(s1, l1, "sparse dw: dy")?, f32_slice(s2, l2, "sparse dw: x")?);
        let taps = self.nb.k * self.nb.k;
        let len = taps * c + if self.with_bias { c } else { 0 };
        let mut acc = par_accumulate(n, len, |s, acc| {
            sparse_wgrad_site(x, &dy[s * c..][..c], &self.nb.idx[s * taps..][..taps], c, self.with_bias, acc)
        });
        // Accumulated taps-major (contiguous channels per tap); returned channel-major.
        let dw = taps_major_to_pytorch(&acc[..taps * c], c, taps);
        acc[..taps * c].copy_from_slice(&dw);
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
        let what = "sparse-depthwise-conv-dw";
        let (n, c) = l1.shape().dims2()?;
        let taps = self.nb.k * self.nb.k;
        let len = taps * c + if self.with_bias { c } else { 0 };
        let dev = s1.device.clone();
        let k = kernels(&dev)?;
        let idx = self.nb.device.get(&dev, &self.nb.idx)?;
        let nb_len = self.nb.idx.len();
        with_float!(same_dtype(what, &[s1, s2])?, what, |T| {
            let mut out = zeros::<T>(&dev, len)?;
            let (dy, x) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
            let (mut dw, mut db) = out.split_at_mut(taps * c);
            let db = if self.with_bias { Some(&mut db) } else { None };
            k.sparse_dw_wgrad(&dev.cuda_stream(), &dy, &x, &idx.slice(0..nb_len), &mut dw, db, n, c, taps)
                .map_err(err)?;
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
        })
    }
}

fn check_sparse_args(x: &Tensor, nb: &Neighbours, weight: &Tensor, bias: Option<&Tensor>) -> Result<usize> {
    let (n, c) = x.dims2().map_err(|_| {
        candle_core::Error::Msg(format!("sparse_depthwise_conv: sites must be (n, c), got {:?}", x.shape()))
    })?;
    if n != nb.n {
        candle_core::bail!("sparse_depthwise_conv: {n} site rows but the neighbour map has {} sites", nb.n)
    }
    if weight.dims() != [c, 1, nb.k, nb.k] {
        candle_core::bail!(
            "sparse_depthwise_conv: weight must be ({c}, 1, {k}, {k}), got {:?}",
            weight.shape(),
            k = nb.k
        )
    }
    if let Some(b) = bias {
        if b.dims() != [c] {
            candle_core::bail!("sparse_depthwise_conv: bias must be ({c},), got {:?}", b.shape())
        }
    }
    Ok(c)
}

/// Submanifold depthwise conv of a site matrix.
///
/// `x`: (n, c) features of the visible sites of `map`; `nb`: `map.neighbours(k)`; `weight`:
/// (c, 1, k, k) (PyTorch layout); `bias`: (c,). Returns (n, c). Gradients flow to all three.
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// use selfsup_ops::sparse::{sparse_depthwise_conv, SiteMap};
/// let map = SiteMap::from_visible(&[true, false, true, true], 1, 2, 2)?;
/// let nb = map.neighbours(3)?;
/// let x = Tensor::ones((map.len(), 4), DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((4, 1, 3, 3), DType::F32, &Device::Cpu)?;
/// let y = sparse_depthwise_conv(&x, &nb, &w, None)?;
/// // each visible site sees itself and its two visible neighbours
/// assert_eq!(y.to_vec2::<f32>()?[0], vec![3.0; 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sparse_depthwise_conv(x: &Tensor, nb: &Neighbours, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check_sparse_args(x, nb, weight, bias)?;
    if !crate::has_kernel(x) {
        // Without a kernel for this device or dtype: the same computation from candle ops.
        return sparse_depthwise_conv_gather(x, nb, weight, bias);
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, SparseDw(nb.clone())),
        None => x.apply_op2(&w, SparseDw(nb.clone())),
    }
}

/// The submanifold conv from candle ops: gather every tap's neighbour rows (n * k * k, c), weight
/// and sum. Memory-hungry (k * k copies of x); the path for devices without a kernel.
fn sparse_depthwise_conv_gather(x: &Tensor, nb: &Neighbours, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let taps = nb.k * nb.k;
    let padded = Tensor::cat(&[x, &Tensor::zeros((1, c), x.dtype(), x.device())?], 0)?;
    let ids: Vec<u32> = nb.idx.iter().map(|&j| if j == NONE { n as u32 } else { j }).collect();
    let ids = Tensor::from_vec(ids, n * taps, x.device())?;
    let cols = padded.index_select(&ids, 0)?.reshape((n, taps, c))?;
    let wt = weight.reshape((c, taps))?.t()?.unsqueeze(0)?;
    let y = cols.broadcast_mul(&wt)?.sum(1)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Reference for [`sparse_depthwise_conv`]: the masked-dense computation of Project decision 1.
/// Scatter to a dense map (zeros at masked positions), candle's grouped conv, gather the
/// visible sites (which zeroes masked outputs).
pub fn sparse_depthwise_conv_reference(
    x: &Tensor,
    map: &SiteMap,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let k = weight.dim(3)?;
    let dense = map.scatter(x)?.broadcast_mul(&map.visible_mask(x.device())?.to_dtype(x.dtype())?)?;
    let y = crate::dwconv::depthwise_conv2d_nhwc_reference(&dense, weight, bias, 1, k / 2)?;
    map.gather(&y)
}

/// Sparse 2x2 stride-2 conv between stages: `x` (n, c_in) on `map`, `weight` (c_out, c_in, 2, 2),
/// `bias` (c_out,). Returns the coarse site matrix and the coarse map. Differentiable.
pub fn sparse_downsample(
    x: &Tensor,
    map: &SiteMap,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, SiteMap)> {
    let (n, c) = x.dims2()?;
    let (co, ci, kh, kw) = weight.dims4()?;
    if n != map.len() || ci != c || (kh, kw) != (2, 2) {
        candle_core::bail!(
            "sparse_downsample: sites {:?} on a map of {} sites with weight {:?} (need ({n}, {c}) and (c_out, {c}, 2, 2))",
            x.shape(),
            map.len(),
            weight.shape()
        )
    }
    let (coarse, children) = map.downsample2()?;
    let padded = Tensor::cat(&[x, &Tensor::zeros((1, c), x.dtype(), x.device())?], 0)?;
    let ids: Vec<u32> = children.iter().map(|&j| if j == NONE { n as u32 } else { j }).collect();
    let ids = Tensor::from_vec(ids, coarse.len() * 4, x.device())?;
    let cols = padded.index_select(&ids, 0)?.reshape((coarse.len(), 4 * c))?;
    // (c_out, c_in, 2, 2) -> (c_out, ky, kx, c_in) -> (c_out, 4 c_in): matches the column order.
    let w2 = weight.permute((0, 2, 3, 1))?.reshape((co, 4 * c))?;
    let y = cols.matmul(&w2.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok((y, coarse))
}

/// Reference for [`sparse_downsample`]: scatter, dense conv, gather at the coarse sites. (The
/// dense conv is [`crate::conv::conv2d_nhwc`]: candle's conv backward fails on odd sizes.)
pub fn sparse_downsample_reference(
    x: &Tensor,
    map: &SiteMap,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (coarse, _) = map.downsample2()?;
    let y = crate::conv::conv2d_nhwc(&map.scatter(x)?, weight, 2, 0)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    coarse.gather(&y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    /// A random mask at `ratio` over a coarse grid, upsampled by `up` (FCMAE's layout).
    fn random_map(b: usize, h: usize, w: usize, ratio: f64, up: usize, seed: u64) -> SiteMap {
        let mut r = Rng::new(seed);
        let vis: Vec<bool> = (0..b * h * w).map(|_| r.uniform() >= ratio).collect();
        SiteMap::from_visible(&vis, b, h, w).unwrap().upsample(up).unwrap()
    }

    /// The gather map the CUDA kernels read (selfsup-kernels): every tap of every site names a
    /// visible site at that offset or NONE, and the relation is symmetric (b is a's neighbour at
    /// tap t iff a is b's at the mirrored tap), which is what lets the input gradient be a
    /// gather with the flipped kernel, on the CPU and on the GPU.
    #[test]
    fn the_gather_map_points_at_visible_sites_and_is_symmetric() {
        for (k, ratio) in [(3, 0.5), (7, 0.6), (5, 0.0)] {
            let map = random_map(2, 4, 5, ratio, 2, k as u64);
            let nb = map.neighbours(k).unwrap();
            let (taps, r) = (k * k, (k / 2) as isize);
            assert_eq!(nb.idx.len(), map.len() * taps);
            for (a, row) in nb.idx.chunks(taps).enumerate() {
                let s = map.sites()[a] as usize;
                let (b, y, x) = (s / (map.h * map.w), ((s / map.w) % map.h) as isize, (s % map.w) as isize);
                for (t, &j) in row.iter().enumerate() {
                    let (ny, nx) = (y + (t / k) as isize - r, x + (t % k) as isize - r);
                    let inside = ny >= 0 && nx >= 0 && (ny as usize) < map.h && (nx as usize) < map.w;
                    let visible = inside && map.is_visible(b, ny as usize, nx as usize);
                    assert_eq!(j != NONE, visible, "site {a}, tap {t}");
                    if j != NONE {
                        let d = map.sites()[j as usize] as usize;
                        assert_eq!(d, (b * map.h + ny as usize) * map.w + nx as usize, "site {a}, tap {t}");
                        assert_eq!(nb.idx[j as usize * taps + taps - 1 - t], a as u32, "symmetry at site {a}, tap {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_conv_equals_masked_dense_at_every_ratio() {
        for (i, &ratio) in [0.0, 0.6, 1.0].iter().enumerate() {
            for (k, with_bias) in [(7, true), (3, false)] {
                let map = random_map(2, 3, 3, ratio, 2, i as u64);
                let nb = map.neighbours(k).unwrap();
                let c = 5;
                let mut inputs = vec![randn(&[map.len(), c], 1), randn(&[c, 1, k, k], 2)];
                if with_bias {
                    inputs.push(randn(&[c], 3));
                }
                compare_with_reference(
                    &inputs,
                    |t| sparse_depthwise_conv(&t[0], &nb, &t[1], t.get(2)),
                    |t| sparse_depthwise_conv_reference(&t[0], &map, &t[1], t.get(2)),
                    1e-4,
                    1e-4,
                    &format!("ratio {ratio} k {k}: {} sites", map.len()),
                );
                compare_with_reference(
                    &inputs,
                    |t| sparse_depthwise_conv_gather(&t[0], &nb, &t[1], t.get(2)),
                    |t| sparse_depthwise_conv_reference(&t[0], &map, &t[1], t.get(2)),
                    1e-4,
                    1e-4,
                    &format!("gather path, ratio {ratio} k {k}"),
                );
            }
        }
    }

    #[test]
    fn single_site_and_finite_differences() {
        let mut vis = vec![false; 2 * 5 * 5];
        vis[7] = true;
        let map = SiteMap::from_visible(&vis, 2, 5, 5).unwrap();
        assert_eq!((map.len(), map.offsets()), (1, &[0, 1, 1][..]));
        let nb = map.neighbours(3).unwrap();
        let x = randn(&[1, 3], 1);
        let w = randn(&[3, 1, 3, 3], 2);
        // Only the centre tap reads a visible site.
        let y = sparse_depthwise_conv(&x, &nb, &w, None).unwrap();
        let centre = w.reshape((3, 9)).unwrap().narrow(1, 4, 1).unwrap().squeeze(1).unwrap();
        crate::testing::assert_close(
            &y.squeeze(0).unwrap(),
            &(x.squeeze(0).unwrap() * centre).unwrap(),
            1e-6,
            0.0,
            "one site",
        );
        let map = random_map(1, 4, 4, 0.5, 1, 9);
        let nb = map.neighbours(3).unwrap();
        let inputs = [randn(&[map.len(), 2], 3), randn(&[2, 1, 3, 3], 4), randn(&[2], 5)];
        check_finite_differences(
            &inputs,
            |t| sparse_depthwise_conv(&t[0], &nb, &t[1], Some(&t[2])),
            1e-2,
            1e-2,
            1,
            "sparse fd",
        );
    }

    #[test]
    fn downsample_equals_dense_conv_and_tracks_the_mask() {
        for (i, &ratio) in [0.0, 0.6, 1.0].iter().enumerate() {
            // Aligned (FCMAE) masks: up 4 then downsample twice stays aligned.
            let map = random_map(2, 2, 3, ratio, 4, 10 + i as u64);
            let inputs = [randn(&[map.len(), 3], 1), randn(&[4, 3, 2, 2], 2), randn(&[4], 3)];
            compare_with_reference(
                &inputs,
                |t| Ok(sparse_downsample(&t[0], &map, &t[1], Some(&t[2]))?.0),
                |t| sparse_downsample_reference(&t[0], &map, &t[1], Some(&t[2])),
                1e-4,
                1e-4,
                &format!("downsample ratio {ratio}"),
            );
            let (coarse, _) = map.downsample2().unwrap();
            assert_eq!(coarse, random_map(2, 2, 3, ratio, 2, 10 + i as u64), "aligned mask keeps its pattern");
        }
        // An unaligned mask: a coarse site exists where any child is visible.
        let map = random_map(1, 5, 6, 0.5, 1, 4);
        let inputs = [randn(&[map.len(), 2], 1), randn(&[3, 2, 2, 2], 2)];
        compare_with_reference(
            &inputs,
            |t| Ok(sparse_downsample(&t[0], &map, &t[1], None)?.0),
            |t| sparse_downsample_reference(&t[0], &map, &t[1], None),
            1e-4,
            1e-4,
            "unaligned downsample",
        );
    }

    #[test]
    fn gather_and_scatter_are_adjoint_inverses() {
        let map = random_map(2, 3, 4, 0.5, 1, 3);
        let x = randn(&[map.len(), 3], 1);
        let dense = map.scatter(&x).unwrap();
        crate::testing::assert_close(&map.gather(&dense).unwrap(), &x, 0.0, 0.0, "gather(scatter(x))");
        let masked = (dense.sum_keepdim(3).unwrap().abs().unwrap().gt(0.0).unwrap().to_dtype(DType::F32).unwrap()
            - map.visible_mask(&Device::Cpu).unwrap())
        .unwrap();
        assert_eq!(masked.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(map.offsets().len(), 3);
    }

    #[test]
    fn half_precision_takes_the_gather_path() {
        let map = random_map(2, 3, 3, 0.5, 2, 5);
        let nb = map.neighbours(3).unwrap();
        let (x, w) = (randn(&[map.len(), 4], 1), randn(&[4, 1, 3, 3], 2));
        let want = sparse_depthwise_conv(&x, &nb, &w, None).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = sparse_depthwise_conv(&f(&x), &nb, &f(&w), None).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        crate::testing::assert_close(&got, &want, 0.1, 0.02, "bf16");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let map = random_map(1, 4, 4, 0.5, 1, 1);
        let nb = map.neighbours(3).unwrap();
        let x = randn(&[map.len(), 4], 1);
        let e = sparse_depthwise_conv(&x, &nb, &randn(&[4, 1, 5, 5], 2), None).unwrap_err().to_string();
        assert!(e.contains("(4, 1, 3, 3)") && e.contains("[4, 1, 5, 5]"), "{e}");
        let e = sparse_depthwise_conv(&randn(&[map.len() + 1, 4], 1), &nb, &randn(&[4, 1, 3, 3], 2), None);
        assert!(e.unwrap_err().to_string().contains("neighbour map has"));
        assert!(map.neighbours(4).unwrap_err().to_string().contains("must be odd"));
        assert!(SiteMap::from_visible(&[true; 5], 1, 2, 2).unwrap_err().to_string().contains("5 flags"));
    }
}
