//! ResNet (He et al., CVPR 2016), channels-last, with timm's weight names.
//!
//! Reference: timm `resnet.py` (`BasicBlock`, `Bottleneck` with the stride on the 3x3 conv,
//! torchvision "v1.5"). Weight names match timm/torchvision (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, ...), so a timm state_dict loads through [`remap_key`] (which drops
//! `num_batches_tracked` and the classifier `fc`).
//!
//! Deviations and choices:
//! - Two stems: timm's ImageNet stem (7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool,
//!   through `selfsup_ops::max_pool2d_nhwc`, whose backward candle lacks) and the small-image
//!   stem (3x3 stride-1 conv + BN + ReLU, no max-pool: the CIFAR variant of solo-learn and
//!   lightly), which is the default of run configs for small images. Both name their conv
//!   `conv1`, so a timm state_dict loads into the ImageNet stem unchanged.
//! - The classifier is not part of the backbone (timm's `num_classes=0`).
//! - Stochastic depth as timm's `drop_path_rate`: block `i` of `n` (counted over all stages)
//!   drops its residual branch per sample with probability `rate * i / (n - 1)`, after the
//!   last BN and before the shortcut is added.
//! - Init follows timm: Kaiming-normal fan-out convs, BN gamma 1, beta 0; the last BN of each
//!   residual branch starts at gamma 1 (timm's `zero_init_last` is off by default).

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{drop_path, BatchNorm, Conv2d};
use crate::store::Vb;
use crate::{Backbone, Mode};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34). Expansion 1.
    Basic,
    /// 1x1 -> 3x3 (strided) -> 1x1 (ResNet-50+). Expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output width of a block per unit of stage width (1 basic, 4 bottleneck).
    pub fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// One stage: `depth` blocks of width `width` (before expansion); the first has `stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageConfig {
    pub depth: usize,
    pub width: usize,
    pub stride: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub block: BlockKind,
    pub stages: Vec<StageConfig>,
    pub in_chans: usize,
    /// Output channels of the stem conv.
    pub stem_width: usize,
    /// timm's 7x7/2 conv + 3x3/2 max-pool stem instead of the small-image 3x3/1 conv.
    #[serde(default)]
    pub imagenet_stem: bool,
    /// Stochastic-depth rate of the last block (0 = off).
    #[serde(default)]
    pub drop_path_rate: f64,
}

impl Config {
    fn standard(block: BlockKind, depths: [usize; 4], in_chans: usize) -> Self {
        let widths = [64, 128, 256, 512];
        let strides = [1, 2, 2, 2];
        let stages = (0..4).map(|i| StageConfig { depth: depths[i], width: widths[i], stride: strides[i] }).collect();
        Self { block, stages, in_chans, stem_width: 64, imagenet_stem: false, drop_path_rate: 0.0 }
    }

    pub fn resnet18(in_chans: usize) -> Self {
        Self::standard(BlockKind::Basic, [2, 2, 2, 2], in_chans)
    }

    pub fn resnet34(in_chans: usize) -> Self {
        Self::standard(BlockKind::Basic, [3, 4, 6, 3], in_chans)
    }

    pub fn resnet50(in_chans: usize) -> Self {
        Self::standard(BlockKind::Bottleneck, [3, 4, 6, 3], in_chans)
    }

    /// Replaces the stage widths (and sets the stem to the first width): a narrow network
    /// with the same topology, for small images and small machines.
    pub fn with_widths(mut self, widths: &[usize]) -> Result<Self> {
        if widths.len() != self.stages.len() || widths.contains(&0) {
            candle_core::bail!("resnet: `widths` needs {} positive values, got {widths:?}", self.stages.len())
        }
        for (s, &w) in self.stages.iter_mut().zip(widths) {
            s.width = w;
        }
        self.stem_width = widths[0];
        Ok(self)
    }

    /// Sets the stochastic-depth rate; it must lie in [0, 1).
    pub fn with_drop_path_rate(mut self, rate: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            candle_core::bail!("resnet: drop_path_rate must lie in [0, 1), got {rate}")
        }
        self.drop_path_rate = rate;
        Ok(self)
    }

    /// Channels of the final feature map.
    pub fn num_features(&self) -> usize {
        self.stages.last().map_or(self.stem_width, |s| s.width * self.block.expansion())
    }

    /// Total downsampling factor of the network.
    pub fn stride(&self) -> usize {
        self.stages.iter().map(|s| s.stride).product::<usize>() * if self.imagenet_stem { 4 } else { 1 }
    }

    /// Trainable parameters and multiply-accumulates of one `size x size` forward, counted from
    /// the config (no allocation): (params, macs). BatchNorm adds 2 parameters per channel.
    /// Every strided layer (convs padded to `k / 2`, the stem's max-pool) rounds its output side
    /// up, so a side that is not a multiple of the stride is counted as the model runs it.
    pub fn cost(&self, size: usize) -> (usize, usize) {
        let k = if self.imagenet_stem { 7 } else { 3 };
        let mut side = if self.imagenet_stem { size.div_ceil(4) } else { size };
        let stem_side = if self.imagenet_stem { size.div_ceil(2) } else { size };
        let mut params = self.in_chans * self.stem_width * k * k + 2 * self.stem_width;
        let mut macs = stem_side * stem_side * self.in_chans * self.stem_width * k * k;
        let mut c_in = self.stem_width;
        for stage in &self.stages {
            for j in 0..stage.depth {
                let stride = if j == 0 { stage.stride } else { 1 };
                let (w, c_out) = (stage.width, stage.width * self.block.expansion());
                let out_side = side.div_ceil(stride);
                let hw_out = out_side * out_side;
                // (c_in, c_out, kernel, output positions) of each conv.
                let convs: Vec<(usize, usize, usize)> = match self.block {
                    BlockKind::Basic => vec![(c_in, w, 9), (w, w, 9)],
                    BlockKind::Bottleneck => vec![(c_in, w, 1), (w, w, 9), (w, c_out, 1)],
                };
                for (i, (a, b, kk)) in convs.into_iter().enumerate() {
                    params += a * b * kk + 2 * b;
                    // The bottleneck's first 1x1 runs before the stride.
                    let positions = if self.block == BlockKind::Bottleneck && i == 0 { side * side } else { hw_out };
                    macs += positions * a * b * kk;
                }
                if stride != 1 || c_in != c_out {
                    params += c_in * c_out + 2 * c_out;
                    macs += hw_out * c_in * c_out;
                }
                c_in = c_out;
                side = out_side;
            }
        }
        (params, macs)
    }
}

#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

#[derive(Debug)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<Downsample>,
    /// Index over the whole network (keys the drop-path draw) and drop probability.
    index: usize,
    drop_path: f64,
}

impl Block {
    fn new(
        kind: BlockKind,
        c_in: usize,
        width: usize,
        stride: usize,
        index: usize,
        drop_path: f64,
        vb: Vb,
    ) -> Result<Self> {
        let c_out = width * kind.expansion();
        // (c_in, c_out, kernel, stride, padding) per conv, named conv1.. / bn1..
        let shapes = match kind {
            BlockKind::Basic => vec![(c_in, width, 3, stride, 1), (width, width, 3, 1, 1)],
            BlockKind::Bottleneck => {
                vec![(c_in, width, 1, 1, 0), (width, width, 3, stride, 1), (width, c_out, 1, 1, 0)]
            }
        };
        let mut convs = Vec::with_capacity(shapes.len());
        for (i, (ci, co, k, s, p)) in shapes.into_iter().enumerate() {
            let conv = Conv2d::no_bias(ci, co, k, s, p, vb.pp(format!("conv{}", i + 1)))?;
            let bn = BatchNorm::new(co, vb.pp(format!("bn{}", i + 1)))?;
            convs.push((conv, bn));
        }
        let downsample = if stride != 1 || c_in != c_out {
            let vb = vb.pp("downsample");
            Some(Downsample {
                conv: Conv2d::no_bias(c_in, c_out, 1, stride, 0, vb.pp("0"))?,
                bn: BatchNorm::new(c_out, vb.pp("1"))?,
            })
        } else {
            None
        };
        Ok(Self { convs, downsample, index, drop_path })
    }

    /// xs: (b, h, w, c_in) -> (b, h/stride, w/stride, c_out)
    fn forward_t(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let train = mode.is_train();
        let shortcut = match &self.downsample {
            Some(d) => d.bn.forward_t(&d.conv.forward(xs)?, train)?,
            None => xs.clone(),
        };
        let last = self.convs.len() - 1;
        let mut ys = xs.clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let zs = conv.forward(&ys)?;
            ys = if i == last { bn.forward_t(&zs, train)? } else { bn.forward_relu_t(&zs, train)? };
        }
        if let Mode::Train { key } = mode {
            ys = drop_path(&ys, self.drop_path, key, self.index as u64)?;
        }
        (ys + shortcut)?.relu()
    }
}

/// A ResNet backbone without classifier.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    cfg: Config,
}

impl ResNet {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        let conv1 = if cfg.imagenet_stem {
            Conv2d::no_bias(cfg.in_chans, cfg.stem_width, 7, 2, 3, vb.pp("conv1"))?
        } else {
            Conv2d::no_bias(cfg.in_chans, cfg.stem_width, 3, 1, 1, vb.pp("conv1"))?
        };
        let bn1 = BatchNorm::new(cfg.stem_width, vb.pp("bn1"))?;
        let mut c_in = cfg.stem_width;
        let mut layers = Vec::with_capacity(cfg.stages.len());
        let total: usize = cfg.stages.iter().map(|s| s.depth).sum();
        let mut index = 0;
        for (stage_idx, stage) in cfg.stages.iter().enumerate() {
            let vb = vb.pp(format!("layer{}", stage_idx + 1));
            let mut blocks = Vec::with_capacity(stage.depth);
            for j in 0..stage.depth {
                let stride = if j == 0 { stage.stride } else { 1 };
                let rate = cfg.drop_path_rate * index as f64 / (total.max(2) - 1) as f64;
                blocks.push(Block::new(cfg.block, c_in, stage.width, stride, index, rate, vb.pp(j))?);
                index += 1;
                c_in = stage.width * cfg.block.expansion();
            }
            layers.push(blocks);
        }
        Ok(Self { conv1, bn1, layers, cfg: cfg.clone() })
    }

    /// xs: (b, c, h, w) -> channels-last final map (b, h', w', c').
    pub fn forward_nhwc(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_stages_nhwc(xs, mode)?.pop().expect("at least one stage"))
    }

    /// xs: (b, c, h, w) -> the channels-last output of every layer (layer1..layer4).
    pub fn forward_stages_nhwc(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        let (_, c, _, _) = xs.dims4()?;
        if c != self.cfg.in_chans {
            candle_core::bail!("resnet: input has {c} channels, the model expects {}", self.cfg.in_chans)
        }
        let xs = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let mut xs = self.bn1.forward_relu_t(&self.conv1.forward(&xs)?, mode.is_train())?;
        if self.cfg.imagenet_stem {
            xs = selfsup_ops::max_pool2d_nhwc(&xs, 3, 2, 1)?;
        }
        let mut stages = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            for block in layer {
                xs = block.forward_t(&xs, mode)?;
            }
            stages.push(xs.clone());
        }
        Ok(stages)
    }
}

impl Backbone for ResNet {
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_nhwc(xs, mode)?.permute((0, 3, 1, 2))
    }

    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        self.forward_stages_nhwc(xs, mode)?.into_iter().map(|t| t.permute((0, 3, 1, 2))).collect()
    }

    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        let ys = self.forward_nhwc(xs, mode)?;
        let (b, h, w, c) = ys.dims4()?;
        ys.reshape((b, h * w, c))?.mean(1)
    }

    fn num_features(&self) -> usize {
        self.cfg.num_features()
    }

    fn stride(&self) -> usize {
        self.cfg.stride()
    }
}

/// Maps a timm/torchvision ResNet state_dict key to selfsup's, or `None` for keys the backbone
/// does not have (`num_batches_tracked`, the classifier `fc.*`).
pub fn remap_key(key: &str) -> Option<String> {
    if key.ends_with("num_batches_tracked") || key.starts_with("fc.") {
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

    fn build(cfg: &Config) -> (ResNet, Vars) {
        let vars = Vars::new(0);
        let m = ResNet::new(cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        (m, vars)
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision resnet18/50 minus the 1000-way fc, with the 7x7 stem replaced by 3x3:
        // 11_689_512 - 513_000 - 9_408 + 1_728 and 25_557_032 - 2_049_000 - 9_408 + 1_728.
        assert_eq!(build(&Config::resnet18(3)).1.params.num_elements(), 11_168_832);
        assert_eq!(build(&Config::resnet50(3)).1.params.num_elements(), 23_500_352);
        // With timm's ImageNet stem: exactly torchvision's counts minus the fc (ResNet-50 25.6M).
        let imagenet = |c: Config| Config { imagenet_stem: true, ..c };
        assert_eq!(build(&imagenet(Config::resnet18(3))).1.params.num_elements(), 11_689_512 - 513_000);
        assert_eq!(build(&imagenet(Config::resnet50(3))).1.params.num_elements(), 25_557_032 - 2_049_000);
        // The counted cost agrees with the built model, and with the usual 4.1 GMACs of
        // ResNet-50 at 224 (1.8 for ResNet-18).
        for cfg in [
            Config::resnet18(3),
            imagenet(Config::resnet50(3)),
            Config::resnet50(1).with_widths(&[4, 8, 8, 8]).unwrap(),
        ] {
            assert_eq!(cfg.cost(224).0, build(&cfg).1.params.num_elements(), "{cfg:?}");
        }
        let g50 = imagenet(Config::resnet50(3)).cost(224).1 as f64 / 1e9;
        let g18 = imagenet(Config::resnet18(3)).cost(224).1 as f64 / 1e9;
        assert!((g50 - 4.1).abs() < 0.1 && (g18 - 1.8).abs() < 0.05, "{g50} {g18}");
    }

    #[test]
    fn timm_names() {
        let (_, vars) = build(&Config::resnet18(1).with_widths(&[4, 8, 8, 8]).unwrap());
        for name in ["conv1.weight", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias"] {
            assert!(vars.params.get(name).is_some(), "{name}");
        }
        assert!(vars.buffers.get("layer2.0.downsample.1.running_var").is_some());
        assert_eq!(remap_key("layer1.0.bn1.num_batches_tracked"), None);
        assert_eq!(remap_key("fc.weight"), None);
    }

    #[test]
    fn shapes_and_input_check() {
        let cfg = Config::resnet50(1).with_widths(&[2, 4, 4, 8]).unwrap();
        let (m, _) = build(&cfg);
        let xs = Tensor::ones((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward_features(&xs, Mode::Eval).unwrap().dims(), [2, 32, 2, 2]);
        assert_eq!(m.forward_pooled(&xs, Mode::Train { key: 0 }).unwrap().dims(), [2, 32]);
        assert_eq!(m.stride(), 8);
        let bad = Tensor::ones((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward_pooled(&bad, Mode::Eval).unwrap_err().to_string().contains("3 channels"));
        assert!(Config::resnet18(1).with_widths(&[1, 2]).is_err());
    }

    #[test]
    fn off_stride_sides_round_up_in_the_model_and_its_cost() {
        // Fashion-MNIST's native 28 px at stride 8: 28 -> 14 -> 7 -> 4.
        let cfg = Config::resnet18(1).with_widths(&[2, 2, 2, 2]).unwrap();
        let (m, _) = build(&cfg);
        let xs = Tensor::ones((1, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let sides: Vec<usize> = m.forward_stages(&xs, Mode::Eval).unwrap().iter().map(|t| t.dim(3).unwrap()).collect();
        assert_eq!(sides, [28, 14, 7, 4]);
        // Width 2 everywhere: the stem is 28^2 * 1 * 2 * 9; each stage has two blocks of two
        // 3x3 convs (2 * 2 * 9 per output position); stages 2-4 open with a strided 1x1
        // downsample (2 * 2 per output position).
        let want = 28 * 28 * 18
            + sides.iter().map(|s| 4 * 36 * s * s).sum::<usize>()
            + sides[1..].iter().map(|s| 4 * s * s).sum::<usize>();
        assert_eq!(cfg.cost(28).1, want);
    }

    #[test]
    fn drop_path_follows_timms_linear_rule_and_the_key() {
        let cfg = Config::resnet18(1).with_widths(&[2, 4, 4, 4]).unwrap().with_drop_path_rate(0.3).unwrap();
        let (m, _) = build(&cfg);
        let rates: Vec<f64> = m.layers.iter().flatten().map(|b| b.drop_path).collect();
        assert_eq!(rates.len(), 8);
        assert!(rates[0] == 0.0 && (rates[7] - 0.3).abs() < 1e-12 && (rates[1] - 0.3 / 7.0).abs() < 1e-12);
        let xs = Tensor::randn(0f32, 1., (8, 1, 8, 8), &Device::Cpu).unwrap();
        // Evaluation never drops (checked before training forwards move the BN statistics).
        let eval = |m: &ResNet| m.forward_pooled(&xs, Mode::Eval).unwrap().to_vec2::<f32>().unwrap();
        let (plain, _) = build(&cfg.clone().with_drop_path_rate(0.0).unwrap());
        assert_eq!(eval(&m), eval(&plain));
        let run = |key| m.forward_pooled(&xs, Mode::Train { key }).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert!(cfg.with_drop_path_rate(1.0).is_err());
    }
}
