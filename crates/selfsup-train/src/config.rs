//! `RunConfig`: everything a pretraining run is, in one TOML file.
//!
//! Unknown or mistyped keys are errors that name the key (serde `deny_unknown_fields`), and
//! [`RunConfig::validate`] rejects impossible values with the field's name. The resolved config
//! (defaults filled in) is written into the output directory and into every checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use selfsup_data::ViewConfig;
use selfsup_models::ModelConfig;
use selfsup_objectives::ObjectiveConfig;
use serde::{Deserialize, Serialize};

use crate::optim::OptimizerConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seeds weight init, shuffling and augmentation.
    #[serde(default)]
    pub seed: u64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedules then span `max_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// Where checkpoints, logs and the resolved config go.
    pub output_dir: PathBuf,
    /// `cpu` or `cuda` (`cuda:N`).
    #[serde(default = "default_device")]
    pub device: String,
    pub data: DataConfig,
    /// Threads that augment each batch (0: all cores). Batches do not depend on it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub workers: usize,
    pub model: ModelConfig,
    pub objective: ObjectiveConfig,
    /// One recipe per view the objective consumes.
    pub views: Vec<ViewConfig>,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Log a JSON line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// kNN on held-out labelled data during pretraining (solo-learn's online kNN), logged with
    /// the training metrics. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_knn: Option<OnlineKnnConfig>,
}

/// Online kNN: every `every` steps (and at the end), the online backbone's pooled features of
/// the first `bank` training images and the first `queries` test images, weighted cosine kNN
/// at k = 20, T = 0.07 and k = 200, T = 0.1, evaluated at the first view's size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineKnnConfig {
    pub every: usize,
    #[serde(default = "default_knn_bank")]
    pub bank: usize,
    #[serde(default = "default_knn_queries")]
    pub queries: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_max_bad() -> f64 {
    0.01
}
fn is_default_max_bad(x: &f64) -> bool {
    *x == default_max_bad()
}

fn default_knn_bank() -> usize {
    10_000
}
fn default_knn_queries() -> usize {
    2_000
}

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    pub path: PathBuf,
    /// Stop when more than this fraction of the training records fails to decode (they are
    /// skipped, counted in metrics.jsonl and named at the end of the run until then).
    #[serde(default = "default_max_bad", skip_serializing_if = "is_default_max_bad")]
    pub max_bad_fraction: f64,
    /// Use only the first `limit` training images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// An MNIST-family IDX directory (`train-images-idx3-ubyte[.gz]`, ...).
    Idx,
    /// A CIFAR-10 / CIFAR-100 binary directory.
    Cifar,
    /// A directory of shard stores `train/` and `test/` (`selfsup data pack`).
    Shards,
    /// A directory of LMDB stores `train/` and `test/` (`selfsup data pack --to lmdb`).
    Lmdb,
    /// A segmentation set (`selfsup data segset`): its RGB images without masks or labels, for
    /// pretraining an encoder on the images it will segment.
    Segset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Linear warm-up length, in epochs (may be fractional).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Learning rate at the end of the cosine.
    #[serde(default)]
    pub min_lr: f64,
    /// Clip the global gradient norm to this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { warmup_epochs: 0.0, min_lr: 0.0, clip_grad_norm: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (and always at the end).
    #[serde(default = "default_every")]
    pub every: usize,
    /// How many checkpoints to keep.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: default_every(), keep: default_keep() }
    }
}

fn default_device() -> String {
    "cpu".into()
}
fn default_log_every() -> usize {
    10
}
fn default_every() -> usize {
    500
}
fn default_keep() -> usize {
    3
}

impl RunConfig {
    /// Parses and validates a TOML file; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in config {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Rejects impossible values, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("epochs must be positive")
        }
        if self.max_steps == Some(0) {
            bail!("max_steps must be positive when given")
        }
        if self.batch_size == 0 {
            bail!("batch_size must be positive")
        }
        if self.batch_size == 1 {
            bail!("batch_size must be at least 2 (BatchNorm needs more than one sample)")
        }
        if !(0.0..=1.0).contains(&self.data.max_bad_fraction) {
            bail!("data.max_bad_fraction must be a fraction in [0, 1], got {}", self.data.max_bad_fraction)
        }
        if self.log_every == 0 || self.checkpoint.every == 0 || self.checkpoint.keep == 0 {
            bail!("log_every, checkpoint.every and checkpoint.keep must be positive")
        }
        if !(self.schedule.warmup_epochs >= 0.0 && self.schedule.warmup_epochs.is_finite()) {
            bail!("schedule.warmup_epochs must be a non-negative number, got {}", self.schedule.warmup_epochs)
        }
        self.optimizer.validate()?;
        if !(self.schedule.min_lr >= 0.0 && self.schedule.min_lr <= self.optimizer.lr()) {
            bail!("schedule.min_lr must be in [0, optimizer lr], got {}", self.schedule.min_lr)
        }
        if let Some(c) = self.schedule.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                bail!("schedule.clip_grad_norm must be positive, got {c}")
            }
        }
        if let Some(k) = &self.online_knn {
            if k.every == 0 || k.bank == 0 || k.queries == 0 {
                bail!("online_knn.every, online_knn.bank and online_knn.queries must be positive")
            }
        }
        if self.data.limit == Some(0) {
            bail!("data.limit must be positive when given")
        }
        self.objective.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.views.len() != self.objective.num_views() {
            bail!(
                "objective `{}` consumes {} views but `views` lists {}",
                self.objective.id(),
                self.objective.num_views(),
                self.views.len()
            )
        }
        let multiple = self.model.size_multiple().map_err(|e| anyhow::anyhow!("model: {e}"))?;
        for (i, v) in self.views.iter().enumerate() {
            v.validate(self.model.in_chans).with_context(|| format!("views[{i}]"))?;
            if v.size % multiple != 0 {
                bail!("views[{i}].size = {} is not a multiple of the model's stride {multiple}", v.size)
            }
        }
        parse_device(&self.device)?;
        Ok(())
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceSpec> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(DeviceSpec::Cuda(n)),
            None => bail!("device must be `cpu`, `cuda` or `cuda:N`, got `{s}`"),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn open(self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(n) => candle_core::Device::new_cuda(n)
                .with_context(|| format!("opening cuda:{n} (was selfsup built with `--features cuda`?)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped config parses and validates, and survives a TOML round trip.
    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = RunConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert_eq!(RunConfig::from_toml(&cfg.to_toml().unwrap()).unwrap(), cfg);
                n += 1;
            }
        }
        assert!(n > 0, "no configs in {}", dir.display());
    }

    /// ResNet takes any view side; patch-based models need a multiple of their stride.
    #[test]
    fn view_sides_follow_the_models_multiple() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let resize = |file: &str, from: &str, to: &str| {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(text.contains(from), "{file} has no `{from}`");
            RunConfig::from_toml(&text.replace(from, to))
        };
        resize("moco_v2_resnet18_fmnist.toml", "size = 32", "size = 28").unwrap();
        let err = resize("fcmae_convnextv2_atto_fmnist.toml", "size = 64", "size = 48").unwrap_err();
        assert!(
            format!("{err:#}").contains("views[0].size = 48 is not a multiple of the model's stride 32"),
            "{err:#}"
        );
    }

    #[test]
    fn device_strings() {
        assert_eq!(parse_device("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), DeviceSpec::Cuda(1));
        assert!(parse_device("gpu").unwrap_err().to_string().contains("`gpu`"));
    }
}
