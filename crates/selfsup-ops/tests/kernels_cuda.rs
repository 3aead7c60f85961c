//! The ops on a CUDA device (through selfsup-kernels) against the same ops on the CPU: values
//! and gradients of the sparse depthwise conv, the dense depthwise conv and the windowed
//! attention, f32 and bf16. Needs feature `cuda` and a GPU; without one each test prints why
//! and passes, unless `SELFSUP_REQUIRE_GPU=1` (set by `cargo xtask gpu`'s run script).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use selfsup_ops::attention::{
    irpe_product_buckets, shifted_window_mask, window_attention, window_attention_qkv, ContextualBias, PositionBias,
};
use selfsup_ops::dwconv::depthwise_conv2d_nhwc;
use selfsup_ops::rng::Rng;
use selfsup_ops::sparse::{sparse_depthwise_conv, SiteMap};
use selfsup_ops::testing::{assert_close, randn};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var_os("SELFSUP_REQUIRE_GPU").is_none(), "SELFSUP_REQUIRE_GPU is set but: {e}");
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// `f` on the CPU and on `dev` with the same inputs: the output and the gradients of
/// sum(out * probe) with respect to every input agree to `tol` (relative to the CPU values).
fn compare(dev: &Device, inputs: &[Tensor], dtype: DType, tol: f32, what: &str, f: impl Fn(&[Tensor]) -> Tensor) {
    let run = |device: &Device, dt: DType| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(device).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let probe = randn(out.dims(), 99).to_dtype(dt).unwrap().to_device(device).unwrap();
        let grads = (out.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs: Vec<Tensor> = ts
            .iter()
            .map(|t| {
                grads
                    .get(t)
                    .expect("every input gets a gradient")
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            })
            .collect();
        (out.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap(), gs)
    };
    // The CPU reference runs in f32 on the inputs rounded to `dtype`.
    let rounded: Vec<Tensor> =
        inputs.iter().map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()).collect();
    let (cpu_out, cpu_g) = {
        let vars: Vec<Var> = rounded.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let probe = randn(out.dims(), 99).to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
        (out, ts.iter().map(|t| grads.get(t).unwrap().clone()).collect::<Vec<_>>())
    };
    let (gpu_out, gpu_g) = run(dev, dtype);
    assert_close(&gpu_out, &cpu_out, tol, tol, &format!("{what}: forward"));
    for (i, (a, b)) in gpu_g.iter().zip(&cpu_g).enumerate() {
        assert_close(a, b, tol, tol, &format!("{what}: gradient of input {i}"));
    }
}

#[test]
fn sparse_depthwise_conv_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let mut r = Rng::new(3);
    for (batch, h, w, c, k, keep) in [(2, 9, 7, 37, 7, 0.4), (4, 14, 14, 80, 7, 0.4), (1, 6, 6, 8, 3, 1.0)] {
        let vis: Vec<bool> = (0..batch * h * w).map(|_| r.bernoulli(keep)).collect();
        let map = SiteMap::from_visible(&vis, batch, h, w).unwrap();
        let nb = map.neighbours(k).unwrap();
        let inputs = [randn(&[map.len(), c], 1), randn(&[c, 1, k, k], 2), randn(&[c], 3)];
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            compare(&dev, &inputs, dt, tol, &format!("sparse conv {:?} {dt:?}", (batch, h, w, c, k)), |t| {
                sparse_depthwise_conv(&t[0], &nb, &t[1], Some(&t[2])).unwrap()
            });
        }
    }
}

#[test]
fn depthwise_conv_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    for ((b, h, w, c), k, mult, stride, pad) in
        [((2, 15, 13, 40), 7, 1, 1, 3), ((2, 16, 16, 24), 3, 2, 2, 1), ((3, 28, 28, 64), 7, 1, 1, 3)]
    {
        let inputs = [randn(&[b, h, w, c], 4), randn(&[c * mult, 1, k, k], 5), randn(&[c * mult], 6)];
        for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2)] {
            compare(&dev, &inputs, dt, tol, &format!("dwconv {:?} k {k} stride {stride} {dt:?}", (b, h, w, c)), |t| {
                depthwise_conv2d_nhwc(&t[0], &t[1], Some(&t[2]), stride, pad).unwrap()
            });
        }
    }
}

#[test]
fn window_attention_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    // LoMaR: 1 + 7x7 tokens per window, iRPE contextual keys, a bias, head dim 64.
    let (buckets, nb) = irpe_product_buckets(7, 7, 1.9, 1);
    let buckets = Arc::new(buckets);
    let inputs = [randn(&[16, 50, 3, 3, 64], 7), randn(&[3, 50, 50], 8), randn(&[1, 64, nb], 9)];
    let mask = shifted_window_mask(14, 14, 7, 7, 3, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        compare(&dev, &inputs, dt, tol, &format!("LoMaR attention {dt:?}"), |t| {
            let pos = PositionBias {
                bias: Some(t[1].to_dtype(DType::F32).unwrap()),
                window_mask: None,
                ctx: Some(ContextualBias {
                    table: t[2].to_dtype(DType::F32).unwrap(),
                    buckets: buckets.clone(),
                    ctx_scale: 1.0,
                }),
            };
            window_attention_qkv(&t[0], 0.125, &pos).unwrap()
        });
    }
    // Swin: shifted 7x7 windows over 14x14 (four windows per image), two images.
    let inputs = [randn(&[8, 49, 3, 2, 32], 10)];
    let mask = mask.to_device(&dev).unwrap();
    compare(&dev, &inputs, DType::F32, 1e-4, "Swin attention", |t| {
        let m = if t[0].device().is_cpu() { mask.to_device(&Device::Cpu).unwrap() } else { mask.clone() };
        window_attention_qkv(&t[0], 0.18, &PositionBias { bias: None, window_mask: Some(m), ctx: None }).unwrap()
    });
    // CvT: strided keys (lq 196, lk 49), separate q, k, v.
    let inputs = [randn(&[2, 196, 2, 64], 11), randn(&[2, 49, 2, 64], 12), randn(&[2, 49, 2, 64], 13)];
    compare(&dev, &inputs, DType::F32, 1e-4, "CvT attention", |t| {
        window_attention(&t[0], &t[1], &t[2], 0.125, &PositionBias::default()).unwrap()
    });
    // CvT-13's first stage (3136 queries over 784 keys of 64) does not fit the kernels' shared
    // memory: the op falls back to candle's ops and still agrees.
    let inputs = [randn(&[1, 3136, 1, 64], 14), randn(&[1, 784, 1, 64], 15), randn(&[1, 784, 1, 64], 16)];
    compare(&dev, &inputs, DType::F32, 1e-4, "CvT stage-1 attention (fallback)", |t| {
        window_attention(&t[0], &t[1], &t[2], 0.125, &PositionBias::default()).unwrap()
    });
}
