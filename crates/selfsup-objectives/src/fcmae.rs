//! FCMAE: the fully convolutional masked autoencoder of ConvNeXt V2 (Woo et al., CVPR 2023).
//!
//! Reference: `facebookresearch/ConvNeXt-V2@2553895` `models/fcmae.py` (METHODS.md 1.5).
//! - Mask: one flag per 32-px patch (the encoder's total stride, so the mask grid is the last
//!   stage's grid: 7x7 at 224), per sample `len_keep = int(L * (1 - mask_ratio))` patches kept,
//!   chosen uniformly at random (the reference's argsort of Gaussian noise draws a uniform random
//!   permutation; selfsup shuffles with a generator keyed by the step).
//! - Encoder: the ConvNeXt V2 backbone in its masked mode (`ConvNextV2::forward_masked`):
//!   sparse over visible sites, or masked-dense as the reference (`path`).
//! - Decoder: `proj` 1x1 conv (C -> 512), masked positions replaced by `mask_token`,
//!   `decoder_depth` dense ConvNeXt V2 blocks (no drop-path), `pred` 1x1 conv
//!   (512 -> 32 * 32 * in_chans).
//! - Loss: targets are the patchified images (`nchpwq -> nhwpqc`), normalised per patch when
//!   `norm_pix_loss` (the reference's default: `(t - mean) / sqrt(var + 1e-6)`, `var` unbiased as
//!   `torch.var`), MSE per patch averaged over the masked patches only.
//!
//! Choices:
//! - Names: `proj`, `mask_token`, `pred` as the reference; the encoder is `backbone.*` with
//!   timm names (it is the backbone that gets fine-tuned), the decoder blocks `decoder.i.*` with
//!   timm's block names (`conv_dw`, `norm`, `mlp.fc1`, `mlp.grn`, `mlp.fc2`), one name set for
//!   one block type. 1x1 convs keep the reference's `(out, in, 1, 1)` weight shapes.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Init;
use selfsup_models::convnextv2::{Block, ConvNextV2, MaskedPath};
use selfsup_models::{Backbone, Family, Mode, ModelConfig, Vars};
use selfsup_ops::rng::Rng;
use selfsup_ops::sparse::SiteMap;
use serde::{Deserialize, Serialize};

use crate::{Losses, Objective, Step};

/// The mask patch: the encoder's total stride.
pub const PATCH: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mask_ratio")]
    pub mask_ratio: f64,
    #[serde(default = "default_decoder_dim")]
    pub decoder_embed_dim: usize,
    #[serde(default = "default_decoder_depth")]
    pub decoder_depth: usize,
    #[serde(default = "default_true")]
    pub norm_pix_loss: bool,
    /// `sparse` (visible sites only) or `masked_dense` (the reference computation).
    #[serde(default = "default_path")]
    pub path: MaskedPath,
}

fn default_mask_ratio() -> f64 {
    0.6
}
fn default_decoder_dim() -> usize {
    512
}
fn default_decoder_depth() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_path() -> MaskedPath {
    MaskedPath::Sparse
}

impl Default for Config {
    /// The paper's: mask 0.6, one 512-wide decoder block, normalised-pixel loss, sparse encoder.
    fn default() -> Self {
        Self {
            mask_ratio: default_mask_ratio(),
            decoder_embed_dim: default_decoder_dim(),
            decoder_depth: default_decoder_depth(),
            norm_pix_loss: true,
            path: default_path(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.mask_ratio) {
            candle_core::bail!("objective.fcmae.mask_ratio: {} is outside [0, 1)", self.mask_ratio)
        }
        if self.decoder_embed_dim == 0 {
            candle_core::bail!("objective.fcmae.decoder_embed_dim must be positive")
        }
        Ok(())
    }
}

/// A 1x1 conv on channels-last maps, stored as the reference's `(out, in, 1, 1)` Conv2d.
struct Conv1x1 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1x1 {
    fn new(c_in: usize, c_out: usize, vb: selfsup_models::Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.params.get_with_hints((c_out, c_in, 1, 1), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?,
            bias: vb.params.get_with_hints(c_out, "bias", Init::Const(0.0))?,
        })
    }

    /// xs: (b, h, w, c_in) -> (b, h, w, c_out).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let o = self.weight.dim(0)?;
        let lin = selfsup_ops::linear::Linear::new(self.weight.reshape((o, c))?, Some(self.bias.clone()));
        lin.forward(&xs.reshape((b * h * w, c))?)?.reshape((b, h, w, o))
    }
}

/// One step's masks: `visible[b * L + l]` and the (b, L) f32 mask (1 = removed, the reference's).
pub struct PatchMask {
    pub visible: SiteMap,
    pub removed: Tensor,
}

/// FCMAE's random mask for a batch of `b` images on a `gh x gw` patch grid.
pub fn random_mask(b: usize, gh: usize, gw: usize, ratio: f64, key: u64, device: &Device) -> Result<PatchMask> {
    let l = gh * gw;
    let keep = (l as f64 * (1.0 - ratio)) as usize;
    if keep == 0 {
        candle_core::bail!(
            "fcmae: a {gh}x{gw} patch grid keeps int({l} * (1 - {ratio})) = 0 patches; use larger views \
             (a multiple of {PATCH} px) or a lower mask_ratio"
        )
    }
    let mut visible = vec![false; b * l];
    for (i, row) in visible.chunks_mut(l).enumerate() {
        let mut order: Vec<usize> = (0..l).collect();
        Rng::from_keys(&[key, 0xfc4a_e000, i as u64]).shuffle(&mut order);
        for &j in &order[..keep] {
            row[j] = true;
        }
    }
    let removed: Vec<f32> = visible.iter().map(|&v| if v { 0.0 } else { 1.0 }).collect();
    Ok(PatchMask {
        visible: SiteMap::from_visible(&visible, b, gh, gw)?,
        removed: Tensor::from_vec(removed, (b, l), device)?,
    })
}

/// (b, c, h, w) -> (b, L, p * p * c) in the reference's `nchpwq -> nhwpqc` order.
pub fn patchify(imgs: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = imgs.dims4()?;
    let (gh, gw) = (h / p, w / p);
    imgs.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 3, 5, 1))?.reshape((b, gh * gw, p * p * c))
}

/// Inverse of [`patchify`]: (b, L, p * p * c) on a `gh x gw` grid -> (b, c, gh * p, gw * p).
pub fn unpatchify(x: &Tensor, gh: usize, gw: usize, p: usize, c: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    x.reshape((b, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, gh * p, gw * p))
}

/// Per-patch normalisation of targets (b, L, d): `(t - mean) / sqrt(var + 1e-6)`, unbiased var.
/// Also returns (mean, std) to map predictions back to pixels.
pub fn normalize_patches(t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let d = t.dim(2)?;
    let mean = t.mean_keepdim(2)?;
    let centred = t.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(2)? / (d.max(2) - 1) as f64)?;
    let std = (var + 1e-6)?.sqrt()?;
    Ok((centred.broadcast_div(&std)?, mean, std))
}

pub struct Fcmae {
    cfg: Config,
    encoder: ConvNextV2,
    proj: Conv1x1,
    mask_token: Tensor,
    decoder: Vec<Block>,
    pred: Conv1x1,
    in_chans: usize,
}

/// What one masked forward produced (for the loss and for pictures).
pub struct Reconstruction {
    pub mask: PatchMask,
    /// (b, L, p * p * c): the decoder's output per patch (normalised pixels under `norm_pix_loss`).
    pub pred: Tensor,
    /// The targets the loss compares with, same layout.
    pub target: Tensor,
    /// Per-patch (mean, std) of the raw targets, (b, L, 1) each, when `norm_pix_loss`.
    pub stats: Option<(Tensor, Tensor)>,
}

impl Fcmae {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let Family::Convnextv2(mcfg) = model.family()? else {
            candle_core::bail!("objective fcmae needs a convnextv2_* backbone, got {:?}", model.arch)
        };
        let vb = online.vb(DType::F32, device);
        let encoder = ConvNextV2::new(&mcfg, vb.pp("backbone"))?;
        let d = cfg.decoder_embed_dim;
        let proj = Conv1x1::new(mcfg.num_features(), d, vb.pp("proj"))?;
        let mask_token =
            vb.params.get_with_hints((1, d, 1, 1), "mask_token", Init::Randn { mean: 0.0, stdev: 0.02 })?;
        let decoder = (0..cfg.decoder_depth)
            .map(|i| Block::new(d, 0.0, i as u64, vb.pp(format!("decoder.{i}"))))
            .collect::<Result<_>>()?;
        let pred = Conv1x1::new(d, PATCH * PATCH * model.in_chans, vb.pp("pred"))?;
        Ok(Self { cfg: cfg.clone(), encoder, proj, mask_token, decoder, pred, in_chans: model.in_chans })
    }

    /// Masks `imgs` (b, c, h, w) with the mask of `key`, encodes, decodes.
    pub fn reconstruct(&self, imgs: &Tensor, key: u64, mode: Mode) -> Result<Reconstruction> {
        let (b, c, h, w) = imgs.dims4()?;
        if c != self.in_chans || h % PATCH != 0 || w % PATCH != 0 {
            candle_core::bail!(
                "fcmae: views must be ({}, multiple of {PATCH}, multiple of {PATCH}) per image, got ({c}, {h}, {w})",
                self.in_chans
            )
        }
        let (gh, gw) = (h / PATCH, w / PATCH);
        let mask = random_mask(b, gh, gw, self.cfg.mask_ratio, key, imgs.device())?;
        let latent = self.encoder.forward_masked(imgs, &mask.visible, self.cfg.path, mode)?;
        let xs = self.proj.forward(&latent)?;
        let d = self.cfg.decoder_embed_dim;
        let removed = mask.removed.reshape((b, gh, gw, 1))?;
        let token = self.mask_token.reshape((1, 1, 1, d))?;
        let mut xs = (xs.broadcast_mul(&(1.0 - &removed)?)? + removed.broadcast_mul(&token)?)?;
        for block in &self.decoder {
            xs = block.forward(&xs, Mode::Eval)?;
        }
        let pred = self.pred.forward(&xs)?.reshape((b, gh * gw, PATCH * PATCH * c))?;
        let raw = patchify(imgs, PATCH)?;
        let (target, stats) = if self.cfg.norm_pix_loss {
            let (t, mean, std) = normalize_patches(&raw)?;
            (t, Some((mean, std)))
        } else {
            (raw, None)
        };
        Ok(Reconstruction { mask, pred, target, stats })
    }

    /// Mean over masked patches of the per-patch MSE.
    pub fn loss_of(r: &Reconstruction) -> Result<Tensor> {
        crate::masked_patch_mse(&r.pred, &r.target, &r.mask.removed)
    }

    pub fn encoder(&self) -> &ConvNextV2 {
        &self.encoder
    }
}

impl Objective for Fcmae {
    fn num_views(&self) -> usize {
        1
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [imgs] = views else { candle_core::bail!("fcmae needs 1 view, got {}", views.len()) };
        let r = self.reconstruct(imgs, step.key, step.mode(0))?;
        let total = Self::loss_of(&r)?;
        Ok(Losses { total, parts: vec![] })
    }

    fn backbone(&self) -> &dyn Backbone {
        &self.encoder
    }

    fn panel(&self, views: &[Tensor], key: u64) -> Result<Vec<crate::Column>> {
        let imgs = &views[0];
        let (_, _, h, w) = imgs.dims4()?;
        let r = self.reconstruct(imgs, key, Mode::Eval)?;
        crate::reconstruction_panel(
            imgs,
            &r.pred,
            &r.mask.removed,
            (h / PATCH, w / PATCH),
            PATCH,
            self.cfg.norm_pix_loss,
        )
    }

    /// The reference's sparse encoder has no head norm; the backbone's is trained at fine-tuning.
    fn untrained_params(&self) -> Vec<&'static str> {
        vec!["backbone.head."]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfsup_models::Arch;

    fn tiny(path: MaskedPath) -> (Fcmae, Vars) {
        let model = ModelConfig {
            arch: Arch::Convnextv2Atto,
            in_chans: 1,
            widths: Some(vec![8, 8, 16, 16]),
            drop_path_rate: 0.1,
            img_size: None,
            imagenet_stem: false,
            irpe: false,
        };
        let cfg = Config { decoder_embed_dim: 16, path, ..Config::default() };
        let online = Vars::new(5);
        (Fcmae::new(&cfg, &model, &online, &Device::Cpu).unwrap(), online)
    }

    #[test]
    fn mask_keeps_int_l_times_04_per_sample_and_is_keyed() {
        // METHODS.md 3: a 7x7 grid keeps 19 of 49.
        let m = random_mask(4, 7, 7, 0.6, 9, &Device::Cpu).unwrap();
        let removed = m.removed.to_vec2::<f32>().unwrap();
        for row in &removed {
            assert_eq!(row.iter().filter(|&&r| r == 0.0).count(), 19);
        }
        assert_ne!(removed[0], removed[1], "samples draw their own masks");
        let again = random_mask(4, 7, 7, 0.6, 9, &Device::Cpu).unwrap().removed.to_vec2::<f32>().unwrap();
        assert_eq!(removed, again);
        assert_ne!(removed, random_mask(4, 7, 7, 0.6, 10, &Device::Cpu).unwrap().removed.to_vec2::<f32>().unwrap());
        let e = random_mask(1, 1, 1, 0.6, 0, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("keeps int(1 * (1 - 0.6)) = 0"), "{e}");
    }

    #[test]
    fn patchify_round_trips_in_the_reference_order() {
        let imgs = Tensor::arange(0f32, 2. * 3. * 4. * 6., &Device::Cpu).unwrap().reshape((2, 3, 4, 6)).unwrap();
        let p = patchify(&imgs, 2).unwrap();
        assert_eq!(p.dims(), [2, 6, 12]);
        // Patch (0, 1) of image 0: pixels (y 0..2, x 2..4), channel fastest.
        let row = p.get(0).unwrap().get(1).unwrap().to_vec1::<f32>().unwrap();
        let at = |c: usize, y: usize, x: usize| (c * 24 + y * 6 + x) as f32;
        assert_eq!(&row[..4], &[at(0, 0, 2), at(1, 0, 2), at(2, 0, 2), at(0, 0, 3)]);
        let back = unpatchify(&p, 2, 3, 2, 3).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            imgs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn norm_pix_uses_the_unbiased_variance() {
        let t = Tensor::new(&[[[1f32, 2., 3., 4.]]], &Device::Cpu).unwrap();
        let (n, mean, std) = normalize_patches(&t).unwrap();
        let var = (2.25 + 0.25 + 0.25 + 2.25) / 3.0;
        assert!((std.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] - (var + 1e-6f32).sqrt()).abs() < 1e-6);
        assert_eq!(mean.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [2.5]);
        let got = n.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] + 1.5 / (var + 1e-6f32).sqrt()).abs() < 1e-6);
    }

    /// METHODS.md 3: decoder output per patch is 32 * 32 * c; the loss counts masked patches only;
    /// every trainable parameter gets a gradient; sparse and masked-dense give the same loss.
    #[test]
    fn shapes_masked_only_loss_gradients_and_paths_agree() {
        let (fcmae, online) = tiny(MaskedPath::Sparse);
        let imgs = Tensor::randn(0f32, 1., (2, 1, 96, 96), &Device::Cpu).unwrap();
        let r = fcmae.reconstruct(&imgs, 3, Mode::Train { key: 1 }).unwrap();
        assert_eq!(r.pred.dims(), [2, 9, 1024]);
        assert_eq!(r.mask.visible.len(), 2 * 3);
        let loss = Fcmae::loss_of(&r).unwrap();
        // Changing the prediction of a visible patch leaves the loss unchanged.
        let visible_patch = (0..9).find(|&l| r.mask.visible.is_visible(0, l / 3, l % 3)).unwrap();
        let mut bump = vec![0f32; 2 * 9 * 1024];
        bump[visible_patch * 1024..(visible_patch + 1) * 1024].fill(5.0);
        let bumped = Reconstruction {
            pred: (&r.pred + Tensor::from_vec(bump, (2, 9, 1024), &Device::Cpu).unwrap()).unwrap(),
            ..r
        };
        let l2 = Fcmae::loss_of(&bumped).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), l2);
        let total = fcmae.loss(std::slice::from_ref(&imgs), Step { progress: 0.0, key: 3 }).unwrap().total;
        let grads = total.backward().unwrap();
        let params = online.params.vars();
        // head.norm is not part of the encoder (it is trained at fine-tuning).
        let checked = params.iter().filter(|(n, _)| !n.starts_with("backbone.head."));
        selfsup_ops::testing::assert_every_var_has_grad(checked.map(|(n, v)| (n.as_str(), v)), &grads);

        let (dense, online2) = tiny(MaskedPath::MaskedDense);
        assert_eq!(online2.params.num_elements(), online.params.num_elements());
        let t2 = dense.loss(&[imgs], Step { progress: 0.0, key: 3 }).unwrap().total;
        let (a, b) = (total.to_scalar::<f32>().unwrap(), t2.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
}
