//! Launching the kernels on an NVIDIA GPU through cudarc (feature `cuda`).
//!
//! [`Kernels`] compiles each module with NVRTC for the device's architecture the first time one
//! of its kernels is used, and caches it (the attention module once per head dim). The op
//! methods take cudarc views on the caller's stream, so a candle CUDA tensor's buffer is passed
//! without a copy, and a launch is ordered with the candle ops on the same stream. Every
//! method checks buffer lengths against the shapes before it launches.
//!
//! cudarc is built with `fallback-dynamic-loading`: libcuda and libnvrtc are opened when first
//! used, and a missing library would panic there, so [`Kernels::new`] checks [`available`]
//! first and returns an error instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::launch::{
    attention_kv_resident, attention_q_resident, bucket_pairs, check_len, check_pos, chunked_sum, elementwise,
    AttnDims, DwGeom, Launch, SMEM_DEFAULT,
};
use crate::source::{Dtype, Element, Module};
use crate::KernelError;

// SAFETY: both are #[repr(C)] structs of i32/f32 fields, laid out as their C twins in
// kernels/dwconv.cu and kernels/attention.cu.
unsafe impl DeviceRepr for DwGeom {}
unsafe impl DeviceRepr for AttnDims {}

/// Whether libnvrtc can be loaded (enough to compile the kernels, e.g. in CI without a GPU).
/// Always true with feature `linked`, where the binary does not start without it.
pub fn nvrtc_available() -> bool {
    #[cfg(feature = "linked")]
    return true;
    // SAFETY: only probes whether the shared library can be opened.
    #[cfg(not(feature = "linked"))]
    unsafe {
        cudarc::nvrtc::sys::is_culib_present()
    }
}

/// Whether libcuda and libnvrtc can both be loaded (a GPU may still be absent).
pub fn available() -> bool {
    #[cfg(feature = "linked")]
    return true;
    // SAFETY: only probes whether the shared library can be opened.
    #[cfg(not(feature = "linked"))]
    unsafe {
        nvrtc_available() && cudarc::driver::sys::is_culib_present()
    }
}

/// NVRTC-compiles one module for `arch` (e.g. "sm_90"). Needs libnvrtc, not a GPU.
pub fn compile(module: Module, arch: &'static str) -> Result<Ptx, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::Cuda("libnvrtc.so not found (install nvidia-cuda-nvrtc, set LD_LIBRARY_PATH)".into()));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(format!("{}.cu", module.name())),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(module.source(), opts)
        .map_err(|e| KernelError::Compile { module: module.name(), log: format!("{e:?}") })
}

fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e:?}"))
}

/// The kernels of one device: compiled modules, loaded functions (with the shared memory each
/// was opted in to), the architecture and the shared-memory limit.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    arch: &'static str,
    smem_limit: u32,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, (CudaFunction, u32)>>,
}

fn cfg(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid.x, l.grid.y, l.grid.z),
        block_dim: (l.block.x, l.block.y, l.block.z),
        shared_mem_bytes: l.smem,
    }
}

fn i(v: usize) -> i32 {
    v as i32
}

/// The positional terms of an attention call on the device (f32), with the buckets on the
/// host (the table gradient's bucket lists are built from them).
#[derive(Default)]
pub struct DevPos<'a> {
    pub bias: Option<CudaView<'a, f32>>,
    pub mask: Option<CudaView<'a, f32>>,
    pub table: Option<CudaView<'a, f32>>,
    pub buckets: Option<&'a [u32]>,
}

/// The gradient buffers of an attention backward. With a fused qkv, `dkv_src` is None and
/// `dq_src` receives dq, dk and dv.
pub struct AttnGradsMut<'a, 'b, T> {
    pub dq_src: &'a mut CudaViewMut<'b, T>,
    pub dkv_src: Option<&'a mut CudaViewMut<'b, T>>,
    pub dbias: Option<&'a mut CudaViewMut<'b, f32>>,
    pub dtable: Option<&'a mut CudaViewMut<'b, f32>>,
}

impl Kernels {
    /// The kernels of `ctx`'s device. Fails (without panicking) when libcuda or libnvrtc is
    /// missing.
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self, KernelError> {
        if !available() {
            return Err(KernelError::Cuda("libcuda.so or libnvrtc.so not found".into()));
        }
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let smem_limit = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda_err("shared memory limit"))? as u32;
        Ok(Self { ctx, arch, smem_limit, modules: Mutex::default(), functions: Mutex::default() })
    }

    /// The architecture the modules are compiled for, e.g. "sm_90".
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The opt-in shared memory per block, in bytes.
    pub fn smem_limit(&self) -> u32 {
        self.smem_limit
    }

    /// The entry point `entry` of `module`, compiling and loading the module on first use and
    /// opting the function in to `smem` bytes of dynamic shared memory when that exceeds the
    /// default 48 KiB.
    fn function(&self, module: Module, entry: &str, smem: u32) -> Result<CudaFunction, KernelError> {
        let mut functions = self.functions.lock().expect("kernel function cache");
        if let Some((f, opted)) = functions.get_mut(entry) {
            if smem > SMEM_DEFAULT && smem > *opted {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                    .map_err(cuda_err("dynamic shared memory"))?;
                *opted = smem;
            }
            return Ok(f.clone());
        }
        let m = {
            let mut cache = self.modules.lock().expect("kernel module cache");
            match cache.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile(module, self.arch)?;
                    let m = self.ctx.load_module(ptx).map_err(cuda_err("loading a module"))?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m.load_function(entry).map_err(|e| KernelError::Cuda(format!("{entry}: {e:?}")))?;
        let mut opted = SMEM_DEFAULT;
        if smem > SMEM_DEFAULT {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(cuda_err("dynamic shared memory"))?;
            opted = smem;
        }
        functions.insert(entry.to_string(), (f.clone(), opted));
        Ok(f)
    }

    /// Queues a launch whose arguments `args` holds (from `stream.launch_builder`).
    fn launch(args: &mut LaunchArgs<'_>, l: Launch, entry: &str) -> Result<(), KernelError> {
        // SAFETY: the caller pushed the entry point's parameters in order, with the types of
        // its C signature (device buffers as views, absent ones as a null u64); buffer lengths
        // were checked against the shapes first.
        unsafe { args.launch(cfg(l)) }.map(|_| ()).map_err(|e| KernelError::Cuda(format!("launching {entry}: {e:?}")))
    }

    /// Submanifold depthwise conv (see `emulation::sparse_dw_fwd`): `out` = conv of `x` (n, c)
    /// through the neighbour table `nb` (n, taps) with `w` (c, taps) and an optional bias;
    /// `flip` mirrors the kernel (the input gradient, with dy as `x`).
    pub fn sparse_dw_fwd<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        nb: &CudaView<'_, u32>,
        out: &mut CudaViewMut<'_, T>,
        n: usize,
        c: usize,
        taps: usize,
        flip: bool,
    ) -> Result<(), KernelError> {
        check_len("sparse conv x", x.len(), n * c)?;
        check_len("sparse conv weight", w.len(), c * taps)?;
        check_len("sparse conv neighbours", nb.len(), n * taps)?;
        check_len("sparse conv output", out.len(), n * c)?;
        if let Some(b) = bias {
            check_len("sparse conv bias", b.len(), c)?;
        }
        let entry = Module::Sparse.entry("sparse_dw_fwd", T::DTYPE);
        let f = self.function(Module::Sparse, &entry, 0)?;
        let (n_, c_, taps_, flip) = (i(n), i(c), i(taps), flip as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(x).arg(w);
        push_opt(&mut b, bias);
        b.arg(nb).arg(out).arg(&n_).arg(&c_).arg(&taps_).arg(&flip);
        Self::launch(&mut b, elementwise(n * c), &entry)
    }

    /// Weight (c, taps) and optional bias (c) gradients of the sparse conv.
    pub fn sparse_dw_wgrad<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        nb: &CudaView<'_, u32>,
        dw: &mut CudaViewMut<'_, T>,
        db: Option<&mut CudaViewMut<'_, T>>,
        n: usize,
        c: usize,
        taps: usize,
    ) -> Result<(), KernelError> {
        check_len("sparse wgrad dy", dy.len(), n * c)?;
        check_len("sparse wgrad x", x.len(), n * c)?;
        check_len("sparse wgrad neighbours", nb.len(), n * taps)?;
        check_len("sparse wgrad dw", dw.len(), c * taps)?;
        if let Some(db) = &db {
            check_len("sparse wgrad db", db.len(), c)?;
        }
        let s = chunked_sum(n, c, taps + db.is_some() as usize)?;
        let mut partial = stream.alloc_zeros::<f32>(s.partial_len(c)).map_err(cuda_err("allocating partials"))?;
        let (n_, c_, taps_, rows, chunk, chunks) =
            (i(n), i(c), i(taps), s.rows as i32, s.chunk as i32, s.chunks as i32);
        let entry = Module::Sparse.entry("sparse_dw_wgrad_partial", T::DTYPE);
        let f = self.function(Module::Sparse, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy).arg(x).arg(nb).arg(&mut partial).arg(&n_).arg(&c_).arg(&taps_).arg(&rows).arg(&chunk);
        Self::launch(&mut b, s.partial, &entry)?;
        let entry = Module::Sparse.entry("sparse_dw_wgrad_reduce", T::DTYPE);
        let f = self.function(Module::Sparse, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&partial).arg(dw);
        push_opt_mut(&mut b, db);
        b.arg(&c_).arg(&taps_).arg(&rows).arg(&chunks);
        Self::launch(&mut b, s.reduce, &entry)
    }

    /// `out` (n, c) = rows `sites` of `dense` (rows, c).
    pub fn gather_rows<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        dense: &CudaView<'_, T>,
        sites: &CudaView<'_, u32>,
        out: &mut CudaViewMut<'_, T>,
        c: usize,
    ) -> Result<(), KernelError> {
        let n = sites.len();
        check_len("gather_rows output", out.len(), n * c)?;
        let entry = Module::Sparse.entry("gather_rows", T::DTYPE);
        let f = self.function(Module::Sparse, &entry, 0)?;
        let (n_, c_) = (i(n), i(c));
        let mut b = stream.launch_builder(&f);
        b.arg(dense).arg(sites).arg(out).arg(&n_).arg(&c_);
        Self::launch(&mut b, elementwise(n * c), &entry)
    }

    /// Rows of `src` (n, c) written to rows `sites` (distinct) of `dense`; other rows untouched.
    pub fn scatter_rows<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaView<'_, T>,
        sites: &CudaView<'_, u32>,
        dense: &mut CudaViewMut<'_, T>,
        c: usize,
    ) -> Result<(), KernelError> {
        let n = sites.len();
        check_len("scatter_rows src", src.len(), n * c)?;
        let entry = Module::Sparse.entry("scatter_rows", T::DTYPE);
        let f = self.function(Module::Sparse, &entry, 0)?;
        let (n_, c_) = (i(n), i(c));
        let mut b = stream.launch_builder(&f);
        b.arg(src).arg(sites).arg(dense).arg(&n_).arg(&c_);
        Self::launch(&mut b, elementwise(n * c), &entry)
    }

    /// Dense depthwise conv, channels-last (see [`DwGeom`]).
    pub fn dw_fwd<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        bias: Option<&CudaView<'_, T>>,
        out: &mut CudaViewMut<'_, T>,
        geom: DwGeom,
    ) -> Result<(), KernelError> {
        check_len("dwconv x", x.len(), geom.in_len())?;
        check_len("dwconv weight", w.len(), geom.co as usize * geom.taps())?;
        check_len("dwconv output", out.len(), geom.out_len())?;
        if let Some(b) = bias {
            check_len("dwconv bias", b.len(), geom.co as usize)?;
        }
        let entry = Module::DwConv.entry("dw_fwd", T::DTYPE);
        let f = self.function(Module::DwConv, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(x).arg(w);
        push_opt(&mut b, bias);
        b.arg(out).arg(&geom);
        Self::launch(&mut b, elementwise(geom.out_len()), &entry)
    }

    /// Input gradient of the dense depthwise conv.
    pub fn dw_dx<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        dy: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        dx: &mut CudaViewMut<'_, T>,
        geom: DwGeom,
    ) -> Result<(), KernelError> {
        check_len("dwconv dy", dy.len(), geom.out_len())?;
        check_len("dwconv dx", dx.len(), geom.in_len())?;
        let entry = Module::DwConv.entry("dw_dx", T::DTYPE);
        let f = self.function(Module::DwConv, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy).arg(w).arg(dx).arg(&geom);
        Self::launch(&mut b, elementwise(geom.in_len()), &entry)
    }

    /// Weight (co, kh * kw) and optional bias (co) gradients of the dense depthwise conv.
    pub fn dw_wgrad<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        dy: &CudaView<'_, T>,
        x: &CudaView<'_, T>,
        dw: &mut CudaViewMut<'_, T>,
        db: Option<&mut CudaViewMut<'_, T>>,
        geom: DwGeom,
    ) -> Result<(), KernelError> {
        check_len("dwconv wgrad dy", dy.len(), geom.out_len())?;
        check_len("dwconv wgrad x", x.len(), geom.in_len())?;
        let (co, taps) = (geom.co as usize, geom.taps());
        check_len("dwconv wgrad dw", dw.len(), co * taps)?;
        if let Some(db) = &db {
            check_len("dwconv wgrad db", db.len(), co)?;
        }
        let s = chunked_sum((geom.b * geom.ho) as usize, co, taps + db.is_some() as usize)?;
        let mut partial = stream.alloc_zeros::<f32>(s.partial_len(co)).map_err(cuda_err("allocating partials"))?;
        let (rows, chunk, chunks, co_, taps_) = (s.rows as i32, s.chunk as i32, s.chunks as i32, i(co), i(taps));
        let entry = Module::DwConv.entry("dw_wgrad_partial", T::DTYPE);
        let f = self.function(Module::DwConv, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy).arg(x).arg(&mut partial).arg(&geom).arg(&rows).arg(&chunk);
        Self::launch(&mut b, s.partial, &entry)?;
        let entry = Module::DwConv.entry("dw_wgrad_reduce", T::DTYPE);
        let f = self.function(Module::DwConv, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&partial).arg(dw);
        push_opt_mut(&mut b, db);
        b.arg(&co_).arg(&taps_).arg(&rows).arg(&chunks);
        Self::launch(&mut b, s.reduce, &entry)
    }

    fn check_attention<T>(
        &self,
        a: &AttnDims,
        d: usize,
        pos: &DevPos<'_>,
        q_src: &CudaView<'_, T>,
        kv_src: &CudaView<'_, T>,
    ) -> Result<(Launch, Launch), KernelError> {
        let lkv = attention_kv_resident(a, d, self.smem_limit)?;
        let lq = attention_q_resident(a, d, self.smem_limit)?;
        let len = |v: &Option<CudaView<'_, f32>>| v.as_ref().map(|v| v.len());
        check_pos(a, d, len(&pos.bias), len(&pos.mask), len(&pos.table), pos.buckets)?;
        let (ql, kvl) = a.src_lens(d);
        check_len("attention q source", q_src.len(), ql)?;
        check_len("attention kv source", kv_src.len(), kvl)?;
        Ok((lkv, lq))
    }

    /// Attention forward: `out` (g, lq, h, d) and the row log-sum-exp `lse` (g, h, lq), which
    /// the backward needs.
    pub fn attention_fwd<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q_src: &CudaView<'_, T>,
        kv_src: &CudaView<'_, T>,
        pos: &DevPos<'_>,
        a: AttnDims,
        d: usize,
        out: &mut CudaViewMut<'_, T>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        let (l, _) = self.check_attention(&a, d, pos, q_src, kv_src)?;
        check_len("attention output", out.len(), a.out_len(d))?;
        check_len("attention lse", lse.len(), a.rows())?;
        let module = Module::Attention { head_dim: d };
        let buckets = upload(stream, pos.buckets)?;
        let entry = module.entry("attn_fwd", T::DTYPE);
        let f = self.function(module, &entry, l.smem)?;
        let mut b = stream.launch_builder(&f);
        b.arg(q_src).arg(kv_src);
        push_pos(&mut b, pos, buckets.as_ref());
        b.arg(out).arg(lse).arg(&a);
        Self::launch(&mut b, l, &entry)
    }

    /// Attention backward (flash style) from the forward's output and `lse`. `grads.dq_src`
    /// has the q source's length; with a fused qkv (`grads.dkv_src` None) it receives dq, dk
    /// and dv. `dbias` and `dtable` are written when the call has those terms.
    pub fn attention_bwd<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q_src: &CudaView<'_, T>,
        kv_src: &CudaView<'_, T>,
        pos: &DevPos<'_>,
        out: &CudaView<'_, T>,
        dout: &CudaView<'_, T>,
        lse: &CudaView<'_, f32>,
        a: AttnDims,
        d: usize,
        grads: AttnGradsMut<'_, '_, T>,
    ) -> Result<(), KernelError> {
        let (lkv, lqr) = self.check_attention(&a, d, pos, q_src, kv_src)?;
        let (ql, kvl) = a.src_lens(d);
        check_len("attention output", out.len(), a.out_len(d))?;
        check_len("attention output gradient", dout.len(), a.out_len(d))?;
        check_len("attention lse", lse.len(), a.rows())?;
        check_len("attention dq source", grads.dq_src.len(), ql)?;
        if let Some(v) = &grads.dkv_src {
            check_len("attention dkv source", v.len(), kvl)?;
        }
        if let (Some(v), true) = (&grads.dbias, pos.bias.is_some()) {
            check_len("attention dbias", v.len(), a.pairs())?;
        }
        let table_len = a.table_heads as usize * d * a.n_buckets as usize;
        if let (Some(v), true) = (&grads.dtable, pos.table.is_some()) {
            check_len("attention dtable", v.len(), table_len)?;
        }
        let dt: Dtype = T::DTYPE;
        let module = Module::Attention { head_dim: d };
        let buckets = upload(stream, pos.buckets)?;
        let mut delta = stream.alloc_zeros::<f32>(a.rows()).map_err(cuda_err("allocating delta"))?;

        let entry = module.entry("attn_bwd_dq", dt);
        let f = self.function(module, &entry, lkv.smem)?;
        let mut b = stream.launch_builder(&f);
        b.arg(q_src).arg(kv_src);
        push_pos(&mut b, pos, buckets.as_ref());
        b.arg(out).arg(dout).arg(lse).arg(&mut delta).arg(&mut *grads.dq_src).arg(&a);
        Self::launch(&mut b, lkv, &entry)?;

        let entry = module.entry("attn_bwd_dkv", dt);
        let f = self.function(module, &entry, lqr.smem)?;
        let mut b = stream.launch_builder(&f);
        b.arg(q_src).arg(kv_src);
        push_pos(&mut b, pos, buckets.as_ref());
        b.arg(dout).arg(lse).arg(&delta);
        match grads.dkv_src {
            Some(v) => b.arg(v),
            // Fused: dk and dv go to their slots of the qkv gradient (dq's kernel wrote slot 0).
            None => b.arg(&mut *grads.dq_src),
        };
        b.arg(&a);
        Self::launch(&mut b, lqr, &entry)?;

        if pos.bias.is_none() && pos.table.is_none() {
            return Ok(());
        }
        let mut pair_t = match pos.table {
            Some(_) => Some(stream.alloc_zeros::<f32>(a.pairs() * d).map_err(cuda_err("allocating pairs"))?),
            None => None,
        };
        let entry = module.entry("attn_bwd_pairs", dt);
        let f = self.function(module, &entry, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(q_src).arg(kv_src);
        push_pos(&mut b, pos, buckets.as_ref());
        b.arg(dout).arg(lse).arg(&delta);
        let dbias = if pos.bias.is_some() { grads.dbias } else { None };
        push_opt_mut(&mut b, dbias);
        match pair_t.as_mut() {
            Some(p) => b.arg(p),
            None => b.arg(&NULL),
        };
        b.arg(&a);
        Self::launch(&mut b, elementwise(a.pairs()), &entry)?;

        if let (Some(bk), Some(dtable), Some(pair_t)) = (pos.buckets, grads.dtable, pair_t.as_ref()) {
            let (start, pairs) = bucket_pairs(bk, a.n_buckets as usize)?;
            let start = stream.clone_htod(&start).map_err(cuda_err("uploading bucket starts"))?;
            let pairs = stream.clone_htod(&pairs).map_err(cuda_err("uploading bucket pairs"))?;
            let entry = module.entry("attn_table_reduce", dt);
            let f = self.function(module, &entry, 0)?;
            let mut b = stream.launch_builder(&f);
            b.arg(pair_t).arg(&start).arg(&pairs).arg(dtable).arg(&a);
            Self::launch(&mut b, elementwise(table_len), &entry)?;
        }
        // Buffers allocated here (delta, pair_t, uploads) are freed when they drop, which the
        // stream orders after the launches above.
        Ok(())
    }
}

/// A null device pointer, for an absent optional buffer.
const NULL: u64 = 0;

fn push_opt<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a CudaView<'_, T>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

fn push_opt_mut<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a mut CudaViewMut<'_, T>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

/// bias, mask, table, buckets: the four positional arguments of every attention kernel.
fn push_pos<'a>(b: &mut LaunchArgs<'a>, pos: &'a DevPos<'_>, buckets: Option<&'a CudaSlice<u32>>) {
    push_opt(b, pos.bias.as_ref());
    push_opt(b, pos.mask.as_ref());
    push_opt(b, pos.table.as_ref());
    match buckets {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

fn upload(stream: &Arc<CudaStream>, host: Option<&[u32]>) -> Result<Option<CudaSlice<u32>>, KernelError> {
    host.map(|h| stream.clone_htod(h)).transpose().map_err(cuda_err("uploading buckets"))
}
