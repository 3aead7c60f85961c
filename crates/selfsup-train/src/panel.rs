//! Panels: the pictures an objective draws (`Objective::panel`) tiled into one PNG per
//! checkpoint, `<output_dir>/samples/step-<step, 8 digits>.png`: one row per image, one column per
//! picture (input, masked input, reconstruction, ...; or CARE's attention map).
//!
//! View-space columns are mapped back to pixels with the first view's mean and std; every value
//! is clamped to [0, 1]; grey images are drawn grey. Small images are enlarged (nearest) so a
//! row is at least 96 px tall. Written atomically, like checkpoints.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use selfsup_objectives::{Column, Space};

use crate::fsutil::write_atomic;

/// Gap between tiles, in pixels (white).
const GAP: usize = 2;
/// Rows are enlarged to at least this height.
const MIN_ROW: usize = 96;

/// Tiles `columns` (each (n, c, h, w), the same n, h, w) into an RGB image and writes it as PNG.
pub fn write_panel(path: &Path, columns: &[Column], mean: &[f32], std: &[f32]) -> Result<()> {
    let Some(first) = columns.first() else { return Ok(()) };
    let (n, _, h, w) = first.images.dims4()?;
    let scale = MIN_ROW.div_ceil(h).max(1);
    let (th, tw) = (h * scale, w * scale);
    let (width, height) = (columns.len() * (tw + GAP) + GAP, n * (th + GAP) + GAP);
    let mut img = image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    for (ci, col) in columns.iter().enumerate() {
        let (cn, c, ch, cw) = col.images.dims4()?;
        if (cn, ch, cw) != (n, h, w) || !(c == 1 || c == 3) {
            bail!("panel column `{}` is {:?}, the first is {:?}", col.title, col.images.dims(), first.images.dims())
        }
        let px = pixels(&col.images, col.space, mean, std)?;
        for i in 0..n {
            for y in 0..th {
                for x in 0..tw {
                    let at = |k: usize| px[((i * c + k) * h + y / scale) * w + x / scale];
                    let rgb = if c == 1 { [at(0); 3] } else { [at(0), at(1), at(2)] };
                    let (ox, oy) = (GAP + ci * (tw + GAP) + x, GAP + i * (th + GAP) + y);
                    img.put_pixel(ox as u32, oy as u32, image::Rgb(rgb));
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_atomic(path, &bytes)
}

/// (n, c, h, w) -> u8 values, undoing the view normalisation for view-space columns.
fn pixels(images: &Tensor, space: Space, mean: &[f32], std: &[f32]) -> Result<Vec<u8>> {
    let (_, c, _, _) = images.dims4()?;
    let v = images.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = v.len() / images.dim(0)?.max(1) / c;
    Ok(v.iter()
        .enumerate()
        .map(|(k, &x)| {
            let ch = (k / plane) % c;
            let x = match space {
                Space::View => {
                    let pick = |t: &[f32]| t.get(ch).or(t.first()).copied().unwrap_or(0.0);
                    x * pick(std) + pick(mean)
                }
                Space::Unit => x,
            };
            (x.clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tiles_columns_and_undoes_the_view_normalisation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples/step-00000001.png");
        // Two 8x8 grey images; view-space value 0 is the mean (0.5 here), 1 is mean + std.
        let view = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let unit = Tensor::ones((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let cols = [
            Column { title: "a", images: view, space: Space::View },
            Column { title: "b", images: unit, space: Space::Unit },
        ];
        write_panel(&path, &cols, &[0.5], &[0.25]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // 96 / 8 = 12x enlargement: 2 columns and 2 rows of 96 px tiles with 2 px gaps.
        assert_eq!(img.dimensions(), (2 * 98 + 2, 2 * 98 + 2));
        assert_eq!(img.get_pixel(2, 2).0, [128, 128, 128]);
        assert_eq!(img.get_pixel(2 + 98 + 5, 2 + 98 + 5).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        let bad = [Column {
            title: "c",
            images: Tensor::zeros((1, 2, 8, 8), DType::F32, &Device::Cpu).unwrap(),
            space: Space::Unit,
        }];
        assert!(write_panel(&path, &bad, &[0.5], &[0.25]).unwrap_err().to_string().contains("panel column `c`"));
    }
}
