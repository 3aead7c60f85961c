//! Test helpers shared by every op, model and objective test: deterministic inputs, fast-vs-
//! reference comparison of values and gradients, central finite differences, and the check that
//! every trainable parameter of a module receives a gradient.
//!
//! Why public and not `cfg(test)`: the models and objectives crates run the same checks on
//! whole networks (CANDLE.md 1.3: a fused candle op without a backward drops gradients
//! silently, so "every parameter got a non-zero gradient" is asserted for every model).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

/// A deterministic standard-normal f32 tensor on the CPU.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the data")
}

/// Largest absolute difference between two tensors of the same shape (as f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!("max_abs_diff: shapes differ: {:?} vs {:?}", a.shape(), b.shape())
    }
    if a.elem_count() == 0 {
        return Ok(0.0);
    }
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    d.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Panics unless `a` and `b` agree to `atol + rtol * max|b|`, naming `what` and the error.
pub fn assert_close(a: &Tensor, b: &Tensor, atol: f32, rtol: f32, what: &str) {
    let diff = max_abs_diff(a, b).unwrap_or_else(|e| panic!("{what}: {e}"));
    let scale = if b.elem_count() == 0 {
        0.0
    } else {
        b.to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let tol = atol + rtol * scale;
    assert!(diff <= tol, "{what}: max |diff| = {diff:e} > tolerance {tol:e} (max |reference| = {scale:e})");
}

/// Runs `fast` and `reference` on the same inputs and checks that outputs and the gradients of
/// `sum(out * probe)` with respect to every input agree. `probe` is a fixed random tensor, so
/// a backward that is wrong in any single element shows.
pub fn compare_with_reference(
    inputs: &[Tensor],
    fast: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    atol: f32,
    rtol: f32,
    what: &str,
) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).expect("var")).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = fast(&ts).unwrap_or_else(|e| panic!("{what}: fast path failed: {e}"));
    let y_ref = reference(&ts).unwrap_or_else(|e| panic!("{what}: reference failed: {e}"));
    assert_eq!(y.dims(), y_ref.dims(), "{what}: output shapes differ");
    assert_close(&y, &y_ref, atol, rtol, &format!("{what}: forward"));
    let probe = randn(y.dims(), 0x9e37).to_dtype(y.dtype()).expect("probe");
    let g = (y * &probe).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("fast backward");
    let g_ref = (y_ref * &probe).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("reference backward");
    for (i, v) in vars.iter().enumerate() {
        match (g.get(v), g_ref.get(v)) {
            (Some(a), Some(r)) => assert_close(a, r, atol, rtol, &format!("{what}: gradient of input {i}")),
            (None, Some(r)) => {
                let zero = r.zeros_like().expect("zeros");
                assert_close(&zero, r, atol, rtol, &format!("{what}: fast path gave no gradient for input {i}"))
            }
            (a, None) => assert!(a.is_none(), "{what}: reference has no gradient for input {i}"),
        }
    }
}

/// Checks the gradients of `sum(f(inputs) * probe)` against central differences (in f64) at
/// every `stride`-th element of every input. `eps` is the step; errors are relative to
/// `1 + |fd|`.
pub fn check_finite_differences(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    eps: f32,
    tol: f64,
    stride: usize,
    what: &str,
) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).expect("var")).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap_or_else(|e| panic!("{what}: {e}"));
    let probe = randn(y.dims(), 0x51ed);
    let eval = |ts: &[Tensor]| -> f64 {
        let y = f(ts).expect("forward");
        (y * &probe).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let grad: Vec<f32> = match g.get(v) {
            Some(t) => t.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; base.len()],
        };
        for idx in (0..base.len()).step_by(stride.max(1)) {
            let shifted = |delta: f32| {
                let mut d = base.clone();
                d[idx] += delta;
                let mut args = ts.clone();
                args[i] = Tensor::from_vec(d, v.shape(), v.device()).unwrap();
                eval(&args)
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            let err = (fd - grad[idx] as f64).abs();
            assert!(
                err <= tol * (1.0 + fd.abs()),
                "{what}: input {i} element {idx}: finite difference {fd} vs backward {}",
                grad[idx]
            );
        }
    }
}

/// Asserts that every named variable received a gradient with a non-zero element, and lists
/// every one that did not (a `*_no_bwd` op in the graph shows up here, not as an error).
pub fn assert_every_var_has_grad<'a>(vars: impl IntoIterator<Item = (&'a str, &'a Var)>, grads: &GradStore) {
    let mut missing = Vec::new();
    let mut total = 0;
    for (name, var) in vars {
        total += 1;
        let nonzero = grads.get(var).map(|g| {
            g.abs()
                .and_then(|a| a.flatten_all())
                .and_then(|a| a.max(0))
                .and_then(|m| m.to_dtype(DType::F32))
                .and_then(|m| m.to_scalar::<f32>())
                .map(|m| m > 0.0)
                .unwrap_or(false)
        });
        match nonzero {
            None => missing.push(format!("{name} (no gradient)")),
            Some(false) => missing.push(format!("{name} (all-zero gradient)")),
            Some(true) => {}
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {total} parameters got no usable gradient: {}",
        missing.len(),
        missing.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_catch_a_wrong_gradient() {
        let x = randn(&[3, 4], 1);
        // A "fast path" whose backward is wrong: detach drops the gradient.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            compare_with_reference(std::slice::from_ref(&x), |t| t[0].detach().sqr(), |t| t[0].sqr(), 1e-5, 1e-5, "sqr")
        }));
        assert!(res.is_err(), "a dropped gradient must fail the comparison");
        compare_with_reference(std::slice::from_ref(&x), |t| t[0].sqr(), |t| &t[0] * &t[0], 1e-5, 1e-5, "sqr");
        check_finite_differences(&[x], |t| t[0].sqr()?.exp(), 1e-3, 1e-2, 1, "exp(x^2)");
    }

    #[test]
    fn every_var_check_names_the_missing_one() {
        let a = Var::from_tensor(&randn(&[2], 1)).unwrap();
        let b = Var::from_tensor(&randn(&[2], 2)).unwrap();
        let g = a.as_tensor().sum_all().unwrap().backward().unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_every_var_has_grad([("a", &a), ("b", &b)], &g)
        }));
        let msg = *res.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("b (no gradient)") && !msg.contains("a ("), "{msg}");
    }
}

#[cfg(test)]
mod determinism {
    use super::*;

    /// Gradients of every op with a cross-thread reduction, computed in pools of 1, 2 and 5
    /// threads, must be bit-identical (a resumed training run repeats exactly only if they are).
    #[test]
    fn reductions_do_not_depend_on_the_thread_count() {
        let x = randn(&[3, 20, 18, 16], 1);
        let run = || -> Vec<Vec<f32>> {
            let vars: Vec<Var> = [
                x.clone(),
                randn(&[8, 16, 3, 3], 2),
                randn(&[16, 1, 7, 7], 3),
                randn(&[16], 4),
                randn(&[16], 5),
                randn(&[1, 10, 10], 6),
            ]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
            let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let conv = crate::conv2d_nhwc(&t[0], &t[1], 1, 1).unwrap();
            let dw = crate::dwconv::depthwise_conv2d_nhwc(&t[0], &t[2], Some(&t[3]), 1, 3).unwrap();
            let (bn, _) = crate::norm::batch_norm_train(&dw, &t[3], &t[4], 1e-5, true).unwrap();
            let ln = crate::layer_norm::layer_norm(&bn, &t[3], &t[4], 1e-6).unwrap();
            let qkv = ln
                .reshape((3 * 20 * 18 / 10, 10, 16))
                .unwrap()
                .narrow(2, 0, 12)
                .unwrap()
                .reshape((108, 10, 3, 1, 4))
                .unwrap();
            let attn = crate::attention::window_attention_qkv(
                &qkv,
                0.5,
                &crate::attention::PositionBias { bias: Some(t[5].clone()), ..Default::default() },
            )
            .unwrap();
            let loss = (conv.sqr().unwrap().sum_all().unwrap() + attn.sqr().unwrap().sum_all().unwrap()).unwrap();
            let g = loss.backward().unwrap();
            vars.iter().map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
        };
        let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let reference = pool(1).install(run);
        for n in [2, 5] {
            assert!(pool(n).install(run) == reference, "gradients differ with {n} threads");
        }
    }
}
