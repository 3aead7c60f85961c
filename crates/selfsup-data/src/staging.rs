//! Writing a store so that it appears whole or not at all: everything goes into a sibling
//! `<out>.partial` directory, which is renamed into place only when complete.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Prepares `<out>.partial` (clearing a stale one). An existing `out` is an error unless
/// `overwrite`.
pub fn begin(out: &Path, overwrite: bool) -> Result<PathBuf> {
    if out.exists() && !overwrite {
        return Err(DataError::config("output", format!("{} exists; pass --overwrite to replace it", out.display())));
    }
    let partial = partial_path(out)?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| DataError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| DataError::io(&partial, e))?;
    Ok(partial)
}

/// `<out>.partial`.
pub fn partial_path(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| DataError::config("output", format!("{} has no name", out.display())))?;
    Ok(out.with_file_name(format!("{}.partial", name.to_string_lossy())))
}

/// Moves the finished `partial` directory to `out` (replacing it), and syncs the parent.
pub fn commit(partial: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| DataError::io(out, e))?;
    }
    std::fs::rename(partial, out).map_err(|e| DataError::io(out, e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Images per class of a store's labels (`named` classes at least; empty when unlabelled).
pub fn class_counts(labels: &[u32], named: usize) -> Vec<usize> {
    if labels.is_empty() {
        return Vec::new();
    }
    let n = labels.iter().max().map_or(0, |&m| m as usize + 1).max(named);
    let mut counts = vec![0usize; n];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    counts
}
