//! Eval-mode forward throughput of the backbones at 224 px, batch 32 (issue 7): resnet18,
//! convnextv2_atto, cvt13 and vit_tiny_patch16, full size. `benches/torch_forward.py` times
//! timm / transformers on the same inputs and `cargo xtask bench` prints the two side by side.
//! Throughput = images per second.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use selfsup_benches::randn;
use selfsup_models::{Arch, Mode, ModelConfig, Vars};

const BATCH: usize = 32;
const SIZE: usize = 224;

fn forward(c: &mut Criterion) {
    selfsup_benches::init();
    let xs = randn(&[BATCH, 3, SIZE, SIZE], 7);
    for (arch, name) in [
        (Arch::Resnet18, "resnet18"),
        (Arch::Convnextv2Atto, "convnextv2_atto"),
        (Arch::Cvt13, "cvt13"),
        (Arch::VitTinyPatch16, "vit_tiny_patch16"),
    ] {
        let cfg = ModelConfig {
            arch,
            in_chans: 3,
            widths: None,
            drop_path_rate: 0.0,
            img_size: Some(SIZE),
            imagenet_stem: true,
            irpe: false,
        };
        let vars = Vars::new(0);
        let model = cfg.build(vars.vb(candle_core::DType::F32, &Device::Cpu)).expect("model builds");
        let mut g = c.benchmark_group(format!("forward_{name}_224px"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function("selfsup", |b| b.iter(|| model.forward_pooled(&xs, Mode::Eval).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
