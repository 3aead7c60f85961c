//! `cargo xtask`: the project's automation.
//!
//! ```text
//! cargo xtask ci      fmt check, repository rules, clippy -D warnings, tests (release profile)
//! cargo xtask demo    BYOL pretraining on Fashion-MNIST + kNN, linear-probe and fine-tuning tables, report (the README's main job)
//! cargo xtask bench   criterion benches, PyTorch on the same ops and training steps, then a summary table
//! cargo xtask gpu     builds the CUDA test and bench binaries for a GPU machine (see gpu.rs)
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod gpu;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const DEMO_CONFIG: &str = "configs/byol_resnet18_fmnist_demo.toml";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("tidy") => tidy(),
        Some("gpu") => gpu::gpu(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <ci | demo | bench [criterion filter] | gpu [--toolchain] | tidy>");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", format!("{cmd:?}").replace('"', ""));
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}")
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    tidy()?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--release", "--", "-D", "warnings"]))?;
    // The CUDA launch code builds without a CUDA toolkit (cudarc loads its libraries at run
    // time); its NVRTC test compiles every kernel when libnvrtc is on LD_LIBRARY_PATH (.ci/run
    // installs it and sets SELFSUP_REQUIRE_NVRTC, so there it cannot skip).
    let kernels = ["-p", "selfsup-kernels", "--features", "cuda,host-emulation", "--release"];
    run(cargo().arg("clippy").args(kernels).args(["--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().arg("test").args(kernels))?;
    run(cargo().args(["test", "--workspace", "--release"]))
}

/// Repository rules: every Rust source starts with a `//!` header; no ignored tests, debug
/// leftovers or unfinished markers.
fn tidy() -> Result<()> {
    let mut problems = Vec::new();
    let mut stack = vec![root().join("crates"), root().join("xtask"), root().join("benches")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let rel = path.strip_prefix(root()).unwrap_or(&path).display().to_string();
            if !text.starts_with("//!") {
                problems.push(format!("{rel}: does not start with a `//!` header"));
            }
            for (marker, what) in [
                ("#[ignore", "an ignored test"),
                ("dbg!(", "a dbg! leftover"),
                ("todo!(", "a todo!"),
                ("unimplemented!(", "an unimplemented!"),
            ] {
                if text.contains(marker) && !rel.ends_with("xtask/src/main.rs") {
                    problems.push(format!("{rel}: contains {what}"));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("tidy found {} problem(s):\n  {}", problems.len(), problems.join("\n  "))
    }
    eprintln!("tidy: ok");
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    if !Path::new(FASHION_MNIST).is_dir() {
        bail!("Fashion-MNIST is not installed: run `apt-get install -y dataset-fashion-mnist` (puts it in {FASHION_MNIST})")
    }
    let config = args.first().map(String::as_str).unwrap_or(DEMO_CONFIG);
    run(cargo().args(["build", "--release", "-p", "selfsup"]))?;
    let bin = root().join("target/release/selfsup");
    let text = std::fs::read_to_string(root().join(config)).with_context(|| format!("reading {config}"))?;
    let out = text
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("output_dir").map(|v| v.trim_start_matches([' ', '=']).trim_matches('"').to_string())
        })
        .context("the demo config has no output_dir")?;
    // A fresh run each time: the table must describe this pretraining.
    let out = root().join(out);
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    run(Command::new(&bin).args(["pretrain", "--config", config]))?;
    run(Command::new(&bin).args(["eval", "knn", "--checkpoint"]).arg(&out).arg("--baselines"))?;
    run(Command::new(&bin).args(["eval", "linear", "--checkpoint"]).arg(&out).arg("--baselines"))?;
    run(Command::new(&bin).args(["eval", "finetune", "--checkpoint"]).arg(&out).args([
        "--baselines",
        "--eval-every",
        "1",
    ]))?;
    run(Command::new(&bin).arg("report").arg(&out))
}

fn bench(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "selfsup-benches", "--"]);
    cmd.args(args);
    let _ = std::fs::remove_file(root().join("target/criterion/data-bench.json"));
    run(&mut cmd)?;
    torch_ops(args)?;
    torch_steps(args)?;
    torch_data()?;
    summary()?;
    data_summary()
}

/// Times the PyTorch peers of the training-step and forward benches (benches/torch_train_step.py,
/// benches/torch_forward.py) unless the criterion filter excludes them.
fn torch_steps(args: &[String]) -> Result<()> {
    let dir = root().join("target/criterion");
    let filter = args.iter().find(|a| !a.starts_with('-'));
    for (script, json, kind) in
        [("torch_train_step.py", "torch-steps.json", "step"), ("torch_forward.py", "torch-forward.json", "forward")]
    {
        let out = dir.join(json);
        let _ = std::fs::remove_file(&out);
        if filter.is_some_and(|f| !f.contains(kind)) {
            continue;
        }
        let python = std::env::var("SELFSUP_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(python);
        cmd.arg(root().join("benches").join(script)).arg(&out);
        if let Some(filter) = filter {
            cmd.env("SELFSUP_BENCH_FILTER", filter);
        }
        if let Err(e) = run(&mut cmd) {
            eprintln!("xtask: {script} failed ({e:#}); printing the Rust numbers only");
        }
    }
    Ok(())
}

/// Runs the PyTorch DataLoader peer of the data bench (benches/torch_data.py) on the JPEG
/// folder the Rust bench just used, when the Rust bench ran.
fn torch_data() -> Result<()> {
    let dir = root().join("target/criterion");
    let _ = std::fs::remove_file(dir.join("torch-data.json"));
    if !dir.join("data-bench.json").exists() {
        return Ok(());
    }
    let python = std::env::var("SELFSUP_PYTHON").unwrap_or_else(|_| "python3".into());
    if let Err(e) = run(Command::new(python).arg(root().join("benches/torch_data.py"))) {
        eprintln!("xtask: the PyTorch data comparison failed ({e:#}); printing the Rust numbers only");
    }
    Ok(())
}

/// The input-pipeline table: images/s of selfsup's loader and of PyTorch's, and their ratio.
fn data_summary() -> Result<()> {
    let dir = root().join("target/criterion");
    let Ok(ours) = std::fs::read_to_string(dir.join("data-bench.json")) else { return Ok(()) };
    let torch = std::fs::read_to_string(dir.join("torch-data.json")).unwrap_or_default();
    let workers = json_number_after(&ours, "\"workers\"").unwrap_or(0.0);
    println!();
    println!(
        "| input pipeline ({workers} workers, JPEG 500x375) | selfsup images/s | PyTorch images/s | speed vs PyTorch |"
    );
    println!("|---|---|---|---|");
    for case in ["decode", "byol_2view_224", "fcmae_1view_224"] {
        let key = format!("\"{case}\"");
        let Some(rate) = json_number_after(&ours, &key) else { continue };
        let peer = json_number_after(&torch, &key);
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_default();
        let vs = peer.map(|p| format!("{:.2}x", rate / p)).unwrap_or_default();
        println!("| {case} | {rate:.0} | {} | {vs} |", cell(peer));
    }
    Ok(())
}

/// Times PyTorch on the ops cases (benches/torch_ops.py) right after the Rust run, so the two
/// columns come from the same machine state. Python is `SELFSUP_PYTHON` or `python3`; without
/// torch the script prints why and the PyTorch column stays empty.
fn torch_ops(args: &[String]) -> Result<()> {
    let cases = root().join("target/criterion/ops-cases.json");
    let out = root().join("target/criterion/torch-ops.json");
    let _ = std::fs::remove_file(&out);
    if !cases.exists() {
        return Ok(());
    }
    let python = std::env::var("SELFSUP_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(root().join("benches/torch_ops.py")).arg(&cases).arg(&out);
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        cmd.env("SELFSUP_BENCH_FILTER", filter);
    }
    if let Err(e) = run(&mut cmd) {
        eprintln!("xtask: the PyTorch comparison failed ({e:#}); printing the Rust numbers only");
    }
    Ok(())
}

/// One bench of a group: name, mean seconds, criterion's throughput elements.
struct Measured {
    name: String,
    secs: f64,
    elements: Option<f64>,
}

/// Reads criterion's `estimates.json` files (and PyTorch's times, when present) and prints one
/// row per bench: mean time, rate, and the speed ratios against `reference` and PyTorch within
/// the group. Throughput elements are FLOPs for op groups (GFLOP/s) and images for groups
/// whose name contains `step` or starts with `forward` (images/s).
fn summary() -> Result<()> {
    let dir = root().join("target/criterion");
    // PyTorch's seconds per case, keyed by group name: the ops peers and the step peers.
    let torch = ["torch-ops.json", "torch-steps.json", "torch-forward.json"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut lines = Vec::new();
    for group in sorted_dirs(&dir)? {
        let gname = group.file_name().unwrap_or_default().to_string_lossy().to_string();
        let mut benches: Vec<Measured> = sorted_dirs(&group)?
            .into_iter()
            .filter_map(|b| {
                let text = std::fs::read_to_string(b.join("new/estimates.json")).ok()?;
                let mean = json_number(&text[text.find("\"mean\"")?..], "\"point_estimate\"")?;
                let elements = std::fs::read_to_string(b.join("new/benchmark.json"))
                    .ok()
                    .and_then(|t| json_number(&t, "\"Elements\""));
                Some(Measured { name: b.file_name()?.to_string_lossy().to_string(), secs: mean * 1e-9, elements })
            })
            .collect();
        if benches.is_empty() {
            continue;
        }
        let flops = benches[0].elements;
        if let Some(secs) = json_number_after(&torch, &format!("\"{gname}\"")) {
            benches.push(Measured { name: "pytorch".into(), secs, elements: flops });
        }
        let find = |n: &str| benches.iter().find(|m| m.name == n).map(|m| m.secs);
        let (reference, pytorch) = (find("reference"), find("pytorch"));
        let images = gname.contains("step") || gname.starts_with("forward");
        for m in &benches {
            let rate = m.elements.map(|e| {
                if images {
                    format!("{:.0} img/s", e / m.secs)
                } else {
                    format!("{:.1} GFLOP/s", e / m.secs / 1e9)
                }
            });
            let vs = |r: Option<f64>| match r {
                Some(r) if m.name != "reference" && m.name != "pytorch" => format!("{:.2}x", r / m.secs),
                _ => String::new(),
            };
            lines.push(format!(
                "| {gname} | {} | {:.2} | {} | {} | {} |",
                m.name,
                m.secs * 1e3,
                rate.unwrap_or_default(),
                vs(reference),
                vs(pytorch)
            ));
        }
    }
    if lines.is_empty() {
        bail!("no criterion results under {}", dir.display())
    }
    println!("| group | bench | mean (ms) | rate | speed vs reference | speed vs PyTorch |");
    println!("|---|---|---|---|---|---|");
    lines.iter().for_each(|l| println!("{l}"));
    Ok(())
}

/// The number that follows `key` and a colon, e.g. `"group": 0.123` in torch-ops.json.
fn json_number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix(':')?;
    json_number(rest, "")
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "report"))
        .collect();
    out.sort();
    Ok(out)
}

/// The first number after `key` (criterion's JSON: `"mean":{"point_estimate":123.4,...}` and
/// `"throughput":{"Elements":128}`), without a JSON dependency in xtask.
fn json_number(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let start = rest.find(|c: char| c.is_ascii_digit() || c == '-')?;
    let rest = &rest[start..];
    let end =
        rest.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))).unwrap_or(rest.len());
    rest[..end].parse().ok()
}
