//! Supervised segmentation (issue 9): SegNetr or the plain U-Net trained on a segset
//! (`selfsup data segset`) with cross-entropy (+ an optional soft Dice term), scored by mIoU,
//! Dice and pixel accuracy through `selfsup-eval`, with PNG overlays of test predictions.
//!
//! Per step: a keyed batch of training records, each through `segset::joint_augment` (random
//! square crop of area `crop_scale`, resize, flip: image and mask together), normalised
//! `(x - 0.5) / 0.25`; AdamW with linear warm-up (5 % of the steps) and cosine decay. Every
//! epoch the val split is scored; at the end the test split, and `overlays.png` shows input /
//! truth / prediction for its first 8 images. `segment.json` holds the configuration, the
//! parameter count, the per-epoch val mIoU and the final val and test metrics.
//!
//! `encoder_unet` is the U-Net decoder over a registered backbone (`segnetr::EncoderUNet`):
//! random weights from the `[encoder]` model table, or the pretrained backbone of any
//! `selfsup pretrain` checkpoint (`encoder_checkpoint`, its own model config). Parameters that
//! the U-Net does not use (ConvNeXt's final `head.norm`) are found by one eval-mode backward
//! at build time and left out of the optimizer.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use selfsup_data::segset::{joint_augment, PLANES};
use selfsup_data::{ImageSet, Source};
use selfsup_eval::segmentation::{ConfusionMatrix, SegmentationMetrics};
use selfsup_models::segnetr::{Config as NetConfig, EncoderUNet, SegNetr, Segmenter, UNet, UNetConfig, Upsample};
use selfsup_models::{Mode, ModelConfig, Vars};
use selfsup_objectives::{Column, Space};
use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamWConfig, Optimizer, OptimizerConfig, Param};
use crate::schedule::warmup_cosine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegModel {
    Segnetr,
    Unet,
    /// The U-Net decoder over a registered backbone (`encoder` or `encoder_checkpoint`).
    EncoderUnet,
}

/// A segmentation run; every field has a default, so a TOML file names only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    pub model: SegModel,
    /// Channels per level: four for SegNetr; two or more for the U-Net (five at 64-1024 with
    /// `upsample = "transposed"` is Ronneberger's classic U-Net). Unused by `encoder_unet`.
    pub widths: Vec<usize>,
    /// How the U-Net's decoder upsamples: `bilinear` (then a 1x1 conv) or `transposed`.
    pub upsample: Upsample,
    /// SegNetr's local and global branches (the ablation).
    pub branches: [bool; 2],
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the soft Dice loss added to cross-entropy (0: cross-entropy only).
    pub dice_weight: f64,
    pub crop_scale: [f64; 2],
    pub seed: u64,
    /// Stop after this many steps (the schedule spans them).
    pub max_steps: Option<usize>,
    /// `encoder_unet` with random weights: the backbone (`in_chans` must be 3).
    pub encoder: Option<ModelConfig>,
    /// `encoder_unet` from a pretrained run: a run directory or checkpoint; its backbone and
    /// model config are used.
    pub encoder_checkpoint: Option<std::path::PathBuf>,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            model: SegModel::Segnetr,
            widths: vec![32, 64, 128, 256],
            upsample: Upsample::Bilinear,
            branches: [true, true],
            epochs: 10,
            batch_size: 32,
            lr: 2e-3,
            weight_decay: 1e-4,
            dice_weight: 0.0,
            crop_scale: [0.6, 1.0],
            seed: 0,
            max_steps: None,
            encoder: None,
            encoder_checkpoint: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SegReport {
    pub config: SegmentConfig,
    pub params: usize,
    /// Multiply-accumulates of one forward at the training size, in billions (x 2 = GFLOPs).
    pub gmacs: f64,
    pub steps: usize,
    pub train_seconds: f64,
    pub images_per_sec: f64,
    pub val_miou_per_epoch: Vec<f64>,
    pub val: SegmentationMetrics,
    pub test: SegmentationMetrics,
}

const MEAN: f32 = 0.5;
const STD: f32 = 0.25;

fn open_split(data: &Path, split: &str) -> Result<ImageSet> {
    let set =
        selfsup_data::shards::open(&data.join(split)).with_context(|| format!("opening {}/{split}", data.display()))?;
    if set.c != PLANES {
        bail!("{}/{split}: records have {} planes, a segset has {PLANES} (RGB + mask)", data.display(), set.c)
    }
    Ok(set)
}

/// A built network with its variables and cost.
pub struct Built {
    pub net: Box<dyn Segmenter>,
    /// Every variable store the network reads (a pretrained encoder has its own).
    pub vars: Vec<Vars>,
    /// The parameters that receive a gradient, named (decoder names unprefixed, a backbone's
    /// as `encoder.<name>`).
    pub trainable: Vec<(String, candle_core::Var)>,
    /// Multiply-accumulates of one forward at `side`.
    pub macs: usize,
}

/// Builds the configured network for `side` x `side` RGB inputs and two classes.
pub fn build(cfg: &SegmentConfig, side: usize, device: &Device) -> Result<Built> {
    let vars = Vars::new(cfg.seed);
    let vb = vars.vb(DType::F32, device);
    if cfg.model != SegModel::EncoderUnet && (cfg.encoder.is_some() || cfg.encoder_checkpoint.is_some()) {
        bail!("segment: `encoder` and `encoder_checkpoint` belong to model encoder_unet, not {:?}", cfg.model)
    }
    if cfg.model != SegModel::Unet && cfg.upsample != Upsample::Bilinear {
        bail!("segment: `upsample` belongs to model unet, not {:?}", cfg.model)
    }
    let (seg, encoder_vars, macs): (Box<dyn Segmenter>, Option<Vars>, usize) = match cfg.model {
        SegModel::Segnetr => {
            let widths: [usize; 4] = cfg.widths.clone().try_into().map_err(|w: Vec<usize>| {
                anyhow::anyhow!("segment: SegNetr has four levels, `widths` has {} values: {w:?}", w.len())
            })?;
            let net = NetConfig { branches: cfg.branches, ..NetConfig::new(3, 2, widths) };
            (Box::new(SegNetr::new(&net, vb)?), None, net.segnetr_macs(side))
        }
        SegModel::Unet => {
            let net = UNetConfig { in_chans: 3, num_classes: 2, widths: cfg.widths.clone(), upsample: cfg.upsample };
            (Box::new(UNet::new(&net, vb)?), None, net.macs(side))
        }
        SegModel::EncoderUnet => {
            let (model, enc_vars, backbone) = match (&cfg.encoder, &cfg.encoder_checkpoint) {
                (Some(m), None) => {
                    let v = Vars::new(cfg.seed ^ 0xe2c0);
                    let b = m.build(v.vb(DType::F32, device).pp("backbone"))?;
                    (m.clone(), v, b)
                }
                (None, Some(path)) => {
                    let (run, v, b) = crate::trainer::load_backbone_vars(path, device, 0.0)
                        .with_context(|| format!("loading the encoder from {}", path.display()))?;
                    (run.model, v, b)
                }
                _ => bail!(
                    "segment: model encoder_unet needs exactly one of `encoder` (random init) and `encoder_checkpoint`"
                ),
            };
            if model.in_chans != 3 {
                bail!("segment: the encoder takes {} input channels; a segset's images have 3", model.in_chans)
            }
            let u = EncoderUNet::new(backbone, 3, 2, side, vb)?;
            let macs = model.cost(side)?.1 + u.decoder_macs(side);
            (Box::new(u), Some(enc_vars), macs)
        }
    };
    let mut named: Vec<(String, candle_core::Var)> = vars.params.vars();
    if let Some(ev) = &encoder_vars {
        named.extend(
            ev.params.vars().into_iter().map(|(n, v)| (format!("encoder.{}", n.trim_start_matches("backbone.")), v)),
        );
    }
    // One eval-mode backward on a blank batch: parameters the forward never reaches get no
    // gradient and stay out of the optimizer (running statistics are not touched in eval mode).
    let probe = Tensor::zeros((1, 3, side, side), DType::F32, device)?;
    let grads = seg.forward(&probe, Mode::Eval)?.sqr()?.mean_all()?.backward()?;
    let trainable = named.into_iter().filter(|(_, v)| grads.get(v.as_tensor()).is_some()).collect();
    Ok(Built { net: seg, vars: std::iter::once(vars).chain(encoder_vars).collect(), trainable, macs })
}

/// (images (b, 3, s, s) normalised, masks (b * s * s,) u32) of records `ids`, augmented with
/// keys `(seed, key)` when `augment`.
fn batch(
    set: &ImageSet,
    ids: &[usize],
    augment: Option<([f64; 2], u64, u64)>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let side = set.h;
    let plane = side * side;
    let parts: Vec<(Vec<f32>, Vec<u32>)> = ids
        .par_iter()
        .map(|&i| {
            let rec = set.image(i);
            match augment {
                Some((scale, seed, key)) => {
                    joint_augment(rec, side, scale, &mut Rng::from_keys(&[seed, key, i as u64]))
                }
                None => (
                    rec[..3 * plane].iter().map(|&v| v as f32 / 255.0).collect(),
                    rec[3 * plane..].iter().map(|&m| m as u32).collect(),
                ),
            }
        })
        .collect();
    let mut img = Vec::with_capacity(ids.len() * 3 * plane);
    let mut mask = Vec::with_capacity(ids.len() * plane);
    for (i, m) in parts {
        img.extend(i.into_iter().map(|v| (v - MEAN) / STD));
        mask.extend(m);
    }
    Ok((Tensor::from_vec(img, (ids.len(), 3, side, side), device)?, Tensor::from_vec(mask, ids.len() * plane, device)?))
}

/// Cross-entropy over pixels (+ `dice_weight` x (1 - mean soft Dice over classes)).
fn loss(logits: &Tensor, target: &Tensor, dice_weight: f64) -> Result<Tensor> {
    let classes = logits.dim(1)?;
    let flat = logits.permute((0, 2, 3, 1))?.reshape(((), classes))?;
    let ce = candle_nn::loss::cross_entropy(&flat, target)?;
    if dice_weight == 0.0 {
        return Ok(ce);
    }
    let p = candle_nn::ops::softmax(&flat, D::Minus1)?;
    let onehot = candle_nn::encoding::one_hot(target.clone(), classes, 1f32, 0f32)?;
    let inter = (&p * &onehot)?.sum(0)?;
    let denom = (p.sum(0)? + onehot.sum(0)?)?;
    let dice = ((inter * 2.0)? / (denom + 1.0)?)?.mean_all()?;
    Ok((ce + ((1.0 - dice)? * dice_weight)?)?)
}

/// Scores `set` in eval mode; returns the metrics and the first `keep` predictions.
fn evaluate(
    net: &dyn Segmenter,
    set: &ImageSet,
    batch_size: usize,
    device: &Device,
) -> Result<(SegmentationMetrics, Vec<u32>)> {
    let mut cm = ConfusionMatrix::new(2);
    let mut first = Vec::new();
    let ids: Vec<usize> = (0..set.len()).collect();
    for chunk in ids.chunks(batch_size) {
        let (x, y) = batch(set, chunk, None, device)?;
        let pred = net.forward(&x, Mode::Eval)?.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
        cm.update(&pred, &y.to_vec1::<u32>()?, None).map_err(anyhow::Error::msg)?;
        if first.is_empty() {
            first = pred;
        }
    }
    Ok((cm.metrics(), first))
}

/// Trains on `data/train`, scores `data/val` every epoch and `data/test` at the end, and writes
/// `segment.json` and `overlays.png` into `out`.
pub fn train_segmentation(cfg: &SegmentConfig, data: &Path, out: &Path, quiet: bool) -> Result<SegReport> {
    if cfg.batch_size < 2 || cfg.epochs == 0 {
        bail!("segment: batch_size must be at least 2 and epochs positive")
    }
    let device = Device::Cpu;
    let (train, val, test) = (open_split(data, "train")?, open_split(data, "val")?, open_split(data, "test")?);
    let side = train.h;
    let built = build(cfg, side, &device)?;
    let net = &built.net;
    if side % net.multiple() != 0 {
        bail!("segment: {side} px records; {:?} needs a multiple of {}", cfg.model, net.multiple())
    }
    let n_params = built.trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let params: Vec<Param> = built.trainable.iter().map(|(n, v)| Param::new(n.clone(), v.clone())).collect();
    let adamw = AdamWConfig { lr: cfg.lr, betas: [0.9, 0.999], eps: 1e-8, weight_decay: cfg.weight_decay };
    let mut opt = Optimizer::new(OptimizerConfig::Adamw(adamw), params)?;
    let per_epoch = train.len() / cfg.batch_size;
    if per_epoch == 0 {
        bail!("segment: {} training images are fewer than one batch of {}", train.len(), cfg.batch_size)
    }
    let total = cfg.max_steps.unwrap_or(usize::MAX).min(per_epoch * cfg.epochs);
    let warmup = (total / 20).max(1);
    let start = Instant::now();
    let mut step = 0;
    let mut val_miou = Vec::new();
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        Rng::from_keys(&[cfg.seed, 0x5e9, epoch as u64]).shuffle(&mut order);
        for ids in order.chunks_exact(cfg.batch_size) {
            if step == total {
                break 'epochs;
            }
            let (x, y) = batch(&train, ids, Some((cfg.crop_scale, cfg.seed, step as u64)), &device)?;
            let logits = net.forward(&x, Mode::Train { key: Rng::from_keys(&[cfg.seed, step as u64]).next_u64() })?;
            let l = loss(&logits, &y, cfg.dice_weight)?;
            let lr = warmup_cosine(step, total, warmup, cfg.lr, 0.0);
            opt.step(&l.backward()?, lr, 1.0)?;
            step += 1;
            if !quiet && step % 20 == 0 {
                eprintln!("step {step}/{total} loss {:.4} lr {lr:.2e}", l.to_scalar::<f32>()?);
            }
        }
        let (m, _) = evaluate(net.as_ref(), &val, cfg.batch_size, &device)?;
        if !quiet {
            eprintln!("epoch {epoch}: val mIoU {:.2} Dice {:.2} pixel acc {:.2}", m.miou, m.mdice, m.pixel_accuracy);
        }
        val_miou.push(m.miou);
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let (val_m, _) = evaluate(net.as_ref(), &val, cfg.batch_size, &device)?;
    let (test_m, preds) = evaluate(net.as_ref(), &test, cfg.batch_size, &device)?;
    let report = SegReport {
        config: cfg.clone(),
        params: n_params,
        gmacs: built.macs as f64 / 1e9,
        steps: step,
        train_seconds,
        images_per_sec: (step * cfg.batch_size) as f64 / train_seconds.max(1e-9),
        val_miou_per_epoch: val_miou,
        val: val_m,
        test: test_m,
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::fsutil::write_atomic(&out.join("segment.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    overlays(&test, &preds, &out.join("overlays.png"))?;
    Ok(report)
}

/// Input / truth / prediction of the first (up to 8) test images.
fn overlays(test: &ImageSet, preds: &[u32], path: &Path) -> Result<()> {
    let side = test.h;
    let plane = side * side;
    let n = test.len().min(8).min(preds.len() / plane);
    if n == 0 {
        return Ok(());
    }
    let mut img = Vec::new();
    let (mut truth, mut pred) = (Vec::new(), Vec::new());
    for i in 0..n {
        let rec = test.image(i);
        img.extend(rec[..3 * plane].iter().map(|&v| v as f32 / 255.0));
        truth.extend(rec[3 * plane..].iter().map(|&m| m as f32));
        pred.extend(preds[i * plane..(i + 1) * plane].iter().map(|&m| m as f32));
    }
    let dev = Device::Cpu;
    let col = |title, v: Vec<f32>, c| -> Result<Column> {
        Ok(Column { title, images: Tensor::from_vec(v, (n, c, side, side), &dev)?, space: Space::Unit })
    };
    let cols = [col("input", img, 3)?, col("truth", truth, 1)?, col("prediction", pred, 1)?];
    crate::panel::write_panel(path, &cols, &[0.0], &[1.0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// End to end on a tiny generated segset: training runs, the metrics are sane, the report
    /// and overlays are written; a store of the wrong kind is a clear error.
    #[test]
    fn trains_and_scores_a_tiny_segset() {
        let src = tempfile::tempdir().unwrap();
        for k in 0..12 {
            let mut img = image::RgbaImage::new(40, 40);
            for (x, y, p) in img.enumerate_pixels_mut() {
                let d = (x as f32 - 20.0).powi(2) + (y as f32 - 20.0).powi(2);
                *p = if d < 150.0 { image::Rgba([200, (k * 20) as u8, 40, 255]) } else { image::Rgba([0, 0, 0, 0]) };
            }
            img.save(src.path().join(format!("{k}.png"))).unwrap();
        }
        let data = tempfile::tempdir().unwrap();
        let opts = selfsup_data::segset::SegsetOptions { size: 32, seed: 1, split: [0.5, 0.25], ..Default::default() };
        selfsup_data::segset::build_segset(src.path(), &data.path().join("set"), &opts, false).unwrap();
        let out = tempfile::tempdir().unwrap();
        let cfg = SegmentConfig { widths: vec![8, 8, 16, 16], epochs: 2, batch_size: 3, ..SegmentConfig::default() };
        let r = train_segmentation(&cfg, &data.path().join("set"), out.path(), true).unwrap();
        assert_eq!(r.steps, 4);
        assert_eq!(r.val_miou_per_epoch.len(), 2);
        assert!((0.0..=100.0).contains(&r.test.miou) && r.test.pixels == 3 * 32 * 32, "{:?}", r.test);
        assert!(out.path().join("segment.json").is_file() && out.path().join("overlays.png").is_file());
        let e = train_segmentation(&cfg, src.path(), out.path(), true).unwrap_err().to_string();
        assert!(e.contains("opening"), "{e}");
    }

    fn tiny_segset() -> tempfile::TempDir {
        let src = tempfile::tempdir().unwrap();
        for k in 0..12 {
            let mut img = image::RgbaImage::new(40, 40);
            for (x, y, p) in img.enumerate_pixels_mut() {
                let inside = (8..30).contains(&x) && (6..6 + 2 * k).contains(&y);
                *p = if inside { image::Rgba([30, 200, (k * 20) as u8, 255]) } else { image::Rgba([0, 0, 0, 0]) };
            }
            img.save(src.path().join(format!("{k}.png"))).unwrap();
        }
        let data = tempfile::tempdir().unwrap();
        let opts = selfsup_data::segset::SegsetOptions { size: 32, seed: 1, split: [0.5, 0.25], ..Default::default() };
        selfsup_data::segset::build_segset(src.path(), &data.path().join("set"), &opts, false).unwrap();
        data
    }

    fn tiny_resnet(in_chans: usize) -> ModelConfig {
        ModelConfig::narrow(selfsup_models::Arch::Resnet18, in_chans, &[4, 8, 8, 8])
    }

    /// Issue 9's transfer path end to end: pretrain on the segset's own images
    /// (`format = "segset"`, masks unused), then segment with that backbone as the encoder.
    #[test]
    fn pretrain_on_segset_images_then_segment_with_the_encoder() {
        let data = tiny_segset();
        let set = data.path().join("set");
        let runs = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
seed = 3
epochs = 1
max_steps = 2
batch_size = 3
output_dir = "{out}"
[data]
format = "segset"
path = "{set}"
[model]
arch = "resnet18"
in_chans = 3
widths = [4, 8, 8, 8]
{objective}
[[views]]
size = 32
crop_scale = [0.3, 1.0]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[[views]]
size = 32
crop_scale = [0.3, 1.0]
hflip = 0.5
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[optimizer.sgd]
lr = 0.05
[checkpoint]
every = 2
"#,
            out = runs.path().join("run").display(),
            set = set.display(),
            objective = crate::testutil::BYOL,
        );
        let cfg = crate::RunConfig::from_toml(&text).unwrap();
        let summary = crate::Trainer::new(cfg).unwrap().quiet().run().unwrap();
        assert_eq!(summary.steps, 2);
        let seg = SegmentConfig {
            model: SegModel::EncoderUnet,
            encoder_checkpoint: Some(runs.path().join("run")),
            epochs: 1,
            batch_size: 3,
            ..SegmentConfig::default()
        };
        let out = tempfile::tempdir().unwrap();
        let r = train_segmentation(&seg, &set, out.path(), true).unwrap();
        assert_eq!(r.steps, 2);
    }

    /// A pretrained backbone loads into the U-Net's encoder exactly (every tensor equals the
    /// checkpoint's); a random one trains end to end; a 1-channel encoder and a misplaced
    /// `encoder` table are refused by name.
    #[test]
    fn encoder_unet_from_random_and_pretrained_backbones() {
        let data = tiny_segset();
        let set = data.path().join("set");
        let out = tempfile::tempdir().unwrap();
        let base = SegmentConfig { model: SegModel::EncoderUnet, epochs: 1, batch_size: 3, ..SegmentConfig::default() };
        let random = SegmentConfig { encoder: Some(tiny_resnet(3)), ..base.clone() };
        let r = train_segmentation(&random, &set, out.path(), true).unwrap();
        assert_eq!(r.steps, 2);
        assert!(r.gmacs > 0.0 && r.params > 0);

        // A checkpoint as `selfsup pretrain` writes it, for a 3-channel backbone.
        let runs = tempfile::tempdir().unwrap();
        let mut run = crate::testutil::tiny_config(runs.path(), &runs.path().join("run"), 1, 1);
        run.model = tiny_resnet(3);
        let (vars, _) = crate::trainer::random_backbone_vars(&run, &Device::Cpu, 0.0).unwrap();
        let tensors: Vec<(String, Tensor)> = vars
            .tensors()
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), (t + 0.25).unwrap())) // not the random init
            .collect();
        let manifest = crate::checkpoint::Manifest {
            step: 1,
            epoch: 0,
            total_steps: 1,
            seed: run.seed,
            config: run.to_toml().unwrap(),
            loss: 0.0,
            tensors: String::new(),
        };
        let ckpt = crate::checkpoint::save(&runs.path().join("ckpt"), &manifest, &tensors, 1).unwrap();
        let pretrained = SegmentConfig { encoder_checkpoint: Some(ckpt.clone()), ..base.clone() };
        let built = build(&pretrained, 32, &Device::Cpu).unwrap();
        let want: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let encoder = &built.vars[1];
        let mut checked = 0;
        for (name, t) in encoder.tensors() {
            let diff = (&t - &want[&format!("model.{name}")]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
            checked += 1;
        }
        assert!(checked > 20 && built.trainable.iter().any(|(n, _)| n.starts_with("encoder.layer1.")));
        train_segmentation(&pretrained, &set, out.path(), true).unwrap();

        run.model = tiny_resnet(1);
        let (vars, _) = crate::trainer::random_backbone_vars(&run, &Device::Cpu, 0.0).unwrap();
        let tensors: Vec<(String, Tensor)> =
            vars.tensors().into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
        let manifest = crate::checkpoint::Manifest { config: run.to_toml().unwrap(), ..manifest };
        let gray = crate::checkpoint::save(&runs.path().join("gray"), &manifest, &tensors, 1).unwrap();
        let e = build(&SegmentConfig { encoder_checkpoint: Some(gray), ..base.clone() }, 32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("takes 1 input channels"), "{e}");
        let e = build(&SegmentConfig { encoder: Some(tiny_resnet(3)), ..SegmentConfig::default() }, 32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("belong to model encoder_unet"), "{e}");
        let e = build(&base, 32, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("exactly one of"), "{e}");
    }
}
