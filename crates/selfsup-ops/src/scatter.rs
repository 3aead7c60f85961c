//! Differentiable row scatter-add: `out = init; out[ids[i]] += src[i]`, duplicates accumulating.
//!
//! Why: candle's `scatter_add` backward calls `scatter` with a full-size source and fails with
//! "shape mismatch in scatter (indexes, src)" whenever the index shape differs from `init`'s
//! (CANDLE.md 1.3). Row scatter-add is exactly candle's `index_add` along dim 0, whose backward
//! is correct (`d init = d out`, `d src = d out[ids]`, see candle's `backprop.rs`), so this
//! module validates the arguments and calls it. The validation matters: candle's CPU
//! `index_add` silently skips the id `u32::MAX` (a padding sentinel) and reports other
//! out-of-range ids without the position or the shapes. Here every id must be a row of `init`.
//! Works on every device and dtype `index_add` supports; the ids are copied to the CPU for the
//! range check.

use candle_core::{DType, Result, Tensor};

/// Adds row `src[i]` into row `ids[i]` of `init` and returns the result (`init` is not
/// modified); repeated ids accumulate. Gradients flow to `init` and `src`.
///
/// init: (m, ...); ids: (n,) u32, each `< m`; src: (n, ...) with the same trailing dims and
/// dtype as `init`. Returns (m, ...). Any mismatch or out-of-range id is an `Err` naming the
/// shapes or the offending id.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let init = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu)?;
/// let src = Tensor::new(&[[1f32, 1.], [2., 2.], [3., 3.]], &Device::Cpu)?;
/// let out = selfsup_ops::scatter_add_rows(&init, &ids, &src)?;
/// assert_eq!(out.to_vec2::<f32>()?, vec![vec![2., 2.], vec![0., 0.], vec![4., 4.]]);
/// # Ok(())
/// # }
/// ```
pub fn scatter_add_rows(init: &Tensor, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
    let what = "scatter_add_rows";
    if ids.dtype() != DType::U32 || ids.rank() != 1 {
        candle_core::bail!("{what}: ids must be a (n,) u32 tensor, got {:?} {:?}", ids.dtype(), ids.shape())
    }
    if init.rank() == 0 || src.rank() != init.rank() || src.dims()[1..] != init.dims()[1..] {
        candle_core::bail!(
            "{what}: src {:?} must be (n, ...) with the trailing dims of init {:?}",
            src.shape(),
            init.shape()
        )
    }
    let (n, m) = (ids.dim(0)?, init.dim(0)?);
    if src.dim(0)? != n {
        candle_core::bail!(
            "{what}: {n} ids for {} src rows (ids {:?}, src {:?})",
            src.dim(0)?,
            ids.shape(),
            src.shape()
        )
    }
    if src.dtype() != init.dtype() {
        candle_core::bail!("{what}: src is {:?} but init is {:?}", src.dtype(), init.dtype())
    }
    let host = ids.to_vec1::<u32>()?;
    if let Some((i, &id)) = host.iter().enumerate().find(|(_, &id)| id as usize >= m) {
        candle_core::bail!("{what}: ids[{i}] = {id} out of range for init {:?} ({m} rows)", init.shape())
    }
    init.index_add(&ids.contiguous()?, src, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_finite_differences, randn};
    use candle_core::{Device, Var};

    fn hand_loop(init: &Tensor, ids: &[u32], src: &Tensor) -> Tensor {
        let (m, n) = (init.dim(0).unwrap(), ids.len());
        let row = init.elem_count() / m;
        let mut out: Vec<f32> = init.flatten_all().unwrap().to_vec1().unwrap();
        let s: Vec<f32> = src.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..n {
            let r = ids[i] as usize;
            for j in 0..row {
                out[r * row + j] += s[i * row + j];
            }
        }
        Tensor::from_vec(out, init.shape(), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_a_hand_loop_with_duplicate_ids() {
        let ids_v = [3u32, 0, 3, 3, 1, 0];
        let ids = Tensor::new(&ids_v, &Device::Cpu).unwrap();
        for trailing in [vec![], vec![4], vec![2, 3]] {
            let init = randn(&[[5].as_slice(), &trailing].concat(), 1);
            let src = randn(&[[6].as_slice(), &trailing].concat(), 2);
            let out = scatter_add_rows(&init, &ids, &src).unwrap();
            assert_close(&out, &hand_loop(&init, &ids_v, &src), 1e-6, 0.0, &format!("trailing {trailing:?}"));
        }
    }

    #[test]
    fn grads_of_init_and_src_are_exact_with_duplicates() {
        let ids_v = [2u32, 2, 0, 2];
        let ids = Tensor::new(&ids_v, &Device::Cpu).unwrap();
        let init = Var::from_tensor(&randn(&[3, 2], 3)).unwrap();
        let src = Var::from_tensor(&randn(&[4, 2], 4)).unwrap();
        let probe = randn(&[3, 2], 5);
        let out = scatter_add_rows(&init, &ids, &src).unwrap();
        let g = (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        // d init = probe; d src[i] = probe[ids[i]].
        assert_close(g.get(&init).unwrap(), &probe, 0.0, 0.0, "grad init");
        assert_close(g.get(&src).unwrap(), &probe.index_select(&ids, 0).unwrap(), 0.0, 0.0, "grad src");
        check_finite_differences(
            &[init.as_tensor().clone(), src.as_tensor().clone()],
            |t| scatter_add_rows(&t[0], &ids, &t[1])?.sqr(),
            1e-2,
            1e-2,
            1,
            "scatter_add_rows squared",
        );
    }

    #[test]
    fn bad_ids_and_shapes_are_errors_naming_them() {
        let dev = Device::Cpu;
        let init = randn(&[3, 2], 0);
        let src = randn(&[2, 2], 1);
        let e = scatter_add_rows(&init, &Tensor::new(&[0u32, 3], &dev).unwrap(), &src).unwrap_err().to_string();
        assert!(e.contains("ids[1] = 3") && e.contains("[3, 2]"), "{e}");
        let e = scatter_add_rows(&init, &Tensor::new(&[u32::MAX, 0], &dev).unwrap(), &src).unwrap_err().to_string();
        assert!(e.contains("ids[0] = 4294967295"), "candle would skip this id silently: {e}");
        let e = scatter_add_rows(&init, &Tensor::new(&[0u32, 1, 2], &dev).unwrap(), &src).unwrap_err().to_string();
        assert!(e.contains("3 ids for 2 src rows"), "{e}");
        let e = scatter_add_rows(&init, &Tensor::new(&[0u32, 1], &dev).unwrap(), &randn(&[2, 3], 1));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let e = scatter_add_rows(&init, &Tensor::new(&[0i64, 1], &dev).unwrap(), &src).unwrap_err().to_string();
        assert!(e.contains("u32"), "{e}");
        let src64 = src.to_dtype(DType::F64).unwrap();
        assert!(scatter_add_rows(&init, &Tensor::new(&[0u32, 1], &dev).unwrap(), &src64).is_err());
    }
}
