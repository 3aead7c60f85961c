//! Class-index masks as PNG files, and scoring a folder of predicted masks against a folder of
//! ground-truth masks (`selfsup eval segment`).
//!
//! A mask is a PNG whose pixel values are class indices: 8- or 16-bit greyscale, or a palette
//! image whose *indices* are the classes (the Pascal VOC convention; the palette colours are
//! ignored). RGB masks are refused, since their class mapping is ambiguous. Predictions are
//! matched to targets by file name; a target without a prediction, or a pair of different
//! sizes, is an error naming the file, because scoring only what is there would inflate the
//! result. Predictions without a target are counted and listed, not scored.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::segmentation::{ConfusionMatrix, SegmentationMetrics};

/// A mask of class indices, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u32>,
}

/// Reads a class-index PNG (see the module docs for the accepted formats).
pub fn read_mask_png(path: &Path) -> Result<Mask, String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = File::open(path).map_err(|e| err(&e))?;
    let mut dec = png::Decoder::new(BufReader::new(file));
    // Palette indices must stay indices: no expansion to RGB.
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| err(&e))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| err(&e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let bits = info.bit_depth as usize;
    let mut labels = Vec::with_capacity(w * h);
    match (info.color_type, bits) {
        (png::ColorType::Grayscale | png::ColorType::Indexed, 1 | 2 | 4 | 8) => {
            let mask = (1u16 << bits) as u32 - 1;
            for row in buf.chunks(info.line_size).take(h) {
                for x in 0..w {
                    let bit = x * bits;
                    let byte = row[bit / 8] as u32;
                    labels.push((byte >> (8 - bits - bit % 8)) & mask);
                }
            }
        }
        (png::ColorType::Grayscale, 16) => {
            for row in buf.chunks(info.line_size).take(h) {
                labels.extend(row[..2 * w].chunks(2).map(|p| u16::from_be_bytes([p[0], p[1]]) as u32));
            }
        }
        (ct, _) => {
            return Err(err(&format!(
                "{ct:?} {bits}-bit PNG; a class mask must be greyscale (8/16-bit) or a palette image"
            )))
        }
    }
    Ok(Mask { width: w, height: h, labels })
}

/// Writes `mask` as an 8-bit greyscale PNG (16-bit if a label exceeds 255).
pub fn write_mask_png(path: &Path, mask: &Mask) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if mask.labels.len() != mask.width * mask.height {
        return Err(err(&format!("{} labels for a {}x{} mask", mask.labels.len(), mask.width, mask.height)));
    }
    let wide = mask.labels.iter().any(|&l| l > 255);
    if mask.labels.iter().any(|&l| l > u16::MAX as u32) {
        return Err(err(&"labels above 65535 do not fit a PNG"));
    }
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), mask.width as u32, mask.height as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(if wide { png::BitDepth::Sixteen } else { png::BitDepth::Eight });
    let mut writer = enc.write_header().map_err(|e| err(&e))?;
    let data: Vec<u8> = if wide {
        mask.labels.iter().flat_map(|&l| (l as u16).to_be_bytes()).collect()
    } else {
        mask.labels.iter().map(|&l| l as u8).collect()
    };
    writer.write_image_data(&data).map_err(|e| err(&e))?;
    writer.finish().map_err(|e| err(&e))
}

/// The result of scoring a folder of predictions.
#[derive(Debug, Clone, Serialize)]
pub struct FolderScore {
    pub metrics: SegmentationMetrics,
    pub images: usize,
    /// Prediction files with no target of the same name (not scored).
    pub unmatched_predictions: Vec<String>,
}

fn pngs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let p = e.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Scores every target mask in `truth` against the prediction of the same name in `pred`,
/// accumulating one confusion matrix over all pixels.
pub fn score_mask_folders(
    pred: &Path,
    truth: &Path,
    num_classes: usize,
    ignore_index: Option<u32>,
) -> Result<FolderScore, String> {
    let targets = pngs(truth)?;
    if targets.is_empty() {
        return Err(format!("{}: no PNG masks", truth.display()));
    }
    let mut missing = Vec::new();
    for t in &targets {
        if !pred.join(t.file_name().expect("a file")).is_file() {
            missing.push(t.file_name().expect("a file").to_string_lossy().into_owned());
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "{}: no prediction for {} of {} target masks (first: {})",
            pred.display(),
            missing.len(),
            targets.len(),
            missing[..missing.len().min(5)].join(", ")
        ));
    }
    let mut cm = ConfusionMatrix::new(num_classes);
    for t in &targets {
        let p = pred.join(t.file_name().expect("a file"));
        let (pm, tm) = (read_mask_png(&p)?, read_mask_png(t)?);
        if (pm.width, pm.height) != (tm.width, tm.height) {
            return Err(format!(
                "{} is {}x{} but its target {} is {}x{}",
                p.display(),
                pm.width,
                pm.height,
                t.display(),
                tm.width,
                tm.height
            ));
        }
        cm.update(&pm.labels, &tm.labels, ignore_index)
            .map_err(|e| format!("{} vs {}: {e}", p.display(), t.display()))?;
    }
    let target_names: std::collections::HashSet<_> = targets.iter().filter_map(|t| t.file_name()).collect();
    let unmatched_predictions = pngs(pred)?
        .iter()
        .filter_map(|p| p.file_name())
        .filter(|n| !target_names.contains(n))
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    Ok(FolderScore { metrics: cm.metrics(), images: targets.len(), unmatched_predictions })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(w: usize, h: usize, f: impl Fn(usize, usize) -> u32) -> Mask {
        Mask {
            width: w,
            height: h,
            labels: (0..h).flat_map(|y| (0..w).map(move |x| (y, x))).map(|(y, x)| f(y, x)).collect(),
        }
    }

    #[test]
    fn png_round_trips_8_and_16_bit_and_reads_palette_indices() {
        let dir = tempfile::tempdir().unwrap();
        for m in [mask(5, 3, |y, x| ((y * 5 + x) % 4) as u32), mask(3, 2, |y, x| (y * 1000 + x) as u32)] {
            let p = dir.path().join("m.png");
            write_mask_png(&p, &m).unwrap();
            assert_eq!(read_mask_png(&p).unwrap(), m);
        }
        // A 4-bit palette image (VOC style): indices come back, not colours.
        let p = dir.path().join("pal.png");
        {
            let mut enc = png::Encoder::new(BufWriter::new(File::create(&p).unwrap()), 3, 2);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Four);
            enc.set_palette((0..16u8).flat_map(|i| [i * 16, 255 - i, 7]).collect::<Vec<_>>());
            let mut w = enc.write_header().unwrap();
            // Rows of 3 4-bit pixels, padded to 2 bytes: (1, 2, 3), (15, 0, 7).
            w.write_image_data(&[0x12, 0x30, 0xF0, 0x70]).unwrap();
        }
        assert_eq!(read_mask_png(&p).unwrap().labels, [1, 2, 3, 15, 0, 7]);
        // RGB is refused with the file named.
        let p = dir.path().join("rgb.png");
        {
            let mut enc = png::Encoder::new(BufWriter::new(File::create(&p).unwrap()), 1, 1);
            enc.set_color(png::ColorType::Rgb);
            enc.write_header().unwrap().write_image_data(&[1, 2, 3]).unwrap();
        }
        let e = read_mask_png(&p).unwrap_err();
        assert!(e.contains("rgb.png") && e.contains("Rgb"), "{e}");
        std::fs::write(dir.path().join("bad.png"), b"\x89PNG truncated").unwrap();
        assert!(read_mask_png(&dir.path().join("bad.png")).unwrap_err().contains("bad.png"));
    }

    #[test]
    fn folders_score_like_the_confusion_matrix_and_refuse_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let (pred, truth) = (dir.path().join("pred"), dir.path().join("truth"));
        std::fs::create_dir_all(&pred).unwrap();
        std::fs::create_dir_all(&truth).unwrap();
        // Image a: 4 pixels, target (0, 0, 1, 1), prediction (0, 1, 1, 1).
        // Image b: target (1, 255, 0, 0) with 255 ignored, prediction all 0.
        write_mask_png(&truth.join("a.png"), &Mask { width: 2, height: 2, labels: vec![0, 0, 1, 1] }).unwrap();
        write_mask_png(&pred.join("a.png"), &Mask { width: 2, height: 2, labels: vec![0, 1, 1, 1] }).unwrap();
        write_mask_png(&truth.join("b.png"), &Mask { width: 2, height: 2, labels: vec![1, 255, 0, 0] }).unwrap();
        write_mask_png(&pred.join("b.png"), &Mask { width: 2, height: 2, labels: vec![0, 0, 0, 0] }).unwrap();
        write_mask_png(&pred.join("extra.png"), &Mask { width: 1, height: 1, labels: vec![0] }).unwrap();
        let s = score_mask_folders(&pred, &truth, 2, Some(255)).unwrap();
        // Class 0: TP 3, FP 1, FN 1 -> IoU 3/5; class 1: TP 2, FP 1, FN 1 -> IoU 2/4.
        assert_eq!(s.images, 2);
        assert!((s.metrics.iou[0] - 60.0).abs() < 1e-9 && (s.metrics.iou[1] - 50.0).abs() < 1e-9, "{s:?}");
        assert!((s.metrics.pixel_accuracy - 500.0 / 7.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.unmatched_predictions, ["extra.png"]);

        write_mask_png(&truth.join("c.png"), &Mask { width: 2, height: 2, labels: vec![0; 4] }).unwrap();
        let e = score_mask_folders(&pred, &truth, 2, Some(255)).unwrap_err();
        assert!(e.contains("no prediction for 1 of 3 target masks (first: c.png)"), "{e}");
        write_mask_png(&pred.join("c.png"), &Mask { width: 1, height: 4, labels: vec![0; 4] }).unwrap();
        let e = score_mask_folders(&pred, &truth, 2, Some(255)).unwrap_err();
        assert!(e.contains("c.png is 1x4 but its target") && e.contains("is 2x2"), "{e}");
    }
}
