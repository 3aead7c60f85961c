//! `selfsup`: pretrain backbones without labels, then measure the features.
//!
//! ```text
//! selfsup pretrain --config configs/byol_resnet18_fmnist_demo.toml [--resume RUN_DIR]
//! selfsup eval knn --checkpoint RUN_DIR [--baselines] [--bank N] [--grid N]
//! selfsup eval linear --checkpoint RUN_DIR [--preset standard|moco|care|mae] [--baselines] [--grid N]
//!     [--weight-decay W] [--holdout N]
//! selfsup eval finetune --checkpoint RUN_DIR [--preset convnextv2-atto|...] [--epochs N] [--baselines]
//!     [--holdout N]
//! selfsup report RUN_DIR [--font FILE]
//! selfsup info [models|objectives|optimizers] [--size 224]
//! ```

use std::path::{Path, PathBuf};

mod data;
mod infer;

// Tensors are large and short-lived: glibc returns them to the OS and page-faults them back
// in on every step (a fifth of a training step, measured with perf); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::{Parser, Subcommand};
use selfsup_data::source::take;
use selfsup_data::Source;
use selfsup_data::Split;
use selfsup_eval::features::{extract, raw_pixels, EvalTransform, Pooling};
use selfsup_eval::{knn_classify, linear_probe, KnnAccuracy, KnnSetting, ProbeConfig};
use selfsup_train::finetune::{finetune, FinetuneConfig, LayerDecayRule};
use selfsup_train::trainer::{load_backbone, load_backbone_vars, load_split, random_backbone, random_backbone_vars};
use selfsup_train::{RunConfig, Trainer};

#[derive(Parser)]
#[command(name = "selfsup", version, about = "Self-supervised pretraining of vision backbones")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Pretrain a backbone from a TOML run config.
    Pretrain {
        #[arg(long)]
        config: PathBuf,
        /// Continue from the newest checkpoint of this run directory (or checkpoint file).
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Evaluate pretrained features.
    Eval {
        #[command(subcommand)]
        protocol: EvalCommand,
    },
    /// Convert datasets into shard stores, and describe datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Plot a run's metrics (PNG) and summarise it with its evaluations (Markdown), into
    /// <run dir>/report/.
    Report {
        /// The run directory (the `output_dir` of its config).
        run_dir: PathBuf,
        /// A TrueType font for the plot text (default: DejaVu Sans or similar, if installed).
        #[arg(long)]
        font: Option<PathBuf>,
    },
    /// Run a registered model on a tensor with weights from a timm / HF transformers state_dict
    /// (safetensors): writes `features` (pooled, pre-logits) and, when the weights hold a
    /// classifier, `logits`.
    Infer {
        /// Architecture id, as in `selfsup info` (e.g. resnet50, convnextv2_atto, vit_tiny_patch16, cvt13).
        #[arg(long)]
        model: String,
        /// The state_dict (safetensors), named as the reference implementation names it.
        #[arg(long)]
        weights: PathBuf,
        /// A safetensors file with a tensor `input` of shape (N, C, H, W).
        #[arg(long)]
        input: PathBuf,
        /// Where to write `features` and `logits` (safetensors).
        #[arg(long)]
        output: PathBuf,
        /// Stage widths of a narrow variant (as the run config's `model.widths`).
        #[arg(long, value_delimiter = ',')]
        widths: Option<Vec<usize>>,
    },
    /// Train SegNetr or the plain U-Net on a segset (`selfsup data segset`), score val every
    /// epoch and test at the end (mIoU, Dice, pixel accuracy), write segment.json and
    /// overlays.png into --out.
    Segment {
        /// `segnetr`, `unet`, or `encoder_unet` (the U-Net decoder over a registered backbone:
        /// `--encoder-checkpoint`, or an `[encoder]` model table in --config for random weights).
        #[arg(long)]
        model: String,
        /// A `selfsup pretrain` run directory or checkpoint whose backbone becomes the encoder.
        #[arg(long)]
        encoder_checkpoint: Option<PathBuf>,
        /// The segset directory (train/, val/, test/).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A TOML file with any fields of the run (widths, branches, epochs, batch_size, lr,
        /// weight_decay, dice_weight, crop_scale, seed, max_steps); flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long)]
        lr: Option<f64>,
        /// Channels per level, e.g. 32,64,128,256 (SegNetr: four levels; U-Net: two or more).
        #[arg(long, value_delimiter = ',')]
        widths: Option<Vec<usize>>,
        /// U-Net upsampling: `bilinear` (then a 1x1 conv) or `transposed` (2x2 stride-2 conv).
        #[arg(long)]
        upsample: Option<String>,
        /// Weight of the soft Dice loss added to cross-entropy.
        #[arg(long)]
        dice: Option<f64>,
        /// SegNetr branches: `both`, `local` or `global`.
        #[arg(long)]
        branches: Option<String>,
        #[arg(long)]
        max_steps: Option<usize>,
    },
    /// List what is registered: `models` (parameters, GMACs and GFLOPs at --size),
    /// `segmentation` (SegNetr and the U-Net at two widths, two classes, RGB), `objectives`,
    /// `optimizers`; everything when no topic is given.
    Info {
        topic: Option<InfoTopic>,
        /// Input side for the compute columns.
        #[arg(long, default_value_t = 224)]
        size: usize,
    },
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum InfoTopic {
    Models,
    Segmentation,
    Objectives,
    Optimizers,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Weighted kNN on the run's dataset: training split as bank, test split as queries.
    Knn {
        /// A run directory, its checkpoints/ directory, or a checkpoint file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Use only the first N training images as the bank (default: all).
        #[arg(long)]
        bank: Option<usize>,
        /// Use only the first N test images as queries (default: all).
        #[arg(long)]
        queries: Option<usize>,
        /// Also evaluate the same network at random init and the raw pixels.
        #[arg(long)]
        baselines: bool,
        /// Evaluation image side in pixels (default: the size of the run's first view).
        #[arg(long)]
        size: Option<usize>,
        #[command(flatten)]
        pool: PoolArg,
        /// Feature-extraction batch size.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Write the results as JSON here (default: <run dir>/knn.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Linear probe on frozen, cached features: training split to fit, test split to score.
    Linear {
        #[command(flatten)]
        run: RunSubset,
        /// Recipe: `standard` (cosine, lr 0.1), `moco` (lr 30, steps at 60/80), `care`
        /// (Linear + BatchNorm1d head, lr 0.2, cosine) or `mae` (BatchNorm1d without affine on
        /// the features, then Linear; lr 0.1, 10 warm-up epochs, cosine).
        #[arg(long, default_value = "standard")]
        preset: String,
        /// Override the preset's number of epochs (a warm-up keeps its share of them).
        #[arg(long)]
        epochs: Option<usize>,
        /// Override the preset's weight decay (every preset has 0, as the references' probes;
        /// a wide grid-pooled feature may want some).
        #[arg(long)]
        weight_decay: Option<f64>,
        /// Also probe the same network at random init and the raw pixels.
        #[arg(long)]
        baselines: bool,
        #[command(flatten)]
        pool: PoolArg,
        /// Feature-extraction batch size.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Write the results as JSON here (default: <run dir>/linear.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Segmentation metrics of a folder of predicted class-index PNG masks against a folder of
    /// ground-truth masks of the same names (per-class IoU and Dice, mIoU, pixel accuracy).
    Segment {
        /// Predicted masks (8/16-bit greyscale or palette PNGs whose values are class indices).
        #[arg(long)]
        pred: PathBuf,
        /// Ground-truth masks, same file names.
        #[arg(long)]
        truth: PathBuf,
        /// Number of classes (labels 0..N).
        #[arg(long)]
        classes: usize,
        /// Target label to skip (e.g. 255, VOC's border label).
        #[arg(long)]
        ignore: Option<u32>,
        /// Class names for the table, comma-separated.
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Write the results as JSON here (default: <pred>/segment.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// End-to-end fine-tuning with a new linear head (AdamW, layer-wise lr decay, label
    /// smoothing, drop-path): training split to fit, test split to score.
    Finetune {
        #[command(flatten)]
        run: RunSubset,
        /// Recipe: `fmnist` (small images on a CPU), or the references' ImageNet recipes
        /// `convnextv2-atto`, `convnextv2-tiny`, `convnextv2-base`, `mae`, `lomar` (set the
        /// scale with the flags below).
        #[arg(long, default_value = "fmnist")]
        preset: String,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        warmup_epochs: Option<usize>,
        /// Training batch size (the peak lr is blr x batch / 256).
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long)]
        blr: Option<f64>,
        #[arg(long)]
        layer_decay: Option<f64>,
        #[arg(long)]
        weight_decay: Option<f64>,
        #[arg(long)]
        smoothing: Option<f64>,
        #[arg(long)]
        drop_path: Option<f64>,
        /// Mixup Beta parameter (0 = off).
        #[arg(long)]
        mixup: Option<f64>,
        /// CutMix Beta parameter (0 = off).
        #[arg(long)]
        cutmix: Option<f64>,
        /// Smallest RandomResizedCrop area fraction of the training view.
        #[arg(long)]
        min_crop: Option<f64>,
        /// Also measure test accuracy every N epochs.
        #[arg(long, default_value_t = 0)]
        eval_every: usize,
        /// Also fine-tune the same network from random init (the supervised baseline).
        #[arg(long)]
        baselines: bool,
        /// Write the results as JSON here (default: <run dir>/finetune.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Pack a source (IDX or CIFAR directory, image folder) into stores `<out>/train` and
    /// `<out>/test` (a folder without train/ and test|val/ sub-folders becomes `<out>/train`):
    /// memory-mapped shards, or LMDB with `--to lmdb`.
    Pack {
        source: PathBuf,
        out: PathBuf,
        /// `auto`, `idx`, `cifar` or `folder`.
        #[arg(long, default_value = "auto")]
        format: String,
        /// `shards` (decoded, fixed-size, memory-mapped) or `lmdb` (encoded images as they are,
        /// decoded when read).
        #[arg(long, default_value = "shards")]
        to: String,
        /// Image folders: output side (shorter side resized, then centre-cropped).
        #[arg(long)]
        size: Option<usize>,
        /// Image folders: 1 (grey) or 3 (RGB).
        #[arg(long, default_value_t = 3)]
        channels: usize,
        /// Image folders: images with more pixels are skipped before decoding.
        #[arg(long, default_value_t = 40_000_000)]
        max_pixels: u64,
        /// Image folders: stop with an error when more than this fraction is skipped.
        #[arg(long, default_value_t = 0.05)]
        max_bad: f64,
        /// Replace an existing output.
        #[arg(long)]
        overwrite: bool,
    },
    /// Count, classes, per-class counts and image sizes of a dataset or store.
    Info { path: PathBuf },
    /// Build a segmentation set from RGBA images (e.g. /usr/share/openclipart/png): each
    /// foreground composited onto another image at a random scale and place, mask = alpha > 0.5,
    /// deterministic 80/10/10 split into shard stores `<out>/{train,val,test}` of 4-plane
    /// records (RGB + class index). Images without usable alpha are skipped and counted.
    Segset {
        source: PathBuf,
        out: PathBuf,
        #[arg(long, default_value_t = 96)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images with more pixels are skipped before decoding.
        #[arg(long, default_value_t = 40_000_000)]
        max_pixels: u64,
        /// Replace an existing output.
        #[arg(long)]
        overwrite: bool,
    },
}

/// The run to evaluate and how much of its labelled splits to use.
#[derive(clap::Args)]
struct RunSubset {
    /// A run directory, its checkpoints/ directory, or a checkpoint file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Use only the first N training images (default: all).
    #[arg(long)]
    train: Option<usize>,
    /// Use only the first N test images (default: all).
    #[arg(long)]
    test: Option<usize>,
    /// Image side in pixels (default: the size of the run's first view).
    #[arg(long)]
    size: Option<usize>,
    /// Hold out the last N training images and score on them instead of the test split: a
    /// validation set for choosing settings without looking at the test set.
    #[arg(long, value_name = "N")]
    holdout: Option<usize>,
}

impl RunSubset {
    /// The run's labelled splits as these flags select them.
    fn setup(&self) -> Result<EvalSetup> {
        let mut setup = eval_setup(&self.checkpoint, self.train, self.test, self.size)?;
        if let Some(n) = self.holdout {
            hold_out(&mut setup, n)?;
        }
        Ok(setup)
    }

    /// What the scored images are, for the printed tables.
    fn scored(&self) -> &'static str {
        if self.holdout.is_some() {
            "held-out training images"
        } else {
            "test images"
        }
    }
}

/// How the backbone's final feature map becomes one feature vector.
#[derive(clap::Args)]
struct PoolArg {
    /// Pool the final feature map to an N x N grid and concatenate the cells (channels x N x N
    /// features) instead of the backbone's global pool (Goyal et al. 2019's probe).
    #[arg(long, value_name = "N")]
    grid: Option<usize>,
}

impl PoolArg {
    /// `--grid N` as a pooling: absent is the backbone's global pool.
    fn pooling(&self) -> Pooling {
        self.grid.map_or(Pooling::Global, Pooling::Grid)
    }
}

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Never hand freed memory back to the OS: the next step needs the same buffers, and
    // faulting them back in cost 15-20 % of a step (perf, 2-core CPU).
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain { config, resume } => pretrain(config, resume),
        Command::Eval {
            protocol: EvalCommand::Knn { checkpoint, bank, queries, baselines, size, pool, batch, json },
        } => eval_knn(checkpoint, KnnArgs { bank, queries, baselines, size, pooling: pool.pooling(), batch, json }),
        Command::Eval {
            protocol: EvalCommand::Linear { run, preset, epochs, weight_decay, baselines, pool, batch, json },
        } => eval_linear(
            run,
            LinearArgs { preset, epochs, weight_decay, baselines, pooling: pool.pooling(), batch, json },
        ),
        Command::Eval { protocol: EvalCommand::Segment { pred, truth, classes, ignore, names, json } } => {
            eval_segment(&pred, &truth, classes, ignore, &names, json)
        }
        Command::Eval {
            protocol:
                EvalCommand::Finetune {
                    run,
                    preset,
                    epochs,
                    warmup_epochs,
                    batch,
                    blr,
                    layer_decay,
                    weight_decay,
                    smoothing,
                    drop_path,
                    mixup,
                    cutmix,
                    min_crop,
                    eval_every,
                    baselines,
                    json,
                },
        } => {
            let mut cfg = FinetuneConfig::preset(&preset)?;
            cfg.epochs = epochs.unwrap_or(cfg.epochs);
            cfg.warmup_epochs = warmup_epochs.unwrap_or(cfg.warmup_epochs);
            cfg.batch_size = batch.unwrap_or(cfg.batch_size);
            cfg.blr = blr.unwrap_or(cfg.blr);
            cfg.layer_decay = layer_decay.unwrap_or(cfg.layer_decay);
            cfg.weight_decay = weight_decay.unwrap_or(cfg.weight_decay);
            cfg.label_smoothing = smoothing.unwrap_or(cfg.label_smoothing);
            cfg.drop_path = drop_path.unwrap_or(cfg.drop_path);
            cfg.mixup = mixup.unwrap_or(cfg.mixup);
            cfg.cutmix = cutmix.unwrap_or(cfg.cutmix);
            if let Some(m) = min_crop {
                cfg.crop_scale[0] = m;
            }
            cfg.eval_every = eval_every;
            eval_finetune(run, preset, cfg, baselines, json)
        }
        Command::Data {
            command: DataCommand::Pack { source, out, format, to, size, channels, max_pixels, max_bad, overwrite },
        } => {
            let opts = selfsup_data::folder::DecodeOptions { size: size.unwrap_or(0), channels, max_pixels };
            data::pack(&source, &out, &format, data::Store::named(&to)?, &opts, max_bad, overwrite)
        }
        Command::Data { command: DataCommand::Info { path } } => data::info(&path),
        Command::Data { command: DataCommand::Segset { source, out, size, seed, max_pixels, overwrite } } => {
            let opts = selfsup_data::segset::SegsetOptions { size, seed, max_pixels, ..Default::default() };
            let s = selfsup_data::segset::build_segset(&source, &out, &opts, overwrite)?;
            println!(
                "segset {}: train {} / val {} / test {} images of {size}x{size}; skipped {:?}",
                out.display(),
                s.counts[0],
                s.counts[1],
                s.counts[2],
                s.skipped
            );
            for e in s.examples.iter().take(10) {
                eprintln!("  skipped {e}");
            }
            Ok(())
        }
        Command::Report { run_dir, font } => {
            let w = selfsup_train::report::report(&run_dir, font.as_deref())?;
            if let Some(why) = &w.no_plots {
                eprintln!("warning: no plots drawn: {why}");
            }
            for p in &w.plots {
                println!("plot written to {}", p.display());
            }
            println!("summary written to {}", w.summary.display());
            Ok(())
        }
        Command::Info { topic, size } => info(topic, size),
        Command::Segment {
            model,
            encoder_checkpoint,
            data,
            out,
            config,
            epochs,
            batch,
            lr,
            widths,
            upsample,
            dice,
            branches,
            max_steps,
        } => {
            use selfsup_models::segnetr::Upsample;
            use selfsup_train::segment::{train_segmentation, SegModel, SegmentConfig};
            let mut cfg = match &config {
                Some(p) => {
                    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                    toml::from_str::<SegmentConfig>(&text).with_context(|| format!("in {}", p.display()))?
                }
                None => SegmentConfig::default(),
            };
            cfg.model = match model.as_str() {
                "segnetr" => SegModel::Segnetr,
                "unet" => SegModel::Unet,
                "encoder_unet" => SegModel::EncoderUnet,
                other => anyhow::bail!("--model `{other}`: expected segnetr, unet or encoder_unet"),
            };
            if encoder_checkpoint.is_some() {
                cfg.encoder_checkpoint = encoder_checkpoint;
            }
            if let Some(w) = widths {
                cfg.widths = w;
            }
            if let Some(u) = upsample {
                cfg.upsample = match u.as_str() {
                    "bilinear" => Upsample::Bilinear,
                    "transposed" => Upsample::Transposed,
                    other => anyhow::bail!("--upsample `{other}`: expected bilinear or transposed"),
                };
            }
            if let Some(b) = branches {
                cfg.branches = match b.as_str() {
                    "both" => [true, true],
                    "local" => [true, false],
                    "global" => [false, true],
                    other => anyhow::bail!("--branches `{other}`: expected both, local or global"),
                };
            }
            cfg.epochs = epochs.unwrap_or(cfg.epochs);
            cfg.batch_size = batch.unwrap_or(cfg.batch_size);
            cfg.lr = lr.unwrap_or(cfg.lr);
            cfg.dice_weight = dice.unwrap_or(cfg.dice_weight);
            cfg.max_steps = max_steps.or(cfg.max_steps);
            let r = train_segmentation(&cfg, &data, &out, false)?;
            println!("| split | mIoU | mean Dice | pixel acc | foreground IoU |");
            println!("|---|---|---|---|---|");
            for (name, m) in [("val", &r.val), ("test", &r.test)] {
                println!("| {name} | {:.2} | {:.2} | {:.2} | {:.2} |", m.miou, m.mdice, m.pixel_accuracy, m.iou[1]);
            }
            println!(
                "{:?}: {} parameters, {:.2} GMACs per image, {} steps in {:.0} s ({:.1} images/s); report {}",
                cfg.model,
                r.params,
                r.gmacs,
                r.steps,
                r.train_seconds,
                r.images_per_sec,
                out.join("segment.json").display()
            );
            Ok(())
        }
        Command::Infer { model, weights, input, output, widths } => {
            infer::infer(&model, &weights, &input, &output, widths)
        }
    }
}

/// The registry as a table: every architecture's parameters (without a classifier) and
/// multiply-accumulates of one forward, counted from its config.
fn info(topic: Option<InfoTopic>, size: usize) -> Result<()> {
    use selfsup_models::{Arch, ModelConfig};
    let show = |t: InfoTopic| topic.is_none_or(|x| x == t);
    if show(InfoTopic::Models) {
        println!("| model id | params (M) | GMACs at {size} px | GFLOPs (2 x MACs) |");
        println!("|---|---|---|---|");
        for &arch in Arch::ALL {
            let name = serde_json::to_string(&arch)?.trim_matches('"').to_string();
            let resnet = name.starts_with("resnet");
            let stems: &[bool] = if resnet { &[true, false] } else { &[false] };
            for &imagenet_stem in stems {
                let cfg = ModelConfig {
                    arch,
                    in_chans: 3,
                    widths: None,
                    drop_path_rate: 0.0,
                    img_size: name.starts_with("vit").then_some(size),
                    imagenet_stem,
                    irpe: false,
                };
                let label = match (resnet, imagenet_stem) {
                    (true, true) => format!("{name} (ImageNet stem)"),
                    (true, false) => format!("{name} (small-image stem)"),
                    _ => name.clone(),
                };
                match cfg.cost(size) {
                    Ok((params, macs)) => {
                        let g = macs as f64 / 1e9;
                        println!("| {label} | {:.2} | {g:.2} | {:.2} |", params as f64 / 1e6, 2.0 * g)
                    }
                    Err(e) => println!("| {label} | - | {e} | - |"),
                }
            }
        }
        println!("(backbones without classifier; `selfsup segment --model segnetr|unet` trains the segmentation nets)");
    }
    if show(InfoTopic::Segmentation) {
        use selfsup_models::segnetr::{Config, SegNetr, UNet, UNetConfig};
        println!("| segmentation net (2 classes) | params (M) | GMACs at {size} px | GFLOPs (2 x MACs) |");
        println!("|---|---|---|---|");
        let row = |name: String, vars: selfsup_models::Vars, macs: usize| {
            let g = macs as f64 / 1e9;
            let params = vars.params.num_elements() as f64 / 1e6;
            println!("| {name} | {params:.2} | {g:.2} | {:.2} |", 2.0 * g);
        };
        let new_vars = || selfsup_models::Vars::new(0);
        for widths in [[32, 64, 128, 256], [64, 128, 256, 512]] {
            let cfg = Config::new(3, 2, widths);
            let vars = new_vars();
            SegNetr::new(&cfg, vars.vb(candle_core::DType::F32, &candle_core::Device::Cpu))?;
            row(format!("segnetr {widths:?}"), vars, cfg.segnetr_macs(size));
            let unet = UNetConfig::like(&cfg);
            let vars = new_vars();
            UNet::new(&unet, vars.vb(candle_core::DType::F32, &candle_core::Device::Cpu))?;
            row(format!("unet {widths:?}"), vars, unet.macs(size));
        }
        let classic = UNetConfig::classic(3, 2);
        let vars = new_vars();
        UNet::new(&classic, vars.vb(candle_core::DType::F32, &candle_core::Device::Cpu))?;
        row(format!("unet classic {:?} transposed", classic.widths), vars, classic.macs(size));
    }
    if show(InfoTopic::Objectives) {
        println!(
            "objectives ([objective.<id>] in a run config): {}",
            selfsup_objectives::ObjectiveConfig::IDS.join(", ")
        );
    }
    if show(InfoTopic::Optimizers) {
        println!("optimizers ([optimizer.<id>]): {}", selfsup_train::optim::OptimizerConfig::IDS.join(", "));
    }
    Ok(())
}

fn pretrain(config: PathBuf, resume: Option<PathBuf>) -> Result<()> {
    let cfg = RunConfig::from_file(&config)?;
    let out = cfg.output_dir.clone();
    let mut trainer = Trainer::new(cfg)?;
    if let Some(from) = resume {
        trainer.resume(&from).with_context(|| format!("resuming from {}", from.display()))?;
        eprintln!("resumed at step {} of {}", trainer.step(), trainer.total_steps());
    }
    let s = trainer.run()?;
    println!(
        "pretrained {} steps; last loss {:.4}; {:.1} images/s; checkpoint {}",
        s.steps,
        s.last_loss,
        s.images_per_sec,
        s.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
    );
    println!("run directory: {}", out.display());
    Ok(())
}

struct KnnArgs {
    bank: Option<usize>,
    queries: Option<usize>,
    baselines: bool,
    size: Option<usize>,
    pooling: Pooling,
    batch: usize,
    json: Option<PathBuf>,
}

/// What every evaluation protocol starts from: the run, its labelled splits and the transform.
struct EvalSetup {
    cfg: RunConfig,
    backbone: Box<dyn selfsup_models::Backbone>,
    train: std::sync::Arc<dyn Source>,
    test: std::sync::Arc<dyn Source>,
    train_labels: Vec<u32>,
    test_labels: Vec<u32>,
    num_classes: usize,
    /// Test classes that never occur in the training split (they count as errors).
    unseen: usize,
    transform: EvalTransform,
}

fn eval_setup(
    checkpoint: &Path,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
    size: Option<usize>,
) -> Result<EvalSetup> {
    let (cfg, backbone) = load_backbone(checkpoint, &candle_core::Device::Cpu)?;
    let mut data = cfg.data.clone();
    data.limit = train_limit;
    let train = load_split(&data, Split::Train).context("loading the training split")?;
    let mut test = load_split(&cfg.data, Split::Test).context("loading the test split")?;
    if let Some(q) = test_limit {
        test = take(test, q);
    }
    let (train_labels, test_labels) = (
        train.labels().context("the training split has no labels")?,
        test.labels().context("the test split has no labels")?,
    );
    let num_classes = train.num_classes().max(test.num_classes());
    let unseen = unseen_classes(&train_labels, &test_labels);
    if unseen > 0 {
        eprintln!("note: {unseen} test class(es) do not occur in the training split; they count as errors");
    }
    let view = &cfg.views[0];
    let size = size.unwrap_or(view.size);
    let multiple = cfg.model.size_multiple()?;
    if size == 0 || !size.is_multiple_of(multiple) {
        anyhow::bail!("--size {size} is not a positive multiple of the model's stride {multiple}")
    }
    let transform = EvalTransform { size, mean: view.mean.clone(), std: view.std.clone() };
    Ok(EvalSetup { cfg, backbone, train, test, train_labels, test_labels, num_classes, unseen, transform })
}

/// Classes among `scored` labels that never occur in `fitted` ones (they count as errors).
fn unseen_classes(fitted: &[u32], scored: &[u32]) -> usize {
    let seen: std::collections::BTreeSet<u32> = fitted.iter().copied().collect();
    scored.iter().filter(|l| !seen.contains(l)).collect::<std::collections::BTreeSet<_>>().len()
}

/// Replaces the test split with the last `n` training images, which leave the training split.
fn hold_out(s: &mut EvalSetup, n: usize) -> Result<()> {
    let len = s.train.len();
    if n == 0 || n >= len {
        anyhow::bail!("--holdout {n}: expected 1 to {} (the training split has {len} images)", len.saturating_sub(1))
    }
    let keep = len - n;
    s.test = selfsup_data::source::skip(s.train.clone(), keep);
    s.train = take(s.train.clone(), keep);
    s.test_labels = s.train_labels.split_off(keep);
    s.unseen = unseen_classes(&s.train_labels, &s.test_labels);
    if s.unseen > 0 {
        eprintln!("note: {} held-out class(es) do not occur in the rest of the training split", s.unseen);
    }
    Ok(())
}

/// (name, training features, test features, seconds) of the pretrained backbone and, with
/// `baselines`, the same network at random init and the raw pixels; the networks' features
/// pooled as `pooling` says.
fn feature_sets(
    s: &EvalSetup,
    baselines: bool,
    pooling: Pooling,
    batch: usize,
) -> Result<Vec<(String, Tensor, Tensor, f64)>> {
    let device = candle_core::Device::Cpu;
    let mut out = Vec::new();
    if baselines {
        let t0 = Instant::now();
        let random = random_backbone(&s.cfg, &device)?;
        let (a, b) = (
            extract(random.as_ref(), s.train.as_ref(), &s.transform, pooling, batch, &device)?,
            extract(random.as_ref(), s.test.as_ref(), &s.transform, pooling, batch, &device)?,
        );
        out.push(("random init".to_string(), a, b, t0.elapsed().as_secs_f64()));
        let t0 = Instant::now();
        out.push((
            "raw pixels".to_string(),
            raw_pixels(s.train.as_ref())?,
            raw_pixels(s.test.as_ref())?,
            t0.elapsed().as_secs_f64(),
        ));
    }
    let t0 = Instant::now();
    let (a, b) = (
        extract(s.backbone.as_ref(), s.train.as_ref(), &s.transform, pooling, batch, &device)?,
        extract(s.backbone.as_ref(), s.test.as_ref(), &s.transform, pooling, batch, &device)?,
    );
    out.push(("pretrained".to_string(), a, b, t0.elapsed().as_secs_f64()));
    Ok(out)
}

/// Writes `value` as pretty JSON to `path`, creating its directory.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}

fn eval_knn(checkpoint: PathBuf, args: KnnArgs) -> Result<()> {
    let KnnArgs { bank, queries, baselines, size, pooling, batch, json } = args;
    let setup = eval_setup(&checkpoint, bank, queries, size)?;
    let EvalSetup { cfg, train, test, .. } = &setup;
    let size = setup.transform.size;
    let settings = KnnSetting::STANDARD;
    let mut rows: Vec<(String, Vec<KnnAccuracy>, f64)> = Vec::new();
    for (name, bank_f, query_f, secs) in feature_sets(&setup, baselines, pooling, batch)? {
        let acc =
            knn_classify(&bank_f, &setup.train_labels, &query_f, &setup.test_labels, setup.num_classes, &settings)?;
        rows.push((name, acc, secs));
    }

    println!(
        "kNN on {} ({} bank images, {} queries; network input {size} px, {pooling}), top-1 %:",
        cfg.data.path.display(),
        train.len(),
        test.len()
    );
    let header: Vec<String> = settings.iter().map(|s| format!("k={} T={}", s.k, s.temperature)).collect();
    println!("| features    | {} |", header.join(" | "));
    println!("|-------------|{}|", header.iter().map(|h| "-".repeat(h.len() + 2)).collect::<Vec<_>>().join("|"));
    for (name, acc, _) in &rows {
        let cells: Vec<String> =
            acc.iter().zip(&header).map(|(a, h)| format!("{:>w$.2}", a.top1, w = h.len())).collect();
        println!("| {name:<11} | {} |", cells.join(" | "));
    }
    let value = serde_json::json!({
        "bank": train.len(), "queries": test.len(), "size": size, "pooling": pooling.to_string(),
        "unseen_query_classes": setup.unseen,
        "results": rows.iter().map(|(n, a, s)| serde_json::json!({"features": n, "accuracy": a, "seconds": s})).collect::<Vec<_>>(),
    });
    write_json(&json.unwrap_or_else(|| cfg.output_dir.join("knn.json")), &value)
}

struct LinearArgs {
    preset: String,
    epochs: Option<usize>,
    weight_decay: Option<f64>,
    baselines: bool,
    pooling: Pooling,
    batch: usize,
    json: Option<PathBuf>,
}

fn eval_linear(run: RunSubset, args: LinearArgs) -> Result<()> {
    let LinearArgs { preset, epochs, weight_decay, baselines, pooling, batch, json } = args;
    let mut probe = match preset.as_str() {
        "standard" => ProbeConfig::standard(),
        "moco" => ProbeConfig::moco(),
        "care" => ProbeConfig::care(),
        "mae" => ProbeConfig::mae(),
        other => anyhow::bail!("--preset {other:?}: expected standard, moco, care or mae"),
    };
    if let Some(e) = epochs {
        probe = probe.with_epochs(e);
    }
    if let Some(wd) = weight_decay {
        if !(wd.is_finite() && wd >= 0.0) {
            anyhow::bail!("--weight-decay {wd}: expected a finite value >= 0")
        }
        probe.weight_decay = wd;
    }
    let setup = run.setup()?;
    let mut rows = Vec::new();
    for (name, train_f, test_f, secs) in feature_sets(&setup, baselines, pooling, batch)? {
        let t0 = Instant::now();
        let r = linear_probe(&train_f, &setup.train_labels, &test_f, &setup.test_labels, setup.num_classes, &probe)?;
        rows.push((name, r, secs + t0.elapsed().as_secs_f64()));
    }
    println!(
        "linear probe ({preset}, {} epochs) on {} ({} training images, {} {}; input {} px, {pooling}), %:",
        probe.epochs,
        setup.cfg.data.path.display(),
        setup.train.len(),
        setup.test.len(),
        run.scored(),
        setup.transform.size
    );
    println!("| features    | top-1 | top-5 | train top-1 |");
    println!("|-------------|-------|-------|-------------|");
    for (name, r, _) in &rows {
        println!("| {name:<11} | {:>5.2} | {:>5.2} | {:>11.2} |", r.top1, r.top5, r.train_top1);
    }
    let value = serde_json::json!({
        "preset": preset, "probe": probe, "train": setup.train.len(), "test": setup.test.len(), "size": setup.transform.size,
        "pooling": pooling.to_string(), "holdout": run.holdout.is_some(), "unseen_test_classes": setup.unseen,
        "results": rows.iter().map(|(n, r, s)| serde_json::json!({"features": n, "result": r, "seconds": s})).collect::<Vec<_>>(),
    });
    write_json(&json.unwrap_or_else(|| setup.cfg.output_dir.join("linear.json")), &value)
}

fn eval_finetune(
    run: RunSubset,
    preset: String,
    cfg: FinetuneConfig,
    baselines: bool,
    json: Option<PathBuf>,
) -> Result<()> {
    cfg.validate()?;
    let setup = run.setup()?;
    let checkpoint = &run.checkpoint;
    let device = candle_core::Device::Cpu;
    let rule = LayerDecayRule::for_model(&setup.cfg.model)?;
    let train_set = setup.train.clone();
    let mut inits = vec!["pretrained"];
    if baselines {
        inits.insert(0, "random init");
    }
    let mut rows = Vec::new();
    for init in inits {
        let (vars, backbone) = if init == "pretrained" {
            let (_, vars, backbone) = load_backbone_vars(checkpoint, &device, cfg.drop_path)?;
            (vars, backbone)
        } else {
            random_backbone_vars(&setup.cfg, &device, cfg.drop_path)?
        };
        eprintln!("fine-tuning from {init}: {} epochs of {} images", cfg.epochs, train_set.len());
        let t0 = Instant::now();
        let r = finetune(
            backbone,
            &vars,
            &rule,
            train_set.clone(),
            setup.test.as_ref(),
            setup.num_classes,
            &setup.transform,
            &cfg,
            &device,
            |epoch, loss| eprintln!("  epoch {epoch}/{}: train loss {loss:.4}", cfg.epochs),
        )
        .with_context(|| format!("fine-tuning from {init}"))?;
        rows.push((init, r, t0.elapsed().as_secs_f64()));
    }
    println!(
        "fine-tuning ({preset}: {} epochs, batch {}, lr {:.2e}, layer decay {}, smoothing {}, drop-path {}) on {} \
         ({} training images, {} {}; input {} px), %:",
        cfg.epochs,
        cfg.batch_size,
        cfg.peak_lr(),
        cfg.layer_decay,
        cfg.label_smoothing,
        cfg.drop_path,
        setup.cfg.data.path.display(),
        setup.train.len(),
        setup.test.len(),
        run.scored(),
        setup.transform.size
    );
    println!("| init        | top-1 | top-5 | last train loss | images/s |");
    println!("|-------------|-------|-------|-----------------|----------|");
    for (init, r, _) in &rows {
        let loss = r.epoch_loss.last().copied().unwrap_or(f64::NAN);
        println!("| {init:<11} | {:>5.2} | {:>5.2} | {loss:>15.4} | {:>8.0} |", r.top1, r.top5, r.images_per_sec);
    }
    let value = serde_json::json!({
        "preset": preset, "config": cfg, "train": setup.train.len(), "test": setup.test.len(), "size": setup.transform.size,
        "holdout": run.holdout.is_some(), "unseen_test_classes": setup.unseen, "layer_decay_rule": rule,
        "results": rows.iter().map(|(n, r, s)| serde_json::json!({"init": n, "result": r, "seconds": s})).collect::<Vec<_>>(),
    });
    write_json(&json.unwrap_or_else(|| setup.cfg.output_dir.join("finetune.json")), &value)
}

fn eval_segment(
    pred: &Path,
    truth: &Path,
    classes: usize,
    ignore: Option<u32>,
    names: &[String],
    json: Option<PathBuf>,
) -> Result<()> {
    if classes == 0 {
        anyhow::bail!("--classes must be positive")
    }
    if !names.is_empty() && names.len() != classes {
        anyhow::bail!("--names has {} names for {classes} classes", names.len())
    }
    let s = selfsup_eval::masks::score_mask_folders(pred, truth, classes, ignore).map_err(anyhow::Error::msg)?;
    let m = &s.metrics;
    println!(
        "segmentation of {} masks ({} scored pixels) in {} against {}, %:",
        s.images,
        m.pixels,
        pred.display(),
        truth.display()
    );
    println!("| class        |    IoU |   Dice |");
    println!("|--------------|--------|--------|");
    for c in 0..classes {
        let name = names.get(c).cloned().unwrap_or_else(|| c.to_string());
        let cell = |v: f64| if v.is_nan() { "     -".to_string() } else { format!("{v:>6.2}") };
        println!("| {name:<12} | {} | {} |", cell(m.iou[c]), cell(m.dice[c]));
    }
    println!("mIoU {:.2}, mean Dice {:.2}, pixel accuracy {:.2}", m.miou, m.mdice, m.pixel_accuracy);
    if !s.unmatched_predictions.is_empty() {
        eprintln!(
            "note: {} prediction(s) have no target and were not scored (first: {})",
            s.unmatched_predictions.len(),
            s.unmatched_predictions[..s.unmatched_predictions.len().min(5)].join(", ")
        );
    }
    let value = serde_json::json!({
        "pred": pred, "truth": truth, "classes": classes, "ignore_index": ignore, "names": names, "score": s,
    });
    write_json(&json.unwrap_or_else(|| pred.join("segment.json")), &value)
}
