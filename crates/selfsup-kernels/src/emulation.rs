//! The kernels run on an emulated grid on the host (feature `host-emulation`): the same CUDA C
//! sources, compiled as C++ by build.rs, launched with the same [`crate::launch`] configurations
//! and the same sequence of kernels as the CUDA path. One OS thread per GPU thread, a barrier
//! for `__syncthreads`, shared memory per block filled with garbage at the start. This checks the
//! kernels' arithmetic, indexing, launch geometry and barrier placement against the CPU ops on
//! a machine without a GPU. It does not check what only a GPU shows: races between warps that
//! the barrier hides, register pressure, speed.
//!
//! Slow by design (thousands of threads per launch): for tests on small shapes only.

use std::ffi::c_void;

use crate::launch::{
    attention_kv_resident, attention_q_resident, bucket_pairs, check_len, check_pos, chunked_sum, elementwise,
    AttnDims, Dim3, DwGeom, Launch,
};
use crate::source::{Dtype, Element};
use crate::KernelError;

/// Head dims with an emulated attention kernel (build.rs compiles these).
pub const EMULATED_HEAD_DIMS: [usize; 3] = [4, 8, 16];
/// The shared memory an emulated block may use: an H100's opt-in limit (227 KiB).
pub const EMULATED_SMEM_LIMIT: u32 = 227 * 1024;

type V = *const c_void;
type M = *mut c_void;

type SparseFwd = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, V, *const u32, M, i32, i32, i32, i32);
type SparsePartial = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, *const u32, *mut f32, i32, i32, i32, i32, i32);
type Reduce = unsafe extern "C" fn(Dim3, Dim3, u32, *const f32, M, M, i32, i32, i32, i32);
type Rows = unsafe extern "C" fn(Dim3, Dim3, u32, V, *const u32, M, i32, i32);
type DwFwd = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, V, M, DwGeom);
type DwDx = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, M, DwGeom);
type DwPartial = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, *mut f32, DwGeom, i32, i32);
type Pf = *const f32;
type AttFwd = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, Pf, Pf, Pf, *const u32, M, *mut f32, AttnDims);
type AttDq = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, Pf, Pf, Pf, *const u32, V, V, Pf, *mut f32, M, AttnDims);
type AttDkv = unsafe extern "C" fn(Dim3, Dim3, u32, V, V, Pf, Pf, Pf, *const u32, V, Pf, Pf, M, AttnDims);
type AttPairs =
    unsafe extern "C" fn(Dim3, Dim3, u32, V, V, Pf, Pf, Pf, *const u32, V, Pf, Pf, *mut f32, *mut f32, AttnDims);
type TableReduce = unsafe extern "C" fn(Dim3, Dim3, u32, Pf, *const u32, *const u32, *mut f32, AttnDims);

/// Declares the entry points `$name_{f32,bf16,f16}` and a picker `$name(dtype)`.
macro_rules! by_dtype {
    ($($name:ident : $ty:ty),* $(,)?) => {
        $(
            mod $name {
                extern "C" {
                    #[link_name = concat!(stringify!($name), "_f32")]
                    pub fn f32();
                    #[link_name = concat!(stringify!($name), "_bf16")]
                    pub fn bf16();
                    #[link_name = concat!(stringify!($name), "_f16")]
                    pub fn f16();
                }
            }
            pub fn $name(dt: Dtype) -> $ty {
                let f: unsafe extern "C" fn() = match dt {
                    Dtype::F32 => $name::f32,
                    Dtype::Bf16 => $name::bf16,
                    Dtype::F16 => $name::f16,
                };
                // SAFETY: the symbol is the C entry point of that name, whose parameters are
                // those of `$ty` (pointers to T erased to c_void; kernels/*.cu).
                unsafe { std::mem::transmute::<unsafe extern "C" fn(), $ty>(f) }
            }
        )*
    };
}

mod ffi {
    use super::*;

    by_dtype! {
        sparse_dw_fwd: SparseFwd,
        sparse_dw_wgrad_partial: SparsePartial,
        sparse_dw_wgrad_reduce: Reduce,
        gather_rows: Rows,
        scatter_rows: Rows,
        dw_fwd: DwFwd,
        dw_dx: DwDx,
        dw_wgrad_partial: DwPartial,
        dw_wgrad_reduce: Reduce,
    }
}

#[derive(Clone, Copy)]
enum Att {
    Fwd,
    Dq,
    Dkv,
    Pairs,
    TableReduce,
}

/// Declares the attention entry points of each emulated head dim and a picker.
macro_rules! attention_dims {
    ($($d:literal => $m:ident),*) => {
        $(
            mod $m {
                extern "C" {
                    #[link_name = concat!("attn_fwd_f32_d", $d)] pub fn fwd_f32();
                    #[link_name = concat!("attn_fwd_bf16_d", $d)] pub fn fwd_bf16();
                    #[link_name = concat!("attn_fwd_f16_d", $d)] pub fn fwd_f16();
                    #[link_name = concat!("attn_bwd_dq_f32_d", $d)] pub fn dq_f32();
                    #[link_name = concat!("attn_bwd_dq_bf16_d", $d)] pub fn dq_bf16();
                    #[link_name = concat!("attn_bwd_dq_f16_d", $d)] pub fn dq_f16();
                    #[link_name = concat!("attn_bwd_dkv_f32_d", $d)] pub fn dkv_f32();
                    #[link_name = concat!("attn_bwd_dkv_bf16_d", $d)] pub fn dkv_bf16();
                    #[link_name = concat!("attn_bwd_dkv_f16_d", $d)] pub fn dkv_f16();
                    #[link_name = concat!("attn_bwd_pairs_f32_d", $d)] pub fn pairs_f32();
                    #[link_name = concat!("attn_bwd_pairs_bf16_d", $d)] pub fn pairs_bf16();
                    #[link_name = concat!("attn_bwd_pairs_f16_d", $d)] pub fn pairs_f16();
                    #[link_name = concat!("attn_table_reduce_d", $d)] pub fn table_reduce();
                }
            }
        )*

        fn attention_entry(kernel: Att, dt: Dtype, d: usize) -> Result<unsafe extern "C" fn(), KernelError> {
            use Dtype::*;
            match d {
                $(
                    $d => Ok(match (kernel, dt) {
                        (Att::Fwd, F32) => $m::fwd_f32,
                        (Att::Fwd, Bf16) => $m::fwd_bf16,
                        (Att::Fwd, F16) => $m::fwd_f16,
                        (Att::Dq, F32) => $m::dq_f32,
                        (Att::Dq, Bf16) => $m::dq_bf16,
                        (Att::Dq, F16) => $m::dq_f16,
                        (Att::Dkv, F32) => $m::dkv_f32,
                        (Att::Dkv, Bf16) => $m::dkv_bf16,
                        (Att::Dkv, F16) => $m::dkv_f16,
                        (Att::Pairs, F32) => $m::pairs_f32,
                        (Att::Pairs, Bf16) => $m::pairs_bf16,
                        (Att::Pairs, F16) => $m::pairs_f16,
                        (Att::TableReduce, _) => $m::table_reduce,
                    }),
                )*
                _ => Err(KernelError::Shape(format!(
                    "emulation: no attention kernel for head dim {d} (emulated: {EMULATED_HEAD_DIMS:?})"
                ))),
            }
        }
    };
}

attention_dims!(4 => d4, 8 => d8, 16 => d16);

/// The attention entry `kernel` as a function of type `F`.
///
/// # Safety
/// `F` must be the signature of that entry point (kernels/attention.cu).
unsafe fn attention<F: Copy>(kernel: Att, dt: Dtype, d: usize) -> Result<F, KernelError> {
    let f = attention_entry(kernel, dt, d)?;
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<unsafe extern "C" fn()>());
    // SAFETY: the caller names the signature of the symbol.
    Ok(unsafe { std::mem::transmute_copy::<unsafe extern "C" fn(), F>(&f) })
}

fn ptr<T>(s: &[T]) -> V {
    s.as_ptr() as V
}

fn opt<T>(s: Option<&[T]>) -> V {
    s.map_or(std::ptr::null(), |s| s.as_ptr() as V)
}

fn i(v: usize) -> i32 {
    v as i32
}

/// Runs `f(grid, block, smem)` with a launch configuration.
fn go(l: Launch, f: impl FnOnce(Dim3, Dim3, u32)) {
    f(l.grid, l.block, l.smem)
}

/// Submanifold depthwise conv over `n` sites of `c` channels: `nb` is (n, taps), `w` (c, taps),
/// `bias` (c). With `flip` the kernel is mirrored (the input gradient: pass dy as `x`).
pub fn sparse_dw_fwd<T: Element>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    nb: &[u32],
    n: usize,
    c: usize,
    taps: usize,
    flip: bool,
) -> Result<Vec<T>, KernelError> {
    check_len("sparse conv x", x.len(), n * c)?;
    check_len("sparse conv weight", w.len(), c * taps)?;
    check_len("sparse conv neighbours", nb.len(), n * taps)?;
    if let Some(b) = bias {
        check_len("sparse conv bias", b.len(), c)?;
    }
    let mut out = vec![T::default(); n * c];
    let f = ffi::sparse_dw_fwd(T::DTYPE);
    go(elementwise(n * c), |g, b, s| unsafe {
        f(g, b, s, ptr(x), ptr(w), opt(bias), nb.as_ptr(), out.as_mut_ptr() as M, i(n), i(c), i(taps), flip as i32)
    });
    Ok(out)
}

/// Weight (c, taps) and bias (c) gradients of the sparse conv.
pub fn sparse_dw_wgrad<T: Element>(
    dy: &[T],
    x: &[T],
    nb: &[u32],
    n: usize,
    c: usize,
    taps: usize,
    with_bias: bool,
) -> Result<(Vec<T>, Option<Vec<T>>), KernelError> {
    check_len("sparse wgrad dy", dy.len(), n * c)?;
    check_len("sparse wgrad x", x.len(), n * c)?;
    check_len("sparse wgrad neighbours", nb.len(), n * taps)?;
    let s = chunked_sum(n, c, taps + with_bias as usize)?;
    let mut partial = vec![0f32; s.partial_len(c)];
    let (mut dw, mut db) = (vec![T::default(); c * taps], vec![T::default(); if with_bias { c } else { 0 }]);
    let (fp, fr) = (ffi::sparse_dw_wgrad_partial(T::DTYPE), ffi::sparse_dw_wgrad_reduce(T::DTYPE));
    go(s.partial, |g, b, sm| unsafe {
        fp(
            g,
            b,
            sm,
            ptr(dy),
            ptr(x),
            nb.as_ptr(),
            partial.as_mut_ptr(),
            i(n),
            i(c),
            i(taps),
            s.rows as i32,
            s.chunk as i32,
        )
    });
    let db_ptr = if with_bias { db.as_mut_ptr() as M } else { std::ptr::null_mut() };
    go(s.reduce, |g, b, sm| unsafe {
        fr(g, b, sm, partial.as_ptr(), dw.as_mut_ptr() as M, db_ptr, i(c), i(taps), s.rows as i32, s.chunks as i32)
    });
    Ok((dw, with_bias.then_some(db)))
}

/// Rows `sites` of a dense (rows, c) matrix.
pub fn gather_rows<T: Element>(dense: &[T], sites: &[u32], c: usize) -> Result<Vec<T>, KernelError> {
    let rows = dense.len() / c.max(1);
    if let Some(&bad) = sites.iter().find(|&&s| s as usize >= rows) {
        return Err(KernelError::Shape(format!("gather_rows: site {bad} outside {rows} dense rows")));
    }
    let mut out = vec![T::default(); sites.len() * c];
    let f = ffi::gather_rows(T::DTYPE);
    go(elementwise(sites.len() * c), |g, b, s| unsafe {
        f(g, b, s, ptr(dense), sites.as_ptr(), out.as_mut_ptr() as M, i(sites.len()), i(c))
    });
    Ok(out)
}

/// A dense (rows, c) matrix of zeros with `src`'s rows at `sites` (distinct).
pub fn scatter_rows<T: Element>(src: &[T], sites: &[u32], rows: usize, c: usize) -> Result<Vec<T>, KernelError> {
    check_len("scatter_rows src", src.len(), sites.len() * c)?;
    if let Some(&bad) = sites.iter().find(|&&s| s as usize >= rows) {
        return Err(KernelError::Shape(format!("scatter_rows: site {bad} outside {rows} dense rows")));
    }
    let mut dense = vec![T::default(); rows * c];
    let f = ffi::scatter_rows(T::DTYPE);
    go(elementwise(sites.len() * c), |g, b, s| unsafe {
        f(g, b, s, ptr(src), sites.as_ptr(), dense.as_mut_ptr() as M, i(sites.len()), i(c))
    });
    Ok(dense)
}

/// Dense depthwise conv, channels-last: x (b, h, w, ci), w (co, 1, kh, kw), bias (co).
pub fn dw_fwd<T: Element>(x: &[T], w: &[T], bias: Option<&[T]>, geom: DwGeom) -> Result<Vec<T>, KernelError> {
    check_len("dwconv x", x.len(), geom.in_len())?;
    check_len("dwconv weight", w.len(), geom.co as usize * geom.taps())?;
    if let Some(b) = bias {
        check_len("dwconv bias", b.len(), geom.co as usize)?;
    }
    let mut out = vec![T::default(); geom.out_len()];
    let f = ffi::dw_fwd(T::DTYPE);
    go(elementwise(geom.out_len()), |g, b, s| unsafe {
        f(g, b, s, ptr(x), ptr(w), opt(bias), out.as_mut_ptr() as M, geom)
    });
    Ok(out)
}

/// Input gradient of the dense depthwise conv.
pub fn dw_dx<T: Element>(dy: &[T], w: &[T], geom: DwGeom) -> Result<Vec<T>, KernelError> {
    check_len("dwconv dy", dy.len(), geom.out_len())?;
    let mut dx = vec![T::default(); geom.in_len()];
    let f = ffi::dw_dx(T::DTYPE);
    go(elementwise(geom.in_len()), |g, b, s| unsafe { f(g, b, s, ptr(dy), ptr(w), dx.as_mut_ptr() as M, geom) });
    Ok(dx)
}

/// Weight (co, kh * kw) and bias (co) gradients of the dense depthwise conv.
pub fn dw_wgrad<T: Element>(
    dy: &[T],
    x: &[T],
    geom: DwGeom,
    with_bias: bool,
) -> Result<(Vec<T>, Option<Vec<T>>), KernelError> {
    check_len("dwconv wgrad dy", dy.len(), geom.out_len())?;
    check_len("dwconv wgrad x", x.len(), geom.in_len())?;
    let (co, taps) = (geom.co as usize, geom.taps());
    let s = chunked_sum((geom.b * geom.ho) as usize, co, taps + with_bias as usize)?;
    let mut partial = vec![0f32; s.partial_len(co)];
    let (mut dw, mut db) = (vec![T::default(); co * taps], vec![T::default(); if with_bias { co } else { 0 }]);
    let (fp, fr) = (ffi::dw_wgrad_partial(T::DTYPE), ffi::dw_wgrad_reduce(T::DTYPE));
    go(s.partial, |g, b, sm| unsafe {
        fp(g, b, sm, ptr(dy), ptr(x), partial.as_mut_ptr(), geom, s.rows as i32, s.chunk as i32)
    });
    let db_ptr = if with_bias { db.as_mut_ptr() as M } else { std::ptr::null_mut() };
    go(s.reduce, |g, b, sm| unsafe {
        fr(g, b, sm, partial.as_ptr(), dw.as_mut_ptr() as M, db_ptr, i(co), i(taps), s.rows as i32, s.chunks as i32)
    });
    Ok((dw, with_bias.then_some(db)))
}

/// The positional terms of an attention call, all f32: bias (h, lq, lk), window mask
/// (n_masks, lq, lk), contextual table (table_heads, d, n_buckets) with its buckets (lq * lk).
/// Their counts are in [`AttnDims`] (`n_masks`, `table_heads`, `n_buckets`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pos<'a> {
    pub bias: Option<&'a [f32]>,
    pub mask: Option<&'a [f32]>,
    pub table: Option<&'a [f32]>,
    pub buckets: Option<&'a [u32]>,
}

impl Pos<'_> {
    fn check(&self, a: &AttnDims, d: usize) -> Result<(), KernelError> {
        let len = |s: Option<&[f32]>| s.map(|s| s.len());
        check_pos(a, d, len(self.bias), len(self.mask), len(self.table), self.buckets)
    }
}

fn opt_f32(s: Option<&[f32]>) -> *const f32 {
    s.map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Attention forward: the output (g, lq, h, d) and the row log-sum-exp (g, h, lq).
pub fn attention_fwd<T: Element>(
    q_src: &[T],
    kv_src: &[T],
    pos: Pos<'_>,
    a: AttnDims,
    d: usize,
) -> Result<(Vec<T>, Vec<f32>), KernelError> {
    let l = attention_kv_resident(&a, d, EMULATED_SMEM_LIMIT)?;
    pos.check(&a, d)?;
    let (ql, kvl) = a.src_lens(d);
    check_len("attention q source", q_src.len(), ql)?;
    check_len("attention kv source", kv_src.len(), kvl)?;
    let mut out = vec![T::default(); a.out_len(d)];
    let mut lse = vec![0f32; a.rows()];
    // SAFETY: AttFwd is attn_fwd's signature.
    let f: AttFwd = unsafe { attention(Att::Fwd, T::DTYPE, d)? };
    let (bias, mask, table, buckets) = (opt_f32(pos.bias), opt_f32(pos.mask), opt_f32(pos.table), pos.buckets);
    let buckets = buckets.map_or(std::ptr::null(), |b| b.as_ptr());
    go(l, |g, b, s| unsafe {
        f(g, b, s, ptr(q_src), ptr(kv_src), bias, mask, table, buckets, out.as_mut_ptr() as M, lse.as_mut_ptr(), a)
    });
    Ok((out, lse))
}

/// Gradients of an attention call.
#[derive(Debug, Clone)]
pub struct AttentionGrads<T> {
    /// Gradient of the q source; with a fused qkv it holds dq, dk and dv.
    pub dq_src: Vec<T>,
    /// Gradient of the kv source (None when fused).
    pub dkv_src: Option<Vec<T>>,
    pub dbias: Option<Vec<f32>>,
    pub dtable: Option<Vec<f32>>,
}

/// Attention backward from the forward's output and log-sum-exp. `fused`: q and kv are one
/// qkv tensor (pass it as both sources).
pub fn attention_bwd<T: Element>(
    q_src: &[T],
    kv_src: &[T],
    pos: Pos<'_>,
    out: &[T],
    dout: &[T],
    lse: &[f32],
    a: AttnDims,
    d: usize,
    fused: bool,
) -> Result<AttentionGrads<T>, KernelError> {
    let lkv = attention_kv_resident(&a, d, EMULATED_SMEM_LIMIT)?;
    let lq_ = attention_q_resident(&a, d, EMULATED_SMEM_LIMIT)?;
    pos.check(&a, d)?;
    let (ql, kvl) = a.src_lens(d);
    check_len("attention q source", q_src.len(), ql)?;
    check_len("attention kv source", kv_src.len(), kvl)?;
    check_len("attention output", out.len(), a.out_len(d))?;
    check_len("attention output gradient", dout.len(), a.out_len(d))?;
    check_len("attention lse", lse.len(), a.rows())?;
    let (bias, mask, table) = (opt_f32(pos.bias), opt_f32(pos.mask), opt_f32(pos.table));
    let buckets = pos.buckets.map_or(std::ptr::null(), |b| b.as_ptr());
    let dt = T::DTYPE;
    let mut delta = vec![0f32; a.rows()];
    let mut dq = vec![T::default(); ql];
    let mut dkv = if fused { Vec::new() } else { vec![T::default(); kvl] };
    let dq_ptr = dq.as_mut_ptr() as M;
    let dkv_ptr = if fused { dq_ptr } else { dkv.as_mut_ptr() as M };
    // SAFETY (all four): the signatures are those of the entry points.
    let fdq: AttDq = unsafe { attention(Att::Dq, dt, d)? };
    let fdkv: AttDkv = unsafe { attention(Att::Dkv, dt, d)? };
    go(lkv, |g, b, s| unsafe {
        fdq(
            g,
            b,
            s,
            ptr(q_src),
            ptr(kv_src),
            bias,
            mask,
            table,
            buckets,
            ptr(out),
            ptr(dout),
            lse.as_ptr(),
            delta.as_mut_ptr(),
            dq_ptr,
            a,
        )
    });
    go(lq_, |g, b, s| unsafe {
        fdkv(
            g,
            b,
            s,
            ptr(q_src),
            ptr(kv_src),
            bias,
            mask,
            table,
            buckets,
            ptr(dout),
            lse.as_ptr(),
            delta.as_ptr(),
            dkv_ptr,
            a,
        )
    });
    let (mut dbias, mut dtable) = (None, None);
    if pos.bias.is_some() || pos.table.is_some() {
        let fp: AttPairs = unsafe { attention(Att::Pairs, dt, d)? };
        let mut db = vec![0f32; if pos.bias.is_some() { a.pairs() } else { 0 }];
        let mut pair_t = vec![0f32; if pos.table.is_some() { a.pairs() * d } else { 0 }];
        let db_ptr = if pos.bias.is_some() { db.as_mut_ptr() } else { std::ptr::null_mut() };
        let pt_ptr = if pos.table.is_some() { pair_t.as_mut_ptr() } else { std::ptr::null_mut() };
        go(elementwise(a.pairs()), |g, b, s| unsafe {
            fp(
                g,
                b,
                s,
                ptr(q_src),
                ptr(kv_src),
                bias,
                mask,
                table,
                buckets,
                ptr(dout),
                lse.as_ptr(),
                delta.as_ptr(),
                db_ptr,
                pt_ptr,
                a,
            )
        });
        if pos.bias.is_some() {
            dbias = Some(db);
        }
        if let Some(bk) = pos.buckets {
            let (start, pairs) = bucket_pairs(bk, a.n_buckets as usize)?;
            let len = a.table_heads as usize * d * a.n_buckets as usize;
            let mut dt_ = vec![0f32; len];
            let fr: TableReduce = unsafe { attention(Att::TableReduce, dt, d)? };
            go(elementwise(len), |g, b, s| unsafe {
                fr(g, b, s, pair_t.as_ptr(), start.as_ptr(), pairs.as_ptr(), dt_.as_mut_ptr(), a)
            });
            dtable = Some(dt_);
        }
    }
    Ok(AttentionGrads { dq_src: dq, dkv_src: (!fused).then_some(dkv), dbias, dtable })
}

/// Whether the emulation has an attention kernel for head dim `d`.
pub fn has_head_dim(d: usize) -> bool {
    EMULATED_HEAD_DIMS.contains(&d)
}
