//! selfsup-ops: tensor operations candle lacks or makes slow, as candle ops with backward.
//!
//! Every op here has a reference built from ordinary candle ops; the fast path is tested
//! against it (values and gradients). This crate knows no models.
//!
//! - [`conv`]: channels-last 2-D convolution as im2col + GEMM, with a backward that stays
//!   GEMM-bound (candle's CPU conv backward is a direct loop, see CANDLE.md 1.2).
//! - [`norm`]: batch normalisation over the channel (last) axis, composed from candle ops.
//! - [`pool`]: channels-last max and average pooling with a backward for any kernel, stride and
//!   padding (candle's pools have none when kernel != stride, e.g. ResNet's 3x3 s2 stem pool).
//! - [`resize`]: channels-last nearest and bilinear resizing with PyTorch's `F.interpolate`
//!   index rules and a backward (candle has none for bilinear or non-integer nearest).
//! - [`scatter`]: row scatter-add with gradients for both operands (candle's `scatter_add`
//!   backward fails with a shape error).
//! - [`rng`]: a small seedable generator (candle's CPU RNG cannot be seeded).
//! - [`testing`]: fast-vs-reference and finite-difference gradient checks, and the check that
//!   every parameter of a module receives a gradient.

pub mod conv;
pub mod norm;
pub mod pool;
pub mod resize;
pub mod rng;
pub mod scatter;
pub mod testing;

pub use conv::{conv2d_nhwc, conv2d_nhwc_reference};
pub use pool::{avg_pool2d_nhwc, max_pool2d_nhwc};
pub use resize::{interpolate_nhwc, Resize};
pub use scatter::scatter_add_rows;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// The f32 slice behind a contiguous CPU storage, or an error naming `what`.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => candle_core::bail!("{what}: only f32 is supported on CPU, got {:?}", other.dtype()),
    }
}

/// Runs a CPU-f32-only op `f` on `xs` from any device and dtype: moves and converts the input,
/// then converts the result back. `to_device` and `to_dtype` have backwards, so gradients flow.
pub(crate) fn on_cpu_f32(xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return f(xs);
    }
    let (device, dtype) = (xs.device().clone(), xs.dtype());
    f(&xs.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?.to_dtype(dtype)?.to_device(&device)
}
