//! CARE: CNN attention revitalization (Ge et al., NeurIPS 2021).
//!
//! Reference: `ChongjianGE/CARE@3187afb` `models/resnet_care.py`, `models/trans.py`,
//! `models/care_module.py`, `exps/arxiv/care_exp.py` (METHODS.md 1.1).
//! - C-stream: the ResNet backbone, pooled, then BYOL's projector and predictor (`Linear - BN -
//!   ReLU - Linear`, 4096 -> 256), L2-normalised.
//! - T-stream on the backbone's `layer3` map: 5 BoTNet `BottleBlock`s (`heads = 4`, `dim_head =
//!   128`, `proj_factor = 4`, output width = the backbone's final width, the first block
//!   downsampling with a 3x3/2 shortcut and a 2x2 average pool after attention), then average
//!   pooling and its own projector + predictor.
//! - Teacher: an EMA copy of backbone, T-stream and both projectors (no predictors), momentum
//!   `1 - (1 - 0.99)(cos(pi k / K) + 1) / 2`, batch statistics in its BatchNorms.
//! - Loss `con + con2 + 100 fea`: `con = mean(4 - 2 (q1.k1 + q2.k2))` on the C-stream (q from the
//!   student on one view, k from the teacher on the other), `con2` the same on the T-stream, and
//!   `fea = MSE(q1, sg(t1)) + MSE(q2, sg(t2)) + MSE(k1, t_k1) + MSE(k2, t_k2)` (the teacher terms
//!   carry no gradient; they are kept so the logged value is the reference's).
//!
//! BoTNet's attention (`lucidrains/bottleneck-transformer-pytorch`, which `trans.py` copies) adds
//! `q . emb_j` with `emb = height[y] + width[x]` to the scaled logits, q already scaled: that is
//! attention with keys `k + emb`, so it runs through the fused attention op unchanged.
//!
//! Choices: T-stream convolutions use Kaiming normal (fan-out), as the reference's: its
//! `ResNet.__init__` applies that init to every `nn.Conv2d` in the module after building
//! `self.trans` (`models/resnet_care.py`), and leaves the Linear heads at PyTorch's default, as
//! here. The last BN of each block starts at gamma = 0, as the reference's. The position tables
//! are sized for `fmap_size` (the side of `layer3`'s map: 14 at 224 px); another input size is an
//! error naming both. Names: `trans.i.{shortcut.0/1, net.0/1, net.3.to_qkv,
//! net.3.pos_emb.height/width, net.5, net.7, net.8}` (the reference's Sequential indices),
//! `projector`, `predictor`, `trans_projector`, `trans_predictor`.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Init;
use selfsup_models::layers::{BatchNorm, Conv2d};
use selfsup_models::resnet::ResNet;
use selfsup_models::{Backbone, Family, Mode, ModelConfig, Vars, Vb};
use selfsup_ops::attention::PositionBias;
use serde::{Deserialize, Serialize};

use crate::byol::{regression_loss, Mlp};
use crate::{ema_momentum, l2_normalize, Losses, Objective, Step, Teacher};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_hidden")]
    pub proj_hidden: usize,
    #[serde(default = "default_dim")]
    pub proj_dim: usize,
    #[serde(default = "default_momentum")]
    pub base_momentum: f64,
    /// Weight of the attention-guidance MSE.
    #[serde(default = "default_lambda")]
    pub lambda_fea: f64,
    #[serde(default = "default_depth")]
    pub trans_depth: usize,
    #[serde(default = "default_heads")]
    pub trans_heads: usize,
    #[serde(default = "default_dim_head")]
    pub trans_dim_head: usize,
    #[serde(default = "default_proj_factor")]
    pub trans_proj_factor: usize,
    /// Side of the backbone's `layer3` map (14 at 224 px with the ImageNet stem).
    #[serde(default = "default_fmap")]
    pub fmap_size: usize,
}

fn default_hidden() -> usize {
    4096
}
fn default_dim() -> usize {
    256
}
fn default_momentum() -> f64 {
    0.99
}
fn default_lambda() -> f64 {
    100.0
}
fn default_depth() -> usize {
    5
}
fn default_heads() -> usize {
    4
}
fn default_dim_head() -> usize {
    128
}
fn default_proj_factor() -> usize {
    4
}
fn default_fmap() -> usize {
    14
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proj_hidden: default_hidden(),
            proj_dim: default_dim(),
            base_momentum: default_momentum(),
            lambda_fea: default_lambda(),
            trans_depth: default_depth(),
            trans_heads: default_heads(),
            trans_dim_head: default_dim_head(),
            trans_proj_factor: default_proj_factor(),
            fmap_size: default_fmap(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let positive = [self.proj_hidden, self.proj_dim, self.trans_depth, self.trans_heads, self.trans_dim_head];
        if positive.contains(&0) || self.trans_proj_factor == 0 {
            candle_core::bail!("objective.care: widths, depth, heads and proj_factor must be positive")
        }
        if self.fmap_size < 2 || !self.fmap_size.is_multiple_of(2) {
            candle_core::bail!(
                "objective.care.fmap_size must be even (the first T-block halves it), got {}",
                self.fmap_size
            )
        }
        if !(0.0..=1.0).contains(&self.base_momentum) {
            candle_core::bail!("objective.care.base_momentum: {} is outside [0, 1]", self.base_momentum)
        }
        Ok(())
    }
}

/// BoTNet's multi-head self-attention with an absolute position embedding.
struct Mhsa {
    to_qkv: Conv2d,
    height: Tensor,
    width: Tensor,
    heads: usize,
    dim_head: usize,
}

impl Mhsa {
    /// xs: (b, h, w, c) -> (b, h, w, heads * dim_head).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = xs.dims4()?;
        let (fh, fw) = (self.height.dim(0)?, self.width.dim(0)?);
        if (h, w) != (fh, fw) {
            candle_core::bail!("care: the T-stream is built for a {fh}x{fw} map (fmap_size), got {h}x{w}")
        }
        let (heads, dh) = (self.heads, self.dim_head);
        let qkv = self.to_qkv.forward(xs)?.reshape((b, h * w, 3, heads, dh))?;
        let part = |i: usize| qkv.narrow(2, i, 1).and_then(|t| t.squeeze(2));
        // emb[y * w + x] = height[y] + width[x], shared by heads and images.
        let emb = self.height.unsqueeze(1)?.broadcast_add(&self.width.unsqueeze(0)?)?.reshape((1, h * w, 1, dh))?;
        let k = part(1)?.broadcast_add(&emb)?;
        let out = selfsup_ops::attention::window_attention(
            &part(0)?.contiguous()?,
            &k.contiguous()?,
            &part(2)?.contiguous()?,
            (dh as f64).powf(-0.5),
            &PositionBias::default(),
        )?;
        out.reshape((b, h, w, heads * dh))
    }
}

/// BoTNet's `BottleBlock`.
struct BottleBlock {
    shortcut: Option<(Conv2d, BatchNorm)>,
    conv_in: Conv2d,
    bn_in: BatchNorm,
    attn: Mhsa,
    downsample: bool,
    bn_mid: BatchNorm,
    conv_out: Conv2d,
    bn_out: BatchNorm,
}

impl BottleBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(dim: usize, dim_out: usize, fmap: usize, downsample: bool, cfg: &Config, vb: Vb) -> Result<Self> {
        let shortcut = if dim != dim_out || downsample {
            let (k, s, p) = if downsample { (3, 2, 1) } else { (1, 1, 0) };
            Some((
                Conv2d::no_bias(dim, dim_out, k, s, p, vb.pp("shortcut.0"))?,
                BatchNorm::new(dim_out, vb.pp("shortcut.1"))?,
            ))
        } else {
            None
        };
        let attn_in = dim_out / cfg.trans_proj_factor;
        let inner = cfg.trans_heads * cfg.trans_dim_head;
        let scale = (cfg.trans_dim_head as f64).powf(-0.5);
        let mhsa = vb.pp("net.3");
        let table = |n: usize, name: &str| {
            mhsa.params.get_with_hints((n, cfg.trans_dim_head), name, Init::Randn { mean: 0.0, stdev: scale })
        };
        Ok(Self {
            shortcut,
            conv_in: Conv2d::no_bias(dim, attn_in, 1, 1, 0, vb.pp("net.0"))?,
            bn_in: BatchNorm::new(attn_in, vb.pp("net.1"))?,
            attn: Mhsa {
                to_qkv: Conv2d::no_bias(attn_in, 3 * inner, 1, 1, 0, mhsa.pp("to_qkv"))?,
                height: table(fmap, "pos_emb.height")?,
                width: table(fmap, "pos_emb.width")?,
                heads: cfg.trans_heads,
                dim_head: cfg.trans_dim_head,
            },
            downsample,
            bn_mid: BatchNorm::new(inner, vb.pp("net.5"))?,
            conv_out: Conv2d::no_bias(inner, dim_out, 1, 1, 0, vb.pp("net.7"))?,
            bn_out: BatchNorm::with_weight_init(dim_out, 0.0, vb.pp("net.8"))?,
        })
    }

    /// xs: (b, h, w, dim) channels-last -> (b, h', w', dim_out).
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let short = match &self.shortcut {
            Some((conv, bn)) => bn.forward_relu_t(&conv.forward(xs)?, train)?,
            None => xs.clone(),
        };
        let ys = self.bn_in.forward_relu_t(&self.conv_in.forward(xs)?, train)?;
        let mut ys = self.attn.forward(&ys)?;
        if self.downsample {
            ys = selfsup_ops::avg_pool2d_nhwc(&ys, 2, 2, 0, true)?;
        }
        let ys = self.bn_mid.forward_relu_t(&ys, train)?;
        let ys = self.bn_out.forward_t(&self.conv_out.forward(&ys)?, train)?;
        (ys + short)?.relu()
    }
}

/// The T-stream: BottleBlocks on `layer3`, average-pooled.
struct TransStack {
    blocks: Vec<BottleBlock>,
}

impl TransStack {
    fn new(dim: usize, dim_out: usize, cfg: &Config, vb: Vb) -> Result<Self> {
        let blocks = (0..cfg.trans_depth)
            .map(|i| {
                let (d_in, fmap) = if i == 0 { (dim, cfg.fmap_size) } else { (dim_out, cfg.fmap_size / 2) };
                BottleBlock::new(d_in, dim_out, fmap, i == 0, cfg, vb.pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }

    /// layer3: (b, h, w, c) channels-last -> the last block's map (b, h/2, w/2, c').
    fn forward_map(&self, layer3: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = layer3.clone();
        for block in &self.blocks {
            xs = block.forward(&xs, train)?;
        }
        Ok(xs)
    }

    fn forward(&self, layer3: &Tensor, train: bool) -> Result<Tensor> {
        let ys = self.forward_map(layer3, train)?;
        let (b, h, w, c) = ys.dims4()?;
        ys.reshape((b, h * w, c))?.mean(1)
    }
}

/// One network of CARE (student or teacher): backbone, T-stream, their projectors and, for the
/// student, predictors.
struct Stream {
    backbone: ResNet,
    trans: TransStack,
    projector: Mlp,
    trans_projector: Mlp,
    heads: Option<(Mlp, Mlp)>,
}

impl Stream {
    fn new(model: &ModelConfig, cfg: &Config, student: bool, vb: Vb) -> Result<Self> {
        let Family::Resnet(rcfg) = model.family()? else {
            candle_core::bail!("objective care needs a resnet* backbone, got {:?}", model.arch)
        };
        if rcfg.stages.len() != 4 {
            candle_core::bail!("objective care reads layer3: the ResNet needs 4 stages")
        }
        let backbone = ResNet::new(&rcfg, vb.pp("backbone"))?;
        let expansion = rcfg.block.expansion();
        let (c3, c5) = (rcfg.stages[2].width * expansion, rcfg.num_features());
        let (h, d) = (cfg.proj_hidden, cfg.proj_dim);
        Ok(Self {
            backbone,
            trans: TransStack::new(c3, c5, cfg, vb.pp("trans"))?,
            projector: Mlp::new(c5, h, d, vb.pp("projector"))?,
            trans_projector: Mlp::new(c5, h, d, vb.pp("trans_projector"))?,
            heads: if student {
                Some((Mlp::new(d, h, d, vb.pp("predictor"))?, Mlp::new(d, h, d, vb.pp("trans_predictor"))?))
            } else {
                None
            },
        })
    }

    /// (C-stream output, T-stream output), both L2-normalised (b, proj_dim).
    fn forward(&self, xs: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let stages = self.backbone.forward_stages_nhwc(xs, mode)?;
        let c5 = &stages[3];
        let (b, h, w, c) = c5.dims4()?;
        let pooled = c5.reshape((b, h * w, c))?.mean(1)?;
        let mut q = self.projector.forward(&pooled)?;
        let mut t = self.trans_projector.forward(&self.trans.forward(&stages[2], mode.is_train())?)?;
        if let Some((pred, trans_pred)) = &self.heads {
            q = pred.forward(&q)?;
            t = trans_pred.forward(&t)?;
        }
        Ok((l2_normalize(&q)?, l2_normalize(&t)?))
    }
}

pub struct Care {
    cfg: Config,
    student: Stream,
    /// The teacher's modules; its variables live in `momentum`.
    teacher: Stream,
    momentum: Teacher,
}

impl Care {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let student = Stream::new(model, cfg, true, online.vb(DType::F32, device))?;
        let momentum = Teacher::new(online, seed);
        let teacher_model = ModelConfig { drop_path_rate: 0.0, ..model.clone() };
        let teacher = Stream::new(&teacher_model, cfg, false, momentum.vars.vb(DType::F32, device))?;
        momentum.start("care")?;
        Ok(Self { cfg: cfg.clone(), student, teacher, momentum })
    }

    /// The T-stream's attention-block output map for `xs` (student, eval mode), channel-mean
    /// over the last block: (b, h', w'). What CARE's figures show as the attention over the input.
    pub fn attention_map(&self, xs: &Tensor) -> Result<Tensor> {
        let stages = self.student.backbone.forward_stages_nhwc(xs, Mode::Eval)?;
        self.student.trans.forward_map(&stages[2], false)?.mean(3)
    }
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

impl Objective for Care {
    fn num_views(&self) -> usize {
        2
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [x1, x2] = views else { candle_core::bail!("care needs 2 views, got {}", views.len()) };
        let (q1, t1) = self.student.forward(x1, step.mode(0))?;
        let (q2, t2) = self.student.forward(x2, step.mode(1))?;
        let teacher_mode = Mode::Train { key: 0 };
        let (k1, tk1) = self.teacher.forward(x2, teacher_mode)?;
        let (k2, tk2) = self.teacher.forward(x1, teacher_mode)?;
        let (k1, tk1, k2, tk2) = (k1.detach(), tk1.detach(), k2.detach(), tk2.detach());
        let con = (regression_loss(&q1, &k1)? + regression_loss(&q2, &k2)?)?;
        let con2 = (regression_loss(&t1, &tk1)? + regression_loss(&t2, &tk2)?)?;
        let fea = (((mse(&q1, &t1.detach())? + mse(&q2, &t2.detach())?)? + mse(&k1, &tk1)?)? + mse(&k2, &tk2)?)?;
        let weighted = (&fea * self.cfg.lambda_fea)?;
        let total = ((&con + &con2)? + &weighted)?;
        Ok(Losses { total, parts: vec![("loss_con", con), ("loss_con2", con2), ("loss_fea", fea)] })
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        self.momentum.update(ema_momentum(self.cfg.base_momentum, progress))
    }

    fn backbone(&self) -> &dyn Backbone {
        &self.student.backbone
    }

    /// The first view and the T-stream's attention map over it (min-max scaled per image).
    fn panel(&self, views: &[Tensor], _key: u64) -> Result<Vec<crate::Column>> {
        let imgs = &views[0];
        let (b, _, h, w) = imgs.dims4()?;
        let map = self.attention_map(imgs)?;
        let (lo, hi) = (map.flatten_from(1)?.min_keepdim(1)?, map.flatten_from(1)?.max_keepdim(1)?);
        let scaled = map.flatten_from(1)?.broadcast_sub(&lo)?.broadcast_div(&(hi - &lo)?.clamp(1e-12, f64::MAX)?)?;
        let (mh, mw) = map.dims3().map(|(_, a, c)| (a, c))?;
        let up = scaled.reshape((b, 1, mh, mw))?.upsample_nearest2d(h, w)?;
        Ok(vec![
            crate::Column { title: "input", images: imgs.clone(), space: crate::Space::View },
            crate::Column { title: "T-stream attention", images: up, space: crate::Space::Unit },
        ])
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.momentum.state()
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.momentum.load(tensors)
    }

    fn stats(&self, progress: f64) -> Vec<(&'static str, f64)> {
        vec![("momentum", ema_momentum(self.cfg.base_momentum, progress))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Care, Vars) {
        let cfg = Config {
            proj_hidden: 16,
            proj_dim: 8,
            base_momentum: 0.9,
            trans_depth: 2,
            trans_heads: 2,
            trans_dim_head: 4,
            fmap_size: 4,
            ..Config::default()
        };
        let online = Vars::new(4);
        (Care::new(&cfg, &crate::tests::tiny_resnet(), &online, &Device::Cpu, 4).unwrap(), online)
    }

    /// METHODS.md 3 at small scale: the T-stream halves layer3's map and ends at the backbone's
    /// width; every student parameter gets a gradient, no teacher parameter does; the parts add up.
    #[test]
    fn shapes_gradients_and_loss_parts() {
        let (care, online) = tiny();
        // Each block's last BN starts at gamma = 0 (as the reference), which zeroes the gradient
        // of everything before it at init; give it a value so the test sees every path.
        for (name, v) in online.params.vars() {
            if name.ends_with("net.8.weight") {
                v.set(&v.as_tensor().ones_like().unwrap()).unwrap();
            }
        }
        // tiny_resnet: small stem, widths 4/8/8/8; at 16 px layer3 is 4x4.
        let v1 = Tensor::randn(0f32, 1., (4, 1, 16, 16), &Device::Cpu).unwrap();
        let v2 = Tensor::randn(0f32, 1., (4, 1, 16, 16), &Device::Cpu).unwrap();
        let stages = care.student.backbone.forward_stages_nhwc(&v1, Mode::Eval).unwrap();
        assert_eq!(stages[2].dims(), [4, 4, 4, 8]);
        assert_eq!(care.student.trans.forward_map(&stages[2], false).unwrap().dims(), [4, 2, 2, 8]);
        assert_eq!(care.attention_map(&v1).unwrap().dims(), [4, 2, 2]);
        let l = care.loss(&[v1.clone(), v2], Step { progress: 0.0, key: 0 }).unwrap();
        let parts: HashMap<_, _> = l.parts.iter().map(|(n, t)| (*n, t.to_scalar::<f32>().unwrap())).collect();
        let total = l.total.to_scalar::<f32>().unwrap();
        let want = parts["loss_con"] + parts["loss_con2"] + 100.0 * parts["loss_fea"];
        assert!((total - want).abs() < 1e-4 * want.abs().max(1.0), "{total} vs {want}");
        let grads = l.total.backward().unwrap();
        selfsup_ops::testing::assert_every_var_has_grad(
            online.params.vars().iter().map(|(n, v)| (n.as_str(), v)),
            &grads,
        );
        for (name, v) in care.momentum.vars.params.vars() {
            assert!(grads.get(v.as_tensor()).is_none(), "teacher {name} got a gradient");
        }
        assert!(care.momentum.vars.params.get("trans.0.net.3.pos_emb.height").is_some());
        assert!(care.momentum.vars.params.get("predictor.0.weight").is_none());
        let big = Tensor::randn(0f32, 1., (2, 1, 32, 32), &Device::Cpu).unwrap();
        let e = care.loss(&[big.clone(), big], Step { progress: 0.0, key: 0 }).err().unwrap().to_string();
        assert!(e.contains("built for a 4x4 map (fmap_size), got 8x8"), "{e}");
    }

    /// BoTNet's position term `q_scaled . emb_j` equals attention with keys `k + emb`.
    #[test]
    fn absolute_position_logits_match_botnet() {
        let (care, _) = tiny();
        let attn = &care.student.trans.blocks[1].attn;
        let xs = Tensor::randn(0f32, 1., (1, 2, 2, 2), &Device::Cpu).unwrap();
        let got = attn.forward(&xs).unwrap();
        // By hand, head by head, BoTNet's formula.
        let qkv = attn.to_qkv.forward(&xs).unwrap().reshape((4, 3, 2, 4)).unwrap();
        let emb = attn
            .height
            .unsqueeze(1)
            .unwrap()
            .broadcast_add(&attn.width.unsqueeze(0).unwrap())
            .unwrap()
            .reshape((4, 4))
            .unwrap();
        let scale = 0.5f64;
        for h in 0..2 {
            let pick = |i: usize| qkv.narrow(1, i, 1).unwrap().narrow(2, h, 1).unwrap().reshape((4, 4)).unwrap();
            let q = (pick(0) * scale).unwrap();
            let sim = (q.matmul(&pick(1).t().unwrap()).unwrap() + q.matmul(&emb.t().unwrap()).unwrap()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&sim).unwrap();
            let want = p.matmul(&pick(2)).unwrap();
            let have = got.reshape((4, 2, 4)).unwrap().narrow(1, h, 1).unwrap().reshape((4, 4)).unwrap();
            let diff = (want - have).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "head {h}: {diff}");
        }
    }
}
