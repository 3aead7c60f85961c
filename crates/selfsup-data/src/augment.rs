//! The SSL augmentations on u8 images, producing normalised f32 views.
//!
//! Semantics follow the torchvision + PIL pipelines the references use (`RandomResizedCrop`,
//! `RandomHorizontalFlip`, `ColorJitter`, `RandomGrayscale`, `GaussianBlur`,
//! `RandomSolarize`, `Normalize`; METHODS.md 1.1, 1.8), held to torchvision by golden tests
//! (`tests/fixtures/augment.json`, made by `scripts/make_augment_fixtures.py`):
//! - Resizing is PIL's `Image.resize` on the cropped region: separable, antialiased (the filter
//!   support grows with the downscale factor), bilinear (triangle) or bicubic (a = -0.5),
//!   horizontal pass then vertical, each rounded to u8 as PIL does for 8-bit images.
//! - ColorJitter draws the order of its four operations and then their factors, and applies
//!   torchvision's *tensor* functional ops (`adjust_brightness/contrast/saturation/hue` on
//!   floats in [0, 1]); PIL's per-operation rounding to u8 differs by at most one level.
//!   Grey images skip saturation and hue (identities there). Luma is 0.2989 R + 0.587 G +
//!   0.114 B (torchvision's `rgb_to_grayscale`).
//! - The blur kernel is ~10% of the output size (BYOL's 23 px at 224 px), odd, at least 3,
//!   with reflect padding as torchvision's tensor `gaussian_blur`.
//! - `to_rgb` replicates a grey image to three channels after the colour operations (which
//!   are identities on grey), the same as converting to RGB at load time.
//!
//! Every draw comes from the [`Rng`] the caller passes, so a view is a pure function of it.

use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Random colour distortion: brightness, contrast and saturation factors drawn from
/// `[max(0, 1 - s), 1 + s]`, the hue shift from `[-hue, hue]` (at most 0.5), in a random
/// order, applied with probability `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jitter {
    pub brightness: f64,
    pub contrast: f64,
    #[serde(default)]
    pub saturation: f64,
    #[serde(default)]
    pub hue: f64,
    pub p: f64,
}

/// Resampling filter of the resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Bicubic,
}

/// The recipe of one view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// Output side in pixels.
    pub size: usize,
    /// RandomResizedCrop area fraction range.
    #[serde(default = "default_scale")]
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    #[serde(default = "default_ratio")]
    pub crop_ratio: [f64; 2],
    /// Resampling filter of the crop resize.
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Horizontal flip probability.
    #[serde(default)]
    pub hflip: f64,
    #[serde(default)]
    pub jitter: Option<Jitter>,
    /// RandomGrayscale probability (identity on grey images).
    #[serde(default)]
    pub grayscale: f64,
    /// GaussianBlur probability; sigma is drawn from `blur_sigma`.
    #[serde(default)]
    pub blur: f64,
    #[serde(default = "default_sigma")]
    pub blur_sigma: [f64; 2],
    /// Solarize (threshold 0.5) probability.
    #[serde(default)]
    pub solarize: f64,
    /// Replicate grey images to 3 channels (for RGB models).
    #[serde(default)]
    pub to_rgb: bool,
    /// Per-channel normalisation (one value per output channel, or one for all).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

fn default_scale() -> [f64; 2] {
    [0.08, 1.0]
}
fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_sigma() -> [f64; 2] {
    [0.1, 2.0]
}

impl ViewConfig {
    /// BYOL's view `view_idx` (0 or 1): crop, flip, jitter (0.4, 0.4, 0.2) p = 0.8, grayscale
    /// p = 0.2, blur p = 1.0 / 0.1, solarize p = 0 / 0.2 (Grill et al., table 6).
    pub fn byol(size: usize, view_idx: usize, mean: Vec<f32>, std: Vec<f32>) -> Self {
        let second = view_idx == 1;
        Self {
            size,
            crop_scale: default_scale(),
            crop_ratio: default_ratio(),
            interpolation: Interpolation::Bilinear,
            hflip: 0.5,
            jitter: Some(Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.2, hue: 0.1, p: 0.8 }),
            grayscale: 0.2,
            blur: if second { 0.1 } else { 1.0 },
            blur_sigma: default_sigma(),
            solarize: if second { 0.2 } else { 0.0 },
            to_rgb: false,
            mean,
            std,
        }
    }

    /// MoCo v2 (`main_moco.py --aug-plus`), both views alike: crop scale 0.2-1, jitter
    /// (0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale p = 0.2, blur sigma 0.1-2 p = 0.5, flip.
    pub fn moco_v2(size: usize, mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self {
            crop_scale: [0.2, 1.0],
            jitter: Some(Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, p: 0.8 }),
            blur: 0.5,
            solarize: 0.0,
            ..Self::byol(size, 0, mean, std)
        }
    }

    /// MAE / FCMAE / LoMaR pretraining: RandomResizedCrop(scale 0.2-1, bicubic) + flip only.
    pub fn masked_modeling(size: usize, mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self {
            crop_scale: [0.2, 1.0],
            interpolation: Interpolation::Bicubic,
            jitter: None,
            grayscale: 0.0,
            blur: 0.0,
            solarize: 0.0,
            ..Self::byol(size, 0, mean, std)
        }
    }

    /// Channels of the output for `c`-channel input.
    pub fn out_channels(&self, c: usize) -> usize {
        if self.to_rgb && c == 1 {
            3
        } else {
            c
        }
    }

    /// Checks every field; `channels` is the number of image channels it will see.
    pub fn validate(&self, channels: usize) -> Result<()> {
        let prob = |field: &'static str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(DataError::config(field, format!("probability {p} is outside [0, 1]")))
            }
        };
        if self.size == 0 {
            return Err(DataError::config("views.size", "must be positive"));
        }
        let [lo, hi] = self.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(DataError::config(
                "views.crop_scale",
                format!("{:?} is not 0 < lo <= hi <= 1", self.crop_scale),
            ));
        }
        let [lo, hi] = self.crop_ratio;
        if !(lo > 0.0 && lo <= hi) {
            return Err(DataError::config("views.crop_ratio", format!("{:?} is not 0 < lo <= hi", self.crop_ratio)));
        }
        prob("views.hflip", self.hflip)?;
        prob("views.grayscale", self.grayscale)?;
        prob("views.blur", self.blur)?;
        prob("views.solarize", self.solarize)?;
        if let Some(j) = &self.jitter {
            prob("views.jitter.p", j.p)?;
            if j.brightness < 0.0 || j.contrast < 0.0 || j.saturation < 0.0 {
                return Err(DataError::config("views.jitter", "strengths must be non-negative"));
            }
            if !(0.0..=0.5).contains(&j.hue) {
                return Err(DataError::config("views.jitter.hue", format!("{} is outside [0, 0.5]", j.hue)));
            }
        }
        if self.to_rgb && channels != 1 && channels != 3 {
            return Err(DataError::config(
                "views.to_rgb",
                format!("{channels}-channel images are neither grey nor RGB"),
            ));
        }
        let channels = self.out_channels(channels);
        let [lo, hi] = self.blur_sigma;
        if !(lo > 0.0 && lo <= hi) {
            return Err(DataError::config("views.blur_sigma", format!("{:?} is not 0 < lo <= hi", self.blur_sigma)));
        }
        for (field, v) in [("views.mean", &self.mean), ("views.std", &self.std)] {
            if v.len() != 1 && v.len() != channels {
                return Err(DataError::config(field, format!("{} values for {channels}-channel images", v.len())));
            }
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return Err(DataError::config("views.std", "values must be positive"));
        }
        Ok(())
    }

    /// One augmented view of a (c, h, w) u8 image: (c, size, size) f32, normalised.
    pub fn apply(&self, img: &[u8], c: usize, h: usize, w: usize, rng: &mut Rng) -> Vec<f32> {
        let crop = random_resized_crop_box(h, w, self.crop_scale, self.crop_ratio, rng);
        let flip = rng.bernoulli(self.hflip);
        let mut x = resize_crop(img, c, h, w, crop, self.size, flip, self.interpolation);
        let plane = self.size * self.size;
        if let Some(j) = &self.jitter {
            if rng.bernoulli(j.p) {
                color_jitter(&mut x, c, plane, j, rng);
            }
        }
        if c == 3 && rng.bernoulli(self.grayscale) {
            grayscale(&mut x, plane);
        }
        if rng.bernoulli(self.blur) {
            let sigma = rng.range(self.blur_sigma[0], self.blur_sigma[1]);
            gaussian_blur(&mut x, c, self.size, sigma);
        }
        if rng.bernoulli(self.solarize) {
            x.iter_mut().filter(|v| **v >= 0.5).for_each(|v| *v = 1.0 - *v);
        }
        if self.out_channels(c) != c {
            x = x.repeat(3);
        }
        normalize(&mut x, plane, &self.mean, &self.std);
        x
    }
}

/// The deterministic evaluation view: the whole image resized to `size`, normalised.
pub fn eval_view(img: &[u8], c: usize, h: usize, w: usize, size: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let full = CropBox { top: 0, left: 0, height: h, width: w };
    let mut x = resize_crop(img, c, h, w, full, size, false, Interpolation::Bilinear);
    normalize(&mut x, size * size, mean, std);
    x
}

/// The ImageNet evaluation view: torchvision's `Resize(resize)` (shorter side to `resize`, the
/// longer one `int(resize * long / short)`) then `CenterCrop(size)` (offsets
/// `int(round((n - size) / 2))`, Python's half-to-even rounding), normalised.
pub fn center_crop_view(
    img: &[u8],
    (c, h, w): (usize, usize, usize),
    resize: usize,
    size: usize,
    interpolation: Interpolation,
    (mean, std): (&[f32], &[f32]),
) -> Vec<f32> {
    // torchvision pads a crop larger than the image with zeros; selfsup's callers validate.
    assert!(size <= resize, "center_crop_view: crop {size} is larger than the resize {resize}");
    let (rh, rw) = if w <= h { (resize * h / w, resize) } else { (resize, resize * w / h) };
    let full = CropBox { top: 0, left: 0, height: h, width: w };
    let resized = resample(img, (c, h, w), full, (rh, rw), false, interpolation);
    let offset = |n: usize| ((n as f64 - size as f64) / 2.0).round_ties_even().max(0.0) as usize;
    let (top, left) = (offset(rh), offset(rw));
    let mut x = Vec::with_capacity(c * size * size);
    for ch in 0..c {
        for y in 0..size {
            x.extend_from_slice(&resized[(ch * rh + top + y) * rw + left..][..size]);
        }
    }
    normalize(&mut x, size * size, mean, std);
    x
}

/// A crop rectangle in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of the drawn area and
/// log-uniform aspect ratio, then a centre crop clamped to the ratio range.
pub fn random_resized_crop_box(h: usize, w: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut Rng) -> CropBox {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.range(scale[0], scale[1]);
        let aspect = rng.range(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return CropBox { top, left, height: ch, width: cw };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((w as f64 / ratio[0]).round() as usize).clamp(1, h))
    } else if in_ratio > ratio[1] {
        (((h as f64 * ratio[1]).round() as usize).clamp(1, w), h)
    } else {
        (w, h)
    };
    CropBox { top: (h - ch) / 2, left: (w - cw) / 2, height: ch, width: cw }
}

/// PIL's resampling filters: (support, kernel).
fn filter(interp: Interpolation) -> (f64, fn(f64) -> f64) {
    fn triangle(x: f64) -> f64 {
        (1.0 - x.abs()).max(0.0)
    }
    fn cubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    match interp {
        Interpolation::Bilinear => (1.0, triangle),
        Interpolation::Bicubic => (2.0, cubic),
    }
}

/// Taps of a 1-D resample of `n_in` source pixels to `n_out` (PIL `precompute_coeffs`): for
/// each output pixel the first source index and the normalised weights.
fn coefficients(n_in: usize, n_out: usize, interp: Interpolation) -> Vec<(usize, Vec<f32>)> {
    let (support, kernel) = filter(interp);
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..n_out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut w: Vec<f64> = (lo..hi).map(|x| kernel((x as f64 - center + 0.5) / filterscale)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// PIL rounds each pass of an 8-bit resample to the nearest level, clipping to [0, 255].
fn to_level(v: f32) -> f32 {
    v.round().clamp(0.0, 255.0)
}

/// Resizes the `crop` of a (c, h, w) u8 image to `size x size` as PIL's `crop().resize()`
/// does (module docs), optionally mirrored; values in [0, 1].
pub fn resize_crop(
    img: &[u8],
    c: usize,
    h: usize,
    w: usize,
    crop: CropBox,
    size: usize,
    flip: bool,
    interp: Interpolation,
) -> Vec<f32> {
    resample(img, (c, h, w), crop, (size, size), flip, interp)
}

/// [`resize_crop`] to an `out_h x out_w` output.
pub fn resample(
    img: &[u8],
    (c, h, w): (usize, usize, usize),
    crop: CropBox,
    (out_h, out_w): (usize, usize),
    flip: bool,
    interp: Interpolation,
) -> Vec<f32> {
    let horiz = coefficients(crop.width, out_w, interp);
    let vert = coefficients(crop.height, out_h, interp);
    let mut out = vec![0f32; c * out_h * out_w];
    let mut rows = vec![0f32; crop.height * out_w];
    for ch in 0..c {
        let src = &img[ch * h * w..(ch + 1) * h * w];
        // Horizontal pass over the crop's rows.
        for y in 0..crop.height {
            let row = &src[(crop.top + y) * w + crop.left..][..crop.width];
            for (x, (lo, wt)) in horiz.iter().enumerate() {
                let v: f32 = wt.iter().zip(&row[*lo..]).map(|(k, &p)| k * p as f32).sum();
                let x = if flip { out_w - 1 - x } else { x };
                rows[y * out_w + x] = to_level(v);
            }
        }
        // Vertical pass.
        let dst = &mut out[ch * out_h * out_w..(ch + 1) * out_h * out_w];
        for (y, (lo, wt)) in vert.iter().enumerate() {
            let d = &mut dst[y * out_w..(y + 1) * out_w];
            d.iter_mut().for_each(|v| *v = 0.0);
            for (k, r) in wt.iter().zip(*lo..) {
                d.iter_mut().zip(&rows[r * out_w..(r + 1) * out_w]).for_each(|(o, &v)| *o += k * v);
            }
            d.iter_mut().for_each(|v| *v = to_level(*v) / 255.0);
        }
    }
    out
}

fn luma(x: &[f32], plane: usize, i: usize) -> f32 {
    0.2989 * x[i] + 0.587 * x[plane + i] + 0.114 * x[2 * plane + i]
}

/// RandomGrayscale's conversion of an RGB image in place (three equal channels).
pub fn grayscale(x: &mut [f32], plane: usize) {
    for i in 0..plane {
        let g = luma(x, plane, i);
        x[i] = g;
        x[plane + i] = g;
        x[2 * plane + i] = g;
    }
}

fn blend(x: &mut [f32], other: impl Fn(usize) -> f32, f: f32) {
    for (i, v) in x.iter_mut().enumerate() {
        *v = (f * *v + (1.0 - f) * other(i)).clamp(0.0, 1.0);
    }
}

/// Rotates the hue of an RGB image by `shift` turns (torchvision `adjust_hue`, tensor path:
/// `_rgb2hsv`, shift, `_hsv2rgb`).
fn adjust_hue(x: &mut [f32], plane: usize, shift: f32) {
    for i in 0..plane {
        let (r, g, b) = (x[i], x[plane + i], x[2 * plane + i]);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let div = if eqc { 1.0 } else { cr };
        let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
        let hh = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = ((hh / 6.0 + 1.0).rem_euclid(1.0) + shift).rem_euclid(1.0);
        let v = maxc;
        let i6 = (h * 6.0).floor();
        let f = h * 6.0 - i6;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        let (r, g, b) = match (i6 as i32).rem_euclid(6) {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        (x[i], x[plane + i], x[2 * plane + i]) = (r, g, b);
    }
}

/// One colour operation with a fixed factor (torchvision's tensor semantics): 0 brightness,
/// 1 contrast, 2 saturation, 3 hue (a shift in turns).
pub fn adjust(x: &mut [f32], c: usize, plane: usize, op: usize, f: f32) {
    match op {
        0 => blend(x, |_| 0.0, f),
        1 => {
            let mean = if c == 3 {
                (0..plane).map(|i| luma(x, plane, i)).sum::<f32>() / plane as f32
            } else {
                x.iter().sum::<f32>() / x.len() as f32
            };
            blend(x, |_| mean, f);
        }
        2 if c == 3 => {
            let gray: Vec<f32> = (0..plane).map(|i| luma(x, plane, i)).collect();
            blend(x, |i| gray[i % plane], f);
        }
        3 if c == 3 => adjust_hue(x, plane, f),
        _ => {}
    }
}

fn color_jitter(x: &mut [f32], c: usize, plane: usize, j: &Jitter, rng: &mut Rng) {
    // As torchvision's `get_params`: the order first, then every configured factor.
    let mut order = [0usize, 1, 2, 3];
    rng.shuffle(&mut order);
    let mut factor = [None; 4];
    for (k, s) in [j.brightness, j.contrast, j.saturation].into_iter().enumerate() {
        if s > 0.0 {
            factor[k] = Some(rng.range((1.0 - s).max(0.0), 1.0 + s) as f32);
        }
    }
    if j.hue > 0.0 {
        factor[3] = Some(rng.range(-j.hue, j.hue) as f32);
    }
    for op in order {
        if let Some(f) = factor[op] {
            adjust(x, c, plane, op, f);
        }
    }
}

/// GaussianBlur of a square (c, size, size) image in place: kernel side ~10% of `size` (odd,
/// at least 3), reflect padding (torchvision's tensor `gaussian_blur`).
pub fn gaussian_blur(x: &mut [f32], c: usize, size: usize, sigma: f64) {
    let k = (((size as f64 * 0.1).round() as usize) | 1).max(3);
    let r = k / 2;
    let mut kernel: Vec<f32> =
        (0..k).map(|i| (-((i as f64 - r as f64).powi(2)) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let s: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|v| *v /= s);
    // Reflect padding, as torchvision.
    let reflect = |i: isize| -> usize {
        let n = size as isize;
        let i = if i < 0 { -i } else { i };
        (if i >= n { 2 * (n - 1) - i } else { i }).clamp(0, n - 1) as usize
    };
    let src_of: Vec<usize> = (0..size + 2 * r).map(|j| reflect(j as isize - r as isize)).collect();
    let mut padded = vec![0f32; size + 2 * r];
    let mut tmp = vec![0f32; size * size];
    for ch in 0..c {
        let p = &mut x[ch * size * size..(ch + 1) * size * size];
        // Horizontal: each row reflect-padded once, then a straight dot product per pixel.
        for y in 0..size {
            let row = &p[y * size..(y + 1) * size];
            padded.iter_mut().zip(&src_of).for_each(|(d, &j)| *d = row[j]);
            for (xx, out) in tmp[y * size..(y + 1) * size].iter_mut().enumerate() {
                *out = kernel.iter().zip(&padded[xx..xx + k]).map(|(a, b)| a * b).sum();
            }
        }
        // Vertical: whole rows scaled and added, which vectorises across x.
        for y in 0..size {
            let out = &mut p[y * size..(y + 1) * size];
            out.iter_mut().for_each(|v| *v = 0.0);
            for (t, &kv) in kernel.iter().enumerate() {
                let src = &tmp[src_of[y + t] * size..(src_of[y + t] + 1) * size];
                out.iter_mut().zip(src).for_each(|(o, &v)| *o += kv * v);
            }
        }
    }
}

fn normalize(x: &mut [f32], plane: usize, mean: &[f32], std: &[f32]) {
    for (ch, p) in x.chunks_mut(plane).enumerate() {
        let (m, s) = (mean[ch.min(mean.len() - 1)], std[ch.min(std.len() - 1)]);
        p.iter_mut().for_each(|v| *v = (*v - m) / s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_of_full_box_at_same_size_is_identity_and_flip_mirrors() {
        let img: Vec<u8> = (0..12).map(|i| i * 20).collect();
        let full = CropBox { top: 0, left: 0, height: 3, width: 4 };
        let x = resize_crop(&img, 1, 3, 4, CropBox { width: 3, ..full }, 3, false, Interpolation::Bilinear);
        assert_eq!(x[4], 100.0 / 255.0); // centre pixel (1, 1) of a 3x3 crop
        let bx = CropBox { top: 0, left: 0, height: 4, width: 3 };
        let y = resize_crop(&img, 1, 4, 3, bx, 3, true, Interpolation::Bicubic);
        let z = resize_crop(&img, 1, 4, 3, bx, 3, false, Interpolation::Bicubic);
        for r in 0..3 {
            for c in 0..3 {
                assert_eq!(y[r * 3 + c], z[r * 3 + 2 - c]);
            }
        }
        // 2x bilinear upscaling interpolates between pixels and rounds to levels as PIL does.
        let bx = CropBox { top: 0, left: 0, height: 1, width: 2 };
        let x = resize_crop(&[10, 20], 1, 1, 2, bx, 4, false, Interpolation::Bilinear);
        let want = [10.0, 13.0, 18.0, 20.0].map(|v: f32| v / 255.0);
        for (a, b) in x.iter().take(4).zip(want) {
            assert!((a - b).abs() < 1e-6, "{x:?}");
        }
    }

    #[test]
    fn crop_boxes_stay_inside_and_follow_the_scale() {
        let mut rng = Rng::new(1);
        let mut areas = 0.0;
        for _ in 0..2000 {
            let b = random_resized_crop_box(28, 28, [0.2, 1.0], default_ratio(), &mut rng);
            assert!(b.top + b.height <= 28 && b.left + b.width <= 28 && b.height > 0 && b.width > 0);
            areas += (b.height * b.width) as f64 / 784.0;
        }
        let mean = areas / 2000.0;
        assert!(mean > 0.5 && mean < 0.65, "mean area fraction {mean}");
    }

    #[test]
    fn views_are_pure_functions_of_the_rng_and_normalised() {
        let img: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        let cfg = ViewConfig::byol(16, 1, vec![0.5], vec![0.25]);
        cfg.validate(1).unwrap();
        let a = cfg.apply(&img, 1, 28, 28, &mut Rng::new(9));
        let b = cfg.apply(&img, 1, 28, 28, &mut Rng::new(9));
        let c = cfg.apply(&img, 1, 28, 28, &mut Rng::new(10));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 256);
        assert!(a.iter().all(|v| v.is_finite() && *v >= -2.0 - 1e-6 && *v <= 2.0 + 1e-6));
    }

    #[test]
    fn blur_preserves_constants_and_solarize_inverts_highs() {
        let mut x = vec![0.3f32; 3 * 10 * 10];
        gaussian_blur(&mut x, 3, 10, 1.5);
        assert!(x.iter().all(|v| (v - 0.3).abs() < 1e-5));
        let cfg = ViewConfig {
            solarize: 1.0,
            jitter: None,
            blur: 0.0,
            hflip: 0.0,
            crop_scale: [1.0, 1.0],
            crop_ratio: [1.0, 1.0],
            ..ViewConfig::byol(2, 0, vec![0.0], vec![1.0])
        };
        let v = cfg.apply(&[255, 255, 0, 0], 1, 2, 2, &mut Rng::new(0));
        assert_eq!(v, vec![0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn validate_names_the_field() {
        let mut cfg = ViewConfig::byol(16, 0, vec![0.5], vec![0.25]);
        cfg.blur = 1.5;
        assert!(cfg.validate(1).unwrap_err().to_string().contains("views.blur"));
        let cfg = ViewConfig::byol(16, 0, vec![0.5, 0.5], vec![0.25]);
        assert!(cfg.validate(1).unwrap_err().to_string().contains("views.mean"));
        let cfg = ViewConfig { crop_scale: [0.0, 1.0], ..ViewConfig::byol(16, 0, vec![0.5], vec![0.25]) };
        assert!(cfg.validate(1).unwrap_err().to_string().contains("crop_scale"));
    }
}
