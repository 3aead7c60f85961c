//! MAE: masked autoencoders (He et al., CVPR 2022), the baseline LoMaR changes.
//!
//! Reference: `facebookresearch/mae@efb2a80` `models_mae.py` (METHODS.md 1.8).
//! - Encoder: the ViT backbone with MAE's *fixed* 2-D sin-cos position embedding (written into
//!   `backbone.pos_embed` at build time and kept out of the optimizer, as the reference's
//!   `requires_grad=False`), run on the class token and the visible 25 % of the patches
//!   (`len_keep = int(L * (1 - 0.75))` per sample, uniformly at random).
//! - Decoder: `decoder_embed` Linear(d, 512), `mask_token` at the masked positions, fixed sin-cos
//!   `decoder_pos_embed`, 8 pre-norm blocks of width 512 with 16 heads (`decoder_blocks.i`, timm
//!   block names), `decoder_norm`, `decoder_pred` Linear(512, p * p * c); the class token is
//!   dropped after the decoder.
//! - Loss: per-patch normalised pixels (`norm_pix_loss`, unbiased variance), MSE per patch, mean
//!   over the masked patches.
//!
//! Choices: the reference keeps visible tokens in the (random) order of its argsort; selfsup keeps
//! them in raster order. Attention is permutation-equivariant and the decoder restores the order,
//! so the loss is the same function of the kept set. Linear layers keep timm's init
//! (trunc-normal 0.02) where the reference uses Xavier-uniform.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Init;
use selfsup_models::layers::{linear_trunc_normal, LayerNorm};
use selfsup_models::vit::{sincos_pos_embed_2d, Block, Vit};
use selfsup_models::{Backbone, Family, Mode, ModelConfig, Vars};
use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::fcmae::{normalize_patches, patchify};
use crate::{Losses, Objective, Step};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_ratio")]
    pub mask_ratio: f64,
    #[serde(default = "default_dim")]
    pub decoder_embed_dim: usize,
    #[serde(default = "default_depth")]
    pub decoder_depth: usize,
    #[serde(default = "default_heads")]
    pub decoder_num_heads: usize,
    #[serde(default = "default_true")]
    pub norm_pix_loss: bool,
}

fn default_ratio() -> f64 {
    0.75
}
fn default_dim() -> usize {
    512
}
fn default_depth() -> usize {
    8
}
fn default_heads() -> usize {
    16
}
fn default_true() -> bool {
    true
}

impl Default for Config {
    /// The paper's: mask 0.75, an 8-block 512-d decoder with 16 heads, normalised pixels.
    fn default() -> Self {
        Self { mask_ratio: 0.75, decoder_embed_dim: 512, decoder_depth: 8, decoder_num_heads: 16, norm_pix_loss: true }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.mask_ratio) {
            candle_core::bail!("objective.mae.mask_ratio: {} is outside [0, 1)", self.mask_ratio)
        }
        if self.decoder_num_heads == 0 || !self.decoder_embed_dim.is_multiple_of(self.decoder_num_heads) {
            candle_core::bail!(
                "objective.mae: decoder_embed_dim {} must be a positive multiple of decoder_num_heads {}",
                self.decoder_embed_dim,
                self.decoder_num_heads
            )
        }
        if !self.decoder_embed_dim.is_multiple_of(4) {
            candle_core::bail!("objective.mae.decoder_embed_dim must be a multiple of 4 (sin-cos position embedding)")
        }
        Ok(())
    }
}

/// Per sample, the kept patch indices (ascending), `int(l * (1 - ratio))` of `l`, keyed.
pub fn keep_indices(b: usize, l: usize, ratio: f64, key: u64) -> Result<Vec<Vec<u32>>> {
    let keep = (l as f64 * (1.0 - ratio)) as usize;
    if keep == 0 {
        candle_core::bail!("mae: int({l} * (1 - {ratio})) = 0 patches kept; use larger views or a lower mask_ratio")
    }
    Ok((0..b)
        .map(|i| {
            let mut order: Vec<u32> = (0..l as u32).collect();
            Rng::from_keys(&[key, 0x3ae, i as u64]).shuffle(&mut order);
            let mut kept = order[..keep].to_vec();
            kept.sort_unstable();
            kept
        })
        .collect())
}

pub struct Mae {
    cfg: Config,
    encoder: Vit,
    decoder_embed: selfsup_ops::linear::Linear,
    mask_token: Tensor,
    decoder_pos: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: selfsup_ops::linear::Linear,
    grid: (usize, usize),
    patch: usize,
}

impl Mae {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let Family::Vit(vcfg) = model.family()? else {
            candle_core::bail!("objective mae needs a vit_* backbone, got {:?}", model.arch)
        };
        if vcfg.irpe {
            candle_core::bail!("objective mae uses absolute position embeddings; set `model.irpe = false`")
        }
        let vb = online.vb(DType::F32, device);
        let encoder = Vit::new(&vcfg, vb.pp("backbone"))?;
        let g = vcfg.img_size / vcfg.patch_size;
        let (d, dd) = (vcfg.embed_dim, cfg.decoder_embed_dim);
        let pos = online.params.get("backbone.pos_embed").expect("the ViT without iRPE has pos_embed");
        pos.set(&Tensor::from_vec(sincos_pos_embed_2d(d, g, g, true)?, (1, g * g + 1, d), device)?)?;
        let decoder_pos = Tensor::from_vec(sincos_pos_embed_2d(dd, g, g, true)?, (1, g * g + 1, dd), device)?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| Block::new(dd, cfg.decoder_num_heads, false, 0.0, i as u64, vb.pp(format!("decoder_blocks.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder_embed: linear_trunc_normal(d, dd, vb.pp("decoder_embed"))?,
            mask_token: vb.params.get_with_hints((1, 1, dd), "mask_token", Init::Randn { mean: 0.0, stdev: 0.02 })?,
            decoder_pos,
            decoder_blocks,
            decoder_norm: LayerNorm::new(dd, 1e-6, vb.pp("decoder_norm"))?,
            decoder_pred: linear_trunc_normal(
                dd,
                vcfg.patch_size * vcfg.patch_size * vcfg.in_chans,
                vb.pp("decoder_pred"),
            )?,
            grid: (g, g),
            patch: vcfg.patch_size,
        })
    }

    /// (prediction (b, L, p p c), target, removed (b, L): 1 = masked).
    pub fn reconstruct(&self, imgs: &Tensor, key: u64, mode: Mode) -> Result<(Tensor, Tensor, Tensor)> {
        let b = imgs.dim(0)?;
        let l = self.grid.0 * self.grid.1;
        let dev = imgs.device();
        let kept = keep_indices(b, l, self.cfg.mask_ratio, key)?;
        let keep = kept[0].len();
        let pos = self.encoder.pos_embed().expect("MAE's encoder has pos_embed");
        let patches = self.encoder.patch_embed(imgs)?.broadcast_add(&pos.narrow(1, 1, l)?)?;
        let d = patches.dim(2)?;
        let rows: Vec<u32> =
            kept.iter().enumerate().flat_map(|(i, k)| k.iter().map(move |&j| (i * l) as u32 + j)).collect();
        let visible = patches.reshape((b * l, d))?.index_select(&Tensor::from_vec(rows, b * keep, dev)?, 0)?;
        let tokens = Tensor::cat(&[&self.encoder.cls_with_pos(b)?, &visible.reshape((b, keep, d))?], 1)?;
        let latent = self.encoder.encode(&tokens, self.grid, mode)?;
        // Decoder: embed, then every position takes its visible token or the mask token.
        let dd = self.cfg.decoder_embed_dim;
        let x = self.decoder_embed.forward(&latent.reshape((b * (keep + 1), d))?)?;
        let pool = Tensor::cat(&[&x, &self.mask_token.reshape((1, dd))?], 0)?;
        let mask_row = (b * (keep + 1)) as u32;
        let mut removed = vec![1f32; b * l];
        let mut order = Vec::with_capacity(b * (l + 1));
        for (i, k) in kept.iter().enumerate() {
            let base = (i * (keep + 1)) as u32;
            order.push(base); // class token
            let mut next = 0;
            for j in 0..l {
                if next < keep && k[next] as usize == j {
                    order.push(base + 1 + next as u32);
                    removed[i * l + j] = 0.0;
                    next += 1;
                } else {
                    order.push(mask_row);
                }
            }
        }
        let full = pool.index_select(&Tensor::from_vec(order, b * (l + 1), dev)?, 0)?.reshape((b, l + 1, dd))?;
        let mut xs = full.broadcast_add(&self.decoder_pos)?;
        for block in &self.decoder_blocks {
            xs = block.forward(&xs, None, Mode::Eval)?;
        }
        let xs = self.decoder_norm.forward(&xs)?.narrow(1, 1, l)?;
        let pred = self.decoder_pred.forward(&xs.reshape((b * l, dd))?)?.reshape((b, l, ()))?;
        let target = patchify(imgs, self.patch)?;
        let target = if self.cfg.norm_pix_loss { normalize_patches(&target)?.0 } else { target };
        Ok((pred, target, Tensor::from_vec(removed, (b, l), dev)?))
    }
}

impl Objective for Mae {
    fn num_views(&self) -> usize {
        1
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [imgs] = views else { candle_core::bail!("mae needs 1 view, got {}", views.len()) };
        let (pred, target, removed) = self.reconstruct(imgs, step.key, step.mode(0))?;
        let total = crate::masked_patch_mse(&pred, &target, &removed)?;
        Ok(Losses { total, parts: vec![] })
    }

    fn backbone(&self) -> &dyn Backbone {
        &self.encoder
    }

    fn panel(&self, views: &[Tensor], key: u64) -> Result<Vec<crate::Column>> {
        let (pred, _, removed) = self.reconstruct(&views[0], key, Mode::Eval)?;
        crate::reconstruction_panel(&views[0], &pred, &removed, self.grid, self.patch, self.cfg.norm_pix_loss)
    }

    /// The fixed sin-cos position embedding.
    fn untrained_params(&self) -> Vec<&'static str> {
        vec!["backbone.pos_embed"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_quarter_per_sample() {
        let k = keep_indices(3, 196, 0.75, 4).unwrap();
        assert!(k.iter().all(|v| v.len() == 49 && v.windows(2).all(|w| w[0] < w[1])));
        assert_ne!(k[0], k[1]);
        assert_eq!(k, keep_indices(3, 196, 0.75, 4).unwrap());
    }

    #[test]
    fn masked_positions_get_the_mask_token_and_every_parameter_learns() {
        let model = crate::tests::tiny_vit(false);
        let cfg = Config { decoder_embed_dim: 16, decoder_depth: 2, decoder_num_heads: 2, ..Config::default() };
        let online = Vars::new(6);
        let mae = Mae::new(&cfg, &model, &online, &Device::Cpu).unwrap();
        let pos = online.params.get("backbone.pos_embed").unwrap().as_tensor().flatten_all().unwrap();
        assert_eq!(pos.to_vec1::<f32>().unwrap(), sincos_pos_embed_2d(16, 4, 4, true).unwrap());
        let imgs = Tensor::randn(0f32, 1., (2, 1, 32, 32), &Device::Cpu).unwrap();
        let (pred, target, removed) = mae.reconstruct(&imgs, 1, Mode::Eval).unwrap();
        assert_eq!(pred.dims(), [2, 16, 64]);
        assert_eq!(target.dims(), [2, 16, 64]);
        assert_eq!(removed.sum_all().unwrap().to_scalar::<f32>().unwrap(), 2.0 * 12.0);
        let l = mae.loss(std::slice::from_ref(&imgs), Step { progress: 0.0, key: 1 }).unwrap().total;
        let grads = l.backward().unwrap();
        let params = online.params.vars();
        let trained = params.iter().filter(|(n, _)| n != "backbone.pos_embed");
        selfsup_ops::testing::assert_every_var_has_grad(trained.map(|(n, v)| (n.as_str(), v)), &grads);
    }
}
