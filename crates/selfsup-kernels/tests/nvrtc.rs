//! Every kernel module compiles with NVRTC for sm_80 and sm_90, and defines every entry point
//! the launchers ask for. Needs libnvrtc, not a GPU: CI installs it from PyPI
//! (`nvidia-cuda-nvrtc==13.0.88`) and sets `SELFSUP_REQUIRE_NVRTC=1`, so there a missing
//! library fails the test instead of skipping it.
#![cfg(feature = "cuda")]

use selfsup_kernels::cuda::{compile, nvrtc_available};
use selfsup_kernels::Module;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("SELFSUP_REQUIRE_NVRTC").is_none(),
            "SELFSUP_REQUIRE_NVRTC is set but libnvrtc.so cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipped: libnvrtc.so not found (pip install nvidia-cuda-nvrtc==13.0.88; LD_LIBRARY_PATH)");
        return;
    }
    for module in Module::checked() {
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile(module, arch).unwrap_or_else(|e| panic!("{e}")).to_src();
            assert!(ptx.contains(&format!(".target {arch}")), "{}: not compiled for {arch}", module.name());
            // A CUDA 13.0 driver (the GPU machines') loads PTX up to ISA 9.0.
            let version = ptx.lines().find_map(|l| l.trim().strip_prefix(".version ")).expect("PTX version line");
            let (major, minor) = version.split_once('.').expect("major.minor");
            let isa = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
            assert!(isa <= (9, 0), "{}: PTX ISA {version} is newer than a CUDA 13.0 driver loads", module.name());
            for entry in module.entries() {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{}: no entry point {entry}", module.name());
            }
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_reported_with_its_log() {
    if !nvrtc_available() {
        return;
    }
    let ptx = cudarc::nvrtc::compile_ptx("extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }");
    let err = format!("{:?}", ptx.unwrap_err());
    assert!(err.contains("undefined_name"), "the NVRTC log names the error: {err}");
}
