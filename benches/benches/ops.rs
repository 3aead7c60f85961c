//! Ops against their references, forward + backward, at shapes of the demo's ResNet.

use candle_core::Var;
use criterion::{criterion_group, criterion_main, Criterion};
use selfsup_benches::randn;
use selfsup_ops::norm::{batch_norm_train, batch_norm_train_reference};
use selfsup_ops::{conv2d_nhwc, conv2d_nhwc_reference};

fn conv(c: &mut Criterion) {
    // Stage 2 of the demo network at 32 px input: (256, 16, 16, 32) -> 3x3 -> 32.
    let x = Var::from_tensor(&randn(&[256, 16, 16, 32], 1)).unwrap();
    let w = Var::from_tensor(&randn(&[32, 32, 3, 3], 2)).unwrap();
    let mut g = c.benchmark_group("conv3x3_fwd_bwd");
    g.sample_size(10);
    g.bench_function("fast", |b| b.iter(|| conv2d_nhwc(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap()));
    g.bench_function("reference", |b| {
        b.iter(|| conv2d_nhwc_reference(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap())
    });
    g.finish();
}

fn batch_norm(c: &mut Criterion) {
    let x = Var::from_tensor(&randn(&[256, 16, 16, 32], 3)).unwrap();
    let w = Var::from_tensor(&randn(&[32], 4)).unwrap();
    let b = Var::from_tensor(&randn(&[32], 5)).unwrap();
    let mut g = c.benchmark_group("batch_norm_relu_fwd_bwd");
    g.sample_size(10);
    g.bench_function("fast", |bch| {
        bch.iter(|| batch_norm_train(&x, &w, &b, 1e-5, true).unwrap().0.sum_all().unwrap().backward().unwrap())
    });
    g.bench_function("reference", |bch| {
        bch.iter(|| {
            batch_norm_train_reference(&x, &w, &b, 1e-5)
                .unwrap()
                .0
                .relu()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, conv, batch_norm);
criterion_main!(benches);
