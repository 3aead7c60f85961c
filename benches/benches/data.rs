//! The input pipeline at ImageNet scale: JPEGs in an LMDB store, decoded and augmented by the
//! loader at 224 px, in images per second.
//!
//! A deterministic corpus of 512 JPEGs (500x375, quality 90, smooth colour fields plus texture
//! and noise, so the decoder does real work) is written once to `target/bench-data/jpeg/` (an
//! image folder, two classes) and packed into `target/bench-data/lmdb/`. Then, with
//! `SELFSUP_BENCH_WORKERS` worker threads (default 2, this machine's cores):
//! - `decode`: every record read from LMDB and decoded (the pipeline's upper bound);
//! - `byol_2view_224`: decode + BYOL's two asymmetric views (crop, flip, jitter, grayscale,
//!   blur, solarize) through the [`Loader`], batch 64;
//! - `fcmae_1view_224`: decode + the masked-modelling view (bicubic crop 0.2-1 + flip).
//!
//! Each case runs one warm-up epoch and then `REPEATS` timed epochs; the median goes to
//! `target/criterion/data-bench.json`, which `cargo xtask bench` prints next to
//! `benches/torch_data.py` (torchvision + PIL through a PyTorch DataLoader with the same
//! worker count, on the same JPEG folder).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use selfsup_data::folder::{DecodeOptions, ImageFolder};
use selfsup_data::lmdb::LmdbStore;
use selfsup_data::{Loader, LoaderOptions, Source, ViewConfig};
use selfsup_ops::rng::Rng;
use serde_json::json;

const IMAGES: usize = 512;
const REPEATS: usize = 3;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The corpus: smooth fields of colour with a texture and noise, as JPEG.
fn write_corpus(dir: &Path) {
    let (w, h) = (500u32, 375u32);
    for i in 0..IMAGES {
        let class = dir.join(format!("class{}", i % 2));
        std::fs::create_dir_all(&class).unwrap();
        let path = class.join(format!("{i:04}.jpg"));
        if path.exists() {
            continue;
        }
        let mut rng = Rng::from_keys(&[7, i as u64]);
        let (fx, fy, phase) = (rng.range(0.005, 0.05), rng.range(0.005, 0.05), rng.range(0.0, std::f64::consts::TAU));
        let base = [rng.range(40.0, 200.0), rng.range(40.0, 200.0), rng.range(40.0, 200.0)];
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let t = ((x as f64 * fx + y as f64 * fy + phase).sin() * 50.0) + ((x * y) % 7) as f64 * 3.0;
            let n = (rng.next_u64() % 24) as f64;
            image::Rgb([0, 1, 2].map(|c| (base[c] + t * (c as f64 - 1.0) + n).clamp(0.0, 255.0) as u8))
        });
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 90).encode_image(&img).unwrap();
    }
}

/// Median of `REPEATS` timed runs of `f` (after one warm-up), as images per second.
fn images_per_sec(images: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut rates: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            f();
            images as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[REPEATS / 2]
}

/// The cases; `cargo bench -- FILTER` names them `data/<case>`.
const CASES: [&str; 3] = ["decode", "byol_2view_224", "fcmae_1view_224"];

fn main() {
    // Honour the filter as the criterion benches do (the first argument that is not a flag), so
    // `cargo xtask bench step` does not build the corpus and time the loader.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |case: &str| filter.as_deref().is_none_or(|f| format!("data/{case}").contains(f));
    if !CASES.iter().any(|c| wanted(c)) {
        return;
    }
    selfsup_benches::init();
    let workers: usize = std::env::var("SELFSUP_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let data = root().join("bench-data");
    let jpeg = data.join("jpeg");
    write_corpus(&jpeg);
    let lmdb = data.join("lmdb");
    if LmdbStore::open(&lmdb).map(|s| s.len() != IMAGES).unwrap_or(true) {
        let folder = ImageFolder::scan(&jpeg).unwrap();
        let opts = DecodeOptions { size: 0, channels: 3, max_pixels: 1 << 24 };
        selfsup_data::lmdb::pack_folder(&folder, &lmdb, &opts, 0.0, true, |_, _| {}).unwrap();
    }
    let store: Arc<dyn Source> = Arc::new(LmdbStore::open(&lmdb).unwrap());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).build().unwrap();
    let mut results = serde_json::Map::new();

    if wanted(CASES[0]) {
        let decode = images_per_sec(IMAGES, || {
            use rayon::prelude::*;
            pool.install(|| (0..IMAGES).into_par_iter().for_each(|i| drop(store.image(i).unwrap())));
        });
        results.insert(CASES[0].into(), json!(decode));
    }

    let (mean, std) = (MEAN.to_vec(), STD.to_vec());
    let cases = [
        (
            CASES[1],
            vec![
                ViewConfig::byol(224, 0, mean.clone(), std.clone()),
                ViewConfig::byol(224, 1, mean.clone(), std.clone()),
            ],
        ),
        (CASES[2], vec![ViewConfig::masked_modeling(224, mean.clone(), std.clone())]),
    ];
    for (name, views) in cases {
        if !wanted(name) {
            continue;
        }
        let opts = LoaderOptions { workers, ..Default::default() };
        let loader = Loader::new(store.clone(), views, 64, 0).unwrap().with_options(opts).unwrap();
        let mut epoch = 0;
        let rate = images_per_sec(IMAGES, || {
            for b in 0..loader.batches_per_epoch() {
                drop(loader.batch(epoch, b).unwrap());
            }
            epoch += 1;
        });
        results.insert(name.into(), json!(rate));
    }
    for (k, v) in &results {
        println!("data/{k}: {:.0} images/s ({workers} workers)", v.as_f64().unwrap());
    }
    let out = json!({ "workers": workers, "images": IMAGES, "images_per_sec": results, "jpeg_dir": jpeg });
    let dir = root().join("criterion");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data-bench.json"), serde_json::to_string_pretty(&out).unwrap()).unwrap();
}
