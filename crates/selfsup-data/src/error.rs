//! The data layer's error type: one variant per thing a caller may want to act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not an IDX file of the expected kind: magic {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic { path: PathBuf, found: u32, expected: u32 },
    #[error("{}: truncated: the header promises {expected} bytes, the file has {found}", path.display())]
    Truncated { path: PathBuf, expected: usize, found: usize },
    #[error("{}: {found} labels, but {} has {expected} images", labels.display(), images.display())]
    CountMismatch { images: PathBuf, labels: PathBuf, expected: usize, found: usize },
    #[error("{}: {key}: {reason}", path.display())]
    Record { path: PathBuf, key: String, reason: String },
    #[error("{}: the source holds no images", path.display())]
    Empty { path: PathBuf },
    #[error("invalid {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config { field, reason: reason.into() }
    }
}
