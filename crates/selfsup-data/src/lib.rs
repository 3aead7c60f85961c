//! selfsup-data: datasets, augmentations and a deterministic loader.
//!
//! Invariants: this crate knows no models. A batch is a pure function of
//! `(seed, epoch, batch index)`, whatever the thread count. Errors are a [`DataError`] enum
//! callers can act on; every message names the file or value at fault.

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod error;
pub mod folder;
pub mod idx;
pub mod lmdb;
pub mod loader;
pub mod segset;
pub mod shards;
pub mod source;
pub mod staging;

pub use augment::ViewConfig;
pub use dataset::ImageSet;
pub use error::DataError;
pub use loader::{Loader, LoaderOptions};
pub use source::{Image, Source};

/// Which half of a labelled dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// `train` / `test`: the sub-directory of a packed dataset holding this split.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}
