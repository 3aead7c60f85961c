//! selfsup-eval: how selfsup measures features.
//!
//! - [`features`]: pooled backbone features over a dataset (eval mode, no gradients).
//! - [`knn`]: weighted k-nearest-neighbour classification (cosine, temperature-weighted votes).

pub mod features;
pub mod knn;

pub use knn::{knn_classify, KnnAccuracy, KnnSetting};
