//! `cargo xtask gpu`: builds, on a machine without a GPU, what a GPU machine (driver and CUDA
//! 13.0 libraries, no Rust) runs to check the CUDA kernels: the test binaries that compare the
//! kernels on the GPU with the CPU ops, and the kernel benchmark; then prints the one command to
//! run there.
//!
//! Steps (../shared/CANDLE.md section 3 has the verified recipe):
//! 1. A CUDA 13.0 toolchain from PyPI in `target/cuda-toolchain` (nvcc, runtime, crt, nvvm,
//!    cccl, and for linking cublas, curand, nvrtc). Pinned to 13.0.x: PyPI's default nvcc 13.5
//!    emits PTX ISA 9.5, which a CUDA 13.0 driver cannot load. candle's `cuda` feature needs nvcc
//!    even for `cargo check` (candle-kernels' build script).
//! 2. Link-time helpers in the toolchain's lib folder: unversioned `.so` names, and a generated
//!    `libcuda.so` stub (every `cu*` symbol cudarc declares, returning
//!    CUDA_ERROR_STUB_LIBRARY); never shipped, the GPU machine has the real driver.
//! 3. `cargo test --no-run` and `cargo build --example` in release mode with
//!    `--features cuda` into `target/gpu` (its own target dir: the CPU build is not disturbed;
//!    the first build takes 15-20 minutes on 2 cores, mostly candle-kernels' nvcc step).
//! 4. The binaries stripped and gzipped into `target/gpu/carry` with `run.sh` (the GPU machine
//!    accepts 64 MiB of files per run).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run};

/// The PyPI wheels of the CUDA 13.0 toolchain.
const WHEELS: [&str; 8] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.*",
    "nvidia-cublas==13.0.*",
    "nvidia-curand==10.4.0.*",
    "nvidia-cuda-nvrtc==13.0.88",
];

/// Test binaries carried to the GPU machine: (cargo target name, carried name).
const TESTS: [(&str, &str); 2] = [("gpu", "kernels-gpu-tests"), ("kernels_cuda", "ops-cuda-tests")];

/// `args`: `--toolchain` only installs the toolchain and prints the environment to build with.
pub fn gpu(args: &[String]) -> Result<()> {
    let cu = toolchain()?;
    if args.iter().any(|a| a == "--toolchain") {
        println!(
            "export PATH={}/bin:$PATH CUDA_HOME={} CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS=2",
            cu.display(),
            cu.display()
        );
        return Ok(());
    }
    let target = root().join("target/gpu");
    let features = "selfsup-kernels/cuda,selfsup-kernels/host-emulation,selfsup-ops/cuda";
    let path = format!("{}:{}", cu.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let env = |cmd: &mut Command| {
        cmd.env("PATH", &path)
            .env("CUDA_HOME", &cu)
            .env("CUDA_COMPUTE_CAP", std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()))
            .env("CUDAFORGE_THREADS", "2")
            .env("CARGO_TARGET_DIR", &target);
    };
    let mut build = cargo();
    build.args(["test", "--release", "--no-run", "-p", "selfsup-kernels", "-p", "selfsup-ops", "--features", features]);
    build.args(["--message-format", "json-render-diagnostics"]);
    env(&mut build);
    eprintln!("$ {build:?}");
    let out = build.current_dir(root()).output().context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("the GPU test build failed:\n{}", String::from_utf8_lossy(&out.stderr))
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let mut bench = cargo();
    bench.args(["build", "--release", "-p", "selfsup-kernels", "--example", "gpu_bench", "--features", "cuda"]);
    env(&mut bench);
    run(&mut bench)?;
    let mut steps = cargo();
    steps.args(["build", "--release", "-p", "selfsup-benches", "--bin", "gpu_steps", "--features", "cuda"]);
    env(&mut steps);
    run(&mut steps)?;

    let carry = target.join("carry");
    let _ = std::fs::remove_dir_all(&carry);
    std::fs::create_dir_all(&carry)?;
    for (name, carried) in TESTS {
        let exe = test_executable(&json, name).with_context(|| format!("cargo built no test binary `{name}`"))?;
        pack(&exe, &carry.join(carried))?;
    }
    pack(&target.join("release/examples/gpu_bench"), &carry.join("kernels-gpu-bench"))?;
    pack(&target.join("release/gpu_steps"), &carry.join("gpu-steps"))?;
    for script in ["torch_kernels_gpu.py", "torch_train_step.py"] {
        std::fs::copy(root().join("benches").join(script), carry.join(script))?;
    }
    std::fs::write(carry.join("run.sh"), RUN_SH)?;
    let size: u64 = std::fs::read_dir(&carry)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!(
        "\nGPU artefacts in target/gpu/carry ({:.1} MiB). On the GPU machine, from the repository root:",
        size as f64 / 1048576.0
    );
    println!("  bash target/gpu/carry/run.sh [output dir]");
    println!("(with the device tool: carry [\"target/gpu/carry\"], command `bash target/gpu/carry/run.sh $OUT`)");
    Ok(())
}

/// The executable of the test target `name` in cargo's JSON messages.
fn test_executable(json: &str, name: &str) -> Option<PathBuf> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"test\":true"))
        .filter(|l| l.contains(&format!("\"name\":\"{name}\"")))
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + 14..];
            Some(PathBuf::from(&rest[..rest.find('"')?]))
        })
}

/// Strip `exe` into `dest` and gzip it (`dest.gz`).
fn pack(exe: &Path, dest: &Path) -> Result<()> {
    run(Command::new("strip").arg("-o").arg(dest).arg(exe))?;
    run(Command::new("gzip").arg("-f9").arg(dest))
}

/// Installs the toolchain once and returns its root (`.../nvidia/cu13`).
fn toolchain() -> Result<PathBuf> {
    let dir = root().join("target/cuda-toolchain");
    let pip = dir.join("bin/pip");
    if !pip.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    }
    let cu = find_cu13(&dir);
    if cu.as_ref().is_none_or(|c| !c.join("bin/nvcc").exists() || !c.join("lib/libcublas.so.13").exists()) {
        run(Command::new(&pip).args(["install", "-q"]).args(WHEELS))?;
    }
    let cu = find_cu13(&dir).context("the CUDA wheels installed no nvidia/cu13 folder")?;
    let lib = cu.join("lib");
    for (link, target) in [
        ("libcudart.so", "libcudart.so.13"),
        ("libcublas.so", "libcublas.so.13"),
        ("libcublasLt.so", "libcublasLt.so.13"),
        ("libnvrtc.so", "libnvrtc.so.13"),
        ("libcurand.so", "libcurand.so.10"),
    ] {
        if !lib.join(link).exists() {
            std::os::unix::fs::symlink(target, lib.join(link)).with_context(|| format!("linking {link}"))?;
        }
    }
    if !lib.join("libcuda.so").exists() {
        libcuda_stub(&lib)?;
    }
    Ok(cu)
}

fn find_cu13(venv: &Path) -> Option<PathBuf> {
    let libdir = venv.join("lib");
    std::fs::read_dir(&libdir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13"))
        .find(|p| p.exists())
}

/// A `libcuda.so` that defines every driver entry point cudarc declares, each returning
/// CUDA_ERROR_STUB_LIBRARY (34): enough to link, never to run.
fn libcuda_stub(lib: &Path) -> Result<()> {
    let meta = cargo()
        .args(["metadata", "--format-version", "1", "--features", "selfsup-kernels/cuda"])
        .current_dir(root())
        .output()?;
    let meta = String::from_utf8_lossy(&meta.stdout);
    let manifest = meta
        .split("\"manifest_path\":\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap_or(0)])
        .find(|p| p.contains("/cudarc-"))
        .context("cudarc not found in cargo metadata")?;
    let sys = Path::new(manifest).with_file_name("src/driver/sys/mod.rs");
    let text = std::fs::read_to_string(&sys).with_context(|| format!("reading {}", sys.display()))?;
    let mut names: Vec<&str> = text
        .split(" fn ")
        .skip(1)
        .filter_map(|s| s.split('(').next())
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < 100 {
        bail!("found only {} driver entry points in {}", names.len(), sys.display())
    }
    let c: String = names.iter().map(|n| format!("int {n}(void) {{ return 34; }}\n")).collect();
    let src = lib.join("libcuda_stub.c");
    std::fs::write(&src, c)?;
    run(Command::new("gcc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(lib.join("libcuda.so"))
        .arg(&src))
}

/// Runs on the GPU machine: unpacks the binaries, finds the CUDA 13 libraries of the machine's
/// Python environment, runs the GPU tests (which fail rather than skip there) and the benchmark
/// against PyTorch.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Generated by `cargo xtask gpu`. Usage: bash target/gpu/carry/run.sh [output dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
py="${SELFSUP_PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python ] && py="${SELFSUP_PYTHON:-/opt/torch/.venv/bin/python}"
nv="$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="$nv:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export SELFSUP_REQUIRE_GPU=1
for f in "$here"/*.gz; do gunzip -kf "$f"; chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
status=0
for t in kernels-gpu-tests ops-cuda-tests; do
  "$here/$t" --test-threads=1 2>&1 | tee "$out/$t.txt" || status=1
done
# compute-sanitizer (when the machine has one): out-of-bounds accesses and shared-memory races.
san="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [ -n "$san" ]; then
  for tool in memcheck racecheck; do
    "$san" --tool "$tool" --error-exitcode 9 "$here/kernels-gpu-tests" --test-threads=1 > "$out/sanitizer-$tool.txt" 2>&1 \
      && echo "compute-sanitizer $tool: clean" || { echo "compute-sanitizer $tool: errors (see $out/sanitizer-$tool.txt)"; status=1; }
  done
else
  echo "compute-sanitizer not found: memcheck and racecheck not run"
fi
"$here/kernels-gpu-bench" "$out/selfsup-kernels.json" 2>&1 | tee "$out/bench.txt" || status=1
"$py" "$here/torch_kernels_gpu.py" "$out/torch-kernels.json" "$out/selfsup-kernels.json" 2>&1 | tee -a "$out/bench.txt" || status=1
# Whole training steps at 224 px, batch 128: FCMAE/ConvNeXt V2-atto and LoMaR/ViT-B/16.
"$here/gpu-steps" --device cuda --size 224 --batch 128 --steps 10 --out "$out/selfsup-steps.json" 2>&1 | tee "$out/steps.txt" || status=1
SELFSUP_STEP_DEVICE=cuda SELFSUP_STEP_SIZE=224 SELFSUP_STEP_BATCH=128 \
  "$py" "$here/torch_train_step.py" "$out/torch-steps.json" 2>&1 | tee -a "$out/steps.txt" || status=1
"$py" - "$out" <<'PY' | tee -a "$out/steps.txt" || status=1
import json, os, sys
d = sys.argv[1]
ours, torch = (json.load(open(os.path.join(d, f))) for f in ("selfsup-steps.json", "torch-steps.json"))
print("| step (batch 128, 224 px) | selfsup images/s | PyTorch images/s | speed vs PyTorch |")
print("|---|---|---|---|")
for k, s in ours.items():
    peer = torch.get(k.replace("_reference", ""))
    print(f"| {k} | {128 / s:.0f} | {128 / peer:.0f} | {peer / s:.2f}x |" if peer else f"| {k} | {128 / s:.0f} | | |")
PY
exit $status
"#;
