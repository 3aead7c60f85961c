//! Labelled image sets of u8 pixels (in memory or memory-mapped), and the readers that fill them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::{idx, Split};

/// Where an [`ImageSet`]'s pixels live.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// One contiguous buffer of `n` records.
    Owned(Arc<Vec<u8>>),
    /// Memory-mapped shard files of `per_shard` records each (the last may hold fewer).
    Mapped { shards: Arc<Vec<memmap2::Mmap>>, per_shard: usize },
}

/// `n` images of `c x h x w` u8 pixels (channel-first), with optional labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub pixels: Pixels,
    pub labels: Option<Vec<u32>>,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub num_classes: usize,
}

impl ImageSet {
    pub fn new(pixels: Vec<u8>, labels: Option<Vec<u32>>, n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        if pixels.len() != n * c * h * w {
            return Err(DataError::config("pixels", format!("{} bytes for {n}x{c}x{h}x{w} images", pixels.len())));
        }
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(DataError::config("labels", format!("{} labels for {n} images", l.len())));
            }
        }
        let num_classes = labels.as_ref().map_or(0, |l| l.iter().max().map_or(0, |&m| m as usize + 1));
        Ok(Self { pixels: Pixels::Owned(Arc::new(pixels)), labels, n, c, h, w, num_classes })
    }

    /// Bytes per image.
    pub fn record_size(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Image `i`, (c, h, w) row-major.
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(i < self.n, "image {i} of a set of {}", self.n);
        let s = self.record_size();
        match &self.pixels {
            Pixels::Owned(v) => &v[i * s..(i + 1) * s],
            Pixels::Mapped { shards, per_shard } => {
                let j = i % per_shard;
                &shards[i / per_shard][j * s..(j + 1) * s]
            }
        }
    }

    /// Every image's pixels in order, as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.n * self.record_size());
        (0..self.n).for_each(|i| out.extend_from_slice(self.image(i)));
        out
    }

    /// The first `n` images (or all, if fewer); shares the pixels.
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.n);
        Self { pixels: self.pixels.clone(), labels: self.labels.as_ref().map(|l| l[..n].to_vec()), n, ..*self }
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let plane = self.h * self.w;
        let mut sum = vec![0f64; self.c];
        let mut sq = vec![0f64; self.c];
        for i in 0..self.n {
            for (ch, p) in self.image(i).chunks(plane).enumerate() {
                for &v in p {
                    let v = v as f64 / 255.0;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let m = (self.n * plane) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / m) as f32).collect();
        let std = sq.iter().zip(&mean).map(|(q, &mu)| ((q / m - (mu as f64).powi(2)).max(0.0).sqrt()) as f32).collect();
        (mean, std)
    }
}

/// Reads an MNIST-family directory (`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`),
/// e.g. `/usr/share/datasets/fashion-mnist` from Debian's `dataset-fashion-mnist`.
pub fn mnist_family(dir: &Path, split: Split) -> Result<ImageSet> {
    if !dir.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "dataset directory not found");
        return Err(DataError::io(dir, source));
    }
    let stem = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = find(dir, &format!("{stem}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{stem}-labels-idx1-ubyte"))?;
    let images = idx::read(&images_path, 3)?;
    let labels = idx::read(&labels_path, 1)?;
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if n == 0 {
        return Err(DataError::Empty { path: images_path });
    }
    if labels.dims[0] != n {
        return Err(DataError::CountMismatch {
            images: images_path,
            labels: labels_path,
            expected: n,
            found: labels.dims[0],
        });
    }
    let labels = labels.data.iter().map(|&l| l as u32).collect();
    ImageSet::new(images.data, Some(labels), n, 1, h, w)
}

/// Writes `set` (grey, labelled) as the `stem` split of an MNIST-family directory.
pub fn write_mnist_family(dir: &Path, split: Split, set: &ImageSet) -> Result<()> {
    let stem = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    if set.c != 1 {
        return Err(DataError::config(
            "channels",
            format!("MNIST-family files hold grey images, not {}-channel", set.c),
        ));
    }
    let labels: Vec<u8> = set.labels.as_deref().unwrap_or(&[]).iter().map(|&l| l as u8).collect();
    idx::write(&dir.join(format!("{stem}-images-idx3-ubyte")), &[set.n, set.h, set.w], &set.to_vec())?;
    idx::write(&dir.join(format!("{stem}-labels-idx1-ubyte")), &[labels.len()], &labels)
}

/// A synthetic grey dataset for tests and smoke runs: `n` images of `size x size`, class
/// `i % classes`, each class a distinct diagonal-stripe pattern, plus Gaussian noise.
pub fn synthetic_stripes(n: usize, size: usize, classes: usize, seed: u64) -> ImageSet {
    let mut rng = selfsup_ops::rng::Rng::new(seed);
    let mut pixels = Vec::with_capacity(n * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % classes.max(1);
        labels.push(class as u32);
        for y in 0..size {
            for x in 0..size {
                let on = (x + y * class).is_multiple_of(class + 2);
                pixels.push(((if on { 200.0 } else { 40.0 }) + 30.0 * rng.normal()).clamp(0.0, 255.0) as u8);
            }
        }
    }
    ImageSet::new(pixels, Some(labels), n, 1, size, size).expect("consistent sizes")
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let source = std::io::Error::new(std::io::ErrorKind::NotFound, format!("neither {stem} nor {stem}.gz exists"));
    Err(DataError::io(dir.join(stem), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_idx(path: &Path, magic_type: u8, dims: &[u32], data: &[u8]) {
        let mut v = vec![0, 0, 8, magic_type];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        std::fs::write(path, v).unwrap();
    }

    /// The real Fashion-MNIST as Debian's `dataset-fashion-mnist` installs it (gzipped IDX);
    /// `.ci/run` installs it.
    #[test]
    fn fashion_mnist_as_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        assert!(dir.is_dir(), "Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist");
        let train = mnist_family(dir, Split::Train).unwrap();
        let test = mnist_family(dir, Split::Test).unwrap();
        assert_eq!((train.n, train.c, train.h, train.w, train.num_classes), (60_000, 1, 28, 28, 10));
        assert_eq!((test.n, test.num_classes), (10_000, 10));
        let mut per_class = [0usize; 10];
        train.labels.as_ref().unwrap().iter().for_each(|&l| per_class[l as usize] += 1);
        assert_eq!(per_class, [6000; 10]);
        // The normalisation constants the configs use.
        let (mean, std) = train.channel_stats();
        assert!((mean[0] - 0.2860).abs() < 5e-4 && (std[0] - 0.3530).abs() < 5e-4, "{mean:?} {std:?}");
    }

    #[test]
    fn reads_a_small_mnist_dir_and_reports_problems() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_idx(&d.join("t10k-images-idx3-ubyte"), 3, &[2, 2, 2], &[0, 255, 0, 255, 1, 2, 3, 4]);
        write_idx(&d.join("t10k-labels-idx1-ubyte"), 1, &[2], &[3, 1]);
        let s = mnist_family(d, Split::Test).unwrap();
        assert_eq!((s.n, s.c, s.h, s.w, s.num_classes), (2, 1, 2, 2, 4));
        assert_eq!(s.image(1), &[1, 2, 3, 4]);
        // Mismatched counts.
        write_idx(&d.join("t10k-labels-idx1-ubyte"), 1, &[3], &[3, 1, 0]);
        let e = mnist_family(d, Split::Test).unwrap_err().to_string();
        assert!(e.contains("3 labels") && e.contains("2 images"), "{e}");
        // Missing split and missing dir.
        let e = mnist_family(d, Split::Train).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        let e = mnist_family(&d.join("nope"), Split::Train).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("not found"), "{e}");
    }
}
