//! End-to-end fine-tuning: backbone + a new linear head trained on labels with AdamW,
//! layer-wise learning-rate decay, label smoothing and drop-path.
//!
//! The recipes follow the references' `main_finetune.py` (METHODS.md 1.5 ConvNeXt V2, 1.6
//! LoMaR, 1.9 MAE):
//! - `lr = blr * batch / 256`; linear warm-up, then a half cosine per iteration to `min_lr`.
//! - AdamW; 1-D parameters (biases, norm scales, GRN `weight`/`bias` in timm's naming) get no
//!   weight decay.
//! - Layer-wise lr decay: parameter `p` in layer `id(p)` trains at `lr * decay^(head - id(p))`,
//!   where `head` is the head's layer id, so the head runs at the full rate and the stem at the
//!   smallest. [`LayerDecayRule`] ports each reference's layer-id function onto timm's weight
//!   names: ConvNeXt V2's `get_num_layer_for_convnext_single` / `get_num_layer_for_convnext`
//!   ('single' / 'group', `optim_factory.py`), MAE's `get_layer_id_for_vit` (`lr_decay.py`),
//!   and for ResNet timm's `param_groups_layer_decay` over its fine-grained `group_matcher`
//!   (stem, then one id per block, then the head).
//! - Label smoothing as timm's `LabelSmoothingCrossEntropy`:
//!   `(1 - s) * nll + s * mean_c(-log p_c)`.
//! - Drop-path as the model's `drop_path_rate` (per sample, timm's linear rule over blocks).
//! - The new head is `N(0, 2e-5)` with zero bias (`trunc_normal_(head.weight, std=2e-5)` in
//!   both references; the truncation at +-2 is a no-op at that std).
//!
//! - Mixup / CutMix as timm's `Mixup` in batch mode: with probability `mix_prob` a batch is
//!   mixed with its reverse, by CutMix with probability `switch_prob` (when both are on), else by
//!   Mixup; `lam ~ Beta(alpha, alpha)`; CutMix's box is centred uniformly, clipped, and `lam` is
//!   corrected to the pasted area; targets are the smoothed one-hots mixed by `lam`, and the
//!   loss is the soft-target cross-entropy.
//!
//! Not implemented (yet): RandAugment, random erasing and the EMA of weights that the ImageNet
//! recipes add; on 28-px grey images the recipe here (random-resized crop + flip) is the usual
//! choice. Accuracy is measured on the test split after the last epoch (and every
//! `eval_every` epochs, for the curve); unlike the references it does not report the maximum
//! over epochs, which would select on the test set.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use selfsup_data::augment::ViewConfig;
use selfsup_data::loader::eval_batch;
use selfsup_data::{Loader, Source};
use selfsup_eval::features::EvalTransform;
use selfsup_eval::linear::accuracy;
use selfsup_models::{Arch, Backbone, Family, Mode, ModelConfig, Vars};
use selfsup_ops::rng::Rng;
use serde::Serialize;

use crate::optim::{AdamWConfig, Optimizer, OptimizerConfig, Param};
use crate::schedule::warmup_cosine;

/// How parameter names map to layer ids for layer-wise lr decay. Names are timm's (the
/// backbone's own names, without a `backbone.` prefix); a name no rule matches is the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LayerDecayRule {
    /// timm ResNet: `conv1`/`bn1` -> 0, block j of stage i -> its index over all blocks + 1.
    Resnet { depths: Vec<usize> },
    /// ConvNeXt V2 'single': every block its own id (`stem` and `stages.0.blocks.0` share 1;
    /// `stages.i.downsample` shares the id of the stage's first block).
    ConvnextSingle { depths: Vec<usize> },
    /// ConvNeXt V2 'group' (Base and larger): 12 groups of three blocks.
    ConvnextGroup,
    /// MAE ViT: `cls_token`, `pos_embed`, `patch_embed` -> 0, `blocks.i` -> i + 1.
    Vit { depth: usize },
    /// No layer-wise decay: every parameter is in the head's layer.
    Uniform,
}

impl LayerDecayRule {
    /// The rule of a model config's architecture: ConvNeXt V2 Base and larger use 'group' (as
    /// their recipes), the others 'single'.
    pub fn for_model(model: &ModelConfig) -> Result<Self> {
        Ok(match model.family()? {
            Family::Resnet(cfg) => Self::Resnet { depths: cfg.stages.iter().map(|s| s.depth).collect() },
            Family::Convnextv2(_)
                if matches!(model.arch, Arch::Convnextv2Base | Arch::Convnextv2Large | Arch::Convnextv2Huge) =>
            {
                Self::ConvnextGroup
            }
            Family::Convnextv2(cfg) => Self::ConvnextSingle { depths: cfg.depths },
            Family::Vit(cfg) => Self::Vit { depth: cfg.depth },
            // CvT's and Mobile-Former's recipes train end to end without layer-wise decay.
            Family::Cvt(_) | Family::MobileFormer(_) => Self::Uniform,
        })
    }

    /// The head's layer id (it trains at the full learning rate).
    pub fn head_id(&self) -> usize {
        match self {
            Self::Resnet { depths } | Self::ConvnextSingle { depths } => depths.iter().sum::<usize>() + 1,
            Self::ConvnextGroup => 13,
            Self::Vit { depth } => depth + 1,
            Self::Uniform => 0,
        }
    }

    /// The layer id of parameter `name`.
    pub fn layer_id(&self, name: &str) -> usize {
        let parts: Vec<&str> = name.split('.').collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
        let head = self.head_id();
        match self {
            Self::Resnet { depths } => {
                if matches!(parts[0], "conv1" | "bn1") {
                    return 0;
                }
                match (parts[0].strip_prefix("layer").and_then(|s| s.parse::<usize>().ok()), num(1)) {
                    (Some(stage), Some(block)) if (1..=depths.len()).contains(&stage) => {
                        depths[..stage - 1].iter().sum::<usize>() + block + 1
                    }
                    _ => head,
                }
            }
            Self::ConvnextSingle { depths } => match (parts[0], num(1), parts.get(2).copied(), num(3)) {
                ("stem", ..) => 1,
                ("stages", Some(stage), Some("downsample"), _) => depths[..stage].iter().sum::<usize>() + 1,
                ("stages", Some(stage), Some("blocks"), Some(block)) => {
                    depths[..stage].iter().sum::<usize>() + block + 1
                }
                _ => head,
            },
            Self::ConvnextGroup => match (parts[0], num(1), parts.get(2).copied(), num(3)) {
                ("stem", ..) => 0,
                ("stages", Some(stage), Some("downsample"), _) => match stage {
                    0 => 0,
                    1 | 2 => stage + 1,
                    _ => 12,
                },
                ("stages", Some(stage), Some("blocks"), Some(block)) => match stage {
                    0 | 1 => stage + 1,
                    2 => 3 + block / 3,
                    _ => 12,
                },
                _ => head,
            },
            Self::Uniform => 0,
            Self::Vit { .. } => match (parts[0], num(1)) {
                ("cls_token" | "pos_embed" | "patch_embed", _) => 0,
                ("blocks", Some(i)) => i + 1,
                _ => head,
            },
        }
    }

    /// `decay^(head - id)`: the factor on the learning rate of parameter `name`.
    pub fn lr_scale(&self, name: &str, decay: f64) -> f64 {
        decay.powi((self.head_id() - self.layer_id(name).min(self.head_id())) as i32)
    }
}

/// A fine-tuning recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub batch_size: usize,
    /// Base learning rate: the peak rate is `blr * batch_size / 256`.
    pub blr: f64,
    pub min_lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    /// Layer-wise lr decay factor (1 = off).
    pub layer_decay: f64,
    /// Use ConvNeXt V2's 'group' layer ids instead of 'single' (its Base/Large recipes).
    pub group_layers: bool,
    pub label_smoothing: f64,
    /// The backbone's stochastic-depth rate during fine-tuning.
    pub drop_path: f64,
    /// Mixup and CutMix Beta parameters (0 = off), the probability a batch is mixed, and the
    /// probability of CutMix rather than Mixup when both are on.
    pub mixup: f64,
    pub cutmix: f64,
    pub mix_prob: f64,
    pub switch_prob: f64,
    /// RandomResizedCrop scale range and flip probability of the training view.
    pub crop_scale: [f64; 2],
    pub hflip: f64,
    /// Measure test accuracy every this many epochs as well as at the end (0 = only at the end).
    pub eval_every: usize,
    pub seed: u64,
}

impl FinetuneConfig {
    /// ConvNeXt V2-Atto (`TRAINING.md`): blr 2e-4, 600 epochs, no warm-up, layer decay 0.9
    /// ('single'), wd 0.3, drop-path 0.1, smoothing 0.2, no mixup/cutmix.
    pub fn convnextv2_atto() -> Self {
        Self {
            epochs: 600,
            warmup_epochs: 0,
            batch_size: 1024,
            blr: 2e-4,
            min_lr: 1e-6,
            betas: [0.9, 0.999],
            weight_decay: 0.3,
            layer_decay: 0.9,
            group_layers: false,
            label_smoothing: 0.2,
            drop_path: 0.1,
            mixup: 0.0,
            cutmix: 0.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            crop_scale: [0.08, 1.0],
            hflip: 0.5,
            eval_every: 0,
            seed: 0,
        }
    }

    /// ConvNeXt V2-Tiny: blr 8e-4, 300 epochs, warm-up 40, layer decay 0.9 ('single'),
    /// wd 0.05, drop-path 0.2, smoothing 0.1, mixup 0.8 / cutmix 1.0.
    pub fn convnextv2_tiny() -> Self {
        Self {
            epochs: 300,
            warmup_epochs: 40,
            blr: 8e-4,
            weight_decay: 0.05,
            drop_path: 0.2,
            label_smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            ..Self::convnextv2_atto()
        }
    }

    /// ConvNeXt V2-Base: blr 6.25e-4, 100 epochs, warm-up 20, layer decay 0.6 ('group'),
    /// wd 0.05, drop-path 0.1, smoothing 0.1.
    pub fn convnextv2_base() -> Self {
        Self {
            epochs: 100,
            warmup_epochs: 20,
            blr: 6.25e-4,
            layer_decay: 0.6,
            group_layers: true,
            drop_path: 0.1,
            ..Self::convnextv2_tiny()
        }
    }

    /// MAE ViT-B (`FINETUNE.md`) and LoMaR (`main_finetune_lomar.py`): batch 1024, blr 5e-4,
    /// 100 epochs, warm-up 5, layer decay 0.65, wd 0.05, drop-path 0.1, smoothing 0.1,
    /// mixup 0.8 / cutmix 1.0.
    pub fn mae_vit_base() -> Self {
        Self {
            epochs: 100,
            warmup_epochs: 5,
            blr: 5e-4,
            layer_decay: 0.65,
            group_layers: false,
            weight_decay: 0.05,
            drop_path: 0.1,
            label_smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            ..Self::convnextv2_atto()
        }
    }

    /// Small-scale recipe for 28-px grey images on a CPU (Fashion-MNIST), chosen by
    /// measurement (README): 2 epochs at batch 128, blr 1.6e-2 (lr 8e-3), layer decay 0.9,
    /// wd 0.05, smoothing 0.1, drop-path 0.1, flip only (random-resized crops at 16 px cost
    /// 7 points after 3 epochs on 10k images: 80.3 vs 86.8 %).
    pub fn fmnist() -> Self {
        Self {
            epochs: 2,
            warmup_epochs: 0,
            batch_size: 128,
            blr: 1.6e-2,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            crop_scale: [1.0, 1.0],
            ..Self::convnextv2_atto()
        }
    }

    /// A preset by its CLI name.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "convnextv2-atto" => Self::convnextv2_atto(),
            "convnextv2-tiny" => Self::convnextv2_tiny(),
            "convnextv2-base" => Self::convnextv2_base(),
            "mae" | "lomar" => Self::mae_vit_base(),
            "fmnist" => Self::fmnist(),
            other => bail!(
                "unknown fine-tuning preset {other:?}: expected fmnist, convnextv2-atto, convnextv2-tiny, \
                 convnextv2-base, mae or lomar"
            ),
        })
    }

    pub fn peak_lr(&self) -> f64 {
        self.blr * self.batch_size as f64 / 256.0
    }

    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("fine-tuning: epochs and batch_size must be positive, got {} and {}", self.epochs, self.batch_size)
        }
        let lr_ok = self.blr.is_finite() && self.blr > 0.0 && self.min_lr.is_finite() && self.min_lr >= 0.0;
        if !lr_ok {
            bail!("fine-tuning: blr must be positive and min_lr non-negative, got {} and {}", self.blr, self.min_lr)
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            bail!("fine-tuning: layer_decay must lie in (0, 1], got {}", self.layer_decay)
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!("fine-tuning: label_smoothing must lie in [0, 1), got {}", self.label_smoothing)
        }
        if self.mixup < 0.0
            || self.cutmix < 0.0
            || !(0.0..=1.0).contains(&self.mix_prob)
            || !(0.0..=1.0).contains(&self.switch_prob)
        {
            bail!(
                "fine-tuning: mixup {} and cutmix {} must be >= 0, mix_prob {} and switch_prob {} in [0, 1]",
                self.mixup,
                self.cutmix,
                self.mix_prob,
                self.switch_prob
            )
        }
        Ok(())
    }
}

/// What a fine-tuning run measured (percentages).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinetuneResult {
    pub top1: f64,
    pub top5: f64,
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// (epoch, test top-1) after the epochs where it was measured (1-based epoch count).
    pub test_curve: Vec<(usize, f64)>,
    pub steps: usize,
    pub images_per_sec: f64,
}

/// Label-smoothed cross-entropy (timm `LabelSmoothingCrossEntropy`), mean over the batch.
/// logits: (b, C); labels: (b,) u32.
pub fn label_smoothing_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(1)?.neg()?;
    ((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?.mean_all()
}

/// Gamma(shape, 1) (Marsaglia & Tsang; shape < 1 through `Gamma(shape + 1) * U^(1/shape)`).
fn gamma(shape: f64, rng: &mut Rng) -> f64 {
    if shape < 1.0 {
        return gamma(shape + 1.0, rng) * rng.uniform().max(f64::MIN_POSITIVE).powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.uniform();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Beta(a, a).
fn beta(a: f64, rng: &mut Rng) -> f64 {
    let (x, y) = (gamma(a, rng), gamma(a, rng));
    x / (x + y)
}

/// How one batch is mixed with its reverse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    None,
    /// `lam * x + (1 - lam) * x.flip(0)`.
    Mixup {
        lam: f64,
    },
    /// Rows `y0..y1`, columns `x0..x1` pasted from the reversed batch; `lam` is the kept area.
    Cutmix {
        lam: f64,
        y0: usize,
        y1: usize,
        x0: usize,
        x1: usize,
    },
}

impl Mix {
    /// timm's `Mixup._params_per_batch` + `_mix_batch` box for an `h x w` batch.
    pub fn draw(cfg: &FinetuneConfig, h: usize, w: usize, rng: &mut Rng) -> Self {
        if (cfg.mixup <= 0.0 && cfg.cutmix <= 0.0) || !rng.bernoulli(cfg.mix_prob) {
            return Mix::None;
        }
        let use_cutmix =
            if cfg.mixup > 0.0 && cfg.cutmix > 0.0 { rng.bernoulli(cfg.switch_prob) } else { cfg.cutmix > 0.0 };
        if !use_cutmix {
            return Mix::Mixup { lam: beta(cfg.mixup, rng) };
        }
        let lam = beta(cfg.cutmix, rng);
        let ratio = (1.0 - lam).sqrt();
        let (ch, cw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
        let (cy, cx) = (rng.below(h), rng.below(w));
        let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
        let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
        let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
        Mix::Cutmix { lam, y0, y1, x0, x1 }
    }

    /// The mixed images (b, c, h, w) and soft targets (b, classes): smoothed one-hots of the
    /// labels and of the reversed labels, mixed by `lam`.
    pub fn apply(
        &self,
        xs: &Tensor,
        labels: &[u32],
        classes: usize,
        smoothing: f64,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let b = labels.len();
        let (off, on) = (smoothing / classes as f64, 1.0 - smoothing + smoothing / classes as f64);
        let one_hot = |rev: bool| -> Vec<f32> {
            let mut t = vec![off as f32; b * classes];
            for i in 0..b {
                let l = labels[if rev { b - 1 - i } else { i }] as usize;
                t[i * classes + l] = on as f32;
            }
            t
        };
        let (direct, reversed) = (one_hot(false), one_hot(true));
        let lam = match *self {
            Mix::None => 1.0,
            Mix::Mixup { lam } | Mix::Cutmix { lam, .. } => lam,
        };
        let target: Vec<f32> =
            direct.iter().zip(&reversed).map(|(a, r)| (lam as f32) * a + (1.0 - lam as f32) * r).collect();
        let target = Tensor::from_vec(target, (b, classes), xs.device())?;
        let flipped = || xs.index_select(&Tensor::arange(0u32, b as u32, xs.device())?.flip(&[0])?, 0);
        let xs = match *self {
            Mix::None => xs.clone(),
            Mix::Mixup { lam } => ((xs * lam)? + (flipped()? * (1.0 - lam))?)?,
            Mix::Cutmix { y0, y1, x0, x1, .. } => {
                let (_, _, h, w) = xs.dims4()?;
                let mut mask = vec![0f32; h * w];
                for y in y0..y1 {
                    mask[y * w + x0..y * w + x1].iter_mut().for_each(|m| *m = 1.0);
                }
                let mask = Tensor::from_vec(mask, (1, 1, h, w), xs.device())?.to_dtype(xs.dtype())?;
                (xs.broadcast_mul(&(1.0 - &mask)?)? + flipped()?.broadcast_mul(&mask)?)?
            }
        };
        Ok((xs, target))
    }
}

/// Soft-target cross-entropy (timm `SoftTargetCrossEntropy`): mean over the batch of
/// `sum_c -target_c * log_softmax(logits)_c`.
pub fn soft_target_cross_entropy(logits: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    (candle_nn::ops::log_softmax(logits, 1)? * target)?.sum(1)?.neg()?.mean_all()
}

/// A backbone with a linear classifier on its pooled features.
pub struct Classifier {
    pub backbone: Box<dyn Backbone>,
    head: selfsup_ops::linear::Linear,
    head_vars: [Var; 2],
}

impl Classifier {
    /// A new head `fc` (num_features -> num_classes), initialised as the references do.
    pub fn new(backbone: Box<dyn Backbone>, num_classes: usize, seed: u64, device: &Device) -> Result<Self> {
        let d = backbone.num_features();
        let mut rng = Rng::from_keys(&[seed, 0xf17e]);
        let w: Vec<f32> = (0..num_classes * d).map(|_| (2e-5 * rng.normal()) as f32).collect();
        let w = Var::from_tensor(&Tensor::from_vec(w, (num_classes, d), device)?)?;
        let b = Var::zeros(num_classes, DType::F32, device)?;
        let head = selfsup_ops::linear::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        Ok(Self { backbone, head, head_vars: [w, b] })
    }

    pub fn logits(&self, xs: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        self.head.forward(&self.backbone.forward_pooled(xs, mode)?)
    }

    /// Logits of every image of `set`, in evaluation mode, `batch` at a time.
    pub fn predict(&self, set: &dyn Source, t: &EvalTransform, batch: usize, device: &Device) -> Result<Tensor> {
        let mut out = Vec::new();
        for start in (0..set.len()).step_by(batch.max(1)) {
            let end = (start + batch).min(set.len());
            let xs = eval_batch(set, start, end, t.size, &t.mean, &t.std)?;
            out.push(self.logits(&xs.to_device(device)?, Mode::Eval)?.detach().to_device(&Device::Cpu)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// Fine-tunes `backbone` (whose trainable parameters are `vars.params`, named as the model
/// names them, optionally under a `backbone.` prefix) with a new head on `train`, and measures
/// top-1/top-5 on `test`. The caller builds the backbone with `cfg.drop_path` as its rate.
pub fn finetune(
    backbone: Box<dyn Backbone>,
    vars: &Vars,
    rule: &LayerDecayRule,
    train: Arc<dyn Source>,
    test: &dyn Source,
    num_classes: usize,
    eval: &EvalTransform,
    cfg: &FinetuneConfig,
    device: &Device,
    mut progress: impl FnMut(usize, f64),
) -> Result<FinetuneResult> {
    cfg.validate()?;
    let train_labels = train.labels().context("fine-tuning: the training split has no labels")?;
    let test_labels = test.labels().context("fine-tuning: the test split has no labels")?;
    if let Some(&bad) = train_labels.iter().find(|&&l| l as usize >= num_classes) {
        bail!("fine-tuning: training label {bad} is not below num_classes = {num_classes}")
    }
    let model = Classifier::new(backbone, num_classes, cfg.seed, device)?;
    let mut params = Vec::new();
    for (name, var) in vars.params.vars() {
        let short = name.strip_prefix("backbone.").unwrap_or(&name);
        let scale = rule.lr_scale(short, cfg.layer_decay);
        params.push(Param::new(name, var).with_lr_scale(scale));
    }
    for (name, var) in ["fc.weight", "fc.bias"].into_iter().zip(&model.head_vars) {
        params.push(Param::new(name.to_string(), var.clone()));
    }
    let opt_cfg = OptimizerConfig::Adamw(AdamWConfig {
        lr: cfg.peak_lr(),
        betas: cfg.betas,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    });
    let mut optimizer = Optimizer::new(opt_cfg, params)?;
    let view = ViewConfig {
        size: eval.size,
        crop_scale: cfg.crop_scale,
        crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
        interpolation: Default::default(),
        hflip: cfg.hflip,
        jitter: None,
        grayscale: 0.0,
        blur: 0.0,
        blur_sigma: [0.1, 2.0],
        solarize: 0.0,
        to_rgb: false,
        mean: eval.mean.clone(),
        std: eval.std.clone(),
    };
    let loader = Arc::new(Loader::new(train.clone(), vec![view], cfg.batch_size, cfg.seed)?);
    let per_epoch = loader.batches_per_epoch();
    let total = per_epoch * cfg.epochs;
    let warmup = per_epoch * cfg.warmup_epochs;
    let (mut epoch_loss, mut test_curve) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    let start = Instant::now();
    for (step, views) in loader.prefetch(0, total, 2) {
        let (epoch, index) = (step / per_epoch, step % per_epoch);
        let batch = views?;
        let ids = batch.indices;
        let xs = batch.views[0].to_device(device)?;
        let ys: Vec<u32> = ids.iter().map(|&i| train_labels[i]).collect();
        let key = Rng::from_keys(&[cfg.seed, step as u64, 0xf1e7]).next_u64();
        let (_, _, h, w) = xs.dims4()?;
        let mix = Mix::draw(cfg, h, w, &mut Rng::from_keys(&[cfg.seed, step as u64, 0x313]));
        let loss = if mix == Mix::None {
            let logits = model.logits(&xs, Mode::Train { key })?;
            label_smoothing_cross_entropy(&logits, &Tensor::from_vec(ys, ids.len(), device)?, cfg.label_smoothing)?
        } else {
            let (xs, target) = mix.apply(&xs, &ys, num_classes, cfg.label_smoothing)?;
            soft_target_cross_entropy(&model.logits(&xs, Mode::Train { key })?, &target)?
        };
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            bail!("fine-tuning: the loss is {value} at step {step} (epoch {epoch})")
        }
        loss_sum += value;
        let grads = loss.backward()?;
        optimizer.step(&grads, warmup_cosine(step, total, warmup, cfg.peak_lr(), cfg.min_lr), 1.0)?;
        if index + 1 == per_epoch {
            epoch_loss.push(loss_sum / per_epoch as f64);
            loss_sum = 0.0;
            let done = epoch + 1;
            if cfg.eval_every > 0 && done % cfg.eval_every == 0 && done < cfg.epochs {
                let (top1, _) = accuracy(&model.predict(test, eval, 500, device)?, &test_labels)?;
                test_curve.push((done, top1));
            }
            progress(done, *epoch_loss.last().unwrap());
        }
    }
    let images_per_sec = (total * cfg.batch_size) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let (top1, top5) = accuracy(&model.predict(test, eval, 500, device)?, &test_labels)?;
    test_curve.push((cfg.epochs, top1));
    Ok(FinetuneResult { top1, top5, epoch_loss, test_curve, steps: total, images_per_sec })
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfsup_data::dataset::synthetic_stripes;

    #[test]
    fn layer_ids_follow_the_references() {
        // ResNet-18: stem 0, blocks 1..=8, head 9.
        let r = LayerDecayRule::Resnet { depths: vec![2, 2, 2, 2] };
        assert_eq!(r.layer_id("conv1.weight"), 0);
        assert_eq!(r.layer_id("bn1.bias"), 0);
        assert_eq!(r.layer_id("layer1.0.conv1.weight"), 1);
        assert_eq!(r.layer_id("layer2.1.downsample.0.weight"), 4);
        assert_eq!(r.layer_id("layer4.1.bn2.weight"), 8);
        assert_eq!(r.layer_id("fc.weight"), 9);
        assert!((r.lr_scale("conv1.weight", 0.5) - 0.5f64.powi(9)).abs() < 1e-15);
        assert_eq!(r.lr_scale("fc.bias", 0.5), 1.0);

        // ConvNeXt V2 'single' on timm names; the official names in the comments.
        let c = LayerDecayRule::ConvnextSingle { depths: vec![2, 2, 6, 2] };
        assert_eq!(c.layer_id("stem.0.weight"), 1); // downsample_layers.0
        assert_eq!(c.layer_id("stages.0.blocks.0.dwconv.weight"), 1); // stages.0.0
        assert_eq!(c.layer_id("stages.1.downsample.1.weight"), 3); // downsample_layers.1
        assert_eq!(c.layer_id("stages.2.blocks.5.mlp.grn.weight"), 4 + 5 + 1);
        assert_eq!(c.layer_id("stages.3.blocks.1.norm.weight"), 12);
        assert_eq!(c.layer_id("head.norm.weight"), 13);
        assert_eq!(c.head_id(), 13);

        // ConvNeXt V2 'group' ([3, 3, 27, 3] in 12 groups).
        let g = LayerDecayRule::ConvnextGroup;
        assert_eq!(g.layer_id("stem.0.weight"), 0);
        assert_eq!(g.layer_id("stages.0.blocks.2.dwconv.bias"), 1);
        assert_eq!(g.layer_id("stages.2.downsample.1.weight"), 3);
        assert_eq!(g.layer_id("stages.2.blocks.26.pwconv1.weight"), 3 + 8);
        assert_eq!(g.layer_id("stages.3.downsample.1.weight"), 12);
        assert_eq!(g.layer_id("head.fc.weight"), 13);

        // MAE ViT-B: 12 blocks.
        let v = LayerDecayRule::Vit { depth: 12 };
        assert_eq!(v.layer_id("cls_token"), 0);
        assert_eq!(v.layer_id("patch_embed.proj.weight"), 0);
        assert_eq!(v.layer_id("blocks.0.attn.qkv.weight"), 1);
        assert_eq!(v.layer_id("blocks.11.mlp.fc2.bias"), 12);
        assert_eq!(v.layer_id("fc_norm.weight"), 13);
        assert!((v.lr_scale("blocks.11.norm1.weight", 0.65) - 0.65).abs() < 1e-15);
    }

    #[test]
    fn label_smoothing_by_hand() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0f32, 0f32.ln_1p(), 2f32.ln()], [1.0, 1.0, 1.0]], &dev).unwrap();
        let y = Tensor::new(&[2u32, 0], &dev).unwrap();
        // Row 0: p = (1/4, 1/4, 1/2) -> nll = ln 2, mean -log p = (ln4 + ln4 + ln2)/3 = 5 ln2 / 3.
        // Row 1: uniform -> nll = mean = ln 3.
        let s = 0.2;
        let want = ((1.0 - s) * 2f64.ln() + s * 5.0 * 2f64.ln() / 3.0 + 3f64.ln()) / 2.0;
        let got = label_smoothing_cross_entropy(&logits, &y, s).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // s = 0 is plain cross-entropy.
        let ce = candle_nn::loss::cross_entropy(&logits, &y).unwrap().to_scalar::<f32>().unwrap();
        let got = label_smoothing_cross_entropy(&logits, &y, 0.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - ce).abs() < 1e-6);
    }

    #[test]
    fn beta_draws_have_the_right_mean_and_spread() {
        let mut rng = Rng::new(3);
        for a in [0.8, 1.0, 2.5] {
            let xs: Vec<f64> = (0..20_000).map(|_| beta(a, &mut rng)).collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            assert!((var - 1.0 / (4.0 * (2.0 * a + 1.0))).abs() < 0.005, "a {a}: var {var}");
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn mixup_and_cutmix_mix_images_and_targets_by_the_same_lambda() {
        let dev = Device::Cpu;
        // Two 1x4x4 images: all ones and all zeros; labels 0 and 1 of 2 classes.
        let xs = Tensor::cat(
            &[
                Tensor::ones((1, 1, 4, 4), DType::F32, &dev).unwrap(),
                Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        let (m, t) = Mix::Mixup { lam: 0.7 }.apply(&xs, &[0, 1], 2, 0.0).unwrap();
        let m = m.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        assert!(m[0].iter().all(|&v| (v - 0.7).abs() < 1e-6) && m[1].iter().all(|&v| (v - 0.3).abs() < 1e-6));
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[0.7, 0.3], [0.3, 0.7]].map(|r| r.map(|v: f64| v as f32)));
        // CutMix of the top-left 2x2: image 0 keeps 12 of 16 ones.
        let cut = Mix::Cutmix { lam: 0.75, y0: 0, y1: 2, x0: 0, x1: 2 };
        let (m, t) = cut.apply(&xs, &[0, 1], 2, 0.1).unwrap();
        let m = m.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0].iter().sum::<f32>(), 12.0);
        assert_eq!(m[1].iter().sum::<f32>(), 4.0);
        // Smoothed one-hots (0.95 / 0.05) mixed by 0.75.
        let t = t.to_vec2::<f32>().unwrap();
        assert!((t[0][0] - (0.75 * 0.95 + 0.25 * 0.05)).abs() < 1e-6, "{t:?}");
        // The soft loss with a one-hot target is plain cross-entropy.
        let logits = Tensor::new(&[[1f32, 2.0], [0.5, -1.0]], &dev).unwrap();
        let hard = Tensor::new(&[[0f32, 1.0], [1.0, 0.0]], &dev).unwrap();
        let ce = candle_nn::loss::cross_entropy(&logits, &Tensor::new(&[1u32, 0], &dev).unwrap()).unwrap();
        let soft = soft_target_cross_entropy(&logits, &hard).unwrap();
        assert!((ce.to_scalar::<f32>().unwrap() - soft.to_scalar::<f32>().unwrap()).abs() < 1e-6);
    }

    #[test]
    fn cutmix_boxes_stay_inside_and_correct_lambda() {
        let cfg = FinetuneConfig { mixup: 0.0, cutmix: 1.0, ..FinetuneConfig::fmnist() };
        let mut rng = Rng::new(1);
        let mut seen_cut = false;
        for _ in 0..500 {
            match Mix::draw(&cfg, 16, 12, &mut rng) {
                Mix::Cutmix { lam, y0, y1, x0, x1 } => {
                    seen_cut = true;
                    assert!(y0 <= y1 && y1 <= 16 && x0 <= x1 && x1 <= 12);
                    assert!((lam - (1.0 - ((y1 - y0) * (x1 - x0)) as f64 / 192.0)).abs() < 1e-12);
                }
                other => panic!("only cutmix is on: {other:?}"),
            }
        }
        assert!(seen_cut);
        assert_eq!(Mix::draw(&FinetuneConfig::fmnist(), 16, 12, &mut rng), Mix::None);
    }

    fn tiny_run(cfg: &FinetuneConfig) -> FinetuneResult {
        let dev = Device::Cpu;
        let model =
            ModelConfig { drop_path_rate: cfg.drop_path, ..ModelConfig::narrow(Arch::Resnet18, 1, &[4, 8, 8, 8]) };
        let vars = Vars::new(1);
        let backbone = model.build(vars.vb(DType::F32, &dev).pp("backbone")).unwrap();
        let train = Arc::new(synthetic_stripes(192, 16, 3, 1));
        let test = synthetic_stripes(60, 16, 3, 2);
        let eval = EvalTransform { size: 16, mean: vec![0.5], std: vec![0.25] };
        let rule = LayerDecayRule::for_model(&model).unwrap();
        finetune(backbone, &vars, &rule, train, &test, 3, &eval, cfg, &dev, |_, _| {}).unwrap()
    }

    /// A tiny ResNet learns separable synthetic classes end to end with every ingredient on,
    /// and the run is a pure function of its seed.
    #[test]
    fn finetunes_separable_classes_deterministically() {
        let cfg = FinetuneConfig {
            epochs: 8,
            warmup_epochs: 1,
            batch_size: 32,
            blr: 0.1,
            crop_scale: [0.6, 1.0],
            eval_every: 3,
            ..FinetuneConfig::convnextv2_atto()
        };
        let r = tiny_run(&cfg);
        assert!(r.top1 >= 95.0, "{r:?}");
        assert!(r.epoch_loss.last() < r.epoch_loss.first(), "{r:?}");
        assert_eq!(r.test_curve.len(), 3);
        assert_eq!(r.steps, 8 * 6);
        let again = tiny_run(&cfg);
        assert_eq!(r.epoch_loss, again.epoch_loss);
    }

    #[test]
    fn presets_and_validation() {
        assert_eq!(FinetuneConfig::preset("lomar").unwrap().layer_decay, 0.65);
        assert!(FinetuneConfig::preset("convnextv2-base").unwrap().group_layers);
        assert_eq!(FinetuneConfig::convnextv2_atto().peak_lr(), 2e-4 * 4.0);
        let e = FinetuneConfig::preset("simclr").unwrap_err().to_string();
        assert!(e.contains("simclr"), "{e}");
        let bad = FinetuneConfig { layer_decay: 1.5, ..FinetuneConfig::mae_vit_base() };
        assert!(bad.validate().unwrap_err().to_string().contains("layer_decay"));
    }
}
