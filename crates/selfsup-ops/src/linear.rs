//! A fully connected layer `y = x W^T + b` whose CPU forward is one GEMM into an output that
//! starts as the bias, with a backward.
//!
//! Why: candle's `Linear` is a matmul into a freshly zeroed buffer followed by a broadcast add
//! of the bias into a second fresh buffer. In a ViT-Tiny forward at 224 px (batch 32) the
//! zeroing, the extra pass and the page faults of the second buffer were about 6 % of the time
//! (perf: `memset` under `MatMul`, `clear_page_erms` and `binary_map_vec_par` under
//! `broadcast_add`). Here the output rows are initialised with the bias (or left for the GEMM to
//! write when there is none) and `gemm` accumulates `x W^T` into them, reading `W` transposed
//! through its strides.
//!
//! The backward is the textbook one (`dx = dy W`, `dW = dy^T x` through candle's matmul, so
//! exactly candle's; `db = sum_rows dy` as a parallel reduction, equal to candle's up to the
//! order of the float sums), and it skips the product of an operand that is not in the graph. Other devices and dtypes take candle's
//! `Linear` (the reference); a test holds the two together in values and gradients.

use candle_core::{CpuStorage, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{cpu_f32, is_cpu_f32, par_accumulate};

/// The fused CPU op; `forward`/`backward` are wired to `CustomOp2`/`CustomOp3` by
/// [`crate::cpu::impl_optional_bias_op`].
struct LinearOp;

impl LinearOp {
    fn forward(&self, x: &[f32], xl: &Layout, w: &[f32], bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let dims = xl.dims();
        let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear: x is a scalar".into()))?;
        if k == 0 || !w.len().is_multiple_of(k) {
            candle_core::bail!("linear: weight of {} values does not have rows of x's width {k}", w.len());
        }
        let (m, n) = (x.len() / k, w.len() / k);
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        if let Some(b) = bias {
            if b.len() != n {
                candle_core::bail!("linear: bias has {} values, the weight {n} rows", b.len());
            }
            // Uninitialised rows are filled before anything reads them.
            out.spare_capacity_mut().par_chunks_mut(n.max(1) * 64).for_each(|rows| {
                rows.chunks_mut(n)
                    .for_each(|r| r.iter_mut().zip(b).for_each(|(o, &v)| *o = std::mem::MaybeUninit::new(v)))
            });
        }
        let threads = rayon::current_num_threads();
        // SAFETY: `out` has capacity m*n and the GEMM writes every element (it reads them only
        // with a bias, after they were initialised above); x is m x k and w is n x k, contiguous.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
            );
            out.set_len(m * n);
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dim") = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Result<Vec<Option<Tensor>>> {
        // An operand outside the graph (a MoCo queue of keys, the input images) gets no
        // gradient: candle's matmul backward computes both products regardless, and the queue's
        // was a third of the GEMM work of a DenseCL loss (docs/benchmarks.md).
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        // Detached: a gradient that kept `x`'s graph would keep this step's whole forward alive
        // for as long as the optimizer holds the gradient (measured: +150 MB per MoCo step).
        let (x, w) = (x.detach(), w.detach());
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let g = grad.contiguous()?.reshape((m, n))?;
        let dx = if need_dx { Some(g.matmul(&w)?.reshape(x.shape())?) } else { None };
        let dw = if need_dw { Some(g.t()?.matmul(&x.reshape((m, k))?)?) } else { None };
        let mut out = vec![dx, dw];
        if with_bias {
            out.push(Some(sum_rows(&g, n)?));
        }
        Ok(out)
    }
}

crate::cpu::impl_optional_bias_op!(LinearOp, "linear");

/// The bias gradient `sum_rows g` of a contiguous (m, n) gradient, as a deterministic parallel
/// reduction over groups of rows ([`par_accumulate`]). candle's `sum(0)` walks the rows with a
/// stride of n on one thread: it was 8.5 % of a LoMaR step (ViT-Tiny, batch 32 at 64 px,
/// 3200 tokens; perf, `Map1::map` under this backward).
fn sum_rows(g: &Tensor, n: usize) -> Result<Tensor> {
    let sums = {
        let (s, l) = g.storage_and_layout();
        let g = cpu_f32(&s, l, "linear backward: grad")?;
        match g.len().checked_div(n) {
            Some(m) => {
                par_accumulate(m, n, |i, acc| acc.iter_mut().zip(&g[i * n..(i + 1) * n]).for_each(|(a, v)| *a += v))
            }
            None => Vec::new(),
        }
    };
    Tensor::from_vec(sums, n, g.device())
}

/// `y = x W^T + b` over the last dim of `x`; `w` is (out, in) as PyTorch stores it. Fused on
/// the CPU in f32; candle's `Linear` elsewhere.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 0.0], [1.0, 1.0], [0.0, 2.0]], &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, 0.0, -1.0], &Device::Cpu)?;
/// let y = selfsup_ops::linear::linear(&x, &w, Some(&b))?;
/// assert_eq!(y.to_vec2::<f32>()?, [[1.5, 3.0, 3.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let width = x.dims().last().copied().unwrap_or(0);
    if width != k {
        candle_core::bail!("linear: input of width {width} ({:?}) for a weight of shape ({n}, {k})", x.dims());
    }
    let fused = is_cpu_f32(x) && is_cpu_f32(w) && bias.is_none_or(is_cpu_f32) && w.is_contiguous();
    if !fused {
        return candle_nn::Linear::new(w.clone(), bias.cloned()).forward(x);
    }
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(w, LinearOp),
    }
}

/// A drop-in for `candle_nn::Linear` (same constructor and accessors) that runs [`linear`].
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` (out, in), optional `bias` (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear(xs, &self.weight, self.bias.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{compare_with_reference, randn};

    #[test]
    fn matches_candle_linear_in_values_and_gradients() {
        // 3-d input (a batch of token rows), with and without a bias.
        let inputs = [randn(&[3, 17, 24], 1), randn(&[40, 24], 2), randn(&[40], 3)];
        // 300 rows: the bias gradient's row groups hold several rows each.
        let many_rows = [randn(&[3, 100, 24], 4), inputs[1].clone(), inputs[2].clone()];
        compare_with_reference(
            &many_rows,
            |t| linear(&t[0], &t[1], Some(&t[2])),
            |t| candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0]),
            1e-5,
            1e-4,
            "linear+bias, 300 rows",
        );
        compare_with_reference(
            &inputs,
            |t| linear(&t[0], &t[1], Some(&t[2])),
            |t| candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0]),
            1e-5,
            1e-4,
            "linear+bias",
        );
        compare_with_reference(
            &inputs[..2],
            |t| linear(&t[0], &t[1], None),
            |t| candle_nn::Linear::new(t[1].clone(), None).forward(&t[0]),
            1e-5,
            1e-4,
            "linear",
        );
    }

    /// The weight's gradient carries no graph: one that did kept every step's forward alive
    /// while the optimizer held it (a training run grew by 150 MB per step until killed).
    #[test]
    fn gradients_do_not_hold_the_forward_graph() {
        let w = candle_core::Var::from_tensor(&randn(&[5, 24], 5)).unwrap();
        let b = candle_core::Var::from_tensor(&randn(&[5], 6)).unwrap();
        let x = randn(&[7, 24], 4).broadcast_mul(&w.as_tensor().sum_all().unwrap()).unwrap(); // x has a graph
        let loss = linear(&x, &w, Some(&b)).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(!grads.get(&w).unwrap().track_op() && !grads.get(&b).unwrap().track_op());
    }

    /// A constant operand (a queue of keys as the weight, input images as x) gets no gradient,
    /// and the other operand's gradient is the one candle's matmul gives.
    #[test]
    fn constant_operands_get_no_gradient() {
        let q = candle_core::Var::from_tensor(&randn(&[6, 8], 1)).unwrap();
        let bank = randn(&[50, 8], 2);
        let probe = randn(&[6, 50], 3);
        let grads = (linear(&q, &bank, None).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&bank).is_none());
        let want = probe.matmul(&bank).unwrap();
        assert!(
            (grads.get(&q).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
                < 1e-5
        );
        let w = candle_core::Var::from_tensor(&randn(&[5, 8], 4)).unwrap();
        let x = randn(&[6, 8], 5);
        let grads = linear(&x, &w, None).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none() && grads.get(&w).is_some());
    }

    #[test]
    fn takes_non_contiguous_inputs_and_names_bad_shapes() {
        let x = randn(&[24, 6], 4).t().unwrap();
        let w = randn(&[5, 24], 5);
        let want = x.contiguous().unwrap().matmul(&w.t().unwrap()).unwrap();
        let got = linear(&x, &w, None).unwrap();
        assert!((got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        let err = linear(&randn(&[2, 7], 6), &w, None).unwrap_err().to_string();
        assert!(err.contains("width 7") && err.contains("(5, 24)"), "{err}");
        let err = linear(&randn(&[2, 24], 6), &w, Some(&randn(&[4], 7))).unwrap_err().to_string();
        assert!(err.contains("bias has 4"), "{err}");
    }
}
