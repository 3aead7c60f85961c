//! SegNetr (Cheng et al., MICCAI 2023) and a plain U-Net of the same depth, for segmentation.
//!
//! No code was released; this follows the paper's description as METHODS.md 1.4 records it.
//! Both networks are channels-last inside and take / return NCHW: (b, c, h, w) images to
//! (b, classes, h, w) logits.
//!
//! **SegNetr.** Stem `Conv3x3 -> BN -> GELU` to `widths[0]` at full resolution; four encoder
//! stages (full, 1/2, 1/4, 1/8 resolution) of SegNetr blocks, joined by patch merging (PM:
//! lossless space-to-depth, then `LayerNorm -> Linear(4C -> C')` as Swin's); three decoder
//! stages, each upsampling by patch expanding (`Linear(C' -> 4C)` then depth-to-space), fusing the
//! IRSC skip of its level and running SegNetr blocks; a `1x1` conv head.
//! - *SegNetr block*: `MBConv`, then `y + w_l LR(local(LP_P(LN y))) + w_g GR(global(GP_P(LN y)))`,
//!   then `+ FFN(LN .)` (pre-norm residuals; FFN ratio 4, GELU).
//! - *Spatial attention* in a group of N positions (P x P for the local branch, 2P x 2P for the
//!   global one): the channel mean of each position, a `Linear(N -> N)` over positions, a softmax
//!   over positions, and the features weighted by `N * softmax` (the factor N keeps the mean
//!   weight at 1, so the branch starts near the identity: the paper leaves the scale open).
//! - *Partitions*: LP/LR and GP/GR are `selfsup_ops::partition`'s window and global partitions
//!   (exact inverses, tested there). Patch sizes P = (8, 4, 2, 1) by stage, so the global groups
//!   are 16, 8, 4, 2; a decoder stage uses its encoder stage's sizes. With P = 1 a local group is
//!   one position, where the softmax is identically 1: that branch is the identity and has no
//!   parameters.
//! - *Branch weights* `w_l`, `w_g`: learned scalars, 0.5 each at init.
//! - *MBConv*: `1x1 expand (x4) -> BN -> GELU -> dw3x3 -> BN -> GELU -> SE (1/4) -> 1x1 -> BN`,
//!   plus the identity.
//! - *IRSC*: PM's space-to-depth of the encoder map at level i, every other channel (half of the
//!   4C), depth-to-space back (patch reverse, PR): the encoder map's even channels at their exact
//!   positions, (h, w, C/2). Fusion (left open by the paper): concat with the upsampled decoder
//!   map, then `1x1 conv -> BN -> GELU` to C.
//!
//! **U-Net** ([`UNetConfig`]): any number of levels (SegNetr's four by default, so the baseline is
//! "of comparable depth"); each level is `(Conv3x3 -> BN -> ReLU) x 2`; max-pool 2x2 down; up is
//! either bilinear x2 then `1x1 conv` to the skip's width (the bilinear variant of the common
//! PyTorch U-Net) or a `2x2` stride-2 transposed conv with bias (Ronneberger et al. 2015); concat
//! with the skip, double conv. [`UNetConfig::classic`] is the paper's five-level 64-1024 net with
//! transposed convs and padded convolutions as milesial/Pytorch-UNet builds it (`bilinear=False`):
//! 31,037,698 parameters for 3 channels in and 2 classes, the "plain U-Net" SegNetr's parameter
//! and GFLOP reductions are claimed against. Its transposed-conv weights keep PyTorch's
//! `ConvTranspose2d` layout `(c_in, c_out, 2, 2)`.
//!
//! Inputs must be multiples of 16 (the stage-0 global group). Init: convs Kaiming normal
//! (fan-out), Linear PyTorch default, norms 1/0.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use crate::layers::{linear, BatchNorm, Conv2d, LayerNorm};
use crate::store::Vb;
use crate::Mode;

/// A network that maps images to per-pixel class logits.
pub trait Segmenter: Send + Sync {
    /// xs: (b, c, h, w) -> logits (b, classes, h, w).
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor>;
    fn num_classes(&self) -> usize;
    /// Input sides must be multiples of this.
    fn multiple(&self) -> usize;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub in_chans: usize,
    pub num_classes: usize,
    /// Channels of the four levels (full, 1/2, 1/4, 1/8 resolution).
    pub widths: [usize; 4],
    /// SegNetr blocks per encoder level (decoder levels 0-2 use the same counts).
    #[serde(default = "default_depths")]
    pub depths: [usize; 4],
    /// Local patch size per level (the global groups are twice as wide).
    #[serde(default = "default_patches")]
    pub patches: [usize; 4],
    /// Which SegNetr branches run (the ablation of the paper): local, global.
    #[serde(default = "default_branches")]
    pub branches: [bool; 2],
}

fn default_depths() -> [usize; 4] {
    [1, 1, 1, 1]
}
fn default_patches() -> [usize; 4] {
    [8, 4, 2, 1]
}
fn default_branches() -> [bool; 2] {
    [true, true]
}

impl Config {
    pub fn new(in_chans: usize, num_classes: usize, widths: [usize; 4]) -> Self {
        Self {
            in_chans,
            num_classes,
            widths,
            depths: default_depths(),
            patches: default_patches(),
            branches: default_branches(),
        }
    }

    /// Multiply-accumulates of one SegNetr forward at `side` x `side`: convolutions, linears and
    /// the spatial attentions' position mixing (`Linear(N -> N)` per group), the layers that
    /// papers and fvcore count; norms, activations, softmax and elementwise products are not.
    pub fn segnetr_macs(&self, side: usize) -> usize {
        let w = self.widths;
        let n = |i: usize| (side >> i) * (side >> i);
        let block = |i: usize| {
            let (c, p) = (w[i], self.patches[i]);
            let (nl, ng) = (p * p, 4 * p * p);
            let hidden = 4 * c;
            let se = (c / 4).max(1);
            // MBConv: expand, depthwise 3x3, SE (once per image), project; then FFN.
            let mbconv = n(i) * c * hidden + n(i) * hidden * 9 + 2 * hidden * se + n(i) * hidden * c;
            let local = if self.branches[0] && nl > 1 { n(i) * nl } else { 0 };
            let global = if self.branches[1] { n(i) * ng } else { 0 };
            mbconv + local + global + 2 * n(i) * c * 4 * c
        };
        let encoder: usize = (0..4).map(|i| self.depths[i] * block(i)).sum();
        let merges: usize = (0..3).map(|i| n(i + 1) * 4 * w[i] * w[i + 1]).sum();
        let decoder: usize = (0..3)
            .map(|i| n(i + 1) * w[i + 1] * 4 * w[i] + n(i) * (w[i] + w[i] / 2) * w[i] + self.depths[i] * block(i))
            .sum();
        n(0) * 9 * self.in_chans * w[0] + encoder + merges + decoder + n(0) * w[0] * self.num_classes
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.in_chans == 0 || self.num_classes == 0 || self.widths.contains(&0) {
            candle_core::bail!("{what}: in_chans, num_classes and widths must be positive")
        }
        if self.widths.iter().any(|w| w % 2 != 0) {
            candle_core::bail!("{what}: widths must be even (the skip keeps half the channels), got {:?}", self.widths)
        }
        Ok(())
    }
}

/// How the U-Net's decoder doubles the resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upsample {
    /// Bilinear x2, then a `1x1 conv` (no bias) to the skip's width.
    #[default]
    Bilinear,
    /// A `2x2` stride-2 transposed conv with bias to the skip's width (Ronneberger et al.).
    Transposed,
}

/// The plain U-Net: `widths[i]` channels at 1/2^i resolution, at least two levels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    pub in_chans: usize,
    pub num_classes: usize,
    pub widths: Vec<usize>,
    #[serde(default)]
    pub upsample: Upsample,
}

impl UNetConfig {
    /// The U-Net at SegNetr's four levels and widths, bilinear upsampling.
    pub fn like(cfg: &Config) -> Self {
        Self {
            in_chans: cfg.in_chans,
            num_classes: cfg.num_classes,
            widths: cfg.widths.to_vec(),
            upsample: Upsample::Bilinear,
        }
    }

    /// Ronneberger et al.'s U-Net: five levels 64-1024, transposed-conv upsampling.
    pub fn classic(in_chans: usize, num_classes: usize) -> Self {
        Self { in_chans, num_classes, widths: vec![64, 128, 256, 512, 1024], upsample: Upsample::Transposed }
    }

    /// Multiply-accumulates of one forward at `side` x `side` (convolutions, the transposed ones
    /// included; pooling and bilinear upsampling are not counted).
    pub fn macs(&self, side: usize) -> usize {
        let w = &self.widths;
        let n = |i: usize| (side >> i) * (side >> i);
        let down: usize =
            (0..w.len()).map(|i| n(i) * 9 * (if i == 0 { self.in_chans } else { w[i - 1] } * w[i] + w[i] * w[i])).sum();
        let up: usize = (0..w.len() - 1)
            .map(|i| {
                let resample = match self.upsample {
                    Upsample::Bilinear => n(i) * w[i + 1] * w[i],
                    Upsample::Transposed => n(i + 1) * w[i + 1] * 4 * w[i],
                };
                resample + n(i) * 9 * (2 * w[i] * w[i] + w[i] * w[i])
            })
            .sum();
        down + up + n(0) * w[0] * self.num_classes
    }

    fn validate(&self) -> Result<()> {
        if self.in_chans == 0 || self.num_classes == 0 || self.widths.contains(&0) || self.widths.len() < 2 {
            candle_core::bail!(
                "unet: in_chans, num_classes and widths must be positive and there must be at least two levels, got widths {:?}",
                self.widths
            )
        }
        Ok(())
    }
}

/// The `1x1` conv to class logits both networks end with (`head.weight`, `head.bias`).
fn head(c: usize, num_classes: usize, vb: Vb) -> Result<Conv2d> {
    let init = Init::Randn { mean: 0.0, stdev: (1.0 / c as f64).sqrt() };
    let weight = vb.params.get_with_hints((num_classes, c, 1, 1), "weight", init)?;
    let bias = vb.params.get_with_hints(num_classes, "bias", Init::Const(0.0))?;
    Ok(Conv2d::from_parts(weight, Some(bias), 1, 0))
}

/// xs: (b, c, h, w) with the configured channels and sides that are multiples of `multiple`.
fn check_input(what: &str, in_chans: usize, xs: &Tensor, multiple: usize) -> Result<()> {
    let (_, c, h, w) = xs.dims4()?;
    if c != in_chans || h % multiple != 0 || w % multiple != 0 {
        candle_core::bail!(
            "{what}: input {c}x{h}x{w}, the model takes {in_chans} channels and sides that are multiples of {multiple}"
        )
    }
    Ok(())
}

fn conv(c_in: usize, c_out: usize, k: usize, vb: Vb) -> Result<Conv2d> {
    Conv2d::no_bias(c_in, c_out, k, 1, k / 2, vb)
}

/// `Conv -> BN -> activation`, channels-last.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(c_in: usize, c_out: usize, k: usize, vb: Vb) -> Result<Self> {
        Ok(Self { conv: conv(c_in, c_out, k, vb.pp("conv"))?, bn: BatchNorm::new(c_out, vb.pp("bn"))? })
    }

    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(xs)?, mode.is_train())
    }
}

/// Inverted bottleneck with squeeze-excite.
struct MbConv {
    expand: ConvBn,
    dw_weight: Tensor,
    dw_bn: BatchNorm,
    se_reduce: selfsup_ops::linear::Linear,
    se_expand: selfsup_ops::linear::Linear,
    project: ConvBn,
}

impl MbConv {
    fn new(c: usize, vb: Vb) -> Result<Self> {
        let hidden = 4 * c;
        let se = (c / 4).max(1);
        let std = (2.0 / (9.0 * hidden as f64)).sqrt();
        Ok(Self {
            expand: ConvBn::new(c, hidden, 1, vb.pp("expand"))?,
            dw_weight: vb.params.get_with_hints(
                (hidden, 1, 3, 3),
                "dw.weight",
                Init::Randn { mean: 0.0, stdev: std },
            )?,
            dw_bn: BatchNorm::new(hidden, vb.pp("dw_bn"))?,
            se_reduce: linear(hidden, se, true, vb.pp("se.reduce"))?,
            se_expand: linear(se, hidden, true, vb.pp("se.expand"))?,
            project: ConvBn::new(hidden, c, 1, vb.pp("project"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let ys = selfsup_ops::gelu::gelu_erf(&self.expand.forward(xs, mode)?)?;
        let ys = selfsup_ops::dwconv::depthwise_conv2d_nhwc(&ys, &self.dw_weight, None, 1, 1)?;
        let ys = selfsup_ops::gelu::gelu_erf(&self.dw_bn.forward_t(&ys, mode.is_train())?)?;
        let (b, h, w, c) = ys.dims4()?;
        let s = ys.reshape((b, h * w, c))?.mean(1)?;
        let s = candle_nn::ops::sigmoid(&self.se_expand.forward(&self.se_reduce.forward(&s)?.relu()?)?)?;
        let ys = ys.broadcast_mul(&s.reshape((b, 1, 1, c))?)?;
        xs + self.project.forward(&ys, mode)?
    }
}

/// Spatial attention over groups of `n` positions: (g, n, c) -> same.
struct SpatialAttention {
    fc: selfsup_ops::linear::Linear,
    n: usize,
}

impl SpatialAttention {
    fn forward(&self, groups: &Tensor) -> Result<Tensor> {
        let logits = self.fc.forward(&groups.mean(D::Minus1)?)?; // (g, n)
        let p = selfsup_ops::softmax::softmax_last_dim(&logits)?;
        groups.broadcast_mul(&(p * self.n as f64)?.unsqueeze(2)?)
    }
}

struct SegNetrBlock {
    mbconv: MbConv,
    norm1: LayerNorm,
    local: Option<SpatialAttention>,
    global: Option<SpatialAttention>,
    branch_weights: Tensor,
    norm2: LayerNorm,
    fc1: selfsup_ops::linear::Linear,
    fc2: selfsup_ops::linear::Linear,
    patch: usize,
    use_local: bool,
}

impl SegNetrBlock {
    fn new(c: usize, patch: usize, branches: [bool; 2], vb: Vb) -> Result<Self> {
        let (nl, ng) = (patch * patch, 4 * patch * patch);
        let attention = |n: usize, name: &str| -> Result<SpatialAttention> {
            Ok(SpatialAttention { fc: linear(n, n, true, vb.pp(name))?, n })
        };
        Ok(Self {
            mbconv: MbConv::new(c, vb.pp("mbconv"))?,
            norm1: LayerNorm::new(c, 1e-5, vb.pp("norm1"))?,
            local: if branches[0] && nl > 1 { Some(attention(nl, "local")?) } else { None },
            global: if branches[1] { Some(attention(ng, "global")?) } else { None },
            branch_weights: vb.params.get_with_hints(2, "branch_weights", Init::Const(0.5))?,
            norm2: LayerNorm::new(c, 1e-5, vb.pp("norm2"))?,
            fc1: linear(c, 4 * c, true, vb.pp("ffn.0"))?,
            fc2: linear(4 * c, c, true, vb.pp("ffn.2"))?,
            patch,
            use_local: branches[0],
        })
    }

    /// xs: (b, h, w, c) -> same.
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        use selfsup_ops::partition::{global_partition, global_reverse, window_partition, window_reverse};
        let ys = self.mbconv.forward(xs, mode)?;
        let (b, h, w, c) = ys.dims4()?;
        let z = self.norm1.forward(&ys)?;
        let p = self.patch;
        let mut mixed: Option<Tensor> = None;
        let mut add = |t: Tensor, i: usize| -> Result<()> {
            let t = t.broadcast_mul(&self.branch_weights.narrow(0, i, 1)?)?;
            mixed = Some(match mixed.take() {
                Some(m) => (m + t)?,
                None => t,
            });
            Ok(())
        };
        if self.use_local {
            let local = match &self.local {
                Some(att) => window_reverse(&att.forward(&window_partition(&z, p, p)?)?, b, h, w)?,
                None => z.clone(), // P = 1: one position per group, softmax = 1
            };
            add(local, 0)?;
        }
        if let Some(att) = &self.global {
            add(global_reverse(&att.forward(&global_partition(&z, p)?)?, b, h, w, p)?, 1)?;
        }
        let ys = match mixed {
            Some(m) => (ys + m)?,
            None => ys,
        };
        let h1 = self.fc1.forward(&self.norm2.forward(&ys)?.reshape((b * h * w, c))?)?;
        let f = self.fc2.forward(&selfsup_ops::gelu::gelu_erf(&h1)?)?;
        ys + f.reshape((b, h, w, c))?
    }
}

/// Space-to-depth (PM without its projection): (b, h, w, c) -> (b, h/2, w/2, 4c), channel
/// `(dy * 2 + dx) * c + k`.
pub fn space_to_depth(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("space_to_depth: map {h}x{w} has an odd side")
    }
    x.reshape(vec![b, h / 2, 2, w / 2, 2, c])?.permute(vec![0, 1, 3, 2, 4, 5])?.reshape((b, h / 2, w / 2, 4 * c))
}

/// The inverse of [`space_to_depth`] (PR): (b, h, w, 4c) -> (b, 2h, 2w, c).
pub fn depth_to_space(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c4) = x.dims4()?;
    if c4 % 4 != 0 {
        candle_core::bail!("depth_to_space: {c4} channels are not a multiple of 4")
    }
    let c = c4 / 4;
    x.reshape(vec![b, h, w, 2, 2, c])?.permute(vec![0, 1, 3, 2, 4, 5])?.reshape((b, 2 * h, 2 * w, c))
}

/// IRSC: PM's output at every other channel, depth-to-space back: (b, h, w, c) -> (b, h, w, c/2),
/// the even channels of every pixel at its exact position.
pub fn irsc(x: &Tensor) -> Result<Tensor> {
    let pm = space_to_depth(x)?;
    let (b, h, w, c4) = pm.dims4()?;
    let even = pm.reshape((b, h, w, c4 / 2, 2))?.narrow(4, 0, 1)?.squeeze(4)?;
    depth_to_space(&even)
}

struct Merge {
    norm: LayerNorm,
    proj: selfsup_ops::linear::Linear,
}

struct Expand {
    proj: selfsup_ops::linear::Linear,
}

struct Fuse {
    conv: ConvBn,
}

pub struct SegNetr {
    stem: ConvBn,
    encoder: Vec<Vec<SegNetrBlock>>,
    merges: Vec<Merge>,
    expands: Vec<Expand>,
    fuses: Vec<Fuse>,
    decoder: Vec<Vec<SegNetrBlock>>,
    head: Conv2d,
    cfg: Config,
}

impl SegNetr {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        cfg.validate("segnetr")?;
        let wd = cfg.widths;
        let blocks = |level: usize, vb: Vb| -> Result<Vec<SegNetrBlock>> {
            (0..cfg.depths[level])
                .map(|j| SegNetrBlock::new(wd[level], cfg.patches[level], cfg.branches, vb.pp(j)))
                .collect()
        };
        let encoder = (0..4).map(|i| blocks(i, vb.pp(format!("encoder.{i}")))).collect::<Result<_>>()?;
        let merges = (0..3)
            .map(|i| {
                let vb = vb.pp(format!("merge.{i}"));
                Ok(Merge {
                    norm: LayerNorm::new(4 * wd[i], 1e-5, vb.pp("norm"))?,
                    proj: linear(4 * wd[i], wd[i + 1], false, vb.pp("proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        let expands = (0..3)
            .map(|i| Ok(Expand { proj: linear(wd[i + 1], 4 * wd[i], false, vb.pp(format!("expand.{i}")))? }))
            .collect::<Result<_>>()?;
        let fuses = (0..3)
            .map(|i| Ok(Fuse { conv: ConvBn::new(wd[i] + wd[i] / 2, wd[i], 1, vb.pp(format!("fuse.{i}")))? }))
            .collect::<Result<_>>()?;
        let decoder = (0..3).map(|i| blocks(i, vb.pp(format!("decoder.{i}")))).collect::<Result<_>>()?;
        Ok(Self {
            stem: ConvBn::new(cfg.in_chans, wd[0], 3, vb.pp("stem"))?,
            encoder,
            merges,
            expands,
            fuses,
            decoder,
            head: head(wd[0], cfg.num_classes, vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }
}

impl Segmenter for SegNetr {
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        check_input("segnetr", self.cfg.in_chans, xs, self.multiple())?;
        let mut x = selfsup_ops::gelu::gelu_erf(&self.stem.forward(&xs.permute((0, 2, 3, 1))?.contiguous()?, mode)?)?;
        let mut skips = Vec::with_capacity(3);
        for (i, blocks) in self.encoder.iter().enumerate() {
            for block in blocks {
                x = block.forward(&x, mode)?;
            }
            if i < 3 {
                skips.push(irsc(&x)?);
                let m = &self.merges[i];
                let pm = space_to_depth(&x)?;
                let (b, mh, mw, c4) = pm.dims4()?;
                x = m.proj.forward(&m.norm.forward(&pm)?.reshape((b * mh * mw, c4))?)?.reshape((b, mh, mw, ()))?;
            }
        }
        for i in (0..3).rev() {
            let (b, lh, lw, c) = x.dims4()?;
            let up = self.expands[i].proj.forward(&x.reshape((b * lh * lw, c))?)?.reshape((b, lh, lw, ()))?;
            let up = depth_to_space(&up)?;
            let fused = Tensor::cat(&[&up, &skips[i]], 3)?;
            x = selfsup_ops::gelu::gelu_erf(&self.fuses[i].conv.forward(&fused, mode)?)?;
            for block in &self.decoder[i] {
                x = block.forward(&x, mode)?;
            }
        }
        self.head.forward(&x)?.permute((0, 3, 1, 2))
    }

    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    fn multiple(&self) -> usize {
        16
    }
}

/// `(Conv3x3 -> BN -> ReLU) x 2`.
struct DoubleConv {
    a: ConvBn,
    b: ConvBn,
}

impl DoubleConv {
    fn new(c_in: usize, c_out: usize, vb: Vb) -> Result<Self> {
        Ok(Self { a: ConvBn::new(c_in, c_out, 3, vb.pp("0"))?, b: ConvBn::new(c_out, c_out, 3, vb.pp("1"))? })
    }

    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.b.forward(&self.a.forward(xs, mode)?.relu()?, mode)?.relu()
    }
}

/// The decoder's resolution doubling, to the skip's width.
enum Up {
    Bilinear(Conv2d),
    /// PyTorch `ConvTranspose2d(c_in, c_out, 2, stride 2)`: weight (c_in, c_out, 2, 2), bias (c_out).
    Transposed {
        weight: Tensor,
        bias: Tensor,
    },
}

impl Up {
    fn new(c_in: usize, c_out: usize, how: Upsample, vb: Vb) -> Result<Self> {
        Ok(match how {
            Upsample::Bilinear => Self::Bilinear(conv(c_in, c_out, 1, vb)?),
            Upsample::Transposed => {
                // PyTorch's default: kaiming_uniform(a = sqrt 5) over fan-in = c_out * 4 (dim 1
                // of the weight is its "fan-in" for a transposed conv), i.e. U(+-1/sqrt(fan)).
                let bound = 1.0 / ((4 * c_out) as f64).sqrt();
                let init = Init::Uniform { lo: -bound, up: bound };
                Self::Transposed {
                    weight: vb.params.get_with_hints((c_in, c_out, 2, 2), "weight", init)?,
                    bias: vb.params.get_with_hints(c_out, "bias", init)?,
                }
            }
        })
    }

    /// (b, h, w, c_in) -> (b, 2h, 2w, c_out).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c_in) = x.dims4()?;
        match self {
            Self::Bilinear(conv) => conv.forward(&selfsup_ops::interpolate_nhwc(
                x,
                2 * h,
                2 * w,
                selfsup_ops::Resize::Bilinear { align_corners: false },
            )?),
            Self::Transposed { weight, bias } => {
                // out[2y + dy, 2x + dx, o] = bias[o] + sum_i x[y, x, i] weight[i, o, dy, dx]: one
                // GEMM to (o, dy, dx) per input pixel, then the sub-pixels are put in place.
                let c_out = weight.dim(1)?;
                let y = x.reshape((b * h * w, c_in))?.matmul(&weight.reshape((c_in, c_out * 4))?)?;
                y.reshape(vec![b, h, w, c_out, 2, 2])?
                    .permute(vec![0, 1, 4, 2, 5, 3])?
                    .reshape((b, 2 * h, 2 * w, c_out))?
                    .broadcast_add(bias)
            }
        }
    }
}

pub struct UNet {
    encoder: Vec<DoubleConv>,
    ups: Vec<Up>,
    decoder: Vec<DoubleConv>,
    head: Conv2d,
    cfg: UNetConfig,
}

impl UNet {
    /// Variables: `down.i` (double conv of level i, `.0`/`.1` each `conv`, `bn`), `up.i` (level
    /// i + 1 to i), `dec.i`, `head`.
    pub fn new(cfg: &UNetConfig, vb: Vb) -> Result<Self> {
        cfg.validate()?;
        let wd = &cfg.widths;
        let levels = wd.len();
        let encoder = (0..levels)
            .map(|i| DoubleConv::new(if i == 0 { cfg.in_chans } else { wd[i - 1] }, wd[i], vb.pp(format!("down.{i}"))))
            .collect::<Result<_>>()?;
        let ups = (0..levels - 1)
            .map(|i| Up::new(wd[i + 1], wd[i], cfg.upsample, vb.pp(format!("up.{i}"))))
            .collect::<Result<_>>()?;
        let decoder = (0..levels - 1)
            .map(|i| DoubleConv::new(2 * wd[i], wd[i], vb.pp(format!("dec.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { encoder, ups, decoder, head: head(wd[0], cfg.num_classes, vb.pp("head"))?, cfg: cfg.clone() })
    }
}

impl Segmenter for UNet {
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        check_input("unet", self.cfg.in_chans, xs, self.multiple())?;
        let mut x = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let mut skips = Vec::with_capacity(self.encoder.len());
        for (i, level) in self.encoder.iter().enumerate() {
            if i > 0 {
                x = selfsup_ops::max_pool2d_nhwc(&x, 2, 2, 0)?;
            }
            x = level.forward(&x, mode)?;
            skips.push(x.clone());
        }
        for i in (0..self.decoder.len()).rev() {
            let up = self.ups[i].forward(&x)?;
            x = self.decoder[i].forward(&Tensor::cat(&[&skips[i], &up], 3)?, mode)?;
        }
        self.head.forward(&x)?.permute((0, 3, 1, 2))
    }

    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    fn multiple(&self) -> usize {
        1 << (self.cfg.widths.len() - 1)
    }
}

/// A U-Net whose encoder is a registered backbone (ResNet, ConvNeXt V2, CvT, Mobile-Former:
/// any with at least two stages, each half the resolution of the one before), so an encoder
/// pretrained by any objective can be segmented with. The decoder is the plain U-Net's, from the
/// coarsest stage up to the finest: bilinear x2, `1x1 conv` to the skip's width, concat with the
/// skip, double conv. The `1x1` head runs at the finest stage's resolution and its logits are
/// resized bilinearly to the input (the finest stage is 1/4 of the input with an ImageNet stem or
/// a ConvNeXt, 1/1 with ResNet's small-image stem).
///
/// Variable names: the encoder's own names under `encoder.` (a checkpoint's `backbone.*`
/// tensors load there by prefix), then `up.i`, `dec.i`, `head`.
pub struct EncoderUNet {
    encoder: Box<dyn crate::Backbone>,
    ups: Vec<Conv2d>,
    decoder: Vec<DoubleConv>,
    head: Conv2d,
    num_classes: usize,
    stride: usize,
    /// (channels, stride) of each encoder stage, finest first.
    stages: Vec<(usize, usize)>,
}

/// Channels and stride of each stage of `encoder`, finest first, found by one eval-mode forward
/// of a blank `side` x `side` image.
pub fn stage_shapes(encoder: &dyn crate::Backbone, in_chans: usize, side: usize) -> Result<Vec<(usize, usize)>> {
    let dev = candle_core::Device::Cpu;
    let probe = Tensor::zeros((1, in_chans, side, side), candle_core::DType::F32, &dev)?;
    encoder
        .forward_stages(&probe, Mode::Eval)?
        .iter()
        .map(|t| {
            let (_, c, h, _) = t.dims4()?;
            Ok((c, side / h.max(1)))
        })
        .collect()
}

impl EncoderUNet {
    /// `encoder` (built with `in_chans` input channels, its variables owned by the caller), a
    /// decoder for `num_classes` built in `vb`; `side` is an input side the net will be run at
    /// (the stages are measured there).
    pub fn new(
        encoder: Box<dyn crate::Backbone>,
        in_chans: usize,
        num_classes: usize,
        side: usize,
        vb: Vb,
    ) -> Result<Self> {
        let stages = stage_shapes(encoder.as_ref(), in_chans, side)?;
        if stages.len() < 2 || stages.windows(2).any(|w| w[1].1 != 2 * w[0].1) {
            candle_core::bail!(
                "encoder_unet: the encoder's stages (channels, stride) {stages:?} are not a pyramid halving at each stage"
            )
        }
        let wd: Vec<usize> = stages.iter().map(|s| s.0).collect();
        let n = wd.len();
        let ups = (0..n - 1).map(|i| conv(wd[i + 1], wd[i], 1, vb.pp(format!("up.{i}")))).collect::<Result<_>>()?;
        let decoder =
            (0..n - 1).map(|i| DoubleConv::new(2 * wd[i], wd[i], vb.pp(format!("dec.{i}")))).collect::<Result<_>>()?;
        Ok(Self {
            ups,
            decoder,
            head: head(wd[0], num_classes, vb.pp("head"))?,
            num_classes,
            stride: encoder.stride(),
            encoder,
            stages,
        })
    }

    /// Multiply-accumulates of the decoder and head at `side` x `side` (convolutions only); the
    /// encoder's are `ModelConfig::cost`'s.
    pub fn decoder_macs(&self, side: usize) -> usize {
        let n = |i: usize| (side / self.stages[i].1).pow(2);
        let w = |i: usize| self.stages[i].0;
        let dec: usize = (0..self.stages.len() - 1).map(|i| n(i) * w(i + 1) * w(i) + n(i) * 9 * 3 * w(i) * w(i)).sum();
        dec + n(0) * w(0) * self.num_classes
    }
}

impl Segmenter for EncoderUNet {
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        if h % self.stride != 0 || w % self.stride != 0 {
            candle_core::bail!(
                "encoder_unet: input {h}x{w}, the encoder takes sides that are multiples of {}",
                self.stride
            )
        }
        let stages: Vec<Tensor> = self
            .encoder
            .forward_stages(xs, mode)?
            .iter()
            .map(|t| t.permute((0, 2, 3, 1))?.contiguous())
            .collect::<Result<_>>()?;
        let mut x = stages[stages.len() - 1].clone();
        for i in (0..stages.len() - 1).rev() {
            let (_, sh, sw, _) = stages[i].dims4()?;
            let up = selfsup_ops::interpolate_nhwc(&x, sh, sw, selfsup_ops::Resize::Bilinear { align_corners: false })?;
            let up = self.ups[i].forward(&up)?;
            x = self.decoder[i].forward(&Tensor::cat(&[&stages[i], &up], 3)?, mode)?;
        }
        let mut logits = self.head.forward(&x)?;
        if logits.dim(1)? != h || logits.dim(2)? != w {
            logits =
                selfsup_ops::interpolate_nhwc(&logits, h, w, selfsup_ops::Resize::Bilinear { align_corners: false })?;
        }
        logits.permute((0, 3, 1, 2))
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn multiple(&self) -> usize {
        self.stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Vars;
    use candle_core::{DType, Device};

    /// METHODS.md 1.4: PM/PR are exact inverses and IRSC keeps every pixel's even channels at
    /// its own position.
    #[test]
    fn patch_merging_reverse_and_irsc_are_exact() {
        let x = Tensor::arange(0f32, 2. * 4. * 6. * 4., &Device::Cpu).unwrap().reshape((2, 4, 6, 4)).unwrap();
        let pm = space_to_depth(&x).unwrap();
        assert_eq!(pm.dims(), [2, 2, 3, 16]);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&depth_to_space(&pm).unwrap()), v(&x));
        // Channel (dy * 2 + dx) * c + k of PM pixel (y, x) is pixel (2y + dy, 2x + dx), channel k.
        let px = |t: &Tensor, b: usize, y: usize, xx: usize| t.get(b).unwrap().get(y).unwrap().get(xx).unwrap();
        assert_eq!(v(&px(&pm, 1, 1, 2).narrow(0, 3 * 4, 4).unwrap()), v(&px(&x, 1, 3, 5)));
        let skip = irsc(&x).unwrap();
        assert_eq!(skip.dims(), [2, 4, 6, 2]);
        let even = x.reshape((2, 4, 6, 2, 2)).unwrap().narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
        assert_eq!(v(&skip), v(&even));
    }

    fn count(vars: &Vars) -> usize {
        vars.params.num_elements()
    }

    /// Both networks: logits at full resolution, every parameter learns, bad sizes are named;
    /// SegNetr's branch ablations build and drop exactly their parameters.
    #[test]
    fn shapes_gradients_and_ablations() {
        let cfg = Config::new(1, 3, [8, 16, 16, 16]);
        for unet in [false, true] {
            let vars = Vars::new(1);
            let vb = vars.vb(DType::F32, &Device::Cpu);
            let m: Box<dyn Segmenter> = if unet {
                Box::new(UNet::new(&UNetConfig::like(&cfg), vb).unwrap())
            } else {
                Box::new(SegNetr::new(&cfg, vb).unwrap())
            };
            let xs = Tensor::randn(0f32, 1., (2, 1, 32, 32), &Device::Cpu).unwrap();
            let logits = m.forward(&xs, Mode::Train { key: 0 }).unwrap();
            assert_eq!(logits.dims(), [2, 3, 32, 32]);
            let loss = logits.sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            let params = vars.params.vars();
            selfsup_ops::testing::assert_every_var_has_grad(params.iter().map(|(n, v)| (n.as_str(), v)), &grads);
            let bad = Tensor::zeros((1, 1, 20, 20), DType::F32, &Device::Cpu).unwrap();
            let e = m.forward(&bad, Mode::Eval).unwrap_err().to_string();
            assert!(e.contains("1x20x20") && e.contains("multiples of"), "{e}");
        }
        let full = Vars::new(0);
        SegNetr::new(&cfg, full.vb(DType::F32, &Device::Cpu)).unwrap();
        let local_only = Vars::new(0);
        SegNetr::new(&Config { branches: [true, false], ..cfg.clone() }, local_only.vb(DType::F32, &Device::Cpu))
            .unwrap();
        let global_only = Vars::new(0);
        SegNetr::new(&Config { branches: [false, true], ..cfg.clone() }, global_only.vb(DType::F32, &Device::Cpu))
            .unwrap();
        assert!(count(&local_only) < count(&full) && count(&global_only) < count(&full));
        assert!(full.params.get("encoder.0.0.global.weight").unwrap().dims() == [256, 256]);
        assert!(full.params.get("encoder.3.0.local.weight").is_none(), "P = 1: no local parameters");
    }

    /// MACs counted a second way: every weight of rank >= 2 (conv, linear, depthwise,
    /// position-mixing) times the positions it is applied at, read off its name.
    fn macs_from_weights(vars: &Vars, positions: impl Fn(&str, &[usize]) -> usize) -> usize {
        vars.params
            .vars()
            .into_iter()
            .filter(|(_, v)| v.rank() >= 2)
            .map(|(name, v)| v.elem_count() * positions(&name, v.dims()))
            .sum()
    }

    fn level(name: &str, prefix: &str) -> Option<usize> {
        name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
    }

    #[test]
    fn macs_equal_weights_times_positions() {
        let side = 64;
        let n = |i: usize| (side >> i) * (side >> i);
        let cfg = Config { depths: [2, 1, 1, 1], ..Config::new(3, 2, [8, 16, 24, 32]) };
        for branches in [[true, true], [true, false], [false, true]] {
            let cfg = Config { branches, ..cfg.clone() };
            let vars = Vars::new(0);
            SegNetr::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
            let want = macs_from_weights(&vars, |name, dims| {
                let at = |i: usize| {
                    if name.contains(".se.") {
                        1
                    } else if name.ends_with("local.weight") || name.ends_with("global.weight") {
                        n(i) / dims[0]
                    } else {
                        n(i)
                    }
                };
                let prefix = name.split('.').next().unwrap();
                let i = || level(name, &format!("{prefix}.")).unwrap();
                match prefix {
                    "stem" | "head" => n(0),
                    "encoder" | "decoder" => at(i()),
                    // Applied at the coarser level: PM's projection, the patch expanding linear.
                    "merge" | "expand" => n(i() + 1),
                    "fuse" => n(i()),
                    other => panic!("unplaced weight {other}"),
                }
            });
            assert_eq!(cfg.segnetr_macs(side), want, "branches {branches:?}");
        }
        let five_levels =
            UNetConfig { widths: vec![4, 8, 8, 16, 16], upsample: Upsample::Transposed, ..UNetConfig::like(&cfg) };
        for (unet, transposed) in [(UNetConfig::like(&cfg), false), (five_levels, true)] {
            let vars = Vars::new(0);
            UNet::new(&unet, vars.vb(DType::F32, &Device::Cpu)).unwrap();
            let want = macs_from_weights(&vars, |name, _| match name.split('.').next().unwrap() {
                "head" => n(0),
                // A transposed conv's weight is applied at each pixel of the coarser level.
                "up" if transposed => n(level(name, "up.").unwrap() + 1),
                prefix => n(level(name, &format!("{prefix}.")).unwrap()),
            });
            assert_eq!(unet.macs(side), want, "transposed {transposed}");
        }
    }

    /// The transposed-conv upsampling equals its definition, PyTorch's `ConvTranspose2d(k = 2,
    /// stride = 2)`: out[2y + dy, 2x + dx, o] = bias[o] + sum_i x[y, x, i] w[i, o, dy, dx].
    #[test]
    fn transposed_upsampling_is_conv_transpose_2x2() {
        let (b, h, w, ci, co) = (2, 3, 2, 5, 3);
        let vars = Vars::new(3);
        let up = Up::new(ci, co, Upsample::Transposed, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::randn(0f32, 1., (b, h, w, ci), &Device::Cpu).unwrap();
        let got = up.forward(&x).unwrap();
        assert_eq!(got.dims(), [b, 2 * h, 2 * w, co]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = vars.params.get("weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = vars.params.get("bias").unwrap().to_vec1::<f32>().unwrap();
        for (n, yy, xx, o) in grid4(b, 2 * h, 2 * w, co) {
            let (y, dy, x0, dx) = (yy / 2, yy % 2, xx / 2, xx % 2);
            let want = bv[o]
                + (0..ci)
                    .map(|i| xv[((n * h + y) * w + x0) * ci + i] * wv[((i * co + o) * 2 + dy) * 2 + dx])
                    .sum::<f32>();
            let at = ((n * 2 * h + yy) * 2 * w + xx) * co + o;
            assert!((got[at] - want).abs() < 1e-5, "({n}, {yy}, {xx}, {o}): {} vs {want}", got[at]);
        }
    }

    fn grid4(a: usize, b: usize, c: usize, d: usize) -> Vec<(usize, usize, usize, usize)> {
        (0..a)
            .flat_map(|i| (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l)))))
            .collect()
    }

    /// The classic U-Net has milesial/Pytorch-UNet's `UNet(3, 2, bilinear=False)` parameter count
    /// (31,037,698, counted by `scripts/count_unet_classic_params.py`), trains end to end at five
    /// levels, and refuses sides that are not multiples of 16.
    #[test]
    fn classic_unet_matches_the_reference_size() {
        let vars = Vars::new(0);
        UNet::new(&UNetConfig::classic(3, 2), vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.num_elements(), 31_037_698);
        assert_eq!(vars.params.get("up.3.weight").unwrap().dims(), [1024, 512, 2, 2]);
        let small = UNetConfig { widths: vec![4, 8, 8, 8, 8], ..UNetConfig::classic(3, 2) };
        let vars = Vars::new(1);
        let m = UNet::new(&small, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(m.multiple(), 16);
        let xs = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let grads =
            m.forward(&xs, Mode::Train { key: 0 }).unwrap().sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let params = vars.params.vars();
        selfsup_ops::testing::assert_every_var_has_grad(params.iter().map(|(n, v)| (n.as_str(), v)), &grads);
        let e = m.forward(&Tensor::zeros((1, 3, 24, 24), DType::F32, &Device::Cpu).unwrap(), Mode::Eval).unwrap_err();
        assert!(e.to_string().contains("multiples of 16"), "{e}");
        let e = UNet::new(&UNetConfig { widths: vec![8], ..small }, Vars::new(0).vb(DType::F32, &Device::Cpu));
        assert!(e.err().unwrap().to_string().contains("at least two levels"));
    }

    /// A ResNet (both stems) and a ConvNeXt V2 under the U-Net decoder: full-resolution logits,
    /// every encoder and decoder parameter learns, the decoder's MACs equal weights x positions;
    /// a one-stage ViT and bad sides are refused by name.
    #[test]
    fn encoder_unet_over_registered_backbones() {
        use crate::{Arch, ModelConfig};
        let dev = Device::Cpu;
        let model = |arch, widths: Vec<usize>, imagenet_stem| ModelConfig {
            arch,
            in_chans: 3,
            widths: Some(widths),
            drop_path_rate: 0.0,
            img_size: Some(32),
            imagenet_stem,
            irpe: false,
        };
        for (mc, finest) in [
            (model(Arch::Resnet18, vec![4, 8, 8, 8], false), 1),
            (model(Arch::Resnet18, vec![4, 8, 8, 8], true), 4),
            (model(Arch::Convnextv2Atto, vec![8, 8, 16, 16], false), 4),
        ] {
            let (enc_vars, dec_vars) = (Vars::new(1), Vars::new(2));
            let encoder = mc.build(enc_vars.vb(DType::F32, &dev)).unwrap();
            let side = 64;
            let net = EncoderUNet::new(encoder, 3, 2, side, dec_vars.vb(DType::F32, &dev)).unwrap();
            let xs = Tensor::randn(0f32, 1., (2, 3, side, side), &dev).unwrap();
            let logits = net.forward(&xs, Mode::Train { key: 3 }).unwrap();
            assert_eq!(logits.dims(), [2, 2, side, side], "{:?}", mc.arch);
            let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            // ConvNeXt's final `head.norm` comes after the last stage: not part of a U-Net.
            let all: Vec<(String, candle_core::Var)> = enc_vars
                .params
                .vars()
                .into_iter()
                .filter(|(n, _)| !n.starts_with("head."))
                .chain(dec_vars.params.vars())
                .collect();
            selfsup_ops::testing::assert_every_var_has_grad(all.iter().map(|(n, v)| (n.as_str(), v)), &grads);
            let n = |i: usize| (side / (finest << i)).pow(2);
            let want = macs_from_weights(&dec_vars, |name, _| match name.split('.').next().unwrap() {
                "head" => n(0),
                prefix => n(level(name, &format!("{prefix}.")).unwrap()),
            });
            assert_eq!(net.decoder_macs(side), want, "{:?}", mc.arch);
            let bad = Tensor::zeros((1, 3, side + 2, side), DType::F32, &dev).unwrap();
            let e = net.forward(&bad, Mode::Eval).unwrap_err().to_string();
            assert!(e.contains("multiples of"), "{e}");
        }
        let vit =
            ModelConfig { arch: Arch::VitTinyPatch16, widths: None, ..model(Arch::VitTinyPatch16, vec![], false) };
        let vars = Vars::new(0);
        let encoder = vit.build(vars.vb(DType::F32, &dev)).unwrap();
        let e = EncoderUNet::new(encoder, 3, 2, 32, Vars::new(0).vb(DType::F32, &dev)).err().unwrap().to_string();
        assert!(e.contains("not a pyramid"), "{e}");
    }

    /// A tiny SegNetr overfits four images with rectangles to a high foreground Dice (issue 9's
    /// CI check that the network can learn a mask at all).
    #[test]
    fn tiny_segnetr_overfits_rectangles() {
        let (n, side) = (4, 32);
        let mut rng = selfsup_ops::rng::Rng::new(5);
        let mut img = vec![0f32; n * side * side];
        let mut mask = vec![0u32; n * side * side];
        for i in 0..n {
            let (y0, x0) = (rng.below(12), rng.below(12));
            let (hh, ww) = (8 + rng.below(12), 8 + rng.below(12));
            for y in 0..side {
                for x in 0..side {
                    let inside = y >= y0 && y < y0 + hh && x >= x0 && x < x0 + ww;
                    let at = (i * side + y) * side + x;
                    img[at] = if inside { 1.0 } else { 0.0 } + 0.3 * rng.normal() as f32;
                    mask[at] = inside as u32;
                }
            }
        }
        let xs = Tensor::from_vec(img, (n, 1, side, side), &Device::Cpu).unwrap();
        let target = Tensor::from_vec(mask.clone(), n * side * side, &Device::Cpu).unwrap();
        let vars = Vars::new(2);
        let m = SegNetr::new(&Config::new(1, 2, [8, 16, 16, 16]), vars.vb(DType::F32, &Device::Cpu)).unwrap();
        let params = candle_nn::ParamsAdamW { lr: 3e-3, weight_decay: 0.0, ..Default::default() };
        let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(
            vars.params.vars().into_iter().map(|(_, v)| v).collect(),
            params,
        )
        .unwrap();
        for step in 0..60 {
            let logits = m.forward(&xs, Mode::Train { key: step }).unwrap();
            let flat = logits.permute((0, 2, 3, 1)).unwrap().reshape((n * side * side, 2)).unwrap();
            let loss = candle_nn::loss::cross_entropy(&flat, &target).unwrap();
            candle_nn::Optimizer::backward_step(&mut opt, &loss).unwrap();
        }
        let pred = m
            .forward(&xs, Mode::Train { key: 99 })
            .unwrap()
            .argmax(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let (mut inter, mut total) = (0usize, 0usize);
        for (p, t) in pred.iter().zip(&mask) {
            inter += (*p == 1 && *t == 1) as usize;
            total += (*p == 1) as usize + (*t == 1) as usize;
        }
        let dice = 2.0 * inter as f64 / total as f64;
        assert!(dice > 0.9, "foreground Dice {dice}");
    }
}
