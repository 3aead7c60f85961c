//! Window partitions of channels-last maps and their exact inverses: plain non-overlapping
//! windows (Swin, SegNetr's local partition), cyclically shifted windows (Swin), and SegNetr's
//! global (displaced) partition. Each is reshapes, permutes and rolls only (memory moves, no
//! arithmetic), so each is differentiable on any device through candle's own ops.
//!
//! Window order is batch-major (window `g = (b * nh + wy) * nw + wx`), tokens row-major inside
//! a window, so [`crate::attention`] masks indexed `g % n_windows` line up.
//!
//! **SegNetr's global partition** (METHODS.md 1.4) is described, not released as code: "GP = LP
//! plus a displacement of patches so that each group gathers patches that were *not*
//! neighbours", then cut into 2P x 2P blocks. The description of the displacement (odd-indexed
//! patches move one way, even-indexed the other) leaves the exact permutation open. selfsup's
//! choice: along each axis the n patches are interleaved from the two halves of the map, so
//! block `j` holds patches `j` and `j + n/2` along each axis (four patches from the four
//! quadrants, none of them neighbours when n >= 4). It needs an even patch count per axis. The
//! inverse is exact; a test checks the "not neighbours" property.

use candle_core::{Result, Tensor};

fn dims(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    x.dims4().map_err(|_| candle_core::Error::Msg(format!("{what}: input must be (b, h, w, c), got {:?}", x.shape())))
}

/// (b, h, w, c) -> (b * h/wh * w/ww, wh * ww, c): non-overlapping windows.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use selfsup_ops::partition::{window_partition, window_reverse};
/// let x = Tensor::arange(0f32, 32.0, &Device::Cpu)?.reshape((1, 4, 4, 2))?;
/// let w = window_partition(&x, 2, 2)?;
/// assert_eq!(w.dims(), &[4, 4, 2]);
/// let back = window_reverse(&w, 1, 4, 4)?;
/// assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn window_partition(x: &Tensor, wh: usize, ww: usize) -> Result<Tensor> {
    let (b, h, w, c) = dims(x, "window_partition")?;
    if wh == 0 || ww == 0 || !h.is_multiple_of(wh) || !w.is_multiple_of(ww) {
        candle_core::bail!("window_partition: map {h}x{w} does not divide into {wh}x{ww} windows")
    }
    x.reshape((b, h / wh, wh, w / ww, ww, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((
        b * (h / wh) * (w / ww),
        wh * ww,
        c,
    ))
}

/// The inverse of [`window_partition`]: (b * nh * nw, wh * ww, c) -> (b, h, w, c), where the
/// window size follows from `h`, `w` and the token count (square windows) .
pub fn window_reverse(windows: &Tensor, b: usize, h: usize, w: usize) -> Result<Tensor> {
    let (g, l, c) = windows.dims3()?;
    let side = (l as f64).sqrt().round() as usize;
    if side * side != l
        || g != b * (h / side.max(1)) * (w / side.max(1))
        || !h.is_multiple_of(side)
        || !w.is_multiple_of(side)
    {
        candle_core::bail!("window_reverse: {:?} windows do not tile a ({b}, {h}, {w}, c) map", windows.shape())
    }
    let (nh, nw) = (h / side, w / side);
    windows.reshape((b, nh, nw, side, side, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b, h, w, c))
}

/// Swin's shifted windows: roll the map by (-shift, -shift), then partition.
pub fn shifted_window_partition(x: &Tensor, wh: usize, ww: usize, shift: usize) -> Result<Tensor> {
    let (_, h, w, _) = dims(x, "shifted_window_partition")?;
    if shift == 0 {
        return window_partition(x, wh, ww);
    }
    window_partition(&x.roll(-(shift as i32), 1)?.roll(-(shift as i32), 2)?.contiguous()?, wh.min(h), ww.min(w))
}

/// The inverse of [`shifted_window_partition`]: reverse the windows, then roll back.
pub fn shifted_window_reverse(windows: &Tensor, b: usize, h: usize, w: usize, shift: usize) -> Result<Tensor> {
    let x = window_reverse(windows, b, h, w)?;
    if shift == 0 {
        return Ok(x);
    }
    x.roll(shift as i32, 1)?.roll(shift as i32, 2)
}

/// SegNetr's global partition with patch size `p`: (b, h, w, c) -> (b * (h/2p) * (w/2p),
/// (2p)^2, c), each 2p x 2p group holding the patches `j` and `j + n/2` along each axis (see
/// the module header).
pub fn global_partition(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, h, w, c) = dims(x, "global_partition")?;
    if p == 0 || !h.is_multiple_of(2 * p) || !w.is_multiple_of(2 * p) {
        candle_core::bail!("global_partition: map {h}x{w} needs an even number of {p}x{p} patches per axis")
    }
    let (jh, jw) = (h / (2 * p), w / (2 * p));
    // rows: (half a, patch j, py); columns: (half a', patch j', px)
    x.reshape(vec![b, 2, jh, p, 2, jw, p, c])?.permute(vec![0, 2, 5, 1, 3, 4, 6, 7])?.reshape((
        b * jh * jw,
        4 * p * p,
        c,
    ))
}

/// The inverse of [`global_partition`].
pub fn global_reverse(groups: &Tensor, b: usize, h: usize, w: usize, p: usize) -> Result<Tensor> {
    let (g, l, c) = groups.dims3()?;
    if p == 0
        || !h.is_multiple_of(2 * p)
        || !w.is_multiple_of(2 * p)
        || l != 4 * p * p
        || g != b * (h / (2 * p)) * (w / (2 * p))
    {
        candle_core::bail!(
            "global_reverse: {:?} groups do not tile a ({b}, {h}, {w}, c) map with patch {p}",
            groups.shape()
        )
    }
    let (jh, jw) = (h / (2 * p), w / (2 * p));
    groups.reshape(vec![b, jh, jw, 2, p, 2, p, c])?.permute(vec![0, 3, 1, 4, 5, 2, 6, 7])?.reshape((b, h, w, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};
    use candle_core::Device;

    fn coords(b: usize, h: usize, w: usize) -> Tensor {
        // channel 0 = y, channel 1 = x
        let v: Vec<f32> = (0..b * h * w).flat_map(|i| [((i / w) % h) as f32, (i % w) as f32]).collect();
        Tensor::from_vec(v, (b, h, w, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn partitions_invert_exactly() {
        let x = randn(&[2, 8, 12, 3], 1);
        assert_close(&window_reverse(&window_partition(&x, 4, 4).unwrap(), 2, 8, 12).unwrap(), &x, 0.0, 0.0, "window");
        for shift in [0, 1, 2] {
            let w = shifted_window_partition(&x, 4, 4, shift).unwrap();
            assert_close(&shifted_window_reverse(&w, 2, 8, 12, shift).unwrap(), &x, 0.0, 0.0, "shifted");
        }
        for p in [1, 2] {
            let g = global_partition(&x, p).unwrap();
            assert_close(&global_reverse(&g, 2, 8, 12, p).unwrap(), &x, 0.0, 0.0, &format!("global p={p}"));
        }
    }

    #[test]
    fn windows_are_contiguous_blocks_and_global_groups_are_not_neighbours() {
        let (h, w, p) = (8, 8, 2);
        let win = window_partition(&coords(1, h, w), p, p).unwrap().to_vec3::<f32>().unwrap();
        // window 1 is the block at rows 0-1, columns 2-3
        assert_eq!(win[1], vec![vec![0.0, 2.0], vec![0.0, 3.0], vec![1.0, 2.0], vec![1.0, 3.0]]);
        let groups = global_partition(&coords(1, h, w), p).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(groups.len(), (h / (2 * p)) * (w / (2 * p)));
        for g in &groups {
            // the four p x p patches of a group: patch coordinates of each token
            let mut patches: Vec<(i32, i32)> =
                g.iter().map(|t| (t[0] as i32 / p as i32, t[1] as i32 / p as i32)).collect();
            patches.sort();
            patches.dedup();
            assert_eq!(patches.len(), 4);
            for a in &patches {
                for b in &patches {
                    let adjacent = (a.0 - b.0).abs() <= 1 && (a.1 - b.1).abs() <= 1 && a != b;
                    assert!(!adjacent, "patches {a:?} and {b:?} of one global group are neighbours");
                }
            }
        }
    }

    #[test]
    fn shifted_windows_line_up_with_the_mask() {
        // Tokens of a shifted window that the mask allows to attend come from one region.
        let (h, w, win, shift) = (6, 6, 3, 1);
        let m = crate::attention::shifted_window_mask(h, w, win, win, shift, &Device::Cpu).unwrap();
        let parts = shifted_window_partition(&coords(1, h, w), win, win, shift).unwrap().to_vec3::<f32>().unwrap();
        let m = m.to_vec3::<f32>().unwrap();
        for (g, tokens) in parts.iter().enumerate() {
            for i in 0..9 {
                for j in 0..9 {
                    // same region <=> on the same side of the wrap: rolling by -shift moves the
                    // first `shift` rows/columns to the end.
                    let side = |t: &Vec<f32>| ((t[0] as usize) < shift, (t[1] as usize) < shift);
                    let same = side(&tokens[i]) == side(&tokens[j]);
                    assert_eq!(m[g][i][j] == 0.0, same, "window {g} tokens {i},{j}");
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let x = randn(&[1, 6, 6, 2], 1);
        assert!(window_partition(&x, 4, 4).unwrap_err().to_string().contains("does not divide"));
        assert!(global_partition(&x, 2).unwrap_err().to_string().contains("even number"));
        assert!(window_reverse(&randn(&[3, 4, 2], 1), 1, 4, 4).is_err());
    }
}
