//! Memory-mapped shards of pre-decoded, fixed-size u8 images: the fastest store selfsup reads.
//!
//! A store is a directory:
//! - `shard-00000.u8`, `shard-00001.u8`, ...: records of `c * h * w` bytes (channel-first), no
//!   header, `records_per_shard` each (the last may hold fewer), so image `i` is a slice of one
//!   mapping and reading it costs nothing but a page fault.
//! - `labels.u32`: one little-endian u32 per record, when the source was labelled.
//! - `manifest.json`: format and version, count, image size, classes (names if known),
//!   per-class counts, the shard list, and what the packer skipped and why.
//!
//! Writing goes to a sibling `<out>.partial` directory; the manifest is written last (after
//! every data file is synced) and the directory is then renamed into place, so an interrupted
//! pack never leaves a directory that reads as a complete store. An existing store is replaced
//! only when the caller asks for it (`overwrite`). The reader checks every file's size against
//! the manifest and every label against the class count before handing out a set.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dataset::{ImageSet, Pixels};
use crate::error::{DataError, Result};

pub const FORMAT: &str = "selfsup-shards";
pub const VERSION: u32 = 1;
/// Default shard size: records per shard are chosen so a shard holds about this many bytes.
pub const SHARD_BYTES: usize = 1 << 30;

/// The `manifest.json` of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub count: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub labelled: bool,
    pub num_classes: usize,
    /// Class names in label order, when the source named them (image folders).
    #[serde(default)]
    pub classes: Vec<String>,
    pub class_counts: Vec<usize>,
    pub records_per_shard: usize,
    pub shards: Vec<String>,
    /// Where the images came from (free text).
    pub source: String,
    /// Skipped source items by reason.
    #[serde(default)]
    pub skipped: BTreeMap<String, usize>,
}

/// Streams records into a new store.
pub struct ShardWriter {
    out: PathBuf,
    partial: PathBuf,
    record: usize,
    dims: (usize, usize, usize),
    per_shard: usize,
    shards: Vec<String>,
    current: Option<BufWriter<File>>,
    in_current: usize,
    labels: Vec<u32>,
    count: usize,
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| DataError::io(path, e))
}

fn sync_file(path: &Path) -> Result<()> {
    io(path, File::open(path).and_then(|f| f.sync_all()))
}

impl ShardWriter {
    /// Starts a store of `c x h x w` images at `out`. An existing `out` is an error unless
    /// `overwrite`; it is replaced only when [`finish`](Self::finish) succeeds.
    pub fn create(out: &Path, c: usize, h: usize, w: usize, overwrite: bool) -> Result<Self> {
        if c == 0 || h == 0 || w == 0 {
            return Err(DataError::config("image size", format!("{c}x{h}x{w} has a zero side")));
        }
        let partial = crate::staging::begin(out, overwrite)?;
        let record = c * h * w;
        Ok(Self {
            out: out.to_path_buf(),
            partial,
            record,
            dims: (c, h, w),
            per_shard: (SHARD_BYTES / record).max(1),
            shards: Vec::new(),
            current: None,
            in_current: 0,
            labels: Vec::new(),
            count: 0,
        })
    }

    /// Uses `n` records per shard (tests; the default targets [`SHARD_BYTES`]).
    pub fn with_records_per_shard(mut self, n: usize) -> Self {
        self.per_shard = n.max(1);
        self
    }

    /// Appends one image (`c * h * w` bytes) with its label.
    pub fn push(&mut self, pixels: &[u8], label: Option<u32>) -> Result<()> {
        if pixels.len() != self.record {
            return Err(DataError::config(
                "record",
                format!(
                    "{} bytes, the store holds {}x{}x{} images",
                    pixels.len(),
                    self.dims.0,
                    self.dims.1,
                    self.dims.2
                ),
            ));
        }
        let labelled_so_far = !self.labels.is_empty();
        if self.count > 0 && label.is_some() != labelled_so_far {
            return Err(DataError::config("label", "a store is either fully labelled or unlabelled"));
        }
        if self.current.is_none() || self.in_current == self.per_shard {
            self.close_shard()?;
            let name = format!("shard-{:05}.u8", self.shards.len());
            let path = self.partial.join(&name);
            self.current = Some(BufWriter::new(io(&path, File::create(&path))?));
            self.shards.push(name);
            self.in_current = 0;
        }
        let path = self.partial.join(self.shards.last().expect("a shard is open"));
        io(&path, self.current.as_mut().expect("a shard is open").write_all(pixels))?;
        if let Some(l) = label {
            self.labels.push(l);
        }
        self.in_current += 1;
        self.count += 1;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(mut f) = self.current.take() {
            let path = self.partial.join(self.shards.last().expect("a shard is open"));
            io(&path, f.flush())?;
            io(&path, f.get_ref().sync_all())?;
        }
        Ok(())
    }

    /// Writes the labels and the manifest, then moves the store into place.
    pub fn finish(mut self, classes: Vec<String>, source: &str, skipped: BTreeMap<String, usize>) -> Result<Manifest> {
        self.close_shard()?;
        if self.count == 0 {
            let _ = std::fs::remove_dir_all(&self.partial);
            return Err(DataError::Empty { path: PathBuf::from(source) });
        }
        let labelled = !self.labels.is_empty();
        let class_counts = crate::staging::class_counts(&self.labels, classes.len());
        let num_classes = class_counts.len();
        if labelled {
            let path = self.partial.join("labels.u32");
            let bytes: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
            io(&path, std::fs::write(&path, bytes))?;
            sync_file(&path)?;
        }
        let (c, h, w) = self.dims;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            count: self.count,
            channels: c,
            height: h,
            width: w,
            labelled,
            num_classes,
            classes,
            class_counts,
            records_per_shard: self.per_shard,
            shards: self.shards.clone(),
            source: source.into(),
            skipped,
        };
        let path = self.partial.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
        io(&path, std::fs::write(&path, text))?;
        sync_file(&path)?;
        crate::staging::commit(&self.partial, &self.out)?;
        Ok(manifest)
    }
}

/// Reads a store's manifest, checking its format and version.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    if !path.is_file() {
        let hint = if dir
            .with_file_name(format!("{}.partial", dir.file_name().unwrap_or_default().to_string_lossy()))
            .exists()
        {
            "no manifest.json (a pack into this path was interrupted: run it again)"
        } else {
            "no manifest.json: not a selfsup shard store"
        };
        return Err(DataError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, hint)));
    }
    let text = io(&path, std::fs::read_to_string(&path))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Record {
        path: path.clone(),
        key: "manifest".into(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| DataError::Record { path: path.clone(), key: "manifest".into(), reason };
    if m.format != FORMAT || m.version != VERSION {
        return Err(bad(format!("format {} v{}, expected {FORMAT} v{VERSION}", m.format, m.version)));
    }
    if m.count == 0 || m.channels == 0 || m.height == 0 || m.width == 0 || m.records_per_shard == 0 {
        return Err(bad("zero count, image side or shard size".into()));
    }
    if m.shards.len() != m.count.div_ceil(m.records_per_shard) {
        return Err(bad(format!(
            "{} shards for {} records of {} per shard",
            m.shards.len(),
            m.count,
            m.records_per_shard
        )));
    }
    if m.shards.iter().any(|s| s.contains('/') || s.contains('\\') || s.starts_with('.')) {
        return Err(bad("a shard name is not a plain file name".into()));
    }
    Ok(m)
}

/// Opens a store as an [`ImageSet`] whose pixels are memory-mapped.
pub fn open(dir: &Path) -> Result<ImageSet> {
    let m = read_manifest(dir)?;
    let record = m.channels * m.height * m.width;
    let mut maps = Vec::with_capacity(m.shards.len());
    for (k, name) in m.shards.iter().enumerate() {
        let path = dir.join(name);
        let records = m.records_per_shard.min(m.count - k * m.records_per_shard);
        let file = io(&path, File::open(&path))?;
        let len = io(&path, file.metadata())?.len() as usize;
        if len != records * record {
            return Err(DataError::Truncated { path, expected: records * record, found: len });
        }
        // SAFETY: the store is immutable once packed (written to a temp dir and renamed in);
        // a file truncated underneath a running reader is outside what selfsup supports.
        maps.push(io(&path, unsafe { memmap2::Mmap::map(&file) })?);
    }
    let labels = if m.labelled {
        let path = dir.join("labels.u32");
        let bytes = io(&path, std::fs::read(&path))?;
        if bytes.len() != 4 * m.count {
            return Err(DataError::Truncated { path, expected: 4 * m.count, found: bytes.len() });
        }
        let labels: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= m.num_classes) {
            return Err(DataError::Record {
                path,
                key: format!("record {i}"),
                reason: format!("label {l} is not below num_classes = {}", m.num_classes),
            });
        }
        Some(labels)
    } else {
        None
    };
    Ok(ImageSet {
        pixels: Pixels::Mapped { shards: Arc::new(maps), per_shard: m.records_per_shard },
        labels,
        n: m.count,
        c: m.channels,
        h: m.height,
        w: m.width,
        num_classes: m.num_classes,
    })
}

/// Packs an in-memory or mapped set into a store (e.g. IDX or CIFAR to shards).
pub fn pack_set(set: &ImageSet, out: &Path, overwrite: bool, source: &str) -> Result<Manifest> {
    let mut w = ShardWriter::create(out, set.c, set.h, set.w, overwrite)?;
    for i in 0..set.n {
        w.push(set.image(i), set.labels.as_ref().map(|l| l[i]))?;
    }
    w.finish(Vec::new(), source, BTreeMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic_stripes;

    #[test]
    fn packs_and_maps_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(23, 8, 3, 1);
        let out = dir.path().join("store");
        let mut w = ShardWriter::create(&out, 1, 8, 8, false).unwrap().with_records_per_shard(5);
        for i in 0..set.n {
            w.push(set.image(i), Some(set.labels.as_ref().unwrap()[i])).unwrap();
        }
        let mut skipped = BTreeMap::new();
        skipped.insert("corrupt".to_string(), 2);
        let m = w.finish(vec!["a".into(), "b".into(), "c".into()], "synthetic", skipped).unwrap();
        assert_eq!((m.count, m.shards.len(), m.num_classes), (23, 5, 3));
        assert_eq!(m.class_counts, [8, 8, 7]);
        assert!(!dir.path().join("store.partial").exists());
        let back = open(&out).unwrap();
        assert_eq!((back.n, back.c, back.h, back.w), (23, 1, 8, 8));
        assert_eq!(back.to_vec(), set.to_vec());
        assert_eq!(back.labels, set.labels);
        assert_eq!(back.take(7).image(6), set.image(6));
        assert_eq!(read_manifest(&out).unwrap().skipped["corrupt"], 2);
    }

    #[test]
    fn refuses_to_overwrite_and_never_reads_a_partial_store() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(4, 4, 2, 1);
        let out = dir.path().join("s");
        pack_set(&set, &out, false, "x").unwrap();
        let e = pack_set(&set, &out, false, "x").unwrap_err().to_string();
        assert!(e.contains("exists; pass --overwrite"), "{e}");
        pack_set(&set.take(3), &out, true, "x").unwrap();
        assert_eq!(open(&out).unwrap().n, 3);

        // An interrupted pack: records written, never finished.
        let out2 = dir.path().join("t");
        let mut w = ShardWriter::create(&out2, 1, 4, 4, false).unwrap();
        w.push(set.image(0), Some(0)).unwrap();
        drop(w);
        let e = open(&out2).unwrap_err().to_string();
        assert!(e.contains("t: "), "{e}");
        // Even a copied partial directory has no manifest, so it does not read as a store.
        let e = open(&dir.path().join("t.partial")).unwrap_err().to_string();
        assert!(e.contains("no manifest.json"), "{e}");
    }

    #[test]
    fn damaged_stores_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(6, 4, 2, 1);
        let out = dir.path().join("s");
        pack_set(&set, &out, false, "x").unwrap();
        let shard = out.join("shard-00000.u8");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
        let e = open(&out).unwrap_err().to_string();
        assert!(e.contains("shard-00000.u8") && e.contains("truncated"), "{e}");
        std::fs::write(&shard, &bytes).unwrap();
        let mut labels = std::fs::read(out.join("labels.u32")).unwrap();
        labels[4] = 9;
        std::fs::write(out.join("labels.u32"), &labels).unwrap();
        let e = open(&out).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("label 9"), "{e}");
        std::fs::write(out.join("manifest.json"), "{\"format\": 1}").unwrap();
        let e = open(&out).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("manifest"), "{e}");
    }

    /// Random bytes as a manifest, shard or label file: an error, never a panic.
    #[test]
    fn random_bytes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(5, 4, 2, 1);
        let out = dir.path().join("s");
        let mut rng = selfsup_ops::rng::Rng::new(5);
        for trial in 0..200 {
            pack_set(&set, &out, true, "x").unwrap();
            let victim = ["manifest.json", "shard-00000.u8", "labels.u32"][trial % 3];
            let len = rng.below(300);
            let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            std::fs::write(out.join(victim), junk).unwrap();
            let _ = open(&out);
        }
    }
}
