//! selfsup-objectives: the self-supervised losses and the state they own.
//!
//! Invariants: objectives do no I/O. The trainer owns the step counter and passes `progress`
//! (0 at the first step, 1 after the last); objectives own what gradients don't train (EMA
//! targets, queues), in their own stores, never handed to the optimizer. `loss` has no side
//! effects beyond BatchNorm statistics; state changes happen in `after_step`.

pub mod byol;
pub mod fcmae;

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use selfsup_models::{Backbone, Mode, ModelConfig, Vars};
use serde::{Deserialize, Serialize};

/// A loss and its named parts (for logging).
pub struct Losses {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

/// Where a training step stands: what an objective's loss may depend on besides its views.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// 0 at the first step, 1 after the last.
    pub progress: f64,
    /// The step's random key (a pure function of the run seed and the step number): masks
    /// and drop-path draws derive from it, never from global state.
    pub key: u64,
}

impl Step {
    /// The training mode for forward pass number `salt` of this step (e.g. one per view), so
    /// two forwards of one step draw independent drop-path patterns.
    pub fn mode(&self, salt: u64) -> Mode {
        Mode::Train { key: selfsup_ops::rng::Rng::from_keys(&[self.key, salt]).next_u64() }
    }
}

pub trait Objective {
    /// Views consumed per image.
    fn num_views(&self) -> usize;
    /// views: `num_views` tensors (b, c, h, w) of the same images.
    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses>;
    /// Updates the untrained state (EMA target, queue) after the optimizer step.
    fn after_step(&mut self, progress: f64) -> Result<()>;
    /// The backbone being pretrained (for evaluation during or after the run).
    fn backbone(&self) -> &dyn Backbone;
    /// Untrained state, by name, for checkpoints.
    fn state(&self) -> Vec<(String, Tensor)>;
    fn load_state(&self, tensors: &HashMap<String, Tensor>) -> Result<()>;
    /// Scalars worth logging at `progress` (e.g. the EMA momentum).
    fn stats(&self, progress: f64) -> Vec<(&'static str, f64)>;
    /// Name prefixes of trainable parameters this objective's loss never reaches (built because
    /// the backbone has them, trained later, e.g. at fine-tuning). The trainer keeps them out
    /// of the optimizer; every other parameter must receive a gradient.
    fn untrained_params(&self) -> Vec<&'static str> {
        vec![]
    }
}

/// The `[objective]` table of a run config: one sub-table naming the method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ObjectiveConfig {
    Byol(byol::Config),
    Fcmae(fcmae::Config),
}

impl ObjectiveConfig {
    /// The objective id (`byol`, ...).
    pub fn id(&self) -> &'static str {
        match self {
            Self::Byol(_) => "byol",
            Self::Fcmae(_) => "fcmae",
        }
    }

    /// Views the objective consumes per image.
    pub fn num_views(&self) -> usize {
        match self {
            Self::Byol(_) => 2,
            Self::Fcmae(_) => 1,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Byol(c) => c.validate(),
            Self::Fcmae(c) => c.validate(),
        }
    }

    /// Builds the objective; trainable parameters are created in `online`.
    pub fn build(
        &self,
        model: &ModelConfig,
        online: &Vars,
        device: &candle_core::Device,
        seed: u64,
    ) -> Result<Box<dyn Objective>> {
        match self {
            Self::Byol(cfg) => Ok(Box::new(byol::Byol::new(cfg, model, online, device, seed)?)),
            Self::Fcmae(cfg) => Ok(Box::new(fcmae::Fcmae::new(cfg, model, online, device)?)),
        }
    }
}

/// The cosine EMA schedule of BYOL (and CARE, MoCo-style teachers):
/// `1 - (1 - base) * (cos(pi * progress) + 1) / 2`, from `base` at 0 to 1 at the end.
pub fn ema_momentum(base: f64, progress: f64) -> f64 {
    let p = progress.clamp(0.0, 1.0);
    1.0 - (1.0 - base) * ((std::f64::consts::PI * p).cos() + 1.0) / 2.0
}

/// Rows scaled to unit L2 norm. xs: (b, d).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&(xs.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_endpoints() {
        assert!((ema_momentum(0.996, 0.0) - 0.996).abs() < 1e-12);
        assert!((ema_momentum(0.996, 1.0) - 1.0).abs() < 1e-12);
        assert!((ema_momentum(0.99, 0.5) - 0.995).abs() < 1e-12);
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let ok: ObjectiveConfig = toml::from_str("[byol]\nproj_dim = 64\n").unwrap();
        assert_eq!(ok.id(), "byol");
        let e = toml::from_str::<ObjectiveConfig>("[byol]\nproj_dimm = 64\n").unwrap_err().to_string();
        assert!(e.contains("proj_dimm"), "{e}");
    }
}
