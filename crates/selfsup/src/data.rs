//! `selfsup data pack` and `selfsup data info`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use selfsup_data::folder::{DecodeOptions, ImageFolder};
use selfsup_data::{cifar, dataset, shards, ImageSet, Split};

/// What kind of source a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Idx,
    Cifar,
    Folder,
    Shards,
    Lmdb,
    PackedSplits,
}

fn detect(path: &Path) -> Result<Kind> {
    if !path.is_dir() {
        bail!("{}: not a directory", path.display())
    }
    let has = |name: &str| path.join(name).is_file() || path.join(format!("{name}.gz")).is_file();
    Ok(if path.join("manifest.json").is_file() {
        Kind::Shards
    } else if path.join("data.mdb").is_file() {
        Kind::Lmdb
    } else if path.join("train/manifest.json").is_file() || path.join("train/data.mdb").is_file() {
        Kind::PackedSplits
    } else if has("train-images-idx3-ubyte") || has("t10k-images-idx3-ubyte") {
        Kind::Idx
    } else if cifar::detect(path).is_ok() {
        Kind::Cifar
    } else {
        Kind::Folder
    })
}

fn kind_named(format: &str, source: &Path) -> Result<Kind> {
    Ok(match format {
        "auto" => detect(source)?,
        "idx" => Kind::Idx,
        "cifar" => Kind::Cifar,
        "folder" => Kind::Folder,
        other => bail!("--format {other:?}: expected auto, idx, cifar or folder"),
    })
}

/// Image folders with split sub-folders: (split, folder) pairs; else the whole folder as train.
fn folder_splits(source: &Path) -> Vec<(Split, PathBuf)> {
    let train = source.join("train");
    let test = ["test", "val"].iter().map(|n| source.join(n)).find(|p| p.is_dir());
    match (train.is_dir(), test) {
        (true, Some(test)) => vec![(Split::Train, train), (Split::Test, test)],
        _ => vec![(Split::Train, source.to_path_buf())],
    }
}

fn progress_bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// The store kind `pack` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Memory-mapped shards of decoded, fixed-size records.
    Shards,
    /// LMDB of encoded images, decoded when read.
    Lmdb,
}

impl Store {
    pub fn named(name: &str) -> Result<Self> {
        match name {
            "shards" => Ok(Store::Shards),
            "lmdb" => Ok(Store::Lmdb),
            other => bail!("--to {other:?}: expected shards or lmdb"),
        }
    }
}

pub fn pack(
    source: &Path,
    out: &Path,
    format: &str,
    store: Store,
    opts: &DecodeOptions,
    max_bad: f64,
    overwrite: bool,
) -> Result<()> {
    let kind = kind_named(format, source)?;
    if out.exists() && !overwrite {
        bail!("{} exists; pass --overwrite to replace it", out.display())
    }
    if !(0.0..=1.0).contains(&max_bad) {
        bail!("--max-bad {max_bad} is not a fraction in [0, 1]")
    }
    if kind == Kind::Folder && store == Store::Shards && opts.size == 0 {
        bail!("packing an image folder into shards needs --size (records are fixed-size)")
    }
    // Everything goes into `<out>.partial` and is renamed into place at the end, so a pack that
    // fails or is interrupted half way leaves no `<out>` that looks complete.
    let name = out.file_name().with_context(|| format!("{} has no file name", out.display()))?;
    let staging = out.with_file_name(format!("{}.partial", name.to_string_lossy()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing the stale {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    pack_into(source, &staging, out, kind, store, opts, max_bad)?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&staging, out).with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
    println!("packed into {}", out.display());
    Ok(())
}

/// Packs into `staging`; messages name the final location `out`.
fn pack_into(
    source: &Path,
    staging: &Path,
    out: &Path,
    kind: Kind,
    store: Store,
    opts: &DecodeOptions,
    max_bad: f64,
) -> Result<()> {
    let overwrite = false;
    match kind {
        Kind::Idx | Kind::Cifar => {
            for split in [Split::Train, Split::Test] {
                let set =
                    if kind == Kind::Idx { dataset::mnist_family(source, split)? } else { cifar::read(source, split)? };
                let (dest, at, name) =
                    (out.join(split.name()), staging.join(split.name()), source.display().to_string());
                let (count, classes) = match store {
                    Store::Shards => {
                        let m = shards::pack_set(&set, &at, overwrite, &name)?;
                        (m.count, m.num_classes)
                    }
                    Store::Lmdb => {
                        let m = selfsup_data::lmdb::pack_set(&set, &at, overwrite, &name)?;
                        (m.count, m.num_classes)
                    }
                };
                println!("{}: {count} images of {}x{}x{}, {classes} classes", dest.display(), set.c, set.h, set.w);
            }
        }
        Kind::Folder => {
            for (split, dir) in folder_splits(source) {
                let folder = ImageFolder::scan(&dir)?;
                let dest = out.join(split.name());
                let bar = progress_bar(folder.files.len(), &format!("packing {}", dir.display()));
                let at = staging.join(split.name());
                let tick = |done: usize, _| bar.set_position(done as u64);
                let (what, skipped) = match store {
                    Store::Shards => {
                        let (m, sk) = selfsup_data::folder::pack_folder(&folder, &at, opts, max_bad, overwrite, tick)?;
                        (
                            format!(
                                "{} images of {}x{}x{}, {} classes",
                                m.count, m.channels, m.height, m.width, m.num_classes
                            ),
                            sk,
                        )
                    }
                    Store::Lmdb => {
                        let (m, sk) = selfsup_data::lmdb::pack_folder(&folder, &at, opts, max_bad, overwrite, tick)?;
                        (
                            format!(
                                "{} encoded images ({} channels when decoded), {} classes",
                                m.count, m.channels, m.num_classes
                            ),
                            sk,
                        )
                    }
                };
                bar.finish_and_clear();
                let skipped_text =
                    if skipped.by_reason.is_empty() { "none".to_string() } else { format!("{:?}", skipped.by_reason) };
                println!("{}: {what}; skipped {skipped_text}", dest.display());
                for e in skipped.examples.iter().take(10) {
                    eprintln!("  skipped {e}");
                }
            }
        }
        Kind::Shards | Kind::Lmdb | Kind::PackedSplits => bail!("{} is already a packed store", source.display()),
    }
    Ok(())
}

fn describe(name: &str, set: &ImageSet, classes: &[String]) {
    println!("{name}: {} images of {}x{}x{}", set.n, set.c, set.h, set.w);
    if let Some(labels) = &set.labels {
        let mut counts = vec![0usize; set.num_classes];
        labels.iter().for_each(|&l| counts[l as usize] += 1);
        println!("  {} classes; per class:", set.num_classes);
        for (c, n) in counts.iter().enumerate() {
            let name = classes.get(c).cloned().unwrap_or_else(|| c.to_string());
            println!("    {name:<20} {n}");
        }
    } else {
        println!("  unlabelled");
    }
}

fn describe_lmdb(path: &Path) -> Result<()> {
    use selfsup_data::Source;
    let store = selfsup_data::lmdb::LmdbStore::open(path)?;
    let m = &store.manifest;
    println!("{}: {} encoded images, decoded to {} channels", path.display(), m.count, m.channels);
    if m.labelled {
        println!("  {} classes; per class:", m.num_classes);
        for (c, n) in m.class_counts.iter().enumerate() {
            let name = m.classes.get(c).cloned().unwrap_or_else(|| c.to_string());
            println!("    {name:<20} {n}");
        }
    } else {
        println!("  unlabelled");
    }
    if !m.skipped.is_empty() {
        println!("  skipped when packed: {:?}", m.skipped);
    }
    // Image sizes from the records' headers, by the longer side.
    let mut sizes = std::collections::BTreeMap::<(u32, u32), usize>::new();
    for i in 0..store.len() {
        let bytes = store.encoded(i)?;
        let r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
        if let Ok(dims) = r.into_dimensions() {
            *sizes.entry(dims).or_default() += 1;
        }
    }
    let shown: Vec<String> = sizes.iter().take(10).map(|((w, h), n)| format!("{w}x{h}: {n}")).collect();
    println!("  sizes (w x h): {}{}", shown.join(", "), if sizes.len() > 10 { ", ..." } else { "" });
    Ok(())
}

pub fn info(path: &Path) -> Result<()> {
    let kind = detect(path)?;
    match kind {
        Kind::Shards => {
            let m = shards::read_manifest(path)?;
            describe(&path.display().to_string(), &shards::open(path)?, &m.classes);
            if !m.skipped.is_empty() {
                println!("  skipped when packed: {:?}", m.skipped);
            }
        }
        Kind::Lmdb => describe_lmdb(path)?,
        Kind::PackedSplits => {
            for split in [Split::Train, Split::Test] {
                let dir = path.join(split.name());
                if dir.join("data.mdb").is_file() {
                    describe_lmdb(&dir)?;
                } else if dir.is_dir() {
                    let m = shards::read_manifest(&dir)?;
                    describe(&dir.display().to_string(), &shards::open(&dir)?, &m.classes);
                }
            }
        }
        Kind::Idx | Kind::Cifar => {
            for split in [Split::Train, Split::Test] {
                let set =
                    if kind == Kind::Idx { dataset::mnist_family(path, split)? } else { cifar::read(path, split)? };
                describe(&format!("{} ({})", path.display(), split.name()), &set, &[]);
            }
        }
        Kind::Folder => {
            for (split, dir) in folder_splits(path) {
                let folder = ImageFolder::scan(&dir)?;
                println!("{} ({}): {} image files", dir.display(), split.name(), folder.files.len());
                if !folder.classes.is_empty() {
                    let mut counts = vec![0usize; folder.classes.len()];
                    folder.files.iter().for_each(|(_, l)| counts[l.unwrap_or(0) as usize] += 1);
                    println!("  {} classes; per class:", folder.classes.len());
                    for (name, n) in folder.classes.iter().zip(&counts) {
                        println!("    {name:<20} {n}");
                    }
                } else {
                    println!("  unlabelled (no class sub-folders)");
                }
                // Image sizes from the headers (no pixel is decoded), by the longer side.
                let edges = [32u32, 64, 128, 256, 512, 1024, 2048, 4096];
                let mut hist = vec![0usize; edges.len() + 1];
                let mut unreadable = 0;
                for (p, _) in &folder.files {
                    match image::ImageReader::open(p).and_then(|r| r.with_guessed_format()).map(|r| r.into_dimensions())
                    {
                        Ok(Ok((w, h))) => hist[edges.iter().position(|&e| w.max(h) <= e).unwrap_or(edges.len())] += 1,
                        _ => unreadable += 1,
                    }
                }
                println!("  longer side:");
                for (i, n) in hist.iter().enumerate().filter(|(_, &n)| n > 0) {
                    let label = if i < edges.len() {
                        format!("<= {}", edges[i])
                    } else {
                        format!("> {}", edges[edges.len() - 1])
                    };
                    println!("    {label:<10} {n}");
                }
                if unreadable > 0 {
                    println!("  unreadable headers: {unreadable}");
                }
            }
        }
    }
    Ok(())
}
