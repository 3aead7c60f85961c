//! The CUDA kernels of selfsup-kernels, run on the host emulation of the CUDA grid, against the
//! CPU ops of this crate: values and gradients, on odd shapes, with all-masked and unmasked
//! maps. On a machine without a GPU this is how the kernels' arithmetic, indexing, launch
//! geometry and barriers are checked; `cargo xtask gpu` runs the same comparisons on a GPU.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use selfsup_kernels::emulation::{self as emu, Pos};
use selfsup_kernels::launch::{AttnDims, DwGeom};
use selfsup_ops::attention::{
    irpe_product_buckets, shifted_window_mask, window_attention, window_attention_qkv, ContextualBias, PositionBias,
};
use selfsup_ops::dwconv::depthwise_conv2d_nhwc;
use selfsup_ops::rng::Rng;
use selfsup_ops::sparse::{sparse_depthwise_conv, SiteMap};
use selfsup_ops::testing::randn;

fn v(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Panics unless the two agree to `tol * (1 + max |reference|)`.
fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (i, d) = got.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |m, (i, d)| {
        if d > m.1 || d.is_nan() {
            (i, d)
        } else {
            m
        }
    });
    assert!(
        d <= tol * (1.0 + scale),
        "{what}: max |diff| {d:e} at {i} (got {}, want {}), scale {scale}",
        got[i],
        want[i]
    );
}

/// The CPU op's output and the gradients of sum(out * probe) with respect to each input.
fn cpu_grads(inputs: &[Tensor], probe_seed: u64, f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Tensor, Vec<Vec<f32>>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let probe = randn(out.dims(), probe_seed);
    let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).map(v).unwrap_or_else(|| vec![0.0; t.elem_count()])).collect();
    (out, probe, g)
}

fn random_map(batch: usize, h: usize, w: usize, keep: f64, seed: u64) -> SiteMap {
    let mut r = Rng::new(seed);
    let vis: Vec<bool> = (0..batch * h * w).map(|_| r.bernoulli(keep)).collect();
    SiteMap::from_visible(&vis, batch, h, w).unwrap()
}

#[test]
fn sparse_conv_matches_the_cpu_op_values_and_gradients() {
    // Odd shapes; a map with masked and visible sites, an unmasked one and an all-masked one.
    for (i, (batch, h, w, c, k, keep)) in
        [(2, 5, 6, 5, 3, 0.4), (1, 7, 7, 3, 7, 0.4), (2, 4, 3, 33, 3, 1.0), (1, 4, 4, 4, 5, 0.0)]
            .into_iter()
            .enumerate()
    {
        let map = random_map(batch, h, w, keep, i as u64);
        let nb = map.neighbours(k).unwrap();
        let n = map.len();
        let taps = k * k;
        let (x, wt, b) = (randn(&[n, c], 10 + i as u64), randn(&[c, 1, k, k], 20), randn(&[c], 30));
        let (out, probe, g) = cpu_grads(&[x.clone(), wt.clone(), b.clone()], 40, |t| {
            sparse_depthwise_conv(&t[0], &nb, &t[1], Some(&t[2])).unwrap()
        });
        let what = format!("sparse case {i} ({n} sites, c {c}, k {k})");
        let y = emu::sparse_dw_fwd(&v(&x), &v(&wt), Some(&v(&b)), &nb.idx, n, c, taps, false).unwrap();
        close(&y, &v(&out), 1e-5, &format!("{what}: forward"));
        let dx = emu::sparse_dw_fwd(&v(&probe), &v(&wt), None, &nb.idx, n, c, taps, true).unwrap();
        close(&dx, &g[0], 1e-5, &format!("{what}: dx"));
        let (dw, db) = emu::sparse_dw_wgrad(&v(&probe), &v(&x), &nb.idx, n, c, taps, true).unwrap();
        close(&dw, &g[1], 1e-5, &format!("{what}: dw"));
        close(&db.unwrap(), &g[2], 1e-5, &format!("{what}: db"));
        let (dw_only, none) = emu::sparse_dw_wgrad(&v(&probe), &v(&x), &nb.idx, n, c, taps, false).unwrap();
        assert!(none.is_none());
        close(&dw_only, &g[1], 1e-5, &format!("{what}: dw without bias"));
    }
}

#[test]
fn the_kernels_crate_builds_the_same_gather_map_as_the_site_map() {
    for (k, keep) in [(3, 0.5), (7, 0.4), (5, 1.0), (3, 0.0)] {
        let mut r = Rng::new(k as u64);
        let vis: Vec<bool> = (0..2 * 6 * 5).map(|_| r.bernoulli(keep)).collect();
        let map = SiteMap::from_visible(&vis, 2, 6, 5).unwrap();
        let (n, table) = selfsup_kernels::launch::neighbour_table(&vis, 2, 6, 5, k).unwrap();
        assert_eq!(n, map.len());
        assert_eq!(&table, map.neighbours(k).unwrap().idx.as_ref(), "k {k}, keep {keep}");
    }
    assert!(selfsup_kernels::launch::neighbour_table(&[true; 4], 1, 2, 2, 2).is_err());
}

#[test]
fn sparse_conv_weight_gradient_spans_many_chunks() {
    // More sites than one weight-gradient chunk (64), so the partial sums are reduced.
    let map = random_map(4, 12, 11, 0.5, 7);
    let nb = map.neighbours(3).unwrap();
    let (n, c) = (map.len(), 6);
    assert!(n > 3 * 64, "{n} sites");
    let (x, wt) = (randn(&[n, c], 1), randn(&[c, 1, 3, 3], 2));
    let (_, probe, g) =
        cpu_grads(&[x.clone(), wt.clone()], 3, |t| sparse_depthwise_conv(&t[0], &nb, &t[1], None).unwrap());
    let (dw, _) = emu::sparse_dw_wgrad(&v(&probe), &v(&x), &nb.idx, n, c, 9, false).unwrap();
    close(&dw, &g[1], 1e-5, "dw over several chunks");
}

#[test]
fn gather_and_scatter_match_the_site_map() {
    let map = random_map(2, 5, 7, 0.5, 3);
    let c = 5;
    let dense = randn(&[2, 5, 7, c], 4);
    let gathered = emu::gather_rows(&v(&dense), map.sites(), c).unwrap();
    close(&gathered, &v(&map.gather(&dense).unwrap()), 0.0, "gather");
    let sites = randn(&[map.len(), c], 5);
    let scattered = emu::scatter_rows(&v(&sites), map.sites(), 2 * 5 * 7, c).unwrap();
    close(&scattered, &v(&map.scatter(&sites).unwrap()), 0.0, "scatter");
    let err = emu::gather_rows(&v(&dense), &[70], c).unwrap_err().to_string();
    assert!(err.contains("site 70"), "{err}");
}

#[test]
fn dense_depthwise_conv_matches_the_cpu_op_values_and_gradients() {
    // (input, kernel, multiplier, stride, padding): odd sizes, strides 1 and 2, k 3/5/7.
    let cases = [
        ((2, 7, 9, 3), 3, 1, 1, 1),
        ((1, 9, 8, 4), 7, 1, 1, 3),
        ((2, 8, 7, 3), 5, 2, 2, 2),
        ((1, 6, 5, 2), 3, 1, 2, 0),
        ((1, 11, 10, 5), 7, 1, 2, 3),
    ];
    for (i, ((b, h, w, c), k, mult, stride, pad)) in cases.into_iter().enumerate() {
        let x = randn(&[b, h, w, c], 50 + i as u64);
        let wt = randn(&[c * mult, 1, k, k], 60);
        let bias = randn(&[c * mult], 70);
        let (out, probe, g) = cpu_grads(&[x.clone(), wt.clone(), bias.clone()], 80, |t| {
            depthwise_conv2d_nhwc(&t[0], &t[1], Some(&t[2]), stride, pad).unwrap()
        });
        let geom = DwGeom::new((b, h, w, c), (k, k), mult, stride, pad).unwrap();
        let what = format!("dwconv case {i}: {:?}, k {k}, mult {mult}, stride {stride}, pad {pad}", (b, h, w, c));
        assert_eq!(geom.out_len(), out.elem_count(), "{what}: output size");
        close(
            &emu::dw_fwd(&v(&x), &v(&wt), Some(&v(&bias)), geom).unwrap(),
            &v(&out),
            1e-5,
            &format!("{what}: forward"),
        );
        close(&emu::dw_dx(&v(&probe), &v(&wt), geom).unwrap(), &g[0], 1e-5, &format!("{what}: dx"));
        let (dw, db) = emu::dw_wgrad(&v(&probe), &v(&x), geom, true).unwrap();
        close(&dw, &g[1], 1e-5, &format!("{what}: dw"));
        close(&db.unwrap(), &g[2], 1e-5, &format!("{what}: db"));
    }
}

/// Positional terms of one attention case, as candle tensors (CPU op) and slices (kernels).
struct Terms {
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    table: Option<Tensor>,
    buckets: Option<Arc<Vec<u32>>>,
    ctx_scale: f32,
}

impl Terms {
    fn position_bias(&self, bias: Option<&Tensor>, table: Option<&Tensor>) -> PositionBias {
        PositionBias {
            bias: bias.cloned(),
            window_mask: self.mask.clone(),
            ctx: table.map(|t| ContextualBias {
                table: t.clone(),
                buckets: self.buckets.clone().unwrap(),
                ctx_scale: self.ctx_scale as f64,
            }),
        }
    }
}

/// Runs one attention case through the CPU op and the emulated kernels and compares the output
/// and every gradient.
fn attention_case(name: &str, g: usize, lq: usize, lk: usize, h: usize, d: usize, fused: bool, terms: Terms) {
    let scale = 1.0 / (d as f32).sqrt();
    let (q_src, kv_src) = if fused {
        let qkv = randn(&[g, lq, 3, h, d], 1);
        (qkv.clone(), qkv)
    } else {
        (randn(&[g, lq, 1, h, d], 1), randn(&[g, lk, 2, h, d], 2))
    };
    let mut inputs = vec![q_src.clone()];
    if !fused {
        inputs.push(kv_src.clone());
    }
    let n_in = inputs.len();
    inputs.extend(terms.bias.iter().cloned());
    inputs.extend(terms.table.iter().cloned());
    let has_bias = terms.bias.is_some();
    let (out, probe, grads) = cpu_grads(&inputs, 9, |t| {
        let bias = has_bias.then(|| &t[n_in]);
        let table = terms.table.as_ref().map(|_| &t[n_in + has_bias as usize]);
        let pos = terms.position_bias(bias, table);
        if fused {
            window_attention_qkv(&t[0], scale as f64, &pos).unwrap()
        } else {
            let part = |src: &Tensor, i: usize| src.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
            window_attention(&part(&t[0], 0), &part(&t[1], 0), &part(&t[1], 1), scale as f64, &pos).unwrap()
        }
    });
    let mut a = if fused { AttnDims::fused(g, lq, h, scale) } else { AttnDims::separate(g, lq, lk, h, scale) };
    let (bias, mask, table) = (terms.bias.as_ref().map(v), terms.mask.as_ref().map(v), terms.table.as_ref().map(v));
    if let Some(m) = &terms.mask {
        a.n_masks = m.dim(0).unwrap() as i32;
    }
    if let Some(t) = &terms.table {
        a.table_heads = t.dim(0).unwrap() as i32;
        a.n_buckets = t.dim(2).unwrap() as i32;
        a.ctx_scale = terms.ctx_scale;
    }
    let pos = Pos {
        bias: bias.as_deref(),
        mask: mask.as_deref(),
        table: table.as_deref(),
        buckets: terms.buckets.as_deref().map(|b| b.as_slice()),
    };
    let (qv, kvv) = (v(&q_src), v(&kv_src));
    let (o, lse) = emu::attention_fwd(&qv, &kvv, pos, a, d).unwrap();
    close(&o, &v(&out), 1e-5, &format!("{name}: forward"));
    let gr = emu::attention_bwd(&qv, &kvv, pos, &o, &v(&probe), &lse, a, d, fused).unwrap();
    close(&gr.dq_src, &grads[0], 1e-4, &format!("{name}: d q source"));
    if !fused {
        close(gr.dkv_src.as_ref().unwrap(), &grads[1], 1e-4, &format!("{name}: d kv source"));
    }
    if has_bias {
        close(gr.dbias.as_ref().unwrap(), &grads[n_in], 1e-4, &format!("{name}: d bias"));
    }
    if terms.table.is_some() {
        close(gr.dtable.as_ref().unwrap(), &grads[n_in + has_bias as usize], 1e-4, &format!("{name}: d table"));
    }
}

fn none() -> Terms {
    Terms { bias: None, mask: None, table: None, buckets: None, ctx_scale: 0.0 }
}

#[test]
fn attention_matches_the_cpu_op_plain_and_with_a_bias() {
    attention_case("fused, plain", 3, 7, 7, 2, 8, true, none());
    attention_case("separate, lq != lk", 2, 5, 9, 3, 16, false, none());
    let bias = Some(randn(&[2, 6, 6], 3));
    attention_case("fused, bias", 4, 6, 6, 2, 4, true, Terms { bias, ..none() });
}

#[test]
fn attention_matches_the_cpu_op_with_swin_masks() {
    // A 4x4 map in 2x2 windows shifted by 1: four windows per image, two images.
    let mask = shifted_window_mask(4, 4, 2, 2, 1, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(mask.dims(), &[4, 4, 4]);
    let bias = Some(randn(&[3, 4, 4], 4));
    attention_case("fused, Swin mask + bias", 8, 4, 4, 3, 8, true, Terms { bias, mask: Some(mask), ..none() });
}

#[test]
fn attention_matches_the_cpu_op_with_lomar_contextual_keys() {
    // LoMaR: 1 + 3x3 tokens, iRPE product buckets, one shared table and one per head.
    let (buckets, nb) = irpe_product_buckets(3, 3, 1.9, 1);
    let buckets = Arc::new(buckets);
    for (th, cs) in [(1, 1.0), (2, 0.35)] {
        let table = Some(randn(&[th, 8, nb], 5 + th as u64));
        let terms = Terms { bias: None, mask: None, table, buckets: Some(buckets.clone()), ctx_scale: cs };
        attention_case(&format!("fused, ctx table heads {th}"), 3, 10, 10, 2, 8, true, terms);
    }
    let terms = Terms {
        bias: Some(randn(&[2, 10, 10], 6)),
        mask: None,
        table: Some(randn(&[2, 4, nb], 7)),
        buckets: Some(buckets),
        ctx_scale: 0.5,
    };
    attention_case("fused, bias + ctx table", 2, 10, 10, 2, 4, true, terms);
}

#[test]
fn kernels_take_bf16_and_f16() {
    // bf16/f16 storage, f32 accumulation: against the f32 CPU op on the rounded inputs.
    let map = random_map(2, 5, 5, 0.5, 11);
    let nb = map.neighbours(3).unwrap();
    let (n, c) = (map.len(), 6);
    let x = randn(&[n, c], 12).to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let wt = randn(&[c, 1, 3, 3], 13).to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let want = v(&sparse_depthwise_conv(&x, &nb, &wt, None).unwrap());
    let bf = |t: &Tensor| v(t).iter().map(|&f| half::bf16::from_f32(f)).collect::<Vec<_>>();
    let y = emu::sparse_dw_fwd(&bf(&x), &bf(&wt), None, &nb.idx, n, c, 9, false).unwrap();
    close(&y.iter().map(|h| h.to_f32()).collect::<Vec<_>>(), &want, 1e-2, "sparse conv in bf16");
    let geom = DwGeom::new((1, 5, 6, 4), (3, 3), 1, 1, 1).unwrap();
    let (x, wt) = (randn(&[1, 5, 6, 4], 14), randn(&[4, 1, 3, 3], 15));
    let hf = |t: &Tensor| v(t).iter().map(|&f| half::f16::from_f32(f)).collect::<Vec<_>>();
    let y = emu::dw_fwd(&hf(&x), &hf(&wt), None, geom).unwrap();
    let want = v(&depthwise_conv2d_nhwc(&x, &wt, None, 1, 1).unwrap());
    close(&y.iter().map(|h| h.to_f32()).collect::<Vec<_>>(), &want, 5e-3, "dwconv in f16");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let err = emu::sparse_dw_fwd(&[0f32; 10], &[0f32; 45], None, &[0; 9], 2, 5, 9, false).unwrap_err().to_string();
    assert!(err.contains("neighbours") && err.contains("18"), "{err}");
    let a = AttnDims::fused(1, 4, 1, 1.0);
    let err = emu::attention_fwd(&[0f32; 4 * 3 * 32], &[0f32; 4 * 3 * 32], Pos::default(), a, 32).unwrap_err();
    assert!(err.to_string().contains("head dim 32"), "{err}");
}
