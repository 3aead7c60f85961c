//! BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).
//!
//! Reference: the paper's appendix (and solo-learn's `byol.py` for the small-scale recipe).
//! Online network = backbone + projector + predictor; target = EMA of backbone + projector,
//! momentum on a cosine schedule from `base_momentum` to 1 (METHODS.md 1.8). Loss
//! `2 - 2 cos(p1, sg(z2)) + 2 - 2 cos(p2, sg(z1))`, views forwarded separately (each view's
//! own BatchNorm statistics, as in the paper). Heads are `Linear-BN-ReLU-Linear`, named like
//! PyTorch `nn.Sequential` (`projector.0`, `projector.1`, `projector.3`).
//!
//! Choices: the target starts as a copy of the online network; its BatchNorm running
//! statistics are its own (only parameters are averaged), as in the common implementations.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use selfsup_models::layers::{linear, BatchNorm};
use selfsup_models::{Backbone, Mode, ModelConfig, Vars, Vb};
use serde::{Deserialize, Serialize};

use crate::{ema_momentum, l2_normalize, Losses, Objective, Step, Teacher};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Hidden width of the projector and predictor MLPs.
    #[serde(default = "default_hidden")]
    pub proj_hidden: usize,
    /// Output width of the projector and predictor.
    #[serde(default = "default_dim")]
    pub proj_dim: usize,
    /// EMA momentum at the start of training (goes to 1 on a cosine).
    #[serde(default = "default_momentum")]
    pub base_momentum: f64,
}

fn default_hidden() -> usize {
    4096
}
fn default_dim() -> usize {
    256
}
fn default_momentum() -> f64 {
    0.996
}

impl Default for Config {
    /// The paper's heads (4096 -> 256) and momentum 0.996.
    fn default() -> Self {
        Self { proj_hidden: default_hidden(), proj_dim: default_dim(), base_momentum: default_momentum() }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.proj_hidden == 0 || self.proj_dim == 0 {
            candle_core::bail!("objective.byol: proj_hidden and proj_dim must be positive")
        }
        if !(0.0..=1.0).contains(&self.base_momentum) {
            candle_core::bail!("objective.byol.base_momentum: {} is outside [0, 1]", self.base_momentum)
        }
        Ok(())
    }
}

/// `Linear - BatchNorm1d - ReLU - Linear` (also CARE's heads).
pub(crate) struct Mlp {
    fc1: selfsup_ops::linear::Linear,
    bn: BatchNorm,
    fc2: selfsup_ops::linear::Linear,
}

impl Mlp {
    pub(crate) fn new(d_in: usize, hidden: usize, d_out: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            fc1: linear(d_in, hidden, true, vb.pp("0"))?,
            bn: BatchNorm::new(hidden, vb.pp("1"))?,
            fc2: linear(hidden, d_out, true, vb.pp("3"))?,
        })
    }

    /// xs: (b, d_in) -> (b, d_out); always in training mode (batch statistics).
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.bn.forward_relu_t(&self.fc1.forward(xs)?, true)?;
        self.fc2.forward(&xs)
    }
}

pub struct Byol {
    cfg: Config,
    online: Box<dyn Backbone>,
    projector: Mlp,
    predictor: Mlp,
    target: Box<dyn Backbone>,
    target_projector: Mlp,
    teacher: Teacher,
}

impl Byol {
    /// Creates the online network in `online` (`backbone.*`, `projector.*`, `predictor.*`)
    /// and the target in a store of its own (`backbone.*`, `projector.*`), copied from online.
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let vb = online.vb(DType::F32, device);
        let backbone = model.build(vb.pp("backbone"))?;
        let d = backbone.num_features();
        let projector = Mlp::new(d, cfg.proj_hidden, cfg.proj_dim, vb.pp("projector"))?;
        let predictor = Mlp::new(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, vb.pp("predictor"))?;
        let teacher = Teacher::new(online, seed);
        let tvb = teacher.vars.vb(DType::F32, device);
        let target = ModelConfig { drop_path_rate: 0.0, ..model.clone() }.build(tvb.pp("backbone"))?;
        let target_projector = Mlp::new(d, cfg.proj_hidden, cfg.proj_dim, tvb.pp("projector"))?;
        teacher.start("byol")?;
        Ok(Self { cfg: cfg.clone(), online: backbone, projector, predictor, target, target_projector, teacher })
    }

    fn forward_online(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let z = self.projector.forward(&self.online.forward_pooled(xs, mode)?)?;
        self.predictor.forward(&z)
    }

    /// The target runs in training mode (batch statistics, as BYOL's) but never drops paths:
    /// it is built with `drop_path_rate = 0`.
    fn forward_target(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.target_projector.forward(&self.target.forward_pooled(xs, Mode::Train { key: 0 })?)?.detach())
    }
}

/// Mean over the batch of `2 - 2 cos(p, z)`. p, z: (b, d).
pub fn regression_loss(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    let cos = (l2_normalize(p)? * l2_normalize(z)?)?.sum(1)?;
    (2.0 - (cos * 2.0)?)?.mean_all()
}

impl Objective for Byol {
    fn num_views(&self) -> usize {
        2
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [v1, v2] = views else { candle_core::bail!("byol needs 2 views, got {}", views.len()) };
        let (p1, p2) = (self.forward_online(v1, step.mode(0))?, self.forward_online(v2, step.mode(1))?);
        let (z1, z2) = (self.forward_target(v1)?, self.forward_target(v2)?);
        let l12 = regression_loss(&p1, &z2)?;
        let l21 = regression_loss(&p2, &z1)?;
        let total = (&l12 + &l21)?;
        Ok(Losses { total, parts: vec![("loss_12", l12), ("loss_21", l21)] })
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        self.teacher.update(ema_momentum(self.cfg.base_momentum, progress))
    }

    fn backbone(&self) -> &dyn Backbone {
        self.online.as_ref()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.teacher.state()
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.teacher.load(tensors)
    }

    fn stats(&self, progress: f64) -> Vec<(&'static str, f64)> {
        vec![("momentum", ema_momentum(self.cfg.base_momentum, progress))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Byol, Vars) {
        let model = crate::tests::tiny_resnet();
        let cfg = Config { proj_hidden: 16, proj_dim: 8, base_momentum: 0.9 };
        let online = Vars::new(3);
        (Byol::new(&cfg, &model, &online, &Device::Cpu, 3).unwrap(), online)
    }

    #[test]
    fn loss_is_in_range_and_every_online_param_gets_a_gradient() {
        let (byol, online) = tiny();
        let v1 = Tensor::randn(0f32, 1., (4, 1, 8, 8), &Device::Cpu).unwrap();
        let v2 = Tensor::randn(0f32, 1., (4, 1, 8, 8), &Device::Cpu).unwrap();
        let l = byol.loss(&[v1, v2], Step { progress: 0.0, key: 0 }).unwrap();
        let total = l.total.to_scalar::<f32>().unwrap();
        assert!((0.0..=8.0).contains(&total), "{total}");
        let grads = l.total.backward().unwrap();
        for (name, var) in online.params.vars() {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
        assert!(byol.loss(std::slice::from_ref(&l.total), Step { progress: 0.0, key: 0 }).is_err());
    }

    #[test]
    fn target_starts_as_copy_and_follows_the_ema() {
        let (mut byol, online) = tiny();
        let name = "backbone.conv1.weight";
        let t0 =
            byol.teacher.vars.params.get(name).unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let o = online.params.get(name).unwrap();
        assert_eq!(t0, o.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        o.set(&o.as_tensor().ones_like().unwrap()).unwrap();
        byol.after_step(0.0).unwrap(); // tau = 0.9
        let t1 =
            byol.teacher.vars.params.get(name).unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in t1.iter().zip(&t0) {
            assert!((a - (0.9 * b + 0.1)).abs() < 1e-6);
        }
        assert!(byol.state().iter().all(|(k, _)| k.starts_with("target.")));
    }
}
