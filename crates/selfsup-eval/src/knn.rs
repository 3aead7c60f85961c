//! Weighted kNN classification on L2-normalised features.
//!
//! The protocol of InstDisc (Wu et al. 2018) as solo-learn and lightly run it: cosine
//! similarity to every bank feature, the `k` most similar vote for their label with weight
//! `exp(sim / T)`, the class with the largest sum wins. Ties among equal similarities go to
//! the lower bank index. Several `(k, T)` settings share one pass over the bank.

use candle_core::{Result, Tensor};
use rayon::prelude::*;
use serde::Serialize;

/// One `(k, T)` setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KnnSetting {
    pub k: usize,
    pub temperature: f64,
}

impl KnnSetting {
    /// The standard pair: k = 20, T = 0.07 (InstDisc) and k = 200, T = 0.1 (lightly).
    pub const STANDARD: [KnnSetting; 2] =
        [KnnSetting { k: 20, temperature: 0.07 }, KnnSetting { k: 200, temperature: 0.1 }];
}

/// Accuracy of one setting, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KnnAccuracy {
    pub setting: KnnSetting,
    pub top1: f64,
    pub top5: f64,
}

fn normalize(xs: &Tensor) -> Result<Tensor> {
    let xs = xs.to_dtype(candle_core::DType::F32)?;
    xs.broadcast_div(&(xs.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

/// Classifies `queries` (m, d) against `bank` (n, d) with labels in `0..num_classes`.
/// Labels of queries outside the bank's classes simply count as errors.
pub fn knn_classify(
    bank: &Tensor,
    bank_labels: &[u32],
    queries: &Tensor,
    query_labels: &[u32],
    num_classes: usize,
    settings: &[KnnSetting],
) -> Result<Vec<KnnAccuracy>> {
    let (n, d) = bank.dims2()?;
    let (m, dq) = queries.dims2()?;
    if d != dq {
        candle_core::bail!("knn: bank features are {d}-d, queries {dq}-d")
    }
    if n != bank_labels.len() || m != query_labels.len() {
        candle_core::bail!(
            "knn: {n} bank features with {} labels, {m} queries with {} labels",
            bank_labels.len(),
            query_labels.len()
        )
    }
    if n == 0 || m == 0 || settings.is_empty() {
        candle_core::bail!("knn: empty bank ({n}), queries ({m}) or settings")
    }
    if let Some(&bad) = bank_labels.iter().find(|&&l| l as usize >= num_classes) {
        candle_core::bail!("knn: bank label {bad} is not below num_classes = {num_classes}")
    }
    let k_max = settings.iter().map(|s| s.k).max().unwrap_or(1).min(n).max(1);
    let bank_t = normalize(bank)?.t()?;
    let queries = normalize(queries)?;
    let mut hits = vec![(0usize, 0usize); settings.len()];
    let chunk = 512;
    for start in (0..m).step_by(chunk) {
        let len = chunk.min(m - start);
        let sims = queries.narrow(0, start, len)?.matmul(&bank_t)?.to_vec2::<f32>()?;
        let rows: Vec<Vec<(bool, bool)>> = sims
            .par_iter()
            .enumerate()
            .map(|(r, row)| {
                let mut idx: Vec<u32> = (0..n as u32).collect();
                let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
                if k_max < n {
                    idx.select_nth_unstable_by(k_max - 1, cmp);
                    idx.truncate(k_max);
                }
                idx.sort_unstable_by(cmp);
                let truth = query_labels[start + r] as usize;
                settings
                    .iter()
                    .map(|s| {
                        let mut votes = vec![0f64; num_classes];
                        for &j in idx.iter().take(s.k) {
                            votes[bank_labels[j as usize] as usize] += (row[j as usize] as f64 / s.temperature).exp();
                        }
                        let mut order: Vec<usize> = (0..num_classes).collect();
                        order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
                        (order[0] == truth, order.iter().take(5).any(|&c| c == truth))
                    })
                    .collect()
            })
            .collect();
        for row in rows {
            for (h, (t1, t5)) in hits.iter_mut().zip(row) {
                h.0 += t1 as usize;
                h.1 += t5 as usize;
            }
        }
    }
    Ok(settings
        .iter()
        .zip(hits)
        .map(|(&setting, (t1, t5))| KnnAccuracy {
            setting,
            top1: 100.0 * t1 as f64 / m as f64,
            top5: 100.0 * t5 as f64 / m as f64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use selfsup_ops::rng::Rng;

    /// Gaussian clusters around orthogonal centres: accuracy depends on the noise level.
    fn clusters(n_per: usize, classes: usize, noise: f64, seed: u64) -> (Tensor, Vec<u32>) {
        let d = 16;
        let mut r = Rng::new(seed);
        let mut v = Vec::new();
        let mut l = Vec::new();
        for c in 0..classes {
            for _ in 0..n_per {
                for j in 0..d {
                    v.push((if j == c { 1.0 } else { 0.0 } + noise * r.normal()) as f32);
                }
                l.push(c as u32);
            }
        }
        (Tensor::from_vec(v, (n_per * classes, d), &Device::Cpu).unwrap(), l)
    }

    #[test]
    fn separable_clusters_are_perfect_and_noise_costs_accuracy() {
        let (bank, bl) = clusters(50, 6, 0.05, 1);
        let (q, ql) = clusters(20, 6, 0.05, 2);
        let acc = knn_classify(&bank, &bl, &q, &ql, 6, &KnnSetting::STANDARD).unwrap();
        assert!(acc.iter().all(|a| a.top1 == 100.0 && a.top5 == 100.0), "{acc:?}");
        let (q, ql) = clusters(200, 6, 0.6, 3);
        let acc = knn_classify(&bank, &bl, &q, &ql, 6, &KnnSetting::STANDARD).unwrap();
        assert!(acc.iter().all(|a| a.top1 > 40.0 && a.top1 < 95.0 && a.top5 >= a.top1), "{acc:?}");
    }

    #[test]
    fn hand_computed_votes() {
        // Bank: two of class 0 at angle ~0, one of class 1 exactly on the query.
        let bank = Tensor::new(&[[1f32, 0.1], [1.0, -0.1], [0.0, 1.0]], &Device::Cpu).unwrap();
        let q = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let hot = KnnSetting { k: 3, temperature: 0.07 }; // exp(1/0.07) dominates: class 1
        let cold = KnnSetting { k: 3, temperature: 100.0 }; // near-uniform weights: class 0 (2 votes)
        let one = KnnSetting { k: 1, temperature: 1.0 };
        let acc = knn_classify(&bank, &[0, 0, 1], &q, &[1], 2, &[hot, cold, one]).unwrap();
        assert_eq!(acc.iter().map(|a| a.top1).collect::<Vec<_>>(), [100.0, 0.0, 100.0]);
        assert_eq!(acc[1].top5, 100.0);
    }

    #[test]
    fn mismatches_are_errors() {
        let bank = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(knn_classify(&bank, &[0, 0, 1], &q, &[0], 2, &KnnSetting::STANDARD).is_err());
        let q = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(knn_classify(&bank, &[0, 0, 5], &q, &[0], 2, &KnnSetting::STANDARD)
            .unwrap_err()
            .to_string()
            .contains("label 5"));
    }
}
