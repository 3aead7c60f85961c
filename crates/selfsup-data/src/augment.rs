//! The SSL augmentations on u8 images, producing normalised f32 views.
//!
//! Semantics follow torchvision (`RandomResizedCrop`, `RandomHorizontalFlip`, `ColorJitter`,
//! `RandomGrayscale`, `GaussianBlur`, `RandomSolarize`, `Normalize`) as used by the BYOL and
//! MoCo v2 recipes (METHODS.md 1.1, 1.8). Differences, on purpose:
//! - Resizing is bilinear with half-pixel centres and no antialiasing (torchvision's tensor
//!   path with `antialias=False`); SSL crops are mostly upscaled, where the two agree.
//! - ColorJitter applies brightness, contrast and saturation in a random order; hue is not
//!   implemented yet (the Fashion-MNIST recipes are grey, where hue is the identity).
//! - The blur kernel is ~10% of the output size (BYOL's 23 px at 224 px), odd, at least 3.
//!
//! Every draw comes from the [`Rng`] the caller passes, so a view is a pure function of it.

use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Random colour distortion: factors drawn from `[max(0, 1 - s), 1 + s]`, applied with
/// probability `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jitter {
    pub brightness: f64,
    pub contrast: f64,
    #[serde(default)]
    pub saturation: f64,
    pub p: f64,
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
    /// Per-channel normalisation (one value per channel, or one for all).
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
            hflip: 0.5,
            jitter: Some(Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.2, p: 0.8 }),
            grayscale: 0.2,
            blur: if second { 0.1 } else { 1.0 },
            blur_sigma: default_sigma(),
            solarize: if second { 0.2 } else { 0.0 },
            mean,
            std,
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
        }
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
        let mut x = resize_crop(img, c, h, w, crop, self.size, flip);
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
        normalize(&mut x, plane, &self.mean, &self.std);
        x
    }
}

/// The deterministic evaluation view: the whole image resized to `size`, normalised.
pub fn eval_view(img: &[u8], c: usize, h: usize, w: usize, size: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let mut x = resize_crop(img, c, h, w, CropBox { top: 0, left: 0, height: h, width: w }, size, false);
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

/// Bilinear resize of `crop` to `size x size` (half-pixel centres, edge clamp), u8 -> [0, 1].
pub fn resize_crop(img: &[u8], c: usize, h: usize, w: usize, crop: CropBox, size: usize, flip: bool) -> Vec<f32> {
    let mut out = vec![0f32; c * size * size];
    let sy = crop.height as f32 / size as f32;
    let sx = crop.width as f32 / size as f32;
    // Precompute the horizontal taps once per row of output columns.
    let taps: Vec<(usize, usize, f32)> = (0..size)
        .map(|dx| {
            let dx = if flip { size - 1 - dx } else { dx };
            let fx = ((dx as f32 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (fx.floor() as usize).min(crop.width - 1);
            let x1 = (x0 + 1).min(crop.width - 1);
            (crop.left + x0, crop.left + x1, fx - x0 as f32)
        })
        .collect();
    for ch in 0..c {
        let src = &img[ch * h * w..(ch + 1) * h * w];
        for dy in 0..size {
            let fy = ((dy as f32 + 0.5) * sy - 0.5).max(0.0);
            let y0 = (fy.floor() as usize).min(crop.height - 1);
            let y1 = (y0 + 1).min(crop.height - 1);
            let ty = fy - y0 as f32;
            let (r0, r1) = ((crop.top + y0) * w, (crop.top + y1) * w);
            let dst = &mut out[(ch * size + dy) * size..][..size];
            for (d, &(x0, x1, tx)) in dst.iter_mut().zip(&taps) {
                let top = src[r0 + x0] as f32 * (1.0 - tx) + src[r0 + x1] as f32 * tx;
                let bot = src[r1 + x0] as f32 * (1.0 - tx) + src[r1 + x1] as f32 * tx;
                *d = (top * (1.0 - ty) + bot * ty) / 255.0;
            }
        }
    }
    out
}

fn luma(x: &[f32], plane: usize, i: usize) -> f32 {
    0.299 * x[i] + 0.587 * x[plane + i] + 0.114 * x[2 * plane + i]
}

fn grayscale(x: &mut [f32], plane: usize) {
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

fn color_jitter(x: &mut [f32], c: usize, plane: usize, j: &Jitter, rng: &mut Rng) {
    let mut order = [0usize, 1, 2];
    rng.shuffle(&mut order);
    for op in order {
        let s = [j.brightness, j.contrast, j.saturation][op];
        if s == 0.0 {
            continue;
        }
        let f = rng.range((1.0 - s).max(0.0), 1.0 + s) as f32;
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
            _ if c == 3 => {
                let gray: Vec<f32> = (0..plane).map(|i| luma(x, plane, i)).collect();
                blend(x, |i| gray[i % plane], f);
            }
            _ => {}
        }
    }
}

fn gaussian_blur(x: &mut [f32], c: usize, size: usize, sigma: f64) {
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
    let mut tmp = vec![0f32; size * size];
    for ch in 0..c {
        let p = &mut x[ch * size * size..(ch + 1) * size * size];
        for y in 0..size {
            for xx in 0..size {
                tmp[y * size + xx] =
                    (0..k).map(|t| kernel[t] * p[y * size + reflect(xx as isize + t as isize - r as isize)]).sum();
            }
        }
        for y in 0..size {
            for xx in 0..size {
                p[y * size + xx] =
                    (0..k).map(|t| kernel[t] * tmp[reflect(y as isize + t as isize - r as isize) * size + xx]).sum();
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
        let x = resize_crop(&img, 1, 3, 4, CropBox { width: 3, ..full }, 3, false);
        assert_eq!(x[4], 100.0 / 255.0); // centre pixel (1, 1) of a 3x3 crop
        let y = resize_crop(&img, 1, 4, 3, CropBox { top: 0, left: 0, height: 4, width: 3 }, 3, true);
        let z = resize_crop(&img, 1, 4, 3, CropBox { top: 0, left: 0, height: 4, width: 3 }, 3, false);
        for r in 0..3 {
            for c in 0..3 {
                assert_eq!(y[r * 3 + c], z[r * 3 + 2 - c]);
            }
        }
        // Upscaling a constant image stays constant; 2x upscaling interpolates between pixels.
        let x = resize_crop(&[10, 20], 1, 1, 2, CropBox { top: 0, left: 0, height: 1, width: 2 }, 4, false);
        let want = [10.0, 12.5, 17.5, 20.0].map(|v: f32| v / 255.0);
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
