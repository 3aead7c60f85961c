//! `gpu-steps` (the GPU step benchmark of issues 6 and 8) runs end to end on the CPU at a small
//! size: every case builds, steps with a finite loss and is written to the JSON, so the binary
//! a GPU session carries does not rot between GPU sessions.

#[test]
fn gpu_steps_runs_every_case_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("steps.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_gpu_steps"))
        .args(["--device", "cpu", "--size", "128", "--batch", "1", "--steps", "1", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let json = std::fs::read_to_string(&out).unwrap();
    for case in [
        "step_fcmae_convnextv2_atto_128px\"",
        "step_fcmae_convnextv2_atto_128px_reference",
        "step_lomar_vit_base_128px",
    ] {
        assert!(json.contains(case), "{case} missing from {json}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_gpu_steps")).args(["--size", "100"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--size 100"));
}
