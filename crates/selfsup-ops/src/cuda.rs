//! The CUDA side of the ops that have their own kernels (feature `cuda`): candle storage in,
//! selfsup-kernels launches on the tensor's stream, candle storage out. The ops' `cuda_fwd`
//! methods call these; their layouts are the CPU paths' (ARCHITECTURE.md), so one op and one
//! backward serve both devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result};
use selfsup_kernels::cuda::Kernels;
use selfsup_kernels::KernelError;

/// The kernels of a device, compiled on first use and kept for the process.
pub(crate) fn kernels(dev: &CudaDevice) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let mut cache = CACHE.get_or_init(Default::default).lock().expect("selfsup kernels cache");
    if let Some(k) = cache.get(&ctx.ordinal()) {
        return Ok(k.clone());
    }
    let k = Arc::new(Kernels::new(ctx.clone()).map_err(err)?);
    cache.insert(ctx.ordinal(), k.clone());
    Ok(k)
}

pub(crate) fn err(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The contiguous view of a storage under its layout.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: CUDA kernels need a contiguous tensor")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// A zeroed output buffer on the storage's device.
pub(crate) fn zeros<
    T: CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32, bf16 or f16).
macro_rules! with_float {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            dt => candle_core::bail!("{}: no CUDA kernel for {dt:?}", $what),
        }
    };
}
pub(crate) use with_float;

/// The dtype shared by several storages, or an error naming the op.
pub(crate) fn same_dtype(what: &str, s: &[&CudaStorage]) -> Result<DType> {
    let dt = s[0].dtype();
    if let Some(o) = s.iter().find(|o| o.dtype() != dt) {
        candle_core::bail!("{what}: mixed dtypes {dt:?} and {:?}", o.dtype())
    }
    Ok(dt)
}

/// A host u32 table uploaded once per device and kept with its owner (the neighbour table of
/// a sparse conv is built once per mask and read by every block of the stage).
#[derive(Default)]
pub(crate) struct DeviceCopy(Mutex<Option<(usize, Arc<CudaSlice<u32>>)>>);

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCopy")
    }
}

impl DeviceCopy {
    pub(crate) fn get(&self, dev: &CudaDevice, host: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let ordinal = dev.cuda_stream().context().ordinal();
        let mut slot = self.0.lock().expect("device copy");
        if let Some((o, s)) = slot.as_ref() {
            if *o == ordinal {
                return Ok(s.clone());
            }
        }
        // CUDA refuses zero-byte allocations; an empty table (no visible site) is never read.
        let host = if host.is_empty() { &[u32::MAX][..] } else { host };
        let s = Arc::new(dev.cuda_stream().clone_htod(host).map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?);
        *slot = Some((ordinal, s.clone()));
        Ok(s)
    }
}
