//! selfsup-eval: how selfsup measures features.
//!
//! - [`features`]: pooled backbone features over a dataset (eval mode, no gradients).
//! - [`knn`]: weighted k-nearest-neighbour classification (cosine, temperature-weighted votes),
//!   and plain Euclidean kNN (scikit-learn's) for the raw-pixel baselines.
//! - [`linear`]: linear probe on cached features (MoCo, CARE and plain presets).
//! - [`segmentation`]: confusion matrix, per-class IoU and Dice, mIoU, pixel accuracy.
//! - [`masks`]: class-index PNG masks; scoring a folder of predictions against ground truth.
//!
//! Fine-tuning trains, so it lives with the optimizers in `selfsup-train` (`finetune`).

pub mod features;
pub mod knn;
pub mod linear;
pub mod masks;
pub mod segmentation;

pub use knn::{knn_classify, knn_euclidean, KnnAccuracy, KnnSetting};
pub use linear::{linear_probe, ProbeConfig, ProbeResult};
pub use segmentation::{ConfusionMatrix, SegmentationMetrics};
