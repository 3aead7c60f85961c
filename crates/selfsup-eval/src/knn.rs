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

/// Plain k-nearest-neighbour classification with Euclidean distance and uniform votes, as
/// scikit-learn's `KNeighborsClassifier(n_neighbors=k)` (the standard raw-pixel baselines of
/// Fashion-MNIST). Neighbours are ordered by (distance, bank index); a tied vote goes to the
/// smallest class, as `scipy.stats.mode` does. Returns the top-1 accuracy (percent) per `k`.
pub fn knn_euclidean(
    bank: &Tensor,
    bank_labels: &[u32],
    queries: &Tensor,
    query_labels: &[u32],
    num_classes: usize,
    ks: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let (n, d) = bank.dims2()?;
    let (m, dq) = queries.dims2()?;
    if d != dq || n != bank_labels.len() || m != query_labels.len() || n == 0 || m == 0 || ks.is_empty() {
        candle_core::bail!(
            "knn_euclidean: bank {:?} with {} labels, queries {:?} with {} labels, ks {ks:?}",
            bank.shape(),
            bank_labels.len(),
            queries.shape(),
            query_labels.len()
        )
    }
    if let Some(&bad) = bank_labels.iter().find(|&&l| l as usize >= num_classes) {
        candle_core::bail!("knn_euclidean: bank label {bad} is not below num_classes = {num_classes}")
    }
    let k_max = ks.iter().copied().max().unwrap_or(1).clamp(1, n);
    let bank = bank.to_dtype(candle_core::DType::F32)?;
    let bank_sq: Vec<f32> = bank.sqr()?.sum(1)?.to_vec1()?;
    let bank_t = bank.t()?;
    let queries = queries.to_dtype(candle_core::DType::F32)?;
    let mut hits = vec![0usize; ks.len()];
    for start in (0..m).step_by(512) {
        let len = 512.min(m - start);
        // |q - b|^2 = |b|^2 - 2 q.b (+ |q|^2, the same for every b of a query)
        let dots = queries.narrow(0, start, len)?.matmul(&bank_t)?.to_vec2::<f32>()?;
        let rows: Vec<Vec<bool>> = dots
            .par_iter()
            .enumerate()
            .map(|(r, row)| {
                let dist: Vec<f32> = row.iter().zip(&bank_sq).map(|(q, b)| b - 2.0 * q).collect();
                let mut idx: Vec<u32> = (0..n as u32).collect();
                let cmp = |a: &u32, b: &u32| dist[*a as usize].total_cmp(&dist[*b as usize]).then(a.cmp(b));
                if k_max < n {
                    idx.select_nth_unstable_by(k_max - 1, cmp);
                    idx.truncate(k_max);
                }
                idx.sort_unstable_by(cmp);
                let truth = query_labels[start + r];
                ks.iter()
                    .map(|&k| {
                        let mut votes = vec![0usize; num_classes];
                        idx.iter().take(k).for_each(|&j| votes[bank_labels[j as usize] as usize] += 1);
                        // max_by_key keeps the last maximum; scan in reverse to keep the first.
                        let best = (0..num_classes).rev().max_by_key(|&c| votes[c]).unwrap_or(0);
                        best as u32 == truth
                    })
                    .collect()
            })
            .collect();
        for row in rows {
            hits.iter_mut().zip(row).for_each(|(h, ok)| *h += ok as usize);
        }
    }
    Ok(ks.iter().zip(hits).map(|(&k, h)| (k, 100.0 * h as f64 / m as f64)).collect())
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

    #[test]
    fn euclidean_knn_votes_and_breaks_ties_like_sklearn() {
        // 1-d bank: class 0 at 0, 1, 2; class 1 at 10, 11; class 2 at 3.
        let bank = Tensor::new(&[[0f32], [1.0], [2.0], [10.0], [11.0], [3.0]], &Device::Cpu).unwrap();
        let labels = [0, 0, 0, 1, 1, 2];
        let q = Tensor::new(&[[2.6f32], [10.4], [6.4]], &Device::Cpu).unwrap();
        // k = 1: 2.6 -> 3.0 (class 2); 10.4 -> 10 (1); 6.4 -> 3.0 (2): all right.
        // k = 2: 2.6 -> {3.0, 2.0}, one vote for 2 and one for 0: the tie goes to class 0
        // (wrong); 10.4 -> {10, 11} (right); 6.4 -> {3.0, 10}: 2 vs 1, tie to 1 (wrong).
        let acc = knn_euclidean(&bank, &labels, &q, &[2, 1, 2], 3, &[1, 2]).unwrap();
        assert_eq!(acc[0], (1, 100.0));
        assert!((acc[1].1 - 100.0 / 3.0).abs() < 1e-9, "{acc:?}");
        let e = knn_euclidean(&bank, &labels[..5], &q, &[0, 0, 0], 3, &[1]).unwrap_err().to_string();
        assert!(e.contains("5 labels"), "{e}");
    }

    #[test]
    fn euclidean_knn_separates_clean_clusters() {
        let (bank, bl) = clusters(40, 4, 0.05, 1);
        let (q, ql) = clusters(10, 4, 0.05, 2);
        let acc = knn_euclidean(&bank, &bl, &q, &ql, 4, &[1, 5, 20]).unwrap();
        assert!(acc.iter().all(|&(_, a)| a == 100.0), "{acc:?}");
    }
}
