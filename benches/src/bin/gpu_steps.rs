//! Whole training steps on one device, outside criterion, for the GPU comparison of issues 6
//! and 8: FCMAE on ConvNeXt V2-atto (the sparse encoder, and its masked-dense reference path,
//! the computation PyTorch does) and LoMaR on ViT-B/16 with iRPE, at 224 px. Each step is
//! forward, backward, AdamW and the objective's state update, as in `benches/train_step.rs`;
//! on a CUDA device every step ends with a synchronize, so the time is the whole step.
//! `benches/torch_train_step.py` with `SELFSUP_STEP_DEVICE=cuda SELFSUP_STEP_SIZE=224
//! SELFSUP_STEP_BATCH=128` times the PyTorch peers; `cargo xtask gpu` packs both.
//!
//! Usage: `gpu-steps [--device cuda|cpu] [--size 224] [--batch 128] [--steps 10] [--only NAME]
//! [--out steps.json]`. The CI runs it on the CPU at a tiny size, so it cannot rot.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use selfsup_models::{Arch, ModelConfig};
use selfsup_objectives::Step;

struct Args {
    device: Device,
    size: usize,
    batch: usize,
    steps: usize,
    only: Option<String>,
    out: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args { device: Device::Cpu, size: 224, batch: 128, steps: 10, only: None, out: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => {
                a.device = match value()?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::new_cuda(0).context("opening cuda:0 (built with --features cuda?)")?,
                    d => bail!("--device must be cpu or cuda, got {d}"),
                }
            }
            "--size" => a.size = value()?.parse().context("--size")?,
            "--batch" => a.batch = value()?.parse().context("--batch")?,
            "--steps" => a.steps = value()?.parse().context("--steps")?,
            "--only" => a.only = Some(value()?),
            "--out" => a.out = Some(value()?),
            f => bail!("unknown argument {f}"),
        }
    }
    Ok(a)
}

/// Seconds per step (median of `steps` after two warm-up steps).
fn time_step(a: &Args, model: &ModelConfig, objective: &str) -> Result<f64> {
    let (mut obj, mut opt) = selfsup_benches::objective_and_optimizer(model, objective, &a.device)?;
    let views = (0..obj.num_views())
        .map(|v| {
            selfsup_benches::randn(&[a.batch, 3, a.size, a.size], 1 + v as u64)
                .to_device(&a.device)?
                .to_dtype(DType::F32)
        })
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    let mut times = Vec::new();
    for step in 0..a.steps + 2 {
        let t0 = Instant::now();
        let l = obj.loss(&views, Step { progress: 0.5, key: step as u64 })?;
        let grads = l.total.backward()?;
        opt.step(&grads, 1e-4, 1.0)?;
        obj.after_step(0.5)?;
        a.device.synchronize()?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
        let loss = l.total.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !loss.is_finite() {
            bail!("non-finite loss {loss} at step {step}")
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    selfsup_benches::init();
    let a = args()?;
    let s = a.size;
    if !s.is_multiple_of(32) {
        bail!("--size {s}: FCMAE's mask grid needs a multiple of 32")
    }
    let model = |arch, irpe| ModelConfig {
        arch,
        in_chans: 3,
        widths: None,
        drop_path_rate: 0.0,
        img_size: Some(s),
        imagenet_stem: false,
        irpe,
    };
    // LoMaR's windows are 7x7 patches of 16 px: four per image at 224 px (the paper's recipe),
    // one on grids of 7 to 13.
    let windows = if s / 16 >= 14 { 4 } else { 1 };
    let lomar = format!("[lomar]\nwindow_size = 7\nnum_window = {windows}\nmask_ratio = 0.8\n");
    let cases = [
        (
            format!("step_fcmae_convnextv2_atto_{s}px"),
            model(Arch::Convnextv2Atto, false),
            "[fcmae]\npath = \"sparse\"\n".to_string(),
        ),
        (
            format!("step_fcmae_convnextv2_atto_{s}px_reference"),
            model(Arch::Convnextv2Atto, false),
            "[fcmae]\npath = \"masked_dense\"\n".to_string(),
        ),
        (format!("step_lomar_vit_base_{s}px"), model(Arch::VitBasePatch16, true), lomar),
    ];
    let mut json = Vec::new();
    for (name, m, objective) in &cases {
        if a.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let secs = time_step(&a, m, objective).with_context(|| format!("{name} on {:?}", a.device))?;
        println!(
            "{name}: {:.1} ms/step, {:.1} images/s ({:?}, batch {})",
            secs * 1e3,
            a.batch as f64 / secs,
            a.device,
            a.batch
        );
        json.push(format!("  \"{name}\": {secs}"));
    }
    if let Some(out) = &a.out {
        std::fs::write(out, format!("{{\n{}\n}}\n", json.join(",\n"))).with_context(|| format!("writing {out}"))?;
    }
    Ok(())
}
