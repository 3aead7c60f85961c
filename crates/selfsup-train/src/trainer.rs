//! The pretraining loop.
//!
//! Per step: the loader's views (a pure function of seed, epoch and index) -> objective loss
//! -> backward -> optional global-norm clipping -> optimizer step at the scheduled lr ->
//! objective `after_step` (EMA) -> a JSON log line every `log_every` steps -> a checkpoint
//! every `checkpoint.every` steps and at the end. A non-finite loss stops the run before the
//! update, so the last checkpoint stays the last good state. `resume` restores model,
//! optimizer and objective state and the step, and the run continues exactly.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use selfsup_data::source::take;
use selfsup_data::{dataset, Loader, Source, Split};
use selfsup_models::Vars;
use selfsup_objectives::{Objective, Step};
use selfsup_ops::rng::Rng;

use crate::checkpoint::{self, Manifest};
use crate::config::{parse_device, DataConfig, DataFormat, RunConfig};
use crate::optim::{Optimizer, Param};
use crate::schedule::{progress, warmup_cosine};

/// Loads a split of the configured dataset (honouring `limit` for the training split).
pub fn load_split(data: &DataConfig, split: Split) -> Result<Arc<dyn Source>> {
    let set: Arc<dyn Source> = match data.format {
        DataFormat::Idx => Arc::new(dataset::mnist_family(&data.path, split)?),
        DataFormat::Cifar => Arc::new(selfsup_data::cifar::read(&data.path, split)?),
        DataFormat::Shards => Arc::new(selfsup_data::shards::open(&data.path.join(split.name()))?),
        DataFormat::Lmdb => Arc::new(selfsup_data::lmdb::LmdbStore::open(&data.path.join(split.name()))?),
        DataFormat::Segset => Arc::new(selfsup_data::segset::images(&data.path, split.name())?),
    };
    Ok(match (split, data.limit) {
        (Split::Train, Some(n)) => take(set, n),
        _ => set,
    })
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub last_loss: f64,
    /// Training images per second over the steps this process ran.
    pub images_per_sec: f64,
    pub last_checkpoint: Option<PathBuf>,
    /// Loss at every step this process ran, in order.
    pub losses: Vec<f64>,
}

pub struct Trainer {
    cfg: RunConfig,
    config_toml: String,
    device: Device,
    loader: Arc<Loader>,
    objective: Box<dyn Objective>,
    online: Vars,
    optimizer: Optimizer,
    total_steps: usize,
    warmup_steps: usize,
    /// The next step to run (= steps completed).
    step: usize,
    last_checkpoint: Option<PathBuf>,
    quiet: bool,
    /// (bank, queries) of the online kNN, loaded once when configured.
    knn_sets: Option<(Arc<dyn Source>, Arc<dyn Source>)>,
}

impl Trainer {
    /// Builds data, model, objective and optimizer from a validated config.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        cfg.validate()?;
        let device = parse_device(&cfg.device)?.open()?;
        let set = load_split(&cfg.data, Split::Train).context("loading the training data")?;
        for (i, view) in cfg.views.iter().enumerate() {
            let c = view.out_channels(set.channels());
            if c != cfg.model.in_chans {
                bail!(
                    "model.in_chans = {} but view {i} of {} has {c} channels{}",
                    cfg.model.in_chans,
                    cfg.data.path.display(),
                    if c == 1 { " (set to_rgb = true for an RGB model)" } else { "" }
                )
            }
        }
        let opts = selfsup_data::LoaderOptions {
            workers: cfg.workers,
            max_bad_fraction: cfg.data.max_bad_fraction,
            ..Default::default()
        };
        let loader = Arc::new(Loader::new(set, cfg.views.clone(), cfg.batch_size, cfg.seed)?.with_options(opts)?);
        let online = Vars::new(cfg.seed);
        let objective =
            cfg.objective.build(&cfg.model, &online, &device, cfg.seed).context("building the objective")?;
        if objective.num_views() != cfg.views.len() {
            bail!(
                "objective `{}` consumes {} views but `views` lists {}",
                cfg.objective.id(),
                objective.num_views(),
                cfg.views.len()
            )
        }
        // Parameters the objective leaves alone (e.g. FCMAE's unused `head.norm`) stay out of the
        // optimizer; every other one must receive a gradient at every step.
        let frozen = objective.untrained_params();
        let params = online
            .params
            .vars()
            .into_iter()
            .filter(|(name, _)| !frozen.iter().any(|f| name.starts_with(f)))
            .map(|(name, var)| Param::new(name, var))
            .collect();
        let optimizer = Optimizer::new(cfg.optimizer.clone(), params)?;
        let per_epoch = loader.batches_per_epoch();
        let mut total_steps = cfg.epochs * per_epoch;
        if let Some(m) = cfg.max_steps {
            total_steps = total_steps.min(m);
        }
        let warmup_steps = ((cfg.schedule.warmup_epochs * per_epoch as f64).round() as usize).min(total_steps);
        let config_toml = cfg.to_toml()?;
        let knn_sets = match &cfg.online_knn {
            Some(k) => {
                let mut data = cfg.data.clone();
                data.limit = Some(k.bank);
                let bank = load_split(&data, Split::Train).context("loading the online kNN bank")?;
                let queries =
                    take(load_split(&cfg.data, Split::Test).context("loading the online kNN queries")?, k.queries);
                if bank.label(0).is_none() || queries.label(0).is_none() {
                    bail!("online_knn needs labels in both splits of {}", cfg.data.path.display())
                }
                Some((bank, queries))
            }
            None => None,
        };
        Ok(Self {
            cfg,
            config_toml,
            device,
            loader,
            objective,
            online,
            optimizer,
            total_steps,
            warmup_steps,
            step: 0,
            last_checkpoint: None,
            quiet: false,
            knn_sets,
        })
    }

    /// No progress bar or per-step lines on stderr (tests, benches).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn step(&self) -> usize {
        self.step
    }

    pub fn online(&self) -> &Vars {
        &self.online
    }

    pub fn objective(&self) -> &dyn Objective {
        self.objective.as_ref()
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.cfg.output_dir.join("checkpoints")
    }

    /// Restores the newest checkpoint under `path` (run dir, checkpoints dir or file).
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let (manifest, tensors) = checkpoint::load(path, &self.device)?;
        if manifest.seed != self.cfg.seed {
            bail!(
                "checkpoint {} was made with seed {}, the config says {}",
                path.display(),
                manifest.seed,
                self.cfg.seed
            )
        }
        if manifest.step > self.total_steps {
            bail!("checkpoint is at step {}, past this run's {} steps", manifest.step, self.total_steps)
        }
        self.online.load(&checkpoint::strip_prefix(&tensors, "model")).context("restoring the model")?;
        self.objective
            .load_state(&checkpoint::strip_prefix(&tensors, "objective"))
            .context("restoring the objective state")?;
        self.optimizer.load_state(&tensors).context("restoring the optimizer")?;
        self.step = manifest.step;
        self.last_checkpoint = Some(checkpoint::resolve(path)?);
        Ok(())
    }

    /// The objective's pictures of this step's first 8 images, as `samples/step-<step, 8 digits>.png`.
    fn write_panel(&self, views: &[Tensor], key: u64) -> Result<()> {
        let n = views[0].dim(0)?.min(8);
        let first = views.iter().map(|v| v.narrow(0, 0, n)).collect::<candle_core::Result<Vec<_>>>()?;
        let columns = self.objective.panel(&first, key).context("drawing the objective's panel")?;
        if columns.is_empty() {
            return Ok(());
        }
        let path = self.cfg.output_dir.join("samples").join(format!("step-{:08}.png", self.step));
        let view = &self.cfg.views[0];
        crate::panel::write_panel(&path, &columns, &view.mean, &view.std)
    }

    fn save(&mut self, loss: f64) -> Result<PathBuf> {
        let mut tensors: Vec<(String, Tensor)> =
            self.online.tensors().into_iter().map(|(k, v)| (format!("model.{k}"), v)).collect();
        tensors.extend(self.objective.state().into_iter().map(|(k, v)| (format!("objective.{k}"), v)));
        tensors.extend(self.optimizer.state()?);
        let manifest = Manifest {
            step: self.step,
            epoch: self.step / self.loader.batches_per_epoch(),
            total_steps: self.total_steps,
            seed: self.cfg.seed,
            config: self.config_toml.clone(),
            loss,
            tensors: String::new(),
        };
        let path = checkpoint::save(&self.checkpoint_dir(), &manifest, &tensors, self.cfg.checkpoint.keep)?;
        self.last_checkpoint = Some(path.clone());
        Ok(path)
    }

    /// kNN of the online backbone's features on the held-out sets, as one metrics line. Runs in
    /// evaluation mode and changes no state, so a resumed run stays exact.
    fn online_knn(&self, epoch: usize) -> Result<serde_json::Value> {
        use selfsup_eval::features::{extract, EvalTransform, Pooling};
        let t0 = Instant::now();
        let (bank, queries) = self.knn_sets.as_ref().context("online kNN sets not loaded")?;
        let view = &self.cfg.views[0];
        let t = EvalTransform { size: view.size, mean: view.mean.clone(), std: view.std.clone() };
        let backbone = self.objective.backbone();
        let (b, q) = (
            extract(backbone, bank.as_ref(), &t, Pooling::Global, 500, &self.device)?,
            extract(backbone, queries.as_ref(), &t, Pooling::Global, 500, &self.device)?,
        );
        let labels = |s: &Arc<dyn Source>| s.labels().unwrap_or_default();
        let classes = bank.num_classes().max(queries.num_classes());
        let acc = selfsup_eval::knn_classify(
            &b,
            &labels(bank),
            &q,
            &labels(queries),
            classes,
            &selfsup_eval::KnnSetting::STANDARD,
        )?;
        Ok(serde_json::json!({
            "step": self.step, "epoch": epoch, "knn_top1_k20": acc[0].top1, "knn_top1_k200": acc[1].top1,
            "knn_seconds": t0.elapsed().as_secs_f64(),
        }))
    }

    /// Keeps the metrics lines of steps before `self.step` (a resumed run rewrites the rest).
    fn open_metrics(&self) -> Result<std::fs::File> {
        let path = self.cfg.output_dir.join("metrics.jsonl");
        let kept: String = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| (s as usize) <= self.step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        std::fs::write(&path, kept).with_context(|| format!("writing {}", path.display()))?;
        std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Runs from the current step to the end.
    pub fn run(&mut self) -> Result<Summary> {
        self.run_until(self.total_steps)
    }

    /// Runs from the current step up to step `stop` (at most the schedule's end) and writes a
    /// checkpoint there: an interruption that a later `resume` continues exactly.
    pub fn run_until(&mut self, stop: usize) -> Result<Summary> {
        let stop = stop.min(self.total_steps);
        let out = &self.cfg.output_dir;
        std::fs::create_dir_all(out).with_context(|| format!("creating output directory {}", out.display()))?;
        crate::fsutil::write_atomic(&out.join("config.toml"), self.config_toml.as_bytes())?;
        let mut metrics = self.open_metrics()?;
        let per_epoch = self.loader.batches_per_epoch();
        let bar = (!self.quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(self.total_steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_position(self.step as u64);
            bar
        });
        let start = Instant::now();
        let first = self.step;
        let base_lr = self.cfg.optimizer.lr();
        let mut losses = Vec::new();
        let mut window = Instant::now();
        let mut window_steps = 0usize;
        let mut last_loss = f64::NAN;
        for (step, views) in self.loader.prefetch(self.step, stop, 2) {
            let views = views
                .with_context(|| format!("loading batch {} of epoch {}", step % per_epoch, step / per_epoch))?
                .views;
            let views = views.iter().map(|v| v.to_device(&self.device)).collect::<candle_core::Result<Vec<_>>>()?;
            let p = progress(step, self.total_steps);
            let key = Rng::from_keys(&[self.cfg.seed, step as u64, 0x57e9]).next_u64();
            let out = self.objective.loss(&views, Step { progress: p, key })?;
            let loss = out.total.to_scalar::<f32>()? as f64;
            if !loss.is_finite() {
                let last = match &self.last_checkpoint {
                    Some(c) => format!("the last good checkpoint is {}", c.display()),
                    None => "no checkpoint was written yet".to_string(),
                };
                bail!(
                    "the loss is {loss} at step {step} (epoch {}); stopping before the update: {last}",
                    step / per_epoch
                )
            }
            let grads = out.total.backward()?;
            let mut grad_scale = 1.0;
            let mut grad_norm = None;
            if let Some(max) = self.cfg.schedule.clip_grad_norm {
                let n = self.optimizer.grad_norm(&grads)?;
                grad_norm = Some(n);
                if n > max {
                    grad_scale = max / (n + 1e-6);
                }
            }
            let lr = warmup_cosine(step, self.total_steps, self.warmup_steps, base_lr, self.cfg.schedule.min_lr);
            self.optimizer.step(&grads, lr, grad_scale)?;
            self.objective.after_step(p)?;
            self.step = step + 1;
            last_loss = loss;
            losses.push(loss);
            window_steps += 1;
            if let Some(bar) = &bar {
                bar.set_position(self.step as u64);
            }
            if self.step.is_multiple_of(self.cfg.log_every) || self.step == stop {
                let secs = window.elapsed().as_secs_f64();
                let ips = (window_steps * self.cfg.batch_size) as f64 / secs.max(1e-9);
                let mut line = serde_json::json!({
                    "step": self.step, "epoch": step / per_epoch, "loss": loss, "lr": lr, "images_per_sec": ips,
                    "elapsed_s": start.elapsed().as_secs_f64(),
                });
                for (name, t) in &out.parts {
                    line[*name] = serde_json::json!(t.to_scalar::<f32>()? as f64);
                }
                for (name, v) in self.objective.stats(p) {
                    line[name] = serde_json::json!(v);
                }
                if let Some(n) = grad_norm {
                    line["grad_norm"] = serde_json::json!(n);
                }
                // Records the loader skipped because they failed to decode (named at the end).
                let corrupt = self.loader.corrupt();
                if !corrupt.is_empty() {
                    line["corrupt_records"] = serde_json::json!(corrupt.len());
                }
                writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
                let msg = format!("loss {loss:.4} lr {lr:.2e} {ips:.0} img/s");
                match &bar {
                    Some(bar) => bar.set_message(msg),
                    None if !self.quiet => eprintln!("step {}/{} {msg}", self.step, self.total_steps),
                    None => {}
                }
                window = Instant::now();
                window_steps = 0;
            }
            if let Some(k) = &self.cfg.online_knn {
                if self.step.is_multiple_of(k.every) || self.step == stop {
                    let line = self.online_knn(step / per_epoch)?;
                    writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
                    if bar.is_none() && !self.quiet {
                        eprintln!("step {}/{} online kNN {line}", self.step, self.total_steps);
                    }
                }
            }
            if self.step.is_multiple_of(self.cfg.checkpoint.every) || self.step == stop {
                self.save(loss)?;
                self.write_panel(&views, key)?;
            }
        }
        if let Some(bar) = bar {
            bar.finish();
        }
        let corrupt = self.loader.corrupt();
        if !corrupt.is_empty() && !self.quiet {
            eprintln!("{} record(s) failed to decode and were skipped:", corrupt.len());
            corrupt.iter().take(20).for_each(|c| eprintln!("  {c}"));
        }
        let ran = self.step - first;
        Ok(Summary {
            steps: self.step,
            last_loss,
            images_per_sec: (ran * self.cfg.batch_size) as f64 / start.elapsed().as_secs_f64().max(1e-9),
            last_checkpoint: self.last_checkpoint.clone(),
            losses,
        })
    }
}

/// The backbone of a checkpoint, ready for evaluation: its config and loaded weights.
pub fn load_backbone(path: &Path, device: &Device) -> Result<(RunConfig, Box<dyn selfsup_models::Backbone>)> {
    let (cfg, _, backbone) = load_backbone_vars(path, device, 0.0)?;
    Ok((cfg, backbone))
}

/// The pretrained backbone of a checkpoint with its variables (named `backbone.*`), built
/// with stochastic-depth rate `drop_path` (for fine-tuning).
pub fn load_backbone_vars(
    path: &Path,
    device: &Device,
    drop_path: f64,
) -> Result<(RunConfig, Vars, Box<dyn selfsup_models::Backbone>)> {
    let (manifest, tensors) = checkpoint::load(path, device)?;
    let cfg = RunConfig::from_toml(&manifest.config).context("the config stored in the checkpoint")?;
    let vars = Vars::new(cfg.seed);
    let model = selfsup_models::ModelConfig { drop_path_rate: drop_path, ..cfg.model.clone() };
    let backbone = model.build(vars.vb(candle_core::DType::F32, device).pp("backbone"))?;
    let model: HashMap<String, Tensor> = checkpoint::strip_prefix(&tensors, "model");
    let backbone_tensors = checkpoint::strip_prefix(&model, "backbone");
    let prefixed = backbone_tensors.into_iter().map(|(k, v)| (format!("backbone.{k}"), v)).collect();
    vars.load(&prefixed).with_context(|| format!("checkpoint {} does not match its model config", path.display()))?;
    Ok((cfg, vars, backbone))
}

/// A randomly initialised backbone exactly as `cfg` would start training.
pub fn random_backbone(cfg: &RunConfig, device: &Device) -> Result<Box<dyn selfsup_models::Backbone>> {
    Ok(random_backbone_vars(cfg, device, 0.0)?.1)
}

/// [`random_backbone`] with its variables and stochastic-depth rate `drop_path`.
pub fn random_backbone_vars(
    cfg: &RunConfig,
    device: &Device,
    drop_path: f64,
) -> Result<(Vars, Box<dyn selfsup_models::Backbone>)> {
    let vars = Vars::new(cfg.seed);
    let model = selfsup_models::ModelConfig { drop_path_rate: drop_path, ..cfg.model.clone() };
    let backbone = model.build(vars.vb(candle_core::DType::F32, device).pp("backbone"))?;
    Ok((vars, backbone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfsup_objectives::{Losses, Step};

    /// Wraps an objective and returns a NaN loss from step `at` on.
    struct NanAt {
        inner: Box<dyn Objective>,
        at: f64,
    }

    impl Objective for NanAt {
        fn num_views(&self) -> usize {
            self.inner.num_views()
        }
        fn loss(&self, views: &[Tensor], step: Step) -> candle_core::Result<Losses> {
            let l = self.inner.loss(views, step)?;
            if step.progress >= self.at {
                return Ok(Losses { total: (l.total * f64::NAN)?, parts: l.parts });
            }
            Ok(l)
        }
        fn after_step(&mut self, p: f64) -> candle_core::Result<()> {
            self.inner.after_step(p)
        }
        fn backbone(&self) -> &dyn selfsup_models::Backbone {
            self.inner.backbone()
        }
        fn state(&self) -> Vec<(String, Tensor)> {
            self.inner.state()
        }
        fn load_state(&mut self, t: &HashMap<String, Tensor>) -> candle_core::Result<()> {
            self.inner.load_state(t)
        }
        fn stats(&self, p: f64) -> Vec<(&'static str, f64)> {
            self.inner.stats(p)
        }
    }

    #[test]
    fn nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::testutil::synthetic_idx(data.path(), 64, 8, 4);
        let out = tempfile::tempdir().unwrap();
        let cfg = crate::testutil::tiny_config(&dir, out.path(), 6, 2);
        let mut t = Trainer::new(cfg).unwrap().quiet();
        let inner = std::mem::replace(&mut t.objective, Box::new(crate::testutil::Never));
        t.objective = Box::new(NanAt { inner, at: 5.0 / 6.0 });
        let e = t.run().unwrap_err().to_string();
        assert!(e.contains("at step 5") && e.contains("step-00000004.json"), "{e}");
        let (m, _) = checkpoint::load(out.path(), &Device::Cpu).unwrap();
        assert_eq!(m.step, 4);
    }

    fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        t.online().tensors().into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap())).collect()
    }

    /// 2N steps straight and N + resume + N give identical losses, weights, target network
    /// and optimizer state; and the checkpoint directory keeps only the newest `keep`.
    /// Objectives with pictures get a PNG per checkpoint (CARE: input and attention map).
    #[test]
    fn checkpoints_come_with_the_objective_panel() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::testutil::synthetic_idx(data.path(), 64, 8, 4);
        let out = tempfile::tempdir().unwrap();
        let objective = "[objective.care]\nproj_hidden = 16\nproj_dim = 8\ntrans_depth = 1\ntrans_heads = 2\ntrans_dim_head = 4\nfmap_size = 4";
        let cfg = crate::testutil::tiny_config_with(&dir, out.path(), 4, 2, objective);
        Trainer::new(cfg).unwrap().quiet().run().unwrap();
        for step in [2, 4] {
            let path = out.path().join(format!("samples/step-{step:08}.png"));
            let img = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
            // Two columns (input, attention) of 16 px views enlarged 6x, 8 rows.
            assert_eq!(img.dimensions(), (2 * 98 + 2, 8 * 98 + 2));
        }
    }

    /// Queues (and their pointers) survive a resume: DenseCL's two queues and key encoder.
    #[test]
    fn resume_continues_exactly_with_queues() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::testutil::synthetic_idx(data.path(), 64, 8, 4);
        let objective =
            "[objective.densecl]\nproj_hidden = 16\nproj_dim = 8\nqueue_size = 20\nmomentum = 0.9\nkey_bn_splits = 2";
        let cfg = |out: &std::path::Path| crate::testutil::tiny_config_with(&dir, out, 6, 3, objective);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut straight = Trainer::new(cfg(a.path())).unwrap().quiet();
        let s = straight.run().unwrap();
        let mut first = Trainer::new(cfg(b.path())).unwrap().quiet();
        first.run_until(4).unwrap();
        drop(first);
        let mut resumed = Trainer::new(cfg(b.path())).unwrap().quiet();
        resumed.resume(b.path()).unwrap();
        let tail = resumed.run().unwrap();
        assert_eq!(tail.losses, s.losses[4..], "resumed losses differ");
        let state = |t: &Trainer| {
            t.objective()
                .state()
                .into_iter()
                .map(|(k, v)| {
                    (k, v.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
                .collect::<Vec<_>>()
        };
        let (r, st) = (state(&resumed), state(&straight));
        // 6 steps of 8 keys through a 20-key queue: the pointer wrapped to 48 % 20 = 8.
        assert!(
            r.iter().any(|(k, v)| k == "queue2_ptr" && v == &[8.0]),
            "{:?}",
            r.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
        assert_eq!(r, st);
    }

    #[test]
    fn resume_continues_exactly() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::testutil::synthetic_idx(data.path(), 64, 8, 4);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut straight = Trainer::new(crate::testutil::tiny_config(&dir, a.path(), 8, 2)).unwrap().quiet();
        let s = straight.run().unwrap();
        assert_eq!(s.losses.len(), 8);
        assert_eq!(
            checkpoint::list(&a.path().join("checkpoints")).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [6, 8]
        );

        let mut first = Trainer::new(crate::testutil::tiny_config(&dir, b.path(), 8, 3)).unwrap().quiet();
        let head = first.run_until(4).unwrap();
        assert_eq!(head.losses, s.losses[..4]);
        drop(first);
        let mut resumed = Trainer::new(crate::testutil::tiny_config(&dir, b.path(), 8, 3)).unwrap().quiet();
        resumed.resume(b.path()).unwrap();
        assert_eq!(resumed.step(), 4);
        let tail = resumed.run().unwrap();
        assert_eq!(tail.losses, s.losses[4..], "resumed losses differ");
        assert_eq!(weights(&resumed), weights(&straight));
        let state = |t: &Trainer| {
            t.objective()
                .state()
                .into_iter()
                .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(state(&resumed), state(&straight));
        let metrics = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 8, "a resumed run rewrites the log lines after its checkpoint");
    }

    /// Online kNN writes its lines at the configured steps and at the end, and leaves the
    /// training itself untouched (same losses and weights as without it).
    #[test]
    fn online_knn_is_logged_and_changes_nothing() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::testutil::synthetic_idx(data.path(), 64, 8, 4);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut plain = Trainer::new(crate::testutil::tiny_config(&dir, a.path(), 5, 5)).unwrap().quiet();
        let p = plain.run().unwrap();
        let mut cfg = crate::testutil::tiny_config(&dir, b.path(), 5, 5);
        cfg.online_knn = Some(crate::config::OnlineKnnConfig { every: 2, bank: 40, queries: 8 });
        let mut with_knn = Trainer::new(cfg).unwrap().quiet();
        let k = with_knn.run().unwrap();
        assert_eq!(p.losses, k.losses);
        assert_eq!(weights(&plain), weights(&with_knn));
        let metrics = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
        let knn: Vec<serde_json::Value> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("knn_top1_k20").is_some())
            .collect();
        assert_eq!(knn.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4, 5]);
        assert!(knn.iter().all(|v| (0.0..=100.0).contains(&v["knn_top1_k20"].as_f64().unwrap())));
        let mut bad = crate::testutil::tiny_config(&dir, b.path(), 5, 5);
        bad.online_knn = Some(crate::config::OnlineKnnConfig { every: 0, bank: 40, queries: 8 });
        assert!(Trainer::new(bad).err().unwrap().to_string().contains("online_knn.every"));
    }
}
