//! The kernels on a GPU against the same kernels on the host emulation, which
//! `selfsup-ops/tests/kernels_emulated.rs` holds to the CPU ops: values and gradients on odd
//! shapes, all-masked and unmasked maps, f32 and bf16. Needs features `cuda` and
//! `host-emulation` and a GPU; without one each test prints why and passes, unless
//! `SELFSUP_REQUIRE_GPU=1` (set by the command `cargo xtask gpu` prints), where it fails.
#![cfg(all(feature = "cuda", feature = "host-emulation"))]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use selfsup_kernels::cuda::{AttnGradsMut, DevPos, Kernels};
use selfsup_kernels::emulation::{self as emu, Pos};
use selfsup_kernels::launch::{neighbour_table, AttnDims, DwGeom};

struct Gpu {
    stream: Arc<CudaStream>,
    kernels: Kernels,
}

fn gpu() -> Option<Gpu> {
    let required = std::env::var_os("SELFSUP_REQUIRE_GPU").is_some();
    let fail = |why: String| {
        assert!(!required, "SELFSUP_REQUIRE_GPU is set but {why}");
        eprintln!("skipped: {why}");
        None
    };
    if !selfsup_kernels::cuda::available() {
        return fail("libcuda/libnvrtc not found".into());
    }
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => return fail(format!("no CUDA device: {e:?}")),
    };
    let stream = ctx.default_stream();
    let kernels = Kernels::new(ctx).expect("kernels");
    eprintln!("device {}, shared memory limit {} bytes", kernels.arch(), kernels.smem_limit());
    Some(Gpu { stream, kernels })
}

/// xorshift; values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + scale), "{what}: element {i}: gpu {a}, emulation {b}");
    }
}

impl Gpu {
    fn up<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).unwrap()
    }
    fn zeros(&self, n: usize) -> CudaSlice<f32> {
        self.stream.alloc_zeros::<f32>(n).unwrap()
    }
    fn down(&self, s: &CudaSlice<f32>) -> Vec<f32> {
        self.stream.clone_dtoh(s).unwrap()
    }
}

/// Visible sites of a random (batch, h, w) mask and the k x k neighbour table.
fn neighbours(batch: usize, h: usize, w: usize, keep: f32, k: usize, rng: &mut Rng) -> (usize, Vec<u32>) {
    let vis: Vec<bool> = (0..batch * h * w).map(|_| (rng.f() + 1.0) / 2.0 < keep).collect();
    neighbour_table(&vis, batch, h, w, k).unwrap()
}

#[test]
fn sparse_conv_on_the_gpu_matches_the_emulation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for (batch, h, w, c, k, keep) in
        [(2, 9, 7, 37, 7, 0.4), (1, 14, 14, 96, 7, 0.4), (3, 5, 5, 8, 3, 1.0), (1, 4, 4, 5, 3, 0.0)]
    {
        let (n, nb) = neighbours(batch, h, w, keep, k, &mut rng);
        if n == 0 {
            continue;
        }
        let taps = k * k;
        let (x, wt, b, dy) = (rng.vec(n * c), rng.vec(c * taps), rng.vec(c), rng.vec(n * c));
        let what = format!("sparse conv ({n} sites, c {c}, k {k})");
        let (xd, wd, bd, dyd, nbd) = (g.up(&x), g.up(&wt), g.up(&b), g.up(&dy), g.up(&nb));
        let mut y = g.zeros(n * c);
        g.kernels
            .sparse_dw_fwd(
                &g.stream,
                &xd.as_view(),
                &wd.as_view(),
                Some(&bd.as_view()),
                &nbd.as_view(),
                &mut y.as_view_mut(),
                n,
                c,
                taps,
                false,
            )
            .unwrap();
        close(
            &g.down(&y),
            &emu::sparse_dw_fwd(&x, &wt, Some(&b), &nb, n, c, taps, false).unwrap(),
            1e-5,
            &format!("{what}: forward"),
        );
        let mut dx = g.zeros(n * c);
        g.kernels
            .sparse_dw_fwd(
                &g.stream,
                &dyd.as_view(),
                &wd.as_view(),
                None,
                &nbd.as_view(),
                &mut dx.as_view_mut(),
                n,
                c,
                taps,
                true,
            )
            .unwrap();
        close(
            &g.down(&dx),
            &emu::sparse_dw_fwd(&dy, &wt, None, &nb, n, c, taps, true).unwrap(),
            1e-5,
            &format!("{what}: dx"),
        );
        let (mut dw, mut db) = (g.zeros(c * taps), g.zeros(c));
        g.kernels
            .sparse_dw_wgrad(
                &g.stream,
                &dyd.as_view(),
                &xd.as_view(),
                &nbd.as_view(),
                &mut dw.as_view_mut(),
                Some(&mut db.as_view_mut()),
                n,
                c,
                taps,
            )
            .unwrap();
        let (edw, edb) = emu::sparse_dw_wgrad(&dy, &x, &nb, n, c, taps, true).unwrap();
        close(&g.down(&dw), &edw, 1e-5, &format!("{what}: dw"));
        close(&g.down(&db), &edb.unwrap(), 1e-5, &format!("{what}: db"));
    }
}

#[test]
fn gather_scatter_on_the_gpu_match_the_emulation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(7);
    let (rows, c) = (200, 24);
    let sites: Vec<u32> = (0..rows as u32).filter(|i| i % 3 != 1).collect();
    let dense = rng.vec(rows * c);
    let (dd, sd) = (g.up(&dense), g.up(&sites));
    let mut out = g.zeros(sites.len() * c);
    g.kernels.gather_rows(&g.stream, &dd.as_view(), &sd.as_view(), &mut out.as_view_mut(), c).unwrap();
    let gathered = emu::gather_rows(&dense, &sites, c).unwrap();
    close(&g.down(&out), &gathered, 0.0, "gather");
    let mut back = g.zeros(rows * c);
    g.kernels.scatter_rows(&g.stream, &out.as_view(), &sd.as_view(), &mut back.as_view_mut(), c).unwrap();
    close(&g.down(&back), &emu::scatter_rows(&gathered, &sites, rows, c).unwrap(), 0.0, "scatter");
}

#[test]
fn dense_depthwise_conv_on_the_gpu_matches_the_emulation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(11);
    for ((b, h, w, c), k, mult, stride, pad) in
        [((2, 15, 13, 40), 7, 1, 1, 3), ((2, 16, 16, 24), 3, 2, 2, 1), ((1, 9, 11, 5), 5, 1, 2, 2)]
    {
        let geom = DwGeom::new((b, h, w, c), (k, k), mult, stride, pad).unwrap();
        let (x, wt, bias, dy) =
            (rng.vec(geom.in_len()), rng.vec(c * mult * k * k), rng.vec(c * mult), rng.vec(geom.out_len()));
        let what = format!("dwconv {:?} k {k} mult {mult} stride {stride}", (b, h, w, c));
        let (xd, wd, bd, dyd) = (g.up(&x), g.up(&wt), g.up(&bias), g.up(&dy));
        let mut y = g.zeros(geom.out_len());
        g.kernels
            .dw_fwd(&g.stream, &xd.as_view(), &wd.as_view(), Some(&bd.as_view()), &mut y.as_view_mut(), geom)
            .unwrap();
        close(&g.down(&y), &emu::dw_fwd(&x, &wt, Some(&bias), geom).unwrap(), 1e-5, &format!("{what}: forward"));
        let mut dx = g.zeros(geom.in_len());
        g.kernels.dw_dx(&g.stream, &dyd.as_view(), &wd.as_view(), &mut dx.as_view_mut(), geom).unwrap();
        close(&g.down(&dx), &emu::dw_dx(&dy, &wt, geom).unwrap(), 1e-5, &format!("{what}: dx"));
        let (mut dw, mut db) = (g.zeros(wt.len()), g.zeros(c * mult));
        g.kernels
            .dw_wgrad(
                &g.stream,
                &dyd.as_view(),
                &xd.as_view(),
                &mut dw.as_view_mut(),
                Some(&mut db.as_view_mut()),
                geom,
            )
            .unwrap();
        let (edw, edb) = emu::dw_wgrad(&dy, &x, geom, true).unwrap();
        close(&g.down(&dw), &edw, 1e-5, &format!("{what}: dw"));
        close(&g.down(&db), &edb.unwrap(), 1e-5, &format!("{what}: db"));
    }
}

/// One attention case on the GPU and on the emulation: output and every gradient.
fn attention_case(
    g: &Gpu,
    name: &str,
    a: AttnDims,
    d: usize,
    fused: bool,
    terms: [Option<Vec<f32>>; 3],
    buckets: Option<Vec<u32>>,
) {
    let mut rng = Rng(13);
    let (ql, kvl) = a.src_lens(d);
    let q = rng.vec(ql);
    let kv = if fused { q.clone() } else { rng.vec(kvl) };
    let dout = rng.vec(a.out_len(d));
    let [bias, mask, table] = terms;
    let pos =
        Pos { bias: bias.as_deref(), mask: mask.as_deref(), table: table.as_deref(), buckets: buckets.as_deref() };
    let (eo, e_lse) = emu::attention_fwd(&q, &kv, pos, a, d).unwrap();
    let eg = emu::attention_bwd(&q, &kv, pos, &eo, &dout, &e_lse, a, d, fused).unwrap();

    let (qd, kvd, dod) = (g.up(&q), g.up(&kv), g.up(&dout));
    let up = |v: &Option<Vec<f32>>| v.as_ref().map(|v| g.up(v));
    let (bd, md, td) = (up(&bias), up(&mask), up(&table));
    let dpos = DevPos {
        bias: bd.as_ref().map(|s| s.as_view()),
        mask: md.as_ref().map(|s| s.as_view()),
        table: td.as_ref().map(|s| s.as_view()),
        buckets: buckets.as_deref(),
    };
    let (mut o, mut lse) = (g.zeros(a.out_len(d)), g.zeros(a.rows()));
    g.kernels
        .attention_fwd(
            &g.stream,
            &qd.as_view(),
            &kvd.as_view(),
            &dpos,
            a,
            d,
            &mut o.as_view_mut(),
            &mut lse.as_view_mut(),
        )
        .unwrap();
    close(&g.down(&o), &eo, 1e-5, &format!("{name}: forward"));
    close(&g.down(&lse), &e_lse, 1e-5, &format!("{name}: lse"));
    let (mut dq, mut dkv) = (g.zeros(ql), g.zeros(if fused { 1 } else { kvl }));
    let (mut dbias, mut dtable) = (g.zeros(a.pairs()), g.zeros(table.as_ref().map_or(1, |t| t.len())));
    let (mut dqv, mut dkvv, mut dbv, mut dtv) =
        (dq.as_view_mut(), dkv.as_view_mut(), dbias.as_view_mut(), dtable.as_view_mut());
    let grads = AttnGradsMut {
        dq_src: &mut dqv,
        dkv_src: (!fused).then_some(&mut dkvv),
        dbias: bias.as_ref().map(|_| &mut dbv),
        dtable: table.as_ref().map(|_| &mut dtv),
    };
    g.kernels
        .attention_bwd(
            &g.stream,
            &qd.as_view(),
            &kvd.as_view(),
            &dpos,
            &o.as_view(),
            &dod.as_view(),
            &lse.as_view(),
            a,
            d,
            grads,
        )
        .unwrap();
    close(&g.down(&dq), &eg.dq_src, 1e-4, &format!("{name}: d q source"));
    if !fused {
        close(&g.down(&dkv), eg.dkv_src.as_ref().unwrap(), 1e-4, &format!("{name}: d kv source"));
    }
    if bias.is_some() {
        close(&g.down(&dbias), eg.dbias.as_ref().unwrap(), 1e-4, &format!("{name}: d bias"));
    }
    if table.is_some() {
        close(&g.down(&dtable), eg.dtable.as_ref().unwrap(), 1e-4, &format!("{name}: d table"));
    }
}

#[test]
fn attention_on_the_gpu_matches_the_emulation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(17);
    attention_case(&g, "fused, 50 tokens", AttnDims::fused(6, 50, 3, 0.25), 16, true, [None, None, None], None);
    attention_case(
        &g,
        "separate, lq 37 lk 9",
        AttnDims::separate(4, 37, 9, 2, 0.3),
        8,
        false,
        [None, None, None],
        None,
    );
    // Swin: 2 images of 2x2 windows over 8x8 with a random additive mask, plus a bias.
    let mut a = AttnDims::fused(8, 16, 2, 0.35);
    a.n_masks = 4;
    let masks = (0..4 * 16 * 16).map(|i| if (i * 7) % 5 == 0 { -100.0 } else { 0.0 }).collect();
    attention_case(&g, "fused, mask + bias", a, 8, true, [Some(rng.vec(2 * 16 * 16)), Some(masks), None], None);
    // LoMaR: 1 + 49 tokens, 4 heads, a per-head contextual table over 30 buckets.
    let mut a = AttnDims::fused(5, 50, 4, 0.25);
    a.table_heads = 4;
    a.n_buckets = 30;
    a.ctx_scale = 1.0;
    let buckets: Vec<u32> = (0..50 * 50).map(|p| ((p * 13) % 30) as u32).collect();
    attention_case(&g, "fused, ctx table", a, 16, true, [None, None, Some(rng.vec(4 * 16 * 30))], Some(buckets));
}

#[test]
fn bf16_on_the_gpu_matches_the_emulation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(19);
    let geom = DwGeom::new((2, 14, 14, 32), (7, 7), 1, 1, 3).unwrap();
    let bf = |v: Vec<f32>| v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>();
    let (x, wt) = (bf(rng.vec(geom.in_len())), bf(rng.vec(32 * 49)));
    let (xd, wd) = (g.up(&x), g.up(&wt));
    let mut y = g.stream.alloc_zeros::<half::bf16>(geom.out_len()).unwrap();
    g.kernels.dw_fwd(&g.stream, &xd.as_view(), &wd.as_view(), None, &mut y.as_view_mut(), geom).unwrap();
    let got: Vec<f32> = g.stream.clone_dtoh(&y).unwrap().iter().map(|h| h.to_f32()).collect();
    let want: Vec<f32> = emu::dw_fwd(&x, &wt, None, geom).unwrap().iter().map(|h| h.to_f32()).collect();
    close(&got, &want, 1e-2, "dwconv bf16");
}
