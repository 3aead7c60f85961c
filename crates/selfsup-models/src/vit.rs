//! Vision Transformer (Dosovitskiy et al., ICLR 2021) with timm's weight names.
//!
//! Reference: timm `vision_transformer.py` (`VisionTransformer`, pre-norm blocks, qkv bias,
//! LayerNorm eps 1e-6, GELU (erf), MLP ratio 4, class token, learnable absolute position
//! embedding added to every token including the class token). Names: `cls_token`,
//! `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
//! mlp.fc2}`, `norm`; the classifier `head` is not part of the backbone.
//!
//! Choices:
//! - Attention runs through `selfsup_ops::attention::window_attention_qkv` with the whole
//!   sequence as one window (its fused kernel reads the qkv Linear's output without a permute
//!   and keeps only row statistics for the backward).
//! - The position embedding is for `img_size`; other input sizes are an error (timm would
//!   resample it only with `dynamic_img_size`).
//! - Pooled features are the class token after `norm` (timm's `global_pool='token'`);
//!   [`Vit::forward_tokens`] gives every token for MAE-style and LoMaR objectives.
//! - Init as timm's default: trunc-normal(0.02) for Linear weights, position embedding and
//!   class token (the truncation at +-2 never fires at that std), zeros for biases, 1/0 norms;
//!   the patch projection is N(0, 0.02) where timm uses a Lecun-style fan-in init (documented,
//!   not numerically relevant to loading weights).
//! - Drop-path rates rise linearly from 0 to `drop_path_rate` over the blocks.

use candle_core::{Module, Result, Tensor};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use crate::layers::{drop_path, linear_trunc_normal as linear, LayerNorm};
use crate::store::Vb;
use crate::{Backbone, Mode};

const LN_EPS: f64 = 1e-6;
const INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default)]
    pub drop_path_rate: f64,
}

impl Config {
    fn new(
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
        patch_size: usize,
        img_size: usize,
        in_chans: usize,
    ) -> Self {
        Self { img_size, patch_size, in_chans, embed_dim, depth, num_heads, drop_path_rate: 0.0 }
    }
    pub fn tiny(patch: usize, img_size: usize, in_chans: usize) -> Self {
        Self::new(192, 12, 3, patch, img_size, in_chans)
    }
    pub fn small(patch: usize, img_size: usize, in_chans: usize) -> Self {
        Self::new(384, 12, 6, patch, img_size, in_chans)
    }
    pub fn base(patch: usize, img_size: usize, in_chans: usize) -> Self {
        Self::new(768, 12, 12, patch, img_size, in_chans)
    }

    pub fn num_patches(&self) -> usize {
        (self.img_size / self.patch_size).pow(2)
    }

    /// Trainable parameters (with the final norm), plus a `classes`-way head when `classes > 0`.
    pub fn num_params(&self, classes: usize) -> usize {
        let d = self.embed_dim;
        let patch = self.in_chans * self.patch_size * self.patch_size * d + d;
        let block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d);
        let head = if classes > 0 { d * classes + classes } else { 0 };
        patch + d + (self.num_patches() + 1) * d + self.depth * block + 2 * d + head
    }

    /// Multiply-accumulates of one forward (patch embedding, blocks with attention).
    pub fn macs(&self) -> usize {
        let (d, n) = (self.embed_dim, self.num_patches());
        let t = n + 1;
        n * self.in_chans * self.patch_size * self.patch_size * d + self.depth * (t * 12 * d * d + 2 * t * t * d)
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.img_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            candle_core::bail!(
                "vit: img_size {} must be a positive multiple of patch_size {}",
                self.img_size,
                self.patch_size
            )
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            candle_core::bail!("vit: embed_dim {} must be a multiple of num_heads {}", self.embed_dim, self.num_heads)
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            candle_core::bail!("vit: drop_path_rate must lie in [0, 1), got {}", self.drop_path_rate)
        }
        Ok(())
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: candle_nn::Linear,
    proj: candle_nn::Linear,
    norm2: LayerNorm,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    heads: usize,
    drop_path: f64,
    index: u64,
}

impl Block {
    fn new(d: usize, heads: usize, drop_path: f64, index: u64, vb: Vb) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(d, LN_EPS, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: linear(d, d, vb.pp("attn.proj"))?,
            norm2: LayerNorm::new(d, LN_EPS, vb.pp("norm2"))?,
            fc1: linear(d, 4 * d, vb.pp("mlp.fc1"))?,
            fc2: linear(4 * d, d, vb.pp("mlp.fc2"))?,
            heads,
            drop_path,
            index,
        })
    }

    /// xs: (b, n, d) -> same.
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        let flat = |t: &Tensor| t.reshape((b * n, t.dim(2)?));
        let qkv = self.qkv.forward(&flat(&self.norm1.forward(xs)?)?)?.reshape((b, n, 3, h, hd))?;
        let pos = selfsup_ops::attention::PositionBias::default();
        let att = selfsup_ops::attention::window_attention_qkv(&qkv, (hd as f64).powf(-0.5), &pos)?;
        let mut ys = self.proj.forward(&att.reshape((b * n, d))?)?.reshape((b, n, d))?;
        // The two branches of block i draw as drop-path layers 2i and 2i + 1.
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, 2 * self.index)?;
        }
        let xs = (xs + ys)?;
        let ys = self.fc1.forward(&flat(&self.norm2.forward(&xs)?)?)?.gelu_erf()?;
        let mut ys = self.fc2.forward(&ys)?.reshape((b, n, d))?;
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, 2 * self.index + 1)?;
        }
        xs + ys
    }
}

/// A ViT backbone without classifier.
pub struct Vit {
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    cfg: Config,
}

impl Vit {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        cfg.validate()?;
        let (d, p) = (cfg.embed_dim, cfg.patch_size);
        let blocks = (0..cfg.depth)
            .map(|i| {
                let rate = cfg.drop_path_rate * i as f64 / (cfg.depth.max(2) - 1) as f64;
                Block::new(d, cfg.num_heads, rate, i as u64, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_weight: vb.params.get_with_hints((d, cfg.in_chans, p, p), "patch_embed.proj.weight", INIT)?,
            patch_bias: vb.params.get_with_hints(d, "patch_embed.proj.bias", Init::Const(0.0))?,
            cls_token: vb.params.get_with_hints((1, 1, d), "cls_token", INIT)?,
            pos_embed: vb.params.get_with_hints((1, cfg.num_patches() + 1, d), "pos_embed", INIT)?,
            blocks,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// xs: (b, c, h, w) -> every token after the final norm, (b, 1 + patches, d).
    pub fn forward_tokens(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let s = self.cfg.img_size;
        if c != self.cfg.in_chans || h != s || w != s {
            candle_core::bail!("vit: input {c}x{h}x{w}, the model expects {}x{s}x{s}", self.cfg.in_chans)
        }
        let nhwc = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let p = self.cfg.patch_size;
        let patches = selfsup_ops::conv2d_nhwc(&nhwc, &self.patch_weight, p, 0)?.broadcast_add(&self.patch_bias)?;
        let d = self.cfg.embed_dim;
        let patches = patches.reshape((b, (h / p) * (w / p), d))?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            xs = block.forward(&xs, mode)?;
        }
        self.norm.forward(&xs)
    }
}

impl Backbone for Vit {
    /// The patch tokens as a map (b, d, h/p, w/p).
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let p = self.cfg.patch_size;
        let t = self.forward_tokens(xs, mode)?;
        let n = t.dim(1)? - 1;
        t.narrow(1, 1, n)?.reshape((b, h / p, w / p, self.cfg.embed_dim))?.permute((0, 3, 1, 2))
    }

    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_tokens(xs, mode)?.narrow(1, 0, 1)?.squeeze(1)
    }

    fn num_features(&self) -> usize {
        self.cfg.embed_dim
    }

    fn stride(&self) -> usize {
        self.cfg.patch_size
    }
}

/// Maps a timm ViT state_dict key to selfsup's, or `None` for the classifier.
pub fn remap_key(key: &str) -> Option<String> {
    if key.starts_with("head.") || key.starts_with("fc_norm.") {
        None
    } else {
        Some(key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Vars;
    use candle_core::{DType, Device};

    #[test]
    fn parameter_counts_match_timm() {
        // timm vit_base_patch16_224: 86,567,656 with the 1000-way head; vit_small 22,050,664;
        // vit_tiny 5,717,416.
        assert_eq!(Config::base(16, 224, 3).num_params(1000), 86_567_656);
        assert_eq!(Config::small(16, 224, 3).num_params(1000), 22_050_664);
        assert_eq!(Config::tiny(16, 224, 3).num_params(1000), 5_717_416);
        // ViT-B/16 at 224: 17.6 GMACs ("17.6 GFLOPs" in timm's and the paper's tables).
        let g = Config::base(16, 224, 3).macs() as f64 / 1e9;
        assert!((g - 17.6).abs() < 0.2, "{g}");
        let cfg = Config { depth: 2, ..Config::tiny(8, 32, 1) };
        let vars = Vars::new(0);
        Vit::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.num_elements(), cfg.num_params(0));
    }

    #[test]
    fn shapes_names_and_errors() {
        let cfg = Config { embed_dim: 16, depth: 2, num_heads: 2, ..Config::tiny(8, 32, 3) };
        let vars = Vars::new(0);
        let m = Vit::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        for name in [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.1.attn.qkv.bias",
            "blocks.0.mlp.fc2.weight",
            "norm.bias",
        ] {
            assert!(vars.params.get(name).is_some(), "{name}");
        }
        let xs = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert_eq!(m.forward_features(&xs, Mode::Eval).unwrap().dims(), [2, 16, 4, 4]);
        assert_eq!(m.forward_pooled(&xs, Mode::Eval).unwrap().dims(), [2, 16]);
        let bad = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward_pooled(&bad, Mode::Eval).unwrap_err().to_string().contains("expects 3x32x32"));
        assert!(Config { num_heads: 5, ..cfg }.validate().is_err());
        assert_eq!(remap_key("head.weight"), None);
    }
}
