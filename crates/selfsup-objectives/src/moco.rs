//! MoCo v2: momentum contrast with an MLP head (Chen et al., 2020).
//!
//! Reference: `facebookresearch/moco` `moco/builder.py` + `main_moco.py --mlp --moco-t 0.2
//! --aug-plus --cos` (METHODS.md 1.8).
//! - Query encoder = backbone + `Linear(C, C) -> ReLU -> Linear(C, 128)`; key encoder = a copy,
//!   then `k <- m k + (1 - m) q` over parameters with constant `m = 0.999` (its BatchNorm
//!   statistics are its own).
//! - q from view 1, k from view 2 (asymmetric, as the reference), both L2-normalised;
//!   `logits = [q.k, q.queue] / T`, cross-entropy with label 0, `T = 0.2`.
//! - Queue of 65,536 keys, initialised to normalised Gaussian noise; after each step the batch's
//!   keys replace the oldest (`queue_ptr` advances, wrapping).
//! - Shuffle-BN: the reference shuffles the key batch across GPUs so each GPU's BatchNorm sees
//!   keys of other queries. On one device selfsup does what a split across GPUs does: the key
//!   batch is permuted (keyed by the step) and encoded in `key_bn_splits` chunks, each with its
//!   own batch statistics (8 = the reference's 8 GPUs), then un-permuted. Each chunk updates the
//!   key encoder's running statistics once.
//!
//! Choices: the key encoder's momentum update runs in `after_step` (after the optimizer), the
//! reference runs it at the start of the next forward: the same sequence of states. Head init is
//! PyTorch's default, as the reference's. Names: `backbone.*`, `projector.0`, `projector.2`
//! (the reference's `encoder_q.fc.0/2`).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Result, Tensor};
use selfsup_models::layers::linear;
use selfsup_models::{Backbone, Mode, ModelConfig, Vars, Vb};
use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::{l2_normalize, Losses, Objective, Step, Teacher};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Hidden width of the MLP head (default: the backbone's feature width, as the reference).
    #[serde(default)]
    pub proj_hidden: Option<usize>,
    #[serde(default = "default_dim")]
    pub proj_dim: usize,
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    #[serde(default = "default_t")]
    pub temperature: f64,
    /// Key-encoder momentum (constant).
    #[serde(default = "default_m")]
    pub momentum: f64,
    /// Chunks with their own BatchNorm statistics for the key batch (single-device shuffle-BN).
    #[serde(default = "default_splits")]
    pub key_bn_splits: usize,
}

pub(crate) fn default_dim() -> usize {
    128
}
pub(crate) fn default_queue() -> usize {
    65536
}
pub(crate) fn default_t() -> f64 {
    0.2
}
pub(crate) fn default_m() -> f64 {
    0.999
}
pub(crate) fn default_splits() -> usize {
    8
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proj_hidden: None,
            proj_dim: default_dim(),
            queue_size: default_queue(),
            temperature: default_t(),
            momentum: default_m(),
            key_bn_splits: default_splits(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        validate_contrast(
            "moco_v2",
            self.proj_dim,
            self.queue_size,
            self.temperature,
            self.momentum,
            self.key_bn_splits,
        )
    }
}

/// Shared checks of the momentum-contrast configs (MoCo v2, DenseCL).
pub(crate) fn validate_contrast(what: &str, dim: usize, queue: usize, t: f64, m: f64, splits: usize) -> Result<()> {
    if dim == 0 || queue == 0 || splits == 0 {
        candle_core::bail!("objective.{what}: proj_dim, queue_size and key_bn_splits must be positive")
    }
    if t <= 0.0 {
        candle_core::bail!("objective.{what}.temperature must be positive, got {t}")
    }
    if !(0.0..=1.0).contains(&m) {
        candle_core::bail!("objective.{what}.momentum: {m} is outside [0, 1]")
    }
    Ok(())
}

/// `Linear -> ReLU -> Linear` (`0`, `2`), PyTorch default init.
pub(crate) struct Mlp {
    fc1: selfsup_ops::linear::Linear,
    fc2: selfsup_ops::linear::Linear,
}

impl Mlp {
    pub(crate) fn new(d_in: usize, hidden: usize, d_out: usize, vb: Vb) -> Result<Self> {
        Ok(Self { fc1: linear(d_in, hidden, true, vb.pp("0"))?, fc2: linear(hidden, d_out, true, vb.pp("2"))? })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.relu()?)
    }
}

/// A FIFO of normalised keys, (size, dim), with its write pointer.
pub struct Queue {
    pub keys: Tensor,
    pub ptr: usize,
}

impl Queue {
    /// Normalised Gaussian noise (the reference's initial queue), keyed by `seed`.
    pub fn new(size: usize, dim: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::from_keys(&[seed, 0x9ee0e]);
        let v: Vec<f32> = (0..size * dim).map(|_| rng.normal() as f32).collect();
        Ok(Self { keys: l2_normalize(&Tensor::from_vec(v, (size, dim), device)?)?, ptr: 0 })
    }

    /// The logits of queries `q` (n, dim) against every key, (n, size). The queue is a constant
    /// of the step: it gets no gradient (candle's `matmul` would compute one).
    pub fn logits(&self, q: &Tensor) -> Result<Tensor> {
        selfsup_ops::linear::linear(q, &self.keys, None)
    }

    /// Replaces the oldest rows by `keys` (b, dim), wrapping at the end. The rows are written
    /// in place (`slice_set`): rebuilding the queue through `slice_scatter0` copied all of it
    /// (32 MB for DenseCL's two 65,536 x 128 queues) on every step. Call it only once the
    /// step's backward is done, as `after_step` does: the loss's graph reads the queue.
    pub fn push(&mut self, keys: &Tensor) -> Result<()> {
        let size = self.keys.dim(0)?;
        let mut keys = keys.detach().to_dtype(self.keys.dtype())?;
        if keys.dim(0)? > size {
            keys = keys.narrow(0, keys.dim(0)? - size, size)?;
        }
        let b = keys.dim(0)?;
        let first = b.min(size - self.ptr);
        self.keys.slice_set(&keys.narrow(0, 0, first)?.contiguous()?, 0, self.ptr)?;
        if first < b {
            self.keys.slice_set(&keys.narrow(0, first, b - first)?.contiguous()?, 0, 0)?;
        }
        self.ptr = (self.ptr + b) % size;
        Ok(())
    }

    pub fn state(&self, name: &str) -> Vec<(String, Tensor)> {
        let ptr = Tensor::new(&[self.ptr as u32], self.keys.device()).expect("a one-element tensor");
        // A copy: `push` writes into `self.keys` in place.
        let keys = self.keys.copy().expect("a copy of the queue");
        vec![(name.to_string(), keys), (format!("{name}_ptr"), ptr)]
    }

    pub fn load(&mut self, name: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let (Some(keys), Some(ptr)) = (tensors.get(name), tensors.get(&format!("{name}_ptr"))) else {
            candle_core::bail!("checkpoint lacks `{name}` or `{name}_ptr`")
        };
        if keys.dims() != self.keys.dims() {
            candle_core::bail!(
                "checkpoint `{name}` has shape {:?}, the config needs {:?}",
                keys.shape(),
                self.keys.shape()
            )
        }
        let ptr = ptr.to_dtype(DType::U32)?.to_vec1::<u32>()?[0] as usize;
        if ptr >= self.keys.dim(0)? {
            candle_core::bail!("checkpoint `{name}_ptr` = {ptr} is outside the queue")
        }
        // A copy, never the caller's storage: `push` writes in place.
        self.keys = keys.to_device(self.keys.device())?.to_dtype(DType::F32)?.copy()?;
        self.ptr = ptr;
        Ok(())
    }
}

/// InfoNCE as the reference's `CrossEntropyLoss` on `[pos, neg] / t` with label 0, averaged
/// over rows (pos: (n, 1), neg: (n, k)); fused in selfsup-ops.
pub use selfsup_ops::contrast::info_nce;

/// Runs `f` on the batch `xs` permuted by a permutation keyed by `key`, in `splits` chunks (each
/// a separate forward, so BatchNorm normalises per chunk), and returns `f`'s outputs (each with
/// the batch first) back in the original order: shuffle-BN on one device.
pub fn shuffled_forward(
    xs: &Tensor,
    splits: usize,
    key: u64,
    f: impl Fn(&Tensor, Mode) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let b = xs.dim(0)?;
    let mut perm: Vec<u32> = (0..b as u32).collect();
    Rng::from_keys(&[key, 0x5bf1e]).shuffle(&mut perm);
    let mut inverse = vec![0u32; b];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p as usize] = i as u32;
    }
    let shuffled = xs.index_select(&Tensor::from_vec(perm, b, xs.device())?, 0)?;
    let splits = splits.clamp(1, b);
    let mut outs: Vec<Vec<Tensor>> = Vec::new();
    let mut start = 0;
    for i in 0..splits {
        let len = b / splits + usize::from(i < b % splits);
        let parts = f(&shuffled.narrow(0, start, len)?, Mode::Train { key: key ^ i as u64 })?;
        for (j, p) in parts.into_iter().enumerate() {
            if outs.len() <= j {
                outs.push(Vec::new());
            }
            outs[j].push(p);
        }
        start += len;
    }
    let inverse = Tensor::from_vec(inverse, b, xs.device())?;
    outs.into_iter().map(|parts| Tensor::cat(&parts, 0)?.index_select(&inverse, 0)).collect()
}

pub struct MocoV2 {
    cfg: Config,
    online: Box<dyn Backbone>,
    projector: Mlp,
    target: Box<dyn Backbone>,
    target_projector: Mlp,
    teacher: Teacher,
    queue: Queue,
    /// Keys of the last `loss`, enqueued by `after_step`.
    pending: Mutex<Option<Tensor>>,
}

impl MocoV2 {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let vb = online.vb(DType::F32, device);
        let backbone = model.build(vb.pp("backbone"))?;
        let d = backbone.num_features();
        let hidden = cfg.proj_hidden.unwrap_or(d);
        let projector = Mlp::new(d, hidden, cfg.proj_dim, vb.pp("projector"))?;
        let teacher = Teacher::new(online, seed);
        let tvb = teacher.vars.vb(DType::F32, device);
        let target = ModelConfig { drop_path_rate: 0.0, ..model.clone() }.build(tvb.pp("backbone"))?;
        let target_projector = Mlp::new(d, hidden, cfg.proj_dim, tvb.pp("projector"))?;
        teacher.start("moco_v2")?;
        Ok(Self {
            cfg: cfg.clone(),
            online: backbone,
            projector,
            target,
            target_projector,
            teacher,
            queue: Queue::new(cfg.queue_size, cfg.proj_dim, seed, device)?,
            pending: Mutex::new(None),
        })
    }
}

impl Objective for MocoV2 {
    fn num_views(&self) -> usize {
        2
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [im_q, im_k] = views else { candle_core::bail!("moco_v2 needs 2 views, got {}", views.len()) };
        let q = l2_normalize(&self.projector.forward(&self.online.forward_pooled(im_q, step.mode(0))?)?)?;
        let k = shuffled_forward(im_k, self.cfg.key_bn_splits, step.key, |xs, mode| {
            Ok(vec![l2_normalize(&self.target_projector.forward(&self.target.forward_pooled(xs, mode)?)?)?])
        })?
        .remove(0)
        .detach();
        let pos = (&q * &k)?.sum_keepdim(1)?;
        let neg = self.queue.logits(&q)?;
        let total = info_nce(&pos, &neg, self.cfg.temperature)?;
        *self.pending.lock().expect("pending keys lock") = Some(k);
        Ok(Losses { total, parts: vec![] })
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.teacher.update(self.cfg.momentum)?;
        if let Some(k) = self.pending.lock().expect("pending keys lock").take() {
            self.queue.push(&k)?;
        }
        Ok(())
    }

    fn backbone(&self) -> &dyn Backbone {
        self.online.as_ref()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<_> = self.teacher.state();
        out.extend(self.queue.state("queue"));
        out
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.teacher.load(tensors)?;
        self.queue.load("queue", tensors)
    }

    fn stats(&self, _progress: f64) -> Vec<(&'static str, f64)> {
        vec![("momentum", self.cfg.momentum)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_fifo_and_wraps() {
        let mut q = Queue::new(5, 2, 0, &Device::Cpu).unwrap();
        let norms = q.keys.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
        let keys = |v: f32| Tensor::new(&[[v, 0.0], [v + 1.0, 0.0], [v + 2.0, 0.0]], &Device::Cpu).unwrap();
        q.push(&keys(10.0)).unwrap();
        assert_eq!(q.ptr, 3);
        q.push(&keys(20.0)).unwrap();
        assert_eq!(q.ptr, 1);
        let col: Vec<f32> = q.keys.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(col, [22.0, 11.0, 12.0, 20.0, 21.0]);
        let state: HashMap<_, _> = q.state("queue").into_iter().collect();
        let mut r = Queue::new(5, 2, 1, &Device::Cpu).unwrap();
        r.load("queue", &state).unwrap();
        assert_eq!(r.ptr, 1);
        assert_eq!(r.keys.to_vec2::<f32>().unwrap(), q.keys.to_vec2::<f32>().unwrap());
        // Pushes write in place, but never into a saved state or into the queue it came from.
        let saved = state["queue"].to_vec2::<f32>().unwrap();
        r.push(&keys(30.0)).unwrap();
        q.push(&keys(40.0)).unwrap();
        assert_eq!(state["queue"].to_vec2::<f32>().unwrap(), saved);
        let col = |q: &Queue| q.keys.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(col(&r), [22.0, 30.0, 31.0, 32.0, 21.0]);
        assert_eq!(col(&q), [22.0, 40.0, 41.0, 42.0, 21.0]);
        let mut small = Queue::new(4, 2, 1, &Device::Cpu).unwrap();
        assert!(small.load("queue", &state).unwrap_err().to_string().contains("has shape [5, 2]"));
    }

    #[test]
    fn shuffled_forward_returns_rows_in_order_and_normalises_per_chunk() {
        let xs = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        // Identity comes back in order, whatever the permutation and chunking.
        let same = shuffled_forward(&xs, 3, 9, |x, _| Ok(vec![x.clone()])).unwrap().remove(0);
        assert_eq!(same.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..8).map(|i| i as f32).collect::<Vec<_>>());
        // Subtracting the chunk mean: with 1 split the whole batch's mean, with 4 splits not.
        let centre = |x: &Tensor, _| Ok(vec![x.broadcast_sub(&x.mean_keepdim(0)?)?]);
        let one =
            shuffled_forward(&xs, 1, 9, centre).unwrap().remove(0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(one[0], -3.5);
        let four =
            shuffled_forward(&xs, 4, 9, centre).unwrap().remove(0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(four.iter().all(|v| v.abs() <= 3.5) && four != one);
    }

    #[test]
    fn loss_gradients_momentum_and_queue_update() {
        let cfg = Config {
            proj_hidden: Some(16),
            proj_dim: 8,
            queue_size: 12,
            key_bn_splits: 2,
            momentum: 0.9,
            ..Config::default()
        };
        let online = Vars::new(3);
        let mut moco = MocoV2::new(&cfg, &crate::tests::tiny_resnet(), &online, &Device::Cpu, 3).unwrap();
        let v1 = Tensor::randn(0f32, 1., (4, 1, 8, 8), &Device::Cpu).unwrap();
        let v2 = Tensor::randn(0f32, 1., (4, 1, 8, 8), &Device::Cpu).unwrap();
        let l = moco.loss(&[v1.clone(), v2.clone()], Step { progress: 0.0, key: 0 }).unwrap();
        // Cosines lie in [-1, 1]: the loss lies in (0, ln(1 + K) + 2 / T].
        let total = l.total.to_scalar::<f32>().unwrap();
        assert!(total > 0.0 && total <= 13f32.ln() + 10.0, "{total}");
        let grads = l.total.backward().unwrap();
        selfsup_ops::testing::assert_every_var_has_grad(
            online.params.vars().iter().map(|(n, v)| (n.as_str(), v)),
            &grads,
        );
        for (name, v) in moco.teacher.vars.params.vars() {
            assert!(grads.get(v.as_tensor()).is_none(), "target {name} got a gradient");
        }
        // The keys land in the queue; the target moves by 1 - m towards the online network.
        let k = moco.pending.lock().unwrap().clone().unwrap();
        let name = "backbone.conv1.weight";
        let o = online.params.get(name).unwrap();
        let t0 =
            moco.teacher.vars.params.get(name).unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        o.set(&o.as_tensor().ones_like().unwrap()).unwrap();
        moco.after_step(0.0).unwrap();
        let t1 =
            moco.teacher.vars.params.get(name).unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in t1.iter().zip(&t0) {
            assert!((a - (0.9 * b + 0.1)).abs() < 1e-6);
        }
        assert_eq!(moco.queue.ptr, 4);
        assert_eq!(moco.queue.keys.narrow(0, 0, 4).unwrap().to_vec2::<f32>().unwrap(), k.to_vec2::<f32>().unwrap());
        // State round trip: queue, pointer and target come back.
        let state: HashMap<_, _> = moco.state().into_iter().collect();
        let online2 = Vars::new(4);
        let mut other = MocoV2::new(&cfg, &crate::tests::tiny_resnet(), &online2, &Device::Cpu, 4).unwrap();
        other.load_state(&state).unwrap();
        assert_eq!(other.queue.ptr, 4);
        assert_eq!(other.queue.keys.to_vec2::<f32>().unwrap(), moco.queue.keys.to_vec2::<f32>().unwrap());
    }
}
