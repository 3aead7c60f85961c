//! Layers shared by the backbones, channels-last, with PyTorch weight names and layouts.
//!
//! `Conv2d` keeps the `(c_out, c_in, kh, kw)` weight and runs [`selfsup_ops::conv2d_nhwc`].
//! `BatchNorm` normalises the last axis, so it serves both 2-D maps `(b, h, w, c)` and
//! projector activations `(b, d)`; its running statistics are buffers (see `store`).

use candle_core::{Module, Result, Tensor, Var};
use candle_nn::{init, Init};
use selfsup_ops::norm::{batch_norm_eval, batch_norm_train};

use crate::store::Vb;

/// 2-D convolution on channels-last activations. Weight `weight`, optional `bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// timm's ResNet init: Kaiming normal, fan-out, ReLU gain; no bias.
    pub fn no_bias(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize, vb: Vb) -> Result<Self> {
        let hint = Init::Kaiming {
            dist: init::NormalOrUniform::Normal,
            fan: init::FanInOut::FanOut,
            non_linearity: init::NonLinearity::ReLU,
        };
        let weight = vb.params.get_with_hints((c_out, c_in, k, k), "weight", hint)?;
        Ok(Self { weight, bias: None, stride, padding })
    }

    /// From existing weight (c_out, c_in, k, k) and optional bias (c_out,) tensors.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self { weight, bias, stride, padding }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    /// xs: (b, h, w, c_in) -> (b, ho, wo, c_out)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = selfsup_ops::conv2d_nhwc(xs, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// Batch normalisation over the last axis (PyTorch `BatchNorm1d`/`BatchNorm2d` semantics,
/// momentum 0.1, eps 1e-5). Parameters `weight`, `bias`; buffers `running_mean`, `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    pub fn new(c: usize, vb: Vb) -> Result<Self> {
        Self::with_weight_init(c, 1.0, vb)
    }

    /// `gamma` is the initial scale; 0 makes a residual branch start as the identity.
    pub fn with_weight_init(c: usize, gamma: f64, vb: Vb) -> Result<Self> {
        let weight = vb.params.get_with_hints(c, "weight", Init::Const(gamma))?;
        let bias = vb.params.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&vb.buffers.get_with_hints(c, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.buffers.get_with_hints(c, "running_var", Init::Const(1.0))?)?;
        Ok(Self { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
    }

    /// xs: (..., c). In training mode normalises with batch statistics and folds them into
    /// the running estimates; in evaluation mode uses the running estimates.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, false)
    }

    /// `relu(forward_t(xs, train))`, fused on CPU.
    pub fn forward_relu_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, true)
    }

    fn forward_impl(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train {
            let ys = batch_norm_eval(xs, &self.weight, &self.bias, &self.running_mean, &self.running_var, self.eps)?;
            return if relu { ys.relu() } else { Ok(ys) };
        }
        let (ys, stats) = batch_norm_train(xs, &self.weight, &self.bias, self.eps, relu)?;
        let m = self.momentum;
        self.running_mean.set(&((self.running_mean.as_tensor() * (1.0 - m))? + (stats.mean * m)?)?)?;
        self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (stats.var_unbiased * m)?)?)?;
        Ok(ys)
    }
}

/// `Linear` with PyTorch's default init (Kaiming uniform, a = sqrt(5); bias U(+-1/sqrt(fan_in))).
pub fn linear(d_in: usize, d_out: usize, bias: bool, vb: Vb) -> Result<selfsup_ops::linear::Linear> {
    let bound = 1.0 / (d_in as f64).sqrt();
    let weight = vb.params.get_with_hints((d_out, d_in), "weight", Init::Uniform { lo: -bound, up: bound })?;
    let bias = if bias {
        Some(vb.params.get_with_hints(d_out, "bias", Init::Uniform { lo: -bound, up: bound })?)
    } else {
        None
    };
    Ok(selfsup_ops::linear::Linear::new(weight, bias))
}

/// LayerNorm over the last axis (eps as given) through `selfsup_ops::layer_norm`, which keeps
/// gradients (candle's fused LayerNorm drops them). Parameters `weight` (1) and `bias` (0).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(d: usize, eps: f64, vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.params.get_with_hints(d, "weight", Init::Const(1.0))?,
            bias: vb.params.get_with_hints(d, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        selfsup_ops::layer_norm::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// `Linear` with timm's transformer init: weights N(0, 0.02) (timm's trunc-normal, whose
/// truncation at +-2 never fires at that std), bias 0.
pub fn linear_trunc_normal(d_in: usize, d_out: usize, vb: Vb) -> Result<selfsup_ops::linear::Linear> {
    let w = vb.params.get_with_hints((d_out, d_in), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
    let b = vb.params.get_with_hints(d_out, "bias", Init::Const(0.0))?;
    Ok(selfsup_ops::linear::Linear::new(w, Some(b)))
}

/// Stochastic depth (timm `drop_path`, `scale_by_keep=True`): each sample's residual branch is
/// zeroed with probability `p` and kept ones are scaled by `1 / (1 - p)`. xs: (b, ...).
/// `key` and `layer` key the generator, so the drawn pattern is a pure function of them.
pub fn drop_path(xs: &Tensor, p: f64, key: u64, layer: u64) -> Result<Tensor> {
    let Some(scale) = drop_path_scales(xs.dim(0)?, p, key, layer) else { return Ok(xs.clone()) };
    let mut shape = vec![1usize; xs.rank()];
    shape[0] = scale.len();
    let scale = Tensor::from_vec(scale, shape, xs.device())?.to_dtype(xs.dtype())?;
    xs.broadcast_mul(&scale)
}

/// [`drop_path`] on a site matrix xs (n, c) whose sample `i` owns rows
/// `offsets[i]..offsets[i + 1]` (FCMAE's sparse encoder, MinkowskiDropPath): the same per-sample
/// draws as the dense form, so the sparse and masked-dense paths drop the same samples.
pub fn drop_path_rows(xs: &Tensor, offsets: &[usize], p: f64, key: u64, layer: u64) -> Result<Tensor> {
    let Some(scale) = drop_path_scales(offsets.len() - 1, p, key, layer) else { return Ok(xs.clone()) };
    let rows: Vec<f32> =
        offsets.windows(2).zip(&scale).flat_map(|(w, &s)| std::iter::repeat_n(s, w[1] - w[0])).collect();
    let n = rows.len();
    xs.broadcast_mul(&Tensor::from_vec(rows, (n, 1), xs.device())?.to_dtype(xs.dtype())?)
}

/// Per-sample factors of [`drop_path`]: 0 or `1 / (1 - p)`; `None` when `p <= 0` (identity).
fn drop_path_scales(b: usize, p: f64, key: u64, layer: u64) -> Option<Vec<f32>> {
    if p <= 0.0 {
        return None;
    }
    if p >= 1.0 {
        return Some(vec![0.0; b]);
    }
    let mut rng = selfsup_ops::rng::Rng::from_keys(&[key, 0xd409_9a7b, layer]);
    let keep = 1.0 - p;
    Some((0..b).map(|_| if rng.bernoulli(keep) { (1.0 / keep) as f32 } else { 0.0 }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn drop_path_drops_whole_samples_and_keeps_the_expectation() {
        let xs = Tensor::ones((4000, 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let ys = drop_path(&xs, 0.25, 7, 1).unwrap();
        let rows = ys.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        let mut kept = 0;
        for r in &rows {
            // A sample is dropped or kept as a whole.
            assert!(r.iter().all(|&v| v == r[0]) && (r[0] == 0.0 || (r[0] - 4.0 / 3.0).abs() < 1e-6), "{r:?}");
            kept += (r[0] != 0.0) as usize;
        }
        assert!((kept as f64 / 4000.0 - 0.75).abs() < 0.03, "{kept}");
        // Pure function of (key, layer); another layer draws another pattern.
        assert_eq!(ys.to_vec3::<f32>().unwrap(), drop_path(&xs, 0.25, 7, 1).unwrap().to_vec3::<f32>().unwrap());
        assert_ne!(ys.to_vec3::<f32>().unwrap(), drop_path(&xs, 0.25, 7, 2).unwrap().to_vec3::<f32>().unwrap());
        assert_eq!(drop_path(&xs, 0.0, 7, 1).unwrap().to_vec3::<f32>().unwrap(), xs.to_vec3::<f32>().unwrap());
    }
}
