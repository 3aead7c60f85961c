//! A deterministic multi-view loader with worker threads and background prefetch.
//!
//! The epoch's permutation is drawn from `(seed, epoch)`. With data-parallel sharding
//! (`rank` of `world`), it is padded by wrapping to a multiple of `world` and rank `r` takes
//! positions `r, r + world, ...` (PyTorch's `DistributedSampler`). Batch `index` holds the
//! shard's samples at `index * batch_size ..`, and view `v` of sample `i` is augmented with a
//! generator keyed by `(seed, epoch, i, v)`. So a batch is a pure function of
//! `(seed, epoch, index, rank, world)`: the worker count and prefetch depth cannot change it,
//! and a resumed run sees exactly the batches it would have seen. The last partial batch is
//! dropped unless `drop_last` is off.
//!
//! A record that fails to decode (a corrupt image in an LMDB store) is skipped: its slot takes
//! the next record of the epoch's order that decodes, so the batch still does not depend on
//! timing; the record's key and reason are kept ([`Loader::corrupt`]), and once more than
//! `max_bad_fraction` of the source has failed, `batch` returns an error naming the first.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use selfsup_ops::rng::Rng;

use crate::augment::{eval_view, ViewConfig};
use crate::error::{DataError, Result};
use crate::source::{Image, Source};

/// How a loader splits and schedules its work.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// Threads that augment a batch's samples (0: rayon's global pool, all cores).
    pub workers: usize,
    pub drop_last: bool,
    /// This process's shard: `rank` of `world` data-parallel processes.
    pub rank: usize,
    pub world: usize,
    /// Stop when more than this fraction of the records has failed to decode.
    pub max_bad_fraction: f64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self { workers: 0, drop_last: true, rank: 0, world: 1, max_bad_fraction: 0.01 }
    }
}

/// A batch: one (batch, c, size, size) tensor per view, and the dataset index of each sample
/// (after any substitution of a corrupt record).
pub struct Batch {
    pub views: Vec<Tensor>,
    pub indices: Vec<usize>,
}

/// Produces the augmented views of shuffled batches of a [`Source`].
pub struct Loader {
    set: Arc<dyn Source>,
    views: Vec<ViewConfig>,
    batch_size: usize,
    seed: u64,
    opts: LoaderOptions,
    pool: Option<Arc<rayon::ThreadPool>>,
    order: Mutex<Option<(usize, Arc<Vec<usize>>)>>,
    /// Records that failed to decode: index -> "key: reason".
    bad: Mutex<std::collections::BTreeMap<usize, String>>,
}

impl Loader {
    pub fn new(set: Arc<dyn Source>, views: Vec<ViewConfig>, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::config("batch_size", "must be positive"));
        }
        if batch_size > set.len() {
            return Err(DataError::config(
                "batch_size",
                format!("{batch_size} is larger than the dataset ({} images)", set.len()),
            ));
        }
        if views.is_empty() {
            return Err(DataError::config("views", "at least one view is needed"));
        }
        for v in &views {
            v.validate(set.channels())?;
        }
        Ok(Self {
            set,
            views,
            batch_size,
            seed,
            opts: LoaderOptions::default(),
            pool: None,
            order: Mutex::new(None),
            bad: Mutex::new(Default::default()),
        })
    }

    /// Sets the worker count, `drop_last` and the shard.
    pub fn with_options(mut self, opts: LoaderOptions) -> Result<Self> {
        if opts.world == 0 || opts.rank >= opts.world {
            return Err(DataError::config("rank", format!("rank {} of world size {}", opts.rank, opts.world)));
        }
        if self.batch_size > self.shard_len(&opts) {
            return Err(DataError::config(
                "batch_size",
                format!("{} is larger than this rank's shard ({} images)", self.batch_size, self.shard_len(&opts)),
            ));
        }
        self.pool = match opts.workers {
            0 => None,
            n => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("selfsup-loader-{i}"))
                    .build()
                    .map_err(|e| DataError::config("workers", e.to_string()))?,
            )),
        };
        self.opts = opts;
        Ok(self)
    }

    fn shard_len(&self, opts: &LoaderOptions) -> usize {
        self.set.len().div_ceil(opts.world)
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.shard_len(&self.opts);
        if self.opts.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn order(&self, epoch: usize) -> Arc<Vec<usize>> {
        let mut cache = self.order.lock().expect("loader lock poisoned");
        if let Some((e, o)) = cache.as_ref() {
            if *e == epoch {
                return o.clone();
            }
        }
        let mut order: Vec<usize> = (0..self.set.len()).collect();
        Rng::from_keys(&[self.seed, epoch as u64]).shuffle(&mut order);
        let (rank, world) = (self.opts.rank, self.opts.world);
        let padded = self.shard_len(&self.opts) * world;
        let order: Vec<usize> = (rank..padded).step_by(world).map(|p| order[p % order.len()]).collect();
        let order = Arc::new(order);
        *cache = Some((epoch, order.clone()));
        order
    }

    /// The indices (into the dataset) of batch `index` of `epoch`.
    pub fn batch_indices(&self, epoch: usize, index: usize) -> Vec<usize> {
        let order = self.order(epoch);
        order[index * self.batch_size..((index + 1) * self.batch_size).min(order.len())].to_vec()
    }

    /// Records that failed to decode so far, as "key: reason".
    pub fn corrupt(&self) -> Vec<String> {
        self.bad.lock().expect("loader lock poisoned").values().cloned().collect()
    }

    /// The image at position `pos` of the epoch's order, or the next one that decodes.
    fn decoded(&self, order: &[usize], pos: usize) -> Result<(usize, Image<'_>)> {
        for k in 0..order.len() {
            let i = order[(pos + k) % order.len()];
            if self.bad.lock().expect("loader lock poisoned").contains_key(&i) {
                continue;
            }
            match self.set.image(i) {
                Ok(img) => return Ok((i, img)),
                Err(e) => {
                    let mut bad = self.bad.lock().expect("loader lock poisoned");
                    bad.insert(i, e.to_string());
                    if bad.len() as f64 > self.opts.max_bad_fraction * self.set.len() as f64 {
                        return Err(DataError::config(
                            "source",
                            format!(
                                "{} of {} records failed to decode, more than the allowed fraction {} (first: {})",
                                bad.len(),
                                self.set.len(),
                                self.opts.max_bad_fraction,
                                bad.values().next().expect("one at least")
                            ),
                        ));
                    }
                }
            }
        }
        Err(DataError::config("source", "no record decodes"))
    }

    /// Batch `index` of `epoch`: one (batch, c, size, size) tensor per view, on the CPU.
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Vec<Tensor>> {
        Ok(self.batch_with_indices(epoch, index)?.views)
    }

    /// [`batch`](Self::batch) with the dataset index behind each sample.
    pub fn batch_with_indices(&self, epoch: usize, index: usize) -> Result<Batch> {
        if index >= self.batches_per_epoch() {
            return Err(DataError::config(
                "batch index",
                format!("{index} >= {} batches per epoch", self.batches_per_epoch()),
            ));
        }
        let order = self.order(epoch);
        let positions: Vec<usize> =
            (index * self.batch_size..((index + 1) * self.batch_size).min(order.len())).collect();
        let work = || -> Result<Vec<(usize, Vec<Vec<f32>>)>> {
            positions
                .par_iter()
                .map(|&pos| {
                    let slot = order[pos];
                    let (i, img) = self.decoded(&order, pos)?;
                    let views = self
                        .views
                        .iter()
                        .enumerate()
                        .map(|(v, view)| {
                            // Keyed by the slot, so a substitute draws what the slot would have.
                            let mut rng = Rng::from_keys(&[self.seed, epoch as u64, slot as u64, v as u64]);
                            view.apply(&img.pixels, img.c, img.h, img.w, &mut rng)
                        })
                        .collect();
                    Ok((i, views))
                })
                .collect()
        };
        let samples = match &self.pool {
            Some(pool) => pool.install(work)?,
            None => work()?,
        };
        let c = self.set.channels();
        let mut views = Vec::with_capacity(self.views.len());
        for (v, view) in self.views.iter().enumerate() {
            let data: Vec<f32> = samples.iter().flat_map(|(_, vs)| vs[v].iter().copied()).collect();
            let shape = (samples.len(), view.out_channels(c), view.size, view.size);
            views.push(Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(Batch { views, indices: samples.into_iter().map(|(i, _)| i).collect() })
    }

    /// Batches for global steps `start..end` (step `s` is batch `s % per_epoch` of epoch
    /// `s / per_epoch`), computed `depth` ahead on a background thread.
    pub fn prefetch(self: &Arc<Self>, start: usize, end: usize, depth: usize) -> Prefetch {
        let (tx, rx) = sync_channel(depth.max(1));
        let me = self.clone();
        let handle = std::thread::spawn(move || {
            let per_epoch = me.batches_per_epoch();
            for step in start..end {
                let batch = me.batch_with_indices(step / per_epoch, step % per_epoch);
                if tx.send((step, batch)).is_err() {
                    break; // the consumer hung up
                }
            }
        });
        Prefetch { rx: Some(rx), handle: Some(handle) }
    }
}

/// Iterator over prefetched `(step, batch)`.
pub struct Prefetch {
    rx: Option<Receiver<(usize, Result<Batch>)>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for Prefetch {
    type Item = (usize, Result<Batch>);
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Hang up first so a producer blocked on a full channel wakes and stops.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Deterministic evaluation views of images `start..end`: (n, c, size, size).
pub fn eval_batch(
    set: &dyn Source,
    start: usize,
    end: usize,
    size: usize,
    mean: &[f32],
    std: &[f32],
) -> Result<Tensor> {
    let per: Vec<Vec<f32>> = (start..end)
        .into_par_iter()
        .map(|i| {
            let img = set.image(i)?;
            Ok(eval_view(&img.pixels, img.c, img.h, img.w, size, mean, std))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(per.concat(), (end - start, set.channels(), size, size), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dataset::ImageSet;

    fn toy(n: usize) -> Arc<ImageSet> {
        let pixels: Vec<u8> = (0..n * 8 * 8).map(|i| (i * 7 % 256) as u8).collect();
        Arc::new(ImageSet::new(pixels, Some((0..n as u32).map(|i| i % 3).collect()), n, 1, 8, 8).unwrap())
    }

    #[test]
    fn batches_are_pure_and_cover_the_epoch_once() {
        let views = vec![ViewConfig::byol(6, 0, vec![0.5], vec![0.5]), ViewConfig::byol(6, 1, vec![0.5], vec![0.5])];
        let a = Loader::new(toy(10), views.clone(), 3, 4).unwrap();
        let b = Loader::new(toy(10), views, 3, 4).unwrap();
        assert_eq!(a.batches_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|i| a.batch_indices(0, i)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        // Query b in another order (and another epoch first): same batches.
        let _ = b.batch(1, 2).unwrap();
        for (x, y) in a.batch(0, 1).unwrap().iter().zip(&b.batch(0, 1).unwrap()) {
            assert_eq!(x.dims(), [3, 1, 6, 6]);
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_ne!(a.batch_indices(0, 0), a.batch_indices(1, 0));
        // Prefetch yields the same batches, in step order, across the epoch boundary.
        let a = Arc::new(a);
        let steps: Vec<usize> = a
            .prefetch(2, 5, 2)
            .map(|(s, r)| {
                let v = r.unwrap().views;
                let want = a.batch(s / 3, s % 3).unwrap();
                assert_eq!(
                    v[1].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want[1].flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
                s
            })
            .collect();
        assert_eq!(steps, [2, 3, 4]);
    }

    fn values(t: &[Tensor]) -> Vec<Vec<f32>> {
        t.iter().map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    #[test]
    fn worker_count_does_not_change_batches() {
        let views = vec![ViewConfig::byol(6, 0, vec![0.5], vec![0.5]), ViewConfig::byol(6, 1, vec![0.5], vec![0.5])];
        let with = |workers| {
            let opts = LoaderOptions { workers, ..Default::default() };
            Loader::new(toy(40), views.clone(), 8, 2).unwrap().with_options(opts).unwrap()
        };
        let (one, four) = (with(1), with(4));
        for (e, i) in [(0, 0), (0, 4), (3, 2)] {
            assert_eq!(values(&one.batch(e, i).unwrap()), values(&four.batch(e, i).unwrap()));
        }
    }

    #[test]
    fn shards_partition_the_epoch_and_drop_last_is_optional() {
        let v = vec![ViewConfig::byol(6, 0, vec![0.5], vec![0.5])];
        let shard = |rank, drop_last| {
            let opts = LoaderOptions { rank, world: 3, drop_last, ..Default::default() };
            Loader::new(toy(10), v.clone(), 2, 7).unwrap().with_options(opts).unwrap()
        };
        // 10 images over 3 ranks: padded to 12, 4 per rank; with drop_last, 2 batches of 2.
        let mut seen = Vec::new();
        for rank in 0..3 {
            let l = shard(rank, true);
            assert_eq!(l.batches_per_epoch(), 2);
            seen.extend((0..2).flat_map(|i| l.batch_indices(1, i)));
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10, "every image is in some rank's shard");
        let plain = Loader::new(toy(10), v.clone(), 3, 7)
            .unwrap()
            .with_options(LoaderOptions { drop_last: false, ..Default::default() })
            .unwrap();
        assert_eq!(plain.batches_per_epoch(), 4);
        assert_eq!(plain.batch(0, 3).unwrap()[0].dims(), [1, 1, 6, 6]);
        let e = Loader::new(toy(10), v, 2, 7).unwrap().with_options(LoaderOptions {
            rank: 3,
            world: 3,
            ..Default::default()
        });
        assert!(e.err().unwrap().to_string().contains("rank 3 of world size 3"));
    }

    /// An LMDB store with two corrupt records among twenty PNGs.
    fn damaged_store(dir: &std::path::Path) -> Arc<dyn Source> {
        let set = crate::dataset::synthetic_stripes(20, 8, 2, 3);
        let clean = dir.join("clean");
        crate::lmdb::pack_set(&set, &clean, false, "t").unwrap();
        let store = crate::lmdb::LmdbStore::open(&clean).unwrap();
        let out = dir.join("damaged");
        let mut w = crate::lmdb::LmdbWriter::create(&out, 1, 1 << 20, false).unwrap();
        for i in 0..20 {
            let bytes = if i == 3 || i == 7 { b"corrupt".to_vec() } else { store.encoded(i).unwrap() };
            w.push(&bytes, store.label(i)).unwrap();
        }
        w.finish(vec![], "t", Default::default()).unwrap();
        Arc::new(crate::lmdb::LmdbStore::open(&out).unwrap())
    }

    #[test]
    fn corrupt_records_are_skipped_counted_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = damaged_store(dir.path());
        let views = vec![ViewConfig::byol(6, 0, vec![0.5], vec![0.5])];
        let with = |workers, max_bad_fraction| {
            let opts = LoaderOptions { workers, max_bad_fraction, ..Default::default() };
            Loader::new(store.clone(), views.clone(), 5, 1).unwrap().with_options(opts).unwrap()
        };
        let (one, four) = (with(1, 0.2), with(4, 0.2));
        for e in 0..2 {
            for i in 0..4 {
                let (a, b) = (one.batch_with_indices(e, i).unwrap(), four.batch_with_indices(e, i).unwrap());
                assert!(!a.indices.contains(&3) && !a.indices.contains(&7), "{:?}", a.indices);
                assert_eq!(a.indices, b.indices);
                assert_eq!(values(&a.views), values(&b.views));
            }
        }
        let bad = one.corrupt();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].contains("record 3"), "{bad:?}");
        // Above the allowed fraction the loader stops, naming a record.
        let strict = with(1, 0.05);
        let e = (0..4).find_map(|i| strict.batch(0, i).err()).expect("an error").to_string();
        assert!(e.contains("2 of 20 records failed to decode") && e.contains("record"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let v = vec![ViewConfig::byol(6, 0, vec![0.5], vec![0.5])];
        let e = Loader::new(toy(4), v.clone(), 0, 0).err().unwrap().to_string();
        assert!(e.contains("batch_size"), "{e}");
        let e = Loader::new(toy(4), v, 5, 0).err().unwrap().to_string();
        assert!(e.contains("larger than the dataset"), "{e}");
    }
}
