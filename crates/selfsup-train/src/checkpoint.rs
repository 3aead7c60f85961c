//! Checkpoints: one safetensors file of every tensor plus a JSON manifest beside it.
//!
//! Layout in `<output_dir>/checkpoints/`: `step-00000100.safetensors` (tensors named
//! `model.*`, `optim.*`, `objective.*`) and `step-00000100.json` (the [`Manifest`]: step,
//! epoch, seed, the resolved config). Both are written atomically (temp file, fsync, rename),
//! tensors first: a manifest exists only for a complete checkpoint, so a crash mid-save leaves
//! the previous checkpoint as the latest. After a save only the newest `keep` are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Steps completed.
    pub step: usize,
    pub epoch: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// The run's resolved TOML config.
    pub config: String,
    /// Loss of the last step before the checkpoint.
    pub loss: f64,
    /// The tensor file, relative to the manifest.
    pub tensors: String,
}

fn stem(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes `tensors` as one safetensors file, atomically (temp file, fsync, rename).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Writes a checkpoint into `dir` and prunes all but the newest `keep`. Returns the manifest path.
pub fn save(dir: &Path, manifest: &Manifest, tensors: &[(String, Tensor)], keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = stem(manifest.step);
    let tensor_file = format!("{stem}.safetensors");
    save_tensors(&dir.join(&tensor_file), tensors)?;
    let manifest = Manifest { tensors: tensor_file, ..manifest.clone() };
    let path = dir.join(format!("{stem}.json"));
    write_atomic(&path, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    prune(dir, keep)?;
    Ok(path)
}

/// Manifests in `dir` with their steps, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) =
            name.strip_prefix("step-").and_then(|s| s.strip_suffix(".json")).and_then(|s| s.parse().ok())
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir)?;
    for (step, manifest) in all.iter().take(all.len().saturating_sub(keep)) {
        // Manifest first: a half-pruned checkpoint must not look complete.
        std::fs::remove_file(manifest).with_context(|| format!("removing {}", manifest.display()))?;
        let tensors = dir.join(format!("{}.safetensors", stem(*step)));
        if tensors.exists() {
            std::fs::remove_file(&tensors).with_context(|| format!("removing {}", tensors.display()))?;
        }
    }
    Ok(())
}

/// Resolves a run directory, a `checkpoints/` directory or a checkpoint file to the newest
/// complete checkpoint's manifest path.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(if path.extension().is_some_and(|e| e == "safetensors") {
            path.with_extension("json")
        } else {
            path.to_path_buf()
        });
    }
    if !path.exists() {
        bail!("checkpoint path {} does not exist", path.display())
    }
    let dir = if path.join("checkpoints").is_dir() { path.join("checkpoints") } else { path.to_path_buf() };
    match list(&dir)?.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("no checkpoint in {}", dir.display()),
    }
}

/// Loads a checkpoint (any path [`resolve`] accepts): its manifest and tensors on `device`.
pub fn load(path: &Path, device: &Device) -> Result<(Manifest, HashMap<String, Tensor>)> {
    let manifest_path = resolve(path)?;
    let text =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
    let tensor_path = manifest_path.parent().unwrap_or(Path::new(".")).join(&manifest.tensors);
    let tensors = candle_core::safetensors::load(&tensor_path, device)
        .with_context(|| format!("loading {}", tensor_path.display()))?;
    Ok((manifest, tensors))
}

/// The entries of `tensors` under `prefix.`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}.");
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_resolve_and_keep_last_k() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        for step in [10, 20, 30] {
            let m = Manifest {
                step,
                epoch: 0,
                total_steps: 30,
                seed: 1,
                config: "x".into(),
                loss: 1.5,
                tensors: String::new(),
            };
            let t = Tensor::new(&[step as f32, 2.0], &Device::Cpu).unwrap();
            save(&ck, &m, &[("model.w".into(), t)], 2).unwrap();
        }
        assert_eq!(list(&ck).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [20, 30]);
        assert_eq!(std::fs::read_dir(&ck).unwrap().count(), 4);
        let (m, t) = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(m.step, 30);
        assert_eq!(t["model.w"].to_vec1::<f32>().unwrap(), [30.0, 2.0]);
        let (m, _) = load(&ck.join("step-00000020.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(m.step, 20);
        assert_eq!(strip_prefix(&t, "model").keys().collect::<Vec<_>>(), ["w"]);
        // A half-written checkpoint (tensors, no manifest) is not "latest".
        std::fs::write(ck.join("step-00000040.safetensors"), b"partial").unwrap();
        assert_eq!(load(dir.path(), &Device::Cpu).unwrap().0.step, 30);
        assert!(load(&dir.path().join("nope"), &Device::Cpu).unwrap_err().to_string().contains("does not exist"));
    }
}
