//! CvT: Convolutional vision Transformer (Wu et al., ICCV 2021) with HF transformers' names.
//!
//! Reference: the official `lib/models/cls_cvt.py` (METHODS.md 1.2) for the computation, HF
//! transformers `CvtModel` for the weight names (Project decision 5): `encoder.stages.i.
//! {embedding.convolution_embeddings.{projection, normalization}, cls_token, layers.j.
//! {layernorm_before, attention.attention.{convolution_projection_{query,key,value}.
//! convolution_projection.{convolution, normalization}, projection_{query,key,value}},
//! attention.output.dense, layernorm_after, intermediate.dense, output.dense}}` and the pooled
//! features' `layernorm` (of `CvtForImageClassification`). [`remap_key`] drops HF's `cvt.`
//! prefix, the classifier and `num_batches_tracked`.
//!
//! - Stage: conv token embedding (`Conv2d(k, s, p)` with bias -> LayerNorm over channels), then
//!   pre-norm blocks; the class token (last stage only) joins the tokens after the embedding.
//! - Attention: the class token is split off, the map goes through a depthwise 3x3 conv (no
//!   bias) + BatchNorm for each of q/k/v (stride 1 for q, 2 for k and v), the class token is put
//!   back in front, then Linear projections with bias, multi-head attention with
//!   **scale = dim^-0.5 (the full embedding dim, not the head dim)**, and the output Linear. It
//!   runs through `selfsup_ops::attention::window_attention` (one window, `lq != lk`).
//! - LayerNorm eps 1e-5 (PyTorch's default), through selfsup-ops.
//!
//! Deviations between the references, and the choice made:
//! - The official MLP uses QuickGELU (`x * sigmoid(1.702 x)`); HF's port uses exact GELU.
//!   `quick_gelu = true` (the default) follows the official code that trained the published
//!   weights; the golden test against HF sets it to false.
//! - HF applies the second drop-path to the block output *after* the residual add and indexes
//!   its per-layer rates by the stage number; selfsup drops only the branch, with the official
//!   per-stage linear rates. Both are the identity in evaluation.

use candle_core::{Module, Result, Tensor};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use crate::layers::{drop_path, linear_trunc_normal as linear, BatchNorm, LayerNorm};
use crate::store::Vb;
use crate::{Backbone, Mode};

const LN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub in_chans: usize,
    pub embed_dim: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub depth: Vec<usize>,
    /// Conv token embedding kernel / stride / padding per stage.
    pub patch: Vec<[usize; 3]>,
    /// Stochastic-depth rate reached by the last block of each stage.
    pub drop_path_rate: Vec<f64>,
    #[serde(default = "yes")]
    pub quick_gelu: bool,
}

fn yes() -> bool {
    true
}

impl Config {
    fn new(embed_dim: [usize; 3], num_heads: [usize; 3], depth: [usize; 3], dpr: f64, in_chans: usize) -> Self {
        Self {
            in_chans,
            embed_dim: embed_dim.to_vec(),
            num_heads: num_heads.to_vec(),
            depth: depth.to_vec(),
            patch: vec![[7, 4, 2], [3, 2, 1], [3, 2, 1]],
            drop_path_rate: vec![0.0, 0.0, dpr],
            quick_gelu: true,
        }
    }
    pub fn cvt13(in_chans: usize) -> Self {
        Self::new([64, 192, 384], [1, 3, 6], [1, 2, 10], 0.1, in_chans)
    }
    pub fn cvt21(in_chans: usize) -> Self {
        Self::new([64, 192, 384], [1, 3, 6], [1, 4, 16], 0.1, in_chans)
    }
    pub fn cvt_w24(in_chans: usize) -> Self {
        Self::new([192, 768, 1024], [3, 12, 16], [2, 2, 20], 0.3, in_chans)
    }

    pub fn num_features(&self) -> usize {
        *self.embed_dim.last().expect("three stages")
    }

    /// Trainable parameters (with the pooled `layernorm`), plus a `classes`-way head.
    pub fn num_params(&self, classes: usize) -> usize {
        let mut n = 0;
        let mut c_in = self.in_chans;
        for (i, &d) in self.embed_dim.iter().enumerate() {
            let k = self.patch[i][0];
            n += c_in * d * k * k + d + 2 * d;
            // Per block: 3 x (dw 3x3 + BN 2d) + 3 Linear + out Linear + 2 LN + MLP.
            let block = 3 * (9 * d + 2 * d) + 4 * (d * d + d) + 4 * d + (4 * d * d + 4 * d) + (4 * d * d + d);
            n += self.depth[i] * block;
            c_in = d;
        }
        let last = self.num_features();
        n + last + 2 * last + if classes > 0 { last * classes + classes } else { 0 }
    }
}

impl Config {
    /// Multiply-accumulates of one `size x size` forward.
    pub fn macs(&self, size: usize) -> usize {
        let (mut side, mut c_in, mut macs) = (size, self.in_chans, 0);
        for (i, &d) in self.embed_dim.iter().enumerate() {
            let [k, s, p] = self.patch[i];
            side = (side + 2 * p - k) / s + 1;
            let hw = side * side;
            macs += hw * c_in * d * k * k;
            let cls = (i + 1 == self.embed_dim.len()) as usize;
            let kv_side = (side + 2 - 3) / 2 + 1;
            let (n, nk) = (hw + cls, kv_side * kv_side + cls);
            let layer = hw * 9 * d + 2 * kv_side * kv_side * 9 * d // dw projections
                + n * d * d + 2 * nk * d * d // q, k, v Linear
                + 2 * n * nk * d // scores and weighted sum
                + n * d * d + 8 * n * d * d; // output and MLP
            macs += self.depth[i] * layer;
            c_in = d;
        }
        macs
    }
}

/// Depthwise 3x3 conv (no bias) + BatchNorm: HF's `convolution_projection`.
struct ConvProjection {
    weight: Tensor,
    bn: BatchNorm,
    stride: usize,
}

impl ConvProjection {
    fn new(d: usize, stride: usize, vb: Vb) -> Result<Self> {
        let vb = vb.pp("convolution_projection");
        let hint = Init::Kaiming {
            dist: candle_nn::init::NormalOrUniform::Uniform,
            fan: candle_nn::init::FanInOut::FanIn,
            non_linearity: candle_nn::init::NonLinearity::ReLU,
        };
        Ok(Self {
            weight: vb.params.get_with_hints((d, 1, 3, 3), "convolution.weight", hint)?,
            bn: BatchNorm::new(d, vb.pp("normalization"))?,
            stride,
        })
    }

    /// map (b, h, w, d) -> tokens (b, h' * w', d).
    fn forward(&self, map: &Tensor, train: bool) -> Result<Tensor> {
        let ys = selfsup_ops::dwconv::depthwise_conv2d_nhwc(map, &self.weight, None, self.stride, 1)?;
        let ys = self.bn.forward_t(&ys, train)?;
        let (b, h, w, d) = ys.dims4()?;
        ys.reshape((b, h * w, d))
    }
}

struct Layer {
    norm_before: LayerNorm,
    proj_q: ConvProjection,
    proj_k: ConvProjection,
    proj_v: ConvProjection,
    q: selfsup_ops::linear::Linear,
    k: selfsup_ops::linear::Linear,
    v: selfsup_ops::linear::Linear,
    out: selfsup_ops::linear::Linear,
    norm_after: LayerNorm,
    fc1: selfsup_ops::linear::Linear,
    fc2: selfsup_ops::linear::Linear,
    heads: usize,
    quick_gelu: bool,
    drop_path: f64,
    index: u64,
}

impl Layer {
    fn new(d: usize, heads: usize, quick_gelu: bool, drop_path: f64, index: u64, vb: Vb) -> Result<Self> {
        let att = vb.pp("attention.attention");
        Ok(Self {
            norm_before: LayerNorm::new(d, LN_EPS, vb.pp("layernorm_before"))?,
            proj_q: ConvProjection::new(d, 1, att.pp("convolution_projection_query"))?,
            proj_k: ConvProjection::new(d, 2, att.pp("convolution_projection_key"))?,
            proj_v: ConvProjection::new(d, 2, att.pp("convolution_projection_value"))?,
            q: linear(d, d, att.pp("projection_query"))?,
            k: linear(d, d, att.pp("projection_key"))?,
            v: linear(d, d, att.pp("projection_value"))?,
            out: linear(d, d, vb.pp("attention.output.dense"))?,
            norm_after: LayerNorm::new(d, LN_EPS, vb.pp("layernorm_after"))?,
            fc1: linear(d, 4 * d, vb.pp("intermediate.dense"))?,
            fc2: linear(4 * d, d, vb.pp("output.dense"))?,
            heads,
            quick_gelu,
            drop_path,
            index,
        })
    }

    /// xs: (b, cls + h * w, d) tokens of an `h x w` map -> same.
    fn forward(&self, xs: &Tensor, (h, w): (usize, usize), cls: bool, mode: Mode) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let y = self.norm_before.forward(xs)?;
        let c = cls as usize;
        let map = y.narrow(1, c, n - c)?.reshape((b, h, w, d))?;
        let train = mode.is_train();
        let with_cls = |t: Tensor| -> Result<Tensor> {
            if cls {
                Tensor::cat(&[&y.narrow(1, 0, 1)?, &t], 1)
            } else {
                Ok(t)
            }
        };
        let project = |lin: &selfsup_ops::linear::Linear, t: Tensor| -> Result<Tensor> {
            let (b, l, _) = t.dims3()?;
            lin.forward(&t.reshape((b * l, d))?)?.reshape((b, l, self.heads, d / self.heads))
        };
        let q = project(&self.q, with_cls(self.proj_q.forward(&map, train)?)?)?;
        let k = project(&self.k, with_cls(self.proj_k.forward(&map, train)?)?)?;
        let v = project(&self.v, with_cls(self.proj_v.forward(&map, train)?)?)?;
        let pos = selfsup_ops::attention::PositionBias::default();
        // CvT scales by the full embedding dim (`dim_out ** -0.5`), not the head dim.
        let att = selfsup_ops::attention::window_attention(&q, &k, &v, (d as f64).powf(-0.5), &pos)?;
        let mut att = self.out.forward(&att.reshape((b * n, d))?)?.reshape((b, n, d))?;
        // The two branches of block i draw as drop-path layers 2i and 2i + 1.
        if let Mode::Train { key } = mode {
            att = drop_path(&att, self.drop_path, key, 2 * self.index)?;
        }
        let xs = (xs + att)?;
        let z = self.fc1.forward(&self.norm_after.forward(&xs)?.reshape((b * n, d))?)?;
        let z = if self.quick_gelu {
            (&z * candle_nn::ops::sigmoid(&(&z * 1.702)?)?)?
        } else {
            selfsup_ops::gelu::gelu_erf(&z)?
        };
        let mut z = self.fc2.forward(&z)?.reshape((b, n, d))?;
        if let Mode::Train { key } = mode {
            z = drop_path(&z, self.drop_path, key, 2 * self.index + 1)?;
        }
        xs + z
    }
}

struct Stage {
    embed_weight: Tensor,
    embed_bias: Tensor,
    embed_norm: LayerNorm,
    stride: usize,
    padding: usize,
    cls_token: Option<Tensor>,
    layers: Vec<Layer>,
}

/// A CvT backbone without classifier.
pub struct Cvt {
    stages: Vec<Stage>,
    norm: LayerNorm,
    cfg: Config,
}

impl Cvt {
    pub fn new(cfg: &Config, vb: Vb) -> Result<Self> {
        let n = cfg.embed_dim.len();
        if n == 0
            || [cfg.num_heads.len(), cfg.depth.len(), cfg.patch.len(), cfg.drop_path_rate.len()].iter().any(|&l| l != n)
        {
            candle_core::bail!("cvt: embed_dim, num_heads, depth, patch and drop_path_rate need one entry per stage")
        }
        let mut stages = Vec::with_capacity(n);
        let mut c_in = cfg.in_chans;
        let mut index = 0u64;
        for i in 0..n {
            let (d, [k, stride, padding]) = (cfg.embed_dim[i], cfg.patch[i]);
            if cfg.num_heads[i] == 0 || !d.is_multiple_of(cfg.num_heads[i]) {
                candle_core::bail!("cvt: stage {i} dim {d} is not a multiple of its {} heads", cfg.num_heads[i])
            }
            let vb = vb.pp(format!("encoder.stages.{i}"));
            let emb = vb.pp("embedding.convolution_embeddings");
            let init = Init::Randn { mean: 0.0, stdev: 0.02 };
            let last = i + 1 == n;
            let layers = (0..cfg.depth[i])
                .map(|j| {
                    // The official per-stage linspace from 0 to the stage's rate.
                    let rate = cfg.drop_path_rate[i] * j as f64 / (cfg.depth[i].max(2) - 1) as f64;
                    index += 1;
                    Layer::new(d, cfg.num_heads[i], cfg.quick_gelu, rate, index, vb.pp(format!("layers.{j}")))
                })
                .collect::<Result<_>>()?;
            stages.push(Stage {
                embed_weight: emb.params.get_with_hints((d, c_in, k, k), "projection.weight", init)?,
                embed_bias: emb.params.get_with_hints(d, "projection.bias", Init::Const(0.0))?,
                embed_norm: LayerNorm::new(d, LN_EPS, emb.pp("normalization"))?,
                stride,
                padding,
                cls_token: if last { Some(vb.params.get_with_hints((1, 1, d), "cls_token", init)?) } else { None },
                layers,
            });
            c_in = d;
        }
        let norm = LayerNorm::new(cfg.num_features(), LN_EPS, vb.pp("layernorm"))?;
        Ok(Self { stages, norm, cfg: cfg.clone() })
    }

    /// xs: (b, c, h, w) -> (last map (b, h', w', d) channels-last, class token (b, d)).
    pub fn forward_parts(&self, xs: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let (mut maps, cls) = self.forward_all(xs, mode)?;
        Ok((maps.pop().expect("at least one stage"), cls))
    }

    /// xs: (b, c, h, w) -> (every stage's map, channels-last, class token (b, d)).
    fn forward_all(&self, xs: &Tensor, mode: Mode) -> Result<(Vec<Tensor>, Tensor)> {
        let (_, c, _, _) = xs.dims4()?;
        if c != self.cfg.in_chans {
            candle_core::bail!("cvt: input has {c} channels, the model expects {}", self.cfg.in_chans)
        }
        let mut map = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let mut maps = Vec::with_capacity(self.stages.len());
        let mut cls = None;
        for stage in &self.stages {
            let e = selfsup_ops::conv2d_nhwc(&map, &stage.embed_weight, stage.stride, stage.padding)?
                .broadcast_add(&stage.embed_bias)?;
            let (b, h, w, d) = e.dims4()?;
            let mut tokens = stage.embed_norm.forward(&e.reshape((b, h * w, d))?)?;
            if let Some(t) = &stage.cls_token {
                tokens = Tensor::cat(&[&t.broadcast_as((b, 1, d))?.contiguous()?, &tokens], 1)?;
            }
            for layer in &stage.layers {
                tokens = layer.forward(&tokens, (h, w), stage.cls_token.is_some(), mode)?;
            }
            let c0 = stage.cls_token.is_some() as usize;
            if c0 == 1 {
                cls = Some(tokens.narrow(1, 0, 1)?.squeeze(1)?);
            }
            map = tokens.narrow(1, c0, h * w)?.reshape((b, h, w, d))?;
            maps.push(map.clone());
        }
        let cls = match cls {
            Some(c) => c,
            None => {
                let (b, h, w, d) = map.dims4()?;
                map.reshape((b, h * w, d))?.mean(1)?
            }
        };
        Ok((maps, cls))
    }
}

impl Backbone for Cvt {
    fn forward_features(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_parts(xs, mode)?.0.permute((0, 3, 1, 2))
    }

    fn forward_stages(&self, xs: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        self.forward_all(xs, mode)?.0.into_iter().map(|t| t.permute((0, 3, 1, 2))).collect()
    }

    /// The class token after `layernorm` (the mean token where the last stage has none).
    fn forward_pooled(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.norm.forward(&self.forward_parts(xs, mode)?.1)
    }

    fn num_features(&self) -> usize {
        self.cfg.num_features()
    }

    fn stride(&self) -> usize {
        self.cfg.patch.iter().map(|p| p[1]).product()
    }
}

/// Maps an HF `CvtModel` / `CvtForImageClassification` key to selfsup's, or `None`.
pub fn remap_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("cvt.").unwrap_or(key);
    if key.starts_with("classifier.") || key.ends_with("num_batches_tracked") {
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
    fn parameter_counts_match_the_paper() {
        // README: CvT-13 20M, CvT-21 32M, CvT-W24 277M (with the 1000-way head), as rounded.
        for (cfg, m) in [(Config::cvt13(3), 20.0), (Config::cvt21(3), 32.0), (Config::cvt_w24(3), 277.0)] {
            let n = cfg.num_params(1000) as f64 / 1e6;
            assert!((n - m).abs() / m < 0.03, "{n:.2}M vs {m}M");
        }
        // README: 4.5 / 7.1 GFLOPs (multiply-accumulates) at 224 for CvT-13 / CvT-21.
        for (cfg, g) in [(Config::cvt13(3), 4.5), (Config::cvt21(3), 7.1)] {
            let got = cfg.macs(224) as f64 / 1e9;
            assert!((got - g).abs() / g < 0.05, "{got} vs {g}");
        }
        let cfg = Config { depth: vec![1, 1, 1], ..Config::cvt13(3) };
        let vars = Vars::new(0);
        Cvt::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.num_elements(), cfg.num_params(0));
    }

    #[test]
    fn shapes_and_names() {
        let cfg =
            Config { embed_dim: vec![8, 12, 16], num_heads: vec![1, 2, 2], depth: vec![1, 1, 2], ..Config::cvt13(3) };
        let vars = Vars::new(0);
        let m = Cvt::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        for name in [
            "encoder.stages.0.embedding.convolution_embeddings.projection.weight",
            "encoder.stages.2.cls_token",
            "encoder.stages.1.layers.0.attention.attention.convolution_projection_key.convolution_projection.convolution.weight",
            "encoder.stages.2.layers.1.attention.output.dense.bias",
            "layernorm.weight",
        ] {
            assert!(vars.params.get(name).is_some(), "{name}");
        }
        assert!(vars
            .buffers
            .get("encoder.stages.0.layers.0.attention.attention.convolution_projection_query.convolution_projection.normalization.running_var")
            .is_some());
        let xs = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu).unwrap();
        assert_eq!(m.forward_features(&xs, Mode::Eval).unwrap().dims(), [2, 16, 4, 4]);
        assert_eq!(m.forward_pooled(&xs, Mode::Eval).unwrap().dims(), [2, 16]);
        assert_eq!(m.stride(), 16);
        assert_eq!(
            remap_key("cvt.encoder.stages.0.embedding.convolution_embeddings.projection.bias").unwrap(),
            "encoder.stages.0.embedding.convolution_embeddings.projection.bias"
        );
        assert_eq!(remap_key("classifier.weight"), None);
    }
}
