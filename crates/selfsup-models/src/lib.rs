//! selfsup-models: the backbones, as plain structs built from a [`store::Vb`].
//!
//! Models know no losses and do no I/O. Each backbone is one file with the reference's weight
//! names; [`ModelConfig`] is the explicit registry of what can be built from a run config.

pub mod layers;
pub mod resnet;
pub mod store;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub use store::{VarStore, Vars, Vb};

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inference: BatchNorm uses its running statistics; stochastic layers are the identity.
    Eval,
    /// Training: BatchNorm normalises with batch statistics and updates its running ones;
    /// stochastic layers (drop-path) draw from generators keyed by `key` and the layer, so a
    /// training forward is a pure function of its input and `key` (the trainer derives `key`
    /// from the seed and the step, so a resumed run draws what the uninterrupted one drew).
    Train { key: u64 },
}

impl Mode {
    pub fn is_train(self) -> bool {
        matches!(self, Mode::Train { .. })
    }
}

/// What evaluation and the generic objectives need from any backbone.
pub trait Backbone: Send + Sync {
    /// xs: (b, c, h, w) -> final feature map (b, c', h', w').
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor>;
    /// xs: (b, c, h, w) -> globally pooled features (b, num_features).
    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor>;
    fn num_features(&self) -> usize;
    /// Total downsampling; input sizes must be multiples of it.
    fn stride(&self) -> usize;
}

/// Backbone architectures (timm's ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Arch {
    /// The registry: every architecture, for tests and `selfsup info`.
    pub const ALL: &'static [Arch] = &[Arch::Resnet18, Arch::Resnet34, Arch::Resnet50];
}

/// The `[model]` table of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// Per-stage widths replacing the paper's (a narrow network of the same topology).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widths: Option<Vec<usize>>,
    /// Stochastic depth: the largest per-sample drop probability of a residual branch, reached
    /// by the last block (timm's linear rule). 0 in pretraining unless a recipe says otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_path_rate: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_in_chans() -> usize {
    3
}

impl ModelConfig {
    pub fn resnet_config(&self) -> Result<resnet::Config> {
        let cfg = match self.arch {
            Arch::Resnet18 => resnet::Config::resnet18(self.in_chans),
            Arch::Resnet34 => resnet::Config::resnet34(self.in_chans),
            Arch::Resnet50 => resnet::Config::resnet50(self.in_chans),
        };
        let cfg = match &self.widths {
            Some(w) => cfg.with_widths(w)?,
            None => cfg,
        };
        cfg.with_drop_path_rate(self.drop_path_rate)
    }

    /// Total downsampling of the configured network.
    pub fn stride(&self) -> Result<usize> {
        Ok(self.resnet_config()?.stride())
    }

    pub fn build(&self, vb: Vb) -> Result<Box<dyn Backbone>> {
        if self.in_chans == 0 {
            candle_core::bail!("model.in_chans must be positive")
        }
        Ok(Box::new(resnet::ResNet::new(&self.resnet_config()?, vb)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Every registered architecture, narrow: forward + backward are finite and every
    /// parameter receives a gradient (catches ops that silently drop gradients).
    #[test]
    fn every_arch_trains_and_every_param_gets_a_gradient() {
        for &arch in Arch::ALL {
            let cfg = ModelConfig { arch, in_chans: 1, widths: Some(vec![2, 4, 4, 4]), drop_path_rate: 0.1 };
            let vars = Vars::new(1);
            let m = cfg.build(vars.vb(DType::F32, &Device::Cpu)).unwrap();
            let xs = Tensor::randn(0f32, 1., (2, 1, 8, 8), &Device::Cpu).unwrap();
            let loss = m.forward_pooled(&xs, Mode::Train { key: 3 }).unwrap().sqr().unwrap().sum_all().unwrap();
            assert!(loss.to_scalar::<f32>().unwrap().is_finite(), "{arch:?}");
            let grads = loss.backward().unwrap();
            let params = vars.params.vars();
            selfsup_ops::testing::assert_every_var_has_grad(params.iter().map(|(n, v)| (n.as_str(), v)), &grads);
        }
    }
}
