//! GPU benchmark of the kernels (feature `cuda`), the Rust half of issue 6's comparison with
//! PyTorch on the same GPU (benches/torch_kernels_gpu.py times the peers with the same shapes
//! and prints the ratios from both JSON files):
//! - windowed attention, forward + backward, LoMaR's windows on ViT-B (1 + 49 tokens, 12 heads
//!   of 64), against window partition + `scaled_dot_product_attention`;
//! - the submanifold 7x7 depthwise conv at mask ratio 0.6 (ConvNeXt V2-atto stage 1 at 224 px:
//!   batch 128, 56 x 56, 40 channels), forward + both gradients, against cuDNN's dense
//!   depthwise conv on the whole map;
//! - the dense 7x7 depthwise conv on the same map, forward + both gradients.
//!
//! Times are CUDA-event medians over 20 runs after 5 warm-up runs, in milliseconds, with the
//! achieved FLOP/s (attention) or bandwidth (convs, bytes the kernels must move at least).
//! Usage: `gpu_bench [out.json]`.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream};
use selfsup_kernels::cuda::{AttnGradsMut, DevPos, Kernels};
use selfsup_kernels::launch::{neighbour_table, AttnDims, DwGeom};

fn median_ms(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        start.record(stream).unwrap();
        f();
        end.record(stream).unwrap();
        end.synchronize().unwrap();
        times.push(start.elapsed_ms(&end).unwrap() as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_path = std::env::args().nth(1);
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let k = Kernels::new(ctx.clone())?;
    let mut results = Vec::new();

    // Windowed attention: 1024 windows (64 images x 16 windows) of 50 tokens, 12 heads of 64.
    let (g, l, h, d) = (1024usize, 50usize, 12usize, 64usize);
    let a = AttnDims::fused(g, l, h, 0.125);
    let (ql, _) = a.src_lens(d);
    let qkv = stream.clone_htod(&random(ql, 1))?;
    let dout = stream.clone_htod(&random(a.out_len(d), 2))?;
    let mut out = stream.alloc_zeros::<f32>(a.out_len(d))?;
    let mut lse = stream.alloc_zeros::<f32>(a.rows())?;
    let mut dqkv = stream.alloc_zeros::<f32>(ql)?;
    let pos = DevPos::default();
    let ms = median_ms(&ctx, &stream, || {
        k.attention_fwd(
            &stream,
            &qkv.as_view(),
            &qkv.as_view(),
            &pos,
            a,
            d,
            &mut out.as_view_mut(),
            &mut lse.as_view_mut(),
        )
        .unwrap();
        let mut dv = dqkv.as_view_mut();
        let grads = AttnGradsMut { dq_src: &mut dv, dkv_src: None, dbias: None, dtable: None };
        k.attention_bwd(
            &stream,
            &qkv.as_view(),
            &qkv.as_view(),
            &pos,
            &out.as_view(),
            &dout.as_view(),
            &lse.as_view(),
            a,
            d,
            grads,
        )
        .unwrap();
    });
    // Forward 2 matmuls, backward 5 (incl. the recomputed QK^T): 7 x 2 * l * l * d per window-head.
    let flops = 7.0 * 2.0 * (g * h * l * l * d) as f64;
    results.push(("attention_lomar_vitb_fwd_bwd", ms, format!("{:.1} TFLOP/s", flops / ms / 1e9)));

    // Sparse 7x7 depthwise conv at mask ratio 0.6 over a 128 x 56 x 56 x 40 map.
    let (b, hw, c, kk) = (128usize, 56usize, 40usize, 7usize);
    let taps = kk * kk;
    let vis: Vec<bool> = (0..b * hw * hw).map(|i| (i / hw / 8 + (i % hw) / 8) % 5 < 2).collect();
    let (n, nb) = neighbour_table(&vis, b, hw, hw, kk)?;
    let (x, w, dy) = (
        stream.clone_htod(&random(n * c, 3))?,
        stream.clone_htod(&random(c * taps, 4))?,
        stream.clone_htod(&random(n * c, 5))?,
    );
    let nbd = stream.clone_htod(&nb)?;
    let (mut y, mut dx, mut dw, mut db) = (
        stream.alloc_zeros::<f32>(n * c)?,
        stream.alloc_zeros::<f32>(n * c)?,
        stream.alloc_zeros::<f32>(c * taps)?,
        stream.alloc_zeros::<f32>(c)?,
    );
    let ms = median_ms(&ctx, &stream, || {
        k.sparse_dw_fwd(
            &stream,
            &x.as_view(),
            &w.as_view(),
            None,
            &nbd.as_view(),
            &mut y.as_view_mut(),
            n,
            c,
            taps,
            false,
        )
        .unwrap();
        k.sparse_dw_fwd(
            &stream,
            &dy.as_view(),
            &w.as_view(),
            None,
            &nbd.as_view(),
            &mut dx.as_view_mut(),
            n,
            c,
            taps,
            true,
        )
        .unwrap();
        k.sparse_dw_wgrad(
            &stream,
            &dy.as_view(),
            &x.as_view(),
            &nbd.as_view(),
            &mut dw.as_view_mut(),
            Some(&mut db.as_view_mut()),
            n,
            c,
            taps,
        )
        .unwrap();
    });
    // At least: read x, dy (twice), write y, dx, plus the neighbour table three times.
    let bytes = (6 * n * c * 4 + 3 * n * taps * 4) as f64;
    results.push((
        "sparse_dwconv7_mask0.6_fwd_bwd",
        ms,
        format!("{:.0} GB/s (visible {:.2})", bytes / ms / 1e6, n as f64 / vis.len() as f64),
    ));

    // Dense 7x7 depthwise conv over the whole map.
    let geom = DwGeom::new((b, hw, hw, c), (kk, kk), 1, 1, 3)?;
    let (x, dy) = (stream.clone_htod(&random(geom.in_len(), 6))?, stream.clone_htod(&random(geom.out_len(), 7))?);
    let (mut y, mut dx) = (stream.alloc_zeros::<f32>(geom.out_len())?, stream.alloc_zeros::<f32>(geom.in_len())?);
    let ms = median_ms(&ctx, &stream, || {
        k.dw_fwd(&stream, &x.as_view(), &w.as_view(), None, &mut y.as_view_mut(), geom).unwrap();
        k.dw_dx(&stream, &dy.as_view(), &w.as_view(), &mut dx.as_view_mut(), geom).unwrap();
        k.dw_wgrad(&stream, &dy.as_view(), &x.as_view(), &mut dw.as_view_mut(), Some(&mut db.as_view_mut()), geom)
            .unwrap();
    });
    let bytes = (6 * geom.in_len() * 4) as f64;
    results.push(("dense_dwconv7_fwd_bwd", ms, format!("{:.0} GB/s", bytes / ms / 1e6)));

    let mut json = String::from("{\n");
    for (i, (name, ms, note)) in results.iter().enumerate() {
        println!("{name}: {ms:.3} ms ({note})");
        json += &format!("  \"{name}\": {ms:.4}{}\n", if i + 1 < results.len() { "," } else { "" });
    }
    json += "}\n";
    if let Some(p) = out_path {
        std::fs::write(p, json)?;
    }
    Ok(())
}
