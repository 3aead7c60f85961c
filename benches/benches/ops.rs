//! The ops of selfsup-ops at the shapes of real training steps (batch 32, 64 px and 224 px):
//! ConvNeXt V2-atto (depthwise 7x7, sparse depthwise at mask 0.6, LayerNorm, GRN), CvT-13
//! (depthwise 3x3 projections, attention with strided keys), ViT-Tiny / LoMaR (windowed
//! attention with iRPE keys), ResNet (dense convs, the stem) and DenseCL (InfoNCE against a
//! queue), plus a 1024^3 matmul as the machine's GEMM ceiling.
//!
//! Each group is one case in one mode (`fwd` or `fwd_bwd`); `fast` is selfsup's op and
//! `reference` is candle's own composition (left out where it takes tens of seconds per
//! iteration). Throughput is set to the case's FLOPs, so `cargo xtask bench` prints GFLOP/s.
//! The cases are written to `target/criterion/ops-cases.json`, which `benches/torch_ops.py`
//! reads to time PyTorch on the same shapes in the same `cargo xtask bench` run.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Result, Tensor, Var};
use criterion::{Criterion, Throughput};
use selfsup_benches::randn;
use selfsup_ops::attention::{
    irpe_product_buckets, window_attention, window_attention_qkv, window_attention_reference, ContextualBias,
    PositionBias,
};
use selfsup_ops::contrast::{info_nce, info_nce_reference};
use selfsup_ops::dwconv::{depthwise_conv2d_nhwc, depthwise_conv2d_nhwc_reference};
use selfsup_ops::grn::{grn, grn_reference};
use selfsup_ops::layer_norm::{layer_norm, layer_norm_reference};
use selfsup_ops::norm::{batch_norm_train, batch_norm_train_reference};
use selfsup_ops::sparse::{sparse_depthwise_conv, SiteMap};
use selfsup_ops::{conv2d_nhwc, conv2d_nhwc_reference};
use serde_json::{json, Value};

const B: usize = 32;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Fwd,
    FwdBwd,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fwd => "fwd",
            Mode::FwdBwd => "fwd_bwd",
        }
    }
    /// FLOPs of the mode from the forward's: backward = two forward-sized products.
    fn flops(self, fwd: f64) -> f64 {
        match self {
            Mode::Fwd => fwd,
            Mode::FwdBwd => 3.0 * fwd,
        }
    }
}

/// Registers criterion groups and records each case for the PyTorch script.
struct Bench<'a> {
    c: &'a mut Criterion,
    cases: Vec<Value>,
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

impl Bench<'_> {
    /// One group: `fast` (and `reference` when given) on `inputs`, in `mode`.
    fn case(
        &mut self,
        name: &str,
        kind: &str,
        params: Value,
        fwd_flops: f64,
        mode: Mode,
        inputs: &dyn Fn() -> Vec<Tensor>,
        fast: Op,
        reference: Option<Op>,
    ) {
        let group = format!("{name}_{}", mode.name());
        let flops = mode.flops(fwd_flops);
        self.cases.push(json!({ "group": group, "kind": kind, "mode": mode.name(), "params": params, "flops": flops }));
        if !wanted(&group) {
            return;
        }
        let inputs = &inputs()[..];
        let mut g = self.c.benchmark_group(&group);
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements(flops as u64));
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let run = |f: &Op| match mode {
            Mode::Fwd => drop(f(inputs).unwrap()),
            Mode::FwdBwd => drop(f(&ts).unwrap().sum_all().unwrap().backward().unwrap()),
        };
        g.bench_function("fast", |b| b.iter(|| run(&fast)));
        if let Some(r) = reference {
            g.bench_function("reference", |b| b.iter(|| run(&r)));
        }
        g.finish();
    }
}

/// Whether criterion's name filter (the first free argument) can select `group`; lets a
/// filtered run skip building the inputs of every other case. Regex filters select everything.
fn wanted(group: &str) -> bool {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    match filter {
        Some(f) if !f.contains(|c: char| "|^$.*+?()[]{}\\".contains(c)) => {
            group.contains(f.split('/').next().unwrap_or_default())
        }
        _ => true,
    }
}

fn conv_flops(h: usize, w: usize, ci: usize, co: usize, k: usize, s: usize, p: usize, depthwise: bool) -> f64 {
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let per_out = if depthwise { k * k } else { ci * k * k };
    2.0 * (B * ho * wo * co * per_out) as f64
}

fn dense_convs(bench: &mut Bench) {
    // (name, h, c_in, c_out, k, stride, pad, modes, with candle reference)
    let cases = [
        ("conv3x3_64_56px", 56, 64, 64, 3, 1, 1, &[Mode::Fwd, Mode::FwdBwd][..], true),
        ("conv3x3_s2_64to128_56px", 56, 64, 128, 3, 2, 1, &[Mode::FwdBwd][..], false),
        ("conv1x1_64to256_56px", 56, 64, 256, 1, 1, 0, &[Mode::FwdBwd][..], false),
        ("conv7x7_s2_stem_224px", 224, 3, 64, 7, 2, 3, &[Mode::FwdBwd][..], false),
        // ResNet-18's layer3 and layer4 at 64 px: few rows, large weights (the small-map tiling).
        ("conv3x3_256_4px", 4, 256, 256, 3, 1, 1, &[Mode::FwdBwd][..], false),
        ("conv3x3_512_2px", 2, 512, 512, 3, 1, 1, &[Mode::FwdBwd][..], false),
    ];
    for (name, h, ci, co, k, s, p, modes, with_ref) in cases {
        let inputs = || vec![randn(&[B, h, h, ci], 1), (randn(&[co, ci, k, k], 2) * 0.05).unwrap()];
        let params = json!({ "b": B, "h": h, "w": h, "cin": ci, "cout": co, "k": k, "stride": s, "pad": p });
        for &mode in modes {
            let fast: Op = Box::new(move |t| conv2d_nhwc(&t[0], &t[1], s, p));
            let reference: Option<Op> =
                with_ref.then(|| Box::new(move |t: &[Tensor]| conv2d_nhwc_reference(&t[0], &t[1], s, p)) as Op);
            bench.case(
                name,
                "conv",
                params.clone(),
                conv_flops(h, h, ci, co, k, s, p, false),
                mode,
                &inputs,
                fast,
                reference,
            );
        }
    }
}

fn depthwise(bench: &mut Bench) {
    // ConvNeXt V2-atto stage 1 (7x7, 40 channels) and CvT-13 stage 1 projections (3x3, 64).
    let cases = [
        ("dwconv7_atto_16px", 16, 40, 7, 1, 3, true),
        ("dwconv7_atto_56px", 56, 40, 7, 1, 3, false),
        ("dwconv3_cvt_16px", 16, 64, 3, 1, 1, true),
        ("dwconv3_cvt_56px", 56, 64, 3, 1, 1, false),
        ("dwconv3_s2_cvt_56px", 56, 64, 3, 2, 1, false),
    ];
    for (name, h, c, k, s, p, with_ref) in cases {
        let inputs = || vec![randn(&[B, h, h, c], 1), randn(&[c, 1, k, k], 2), randn(&[c], 3)];
        let params = json!({ "b": B, "h": h, "w": h, "c": c, "k": k, "stride": s, "pad": p });
        for mode in [Mode::Fwd, Mode::FwdBwd] {
            let fast: Op = Box::new(move |t| depthwise_conv2d_nhwc(&t[0], &t[1], Some(&t[2]), s, p));
            let reference: Option<Op> = with_ref.then(|| {
                Box::new(move |t: &[Tensor]| depthwise_conv2d_nhwc_reference(&t[0], &t[1], Some(&t[2]), s, p)) as Op
            });
            bench.case(
                name,
                "dwconv",
                params.clone(),
                conv_flops(h, h, c, c, k, s, p, true),
                mode,
                &inputs,
                fast,
                reference,
            );
        }
    }
}

/// FCMAE's sparse encoder conv at mask ratio 0.6 against the masked-dense path (mask, the fast
/// dense depthwise conv, mask), which is the reference here.
fn sparse(bench: &mut Bench) {
    for (name, h) in [("sparse_dwconv7_atto_r0.6_16px", 16), ("sparse_dwconv7_atto_r0.6_56px", 56)] {
        let c = 40;
        // FCMAE: a 32-px patch grid (h / 8 per side at the stem's output), 60 % masked.
        let grid = h / 8;
        let mut r = selfsup_ops::rng::Rng::new(7);
        let keep = ((grid * grid) as f64 * 0.4) as usize;
        let mut vis = Vec::new();
        for _ in 0..B {
            let mut ids: Vec<usize> = (0..grid * grid).collect();
            r.shuffle(&mut ids);
            let mut v = vec![false; grid * grid];
            ids[..keep].iter().for_each(|&i| v[i] = true);
            vis.extend(v);
        }
        let map = SiteMap::from_visible(&vis, B, grid, grid).unwrap().upsample(8).unwrap();
        let nb = map.neighbours(7).unwrap();
        let mask = map.visible_mask(&candle_core::Device::Cpu).unwrap();
        let dense = randn(&[B, h, h, c], 1);
        let sites = map.gather(&dense).unwrap();
        let (w, bias) = (randn(&[c, 1, 7, 7], 2), randn(&[c], 3));
        let params = json!({ "b": B, "h": h, "w": h, "c": c, "k": 7, "ratio": 0.6, "grid": grid });
        // FLOPs counted as the dense conv's, so the two rows compare times directly.
        let flops = conv_flops(h, h, c, c, 7, 1, 3, true);
        for mode in [Mode::Fwd, Mode::FwdBwd] {
            let nb2 = nb.clone();
            let fast: Op = Box::new(move |t| sparse_depthwise_conv(&t[0], &nb2, &t[1], Some(&t[2])));
            let m2 = mask.clone();
            let reference: Op = Box::new(move |t| {
                let x = t[3].broadcast_mul(&m2)?;
                depthwise_conv2d_nhwc(&x, &t[1], Some(&t[2]), 1, 3)?.broadcast_mul(&m2)
            });
            let inputs = || vec![sites.clone(), w.clone(), bias.clone(), dense.clone()];
            bench.case(name, "sparse_dwconv", params.clone(), flops, mode, &inputs, fast, Some(reference));
        }
    }
}

fn norms(bench: &mut Bench) {
    // ConvNeXt V2-atto stage 1 at 224 px: LayerNorm over 40 channels, GRN over 4 * 40; and the
    // fused BatchNorm + ReLU of the ResNets at the same size.
    let (h, c) = (56, 40);
    let inputs = || vec![randn(&[B, h, h, c], 1), randn(&[c], 2), randn(&[c], 3)];
    let params = json!({ "b": B, "h": h, "w": h, "c": c });
    let elems = (B * h * h * c) as f64;
    bench.case(
        "layer_norm_atto_56px",
        "layer_norm",
        params,
        8.0 * elems,
        Mode::FwdBwd,
        &inputs,
        Box::new(|t| layer_norm(&t[0], &t[1], &t[2], 1e-6)),
        Some(Box::new(|t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-6))),
    );
    let inputs = || vec![randn(&[B, h, h, c], 4), randn(&[c], 5), randn(&[c], 6)];
    bench.case(
        "batch_norm_relu_56px",
        "batch_norm",
        json!({ "b": B, "h": h, "w": h, "c": c }),
        8.0 * elems,
        Mode::FwdBwd,
        &inputs,
        Box::new(|t| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-5, true)?.0)),
        Some(Box::new(|t| batch_norm_train_reference(&t[0], &t[1], &t[2], 1e-5)?.0.relu())),
    );
    let c4 = 4 * c;
    let inputs = || vec![randn(&[B, h, h, c4], 1), randn(&[c4], 2), randn(&[c4], 3)];
    let params = json!({ "b": B, "h": h, "w": h, "c": c4 });
    bench.case(
        "grn_atto_56px",
        "grn",
        params,
        6.0 * (B * h * h * c4) as f64,
        Mode::FwdBwd,
        &inputs,
        Box::new(|t| grn(&t[0], &t[1], &t[2])),
        Some(Box::new(|t| grn_reference(&t[0], &t[1], &t[2]))),
    );
}

fn attention(bench: &mut Bench) {
    // (name, windows, lq, lk, heads, dim, contextual keys)
    let cases = [
        ("attn_lomar_windows", B * 4, 50, 50, 3, 64, true),
        ("attn_vit_tiny_64px_p8", B, 65, 65, 3, 64, false),
        ("attn_vit_tiny_224px_p16", B, 197, 197, 3, 64, false),
        ("attn_cvt13_s1_64px", B, 257, 65, 1, 64, false),
        ("attn_cvt13_s1_224px", B, 3137, 785, 1, 64, false),
    ];
    for (name, g, lq, lk, h, d, ctx) in cases {
        let scale = (d as f64).powf(-0.5);
        let pos = if ctx {
            let (buckets, nb) = irpe_product_buckets(7, 7, 1.9, 1);
            PositionBias {
                ctx: Some(ContextualBias {
                    table: (randn(&[1, d, nb], 4) * 0.1).unwrap(),
                    buckets: Arc::new(buckets),
                    ctx_scale: 1.0,
                }),
                ..Default::default()
            }
        } else {
            PositionBias::default()
        };
        let params = json!({ "g": g, "lq": lq, "lk": lk, "heads": h, "dim": d, "ctx": ctx });
        let flops = 4.0 * (g * h * lq * lk * d) as f64;
        let with_ref = lq * lk < 100_000;
        for mode in [Mode::Fwd, Mode::FwdBwd] {
            let (p1, p2) = (pos.clone(), pos.clone());
            if lq == lk {
                let inputs = || vec![randn(&[g, lq, 3, h, d], 1)];
                let fast: Op = Box::new(move |t| window_attention_qkv(&t[0], scale, &p1));
                let reference: Option<Op> = with_ref.then(|| {
                    Box::new(move |t: &[Tensor]| {
                        let part = |i| t[0].narrow(2, i, 1)?.squeeze(2);
                        window_attention_reference(&part(0)?, &part(1)?, &part(2)?, scale, &p2)
                    }) as Op
                });
                bench.case(name, "attention", params.clone(), flops, mode, &inputs, fast, reference);
            } else {
                let inputs = || vec![randn(&[g, lq, h, d], 1), randn(&[g, lk, h, d], 2), randn(&[g, lk, h, d], 3)];
                let fast: Op = Box::new(move |t| window_attention(&t[0], &t[1], &t[2], scale, &p1));
                let reference: Option<Op> = with_ref.then(|| {
                    Box::new(move |t: &[Tensor]| window_attention_reference(&t[0], &t[1], &t[2], scale, &p2)) as Op
                });
                bench.case(name, "attention", params.clone(), flops, mode, &inputs, fast, reference);
            }
        }
    }
}

/// DenseCL's dense loss at a training step's shape (batch 32 at 64 px: 2x2 positions, 128
/// queries of 128 dims) against the paper's queue of 65,536 keys: the logits `q . queue` and
/// InfoNCE at T = 0.2, forward and backward. The queue is a constant (detached), as in training.
/// FLOPs are the logits' GEMMs: the forward and the query's gradient (the reference also
/// computes the queue's, which training throws away).
fn contrast(bench: &mut Bench) {
    let (n, d, k) = (128, 128, 65_536);
    let inputs = || vec![randn(&[n, 1], 1), randn(&[n, d], 2), randn(&[k, d], 3)];
    bench.case(
        "info_nce_densecl_queue",
        "info_nce",
        json!({ "n": n, "d": d, "k": k, "t": 0.2 }),
        2.0 * (n * d * k) as f64 * 2.0 / 3.0,
        Mode::FwdBwd,
        &inputs,
        Box::new(|t| info_nce(&t[0], &selfsup_ops::linear::linear(&t[1], &t[2].detach(), None)?, 0.2)),
        Some(Box::new(|t| info_nce_reference(&t[0], &t[1].matmul(&t[2].detach().t()?)?, 0.2))),
    );
}

fn matmul(bench: &mut Bench) {
    let n = 1024;
    let inputs = || vec![randn(&[n, n], 1), randn(&[n, n], 2)];
    bench.case(
        "matmul_1024",
        "matmul",
        json!({ "n": n }),
        2.0 * (n * n * n) as f64,
        Mode::Fwd,
        &inputs,
        Box::new(|t| t[0].matmul(&t[1])),
        None,
    );
}

fn main() {
    selfsup_benches::init();
    let mut c = Criterion::default().configure_from_args();
    let mut bench = Bench { c: &mut c, cases: Vec::new() };
    matmul(&mut bench);
    dense_convs(&mut bench);
    depthwise(&mut bench);
    sparse(&mut bench);
    norms(&mut bench);
    attention(&mut bench);
    contrast(&mut bench);
    let cases = std::mem::take(&mut bench.cases);
    // criterion writes under <workspace>/target/criterion; the bench runs in benches/.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("ops-cases.json"), serde_json::to_string_pretty(&cases).unwrap());
    }
    c.final_summary();
}
