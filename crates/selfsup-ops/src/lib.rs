//! selfsup-ops: tensor operations candle lacks or makes slow, as candle ops with backward.
//!
//! Every op here has a reference built from ordinary candle ops; the fast path is tested
//! against it (values and gradients). This crate knows no models.
//!
//! - [`attention`]: fused attention inside windows (bias, Swin masks, iRPE contextual keys)
//!   with a flash-style backward, plus relative-position and bucket helpers.
//! - [`contrast`]: InfoNCE over a positive and a queue of negatives (MoCo v2, DenseCL), fused.
//! - [`conv`]: channels-last 2-D convolution as im2col + GEMM, with a backward that stays
//!   GEMM-bound (candle's CPU conv backward is a direct loop, see CANDLE.md 1.2).
//! - [`dwconv`]: depthwise convolution (channel multiplier, any stride/padding), channels-last.
//! - [`grn`]: ConvNeXt V2's Global Response Normalization, dense and per sample over sites.
//! - [`layer_norm`]: LayerNorm with a backward, over the last axis or the channels of NCHW.
//! - [`norm`]: batch normalisation over the channel (last) axis, composed from candle ops.
//! - [`partition`]: window, shifted-window and SegNetr global partitions with exact inverses.
//! - [`pool`]: channels-last max and average pooling with a backward for any kernel, stride and
//!   padding (candle's pools have none when kernel != stride, e.g. ResNet's 3x3 s2 stem pool).
//! - [`resize`]: channels-last nearest and bilinear resizing with PyTorch's `F.interpolate`
//!   index rules and a backward (candle has none for bilinear or non-integer nearest).
//! - [`scatter`]: row scatter-add with gradients for both operands (candle's `scatter_add`
//!   backward fails with a shape error).
//! - [`softmax`]: softmax over the last axis with a backward (candle's fused one has none).
//! - [`sparse`]: submanifold sparse depthwise conv over visible sites (FCMAE), the sparse
//!   2x2 downsample, and gather/scatter between site matrices and dense maps.
//! - [`rng`]: a small seedable generator (candle's CPU RNG cannot be seeded).
//! - [`testing`]: fast-vs-reference and finite-difference gradient checks, and the check that
//!   every parameter of a module receives a gradient.

pub mod attention;
pub mod contrast;
pub mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dwconv;
pub mod gelu;
pub mod grn;
pub mod layer_norm;
pub mod linear;
pub mod norm;
pub mod partition;
pub mod pool;
pub mod resize;
pub mod rng;
pub mod scatter;
pub mod softmax;
pub mod sparse;
pub mod testing;

pub use conv::{conv2d_nhwc, conv2d_nhwc_reference};
pub use pool::{avg_pool2d_nhwc, max_pool2d_nhwc};
pub use resize::{interpolate_nhwc, Resize};
pub use scatter::scatter_add_rows;

/// Whether the ops with their own kernels run `x` through them: f32 on the CPU; f32, bf16 and
/// f16 on a CUDA device when built with feature `cuda` (selfsup-kernels). Elsewhere they fall
/// back to a composition of candle ops.
pub(crate) fn has_kernel(x: &candle_core::Tensor) -> bool {
    use candle_core::{DType, Device};
    match x.device() {
        Device::Cpu => x.dtype() == DType::F32,
        Device::Cuda(_) => cfg!(feature = "cuda") && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16),
        _ => false,
    }
}
