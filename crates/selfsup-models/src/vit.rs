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
//!
//! LoMaR's variant (`irpe = true`, METHODS.md 1.6, `junchen14/LoMaR@d9ca9c8`
//! `vision_transformer_irpe.py`, `irpe.py`): every block's attention adds iRPE's contextual key
//! bias, `rpe_config(ratio=1.9, method="product", mode="ctx", shared_head=True, skip=1,
//! rpe_on="k")`: a table `blocks.i.attn.rpe_k.lookup_table_weight` of shape (1, head_dim, 50),
//! zeros at init (iRPE's no-op initializer), looked up by the bucket of every (query, key) pair
//! of the token grid (the class token has its own bucket) and added as `q . r` with the
//! unscaled q. LoMaR never adds its (frozen sin-cos) absolute position embedding, so this
//! variant has no `pos_embed`; position comes from iRPE alone and any multiple of the patch size
//! is a valid input. [`Vit::encode`] runs the blocks on any token grid, which LoMaR uses for its
//! batch of 7x7 windows (each window a sequence of 1 + 49 tokens with the 7x7 grid's buckets).

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::Init;
use selfsup_ops::attention::{irpe_product_buckets, ContextualBias, PositionBias};
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
    /// LoMaR's iRPE contextual key bias in every block, and no absolute position embedding.
    #[serde(default)]
    pub irpe: bool,
}

/// iRPE's ratio in LoMaR (alpha = 1.9, beta = 3.8, gamma = 15.2).
pub const IRPE_RATIO: f64 = 1.9;

/// iRPE buckets of a grid with a class token: (2 * int(2 * 1.9) + 1)^2 + 1 = 50.
pub fn irpe_num_buckets() -> usize {
    selfsup_ops::attention::irpe_product_buckets(1, 1, IRPE_RATIO, 1).1
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
        Self { img_size, patch_size, in_chans, embed_dim, depth, num_heads, drop_path_rate: 0.0, irpe: false }
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
        let position = if self.irpe {
            self.depth * (d / self.num_heads) * irpe_num_buckets()
        } else {
            (self.num_patches() + 1) * d
        };
        patch + d + position + self.depth * block + 2 * d + head
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

/// A pre-norm transformer block with timm's names (also MAE's decoder blocks).
pub struct Block {
    norm1: LayerNorm,
    /// iRPE's `rpe_k.lookup_table_weight`, (1, head_dim, buckets).
    rpe_k: Option<Tensor>,
    qkv: selfsup_ops::linear::Linear,
    proj: selfsup_ops::linear::Linear,
    norm2: LayerNorm,
    fc1: selfsup_ops::linear::Linear,
    fc2: selfsup_ops::linear::Linear,
    heads: usize,
    drop_path: f64,
    index: u64,
}

impl Block {
    /// Width `d`, `heads` heads, optional iRPE table, drop-path rate; `index` keys its draws.
    pub fn new(d: usize, heads: usize, irpe: bool, drop_path: f64, index: u64, vb: Vb) -> Result<Self> {
        let rpe_k = if irpe {
            let shape = (1, d / heads, irpe_num_buckets());
            Some(vb.params.get_with_hints(shape, "attn.rpe_k.lookup_table_weight", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::new(d, LN_EPS, vb.pp("norm1"))?,
            rpe_k,
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

    /// xs: (b, n, d) -> same. `buckets`: iRPE bucket of every token pair, when enabled.
    pub fn forward(&self, xs: &Tensor, buckets: Option<&Arc<Vec<u32>>>, mode: Mode) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        let flat = |t: &Tensor| t.reshape((b * n, t.dim(2)?));
        let qkv = self.qkv.forward(&flat(&self.norm1.forward(xs)?)?)?.reshape((b, n, 3, h, hd))?;
        let ctx = match (&self.rpe_k, buckets) {
            (Some(table), Some(buckets)) => {
                Some(ContextualBias { table: table.clone(), buckets: buckets.clone(), ctx_scale: 1.0 })
            }
            (None, _) => None,
            (Some(_), None) => candle_core::bail!("vit: an iRPE block needs the token grid's buckets"),
        };
        let pos = PositionBias { ctx, ..Default::default() };
        let att = selfsup_ops::attention::window_attention_qkv(&qkv, (hd as f64).powf(-0.5), &pos)?;
        let mut ys = self.proj.forward(&att.reshape((b * n, d))?)?.reshape((b, n, d))?;
        // The two branches of block i draw as drop-path layers 2i and 2i + 1.
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, 2 * self.index)?;
        }
        let xs = (xs + ys)?;
        let ys = selfsup_ops::gelu::gelu_erf(&self.fc1.forward(&flat(&self.norm2.forward(&xs)?)?)?)?;
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
    /// Absolute position embedding (absent in the iRPE variant).
    pos_embed: Option<Tensor>,
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
                Block::new(d, cfg.num_heads, cfg.irpe, rate, i as u64, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_weight: vb.params.get_with_hints((d, cfg.in_chans, p, p), "patch_embed.proj.weight", INIT)?,
            patch_bias: vb.params.get_with_hints(d, "patch_embed.proj.bias", Init::Const(0.0))?,
            cls_token: vb.params.get_with_hints((1, 1, d), "cls_token", INIT)?,
            pos_embed: if cfg.irpe {
                None
            } else {
                Some(vb.params.get_with_hints((1, cfg.num_patches() + 1, d), "pos_embed", INIT)?)
            },
            blocks,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// xs: (b, c, h, w) -> every token after the final norm, (b, 1 + patches, d).
    pub fn forward_tokens(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let p = self.cfg.patch_size;
        let mut patches = self.patch_embed(xs)?;
        if let Some(pos) = &self.pos_embed {
            let n = patches.dim(1)?;
            patches = patches.broadcast_add(&pos.narrow(1, 1, n)?)?;
        }
        let tokens = Tensor::cat(&[&self.cls_with_pos(b)?, &patches], 1)?;
        self.encode(&tokens, (h / p, w / p), mode)
    }

    /// The patch embedding alone: (b, c, h, w) -> (b, (h/p) (w/p), d), raster order, no class
    /// token, no position embedding. With an absolute position embedding the input must be
    /// `img_size`; with iRPE any multiple of the patch size.
    pub fn patch_embed(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let (s, p) = (self.cfg.img_size, self.cfg.patch_size);
        if self.pos_embed.is_some() && (c != self.cfg.in_chans || h != s || w != s) {
            candle_core::bail!("vit: input {c}x{h}x{w}, the model expects {}x{s}x{s}", self.cfg.in_chans)
        }
        if c != self.cfg.in_chans || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "vit: input {c}x{h}x{w}, the model expects {} channels and sides that are multiples of {p}",
                self.cfg.in_chans
            )
        }
        let nhwc = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let patches = selfsup_ops::conv2d_nhwc(&nhwc, &self.patch_weight, p, 0)?.broadcast_add(&self.patch_bias)?;
        patches.reshape((b, (h / p) * (w / p), self.cfg.embed_dim))
    }

    /// The class token (with its position embedding, if any), broadcast to (b, 1, d).
    pub fn cls_with_pos(&self, b: usize) -> Result<Tensor> {
        let cls = match &self.pos_embed {
            Some(pos) => (&self.cls_token + pos.narrow(1, 0, 1)?)?,
            None => self.cls_token.clone(),
        };
        cls.broadcast_as((b, 1, self.cfg.embed_dim))
    }

    /// The absolute position embedding (1, 1 + patches, d), absent in the iRPE variant.
    pub fn pos_embed(&self) -> Option<&Tensor> {
        self.pos_embed.as_ref()
    }

    /// The blocks and the final norm on ready token sequences (B, 1 + n, d), class token first.
    /// `grid` is the (rows, cols) layout of the n patch tokens, for iRPE's buckets (ignored
    /// without iRPE); MAE passes the visible subset, LoMaR its 7x7 windows.
    pub fn encode(&self, tokens: &Tensor, grid: (usize, usize), mode: Mode) -> Result<Tensor> {
        let buckets = if self.cfg.irpe {
            let n = tokens.dim(1)?;
            if n != 1 + grid.0 * grid.1 {
                candle_core::bail!("vit: {n} tokens do not make a class token and a {}x{} grid", grid.0, grid.1)
            }
            Some(Arc::new(irpe_product_buckets(grid.0, grid.1, IRPE_RATIO, 1).0))
        } else {
            None
        };
        let mut xs = tokens.clone();
        for block in &self.blocks {
            xs = block.forward(&xs, buckets.as_ref(), mode)?;
        }
        self.norm.forward(&xs)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
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

    /// One stage: the patch map.
    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        Ok(vec![self.forward_features(xs, mode)?])
    }

    fn num_features(&self) -> usize {
        self.cfg.embed_dim
    }

    fn stride(&self) -> usize {
        self.cfg.patch_size
    }
}

/// MAE's fixed 2-D sin-cos position embedding (`util/pos_embed.py: get_2d_sincos_pos_embed`) for
/// a `gh x gw` grid, with a leading all-zero row for the class token when `cls`: (cls + gh gw, d)
/// row-major. As the reference's `meshgrid(grid_w, grid_h)`, the first d/2 channels encode the
/// column and the last d/2 the row; each half is `[sin(pos w_k), cos(pos w_k)]` with
/// `w_k = 10000^(-k / (d/4))`.
pub fn sincos_pos_embed_2d(d: usize, gh: usize, gw: usize, cls: bool) -> Result<Vec<f32>> {
    if !d.is_multiple_of(4) {
        candle_core::bail!("sin-cos position embedding needs a width divisible by 4, got {d}")
    }
    let quarter = d / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = vec![0f32; if cls { d } else { 0 }];
    for y in 0..gh {
        for x in 0..gw {
            for pos in [x as f64, y as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    Ok(out)
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

    /// LoMaR's variant: iRPE tables instead of `pos_embed`, counted by the formula, any multiple
    /// of the patch size accepted, every parameter (the tables included) trained, and the
    /// window-batch path (`encode` on 1 + 49-token windows) equal to encoding each window alone.
    #[test]
    fn irpe_variant() {
        let cfg = Config { embed_dim: 16, depth: 2, num_heads: 2, irpe: true, ..Config::tiny(4, 28, 1) };
        let vars = Vars::new(3);
        let m = Vit::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert!(vars.params.get("pos_embed").is_none());
        assert_eq!(vars.params.get("blocks.1.attn.rpe_k.lookup_table_weight").unwrap().dims(), [1, 8, 50]);
        assert_eq!(vars.params.num_elements(), cfg.num_params(0));
        // Zero tables at init (iRPE's no-op initializer); make them non-zero to exercise them.
        for (name, v) in vars.params.vars() {
            if name.contains("rpe_k") {
                v.set(&v.as_tensor().randn_like(0.0, 5.0).unwrap()).unwrap();
            }
        }
        for side in [28, 16] {
            let xs = Tensor::randn(0f32, 1., (2, 1, side, side), &Device::Cpu).unwrap();
            assert_eq!(m.forward_features(&xs, Mode::Eval).unwrap().dims(), [2, 16, side / 4, side / 4]);
        }
        let xs = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu).unwrap();
        let loss = m.forward_tokens(&xs, Mode::Train { key: 1 }).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let params = vars.params.vars();
        selfsup_ops::testing::assert_every_var_has_grad(params.iter().map(|(n, v)| (n.as_str(), v)), &grads);

        let windows = Tensor::randn(0f32, 1., (3, 1 + 49, 16), &Device::Cpu).unwrap();
        let together = m.encode(&windows, (7, 7), Mode::Eval).unwrap();
        for w in 0..3 {
            let alone = m.encode(&windows.narrow(0, w, 1).unwrap(), (7, 7), Mode::Eval).unwrap();
            let diff = (together.narrow(0, w, 1).unwrap() - alone).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
        // The grid positions matter: the same tokens on a 1x49 strip encode differently.
        let strip = m.encode(&windows, (1, 49), Mode::Eval).unwrap();
        let diff = (&together - strip).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 1e-3, "{diff}");
        let e = m.encode(&windows, (7, 6), Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("50 tokens do not make a class token and a 7x6 grid"), "{e}");
    }

    #[test]
    fn sincos_matches_the_reference_formula() {
        let e = sincos_pos_embed_2d(8, 2, 3, true).unwrap();
        assert_eq!(e.len(), 7 * 8);
        assert!(e[..8].iter().all(|&v| v == 0.0));
        // Token (row 1, col 2) = index 1 + 1 * 3 + 2: [sin(2), sin(0.02), cos(2), cos(0.02), sin(1), sin(0.01), cos(1), cos(0.01)].
        let t = &e[6 * 8..7 * 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in t.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{t:?}");
        }
    }
}
