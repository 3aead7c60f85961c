//! Shared plumbing for the CPU kernels: storage access, per-thread reductions, and a macro that
//! compiles a hot loop twice (baseline x86-64 and AVX2+FMA) and picks one at run time.
//!
//! Why the macro: without `-C target-cpu`, Rust code is compiled for SSE2 (CANDLE.md 1.1), so
//! the channel loops of the depthwise and sparse convs would run 4 lanes wide on CPUs that have
//! 8. Runtime detection keeps one binary portable (the CPU machine and the GPU host differ).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// The f32 data of a contiguous CPU tensor, or an error naming `what` and the problem.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => candle_core::bail!("{what}: only f32 is supported on CPU, got {:?}", other.dtype()),
    }
}

/// The f32 data of a contiguous tensor's storage (from `Tensor::storage_and_layout`), or an
/// error naming `what` when it is not on the CPU, not f32 or not contiguous.
pub(crate) fn cpu_f32<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => candle_core::bail!("{what} is not on the CPU"),
    }
}

/// True when the fast CPU kernel applies: f32 on the CPU. Other dtypes are converted to f32 by
/// the public wrappers; other devices take the reference path or, for the ops in
/// `crate::has_kernel`, a CUDA kernel.
pub(crate) fn is_cpu_f32(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Runs a CPU-f32-only op `f` on `xs` from any device and dtype: moves and converts the input,
/// then converts the result back. `to_device` and `to_dtype` have backwards, so gradients flow.
pub(crate) fn on_cpu_f32(
    xs: &candle_core::Tensor,
    f: impl FnOnce(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    use candle_core::{DType, Device};
    if is_cpu_f32(xs) {
        return f(xs);
    }
    let (device, dtype) = (xs.device().clone(), xs.dtype());
    f(&xs.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?.to_dtype(dtype)?.to_device(&device)
}

/// A buffer of `n` f32 that the caller fills completely before reading: an output or scratch
/// that a GEMM without accumulation, an im2col or an element-wise kernel overwrites. A zeroed
/// buffer costs a memset the size of the tensor (5 % of a ResNet-18 training step on the CPU,
/// most of it in per-task im2col scratch), which such a kernel then overwrites. candle's own CPU
/// backend allocates its outputs the same way (`alloc_uninit`).
///
/// In this crate's unit tests the buffer is NaN instead, so a kernel that leaves an element
/// unwritten fails its comparison with the reference.
///
/// # Safety
/// Every element must be written before it is read.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn alloc_uninit(n: usize) -> Vec<f32> {
    if cfg!(test) {
        return vec![f32::NAN; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; the caller writes every element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// A raw pointer that may cross rayon tasks; every task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only to hand disjoint per-window regions of one buffer to different tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// `dst (m x n) = [dst +] beta * lhs (m x k) . rhs (k x n)`, all strided (row stride, column
/// stride); single-threaded, or on every rayon thread when `parallel` (gemm splits the output
/// tiles between threads; each element's sum over `k` runs in the same order either way, so the
/// result does not depend on the thread count).
///
/// # Safety
/// Every pointer must be valid for the elements its strides and sizes address, and `dst` must
/// not overlap `lhs` or `rhs`.
pub(crate) unsafe fn mm_par(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    beta: f32,
    parallel: bool,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            beta,
            false,
            false,
            false,
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
        )
    }
}

/// Item groups of every deterministic reduction: a fixed count, independent of the number of
/// threads and of how rayon happens to split the work.
pub(crate) const GROUPS: usize = 64;

/// Sums `len`-long accumulators over `n` items, deterministically: the items are cut into
/// [`GROUPS`] contiguous groups, each group folds its items in order into its own buffer (with
/// its own `scratch`), and the group buffers are added in group order. Float sums then do not
/// depend on thread scheduling, so a training run (and a resumed one) is bit for bit repeatable;
/// rayon's `fold`/`reduce` combine in whatever order the work was stolen.
pub(crate) fn par_accumulate_with<S>(
    n: usize,
    len: usize,
    scratch: impl Fn() -> S + Sync,
    f: impl Fn(usize, &mut S, &mut [f32]) + Sync,
) -> Vec<f32> {
    let per = n.div_ceil(GROUPS).max(1);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|g| {
            let (mut acc, mut sc) = (vec![0f32; len], scratch());
            for i in g * per..((g + 1) * per).min(n) {
                f(i, &mut sc, &mut acc);
            }
            acc
        })
        .collect();
    parts.into_iter().fold(vec![0f32; len], sum_vecs)
}

/// [`par_accumulate_with`] without scratch.
pub(crate) fn par_accumulate(n: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    par_accumulate_with(n, len, || (), |i, _, acc| f(i, acc))
}

/// Adds `b` into `a`: the `reduce` step of every per-thread gradient accumulation.
pub(crate) fn sum_vecs(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}

/// Implements `CustomOp2` (x, w) and `CustomOp3` (x, w, bias) for a conv-like op type with
/// `fn forward(&self, x: &[f32], x_layout: &Layout, w: &[f32], bias: Option<&[f32]>)` and
/// `fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, with_bias: bool) -> Vec<Option<Tensor>>`
/// (gradients of x, w and, with a bias, the bias; `None` for one not needed), so each op is
/// written once for both forms.
macro_rules! impl_optional_bias_op {
    ($t:ty, $name:literal) => {
        $crate::cpu::impl_optional_bias_op!(@impl $t, $name, {}, {});
    };
    // With `cuda`: the type's `cuda_forward(s1, l1, s2, l2, Option<(s3, l3)>)` serves CUDA.
    ($t:ty, $name:literal, cuda) => {
        $crate::cpu::impl_optional_bias_op!(@impl $t, $name, {
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CudaStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                self.cuda_forward(s1, l1, s2, l2, None)
            }
        }, {
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CudaStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CudaStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                self.cuda_forward(s1, l1, s2, l2, Some((s3, l3)))
            }
        });
    };
    (@impl $t:ty, $name:literal, {$($cuda2:tt)*}, {$($cuda3:tt)*}) => {
        impl candle_core::CustomOp2 for $t {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let x = $crate::cpu::f32_slice(s1, l1, concat!($name, " x"))?;
                self.forward(x, l1, $crate::cpu::f32_slice(s2, l2, concat!($name, " w"))?, None)
            }

            $($cuda2)*

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
                let mut g = self.backward(x, w, grad, false)?.into_iter();
                Ok((g.next().flatten(), g.next().flatten()))
            }
        }

        impl candle_core::CustomOp3 for $t {
            fn name(&self) -> &'static str {
                concat!($name, "-bias")
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let x = $crate::cpu::f32_slice(s1, l1, concat!($name, " x"))?;
                let w = $crate::cpu::f32_slice(s2, l2, concat!($name, " w"))?;
                self.forward(x, l1, w, Some($crate::cpu::f32_slice(s3, l3, concat!($name, " bias"))?))
            }

            $($cuda3)*

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                w: &candle_core::Tensor,
                _b: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                let mut g = self.backward(x, w, grad, true)?.into_iter();
                Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
            }
        }
    };
}
pub(crate) use impl_optional_bias_op;

/// `out[i] += x[i] * w[i]` over the common length; written to auto-vectorise.
#[inline(always)]
pub(crate) fn fma_into(out: &mut [f32], x: &[f32], w: &[f32]) {
    let n = out.len().min(x.len()).min(w.len());
    let (out, x, w) = (&mut out[..n], &x[..n], &w[..n]);
    for i in 0..n {
        out[i] += x[i] * w[i];
    }
}

/// Defines `fn name(args)` whose body is compiled twice, for baseline x86-64 and for
/// AVX2+FMA, and dispatches on the CPU's features at run time. Helpers the body calls should be
/// `#[inline(always)]` so that they are compiled into both versions.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the running CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `exp(x)` to within about 2 ulp for x in [-87, 88] (0 below, where the true value is
/// subnormal; clamped above), branch-free so that loops over it vectorise: libm's `expf` is a scalar call
/// and was a fifth of a softmax-bound attention step. Cody-Waite reduction x = n ln2 + r with
/// |r| <= ln2 / 2, a degree-6 Taylor polynomial for e^r (error below 2e-7 relative), and 2^n
/// built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // n also sits in the low mantissa bits of t: integer ops only (a float-to-int `as` cast
    // saturates, which the compiler partly scalarises).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(ni.wrapping_add(127) << 23);
    // A select, not a branch: the loop still vectorises.
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

multiversion! {
    /// `row[i] = exp(row[i] - m)`, returning the sum (eight lanes).
    pub(crate) fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for ch in &mut chunks {
            for l in 0..8 {
                ch[l] = exp_fast(ch[l] - m);
                acc[l] += ch[l];
            }
        }
        let mut tail = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_fast(*v - m);
            tail += *v;
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// The largest value of `row` (-inf when empty; NaNs are skipped), in eight lanes.
    pub(crate) fn row_max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for ch in &mut chunks {
            for l in 0..8 {
                acc[l] = if ch[l] > acc[l] { ch[l] } else { acc[l] };
            }
        }
        chunks.remainder().iter().chain(&acc).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

multiversion! {
    /// `sum_i exp((row[i] - m) * s)`, reading `row` only (eight lanes).
    pub(crate) fn exp_scaled_sum(row: &[f32], m: f32, s: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for ch in &mut chunks {
            for l in 0..8 {
                acc[l] += exp_fast((ch[l] - m) * s);
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| exp_fast((v - m) * s)).sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!(exp_fast(f32::NEG_INFINITY) == 0.0 && exp_fast(-100.0) == 0.0 && exp_fast(0.0) == 1.0);
        let mut row = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        let s = exp_shifted_sum(&mut row, 10.0);
        let want: f32 = (1..=10).map(|i| ((i - 10) as f32).exp()).sum();
        assert!((s - want).abs() < 1e-5 && (row[9] - 1.0).abs() < 1e-7, "{s} vs {want}");
    }

    #[test]
    fn row_max_and_exp_scaled_sum_match_the_scalar_loops() {
        // 19 values: two full lanes of eight and a tail of three. The whole row's maximum is in
        // the tail (index 17); the first 16 values' is in the lanes (index 8).
        let mut row: Vec<f32> = (0..19).map(|i| ((i * 7) % 19) as f32 * 0.5 - 3.0).collect();
        row[17] = 7.5;
        assert_eq!(row_max(&row), 7.5);
        assert_eq!(row_max(&row[..16]), 6.0);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
        let want: f32 = row.iter().map(|v| ((v - 1.0) * 5.0).exp()).sum();
        let got = exp_scaled_sum(&row, 1.0, 5.0);
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
    }
}
