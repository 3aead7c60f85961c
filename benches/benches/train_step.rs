//! Whole training steps: forward, backward, the AdamW update and the objective's state update
//! (EMA teacher, queues), batch 32 at 64 px on full-width backbones, for FCMAE/convnextv2_atto,
//! LoMaR/vit_tiny (patch 8, iRPE; an 8x8 grid holds two distinct 7x7 window rows and columns, so
//! `num_window = 2`), DenseCL/resnet18, BYOL/resnet18 and CARE/resnet18 (ImageNet stem, so
//! layer3 is 4x4). `benches/torch_train_step.py` runs the same steps in PyTorch and
//! `cargo xtask bench` prints the two side by side. FCMAE also times its masked-dense reference
//! path (`reference`), the computation PyTorch does. Also the demo's BYOL step (`byol_step_*`).
//! Throughput = images (pairs for two-view objectives) per second.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use selfsup_benches::randn;
use selfsup_models::{Arch, ModelConfig, Vars};
use selfsup_objectives::{byol, Objective, Step};

const BATCH: usize = 32;
const SIZE: usize = 64;

fn model(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        in_chans: 3,
        widths: None,
        drop_path_rate: 0.0,
        img_size: Some(SIZE),
        imagenet_stem: matches!(arch, Arch::Resnet18),
        irpe: matches!(arch, Arch::VitTinyPatch8),
    }
}

/// One objective's full step, timed as criterion bench `name` in `group`.
fn bench_step(c: &mut Criterion, group: &str, name: &str, model: &ModelConfig, objective: &str) {
    let (mut obj, mut opt) =
        selfsup_benches::objective_and_optimizer(model, objective, &Device::Cpu).expect("objective builds");
    let views: Vec<_> = (0..obj.num_views()).map(|v| randn(&[BATCH, 3, SIZE, SIZE], 1 + v as u64)).collect();
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut step = 0u64;
    g.bench_function(name, |b| {
        b.iter(|| {
            step += 1;
            let l = obj.loss(&views, Step { progress: 0.5, key: step }).unwrap();
            let grads = l.total.backward().unwrap();
            opt.step(&grads, 1e-4, 1.0).unwrap();
            obj.after_step(0.5).unwrap();
        })
    });
    g.finish();
}

fn steps(c: &mut Criterion) {
    selfsup_benches::init();
    let atto = model(Arch::Convnextv2Atto);
    bench_step(c, "step_fcmae_convnextv2_atto_64px", "selfsup", &atto, "[fcmae]\npath = \"sparse\"\n");
    bench_step(c, "step_fcmae_convnextv2_atto_64px", "reference", &atto, "[fcmae]\npath = \"masked_dense\"\n");
    let lomar = "[lomar]\nwindow_size = 7\nnum_window = 2\nmask_ratio = 0.8\n";
    bench_step(c, "step_lomar_vit_tiny_64px", "selfsup", &model(Arch::VitTinyPatch8), lomar);
    let r18 = model(Arch::Resnet18);
    bench_step(c, "step_densecl_resnet18_64px", "selfsup", &r18, "[densecl]\n");
    bench_step(c, "step_byol_resnet18_64px", "selfsup", &r18, "[byol]\n");
    bench_step(c, "step_care_resnet18_64px", "selfsup", &r18, "[care]\nfmap_size = 4\n");
}

/// The demo's BYOL step (two views, online forward + backward, target forward) at 16 and 32 px.
fn demo_step(c: &mut Criterion) {
    selfsup_benches::init();
    let model = ModelConfig {
        arch: Arch::Resnet18,
        in_chans: 1,
        widths: Some(vec![16, 32, 64, 128]),
        drop_path_rate: 0.0,
        img_size: None,
        imagenet_stem: false,
        irpe: false,
    };
    let cfg = byol::Config { proj_hidden: 512, proj_dim: 128, base_momentum: 0.99 };
    let vars = Vars::new(0);
    let obj = byol::Byol::new(&cfg, &model, &vars, &Device::Cpu, 0).unwrap();
    let batch = 128;
    let mut g = c.benchmark_group("byol_step_resnet18_w16");
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch as u64));
    for size in [16usize, 32] {
        let views = [randn(&[batch, 1, size, size], 1), randn(&[batch, 1, size, size], 2)];
        g.bench_function(format!("{size}px"), |b| {
            b.iter(|| {
                let l = obj.loss(&views, Step { progress: 0.5, key: 0 }).unwrap();
                l.total.backward().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, steps, demo_step);
criterion_main!(benches);
