//! `selfsup`: pretrain backbones without labels, then measure the features.
//!
//! ```text
//! selfsup pretrain --config configs/byol_fmnist.toml [--resume RUN_DIR]
//! selfsup eval knn --checkpoint RUN_DIR [--baselines] [--bank N]
//! selfsup info
//! ```

use std::path::PathBuf;

// Tensors are large and short-lived: glibc returns them to the OS and page-faults them back
// in on every step (a fifth of a training step, measured with perf); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use selfsup_data::Split;
use selfsup_eval::features::{extract, raw_pixels, EvalTransform};
use selfsup_eval::{knn_classify, KnnAccuracy, KnnSetting};
use selfsup_train::trainer::{load_backbone, load_split, random_backbone};
use selfsup_train::{RunConfig, Trainer};

#[derive(Parser)]
#[command(name = "selfsup", version, about = "Self-supervised pretraining of vision backbones")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

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
    /// List the registered architectures and objectives.
    Info,
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
        /// Feature-extraction batch size.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Write the results as JSON here (default: <run dir>/knn.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
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
        Command::Eval { protocol: EvalCommand::Knn { checkpoint, bank, queries, baselines, size, batch, json } } => {
            eval_knn(checkpoint, KnnArgs { bank, queries, baselines, size, batch, json })
        }
        Command::Info => {
            println!(
                "architectures: {}",
                selfsup_models::Arch::ALL
                    .iter()
                    .map(|a| format!("{a:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("objectives: byol");
            println!("optimizers: sgd, lars, adamw");
            Ok(())
        }
    }
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
    batch: usize,
    json: Option<PathBuf>,
}

fn eval_knn(checkpoint: PathBuf, args: KnnArgs) -> Result<()> {
    let KnnArgs { bank, queries, baselines, size, batch, json } = args;
    let device = candle_core::Device::Cpu;
    let (cfg, backbone) = load_backbone(&checkpoint, &device)?;
    let mut data = cfg.data.clone();
    data.limit = bank;
    let train = load_split(&data, Split::Train).context("loading the kNN bank (training split)")?;
    let mut test = load_split(&cfg.data, Split::Test).context("loading the kNN queries (test split)")?;
    if let Some(q) = queries {
        test = test.take(q);
    }
    let (bank_labels, query_labels) = (
        train.labels.clone().context("the bank has no labels")?,
        test.labels.clone().context("the queries have no labels")?,
    );
    let num_classes = train.num_classes.max(test.num_classes);
    let unseen = test.num_classes.saturating_sub(train.num_classes);
    if unseen > 0 {
        eprintln!("note: {unseen} query class(es) do not occur in the bank; they count as errors");
    }
    let view = &cfg.views[0];
    let size = size.unwrap_or(view.size);
    let stride = cfg.model.stride()?;
    if size == 0 || !size.is_multiple_of(stride) {
        anyhow::bail!("--size {size} is not a positive multiple of the model's stride {stride}")
    }
    let t = EvalTransform { size, mean: view.mean.clone(), std: view.std.clone() };
    let settings = KnnSetting::STANDARD;
    let mut rows: Vec<(String, Vec<KnnAccuracy>, f64)> = Vec::new();
    let mut eval = |name: &str, bank_f: candle_core::Tensor, query_f: candle_core::Tensor, secs: f64| -> Result<()> {
        let acc = knn_classify(&bank_f, &bank_labels, &query_f, &query_labels, num_classes, &settings)?;
        rows.push((name.to_string(), acc, secs));
        Ok(())
    };
    if baselines {
        let t0 = Instant::now();
        let random = random_backbone(&cfg, &device)?;
        let (b, q) = (
            extract(random.as_ref(), &train, &t, batch, &device)?,
            extract(random.as_ref(), &test, &t, batch, &device)?,
        );
        eval("random init", b, q, t0.elapsed().as_secs_f64())?;
        let t0 = Instant::now();
        eval("raw pixels", raw_pixels(&train)?, raw_pixels(&test)?, t0.elapsed().as_secs_f64())?;
    }
    let t0 = Instant::now();
    let (b, q) = (
        extract(backbone.as_ref(), &train, &t, batch, &device)?,
        extract(backbone.as_ref(), &test, &t, batch, &device)?,
    );
    eval("pretrained", b, q, t0.elapsed().as_secs_f64())?;

    println!(
        "kNN on {} ({} bank images, {} queries; network input {size} px), top-1 %:",
        cfg.data.path.display(),
        train.n,
        test.n
    );
    let header: Vec<String> = settings.iter().map(|s| format!("k={} T={}", s.k, s.temperature)).collect();
    println!("| features    | {} |", header.join(" | "));
    println!("|-------------|{}|", header.iter().map(|h| "-".repeat(h.len() + 2)).collect::<Vec<_>>().join("|"));
    for (name, acc, _) in &rows {
        let cells: Vec<String> =
            acc.iter().zip(&header).map(|(a, h)| format!("{:>w$.2}", a.top1, w = h.len())).collect();
        println!("| {name:<11} | {} |", cells.join(" | "));
    }
    let json_path = json.unwrap_or_else(|| cfg.output_dir.join("knn.json"));
    let value = serde_json::json!({
        "bank": train.n, "queries": test.n, "size": size,
        "results": rows.iter().map(|(n, a, s)| serde_json::json!({"features": n, "accuracy": a, "seconds": s})).collect::<Vec<_>>(),
    });
    if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&value)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("results written to {}", json_path.display());
    Ok(())
}
