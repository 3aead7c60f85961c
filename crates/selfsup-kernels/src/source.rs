//! The CUDA C sources, embedded, and the names of their entry points.
//!
//! Each module is `kernels/common.cuh` followed by one `kernels/*.cu` file; the attention module
//! is compiled once per head dim (`-DHEAD_DIM=d` is written into the source, so the text alone
//! names the specialisation).

/// Element types of the kernels' tensors (accumulation is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// The suffix of this type's entry points.
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// Host element types with a kernel instantiation.
pub trait Element: Copy + Default + Send + Sync + 'static {
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}

pub const COMMON: &str = include_str!("../../../kernels/common.cuh");
pub const SPARSE: &str = include_str!("../../../kernels/sparse.cu");
pub const DWCONV: &str = include_str!("../../../kernels/dwconv.cu");
pub const ATTENTION: &str = include_str!("../../../kernels/attention.cu");

/// One NVRTC compilation unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// Submanifold sparse depthwise conv, gather/scatter of site rows (`kernels/sparse.cu`).
    Sparse,
    /// Dense depthwise conv (`kernels/dwconv.cu`).
    DwConv,
    /// Windowed attention for one head dim (`kernels/attention.cu`).
    Attention { head_dim: usize },
}

/// Head dims the CI compile check covers (ViT/LoMaR 64, Swin/CvT 32, small tests 8 and 16).
pub const CHECKED_HEAD_DIMS: [usize; 4] = [8, 16, 32, 64];

impl Module {
    /// Every module the CI compile check builds.
    pub fn checked() -> Vec<Module> {
        let mut m = vec![Module::Sparse, Module::DwConv];
        m.extend(CHECKED_HEAD_DIMS.iter().map(|&head_dim| Module::Attention { head_dim }));
        m
    }

    /// A name unique per specialisation (the module cache key and the NVRTC program name).
    pub fn name(&self) -> String {
        match self {
            Module::Sparse => "selfsup_sparse".into(),
            Module::DwConv => "selfsup_dwconv".into(),
            Module::Attention { head_dim } => format!("selfsup_attention_d{head_dim}"),
        }
    }

    /// The full source NVRTC compiles.
    pub fn source(&self) -> String {
        match self {
            Module::Sparse => format!("{COMMON}\n{SPARSE}"),
            Module::DwConv => format!("{COMMON}\n{DWCONV}"),
            Module::Attention { head_dim } => format!("#define HEAD_DIM {head_dim}\n{COMMON}\n{ATTENTION}"),
        }
    }

    /// The entry point `kernel` for element type `dtype` (ignored by the dtype-free
    /// `attn_table_reduce`).
    pub fn entry(&self, kernel: &str, dtype: Dtype) -> String {
        match self {
            Module::Attention { head_dim } if kernel == "attn_table_reduce" => format!("{kernel}_d{head_dim}"),
            Module::Attention { head_dim } => format!("{kernel}_{}_d{head_dim}", dtype.suffix()),
            _ => format!("{kernel}_{}", dtype.suffix()),
        }
    }

    /// Every entry point the module defines.
    pub fn entries(&self) -> Vec<String> {
        let kernels: &[&str] = match self {
            Module::Sparse => {
                &["sparse_dw_fwd", "sparse_dw_wgrad_partial", "sparse_dw_wgrad_reduce", "gather_rows", "scatter_rows"]
            }
            Module::DwConv => &["dw_fwd", "dw_dx", "dw_wgrad_partial", "dw_wgrad_reduce"],
            Module::Attention { .. } => &["attn_fwd", "attn_bwd_dq", "attn_bwd_dkv", "attn_bwd_pairs"],
        };
        let mut out: Vec<String> =
            Dtype::ALL.iter().flat_map(|&dt| kernels.iter().map(move |k| self.entry(k, dt))).collect();
        if matches!(self, Module::Attention { .. }) {
            out.push(self.entry("attn_table_reduce", Dtype::F32));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry name the launcher asks for is defined by the source it compiles: checked on
    /// the text, so a renamed kernel fails here before it fails on a GPU.
    #[test]
    fn entry_points_are_defined_by_their_sources() {
        let defined = |src: &str, kernel: &str| src.contains(&format!("ENTRY({kernel}_##sfx"));
        for m in [Module::Sparse, Module::DwConv] {
            let src = m.source();
            for e in m.entries() {
                let kernel = e.rsplit_once('_').unwrap().0;
                assert!(defined(&src, kernel), "{} does not define {e}", m.name());
            }
        }
        let att = Module::Attention { head_dim: 64 };
        assert!(att.source().starts_with("#define HEAD_DIM 64\n"));
        for k in ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkv", "attn_bwd_pairs"] {
            assert!(att.source().contains(&format!("ENTRY(NAME({k}_, sfx)")), "{k}");
        }
        assert!(att.entries().contains(&"attn_bwd_dkv_bf16_d64".to_string()));
        assert!(att.entries().contains(&"attn_table_reduce_d64".to_string()));
        assert_eq!(att.entries().len(), 13);
        assert_eq!(Module::Sparse.entries().len(), 15);
    }
}
