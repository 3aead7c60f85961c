//! Image folders: `root/<class>/<image>` (labelled; classes sorted by name, as torchvision's
//! `ImageFolder`) or a flat folder of images (unlabelled), decoded through the `image` crate
//! (JPEG through zune-jpeg, PNG, GIF, BMP, WebP, TIFF), and packed into shard stores.
//!
//! Decoding follows torchvision's loader: `Image.open(f).convert('RGB')` drops alpha (or
//! `convert('L')` for one channel); then Resize(shorter side = size, antialiased bilinear) +
//! CenterCrop(size), which makes every record the same size. An image whose header promises
//! more than `max_pixels` pixels is refused before any pixel is decoded (Debian's
//! `openclipart-png` has files over 50 Mpx). A file that does not decode is skipped, counted by
//! reason and named; when more than `max_bad_fraction` of the files are skipped the pack stops
//! with an error rather than producing a store that silently lacks much of the source.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::shards::{Manifest, ShardWriter};

/// File extensions read as images (case-insensitive).
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];

/// The images of a folder, in a deterministic order (classes by name, then files by name).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub files: Vec<(PathBuf, Option<u32>)>,
    /// Class names in label order; empty for a flat folder.
    pub classes: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden
        && p.is_file()
        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        out.push(e.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Every image under `dir`, recursively (as torchvision's `ImageFolder` walks a class
/// directory), in name order; hidden entries and symlinked directories (cycles) are skipped.
fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in sorted_entries(dir)? {
        let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        let link = std::fs::symlink_metadata(&p).map(|m| m.file_type().is_symlink()).unwrap_or(true);
        if hidden {
            continue;
        }
        if p.is_dir() {
            if !link {
                walk_images(&p, out)?;
            }
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Lists `root`: if it has sub-folders, each is a class and the images anywhere below it
    /// are labelled (images directly in `root` are then not used); otherwise its images are
    /// unlabelled.
    pub fn scan(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(DataError::io(root, std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory")));
        }
        let entries = sorted_entries(root)?;
        let class_dirs: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.is_dir() && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
            .collect();
        let (mut files, mut classes) = (Vec::new(), Vec::new());
        if class_dirs.is_empty() {
            files.extend(entries.iter().filter(|p| is_image(p)).map(|p| (p.clone(), None)));
        } else {
            for dir in class_dirs {
                let label = classes.len() as u32;
                classes.push(dir.file_name().expect("a directory name").to_string_lossy().into_owned());
                let mut images = Vec::new();
                walk_images(dir, &mut images)?;
                files.extend(images.into_iter().map(|p| (p, Some(label))));
            }
        }
        if files.is_empty() {
            return Err(DataError::Empty { path: root.to_path_buf() });
        }
        Ok(Self { root: root.to_path_buf(), files, classes })
    }
}

/// How images are decoded and sized.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// Output side: shorter side resized to it, then centre-cropped to a square.
    pub size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Largest width x height decoded; bigger images are skipped.
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { size: 224, channels: 3, max_pixels: 40_000_000 }
    }
}

/// Why an image was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    TooLarge {
        width: u32,
        height: u32,
    },
    Unreadable(String),
    /// Decodes, but cannot serve (e.g. a segmentation source without a usable alpha mask).
    Unusable(String),
}

impl Skip {
    /// The manifest's counting key.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::TooLarge { .. } => "over the pixel limit",
            Skip::Unreadable(_) => "unreadable or corrupt",
            Skip::Unusable(_) => "no usable alpha mask",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::TooLarge { width, height } => write!(f, "{width}x{height} is over the pixel limit"),
            Skip::Unreadable(e) | Skip::Unusable(e) => write!(f, "{e}"),
        }
    }
}

/// Decodes encoded image bytes into a (channels, size, size) u8 record.
pub fn decode(bytes: &[u8], opts: &DecodeOptions) -> std::result::Result<Vec<u8>, Skip> {
    Ok(resize_center_crop(&decode_image(bytes, opts.max_pixels)?, opts))
}

/// Decodes encoded image bytes at their own size, refusing from the header alone any image over
/// `max_pixels` (width x height) before a pixel is decoded.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> std::result::Result<image::DynamicImage, Skip> {
    let unreadable = |e: image::ImageError| Skip::Unreadable(e.to_string());
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Skip::Unreadable(e.to_string()))?;
    let (width, height) = reader.into_dimensions().map_err(unreadable)?;
    if width as u64 * height as u64 > max_pixels {
        return Err(Skip::TooLarge { width, height });
    }
    if width == 0 || height == 0 {
        return Err(Skip::Unreadable("zero-sized image".into()));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Skip::Unreadable(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    reader.decode().map_err(unreadable)
}

/// Resize (shorter side to `size`, triangle filter: antialiased bilinear, as PIL's) + centre
/// crop, as channel-first bytes.
pub fn resize_center_crop(img: &image::DynamicImage, opts: &DecodeOptions) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let s = opts.size;
    // torchvision Resize(int): the shorter side becomes `s`, the other keeps the aspect ratio.
    // The long side is truncated like torchvision's `int(size * long / short)`; it is >= `s`.
    let (nw, nh) = if w <= h { (s, s * h / w) } else { (s * w / h, s) };
    let resized = img.resize_exact(nw as u32, nh as u32, image::imageops::FilterType::Triangle);
    let (top, left) = ((nh - s) / 2, (nw - s) / 2);
    let mut out = vec![0u8; opts.channels * s * s];
    if opts.channels == 1 {
        let g = resized.to_luma8();
        for y in 0..s {
            for x in 0..s {
                out[y * s + x] = g.get_pixel((left + x) as u32, (top + y) as u32)[0];
            }
        }
    } else {
        let rgb = resized.to_rgb8();
        for y in 0..s {
            for x in 0..s {
                let p = rgb.get_pixel((left + x) as u32, (top + y) as u32);
                for c in 0..3 {
                    out[c * s * s + y * s + x] = p[c];
                }
            }
        }
    }
    out
}

/// What a pack skipped: counts by reason and the first files with why.
#[derive(Debug, Default, Clone)]
pub struct Skipped {
    pub by_reason: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

/// Runs `convert` on every file of `folder` (in parallel chunks, results kept in order) and
/// hands each success to `sink` with its label; failures are skipped, counted by reason and
/// named. More than `max_bad_fraction` of the files failing is an error.
pub fn convert_folder(
    folder: &ImageFolder,
    max_bad_fraction: f64,
    convert: impl Fn(&[u8]) -> std::result::Result<Vec<u8>, Skip> + Sync,
    mut sink: impl FnMut(&[u8], Option<u32>) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Skipped> {
    let mut skipped = Skipped::default();
    let total = folder.files.len();
    for (k, chunk) in folder.files.chunks(256).enumerate() {
        let converted: Vec<std::result::Result<Vec<u8>, Skip>> = chunk
            .par_iter()
            .map(|(path, _)| match std::fs::read(path) {
                Ok(bytes) => convert(&bytes),
                Err(e) => Err(Skip::Unreadable(e.to_string())),
            })
            .collect();
        for ((path, label), r) in chunk.iter().zip(converted) {
            match r {
                Ok(record) => sink(&record, *label)?,
                Err(why) => {
                    *skipped.by_reason.entry(why.reason().to_string()).or_default() += 1;
                    if skipped.examples.len() < 100 {
                        skipped.examples.push(format!("{}: {why}", path.display()));
                    }
                }
            }
        }
        progress((k * 256 + chunk.len()).min(total), total);
    }
    let bad: usize = skipped.by_reason.values().sum();
    if bad as f64 > max_bad_fraction * total as f64 {
        return Err(DataError::Record {
            path: folder.root.clone(),
            key: format!("{bad} of {total} images skipped"),
            reason: format!(
                "more than the allowed fraction {max_bad_fraction} ({:?}; first: {})",
                skipped.by_reason,
                skipped.examples.first().map(String::as_str).unwrap_or("-")
            ),
        });
    }
    Ok(skipped)
}

/// Decodes every image of `folder` into a shard store of fixed-size records at `out`.
pub fn pack_folder(
    folder: &ImageFolder,
    out: &Path,
    opts: &DecodeOptions,
    max_bad_fraction: f64,
    overwrite: bool,
    progress: impl FnMut(usize, usize),
) -> Result<(Manifest, Skipped)> {
    if opts.channels != 1 && opts.channels != 3 {
        return Err(DataError::config("channels", format!("{} is not 1 or 3", opts.channels)));
    }
    if opts.size == 0 {
        return Err(DataError::config("size", "must be positive"));
    }
    let mut writer = ShardWriter::create(out, opts.channels, opts.size, opts.size, overwrite)?;
    let skipped =
        convert_folder(folder, max_bad_fraction, |b| decode(b, opts), |px, label| writer.push(px, label), progress)?;
    let manifest =
        writer.finish(folder.classes.clone(), &folder.root.display().to_string(), skipped.by_reason.clone())?;
    Ok((manifest, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) {
        let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(f(x, y)));
        img.save(path).unwrap();
    }

    fn folder(root: &Path) {
        for (class, colour) in [("cat", [200u8, 10, 10, 255]), ("dog", [10, 10, 200, 128])] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            for i in 0..3 {
                write_png(&root.join(class).join(format!("{i}.png")), 40 + i * 10, 20, |_, _| colour);
            }
        }
        std::fs::write(root.join("cat").join("broken.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();
        std::fs::write(root.join("dog").join("notes.txt"), b"ignored").unwrap();
        // Nested folders belong to their top-level class.
        std::fs::create_dir_all(root.join("dog").join("puppies")).unwrap();
        write_png(&root.join("dog").join("puppies").join("p.png"), 20, 20, |_, _| [10, 10, 200, 255]);
    }

    #[test]
    fn scans_classes_in_name_order_and_packs_with_skips_counted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        folder(&root);
        let f = ImageFolder::scan(&root).unwrap();
        assert_eq!(f.classes, ["cat", "dog"]);
        assert_eq!(f.files.len(), 8); // 7 PNGs + the broken JPEG; not the .txt
        let opts = DecodeOptions { size: 16, channels: 3, max_pixels: 1_000_000 };
        let out = dir.path().join("store");
        let (m, skipped) = pack_folder(&f, &out, &opts, 0.5, false, |_, _| {}).unwrap();
        assert_eq!((m.count, m.num_classes), (7, 2));
        assert_eq!(m.class_counts, [3, 4]);
        assert_eq!(m.classes, ["cat", "dog"]);
        assert_eq!(m.skipped["unreadable or corrupt"], 1);
        assert!(skipped.examples[0].contains("broken.jpg"), "{:?}", skipped.examples);
        let set = crate::shards::open(&out).unwrap();
        // Alpha is dropped (torchvision's convert('RGB')): the dog stays pure blue.
        let dog = set.image(3);
        assert_eq!((dog[0], dog[256], dog[512]), (10, 10, 200));
        assert_eq!(set.labels.as_ref().unwrap(), &[0, 0, 0, 1, 1, 1, 1]);

        // Too many bad files is an error naming the folder and the count.
        let e = pack_folder(&f, &dir.path().join("s2"), &opts, 0.1, false, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("1 of 8 images skipped"), "{e}");
        assert!(!dir.path().join("s2").exists());
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding_and_crops_are_centred() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wide.png");
        // 30x10: left third black, middle white, right third black.
        write_png(&p, 30, 10, |x, _| if (10..20).contains(&x) { [255; 4] } else { [0, 0, 0, 255] });
        let bytes = std::fs::read(&p).unwrap();
        let small = DecodeOptions { size: 10, channels: 1, max_pixels: 299 };
        assert_eq!(decode(&bytes, &small), Err(Skip::TooLarge { width: 30, height: 10 }));
        let ok = DecodeOptions { max_pixels: 300, ..small };
        let g = decode(&bytes, &ok).unwrap();
        // Shorter side is already 10: the centre crop is the white middle.
        assert!(g.iter().all(|&v| v == 255), "{g:?}");
        let e = decode(b"GIF89a\x01", &ok).unwrap_err();
        assert!(matches!(e, Skip::Unreadable(_)), "{e:?}");
    }

    /// Random bytes (and random bytes behind real magic numbers) never panic the decoders.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = selfsup_ops::rng::Rng::new(11);
        let opts = DecodeOptions { size: 8, channels: 3, max_pixels: 1 << 20 };
        let magics: [&[u8]; 7] =
            [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP", b"II*\0"];
        for trial in 0..2000 {
            let mut bytes = magics[trial % magics.len()].to_vec();
            let n = rng.below(200);
            bytes.extend((0..n).map(|_| rng.next_u64() as u8));
            let _ = decode(&bytes, &opts);
        }
    }
}
