//! One BYOL training step (two views, online forward + backward, target forward) of the
//! demo's network, at the demo's 16 px and at 32 px. Throughput = batch / time per step.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use selfsup_benches::randn;
use selfsup_models::{Arch, ModelConfig, Vars};
use selfsup_objectives::{byol, Objective, Step};

fn step(c: &mut Criterion) {
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

criterion_group!(benches, step);
criterion_main!(benches);
