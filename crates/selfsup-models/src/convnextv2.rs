//! ConvNeXt V2 (Woo et al., CVPR 2023), channels-last, with timm's weight names.
//!
//! Reference: timm `convnext.py` (`ConvNeXt` with `use_grn=True, ls_init_value=None`), which
//! ports the official `models/convnextv2.py` (METHODS.md 1.5):
//! - stem `Conv 4x4 s4 (bias) -> LayerNorm2d`: `stem.0`, `stem.1`;
//! - stage `i >= 1` starts with `LayerNorm2d -> Conv 2x2 s2`: `stages.i.downsample.{0,1}`;
//! - block `dwconv 7x7 (bias) -> LayerNorm (eps 1e-6) -> Linear(C, 4C) -> GELU (erf) ->
//!   GRN(4C) -> Linear(4C, C) -> drop-path + residual`: `stages.i.blocks.j.{conv_dw, norm,
//!   mlp.fc1, mlp.grn, mlp.fc2}`; no layer scale;
//! - pooled features `LayerNorm(GAP(x))`: `head.norm` (timm's `num_classes=0` keeps it).
//!
//! Choices:
//! - timm builds atto..nano with `conv_mlp=True` (1x1 convs, weights `(4C, C, 1, 1)`) and
//!   tiny.. with Linear layers (`(4C, C)`); the two compute the same function. selfsup always
//!   uses Linear layers; [`remap_tensor`] squeezes the 1x1 conv weights of a timm state_dict.
//! - Init as timm: conv and linear weights N(0, 0.02) (timm truncates at +-2, i.e. +-100 std:
//!   never active), biases 0, norms 1/0, GRN 0/0.
//! - Drop-path rates rise linearly from 0 to `drop_path_rate` over all blocks (timm).
//! - All LayerNorms use eps 1e-6, and run through `selfsup_ops::layer_norm` (candle's fused
//!   LayerNorm drops gradients).
//!
//! FCMAE encoder mode ([`ConvNextV2::forward_masked`], METHODS.md 1.5 and Project decisions 1-2):
//! the official `SparseConvNeXtV2` runs the stem dense, zeroes the masked positions, and from
//! there on holds only the visible sites (MinkowskiEngine). selfsup does the same with the same
//! weights (the encoder *is* this backbone, timm names): [`MaskedPath::Sparse`] keeps an
//! `(n_visible, C)` site matrix through every per-site op, the 7x7 depthwise conv is the
//! submanifold conv of `selfsup_ops::sparse`, the 2x2 downsample a gather + GEMM;
//! [`MaskedPath::MaskedDense`] is the reference (JAX "mask -> dense conv -> mask": zero masked
//! positions before and after every depthwise and downsample conv and after every block, GRN
//! statistics over visible positions). Deviation from the official code: GRN normalises each
//! sample over its own visible sites (the JAX reference), not over the whole batch as
//! `MinkowskiGRN` does (ConvNeXt-V2 issue #86). The encoder has no head norm (the official
//! sparse encoder has none; the fine-tuned model's `head.norm` is trained then).

use candle_core::{Module, Result, Tensor};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use selfsup_ops::sparse::{sparse_depthwise_conv, sparse_downsample, SiteMap};

use crate::layers::{drop_path, drop_path_rows, linear_trunc_normal as linear, LayerNorm};
use crate::store::Vb;
use crate::{Backbone, Mode};

const LN_EPS: f64 = 1e-6;
const INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub depths: Vec<usize>,
    pub dims: Vec<usize>,
    pub in_chans: usize,
    #[serde(default)]
    pub drop_path_rate: f64,
}

impl Config {
    fn new(depths: [usize; 4], dims: [usize; 4], in_chans: usize) -> Self {
        Self { depths: depths.to_vec(), dims: dims.to_vec(), in_chans, drop_path_rate: 0.0 }
    }
    pub fn atto(in_chans: usize) -> Self {
        Self::new([2, 2, 6, 2], [40, 80, 160, 320], in_chans)
    }
    pub fn femto(in_chans: usize) -> Self {
        Self::new([2, 2, 6, 2], [48, 96, 192, 384], in_chans)
    }
    pub fn pico(in_chans: usize) -> Self {
        Self::new([2, 2, 6, 2], [64, 128, 256, 512], in_chans)
    }
    pub fn nano(in_chans: usize) -> Self {
        Self::new([2, 2, 8, 2], [80, 160, 320, 640], in_chans)
    }
    pub fn tiny(in_chans: usize) -> Self {
        Self::new([3, 3, 9, 3], [96, 192, 384, 768], in_chans)
    }
    pub fn base(in_chans: usize) -> Self {
        Self::new([3, 3, 27, 3], [128, 256, 512, 1024], in_chans)
    }
    pub fn large(in_chans: usize) -> Self {
        Self::new([3, 3, 27, 3], [192, 384, 768, 1536], in_chans)
    }
    pub fn huge(in_chans: usize) -> Self {
        Self::new([3, 3, 27, 3], [352, 704, 1408, 2816], in_chans)
    }

    /// Replaces the stage widths (a narrow network of the same topology).
    pub fn with_widths(mut self, widths: &[usize]) -> Result<Self> {
        if widths.len() != self.dims.len() || widths.contains(&0) {
            candle_core::bail!("convnextv2: `widths` needs {} positive values, got {widths:?}", self.dims.len())
        }
        self.dims = widths.to_vec();
        Ok(self)
    }

    pub fn with_drop_path_rate(mut self, rate: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            candle_core::bail!("convnextv2: drop_path_rate must lie in [0, 1), got {rate}")
        }
        self.drop_path_rate = rate;
        Ok(self)
    }

    pub fn num_features(&self) -> usize {
        *self.dims.last().expect("four stages")
    }

    /// Trainable parameters of the backbone (with `head.norm`), plus a `classes`-way head
    /// when `classes > 0` (the papers count the 1000-way ImageNet head).
    pub fn num_params(&self, classes: usize) -> usize {
        let d0 = self.dims[0];
        let mut n = self.in_chans * d0 * 16 + d0 + 2 * d0;
        for (i, (&depth, &d)) in self.depths.iter().zip(&self.dims).enumerate() {
            if i > 0 {
                let p = self.dims[i - 1];
                n += 2 * p + p * d * 4 + d;
            }
            n += depth * (8 * d * d + 65 * d);
        }
        let last = self.num_features();
        n + 2 * last + if classes > 0 { last * classes + classes } else { 0 }
    }

    /// Multiply-accumulates of one forward at `size x size` (backbone and head norm only).
    pub fn macs(&self, size: usize) -> usize {
        let mut hw = (size / 4) * (size / 4);
        let d0 = self.dims[0];
        let mut macs = hw * self.in_chans * d0 * 16;
        for (i, (&depth, &d)) in self.depths.iter().zip(&self.dims).enumerate() {
            if i > 0 {
                hw /= 4;
                macs += hw * self.dims[i - 1] * d * 4;
            }
            macs += depth * hw * (49 * d + 8 * d * d);
        }
        macs
    }
}

/// Conv with bias, channels-last.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

impl Conv {
    fn new(c_in: usize, c_out: usize, k: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.params.get_with_hints((c_out, c_in, k, k), "weight", INIT)?,
            bias: vb.params.get_with_hints(c_out, "bias", Init::Const(0.0))?,
            stride: k,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        selfsup_ops::conv2d_nhwc(xs, &self.weight, self.stride, 0)?.broadcast_add(&self.bias)
    }
}

/// One ConvNeXt V2 block (also FCMAE's decoder block).
pub struct Block {
    dw_weight: Tensor,
    dw_bias: Tensor,
    norm: LayerNorm,
    fc1: selfsup_ops::linear::Linear,
    grn_weight: Tensor,
    grn_bias: Tensor,
    fc2: selfsup_ops::linear::Linear,
    drop_path: f64,
    index: u64,
}

impl Block {
    /// A block of width `d` whose drop-path rate is `drop_path`; `index` keys its draws.
    pub fn new(d: usize, drop_path: f64, index: u64, vb: Vb) -> Result<Self> {
        let mlp = vb.pp("mlp");
        Ok(Self {
            dw_weight: vb.params.get_with_hints((d, 1, 7, 7), "conv_dw.weight", INIT)?,
            dw_bias: vb.params.get_with_hints(d, "conv_dw.bias", Init::Const(0.0))?,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
            fc1: linear(d, 4 * d, mlp.pp("fc1"))?,
            grn_weight: mlp.params.get_with_hints(4 * d, "grn.weight", Init::Const(0.0))?,
            grn_bias: mlp.params.get_with_hints(4 * d, "grn.bias", Init::Const(0.0))?,
            fc2: linear(4 * d, d, mlp.pp("fc2"))?,
            drop_path,
            index,
        })
    }

    /// xs: (b, h, w, d) -> same.
    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, h, w, d) = xs.dims4()?;
        let ys = selfsup_ops::dwconv::depthwise_conv2d_nhwc(xs, &self.dw_weight, Some(&self.dw_bias), 1, 3)?;
        let ys = self.norm.forward(&ys)?.reshape((b * h * w, d))?;
        let ys = selfsup_ops::gelu::gelu_erf(&self.fc1.forward(&ys)?)?.reshape((b, h, w, 4 * d))?;
        let ys = selfsup_ops::grn::grn(&ys, &self.grn_weight, &self.grn_bias)?.reshape((b * h * w, 4 * d))?;
        let mut ys = self.fc2.forward(&ys)?.reshape((b, h, w, d))?;
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, self.index)?;
        }
        xs + ys
    }

    /// Sparse form: xs (n, d) are the sites of `map`, `nb` its 7x7 neighbour table.
    fn forward_sites(
        &self,
        xs: &Tensor,
        map: &SiteMap,
        nb: &selfsup_ops::sparse::Neighbours,
        mode: Mode,
    ) -> Result<Tensor> {
        let ys = sparse_depthwise_conv(xs, nb, &self.dw_weight, Some(&self.dw_bias))?;
        let ys = selfsup_ops::gelu::gelu_erf(&self.fc1.forward(&self.norm.forward(&ys)?)?)?;
        let ys = selfsup_ops::grn::grn_sites(&ys, map.offsets(), &self.grn_weight, &self.grn_bias)?;
        let mut ys = self.fc2.forward(&ys)?;
        if let Mode::Train { key } = mode {
            ys = drop_path_rows(&ys, map.offsets(), self.drop_path, key, self.index)?;
        }
        xs + ys
    }

    /// Masked-dense reference of [`Self::forward_sites`]: xs (b, h, w, d), `vis` (b, h, w, 1)
    /// is 1 at visible positions. Plain candle ops and the dense reference conv throughout.
    fn forward_masked_dense(&self, xs: &Tensor, vis: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, h, w, d) = xs.dims4()?;
        let ys = selfsup_ops::dwconv::depthwise_conv2d_nhwc_reference(
            &xs.broadcast_mul(vis)?,
            &self.dw_weight,
            Some(&self.dw_bias),
            1,
            3,
        )?
        .broadcast_mul(vis)?;
        let ys = self.norm.forward(&ys)?.reshape((b * h * w, d))?;
        let ys = self.fc1.forward(&ys)?.gelu_erf()?.reshape((b, h, w, 4 * d))?;
        // GRN with its statistics over the visible positions only.
        let gx = ys.broadcast_mul(vis)?.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
        let nx = gx.broadcast_div(&(gx.mean_keepdim(3)? + 1e-6)?)?;
        let ys = (ys.broadcast_mul(&nx)?.broadcast_mul(&self.grn_weight)?.broadcast_add(&self.grn_bias)? + &ys)?;
        let mut ys = self.fc2.forward(&ys.reshape((b * h * w, 4 * d))?)?.reshape((b, h, w, d))?;
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, self.index)?;
        }
        (xs + ys)?.broadcast_mul(vis)
    }
}

/// How [`ConvNextV2::forward_masked`] computes (both give the same values and gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskedPath {
    /// Visible sites only, submanifold depthwise conv (the fast path).
    Sparse,
    /// Dense maps with masked positions zeroed around every conv (the reference).
    MaskedDense,
}

struct Stage {
    downsample: Option<(LayerNorm, Conv)>,
    blocks: Vec<Block>,
}

/// A ConvNeXt V2 backbone without classifier.
pub struct ConvNextV2 {
    stem: (Conv, LayerNorm),
    stages: Vec<Stage>,
    head_norm: LayerNorm,
    cfg: Config,
}

impl ConvNextV2 {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        if cfg.depths.len() != 4 || cfg.dims.len() != 4 {
            candle_core::bail!("convnextv2: four stages expected, got depths {:?} dims {:?}", cfg.depths, cfg.dims)
        }
        let stem = (
            Conv::new(cfg.in_chans, cfg.dims[0], 4, vb.pp("stem.0"))?,
            LayerNorm::new(cfg.dims[0], LN_EPS, vb.pp("stem.1"))?,
        );
        let total: usize = cfg.depths.iter().sum();
        let mut index = 0usize;
        let mut stages = Vec::with_capacity(4);
        for (i, (&depth, &d)) in cfg.depths.iter().zip(&cfg.dims).enumerate() {
            let vb = vb.pp(format!("stages.{i}"));
            let downsample = if i > 0 {
                let p = cfg.dims[i - 1];
                Some((LayerNorm::new(p, LN_EPS, vb.pp("downsample.0"))?, Conv::new(p, d, 2, vb.pp("downsample.1"))?))
            } else {
                None
            };
            let mut blocks = Vec::with_capacity(depth);
            for j in 0..depth {
                let rate = cfg.drop_path_rate * index as f64 / (total.max(2) - 1) as f64;
                blocks.push(Block::new(d, rate, index as u64, vb.pp(format!("blocks.{j}")))?);
                index += 1;
            }
            stages.push(Stage { downsample, blocks });
        }
        let head_norm = LayerNorm::new(cfg.num_features(), LN_EPS, vb.pp("head.norm"))?;
        Ok(Self { stem, stages, head_norm, cfg: cfg.clone() })
    }

    /// xs: (b, c, h, w) -> channels-last final map (b, h/32, w/32, c').
    pub fn forward_nhwc(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_stages_nhwc(xs, mode)?.pop().expect("four stages"))
    }

    /// xs: (b, c, h, w) -> the channels-last output of every stage.
    pub fn forward_stages_nhwc(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        let mut xs = self.stem_nhwc(xs)?;
        let mut out = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                xs = conv.forward(&norm.forward(&xs)?)?;
            }
            for block in &stage.blocks {
                xs = block.forward(&xs, mode)?;
            }
            out.push(xs.clone());
        }
        Ok(out)
    }
}

impl ConvNextV2 {
    /// FCMAE's encoder. xs: (b, c, h, w); `visible`: the patch mask on the (h/32, w/32) grid of
    /// the last stage (true = visible). Returns the last stage's map (b, h/32, w/32, C),
    /// channels-last, zero at masked positions (the official `.dense()`), without head norm.
    pub fn forward_masked(&self, xs: &Tensor, visible: &SiteMap, path: MaskedPath, mode: Mode) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        if (visible.batch, visible.h, visible.w) != (b, h / 32, w / 32) {
            candle_core::bail!(
                "convnextv2: the mask grid is ({}, {}, {}), a ({b}, 3, {h}, {w}) input needs ({b}, {}, {})",
                visible.batch,
                visible.h,
                visible.w,
                h / 32,
                w / 32
            )
        }
        let stem = self.stem_nhwc(xs)?;
        let levels = self.stages.len() - 1;
        let mut map = visible.upsample(1 << levels)?;
        match path {
            MaskedPath::Sparse => {
                let mut sites = map.gather(&stem)?;
                for stage in &self.stages {
                    if let Some((norm, conv)) = &stage.downsample {
                        (sites, map) = sparse_downsample(&norm.forward(&sites)?, &map, &conv.weight, Some(&conv.bias))?;
                    }
                    let nb = map.neighbours(7)?;
                    for block in &stage.blocks {
                        sites = block.forward_sites(&sites, &map, &nb, mode)?;
                    }
                }
                map.scatter(&sites)
            }
            MaskedPath::MaskedDense => {
                let mut vis = map.visible_mask(xs.device())?;
                let mut ys = stem.broadcast_mul(&vis)?;
                for stage in &self.stages {
                    if let Some((norm, conv)) = &stage.downsample {
                        map = map.downsample2()?.0;
                        let next = map.visible_mask(xs.device())?;
                        let zs = norm.forward(&ys)?.broadcast_mul(&vis)?;
                        ys = selfsup_ops::conv::conv2d_nhwc(&zs, &conv.weight, 2, 0)?
                            .broadcast_add(&conv.bias)?
                            .broadcast_mul(&next)?;
                        vis = next;
                    }
                    for block in &stage.blocks {
                        ys = block.forward_masked_dense(&ys, &vis, mode)?;
                    }
                }
                Ok(ys)
            }
        }
    }

    /// Checks the input and runs the stem: (b, c, h, w) -> (b, h/4, w/4, d0).
    fn stem_nhwc(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = xs.dims4()?;
        if c != self.cfg.in_chans {
            candle_core::bail!("convnextv2: input has {c} channels, the model expects {}", self.cfg.in_chans)
        }
        if h % 32 != 0 || w % 32 != 0 {
            candle_core::bail!("convnextv2: input {h}x{w} is not a multiple of the stride 32")
        }
        let xs = xs.permute((0, 2, 3, 1))?.contiguous()?;
        self.stem.1.forward(&self.stem.0.forward(&xs)?)
    }
}

impl Backbone for ConvNextV2 {
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_nhwc(xs, mode)?.permute((0, 3, 1, 2))
    }

    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        self.forward_stages_nhwc(xs, mode)?.into_iter().map(|t| t.permute((0, 3, 1, 2))).collect()
    }

    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let ys = self.forward_nhwc(xs, mode)?;
        let (b, h, w, c) = ys.dims4()?;
        self.head_norm.forward(&ys.reshape((b, h * w, c))?.mean(1)?)
    }

    fn num_features(&self) -> usize {
        self.cfg.num_features()
    }

    fn stride(&self) -> usize {
        32
    }
}

/// Maps a timm ConvNeXt V2 state_dict key to selfsup's, or `None` for the classifier.
pub fn remap_key(key: &str) -> Option<String> {
    if key.starts_with("head.fc.") {
        None
    } else {
        Some(key.to_string())
    }
}

/// timm's `conv_mlp=True` variants (atto..nano) store the MLP as 1x1 convs: squeeze their
/// `(o, i, 1, 1)` weights to the Linear layers' `(o, i)`.
pub fn remap_tensor(key: &str, t: Tensor) -> Result<Tensor> {
    if (key.ends_with("mlp.fc1.weight") || key.ends_with("mlp.fc2.weight")) && t.rank() == 4 {
        let (o, i, _, _) = t.dims4()?;
        return t.reshape((o, i));
    }
    // timm's channels-first GRN (conv_mlp) keeps (1, C, 1, 1) parameters.
    if (key.ends_with("grn.weight") || key.ends_with("grn.bias")) && t.rank() > 1 {
        return t.flatten_all();
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Vars;
    use candle_core::{DType, Device};

    #[test]
    fn parameter_counts_match_the_paper() {
        // Paper / README (with the 1000-way head), in millions, as rounded there.
        let want = [
            (Config::atto(3), 3.7),
            (Config::femto(3), 5.2),
            (Config::pico(3), 9.1),
            (Config::nano(3), 15.6),
            (Config::tiny(3), 28.6),
            (Config::base(3), 89.0),
            (Config::large(3), 198.0),
            (Config::huge(3), 660.0),
        ];
        for (cfg, m) in want {
            let n = cfg.num_params(1000) as f64 / 1e6;
            assert!((n - m).abs() / m < 0.01, "{cfg:?}: {n:.2}M vs {m}M");
        }
        // The formula is the model: atto built and counted (without the head).
        let vars = Vars::new(0);
        ConvNextV2::new(&Config::atto(3), vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.num_elements(), Config::atto(3).num_params(0));
        // "FLOPs" at 224 in the paper are multiply-accumulates (fvcore): atto 0.55 G, tiny 4.47 G.
        for (cfg, g) in [(Config::atto(3), 0.55), (Config::tiny(3), 4.47), (Config::base(3), 15.4)] {
            let got = cfg.macs(224) as f64 / 1e9;
            assert!((got - g).abs() / g < 0.03, "{cfg:?}: {got} vs {g}");
        }
    }

    #[test]
    fn timm_names_and_shapes() {
        let cfg = Config::atto(3).with_widths(&[8, 16, 24, 32]).unwrap();
        let vars = Vars::new(0);
        let m = ConvNextV2::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        for name in [
            "stem.0.weight",
            "stem.1.bias",
            "stages.1.downsample.0.weight",
            "stages.1.downsample.1.weight",
            "stages.2.blocks.5.conv_dw.weight",
            "stages.3.blocks.1.mlp.grn.weight",
            "stages.0.blocks.0.mlp.fc2.bias",
            "head.norm.weight",
        ] {
            assert!(vars.params.get(name).is_some(), "{name}");
        }
        let xs = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
        assert_eq!(m.forward_features(&xs, Mode::Eval).unwrap().dims(), [2, 32, 2, 2]);
        assert_eq!(m.forward_pooled(&xs, Mode::Eval).unwrap().dims(), [2, 32]);
        let bad = Tensor::zeros((1, 3, 40, 40), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward_pooled(&bad, Mode::Eval).unwrap_err().to_string().contains("multiple of the stride 32"));
        let w = remap_tensor(
            "stages.0.blocks.0.mlp.fc1.weight",
            Tensor::zeros((32, 8, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
        assert_eq!(w.unwrap().dims(), [32, 8]);
        assert_eq!(remap_key("head.fc.weight"), None);
    }

    fn random_mask(b: usize, g: usize, keep: usize, seed: u64) -> SiteMap {
        let mut rng = selfsup_ops::rng::Rng::new(seed);
        let mut vis = vec![false; b * g * g];
        for s in 0..b {
            let mut order: Vec<usize> = (0..g * g).collect();
            rng.shuffle(&mut order);
            for &j in &order[..keep] {
                vis[s * g * g + j] = true;
            }
        }
        SiteMap::from_visible(&vis, b, g, g).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f32::max)
    }

    /// Project decision 1: the sparse encoder equals the masked-dense reference, values and
    /// the gradient of every parameter, with drop-path active (same per-sample draws).
    #[test]
    fn sparse_encoder_equals_masked_dense() {
        let cfg = Config::atto(3).with_widths(&[8, 16, 16, 24]).unwrap().with_drop_path_rate(0.3).unwrap();
        let vars = Vars::new(4);
        let m = ConvNextV2::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        // Non-zero biases and GRN parameters everywhere, so masked positions carry values in
        // the dense path and the visible-only statistics matter.
        for (_, v) in vars.params.vars() {
            v.set(&(v.as_tensor() + v.as_tensor().randn_like(0.0, 0.2).unwrap()).unwrap()).unwrap();
        }
        let xs = Tensor::randn(0f32, 1., (3, 3, 96, 96), &Device::Cpu).unwrap();
        let mask = random_mask(3, 3, 4, 11);
        let mode = Mode::Train { key: 5 };
        let sparse = m.forward_masked(&xs, &mask, MaskedPath::Sparse, mode).unwrap();
        let dense = m.forward_masked(&xs, &mask, MaskedPath::MaskedDense, mode).unwrap();
        assert_eq!(sparse.dims(), [3, 3, 3, 24]);
        assert!(max_rel(&sparse, &dense) < 1e-4, "{}", max_rel(&sparse, &dense));
        // Masked positions are exactly zero.
        let flat = sparse.reshape((27, 24)).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in flat.iter().enumerate() {
            let visible = mask.is_visible(i / 9, (i / 3) % 3, i % 3);
            assert_eq!(row.iter().any(|&x| x != 0.0), visible, "site {i}");
        }
        let weights = Tensor::randn(0f32, 1., sparse.shape(), &Device::Cpu).unwrap();
        let gs = (&sparse * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gd = (&dense * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in vars.params.vars() {
            if name.starts_with("head.") {
                continue;
            }
            let (a, b) = (gs.get(v.as_tensor()), gd.get(v.as_tensor()));
            let (a, b) = (a.unwrap_or_else(|| panic!("sparse: no grad for {name}")), b.unwrap());
            assert!(max_rel(a, b) < 1e-3, "{name}: {}", max_rel(a, b));
        }
    }

    /// With nothing masked both paths are the plain dense forward.
    #[test]
    fn unmasked_encoder_is_the_dense_backbone() {
        let cfg = Config::atto(1).with_widths(&[8, 8, 16, 16]).unwrap();
        let vars = Vars::new(2);
        let m = ConvNextV2::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 1, 64, 64), &Device::Cpu).unwrap();
        let all = SiteMap::from_visible(&[true; 8], 2, 2, 2).unwrap();
        let want = m.forward_nhwc(&xs, Mode::Eval).unwrap();
        for path in [MaskedPath::Sparse, MaskedPath::MaskedDense] {
            let got = m.forward_masked(&xs, &all, path, Mode::Eval).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "{path:?}");
        }
        let wrong = SiteMap::from_visible(&[true; 18], 2, 3, 3).unwrap();
        let e = m.forward_masked(&xs, &wrong, MaskedPath::Sparse, Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("mask grid is (2, 3, 3)"), "{e}");
    }
}
