//! Batch normalisation over the last (channel) axis, composed from candle ops.
//!
//! candle's `batch_norm` wants channels on axis 1; selfsup's conv stacks run channels-last, and
//! the projector heads are (b, d) matrices, which are the same case with one spatial position.
//! Composed ops keep autograd exact (CANDLE.md 1.3: candle's fused norms drop gradients).
//! Statistics match PyTorch: the batch variance used to normalise is biased, the one folded
//! into the running estimate is unbiased.

use candle_core::{Result, Tensor};

/// Batch statistics of a normalisation in training mode.
pub struct BatchStats {
    /// (c,) mean over all positions.
    pub mean: Tensor,
    /// (c,) unbiased variance, for the running estimate.
    pub var_unbiased: Tensor,
}

/// Training-mode batch norm. xs: (..., c); weight, bias: (c,). Returns the normalised
/// activations and the (detached) batch statistics.
pub fn batch_norm_train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let c = *xs.dims().last().unwrap_or(&0);
    let m = xs.elem_count() / c.max(1);
    if m < 2 {
        candle_core::bail!("batch_norm: need more than one value per channel, got shape {:?}", xs.shape())
    }
    let flat = xs.reshape((m, c))?;
    let mean = flat.mean_keepdim(0)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    let scale = (&var + eps)?.sqrt()?.recip()?.broadcast_mul(&weight.reshape((1, c))?)?;
    let ys = centred.broadcast_mul(&scale)?.broadcast_add(&bias.reshape((1, c))?)?;
    let var_unbiased = (var.detach() * (m as f64 / (m - 1) as f64))?.reshape(c)?;
    let stats = BatchStats { mean: mean.detach().reshape(c)?, var_unbiased };
    ys.reshape(xs.shape())
        .map(|ys| (ys, stats))
}

/// Evaluation-mode batch norm with running statistics. xs: (..., c); all others (c,).
pub fn batch_norm_eval(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let scale = (running_var + eps)?.sqrt()?.recip()?.mul(weight)?;
    let shift = (bias - running_mean.mul(&scale)?)?;
    xs.broadcast_mul(&scale)?.broadcast_add(&shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};

    #[test]
    fn train_matches_candle_batch_norm_values_and_grads() {
        let dev = Device::Cpu;
        let mut r = crate::rng::Rng::new(5);
        let v: Vec<f32> = (0..2 * 3 * 4 * 5).map(|_| (r.normal() * 2.0 + 1.0) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 4, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::new(&[0.5f32, 1.5, -1.0, 2.0, 1.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, 0.3, -0.4, 0.0], &dev).unwrap()).unwrap();
        let (y, stats) = batch_norm_train(&x, &w, &b, 1e-5).unwrap();
        // Reference: candle's channels-first batch norm in training mode.
        let nchw = x.permute((0, 3, 1, 2)).unwrap();
        let rm = Var::zeros(5, candle_core::DType::F32, &dev).unwrap();
        let rv = Var::ones(5, candle_core::DType::F32, &dev).unwrap();
        let bn = candle_nn::BatchNorm::new(5, rm.as_tensor().clone(), rv.as_tensor().clone(), w.as_tensor().clone(), b.as_tensor().clone(), 1e-5).unwrap();
        let y_ref = candle_nn::ModuleT::forward_t(&bn, &nchw, true).unwrap().permute((0, 2, 3, 1)).unwrap();
        let d = (&y - &y_ref).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        let probe = Tensor::arange(0f32, 120., &dev).unwrap().reshape((2, 3, 4, 5)).unwrap().sin().unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let d = (g.get(v).unwrap() - g_ref.get(v).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-3);
        }
        // candle's running update uses momentum 0.1 from (0, 1): recover its batch stats.
        let rm_ref = (rm.as_tensor() / 0.1).unwrap();
        let dm = (&stats.mean - rm_ref).unwrap().abs().unwrap().max(0).unwrap();
        assert!(dm.to_scalar::<f32>().unwrap() < 1e-4);
        let rv_ref = ((rv.as_tensor() - 0.9).unwrap() / 0.1).unwrap();
        let dv = (&stats.var_unbiased - rv_ref).unwrap().abs().unwrap().max(0).unwrap();
        assert!(dv.to_scalar::<f32>().unwrap() < 1e-3);
    }

    #[test]
    fn eval_uses_running_stats() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let one = Tensor::new(&[1f32, 2.], &dev).unwrap();
        let zero = Tensor::new(&[0f32, 1.], &dev).unwrap();
        let y = batch_norm_eval(&x, &one, &zero, &zero, &Tensor::new(&[4f32, 1.], &dev).unwrap(), 0.0).unwrap();
        // channel 0: x / 2 * 1 + 0; channel 1: (x - 1) / 1 * 2 + 1
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![0.5, 3.0], vec![1.5, 7.0]]);
    }

    #[test]
    fn one_value_per_channel_is_an_error() {
        let x = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(batch_norm_train(&x, &w, &w, 1e-5).is_err());
    }
}
