//! Segmentation sets composited from RGBA images (issue 9): `selfsup data segset`.
//!
//! No segmentation dataset installs here, so one is built from a package: Debian's
//! `openclipart-png` (about 8k public-domain clip-art PNGs, most with an alpha channel). The
//! recipe, for image `i` of the sorted file list (everything keyed by `(seed, i)`):
//! 1. Decode it (refused from the header above `max_pixels`). It needs an alpha channel whose
//!    foreground (alpha > 127) covers between 1 % and 95 % of its bounding box's image; otherwise
//!    it is skipped and counted ("no usable alpha mask").
//! 2. Crop to the foreground's bounding box and resize it (triangle filter) so its longer side is
//!    a fraction `U(0.5, 0.9)` of `size`, keeping the aspect ratio; place it at a uniformly random
//!    offset inside the `size x size` canvas.
//! 3. Background: another image of the list (index drawn uniformly, not `i`), decoded, flattened
//!    onto a random opaque colour if it has alpha, resized and centre-cropped to `size`. If that
//!    image cannot be read, a procedural texture (two random colours in stripes of random
//!    period and direction) is used instead.
//! 4. Alpha-blend the foreground over the background; the mask is `alpha > 127` (class 1),
//!    else 0.
//! 5. Split: a permutation keyed by `seed` of the kept images; the first 80 % train, the next
//!    10 % val, the rest test.
//! 6. Store: one shard store per split (`OUT/train`, `OUT/val`, `OUT/test`) of 4-plane records
//!    (R, G, B planes, then the class-index plane), written to `OUT.partial` and renamed when
//!    complete.
//!
//! The same source folder, size and seed give byte-identical stores.

use std::collections::BTreeMap;
use std::path::Path;

use image::{DynamicImage, RgbaImage};
use rayon::prelude::*;
use selfsup_ops::rng::Rng;

use crate::error::{DataError, Result};
use crate::folder::{decode_image, resize_center_crop, DecodeOptions, ImageFolder, Skip};
use crate::shards::ShardWriter;

/// Planes of a segset record: RGB, then the mask.
pub const PLANES: usize = 4;

/// The images of one split of a segset without their masks, as an unlabelled 3-channel set:
/// what self-supervised pretraining reads (`format = "segset"` in a run config), so an encoder
/// can be pretrained on exactly the images it will later segment.
pub fn images(dir: &Path, split: &str) -> Result<crate::ImageSet> {
    let store = crate::shards::open(&dir.join(split))?;
    if store.c != PLANES {
        return Err(DataError::config(
            "segset",
            format!("{}/{split}: records have {} planes, a segset has {PLANES} (RGB + mask)", dir.display(), store.c),
        ));
    }
    let rgb = 3 * store.h * store.w;
    let mut pixels = Vec::with_capacity(store.n * rgb);
    for i in 0..store.n {
        pixels.extend_from_slice(&store.image(i)[..rgb]);
    }
    crate::ImageSet::new(pixels, None, store.n, 3, store.h, store.w)
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegsetOptions {
    pub size: usize,
    pub seed: u64,
    pub max_pixels: u64,
    /// Train and val fractions (the rest is test).
    pub split: [f64; 2],
}

impl Default for SegsetOptions {
    fn default() -> Self {
        Self { size: 96, seed: 0, max_pixels: 40_000_000, split: [0.8, 0.1] }
    }
}

/// What was built: kept images per split and skipped files by reason.
#[derive(Debug, Clone, PartialEq)]
pub struct SegsetSummary {
    pub counts: [usize; 3],
    pub skipped: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

/// The foreground of one RGBA image, cropped to its alpha bounding box, or why it is unusable.
fn foreground(img: &DynamicImage) -> std::result::Result<RgbaImage, Skip> {
    if !img.color().has_alpha() {
        return Err(Skip::Unusable("no alpha channel".into()));
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let (mut x0, mut y0, mut x1, mut y1, mut n) = (w, h, 0, 0, 0u64);
    for (x, y, p) in rgba.enumerate_pixels() {
        if p[3] > 127 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            n += 1;
        }
    }
    let frac = n as f64 / (w as f64 * h as f64);
    if n == 0 || !(0.01..=0.95).contains(&frac) {
        return Err(Skip::Unusable(format!("foreground covers {:.1} % of the image", 100.0 * frac)));
    }
    Ok(image::imageops::crop_imm(&rgba, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image())
}

/// Stripes of two random colours, random period and direction: (3, size, size) bytes.
fn texture(rng: &mut Rng, size: usize) -> Vec<u8> {
    let colours: [[u8; 3]; 2] = std::array::from_fn(|_| std::array::from_fn(|_| rng.below(256) as u8));
    let period = 2 + rng.below(size / 4 + 1);
    let vertical = rng.bernoulli(0.5);
    let mut out = vec![0u8; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let t = if vertical { x } else { y };
            let c = colours[(t / period) % 2];
            for k in 0..3 {
                out[k * size * size + y * size + x] = c[k];
            }
        }
    }
    out
}

/// The background of image `i`: another image of the list, or a texture.
fn background(folder: &ImageFolder, i: usize, rng: &mut Rng, opts: &SegsetOptions) -> Vec<u8> {
    let n = folder.files.len();
    let j = if n > 1 { (i + 1 + rng.below(n - 1)) % n } else { i };
    let fill: [u8; 3] = std::array::from_fn(|_| rng.below(256) as u8);
    let decoded = (j != i)
        .then(|| std::fs::read(&folder.files[j].0).ok())
        .flatten()
        .and_then(|bytes| decode_image(&bytes, opts.max_pixels).ok());
    match decoded {
        Some(img) => {
            let mut rgba = img.to_rgba8();
            for p in rgba.pixels_mut() {
                let a = p[3] as f32 / 255.0;
                for k in 0..3 {
                    p[k] = (p[k] as f32 * a + fill[k] as f32 * (1.0 - a)).round() as u8;
                }
                p[3] = 255;
            }
            let dec = DecodeOptions { size: opts.size, channels: 3, max_pixels: opts.max_pixels };
            resize_center_crop(&DynamicImage::ImageRgba8(rgba), &dec)
        }
        None => texture(rng, opts.size),
    }
}

/// Composites image `i` of `folder`: a (4, size, size) record, or why it was skipped.
pub fn composite(folder: &ImageFolder, i: usize, opts: &SegsetOptions) -> std::result::Result<Vec<u8>, Skip> {
    let bytes = std::fs::read(&folder.files[i].0).map_err(|e| Skip::Unreadable(e.to_string()))?;
    let fg = foreground(&decode_image(&bytes, opts.max_pixels)?)?;
    let mut rng = Rng::from_keys(&[opts.seed, 0x5e65e7, i as u64]);
    let s = opts.size;
    let scale = rng.range(0.5, 0.9);
    let (fw, fh) = fg.dimensions();
    let long = fw.max(fh) as f64;
    let (nw, nh) = (
        ((fw as f64 * scale * s as f64 / long).round() as u32).max(1),
        ((fh as f64 * scale * s as f64 / long).round() as u32).max(1),
    );
    let fg = image::imageops::resize(&fg, nw, nh, image::imageops::FilterType::Triangle);
    let (ox, oy) = (rng.below(s - nw as usize + 1), rng.below(s - nh as usize + 1));
    let mut out = background(folder, i, &mut rng, opts);
    out.resize(PLANES * s * s, 0);
    for (x, y, p) in fg.enumerate_pixels() {
        let (px, py) = (ox + x as usize, oy + y as usize);
        let a = p[3] as f32 / 255.0;
        for k in 0..3 {
            let at = k * s * s + py * s + px;
            out[at] = (p[k] as f32 * a + out[at] as f32 * (1.0 - a)).round() as u8;
        }
        out[3 * s * s + py * s + px] = (p[3] > 127) as u8;
    }
    Ok(out)
}

/// Builds the segmentation set of the images under `src` into `out` (see the module header).
pub fn build_segset(src: &Path, out: &Path, opts: &SegsetOptions, overwrite: bool) -> Result<SegsetSummary> {
    let folder = ImageFolder::scan(src)?;
    if opts.size < 16 {
        return Err(DataError::config("size", format!("segset: {} px is too small (at least 16)", opts.size)));
    }
    let results: Vec<std::result::Result<Vec<u8>, Skip>> =
        (0..folder.files.len()).into_par_iter().map(|i| composite(&folder, i, opts)).collect();
    let mut skipped = BTreeMap::new();
    let mut examples = Vec::new();
    let mut kept = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(record) => kept.push(record),
            Err(why) => {
                *skipped.entry(why.reason().to_string()).or_insert(0) += 1;
                if examples.len() < 100 {
                    examples.push(format!("{}: {why}", folder.files[i].0.display()));
                }
            }
        }
    }
    if kept.is_empty() {
        return Err(DataError::Record {
            path: src.to_path_buf(),
            key: format!("{} files", folder.files.len()),
            reason: format!(
                "no usable RGBA image ({skipped:?}; first: {})",
                examples.first().map(String::as_str).unwrap_or("-")
            ),
        });
    }
    let mut order: Vec<usize> = (0..kept.len()).collect();
    Rng::from_keys(&[opts.seed, 0x5b1175]).shuffle(&mut order);
    let n_train = (kept.len() as f64 * opts.split[0]).round() as usize;
    let n_val = (kept.len() as f64 * opts.split[1]).round() as usize;
    let staging = crate::staging::begin(out, overwrite)?;
    let mut counts = [0usize; 3];
    for (split, name) in ["train", "val", "test"].iter().enumerate() {
        let range = match split {
            0 => 0..n_train,
            1 => n_train..(n_train + n_val).min(kept.len()),
            _ => (n_train + n_val).min(kept.len())..kept.len(),
        };
        let mut writer = ShardWriter::create(&staging.join(name), PLANES, opts.size, opts.size, true)?;
        for &k in &order[range.clone()] {
            writer.push(&kept[k], None)?;
        }
        counts[split] = range.len();
        writer.finish(vec!["background".into(), "foreground".into()], &src.display().to_string(), skipped.clone())?;
    }
    crate::staging::commit(&staging, out)?;
    Ok(SegsetSummary { counts, skipped, examples })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Source;

    /// `n` 40x40 RGBA PNGs of a filled disc (colour `k * 20`) on transparency, one opaque RGB
    /// PNG, one fully transparent PNG and one corrupt file.
    pub(crate) fn clipart(dir: &Path, n: usize) {
        for k in 0..n {
            let mut img = RgbaImage::new(40, 40);
            for (x, y, p) in img.enumerate_pixels_mut() {
                let d = (x as f32 - 20.0).powi(2) + (y as f32 - 18.0).powi(2);
                let c = (k * 20) as u8;
                *p = if d < 100.0 { image::Rgba([c, 255 - c, 100, 255]) } else { image::Rgba([0, 0, 0, 0]) };
            }
            img.save(dir.join(format!("disc{k:02}.png"))).unwrap();
        }
        image::RgbImage::from_pixel(30, 30, image::Rgb([9, 9, 9])).save(dir.join("opaque.png")).unwrap();
        RgbaImage::new(30, 30).save(dir.join("empty.png")).unwrap();
        std::fs::write(dir.join("broken.png"), b"\x89PNG not really").unwrap();
    }

    #[test]
    fn compositing_is_deterministic_aligned_and_counts_what_it_skips() {
        let src = tempfile::tempdir().unwrap();
        clipart(src.path(), 10);
        let out = tempfile::tempdir().unwrap();
        let opts = SegsetOptions { size: 32, seed: 3, ..SegsetOptions::default() };
        let a = build_segset(src.path(), &out.path().join("a"), &opts, false).unwrap();
        assert_eq!(a.counts, [8, 1, 1]);
        assert_eq!(a.skipped.get("no usable alpha mask"), Some(&2));
        assert_eq!(a.skipped.get("unreadable or corrupt"), Some(&1));
        build_segset(src.path(), &out.path().join("b"), &opts, false).unwrap();
        for split in ["train", "val", "test"] {
            let (x, y) = (
                crate::shards::open(&out.path().join("a").join(split)).unwrap(),
                crate::shards::open(&out.path().join("b").join(split)).unwrap(),
            );
            assert_eq!(x.len(), y.len());
            for i in 0..x.len() {
                assert_eq!(x.image(i), y.image(i), "{split} {i}");
            }
        }
        // The mask sits exactly on the disc: interior mask pixels carry the disc's colour.
        let folder = ImageFolder::scan(src.path()).unwrap();
        let k = folder.files.iter().position(|(p, _)| p.ends_with("disc03.png")).unwrap();
        let rec = composite(&folder, k, &opts).unwrap();
        let s = 32;
        let mask = &rec[3 * s * s..];
        let mut interior = 0;
        for y in 1..s - 1 {
            for x in 1..s - 1 {
                let m = |yy: usize, xx: usize| mask[yy * s + xx] == 1;
                if m(y, x) && m(y - 1, x) && m(y + 1, x) && m(y, x - 1) && m(y, x + 1) {
                    interior += 1;
                    let px: Vec<u8> = (0..3).map(|c| rec[c * s * s + y * s + x]).collect();
                    assert_eq!(px, [60, 195, 100], "({y}, {x})");
                }
            }
        }
        assert!(interior > 20, "{interior}");
        let e = build_segset(src.path(), &out.path().join("a"), &opts, false).unwrap_err().to_string();
        assert!(e.contains("--overwrite"), "{e}");

        // The pretraining view: RGB planes only, no labels; a missing split is named.
        let rgb = images(&out.path().join("a"), "train").unwrap();
        let store = crate::shards::open(&out.path().join("a").join("train")).unwrap();
        assert_eq!((rgb.n, rgb.c, rgb.h, rgb.labels.is_none()), (8, 3, 32, true));
        for i in 0..rgb.n {
            assert_eq!(rgb.image(i), &store.image(i)[..3 * 32 * 32], "{i}");
        }
        let e = images(&out.path().join("a"), "nope").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}

/// One segset record as a float image and a mask, with the joint augmentation of training: a
/// random square crop of `scale` x the side (area fraction `scale^2`, position uniform), resized
/// back to `side` (image bilinear with half-pixel centres, mask nearest), and a horizontal flip
/// with probability 1/2. The same geometry moves image and mask, so they stay aligned.
/// `record`: (4, side, side) bytes. Returns ((3, side, side) floats in [0, 1], (side, side) classes).
pub fn joint_augment(record: &[u8], side: usize, scale: [f64; 2], rng: &mut Rng) -> (Vec<f32>, Vec<u32>) {
    let crop = ((rng.range(scale[0], scale[1]) * side as f64).round() as usize).clamp(1, side);
    let (oy, ox) = (rng.below(side - crop + 1), rng.below(side - crop + 1));
    let flip = rng.bernoulli(0.5);
    let r = crop as f64 / side as f64;
    let plane = side * side;
    let mut img = vec![0f32; 3 * plane];
    let mut mask = vec![0u32; plane];
    for y in 0..side {
        for x in 0..side {
            let xd = if flip { side - 1 - x } else { x };
            // Source coordinates (half-pixel centres) inside the crop.
            let sy = oy as f64 + (y as f64 + 0.5) * r - 0.5;
            let sx = ox as f64 + (xd as f64 + 0.5) * r - 0.5;
            let ny = (oy + ((y as f64 + 0.5) * r) as usize).min(oy + crop - 1);
            let nx = (ox + ((xd as f64 + 0.5) * r) as usize).min(ox + crop - 1);
            mask[y * side + x] = record[3 * plane + ny * side + nx] as u32;
            let (y0, x0) = (sy.floor().clamp(0.0, (side - 1) as f64), sx.floor().clamp(0.0, (side - 1) as f64));
            let (y1, x1) = ((y0 + 1.0).min((side - 1) as f64), (x0 + 1.0).min((side - 1) as f64));
            let (wy, wx) = ((sy - y0).clamp(0.0, 1.0), (sx - x0).clamp(0.0, 1.0));
            for c in 0..3 {
                let at = |yy: f64, xx: f64| record[c * plane + yy as usize * side + xx as usize] as f64;
                let v = at(y0, x0) * (1.0 - wy) * (1.0 - wx)
                    + at(y0, x1) * (1.0 - wy) * wx
                    + at(y1, x0) * wy * (1.0 - wx)
                    + at(y1, x1) * wy * wx;
                img[c * plane + y * side + x] = (v / 255.0) as f32;
            }
        }
    }
    (img, mask)
}

#[cfg(test)]
mod augment_tests {
    use super::*;

    /// A known pattern: the mask is 1 exactly where the red plane is 255 (a block), 0 where it
    /// is 0. After any crop/flip the augmented mask is 1 exactly where the augmented red value
    /// is high (>= 0.5 after interpolation, except on the interpolated border pixels).
    #[test]
    fn image_and_mask_move_together() {
        let side = 24;
        let plane = side * side;
        let mut rec = vec![0u8; 4 * plane];
        for y in 5..15 {
            for x in 3..11 {
                rec[y * side + x] = 255;
                rec[3 * plane + y * side + x] = 1;
            }
        }
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let (img, mask) = joint_augment(&rec, side, [0.5, 1.0], &mut rng);
            let mut agree = 0;
            for k in 0..plane {
                let red = img[k];
                if (red > 0.99 && mask[k] == 1) || (red < 0.01 && mask[k] == 0) {
                    agree += 1;
                } else {
                    // Only interpolated border pixels may disagree.
                    assert!(red > 0.0 && red < 1.0, "seed {seed} pixel {k}: red {red} mask {}", mask[k]);
                }
            }
            assert!(agree as f64 > 0.8 * plane as f64, "seed {seed}: {agree}");
        }
        // The identity (scale 1, no flip) reproduces the record exactly.
        let mut rng = Rng::new(1);
        loop {
            let mut probe = rng;
            let (img, mask) = joint_augment(&rec, side, [1.0, 1.0], &mut probe);
            if mask[5 * side + 3] == 1 {
                assert_eq!(mask, rec[3 * plane..].iter().map(|&m| m as u32).collect::<Vec<_>>());
                assert!((img[5 * side + 3] - 1.0).abs() < 1e-6);
                break;
            }
            rng.next_u64();
        }
    }
}
