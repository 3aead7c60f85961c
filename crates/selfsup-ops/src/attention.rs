//! Attention inside groups of tokens ("windows"), fused, with positional terms and a backward
//! that recomputes the attention from saved row statistics.
//!
//! METHODS.md, Project decision 4: one kernel family serves LoMaR's 1 + 49-token windows, Swin-
//! style (shifted) windows, global attention over short sequences and CvT's attention with
//! shorter keys. For every window `g` and head `h`:
//! ```text
//! S = scale * Q K^T  [+ bias[h]]  [+ window_mask[g % n_masks]]  [+ ctx_scale * Q T[:, bucket(i, j)]]
//! O = softmax_rows(S) V
//! ```
//! - `bias` (heads, lq, lk) is shared by all windows (e.g. a relative-position table gathered by
//!   [`relative_position_bias`]); differentiable.
//! - `window_mask` (n_masks, lq, lk) is Swin's shifted-window mask ([`shifted_window_mask`]),
//!   window `g` using mask `g % n_masks` (windows are batch-major); not differentiable.
//! - The contextual key bias is iRPE's "ctx" mode on keys (LoMaR): `T` is iRPE's
//!   `lookup_table_weight` of shape (1 or heads, head_dim, num_buckets) and `bucket(i, j)` comes
//!   from [`irpe_product_buckets`]. LoMaR adds `rpe_k(q)` with the *unscaled* q (its
//!   `vision_transformer_irpe.py` computes `(q @ k^T) * scale` and then `attn += rpe_k(q)`), while
//!   iRPE's own ViT scales q first; `ctx_scale` covers both (1.0 for LoMaR, `scale` for iRPE).
//!
//! Layout: q, k, v are (windows, tokens, heads, head_dim), the layout a fused `qkv` Linear
//! produces with a reshape and no permute; [`window_attention_qkv`] takes that tensor, (windows,
//! tokens, 3, heads, head_dim), directly. The output is (windows, lq, heads, head_dim), ready for
//! the output projection.
//!
//! CPU path: one rayon task per window; per head, three small GEMMs (the `gemm` crate candle
//! itself uses, single-threaded inside the task) and a row softmax. The forward keeps only the
//! log-sum-exp of every row; the backward recomputes S and P from it (flash-attention style),
//! so no (lq, lk) matrix per window outlives the forward. The reference is the same formula
//! from candle ops (batched matmul, composed softmax, gather).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{cpu_f32, exp_shifted_sum, f32_slice, mm_par, SyncPtr};

/// iRPE's contextual bias on keys: `ctx_scale * q_i . table[head or 0][:, buckets[i * lk + j]]`.
#[derive(Debug, Clone)]
pub struct ContextualBias {
    /// (1 or heads, head_dim, num_buckets); iRPE's `lookup_table_weight`.
    pub table: Tensor,
    /// Bucket of every (query, key) pair, row-major (lq, lk); see [`irpe_product_buckets`].
    pub buckets: Arc<Vec<u32>>,
    /// 1.0 for LoMaR (unscaled q), the attention scale for iRPE's own ViT.
    pub ctx_scale: f64,
}

/// The optional terms added to the attention logits.
#[derive(Debug, Clone, Default)]
pub struct PositionBias {
    /// (heads, lq, lk), shared by every window. Differentiable.
    pub bias: Option<Tensor>,
    /// (n_masks, lq, lk) additive mask; window `g` uses `g % n_masks`. Not differentiable.
    pub window_mask: Option<Tensor>,
    /// iRPE contextual key bias. The table is differentiable.
    pub ctx: Option<ContextualBias>,
}

/// Shapes of one call. q lives in a (g, lq, sq, h, d) tensor at slot `qs`; k and v in a
/// (g, lk, skv, h, d) tensor at slots `ks`, `vs` (the two tensors may be the same `qkv`).
#[derive(Debug, Clone, Copy)]
struct Dims {
    g: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
    sq: usize,
    qs: usize,
    skv: usize,
    ks: usize,
    vs: usize,
}

impl Dims {
    fn q(&self, gi: usize, i: usize, head: usize) -> usize {
        ((gi * self.lq + i) * self.sq + self.qs) * self.h * self.d + head * self.d
    }
    fn kv(&self, gi: usize, j: usize, slot: usize, head: usize) -> usize {
        ((gi * self.lk + j) * self.skv + slot) * self.h * self.d + head * self.d
    }
    fn out(&self, gi: usize, i: usize, head: usize) -> usize {
        ((gi * self.lq + i) * self.h + head) * self.d
    }
    fn q_stride(&self) -> isize {
        (self.sq * self.h * self.d) as isize
    }
    fn kv_stride(&self) -> isize {
        (self.skv * self.h * self.d) as isize
    }
    fn out_stride(&self) -> isize {
        (self.h * self.d) as isize
    }
}

/// Where the positional terms sit in the packed `pos` argument: [bias (h*lq*lk) | table].
#[derive(Debug, Clone)]
struct Pos {
    bias: bool,
    /// (table heads, num_buckets) when a contextual table follows the bias.
    table: Option<(usize, usize)>,
    ctx_scale: f32,
    buckets: Arc<Vec<u32>>,
    /// (n_masks, values) of the additive window mask.
    mask: Option<(usize, Arc<Vec<f32>>)>,
}

impl Pos {
    fn bias_len(&self, d: &Dims) -> usize {
        if self.bias {
            d.h * d.lq * d.lk
        } else {
            0
        }
    }
    fn len(&self, d: &Dims) -> usize {
        self.bias_len(d) + self.table.map_or(0, |(th, nb)| th * d.d * nb)
    }
    /// Offset of the table slice used by `head`, and its bucket count.
    fn table_of(&self, d: &Dims, head: usize) -> Option<(usize, usize)> {
        self.table.map(|(th, nb)| (self.bias_len(d) + if th == 1 { 0 } else { head * d.d * nb }, nb))
    }
}

/// Per-task buffers.
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    qr: Vec<f32>,
}

impl Scratch {
    fn new(d: &Dims, pos: &Pos) -> Self {
        let nb = pos.table.map_or(0, |(_, nb)| nb);
        Self { s: vec![0.0; d.lq * d.lk], dp: vec![0.0; d.lq * d.lk], qr: vec![0.0; d.lq * nb] }
    }
}

/// The logits S of window `gi`, head `head` into `sc.s` (lq x lk).
fn logits(d: &Dims, pos: &Pos, scale: f32, q: &[f32], kv: &[f32], p: &[f32], gi: usize, head: usize, sc: &mut Scratch) {
    let (lq, lk) = (d.lq, d.lk);
    // SAFETY: q rows q(gi, i, head) + [0, d) for i < lq and k rows kv(gi, j, ks, head) + [0, d)
    // lie inside their tensors (shapes checked by the caller); sc.s holds lq * lk values.
    unsafe {
        mm_par(
            lq,
            lk,
            d.d,
            sc.s.as_mut_ptr(),
            lk as isize,
            false,
            q.as_ptr().add(d.q(gi, 0, head)),
            d.q_stride(),
            1,
            kv.as_ptr().add(d.kv(gi, 0, d.ks, head)),
            1,
            d.kv_stride(),
            scale,
            false,
        )
    };
    if pos.bias {
        let b = &p[head * lq * lk..(head + 1) * lq * lk];
        sc.s.iter_mut().zip(b).for_each(|(s, b)| *s += b);
    }
    if let Some((n, m)) = &pos.mask {
        let m = &m[(gi % n) * lq * lk..][..lq * lk];
        sc.s.iter_mut().zip(m).for_each(|(s, m)| *s += m);
    }
    if let Some((off, nb)) = pos.table_of(d, head) {
        // qr (lq x nb) = ctx_scale * Q (lq x d) . T (d x nb)
        // SAFETY: the table slice [off, off + d * nb) is inside `p`; sc.qr holds lq * nb values.
        unsafe {
            mm_par(
                lq,
                nb,
                d.d,
                sc.qr.as_mut_ptr(),
                nb as isize,
                false,
                q.as_ptr().add(d.q(gi, 0, head)),
                d.q_stride(),
                1,
                p.as_ptr().add(off),
                nb as isize,
                1,
                pos.ctx_scale,
                false,
            )
        };
        for i in 0..lq {
            let (row, qr) = (&mut sc.s[i * lk..(i + 1) * lk], &sc.qr[i * nb..(i + 1) * nb]);
            for (j, s) in row.iter_mut().enumerate() {
                *s += qr[pos.buckets[i * lk + j] as usize];
            }
        }
    }
}

/// The fused forward. Arguments: q source, kv source, packed positional terms.
struct Attention {
    d: Dims,
    scale: f32,
    pos: Pos,
    /// Whether the q and kv sources are one tensor (`qkv`).
    fused: bool,
    /// Log-sum-exp of every row, (g, h, lq); written by the forward, read by the backward.
    lse: Arc<Mutex<Option<Lse>>>,
}

/// The forward's row statistics, where the forward ran.
#[derive(Clone)]
enum Lse {
    Cpu(Arc<Vec<f32>>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>),
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "window-attention"
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
        let (q, kv, p) = (
            f32_slice(s1, l1, "attention q")?,
            f32_slice(s2, l2, "attention kv")?,
            f32_slice(s3, l3, "attention pos")?,
        );
        let d = self.d;
        let mut out = vec![0f32; d.g * d.lq * d.h * d.d];
        let mut lse = vec![0f32; d.g * d.h * d.lq];
        out.par_chunks_mut(d.lq * d.h * d.d).zip(lse.par_chunks_mut(d.h * d.lq)).enumerate().for_each_init(
            || Scratch::new(&d, &self.pos),
            |sc, (gi, (o, lse))| {
                for head in 0..d.h {
                    logits(&d, &self.pos, self.scale, q, kv, p, gi, head, sc);
                    for (i, row) in sc.s.chunks_exact_mut(d.lk).enumerate() {
                        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let sum = exp_shifted_sum(row, m);
                        let inv = 1.0 / sum;
                        row.iter_mut().for_each(|v| *v *= inv);
                        lse[head * d.lq + i] = m + sum.ln();
                    }
                    // O (lq x d) = P (lq x lk) . V (lk x d), into this window's output rows.
                    // SAFETY: `o` is window gi's (lq, h, d) block; v rows are inside kv.
                    unsafe {
                        mm_par(
                            d.lq,
                            d.d,
                            d.lk,
                            o.as_mut_ptr().add(head * d.d),
                            d.out_stride(),
                            false,
                            sc.s.as_ptr(),
                            d.lk as isize,
                            1,
                            kv.as_ptr().add(d.kv(gi, 0, d.vs, head)),
                            d.kv_stride(),
                            1,
                            1.0,
                            false,
                        )
                    };
                }
            },
        );
        *self.lse.lock().expect("attention lse lock") = Some(Lse::Cpu(Arc::new(lse)));
        Ok((CpuStorage::F32(out), Shape::from((d.g, d.lq, d.h, d.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{err, kernels, same_dtype, view, with_float, zeros};
        let what = "window-attention";
        let d = self.d;
        let dev = s1.device.clone();
        let k = kernels(&dev)?;
        let a = self.kernel_dims();
        let mask = self.mask_upload(&dev)?;
        let mut lse = zeros::<f32>(&dev, a.rows())?;
        let out = with_float!(same_dtype(what, &[s1, s2])?, what, |T| {
            let mut out = zeros::<T>(&dev, a.out_len(d.d))?;
            let (q, kv) = (view::<T>(s1, l1, what)?, view::<T>(s2, l2, what)?);
            let p = view::<f32>(s3, l3, what)?;
            let pos = self.dev_pos(&p, mask.as_ref());
            let (n_out, n_lse) = (a.out_len(d.d), a.rows());
            k.attention_fwd(
                &dev.cuda_stream(),
                &q,
                &kv,
                &pos,
                a,
                d.d,
                &mut out.slice_mut(0..n_out),
                &mut lse.slice_mut(0..n_lse),
            )
            .map_err(err)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        *self.lse.lock().expect("attention lse lock") = Some(Lse::Cuda(Arc::new(lse)));
        Ok((out, Shape::from((d.g, d.lq, d.h, d.d))))
    }

    fn bwd(
        &self,
        q_src: &Tensor,
        kv_src: &Tensor,
        pos: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .expect("attention lse lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("window_attention: backward before forward".into()))?;
        let grad = grad.contiguous()?;
        #[allow(clippy::infallible_destructuring_match)] // a second variant with feature `cuda`
        let lse = match lse {
            Lse::Cpu(l) => l,
            #[cfg(feature = "cuda")]
            Lse::Cuda(l) => return self.cuda_backward(q_src, kv_src, pos, res, &grad, &l),
        };
        let (dq, dkv, dpos) = {
            let (sq, lq_) = q_src.storage_and_layout();
            let (skv, lkv) = kv_src.storage_and_layout();
            let (sp, lp) = pos.storage_and_layout();
            let (so, lo) = res.storage_and_layout();
            let (sg, lg) = grad.storage_and_layout();
            // Everything stays borrowed (no copies) through the backward below.
            let (q, kv) = (
                cpu_f32(&sq, lq_, "window_attention backward: q")?,
                cpu_f32(&skv, lkv, "window_attention backward: kv")?,
            );
            let p = cpu_f32(&sp, lp, "window_attention backward: pos")?;
            let o = cpu_f32(&so, lo, "window_attention backward: output")?;
            let g = cpu_f32(&sg, lg, "window_attention backward: grad")?;
            self.backward(q, kv, p, o, g, &lse)
        };
        let dev = q_src.device();
        let dpos = Tensor::from_vec(dpos, pos.shape(), dev)?;
        if self.fused {
            return Ok((Some(Tensor::from_vec(dq, q_src.shape(), dev)?), None, Some(dpos)));
        }
        let dkv = Tensor::from_vec(dkv, kv_src.shape(), dev)?;
        Ok((Some(Tensor::from_vec(dq, q_src.shape(), dev)?), Some(dkv), Some(dpos)))
    }
}

#[cfg(feature = "cuda")]
impl Attention {
    /// The call's sizes and scalars as selfsup-kernels takes them.
    fn kernel_dims(&self) -> selfsup_kernels::launch::AttnDims {
        let d = self.d;
        let i = |v: usize| v as i32;
        let (th, nb) = self.pos.table.unwrap_or((0, 0));
        selfsup_kernels::launch::AttnDims {
            g: i(d.g),
            lq: i(d.lq),
            lk: i(d.lk),
            h: i(d.h),
            sq: i(d.sq),
            qs: i(d.qs),
            skv: i(d.skv),
            ks: i(d.ks),
            vs: i(d.vs),
            scale: self.scale,
            n_masks: self.pos.mask.as_ref().map_or(0, |(n, _)| i(*n)),
            table_heads: i(th),
            n_buckets: i(nb),
            ctx_scale: self.pos.ctx_scale,
        }
    }

    fn mask_upload(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>> {
        self.pos
            .mask
            .as_ref()
            .map(|(_, m)| dev.cuda_stream().clone_htod(m.as_slice()))
            .transpose()
            .map_err(|e| candle_core::Error::Msg(format!("window_attention: uploading the mask: {e:?}")))
    }

    /// The positional terms as device views: the bias and the table are slices of the packed
    /// `pos` tensor, the mask an upload, the buckets stay on the host.
    fn dev_pos<'a>(
        &'a self,
        packed: &'a candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>,
        mask: Option<&'a candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>,
    ) -> selfsup_kernels::cuda::DevPos<'a> {
        let d = self.d;
        let bias_len = self.pos.bias_len(&d);
        selfsup_kernels::cuda::DevPos {
            bias: self.pos.bias.then(|| packed.slice(0..bias_len)),
            mask: mask.map(|m| m.as_view()),
            table: self.pos.table.map(|_| packed.slice(bias_len..self.pos.len(&d))),
            buckets: self.pos.table.map(|_| self.pos.buckets.as_slice()),
        }
    }

    /// The backward on the GPU: the flash-style kernels of selfsup-kernels from the saved
    /// log-sum-exp. Returns the gradients of the q source, the kv source and the packed terms.
    fn cuda_backward(
        &self,
        q_src: &Tensor,
        kv_src: &Tensor,
        pos: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        lse: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::cuda::{err, kernels, view, with_float, zeros};
        use candle_core::backend::BackendStorage;
        use candle_core::Storage;
        let what = "window_attention backward";
        let d = self.d;
        let a = self.kernel_dims();
        let (sq, lq_) = q_src.storage_and_layout();
        let (skv, lkv) = kv_src.storage_and_layout();
        let (sp, lp) = pos.storage_and_layout();
        let (so, lo) = res.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        fn cuda(s: &Storage) -> Result<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(c) => Ok(c),
                _ => candle_core::bail!("window_attention backward: inputs on different devices"),
            }
        }
        let (sq, skv, sp, so, sg) = (cuda(&sq)?, cuda(&skv)?, cuda(&sp)?, cuda(&so)?, cuda(&sg)?);
        let dev = sq.device.clone();
        let k = kernels(&dev)?;
        let mask = self.mask_upload(&dev)?;
        let plen = self.pos.len(&d);
        let bias_len = self.pos.bias_len(&d);
        let mut dpos = zeros::<f32>(&dev, plen)?;
        let (ql, kvl) = a.src_lens(d.d);
        let (dq, dkv) = with_float!(sq.dtype(), what, |T| {
            let (q, kv) = (view::<T>(sq, lq_, what)?, view::<T>(skv, lkv, what)?);
            let (o, g) = (view::<T>(so, lo, what)?, view::<T>(sg, lg, what)?);
            let p = view::<f32>(sp, lp, what)?;
            let dp = self.dev_pos(&p, mask.as_ref());
            let mut dq = zeros::<T>(&dev, ql)?;
            let mut dkv = zeros::<T>(&dev, if self.fused { 1 } else { kvl })?;
            {
                let mut dqv = dq.slice_mut(0..ql);
                let mut dkvv = dkv.slice_mut(0..if self.fused { 0 } else { kvl });
                let (mut dbias, mut dtable) = dpos.split_at_mut(bias_len);
                let grads = selfsup_kernels::cuda::AttnGradsMut {
                    dq_src: &mut dqv,
                    dkv_src: (!self.fused).then_some(&mut dkvv),
                    dbias: self.pos.bias.then_some(&mut dbias),
                    dtable: self.pos.table.map(|_| &mut dtable),
                };
                k.attention_bwd(&dev.cuda_stream(), &q, &kv, &dp, &o, &g, &lse.as_view(), a, d.d, grads)
                    .map_err(err)?;
            }
            (
                candle_core::CudaStorage::wrap_cuda_slice(dq, dev.clone()),
                candle_core::CudaStorage::wrap_cuda_slice(dkv, dev.clone()),
            )
        });
        let tensor = |s: candle_core::CudaStorage, shape: &Shape| {
            Tensor::from_storage(Storage::Cuda(s), shape.clone(), candle_core::op::BackpropOp::none(), false)
        };
        let dpos = tensor(candle_core::CudaStorage::wrap_cuda_slice(dpos, dev.clone()), pos.shape());
        let dq = tensor(dq, q_src.shape());
        if self.fused {
            return Ok((Some(dq), None, Some(dpos)));
        }
        Ok((Some(dq), Some(tensor(dkv, kv_src.shape())), Some(dpos)))
    }
}

impl Attention {
    /// Gradients of the q source, the kv source (empty when fused: all in the first) and the
    /// packed positional terms.
    fn backward(
        &self,
        q: &[f32],
        kv: &[f32],
        p: &[f32],
        o: &[f32],
        g: &[f32],
        lse: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.d;
        let mut dq = vec![0f32; q.len()];
        let mut dkv = if self.fused { Vec::new() } else { vec![0f32; kv.len()] };
        let dq_ptr = SyncPtr(dq.as_mut_ptr());
        let dkv_ptr = if self.fused { dq_ptr } else { SyncPtr(dkv.as_mut_ptr()) };
        let plen = self.pos.len(&d);
        let dpos = crate::cpu::par_accumulate_with(
            d.g,
            plen,
            || Scratch::new(&d, &self.pos),
            |gi, sc, dpos| self.backward_window(q, kv, p, o, g, lse, gi, sc, dpos, dq_ptr, dkv_ptr),
        );
        (dq, dkv, dpos)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_window(
        &self,
        q: &[f32],
        kv: &[f32],
        p: &[f32],
        o: &[f32],
        g: &[f32],
        lse: &[f32],
        gi: usize,
        sc: &mut Scratch,
        dpos: &mut [f32],
        dq: SyncPtr,
        dkv: SyncPtr,
    ) {
        let d = self.d;
        let (lq, lk) = (d.lq, d.lk);
        for head in 0..d.h {
            logits(&d, &self.pos, self.scale, q, kv, p, gi, head, sc);
            let lse = &lse[(gi * d.h + head) * lq..][..lq];
            for (i, row) in sc.s.chunks_exact_mut(lk).enumerate() {
                exp_shifted_sum(row, lse[i]);
            }
            // dP (lq x lk) = dO (lq x d) . V^T (d x lk)
            // SAFETY (all GEMMs below): every pointer addresses rows of window gi, head `head`
            // inside its buffer; the scratch buffers have the sizes the GEMMs use; the gradient
            // regions (window gi's rows of dq / dkv) are written by this task only.
            unsafe {
                mm_par(
                    lq,
                    lk,
                    d.d,
                    sc.dp.as_mut_ptr(),
                    lk as isize,
                    false,
                    g.as_ptr().add(d.out(gi, 0, head)),
                    d.out_stride(),
                    1,
                    kv.as_ptr().add(d.kv(gi, 0, d.vs, head)),
                    1,
                    d.kv_stride(),
                    1.0,
                    false,
                )
            };
            // dS = P * (dP - rowsum(dO * O))
            for i in 0..lq {
                let (go, oo) = (&g[d.out(gi, i, head)..][..d.d], &o[d.out(gi, i, head)..][..d.d]);
                let di: f32 = go.iter().zip(oo).map(|(a, b)| a * b).sum();
                let (dp, pr) = (&mut sc.dp[i * lk..(i + 1) * lk], &sc.s[i * lk..(i + 1) * lk]);
                dp.iter_mut().zip(pr).for_each(|(x, &pv)| *x = pv * (*x - di));
            }
            unsafe {
                // dV (lk x d) = P^T (lk x lq) . dO (lq x d)
                mm_par(
                    lk,
                    d.d,
                    lq,
                    dkv.0.add(d.kv(gi, 0, d.vs, head)),
                    d.kv_stride(),
                    false,
                    sc.s.as_ptr(),
                    1,
                    lk as isize,
                    g.as_ptr().add(d.out(gi, 0, head)),
                    d.out_stride(),
                    1,
                    1.0,
                    false,
                );
                // dK (lk x d) = scale * dS^T (lk x lq) . Q (lq x d)
                mm_par(
                    lk,
                    d.d,
                    lq,
                    dkv.0.add(d.kv(gi, 0, d.ks, head)),
                    d.kv_stride(),
                    false,
                    sc.dp.as_ptr(),
                    1,
                    lk as isize,
                    q.as_ptr().add(d.q(gi, 0, head)),
                    d.q_stride(),
                    1,
                    self.scale,
                    false,
                );
                // dQ (lq x d) = scale * dS (lq x lk) . K (lk x d)
                mm_par(
                    lq,
                    d.d,
                    lk,
                    dq.0.add(d.q(gi, 0, head)),
                    d.q_stride(),
                    false,
                    sc.dp.as_ptr(),
                    lk as isize,
                    1,
                    kv.as_ptr().add(d.kv(gi, 0, d.ks, head)),
                    d.kv_stride(),
                    1,
                    self.scale,
                    false,
                );
            }
            if self.pos.bias {
                let db = &mut dpos[head * lq * lk..(head + 1) * lq * lk];
                db.iter_mut().zip(&sc.dp).for_each(|(a, v)| *a += v);
            }
            if let Some((off, nb)) = self.pos.table_of(&d, head) {
                // A (lq x nb): dS summed per bucket; reuse the qr buffer.
                sc.qr.fill(0.0);
                for i in 0..lq {
                    for j in 0..lk {
                        sc.qr[i * nb + self.pos.buckets[i * lk + j] as usize] += sc.dp[i * lk + j];
                    }
                }
                let cs = self.pos.ctx_scale;
                unsafe {
                    // dQ += ctx_scale * A (lq x nb) . T^T (nb x d)
                    mm_par(
                        lq,
                        d.d,
                        nb,
                        dq.0.add(d.q(gi, 0, head)),
                        d.q_stride(),
                        true,
                        sc.qr.as_ptr(),
                        nb as isize,
                        1,
                        p.as_ptr().add(off),
                        1,
                        nb as isize,
                        cs,
                        false,
                    );
                    // dT (d x nb) += ctx_scale * Q^T (d x lq) . A (lq x nb)
                    mm_par(
                        d.d,
                        nb,
                        lq,
                        dpos.as_mut_ptr().add(off),
                        nb as isize,
                        true,
                        q.as_ptr().add(d.q(gi, 0, head)),
                        1,
                        d.q_stride(),
                        sc.qr.as_ptr(),
                        nb as isize,
                        1,
                        cs,
                        false,
                    );
                }
            }
        }
    }
}

/// The f32 data of a CPU storage (the backward reads its inputs where they are).
/// Checks the positional terms against the shapes and packs the differentiable ones.
fn pack_pos(
    pos: &PositionBias,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    g: usize,
    dev: &Device,
) -> Result<(Tensor, Pos)> {
    let mut parts = Vec::new();
    if let Some(b) = &pos.bias {
        if b.dims() != [h, lq, lk] {
            candle_core::bail!("window_attention: bias must be ({h}, {lq}, {lk}), got {:?}", b.shape())
        }
        parts.push(b.to_dtype(DType::F32)?.flatten_all()?);
    }
    let mut table = None;
    let (mut buckets, mut ctx_scale) = (Arc::new(Vec::new()), 0.0);
    if let Some(c) = &pos.ctx {
        let (th, td, nb) = c.table.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "window_attention: ctx table must be (heads, head_dim, buckets), got {:?}",
                c.table.shape()
            ))
        })?;
        if (th != 1 && th != h) || td != d {
            candle_core::bail!("window_attention: ctx table {:?} does not fit {h} heads of dim {d}", c.table.shape())
        }
        if c.buckets.len() != lq * lk {
            candle_core::bail!("window_attention: {} buckets for {lq} x {lk} token pairs", c.buckets.len())
        }
        if let Some(&bad) = c.buckets.iter().find(|&&b| b as usize >= nb) {
            candle_core::bail!("window_attention: bucket {bad} out of range for a table of {nb} buckets")
        }
        parts.push(c.table.to_dtype(DType::F32)?.flatten_all()?);
        table = Some((th, nb));
        buckets = c.buckets.clone();
        ctx_scale = c.ctx_scale as f32;
    }
    let mask = match &pos.window_mask {
        Some(m) => {
            let (n, a, b) = m.dims3()?;
            if (a, b) != (lq, lk) || n == 0 || !g.is_multiple_of(n) {
                candle_core::bail!(
                    "window_attention: window mask {:?} must be (n, {lq}, {lk}) with n dividing the {g} windows",
                    m.shape()
                )
            }
            Some((n, Arc::new(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
        }
        None => None,
    };
    let packed = if parts.is_empty() { Tensor::zeros(0, DType::F32, dev)? } else { Tensor::cat(&parts, 0)? };
    Ok((packed, Pos { bias: pos.bias.is_some(), table, ctx_scale, buckets, mask }))
}

/// Attention inside windows from a fused `qkv` of shape (windows, tokens, 3, heads, head_dim).
/// Returns (windows, tokens, heads, head_dim). Gradients flow to `qkv`, the bias and the
/// contextual table.
///
/// ```
/// # use candle_core::{Device, Tensor, DType};
/// use selfsup_ops::attention::{window_attention_qkv, PositionBias};
/// // 8 windows of 1 + 49 tokens (LoMaR), 3 heads of dim 16.
/// let qkv = Tensor::zeros((8, 50, 3, 3, 16), DType::F32, &Device::Cpu)?;
/// let out = window_attention_qkv(&qkv, 0.25, &PositionBias::default())?;
/// assert_eq!(out.dims(), &[8, 50, 3, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn window_attention_qkv(qkv: &Tensor, scale: f64, pos: &PositionBias) -> Result<Tensor> {
    let (g, l, three, h, d) = qkv.dims5().map_err(|_| {
        candle_core::Error::Msg(format!(
            "window_attention_qkv: qkv must be (windows, tokens, 3, heads, dim), got {:?}",
            qkv.shape()
        ))
    })?;
    if three != 3 {
        candle_core::bail!("window_attention_qkv: axis 2 of qkv {:?} must be 3 (q, k, v)", qkv.shape())
    }
    if !crate::has_kernel(qkv) || !kernel_fits(qkv, l, l, d) {
        let part = |i| qkv.narrow(2, i, 1)?.squeeze(2);
        let out = window_attention_reference(&part(0)?, &part(1)?, &part(2)?, scale, pos)?;
        return Ok(out);
    }
    let dims = Dims { g, lq: l, lk: l, h, d, sq: 3, qs: 0, skv: 3, ks: 1, vs: 2 };
    run(qkv, qkv, dims, true, scale, pos)
}

/// Attention inside windows: q (windows, lq, heads, dim), k and v (windows, lk, heads, dim).
/// Returns (windows, lq, heads, dim). `lq` may differ from `lk` (CvT's strided keys).
pub fn window_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, pos: &PositionBias) -> Result<Tensor> {
    let (g, lq, h, d) = q.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "window_attention: q must be (windows, tokens, heads, dim), got {:?}",
            q.shape()
        ))
    })?;
    let (g2, lk, h2, d2) = k.dims4()?;
    if (g2, h2, d2) != (g, h, d) || k.dims() != v.dims() {
        candle_core::bail!("window_attention: q {:?}, k {:?} and v {:?} do not match", q.shape(), k.shape(), v.shape())
    }
    if !crate::has_kernel(q) || !kernel_fits(q, lq, lk, d) {
        return window_attention_reference(q, k, v, scale, pos);
    }
    let q_src = q.unsqueeze(2)?;
    let kv = Tensor::stack(&[k, v], 2)?;
    let dims = Dims { g, lq, lk, h, d, sq: 1, qs: 0, skv: 2, ks: 0, vs: 1 };
    run(&q_src, &kv, dims, false, scale, pos)
}

/// Whether the fused op takes windows of this size on `t`'s device. Always on the CPU; on a
/// CUDA device when a window fits the kernels' shared memory (selfsup-kernels), else the
/// composition of candle ops runs (CvT's first stage: 3136 queries over 784 keys).
fn kernel_fits(t: &Tensor, lq: usize, lk: usize, d: usize) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = t.device() {
        return crate::cuda::kernels(dev)
            .is_ok_and(|k| selfsup_kernels::launch::attention_fits(lq, lk, d, k.smem_limit()));
    }
    let _ = (t, lq, lk, d);
    true
}

fn run(q_src: &Tensor, kv_src: &Tensor, dims: Dims, fused: bool, scale: f64, pos: &PositionBias) -> Result<Tensor> {
    let (packed, p) = pack_pos(pos, dims.h, dims.lq, dims.lk, dims.d, dims.g, q_src.device())?;
    if dims.g * dims.lq * dims.lk * dims.h == 0 {
        candle_core::bail!(
            "window_attention: empty input (windows {}, lq {}, lk {}, heads {})",
            dims.g,
            dims.lq,
            dims.lk,
            dims.h
        )
    }
    let op = Attention { d: dims, scale: scale as f32, pos: p, fused, lse: Arc::new(Mutex::new(None)) };
    let q_src = q_src.contiguous()?;
    let kv_src = if fused { q_src.clone() } else { kv_src.contiguous()? };
    q_src.apply_op3(&kv_src, &packed, op)
}

/// Reference for [`window_attention`]: the formula from candle ops.
pub fn window_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    pos: &PositionBias,
) -> Result<Tensor> {
    let (g, lq, h, _) = q.dims4()?;
    let lk = k.dim(1)?;
    let (qh, kh, vh) = (q.permute((0, 2, 1, 3))?, k.permute((0, 2, 1, 3))?, v.permute((0, 2, 1, 3))?);
    let qh = qh.contiguous()?;
    let mut s = (qh.matmul(&kh.t()?.contiguous()?)? * scale)?;
    if let Some(b) = &pos.bias {
        s = s.broadcast_add(&b.unsqueeze(0)?)?;
    }
    if let Some(m) = &pos.window_mask {
        let n = m.dim(0)?;
        s = s.reshape((g / n, n, h, lq, lk))?.broadcast_add(&m.unsqueeze(1)?.unsqueeze(0)?)?.reshape((g, h, lq, lk))?;
    }
    if let Some(c) = &pos.ctx {
        let qr = (qh.broadcast_matmul(&c.table.unsqueeze(0)?)? * c.ctx_scale)?; // (g, h, lq, nb)
        let idx =
            Tensor::from_slice(&c.buckets, (1, 1, lq, lk), q.device())?.broadcast_as((g, h, lq, lk))?.contiguous()?;
        s = (s + qr.contiguous()?.gather(&idx, 3)?)?;
    }
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    p.matmul(&vh.contiguous()?)?.permute((0, 2, 1, 3))?.contiguous()
}

/// The (heads, lq, lk) bias from a relative-position table (num_relative, heads) and the index
/// of every (query, key) pair (e.g. [`swin_relative_position_index`]). Differentiable.
pub fn relative_position_bias(table: &Tensor, index: &[u32], lq: usize, lk: usize) -> Result<Tensor> {
    let (n, h) = table.dims2()?;
    if index.len() != lq * lk || index.iter().any(|&i| i as usize >= n) {
        candle_core::bail!(
            "relative_position_bias: index of {} entries for {lq} x {lk} pairs and a table of {n} rows",
            index.len()
        )
    }
    let idx = Tensor::from_slice(index, lq * lk, table.device())?;
    table.index_select(&idx, 0)?.t()?.reshape((h, lq, lk))
}

/// Swin's `relative_position_index` for a wh x ww window: pairs (i, j) index a table of
/// (2 wh - 1)(2 ww - 1) rows.
pub fn swin_relative_position_index(wh: usize, ww: usize) -> Vec<u32> {
    let n = wh * ww;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dy = (i / ww) as isize - (j / ww) as isize + wh as isize - 1;
            let dx = (i % ww) as isize - (j % ww) as isize + ww as isize - 1;
            out.push((dy * (2 * ww as isize - 1) + dx) as u32);
        }
    }
    out
}

/// iRPE's bucket ids for the "product" method on an h x w grid with `skip` (0 or 1) leading
/// class tokens, as `get_bucket_ids_2d` computes them with alpha = ratio, beta = 2 ratio,
/// gamma = 8 ratio. Returns the (skip + h w)^2 ids, row-major, and the bucket count
/// ((2 beta_int + 1)^2 + skip). LoMaR: `irpe_product_buckets(7, 7, 1.9, 1)` gives 50 buckets.
pub fn irpe_product_buckets(h: usize, w: usize, ratio: f64, skip: usize) -> (Vec<u32>, usize) {
    let (alpha, beta, gamma) = (ratio, 2.0 * ratio, 8.0 * ratio);
    let beta_int = beta as i64;
    // Eq. 18 of the iRPE paper; torch rounds half to even.
    let piecewise = |x: i64| -> i64 {
        let a = (x as f64).abs();
        if a <= alpha {
            return x;
        }
        let y = (alpha + (a / alpha).ln() / (gamma / alpha).ln() * (beta - alpha)).round_ties_even().min(beta);
        x.signum() * y as i64
    };
    let s = 2 * beta_int + 1;
    let nb = (s * s) as usize;
    let l = h * w;
    let mut out = Vec::with_capacity((l + skip) * (l + skip));
    for i in 0..l + skip {
        for j in 0..l + skip {
            if i < skip || j < skip {
                out.push(nb as u32);
                continue;
            }
            let (pi, pj) = (i - skip, j - skip);
            let r = piecewise((pi / w) as i64 - (pj / w) as i64) + beta_int;
            let c = piecewise((pi % w) as i64 - (pj % w) as i64) + beta_int;
            out.push((r * s + c) as u32);
        }
    }
    (out, nb + skip)
}

/// Swin's attention mask for shifted windows of a (h, w) map: (num_windows, L, L) with 0 where
/// two tokens come from the same region before the cyclic shift and -100 elsewhere.
pub fn shifted_window_mask(h: usize, w: usize, wh: usize, ww: usize, shift: usize, device: &Device) -> Result<Tensor> {
    if !h.is_multiple_of(wh) || !w.is_multiple_of(ww) || shift >= wh.min(ww) {
        candle_core::bail!("shifted_window_mask: map {h}x{w}, window {wh}x{ww}, shift {shift} do not fit")
    }
    let region = |x: usize, n: usize, win: usize| -> usize {
        if x < n - win {
            0
        } else if x < n - shift {
            1
        } else {
            2
        }
    };
    let mut img = vec![0usize; h * w];
    for y in 0..h {
        for x in 0..w {
            img[y * w + x] = region(y, h, wh) * 3 + region(x, w, ww);
        }
    }
    let (nh, nw, l) = (h / wh, w / ww, wh * ww);
    let mut mask = Vec::with_capacity(nh * nw * l * l);
    for by in 0..nh {
        for bx in 0..nw {
            let ids: Vec<usize> = (0..l).map(|t| img[(by * wh + t / ww) * w + bx * ww + t % ww]).collect();
            for a in &ids {
                for b in &ids {
                    mask.push(if a == b { 0f32 } else { -100.0 });
                }
            }
        }
    }
    Tensor::from_vec(mask, (nh * nw, l, l), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_finite_differences, compare_with_reference, randn};

    fn split(qkv: &Tensor) -> (Tensor, Tensor, Tensor) {
        let p = |i| qkv.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
        (p(0), p(1), p(2))
    }

    #[test]
    fn fused_qkv_matches_reference_for_many_window_sizes() {
        for (i, &(g, l, h, d)) in
            [(3, 4, 2, 8), (2, 50, 3, 16), (1, 1, 1, 4), (2, 9, 4, 5), (1, 256, 1, 8)].iter().enumerate()
        {
            let qkv = randn(&[g, l, 3, h, d], i as u64);
            let scale = (d as f64).powf(-0.5);
            compare_with_reference(
                &[qkv],
                |t| window_attention_qkv(&t[0], scale, &PositionBias::default()),
                |t| {
                    let (q, k, v) = split(&t[0]);
                    window_attention_reference(&q, &k, &v, scale, &PositionBias::default())
                },
                1e-4,
                1e-4,
                &format!("windows {g} x {l} tokens, {h} heads of {d}"),
            );
        }
    }

    #[test]
    fn relative_bias_and_shifted_mask_match_reference() {
        let (wh, ww, h, d) = (3, 3, 2, 4);
        let index = swin_relative_position_index(wh, ww);
        let mask = shifted_window_mask(6, 6, wh, ww, 1, &Device::Cpu).unwrap();
        let nw = mask.dim(0).unwrap();
        let inputs = [
            randn(&[2 * nw, 9, h, d], 1),
            randn(&[2 * nw, 9, h, d], 2),
            randn(&[2 * nw, 9, h, d], 3),
            randn(&[25, h], 4),
        ];
        let pos = |t: &[Tensor]| PositionBias {
            bias: Some(relative_position_bias(&t[3], &index, 9, 9).unwrap()),
            window_mask: Some(mask.clone()),
            ctx: None,
        };
        compare_with_reference(
            &inputs,
            |t| window_attention(&t[0], &t[1], &t[2], 0.5, &pos(t)),
            |t| window_attention_reference(&t[0], &t[1], &t[2], 0.5, &pos(t)),
            1e-4,
            1e-4,
            "swin bias + mask",
        );
    }

    #[test]
    fn contextual_key_bias_matches_reference_and_finite_differences() {
        let (buckets, nb) = irpe_product_buckets(3, 3, 1.9, 1);
        let buckets = Arc::new(buckets);
        let (g, l, h, d) = (3, 10, 2, 4);
        for table_heads in [1, h] {
            let inputs = [randn(&[g, l, 3, h, d], 5), randn(&[table_heads, d, nb], 6)];
            let pos = |t: &Tensor, cs| PositionBias {
                ctx: Some(ContextualBias { table: t.clone(), buckets: buckets.clone(), ctx_scale: cs }),
                ..Default::default()
            };
            for cs in [1.0, 0.5] {
                compare_with_reference(
                    &inputs,
                    |t| window_attention_qkv(&t[0], 0.5, &pos(&t[1], cs)),
                    |t| {
                        let (q, k, v) = split(&t[0]);
                        window_attention_reference(&q, &k, &v, 0.5, &pos(&t[1], cs))
                    },
                    1e-4,
                    1e-4,
                    &format!("ctx, {table_heads} table heads, ctx_scale {cs}"),
                );
            }
        }
        let inputs = [randn(&[2, 10, 3, 1, 3], 7), randn(&[1, 3, nb], 8), randn(&[1, 10, 10], 9)];
        check_finite_differences(
            &inputs,
            |t| {
                let pos = PositionBias {
                    bias: Some(t[2].clone()),
                    window_mask: None,
                    ctx: Some(ContextualBias { table: t[1].clone(), buckets: buckets.clone(), ctx_scale: 1.0 }),
                };
                window_attention_qkv(&t[0], 0.7, &pos)
            },
            1e-2,
            1e-2,
            3,
            "attention fd",
        );
    }

    /// Random window counts, lengths (1 to 70), heads and head dims, with and without a bias
    /// and a contextual table, fused and separate q/k/v.
    #[test]
    fn random_shapes_match_reference() {
        let mut r = crate::rng::Rng::new(77);
        for case in 0..16u64 {
            let (g, h, d) = (1 + r.below(4), 1 + r.below(3), 1 + r.below(9));
            let (lq, lk) = (1 + r.below(70), 1 + r.below(70));
            let (with_bias, nb) = (r.below(2) == 0, 1 + r.below(6));
            let buckets: Arc<Vec<u32>> = Arc::new((0..lq * lk).map(|_| r.below(nb) as u32).collect());
            let with_ctx = r.below(2) == 0;
            let mut inputs =
                vec![randn(&[g, lq, h, d], case), randn(&[g, lk, h, d], 10 + case), randn(&[g, lk, h, d], 20 + case)];
            inputs.push(randn(&[h, lq, lk], 30 + case));
            inputs.push(randn(&[1, d, nb], 40 + case));
            let pos = |t: &[Tensor]| PositionBias {
                bias: with_bias.then(|| t[3].clone()),
                window_mask: None,
                ctx: with_ctx.then(|| ContextualBias { table: t[4].clone(), buckets: buckets.clone(), ctx_scale: 0.8 }),
            };
            let what = format!("case {case}: g {g} lq {lq} lk {lk} h {h} d {d} bias {with_bias} ctx {with_ctx}");
            compare_with_reference(
                &inputs,
                |t| window_attention(&t[0], &t[1], &t[2], 0.4, &pos(t)),
                |t| window_attention_reference(&t[0], &t[1], &t[2], 0.4, &pos(t)),
                1e-4,
                1e-4,
                &what,
            );
        }
    }

    #[test]
    fn half_precision_takes_the_reference_path() {
        let qkv = randn(&[2, 9, 3, 2, 8], 3);
        let want = window_attention_qkv(&qkv, 0.35, &PositionBias::default()).unwrap();
        for dt in [DType::BF16, DType::F16] {
            let got = window_attention_qkv(&qkv.to_dtype(dt).unwrap(), 0.35, &PositionBias::default()).unwrap();
            assert_eq!(got.dtype(), dt);
            crate::testing::assert_close(&got, &want, 0.05, 0.02, &format!("{dt:?}"));
        }
    }

    #[test]
    fn cross_lengths_match_reference() {
        // CvT-style: 17 queries (cls + 4x4), 5 keys (cls + 2x2).
        let inputs = [randn(&[2, 17, 2, 8], 1), randn(&[2, 5, 2, 8], 2), randn(&[2, 5, 2, 8], 3)];
        compare_with_reference(
            &inputs,
            |t| window_attention(&t[0], &t[1], &t[2], 0.3, &PositionBias::default()),
            |t| window_attention_reference(&t[0], &t[1], &t[2], 0.3, &PositionBias::default()),
            1e-4,
            1e-4,
            "lq != lk",
        );
    }

    #[test]
    fn irpe_buckets_match_the_reference_code() {
        // For a 7x7 window with a class token (LoMaR): 49 + 1 buckets; offsets |d| <= 1 map
        // linearly, 2-3 to 2 and 4-6 to 3 (computed by hand from Eq. 18 with alpha = 1.9).
        let (b, nb) = irpe_product_buckets(7, 7, 1.9, 1);
        assert_eq!((nb, b.len()), (50, 50 * 50));
        assert!(b[..50].iter().all(|&x| x == 49) && b.iter().step_by(50).all(|&x| x == 49));
        let at = |i: usize, j: usize| b[(1 + i) * 50 + 1 + j];
        assert_eq!(at(0, 0), 3 * 7 + 3);
        assert_eq!(at(0, 1), 3 * 7 + 2); // column offset -1
        assert_eq!(at(0, 3), 3 * 7 + 1); // -3 -> -2
        assert_eq!(at(0, 6), 3 * 7); // -6 -> -3
        assert_eq!(at(48, 0), 6 * 7 + 6); // (+6, +6)
        assert_eq!(at(14, 0), 5 * 7 + 3); // row offset +2 -> +2
    }

    #[test]
    fn bad_shapes_are_errors() {
        let qkv = randn(&[2, 4, 3, 2, 8], 1);
        let e = window_attention_qkv(&randn(&[2, 4, 2, 2, 8], 1), 1.0, &PositionBias::default()).unwrap_err();
        assert!(e.to_string().contains("must be 3"), "{e}");
        let pos = PositionBias { bias: Some(randn(&[2, 4, 5], 1)), ..Default::default() };
        let e = window_attention_qkv(&qkv, 1.0, &pos).unwrap_err().to_string();
        assert!(e.contains("bias must be (2, 4, 4)"), "{e}");
        let pos = PositionBias {
            ctx: Some(ContextualBias { table: randn(&[1, 8, 3], 1), buckets: Arc::new(vec![5; 16]), ctx_scale: 1.0 }),
            ..Default::default()
        };
        let e = window_attention_qkv(&qkv, 1.0, &pos).unwrap_err().to_string();
        assert!(e.contains("bucket 5 out of range"), "{e}");
        let e = window_attention(
            &randn(&[2, 4, 2, 8], 1),
            &randn(&[2, 4, 2, 4], 1),
            &randn(&[2, 4, 2, 4], 1),
            1.0,
            &Default::default(),
        );
        assert!(e.unwrap_err().to_string().contains("do not match"));
    }
}
