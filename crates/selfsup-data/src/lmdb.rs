//! LMDB stores of encoded images + labels (through `heed`), decoded when read.
//!
//! The store is an LMDB environment directory (`data.mdb`, `lock.mdb`) with two databases:
//! - `images`: key = record index as a big-endian u64, value = the label as a little-endian
//!   u32 (`u32::MAX` when unlabelled) followed by the encoded image (JPEG, PNG, ...) exactly as
//!   the source file held it, so nothing is lost to re-encoding;
//! - `meta`: `manifest` = the JSON [`Manifest`] (count, decode channels, classes, per-class
//!   counts, what the packer skipped and why).
//!
//! Packing writes a sibling `<out>.partial` directory, commits the manifest in the last
//! transaction, and renames the directory into place: an interrupted pack leaves no store that
//! opens. Every image is decoded once while packing, so corrupt or over-limit files are skipped
//! and counted then; a record that still fails to decode when read (a damaged disk) is an
//! error naming its key, which the loader skips and counts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heed::byteorder::BE;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, WithoutTls};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::folder::{DecodeOptions, ImageFolder, Skip, Skipped};
use crate::source::{Image, Source};

pub const FORMAT: &str = "selfsup-lmdb";
pub const VERSION: u32 = 1;
const NO_LABEL: u32 = u32::MAX;
/// Address space reserved for a store being written (the file grows as needed).
const WRITE_MAP_SIZE: usize = 1 << 40;

type Images = Database<U64<BE>, Bytes>;
type Meta = Database<Str, Str>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub count: usize,
    /// Channels images are decoded to (1 grey, 3 RGB).
    pub channels: usize,
    pub labelled: bool,
    pub num_classes: usize,
    #[serde(default)]
    pub classes: Vec<String>,
    pub class_counts: Vec<usize>,
    pub source: String,
    #[serde(default)]
    pub skipped: BTreeMap<String, usize>,
    /// Images with more pixels are refused when read (decode memory bound).
    pub max_pixels: u64,
}

fn lmdb_err(path: &Path, e: heed::Error) -> DataError {
    DataError::io(path, std::io::Error::other(e.to_string()))
}

/// An open store.
pub struct LmdbStore {
    path: PathBuf,
    env: Env<WithoutTls>,
    images: Images,
    labels: Vec<u32>,
    pub manifest: Manifest,
}

impl std::fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LmdbStore({}, {} images)", self.path.display(), self.manifest.count)
    }
}

impl LmdbStore {
    /// Opens a packed store read-only, checking its manifest and reading its labels.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("data.mdb").is_file() {
            return Err(DataError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no data.mdb: not an LMDB store"),
            ));
        }
        let size = std::fs::metadata(path.join("data.mdb")).map_err(|e| DataError::io(path, e))?.len() as usize;
        // SAFETY: the store is opened read-only and never modified while selfsup reads it.
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .map_size(size.next_multiple_of(1 << 20).max(1 << 20))
                .max_dbs(2)
                .flags(EnvFlags::READ_ONLY)
                .open(path)
        }
        .map_err(|e| lmdb_err(path, e))?;
        let bad = |reason: String| DataError::Record { path: path.to_path_buf(), key: "manifest".into(), reason };
        let rtxn = env.read_txn().map_err(|e| lmdb_err(path, e))?;
        let meta: Meta = env
            .open_database(&rtxn, Some("meta"))
            .map_err(|e| lmdb_err(path, e))?
            .ok_or_else(|| bad("no `meta` database (an unfinished pack?)".into()))?;
        let images: Images = env
            .open_database(&rtxn, Some("images"))
            .map_err(|e| lmdb_err(path, e))?
            .ok_or_else(|| bad("no `images` database".into()))?;
        // Database handles opened in a read transaction are shared only once it commits.
        rtxn.commit().map_err(|e| lmdb_err(path, e))?;
        let rtxn = env.read_txn().map_err(|e| lmdb_err(path, e))?;
        let text = meta.get(&rtxn, "manifest").map_err(|e| lmdb_err(path, e))?.ok_or_else(|| bad("missing".into()))?;
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(bad(format!("format {} v{}, expected {FORMAT} v{VERSION}", manifest.format, manifest.version)));
        }
        if manifest.channels != 1 && manifest.channels != 3 {
            return Err(bad(format!("{} channels", manifest.channels)));
        }
        let mut labels = Vec::with_capacity(manifest.count);
        for i in 0..manifest.count {
            let v = images.get(&rtxn, &(i as u64)).map_err(|e| lmdb_err(path, e))?.ok_or_else(|| {
                DataError::Record { path: path.into(), key: format!("record {i}"), reason: "missing".into() }
            })?;
            if v.len() < 4 {
                return Err(DataError::Record {
                    path: path.into(),
                    key: format!("record {i}"),
                    reason: "shorter than its label".into(),
                });
            }
            let l = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            if manifest.labelled && l as usize >= manifest.num_classes {
                return Err(DataError::Record {
                    path: path.into(),
                    key: format!("record {i}"),
                    reason: format!("label {l} is not below num_classes = {}", manifest.num_classes),
                });
            }
            labels.push(l);
        }
        drop(rtxn);
        Ok(Self { path: path.to_path_buf(), env, images, labels, manifest })
    }

    /// The encoded bytes of record `i`.
    pub fn encoded(&self, i: usize) -> Result<Vec<u8>> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb_err(&self.path, e))?;
        let v = self.images.get(&rtxn, &(i as u64)).map_err(|e| lmdb_err(&self.path, e))?;
        let v =
            v.ok_or_else(|| DataError::Record { path: self.path.clone(), key: self.key(i), reason: "missing".into() })?;
        Ok(v[4..].to_vec())
    }
}

impl Source for LmdbStore {
    fn len(&self) -> usize {
        self.manifest.count
    }
    fn channels(&self) -> usize {
        self.manifest.channels
    }
    fn label(&self, i: usize) -> Option<u32> {
        self.manifest.labelled.then(|| self.labels[i])
    }
    fn num_classes(&self) -> usize {
        self.manifest.num_classes
    }
    fn image(&self, i: usize) -> Result<Image<'_>> {
        let bytes = self.encoded(i)?;
        let fail = |why: Skip| DataError::Record { path: self.path.clone(), key: self.key(i), reason: why.to_string() };
        let (c, h, w, pixels) =
            decode_native(&bytes, self.manifest.channels, self.manifest.max_pixels).map_err(fail)?;
        Ok(Image { pixels: Cow::Owned(pixels), c, h, w })
    }
}

/// Decodes at the image's own size to `channels` (alpha dropped), channel-first.
pub fn decode_native(
    bytes: &[u8],
    channels: usize,
    max_pixels: u64,
) -> std::result::Result<(usize, usize, usize, Vec<u8>), Skip> {
    use image::ImageDecoder;
    let unreadable = |e: image::ImageError| Skip::Unreadable(e.to_string());
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Skip::Unreadable(e.to_string()))?;
    // One header parse: the decoder knows the size before any pixel is decoded.
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > max_pixels {
        return Err(Skip::TooLarge { width: w, height: h });
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    decoder.set_limits(limits).map_err(unreadable)?;
    let img = image::DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(Skip::Unreadable("zero-sized image".into()));
    }
    let pixels = if channels == 1 {
        img.into_luma8().into_raw()
    } else {
        // HWC -> CHW, one plane at a time (sequential writes).
        let rgb = img.into_rgb8().into_raw();
        let mut out = vec![0u8; 3 * w * h];
        for (c, plane) in out.chunks_exact_mut(w * h).enumerate() {
            plane.iter_mut().zip(rgb.chunks_exact(3)).for_each(|(d, p)| *d = p[c]);
        }
        out
    };
    Ok((channels, h, w, pixels))
}

/// Streams encoded records into a new store.
pub struct LmdbWriter {
    out: PathBuf,
    partial: PathBuf,
    env: Env<WithoutTls>,
    images: Images,
    meta: Meta,
    txn_pending: Vec<(u64, Vec<u8>)>,
    count: usize,
    labels: Vec<u32>,
    channels: usize,
    max_pixels: u64,
}

impl LmdbWriter {
    pub fn create(out: &Path, channels: usize, max_pixels: u64, overwrite: bool) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(DataError::config("channels", format!("{channels} is not 1 or 3")));
        }
        let partial = crate::staging::begin(out, overwrite)?;
        // SAFETY: a fresh directory only this writer uses.
        let env =
            unsafe { EnvOpenOptions::new().read_txn_without_tls().map_size(WRITE_MAP_SIZE).max_dbs(2).open(&partial) }
                .map_err(|e| lmdb_err(&partial, e))?;
        let mut wtxn = env.write_txn().map_err(|e| lmdb_err(&partial, e))?;
        let images: Images = env.create_database(&mut wtxn, Some("images")).map_err(|e| lmdb_err(&partial, e))?;
        let meta: Meta = env.create_database(&mut wtxn, Some("meta")).map_err(|e| lmdb_err(&partial, e))?;
        wtxn.commit().map_err(|e| lmdb_err(&partial, e))?;
        Ok(Self {
            out: out.to_path_buf(),
            partial,
            env,
            images,
            meta,
            txn_pending: Vec::new(),
            count: 0,
            labels: Vec::new(),
            channels,
            max_pixels,
        })
    }

    /// Appends one encoded image with its label (all labelled or none).
    pub fn push(&mut self, encoded: &[u8], label: Option<u32>) -> Result<()> {
        if self.count > 0 && label.is_some() == self.labels.is_empty() {
            return Err(DataError::config("label", "a store is either fully labelled or unlabelled"));
        }
        let mut v = Vec::with_capacity(4 + encoded.len());
        v.extend_from_slice(&label.unwrap_or(NO_LABEL).to_le_bytes());
        v.extend_from_slice(encoded);
        self.txn_pending.push((self.count as u64, v));
        if let Some(l) = label {
            self.labels.push(l);
        }
        self.count += 1;
        if self.txn_pending.len() >= 1024 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|e| lmdb_err(&self.partial, e))?;
        for (k, v) in self.txn_pending.drain(..) {
            self.images.put(&mut wtxn, &k, &v).map_err(|e| lmdb_err(&self.partial, e))?;
        }
        wtxn.commit().map_err(|e| lmdb_err(&self.partial, e))
    }

    /// Commits the manifest and moves the store into place.
    pub fn finish(mut self, classes: Vec<String>, source: &str, skipped: BTreeMap<String, usize>) -> Result<Manifest> {
        self.flush()?;
        if self.count == 0 {
            let _ = std::fs::remove_dir_all(&self.partial);
            return Err(DataError::Empty { path: PathBuf::from(source) });
        }
        let labelled = !self.labels.is_empty();
        let class_counts = crate::staging::class_counts(&self.labels, classes.len());
        let num_classes = class_counts.len();
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            count: self.count,
            channels: self.channels,
            labelled,
            num_classes,
            classes,
            class_counts,
            source: source.into(),
            skipped,
            max_pixels: self.max_pixels,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
        let mut wtxn = self.env.write_txn().map_err(|e| lmdb_err(&self.partial, e))?;
        self.meta.put(&mut wtxn, "manifest", &text).map_err(|e| lmdb_err(&self.partial, e))?;
        wtxn.commit().map_err(|e| lmdb_err(&self.partial, e))?;
        self.env.force_sync().map_err(|e| lmdb_err(&self.partial, e))?;
        let env = self.env.clone();
        drop(env.prepare_for_closing());
        crate::staging::commit(&self.partial, &self.out)?;
        Ok(manifest)
    }
}

/// Packs an image folder: each file's bytes are kept as they are, after a full decode shows
/// they are readable and within `max_pixels` (failures skipped, counted and named).
pub fn pack_folder(
    folder: &ImageFolder,
    out: &Path,
    opts: &DecodeOptions,
    max_bad_fraction: f64,
    overwrite: bool,
    progress: impl FnMut(usize, usize),
) -> Result<(Manifest, Skipped)> {
    let mut writer = LmdbWriter::create(out, opts.channels, opts.max_pixels, overwrite)?;
    // Each file is decoded once to prove it readable; its original bytes are stored.
    let check = |bytes: &[u8]| {
        decode_native(bytes, opts.channels, opts.max_pixels)?;
        Ok(bytes.to_vec())
    };
    let skipped =
        crate::folder::convert_folder(folder, max_bad_fraction, check, |b, label| writer.push(b, label), progress)?;
    let m = writer.finish(folder.classes.clone(), &folder.root.display().to_string(), skipped.by_reason.clone())?;
    Ok((m, skipped))
}

/// Packs decoded images (IDX, CIFAR, shard stores) as PNG records.
pub fn pack_set(set: &crate::ImageSet, out: &Path, overwrite: bool, source: &str) -> Result<Manifest> {
    if set.c != 1 && set.c != 3 {
        return Err(DataError::config("channels", format!("{}-channel images do not fit PNG records", set.c)));
    }
    let mut writer = LmdbWriter::create(out, set.c, (set.h * set.w) as u64, overwrite)?;
    for i in 0..set.n {
        let img = set.image(i);
        let plane = set.h * set.w;
        let hwc: Vec<u8> = if set.c == 1 {
            img.to_vec()
        } else {
            (0..plane).flat_map(|p| [img[p], img[plane + p], img[2 * plane + p]]).collect()
        };
        let mut png = Vec::new();
        let color = if set.c == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            &hwc,
            set.w as u32,
            set.h as u32,
            color,
        )
        .map_err(|e| DataError::Record {
            path: PathBuf::from(source),
            key: format!("record {i}"),
            reason: e.to_string(),
        })?;
        writer.push(&png, set.labels.as_ref().map(|l| l[i]))?;
    }
    writer.finish(Vec::new(), source, BTreeMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic_stripes;

    #[test]
    fn packs_decoded_sets_and_reads_them_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(30, 8, 3, 1);
        let out = dir.path().join("db");
        let m = pack_set(&set, &out, false, "synthetic").unwrap();
        assert_eq!((m.count, m.num_classes, m.channels), (30, 3, 1));
        assert!(!dir.path().join("db.partial").exists());
        let store = LmdbStore::open(&out).unwrap();
        assert_eq!(store.len(), 30);
        for i in [0, 17, 29] {
            let img = store.image(i).unwrap();
            assert_eq!((img.c, img.h, img.w), (1, 8, 8));
            assert_eq!(&*img.pixels, set.image(i));
            assert_eq!(store.label(i), Some(set.labels.as_ref().unwrap()[i]));
        }
        let e = pack_set(&set, &out, false, "x").unwrap_err().to_string();
        assert!(e.contains("pass --overwrite"), "{e}");
    }

    #[test]
    fn unfinished_and_damaged_stores_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let set = synthetic_stripes(4, 8, 2, 1);
        let out = dir.path().join("db");
        let mut w = LmdbWriter::create(&out, 1, 1 << 20, false).unwrap();
        w.push(b"not an image", Some(0)).unwrap();
        drop(w);
        assert!(LmdbStore::open(&out).unwrap_err().to_string().contains("no data.mdb"));
        let e = LmdbStore::open(&dir.path().join("db.partial")).unwrap_err().to_string();
        assert!(e.contains("manifest"), "{e}");

        // A store whose record does not decode: opening works, reading that record names it.
        let mut w = LmdbWriter::create(&out, 1, 1 << 20, true).unwrap();
        w.push(b"garbage", Some(1)).unwrap();
        w.finish(vec![], "x", BTreeMap::new()).unwrap();
        let store = LmdbStore::open(&out).unwrap();
        let e = store.image(0).unwrap_err().to_string();
        assert!(e.contains("record 0"), "{e}");
        let _ = set;
    }

    #[test]
    fn packs_folders_keeping_the_original_bytes_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        for (class, w) in [("a", 40u32), ("b", 24)] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            image::RgbImage::from_fn(w, 20, |x, _| image::Rgb([x as u8 * 5, 100, 7]))
                .save(root.join(class).join("0.png"))
                .unwrap();
        }
        std::fs::write(root.join("b").join("1.jpg"), b"\xff\xd8\xff broken").unwrap();
        let folder = ImageFolder::scan(&root).unwrap();
        let opts = DecodeOptions { size: 0, channels: 3, max_pixels: 1 << 20 };
        let out = dir.path().join("db");
        let (m, skipped) = pack_folder(&folder, &out, &opts, 0.5, false, |_, _| {}).unwrap();
        assert_eq!((m.count, m.num_classes), (2, 2));
        assert_eq!(m.skipped["unreadable or corrupt"], 1);
        assert!(skipped.examples[0].contains("1.jpg"));
        let store = LmdbStore::open(&out).unwrap();
        assert_eq!(store.encoded(1).unwrap(), std::fs::read(root.join("b").join("0.png")).unwrap());
        let img = store.image(0).unwrap();
        assert_eq!((img.c, img.h, img.w), (3, 20, 40));
        assert_eq!((img.pixels[3], img.pixels[800 + 3], img.pixels[1600 + 3]), (15, 100, 7));
    }

    /// Random bytes in a record never panic the reader.
    #[test]
    fn random_records_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("db");
        let mut w = LmdbWriter::create(&out, 3, 1 << 16, false).unwrap();
        let mut rng = selfsup_ops::rng::Rng::new(4);
        let magics: [&[u8]; 4] = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"];
        for i in 0..400 {
            let mut bytes = magics[i % 4].to_vec();
            bytes.extend((0..rng.below(100)).map(|_| rng.next_u64() as u8));
            w.push(&bytes, None).unwrap();
        }
        w.finish(vec![], "fuzz", BTreeMap::new()).unwrap();
        let store = LmdbStore::open(&out).unwrap();
        for i in 0..400 {
            let _ = store.image(i);
        }
    }
}
