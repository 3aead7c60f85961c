//! selfsup-kernels: CUDA kernels for the ops of selfsup-ops that dominate a step on a GPU,
//! reusable without candle.
//!
//! - **Submanifold sparse depthwise conv** (FCMAE's encoder) over the visible sites of a masked
//!   map, through the gather map of the CPU op (`selfsup_ops::sparse::Neighbours`: (n, k*k) u32
//!   rows, `0xffffffff` for a masked neighbour), forward, input and weight/bias gradients, and
//!   the gathers/scatters between site matrices and dense maps (`kernels/sparse.cu`).
//! - **Dense depthwise conv** on channels-last maps, any kernel, stride, padding and channel
//!   multiplier, forward and both gradients (`kernels/dwconv.cu`).
//! - **Windowed attention** with a per-head bias, Swin window masks and LoMaR's contextual key
//!   bias: online-softmax forward that saves only the row log-sum-exp, and a flash-style
//!   backward that recomputes the attention from it (`kernels/attention.cu`).
//!
//! Every kernel takes f32, bf16 or f16 tensors and accumulates in f32; every sum runs in a fixed
//! order (no atomics), so results are deterministic.
//!
//! The sources are embedded ([`source`]) and compiled at run time by NVRTC for the device's
//! architecture (feature `cuda`, module [`cuda`]): building needs no CUDA toolkit, and the
//! binary links no CUDA library (cudarc loads libcuda and libnvrtc when first used;
//! [`cuda::available`] says whether they are there). [`launch`] holds the launch
//! configurations and argument structs in plain Rust. Feature `host-emulation` compiles the
//! same sources as C++ and runs them on an emulated grid (module [`emulation`]), which is how
//! the kernels are checked against the CPU ops on machines without a GPU.
//!
//! Using a kernel without candle (feature `cuda`):
//! ```no_run
//! # #[cfg(feature = "cuda")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use selfsup_kernels::cuda::Kernels;
//! let ctx = cudarc::driver::CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let kernels = Kernels::new(ctx)?;
//! // Two visible sites of a 1x1x2 map, 4 channels, a 3x3 kernel of ones: each site sees both.
//! let nb: Vec<u32> = (0..2).flat_map(|s| (0..9).map(move |t| match t { 4 => s, 3 if s == 1 => 0, 5 if s == 0 => 1, _ => u32::MAX })).collect();
//! let x = stream.clone_htod(&[1f32; 8])?;
//! let w = stream.clone_htod(&[1f32; 36])?;
//! let nb = stream.clone_htod(&nb)?;
//! let mut y = stream.alloc_zeros::<f32>(8)?;
//! let (x, w, nb) = (x.as_view(), w.as_view(), nb.as_view());
//! kernels.sparse_dw_fwd(&stream, &x, &w, None, &nb, &mut y.as_view_mut(), 2, 4, 9, false)?;
//! assert_eq!(stream.clone_dtoh(&y)?, vec![2f32; 8]);
//! # Ok(()) }
//! # #[cfg(not(feature = "cuda"))]
//! # fn main() {}
//! ```

pub mod launch;
pub mod source;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "host-emulation")]
pub mod emulation;

pub use source::{Dtype, Element, Module};

/// What can go wrong before or during a launch.
#[derive(Debug)]
pub enum KernelError {
    /// Shapes or arguments the kernels do not take; the message names the value.
    Shape(String),
    /// libcuda or libnvrtc is missing, or the device refused something.
    Cuda(String),
    /// NVRTC rejected a module; the message carries its log.
    Compile { module: String, log: String },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Shape(m) => write!(f, "{m}"),
            KernelError::Cuda(m) => write!(f, "CUDA: {m}"),
            KernelError::Compile { module, log } => write!(f, "NVRTC could not compile {module}:\n{log}"),
        }
    }
}

impl std::error::Error for KernelError {}
