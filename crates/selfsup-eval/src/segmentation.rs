//! Segmentation metrics from a confusion matrix: per-class IoU and Dice, their means, pixel
//! accuracy.
//!
//! Conventions (those of mmsegmentation and the medical-segmentation papers SegNetr reports
//! against): the matrix accumulates over the whole evaluation set (not per image, then
//! averaged); IoU_c = TP / (TP + FP + FN) and Dice_c = 2 TP / (2 TP + FP + FN); a class that
//! appears neither in the targets nor in the predictions has no IoU (NaN) and is left out of the
//! means, so a split that lacks a class is not scored as if it had failed on it. Pixels whose
//! target is the ignore index are skipped.

use serde::Serialize;

/// Counts of (target, prediction) pairs, row-major: `counts[t * n + p]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    counts: Vec<u64>,
}

/// The metrics of one matrix, percentages except the counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentationMetrics {
    /// Per class; NaN for a class absent from targets and predictions.
    pub iou: Vec<f64>,
    pub dice: Vec<f64>,
    pub miou: f64,
    pub mdice: f64,
    pub pixel_accuracy: f64,
    /// Pixels counted (ignored ones excluded).
    pub pixels: u64,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        Self { num_classes, counts: vec![0; num_classes * num_classes] }
    }

    /// Adds one batch of flat label maps. Labels outside `0..num_classes` (other than the
    /// ignore index in `target`) are an error naming the first one.
    pub fn update(&mut self, pred: &[u32], target: &[u32], ignore_index: Option<u32>) -> Result<(), String> {
        if pred.len() != target.len() {
            return Err(format!("confusion matrix: {} predictions for {} targets", pred.len(), target.len()));
        }
        let n = self.num_classes as u32;
        for (i, (&p, &t)) in pred.iter().zip(target).enumerate() {
            if Some(t) == ignore_index {
                continue;
            }
            if t >= n || p >= n {
                return Err(format!(
                    "confusion matrix: pixel {i} has target {t} / prediction {p}, not below num_classes = {n}"
                ));
            }
            self.counts[(t * n + p) as usize] += 1;
        }
        Ok(())
    }

    /// `counts[target][prediction]`.
    pub fn count(&self, target: usize, pred: usize) -> u64 {
        self.counts[target * self.num_classes + pred]
    }

    /// Adds another matrix (e.g. from another worker).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<(), String> {
        if other.num_classes != self.num_classes {
            return Err(format!("confusion matrix: merging {} classes into {}", other.num_classes, self.num_classes));
        }
        self.counts.iter_mut().zip(&other.counts).for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub fn metrics(&self) -> SegmentationMetrics {
        let n = self.num_classes;
        let (mut iou, mut dice) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut correct = 0u64;
        let total: u64 = self.counts.iter().sum();
        for c in 0..n {
            let tp = self.count(c, c);
            let fn_: u64 = (0..n).filter(|&p| p != c).map(|p| self.count(c, p)).sum();
            let fp: u64 = (0..n).filter(|&t| t != c).map(|t| self.count(t, c)).sum();
            correct += tp;
            let union = tp + fp + fn_;
            if union == 0 {
                iou.push(f64::NAN);
                dice.push(f64::NAN);
            } else {
                iou.push(100.0 * tp as f64 / union as f64);
                dice.push(100.0 * 2.0 * tp as f64 / (union + tp) as f64);
            }
        }
        let mean = |v: &[f64]| {
            let present: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            if present.is_empty() {
                f64::NAN
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            }
        };
        SegmentationMetrics {
            miou: mean(&iou),
            mdice: mean(&dice),
            pixel_accuracy: if total == 0 { f64::NAN } else { 100.0 * correct as f64 / total as f64 },
            iou,
            dice,
            pixels: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn hand_made_matrix() {
        // targets:     0 0 0 0 1 1 1 2
        // predictions: 0 0 1 2 1 1 0 2
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&[0, 0, 1, 2, 1, 1, 0, 2], &[0, 0, 0, 0, 1, 1, 1, 2], None).unwrap();
        let m = cm.metrics();
        // class 0: TP 2, FN 2, FP 1 -> IoU 2/5, Dice 4/7
        // class 1: TP 2, FN 1, FP 1 -> IoU 2/4, Dice 4/6
        // class 2: TP 1, FN 0, FP 1 -> IoU 1/2, Dice 2/3
        let want_iou = [40.0, 50.0, 50.0];
        let want_dice = [400.0 / 7.0, 400.0 / 6.0, 200.0 / 3.0];
        for c in 0..3 {
            assert!(close(m.iou[c], want_iou[c]), "iou {c}: {}", m.iou[c]);
            assert!(close(m.dice[c], want_dice[c]), "dice {c}: {}", m.dice[c]);
        }
        assert!(close(m.miou, 140.0 / 3.0));
        assert!(close(m.mdice, want_dice.iter().sum::<f64>() / 3.0));
        assert!(close(m.pixel_accuracy, 62.5));
        assert_eq!(m.pixels, 8);
    }

    #[test]
    fn absent_classes_and_ignored_pixels_do_not_count() {
        let mut cm = ConfusionMatrix::new(4);
        // class 3 never appears; target 255 is ignored whatever was predicted
        cm.update(&[0, 1, 1, 3], &[0, 1, 1, 255], Some(255)).unwrap();
        let m = cm.metrics();
        assert!(m.iou[2].is_nan() && m.iou[3].is_nan());
        assert!(close(m.miou, 100.0) && close(m.pixel_accuracy, 100.0) && m.pixels == 3);
        // a perfect binary mask: Dice = IoU = 100
        let mut b = ConfusionMatrix::new(2);
        b.update(&[1, 0, 1], &[1, 0, 1], None).unwrap();
        let mut merged = ConfusionMatrix::new(2);
        merged.merge(&b).unwrap();
        merged.merge(&b).unwrap();
        assert_eq!(merged.count(1, 1), 4);
        assert!(close(merged.metrics().mdice, 100.0));
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        let mut cm = ConfusionMatrix::new(2);
        assert!(cm.update(&[0], &[0, 1], None).unwrap_err().contains("1 predictions for 2 targets"));
        assert!(cm.update(&[0, 5], &[0, 1], None).unwrap_err().contains("pixel 1 has target 1 / prediction 5"));
        assert!(cm.merge(&ConfusionMatrix::new(3)).is_err());
        assert!(ConfusionMatrix::new(2).metrics().pixel_accuracy.is_nan());
    }
}
