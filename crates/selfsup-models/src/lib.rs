//! selfsup-models: the backbones, as plain structs built from a [`store::Vb`].
//!
//! Models know no losses and do no I/O. Each backbone is one file with the reference's weight
//! names; [`ModelConfig`] is the explicit registry of what can be built from a run config.

pub mod convnextv2;
pub mod cvt;
pub mod layers;
pub mod mobile_former;
pub mod resnet;
pub mod segnetr;
pub mod store;
pub mod vit;

use std::collections::HashMap;

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
    /// xs: (b, c, h, w) -> the output map of every stage, NCHW, finest first (ResNet's layer1-4,
    /// ConvNeXt's four stages, CvT's three; a ViT has one stage, its patch map). The last entry
    /// is `forward_features`. For U-Net encoders and objectives that read an inner stage.
    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>>;
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
    Convnextv2Atto,
    Convnextv2Femto,
    Convnextv2Pico,
    Convnextv2Nano,
    Convnextv2Tiny,
    Convnextv2Base,
    Convnextv2Large,
    Convnextv2Huge,
    VitTinyPatch16,
    VitSmallPatch16,
    VitBasePatch16,
    VitTinyPatch8,
    VitSmallPatch8,
    VitBasePatch8,
    Cvt13,
    Cvt21,
    CvtW24,
    Mf26m,
    Mf52m,
    Mf96m,
    Mf151m,
    Mf214m,
    Mf294m,
    Mf508m,
}

impl Arch {
    /// The registry: every architecture, for tests and `selfsup info`.
    pub const ALL: &'static [Arch] = &[
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Convnextv2Atto,
        Arch::Convnextv2Femto,
        Arch::Convnextv2Pico,
        Arch::Convnextv2Nano,
        Arch::Convnextv2Tiny,
        Arch::Convnextv2Base,
        Arch::Convnextv2Large,
        Arch::Convnextv2Huge,
        Arch::VitTinyPatch16,
        Arch::VitSmallPatch16,
        Arch::VitBasePatch16,
        Arch::VitTinyPatch8,
        Arch::VitSmallPatch8,
        Arch::VitBasePatch8,
        Arch::Cvt13,
        Arch::Cvt21,
        Arch::CvtW24,
        Arch::Mf26m,
        Arch::Mf52m,
        Arch::Mf96m,
        Arch::Mf151m,
        Arch::Mf214m,
        Arch::Mf294m,
        Arch::Mf508m,
    ];
}

/// A resolved architecture: the family and its full config.
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    Resnet(resnet::Config),
    Convnextv2(convnextv2::Config),
    Vit(vit::Config),
    Cvt(cvt::Config),
    MobileFormer(mobile_former::Config),
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
    /// Input side the model is built for (ViT: its position embedding; default 224).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub img_size: Option<usize>,
    /// ResNet: timm's ImageNet stem (7x7/2 conv + max-pool) instead of the small-image 3x3/1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imagenet_stem: bool,
    /// ViT: LoMaR's iRPE contextual key bias in every block, and no absolute position embedding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub irpe: bool,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_in_chans() -> usize {
    3
}

impl ModelConfig {
    /// `arch` with `in_chans` input channels and these per-stage widths, everything else at its
    /// default (no drop-path; ResNet's small-image stem; ViT at 224 px without iRPE). The quick
    /// way to a narrow network for tests and examples.
    pub fn narrow(arch: Arch, in_chans: usize, widths: &[usize]) -> Self {
        Self {
            arch,
            in_chans,
            widths: Some(widths.to_vec()),
            drop_path_rate: 0.0,
            img_size: None,
            imagenet_stem: false,
            irpe: false,
        }
    }

    /// The full config of the configured architecture (widths and drop-path applied).
    pub fn family(&self) -> Result<Family> {
        let c = self.in_chans;
        let vit = matches!(
            self.arch,
            Arch::VitTinyPatch16
                | Arch::VitSmallPatch16
                | Arch::VitBasePatch16
                | Arch::VitTinyPatch8
                | Arch::VitSmallPatch8
                | Arch::VitBasePatch8
        );
        if self.irpe && !vit {
            candle_core::bail!("model.irpe applies to ViT architectures only, not {:?}", self.arch)
        }
        let widths = |cfg: convnextv2::Config| -> Result<convnextv2::Config> {
            let cfg = match &self.widths {
                Some(w) => cfg.with_widths(w)?,
                None => cfg,
            };
            cfg.with_drop_path_rate(self.drop_path_rate)
        };
        Ok(match self.arch {
            Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 => {
                let cfg = match self.arch {
                    Arch::Resnet18 => resnet::Config::resnet18(c),
                    Arch::Resnet34 => resnet::Config::resnet34(c),
                    _ => resnet::Config::resnet50(c),
                };
                let cfg = match &self.widths {
                    Some(w) => cfg.with_widths(w)?,
                    None => cfg,
                };
                let mut cfg = cfg.with_drop_path_rate(self.drop_path_rate)?;
                cfg.imagenet_stem = self.imagenet_stem;
                Family::Resnet(cfg)
            }
            Arch::Convnextv2Atto => Family::Convnextv2(widths(convnextv2::Config::atto(c))?),
            Arch::Convnextv2Femto => Family::Convnextv2(widths(convnextv2::Config::femto(c))?),
            Arch::Convnextv2Pico => Family::Convnextv2(widths(convnextv2::Config::pico(c))?),
            Arch::Convnextv2Nano => Family::Convnextv2(widths(convnextv2::Config::nano(c))?),
            Arch::Convnextv2Tiny => Family::Convnextv2(widths(convnextv2::Config::tiny(c))?),
            Arch::Convnextv2Base => Family::Convnextv2(widths(convnextv2::Config::base(c))?),
            Arch::Convnextv2Large => Family::Convnextv2(widths(convnextv2::Config::large(c))?),
            Arch::Convnextv2Huge => Family::Convnextv2(widths(convnextv2::Config::huge(c))?),
            Arch::VitTinyPatch16
            | Arch::VitSmallPatch16
            | Arch::VitBasePatch16
            | Arch::VitTinyPatch8
            | Arch::VitSmallPatch8
            | Arch::VitBasePatch8 => {
                let patch = if matches!(self.arch, Arch::VitTinyPatch8 | Arch::VitSmallPatch8 | Arch::VitBasePatch8) {
                    8
                } else {
                    16
                };
                let size = self.img_size.unwrap_or(224);
                let mut cfg = match self.arch {
                    Arch::VitTinyPatch16 | Arch::VitTinyPatch8 => vit::Config::tiny(patch, size, c),
                    Arch::VitSmallPatch16 | Arch::VitSmallPatch8 => vit::Config::small(patch, size, c),
                    _ => vit::Config::base(patch, size, c),
                };
                if let Some(w) = &self.widths {
                    // (embed_dim, depth, heads): a narrow ViT of the same family.
                    let [d, depth, heads] = w[..] else {
                        candle_core::bail!("vit: `widths` is [embed_dim, depth, num_heads], got {w:?}")
                    };
                    (cfg.embed_dim, cfg.depth, cfg.num_heads) = (d, depth, heads);
                }
                cfg.drop_path_rate = self.drop_path_rate;
                cfg.irpe = self.irpe;
                cfg.validate()?;
                Family::Vit(cfg)
            }
            Arch::Cvt13 | Arch::Cvt21 | Arch::CvtW24 => {
                let mut cfg = match self.arch {
                    Arch::Cvt13 => cvt::Config::cvt13(c),
                    Arch::Cvt21 => cvt::Config::cvt21(c),
                    _ => cvt::Config::cvt_w24(c),
                };
                if let Some(w) = &self.widths {
                    if w.len() != 3 || w.contains(&0) {
                        candle_core::bail!("cvt: `widths` needs 3 positive stage dims, got {w:?}")
                    }
                    cfg.embed_dim = w.clone();
                    // Keep every head at least one channel wide.
                    cfg.num_heads = cfg.num_heads.iter().zip(w).map(|(&h, &d)| h.min(d).max(1)).collect();
                    cfg.num_heads =
                        cfg.num_heads.iter().zip(w).map(|(&h, &d)| if d % h == 0 { h } else { 1 }).collect();
                }
                if self.drop_path_rate > 0.0 {
                    cfg.drop_path_rate = vec![0.0, 0.0, self.drop_path_rate];
                }
                Family::Cvt(cfg)
            }
            Arch::Mf26m | Arch::Mf52m | Arch::Mf96m | Arch::Mf151m | Arch::Mf214m | Arch::Mf294m | Arch::Mf508m => {
                if let Some(w) = &self.widths {
                    candle_core::bail!(
                        "mobile_former: `widths` is not supported (got {w:?}); the seven variants mf26m..mf508m \
                         are the narrow and wide networks"
                    )
                }
                let cfg = match self.arch {
                    Arch::Mf26m => mobile_former::Config::mf26m(c),
                    Arch::Mf52m => mobile_former::Config::mf52m(c),
                    Arch::Mf96m => mobile_former::Config::mf96m(c),
                    Arch::Mf151m => mobile_former::Config::mf151m(c),
                    Arch::Mf214m => mobile_former::Config::mf214m(c),
                    Arch::Mf294m => mobile_former::Config::mf294m(c),
                    _ => mobile_former::Config::mf508m(c),
                };
                Family::MobileFormer(cfg.with_drop_path_rate(self.drop_path_rate)?)
            }
        })
    }

    /// (trainable parameters without a classifier, multiply-accumulates of one forward at
    /// `size x size`), counted from the config without building the model. ViT counts at its
    /// own `img_size`.
    pub fn cost(&self, size: usize) -> Result<(usize, usize)> {
        Ok(match self.family()? {
            Family::Resnet(cfg) => cfg.cost(size),
            Family::Convnextv2(cfg) => (cfg.num_params(0), cfg.macs(size)),
            Family::Vit(cfg) => (cfg.num_params(0), cfg.macs()),
            Family::Cvt(cfg) => (cfg.num_params(0), cfg.macs(size)),
            // Counted without the final classifier Linear (its pre-logits `fc` is included).
            Family::MobileFormer(cfg) => (cfg.num_params(0), cfg.macs(size)),
        })
    }

    /// Total downsampling of the configured network.
    pub fn stride(&self) -> Result<usize> {
        Ok(match self.family()? {
            Family::Resnet(cfg) => cfg.stride(),
            Family::Convnextv2(_) => 32,
            Family::Vit(cfg) => cfg.patch_size,
            Family::Cvt(cfg) => cfg.patch.iter().map(|p| p[1]).product(),
            Family::MobileFormer(_) => 32,
        })
    }

    /// What an input side must be a multiple of. ResNet's padded convolutions and pooling take
    /// any side (each stride-2 layer rounds up, so 28 px gives a 4x4 map at stride 8; a test
    /// holds this). The others keep their total stride: ViT and CvT need whole patches,
    /// ConvNeXt V2's patchify stem (and FCMAE's 32-px mask grid) whole cells, and Mobile-Former
    /// has not been checked at other sides.
    pub fn size_multiple(&self) -> Result<usize> {
        Ok(match self.family()? {
            Family::Resnet(_) => 1,
            _ => self.stride()?,
        })
    }

    pub fn build(&self, vb: Vb) -> Result<Box<dyn Backbone>> {
        if self.in_chans == 0 {
            candle_core::bail!("model.in_chans must be positive")
        }
        Ok(match self.family()? {
            Family::Resnet(cfg) => Box::new(resnet::ResNet::new(&cfg, vb)?),
            Family::Convnextv2(cfg) => Box::new(convnextv2::ConvNextV2::new(&cfg, vb)?),
            Family::Vit(cfg) => Box::new(vit::Vit::new(&cfg, vb)?),
            Family::Cvt(cfg) => Box::new(cvt::Cvt::new(&cfg, vb)?),
            Family::MobileFormer(cfg) => Box::new(mobile_former::MobileFormer::new(&cfg, vb)?),
        })
    }
}

/// A reference state_dict (timm names; HF transformers for CvT; AAboys/MobileFormer for
/// Mobile-Former) sorted for a selfsup model.
pub struct ReferenceWeights {
    /// Backbone variables under selfsup's names (parameters and buffers).
    pub backbone: HashMap<String, Tensor>,
    /// The classifier `(weight (classes, features), bias (classes,))`, when the state_dict has one.
    pub classifier: Option<(Tensor, Tensor)>,
    /// Keys that have no place in the model (neither backbone, classifier nor bookkeeping such
    /// as `num_batches_tracked`).
    pub unused: Vec<String>,
}

impl ModelConfig {
    /// The classifier's names in the reference implementation of this family.
    pub fn reference_head_names(&self) -> Result<(&'static str, &'static str)> {
        Ok(match self.family()? {
            Family::Resnet(_) => ("fc.weight", "fc.bias"),
            Family::Convnextv2(_) => ("head.fc.weight", "head.fc.bias"),
            Family::Vit(_) => ("head.weight", "head.bias"),
            Family::Cvt(_) => ("classifier.weight", "classifier.bias"),
            Family::MobileFormer(_) => ("classifier.classifier.1.weight", "classifier.classifier.1.bias"),
        })
    }

    /// Sorts a reference state_dict: each family's `remap_key` (and ConvNeXt's `remap_tensor`)
    /// for the backbone, the classifier by its reference names, the rest reported as unused.
    pub fn map_reference_weights(&self, tensors: HashMap<String, Tensor>) -> Result<ReferenceWeights> {
        let family = self.family()?;
        let (hw, hb) = self.reference_head_names()?;
        let mut backbone = HashMap::new();
        let mut unused = Vec::new();
        let (mut weight, mut bias) = (None, None);
        for (key, t) in tensors {
            let stripped = key.strip_prefix("cvt.").unwrap_or(&key);
            if key == hw || stripped == hw {
                weight = Some(t);
                continue;
            }
            if key == hb || stripped == hb {
                bias = Some(t);
                continue;
            }
            let mapped = match &family {
                Family::Resnet(_) => resnet::remap_key(&key),
                Family::Convnextv2(_) => convnextv2::remap_key(&key),
                Family::Vit(_) => vit::remap_key(&key),
                Family::Cvt(_) => cvt::remap_key(&key),
                Family::MobileFormer(_) => mobile_former::remap_key(&key),
            };
            match mapped {
                Some(name) => {
                    let t =
                        if matches!(family, Family::Convnextv2(_)) { convnextv2::remap_tensor(&name, t)? } else { t };
                    backbone.insert(name, t);
                }
                None if key.ends_with("num_batches_tracked") => {}
                None => unused.push(key),
            }
        }
        let classifier = match (weight, bias) {
            (Some(w), Some(b)) => Some((w, b)),
            (None, None) => None,
            _ => candle_core::bail!("the state_dict has only one of `{hw}` and `{hb}`"),
        };
        unused.sort();
        Ok(ReferenceWeights { backbone, classifier, unused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cfg_family(arch: Arch) -> &'static str {
        let name = format!("{arch:?}");
        if name.starts_with("Vit") {
            "vit"
        } else if name.starts_with("Mf") {
            "mobile_former"
        } else {
            "conv"
        }
    }

    /// Every registered architecture, narrow: forward + backward are finite and every
    /// parameter receives a gradient (catches ops that silently drop gradients). Mobile-Former
    /// has no narrow form: its seven variants run at full width on 64x64 inputs (about 8 s in
    /// all in a debug build).
    #[test]
    fn every_arch_trains_and_every_param_gets_a_gradient() {
        for &arch in Arch::ALL {
            let vit = matches!(cfg_family(arch), "vit");
            let cvt = format!("{arch:?}").starts_with("Cvt");
            let mf = matches!(cfg_family(arch), "mobile_former");
            let widths = if vit {
                vec![8, 2, 2]
            } else if cvt {
                vec![8, 12, 16]
            } else {
                vec![2, 4, 4, 4]
            };
            let cfg = ModelConfig {
                arch,
                in_chans: 1,
                widths: (!mf).then_some(widths),
                drop_path_rate: 0.1,
                img_size: Some(32),
                imagenet_stem: false,
                irpe: false,
            };
            let vars = Vars::new(1);
            let m = cfg.build(vars.vb(DType::F32, &Device::Cpu)).unwrap();
            let size = if vit {
                32
            } else if cvt || mf {
                64
            } else {
                cfg.stride().unwrap().max(8)
            };
            let xs = Tensor::randn(0f32, 1., (2, 1, size, size), &Device::Cpu).unwrap();
            // Per-stage maps: finest first, the last one is `forward_features`.
            let stages = m.forward_stages(&xs, Mode::Eval).unwrap();
            let want = if vit {
                1
            } else if cvt {
                3
            } else if mf {
                5
            } else {
                4
            };
            assert_eq!(stages.len(), want, "{arch:?}");
            let last = m.forward_features(&xs, Mode::Eval).unwrap();
            assert_eq!(stages[want - 1].dims(), last.dims(), "{arch:?}");
            let diff = (&stages[want - 1] - &last).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{arch:?}");
            assert!(stages.windows(2).all(|w| w[0].dim(2).unwrap() >= w[1].dim(2).unwrap()), "{arch:?}");
            // Pooled features and the final map: in CvT's last block only the class token reaches
            // the pooled output, so the map's tokens are needed to reach every parameter.
            let pooled = m.forward_pooled(&xs, Mode::Train { key: 3 }).unwrap().sqr().unwrap().sum_all().unwrap();
            let map = m.forward_features(&xs, Mode::Train { key: 3 }).unwrap().sqr().unwrap().mean_all().unwrap();
            let loss = (pooled + map).unwrap();
            assert!(loss.to_scalar::<f32>().unwrap().is_finite(), "{arch:?}");
            let grads = loss.backward().unwrap();
            let params = vars.params.vars();
            // A key bias adds the same amount to every score of a query, which softmax cancels:
            // its gradient is exactly zero by construction (CvT keeps it, as the reference does).
            // Likewise Mobile-Former's Former->Mobile key bias, and the bias of the Linear in front
            // of its pre-logits BatchNorm1d, which the batch mean of training mode removes.
            let exempt = ["projection_key.bias", "global_local.k.bias", "classifier.fc.0.bias"];
            let checked = params.iter().filter(|(n, _)| !exempt.iter().any(|e| n.ends_with(e)));
            selfsup_ops::testing::assert_every_var_has_grad(checked.map(|(n, v)| (n.as_str(), v)), &grads);
        }
    }
}
