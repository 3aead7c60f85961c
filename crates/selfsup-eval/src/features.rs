//! Feature extraction: pooled backbone features over a dataset, in evaluation mode.

use candle_core::{Device, Result, Tensor};
use selfsup_data::{loader::eval_batch, ImageSet};
use selfsup_models::Backbone;

/// How evaluation views are made: the whole image resized to `size`, then normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTransform {
    pub size: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Pooled features (n, d) of every image of `set`, `batch` images at a time.
pub fn extract(backbone: &dyn Backbone, set: &ImageSet, t: &EvalTransform, batch: usize, device: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(set.n.div_ceil(batch.max(1)));
    for start in (0..set.n).step_by(batch.max(1)) {
        let end = (start + batch).min(set.n);
        let xs = eval_batch(set, start, end, t.size, &t.mean, &t.std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let feats = backbone.forward_pooled(&xs.to_device(device)?, false)?.detach();
        out.push(feats.to_device(&Device::Cpu)?);
    }
    Tensor::cat(&out, 0)
}

/// Raw pixels in [0, 1] as features (n, c*h*w): the baseline any learned feature should beat.
pub fn raw_pixels(set: &ImageSet) -> Result<Tensor> {
    let v: Vec<f32> = set.pixels.iter().map(|&p| p as f32 / 255.0).collect();
    Tensor::from_vec(v, (set.n, set.c * set.h * set.w), &Device::Cpu)
}
