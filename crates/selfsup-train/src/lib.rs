//! selfsup-train: the pretraining loop and everything it owns.
//!
//! - [`config`]: `RunConfig`, the TOML a run is described by (unknown keys are errors).
//! - [`optim`]: SGD (momentum, Nesterov), LARS and AdamW over parameter groups.
//! - [`schedule`]: learning-rate and momentum schedules as pure functions of progress.
//! - [`checkpoint`]: atomic safetensors checkpoints with a JSON manifest; keep-last-K.
//! - [`trainer`]: the loop: views -> loss -> backward -> clip -> step -> EMA -> log.
//! - [`report`]: PNG plots and a Markdown summary of a run directory.
//! - [`segment`]: supervised SegNetr / U-Net training and scoring on a segset.
//! - [`panel`]: the objective's pictures (reconstructions, attention maps) as a PNG per checkpoint.
//! - [`finetune`]: end-to-end fine-tuning with layer-wise lr decay, label smoothing and
//!   drop-path (an evaluation protocol, here because it trains).
//!
//! This is an edge crate: errors are `anyhow` with context naming the file, field or value.

pub mod checkpoint;
pub mod config;
pub mod finetune;
pub mod fsutil;
pub mod optim;
pub mod panel;
pub mod report;
pub mod schedule;
pub mod segment;
pub mod trainer;

pub use config::RunConfig;
pub use trainer::Trainer;

#[cfg(test)]
mod testutil;
