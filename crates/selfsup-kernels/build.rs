//! With feature `host-emulation`: compile `kernels/*.cu` as C++20 for the host (see
//! `kernels/host_emulation.h`), the attention file once per emulated head dim. Without it this
//! script does nothing: the CUDA path compiles the sources at run time through NVRTC.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for f in ["common.cuh", "host_emulation.h", "sparse.cu", "dwconv.cu", "attention.cu"] {
        println!("cargo:rerun-if-changed=../../kernels/{f}");
    }
    #[cfg(feature = "host-emulation")]
    emulate();
}

/// Head dims of the emulated attention kernels; `emulation::EMULATED_HEAD_DIMS` must match
/// (a missing one fails to link).
#[cfg(feature = "host-emulation")]
const EMULATED_HEAD_DIMS: [usize; 3] = [4, 8, 16];

#[cfg(feature = "host-emulation")]
fn emulate() {
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++20")
            .opt_level(2)
            .warnings(false)
            .define("SELFSUP_HOST_EMULATION", None)
            .flag("-include")
            .flag("../../kernels/common.cuh")
            .flag("-x")
            .flag("c++");
        b
    };
    build().file("../../kernels/sparse.cu").file("../../kernels/dwconv.cu").compile("selfsup_emu_conv");
    for d in EMULATED_HEAD_DIMS {
        build()
            .define("HEAD_DIM", d.to_string().as_str())
            .file("../../kernels/attention.cu")
            .compile(&format!("selfsup_emu_attention_d{d}"));
    }
    println!("cargo:rustc-link-lib=pthread");
}
