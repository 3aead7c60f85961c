//! CIFAR-10 / CIFAR-100 binary batches (Krizhevsky 2009, "binary version").
//!
//! - CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` (train) and
//!   `test_batch.bin`; each record is 1 label byte (0..9) + 3072 pixel bytes.
//! - CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`; each record is a coarse label
//!   byte (0..19), a fine label byte (0..99), then 3072 pixel bytes. selfsup uses the fine label.
//!
//! Pixels are stored channel-first (1024 red, 1024 green, 1024 blue, rows top to bottom), which
//! is [`ImageSet`]'s layout, so records are copied without reordering. A file whose length is
//! not a whole number of records, or a label out of range, is an error naming the file and the
//! record.

use std::path::{Path, PathBuf};

use crate::dataset::ImageSet;
use crate::error::{DataError, Result};
use crate::Split;

const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    fn classes(self) -> u32 {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }

    /// The batch files of `split`, relative to the directory.
    fn files(self, split: Split) -> Vec<String> {
        match (self, split) {
            (Self::Cifar10, Split::Train) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (Self::Cifar10, Split::Test) => vec!["test_batch.bin".into()],
            (Self::Cifar100, Split::Train) => vec!["train.bin".into()],
            (Self::Cifar100, Split::Test) => vec!["test.bin".into()],
        }
    }
}

/// Which variant `dir` holds, from its file names.
pub fn detect(dir: &Path) -> Result<Variant> {
    if dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file() {
        Ok(Variant::Cifar10)
    } else if dir.join("train.bin").is_file() || dir.join("test.bin").is_file() {
        Ok(Variant::Cifar100)
    } else {
        let source = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no CIFAR binary batches (data_batch_1.bin / test_batch.bin, or train.bin / test.bin)",
        );
        Err(DataError::io(dir, source))
    }
}

/// Parses the records of one batch file's bytes, appending to `pixels` and `labels`.
pub fn parse_batch(
    path: &Path,
    bytes: &[u8],
    variant: Variant,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let record = variant.label_bytes() + PIXELS;
    if !bytes.len().is_multiple_of(record) {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: bytes.len().div_ceil(record) * record,
            found: bytes.len(),
        });
    }
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        let label = r[variant.label_bytes() - 1] as u32;
        if label >= variant.classes() {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                key: format!("record {i}"),
                reason: format!("label {label} is not below {}", variant.classes()),
            });
        }
        labels.push(label);
        pixels.extend_from_slice(&r[variant.label_bytes()..]);
    }
    Ok(())
}

/// Reads one split of a CIFAR-10 or CIFAR-100 binary directory.
pub fn read(dir: &Path, split: Split) -> Result<ImageSet> {
    let variant = detect(dir)?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for name in variant.files(split) {
        let path: PathBuf = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        parse_batch(&path, &bytes, variant, &mut pixels, &mut labels)?;
    }
    if labels.is_empty() {
        return Err(DataError::Empty { path: dir.to_path_buf() });
    }
    let n = labels.len();
    let mut set = ImageSet::new(pixels, Some(labels), n, 3, 32, 32)?;
    set.num_classes = variant.classes() as usize;
    Ok(set)
}

/// Writes `set` (3x32x32, labelled) as the `split` batches of a CIFAR directory of `variant`
/// (CIFAR-10's training split is spread over five files). For tests and conversions.
pub fn write(dir: &Path, split: Split, variant: Variant, set: &ImageSet) -> Result<()> {
    if (set.c, set.h, set.w) != (3, 32, 32) {
        return Err(DataError::config(
            "image size",
            format!("CIFAR holds 3x32x32 images, not {}x{}x{}", set.c, set.h, set.w),
        ));
    }
    let labels = set.labels.as_ref().ok_or_else(|| DataError::config("labels", "CIFAR records need labels"))?;
    let files = variant.files(split);
    let per_file = set.n.div_ceil(files.len());
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    for (f, name) in files.iter().enumerate() {
        let mut bytes = Vec::new();
        for i in (f * per_file)..((f + 1) * per_file).min(set.n) {
            if variant == Variant::Cifar100 {
                bytes.push((labels[i] / 5) as u8);
            }
            bytes.push(labels[i] as u8);
            bytes.extend_from_slice(set.image(i));
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn colour_set(n: usize, classes: u32) -> ImageSet {
        let pixels: Vec<u8> = (0..n * PIXELS).map(|i| (i * 7 % 251) as u8).collect();
        let labels = (0..n as u32).map(|i| i % classes).collect();
        ImageSet::new(pixels, Some(labels), n, 3, 32, 32).unwrap()
    }

    #[test]
    fn round_trips_both_variants() {
        for (variant, classes) in [(Variant::Cifar10, 10), (Variant::Cifar100, 100)] {
            let dir = tempfile::tempdir().unwrap();
            let train = colour_set(12, classes);
            write(dir.path(), Split::Train, variant, &train).unwrap();
            write(dir.path(), Split::Test, variant, &colour_set(3, classes)).unwrap();
            assert_eq!(detect(dir.path()).unwrap(), variant);
            let back = read(dir.path(), Split::Train).unwrap();
            assert_eq!((back.n, back.c, back.h, back.w, back.num_classes), (12, 3, 32, 32, classes as usize));
            assert_eq!(back.labels, train.labels);
            assert_eq!(back.image(11), train.image(11));
            assert_eq!(read(dir.path(), Split::Test).unwrap().n, 3);
        }
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(e.contains("no CIFAR binary batches"), "{e}");
        let mut rec = vec![3u8];
        rec.extend(vec![0u8; PIXELS]);
        rec.push(1); // one stray byte: truncated
        std::fs::write(dir.path().join("test_batch.bin"), &rec).unwrap();
        let e = read(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("truncated"), "{e}");
        rec.pop();
        rec[0] = 10;
        std::fs::write(dir.path().join("test_batch.bin"), &rec).unwrap();
        let e = read(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("record 0") && e.contains("label 10 is not below 10"), "{e}");
        std::fs::write(dir.path().join("test_batch.bin"), b"").unwrap();
        let e = read(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("holds no images"), "{e}");
        // The training split's first file is missing.
        let e = read(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(e.contains("data_batch_1.bin"), "{e}");
    }

    /// Random bytes never panic the record parser: a whole number of valid records parses,
    /// anything else is an error.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = selfsup_ops::rng::Rng::new(9);
        let path = Path::new("fuzz.bin");
        for trial in 0..300 {
            let variant = if trial % 2 == 0 { Variant::Cifar10 } else { Variant::Cifar100 };
            let len = rng.below(3 * (PIXELS + 2));
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let (mut p, mut l) = (Vec::new(), Vec::new());
            if parse_batch(path, &bytes, variant, &mut p, &mut l).is_ok() {
                assert_eq!(p.len(), l.len() * PIXELS);
            }
        }
    }
}
