//! selfsup-ops: tensor operations candle lacks or makes slow, as candle ops with backward.
//!
//! Every op here has a reference built from ordinary candle ops; the fast path is tested
//! against it (values and gradients). This crate knows no models.
//!
//! - [`conv`]: channels-last 2-D convolution as im2col + GEMM, with a backward that stays
//!   GEMM-bound (candle's CPU conv backward is a direct loop, see CANDLE.md 1.2).
//! - [`norm`]: batch normalisation over the channel (last) axis, composed from candle ops.
//! - [`rng`]: a small seedable generator (candle's CPU RNG cannot be seeded).
//! - [`testing`]: fast-vs-reference and finite-difference gradient checks, and the check that
//!   every parameter of a module receives a gradient.

pub mod conv;
pub mod norm;
pub mod rng;
pub mod testing;

pub use conv::{conv2d_nhwc, conv2d_nhwc_reference};
