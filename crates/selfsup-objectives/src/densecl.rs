//! DenseCL: dense contrastive learning (Wang et al., CVPR 2021).
//!
//! Reference: `WXinlong/DenseCL@b64bbb6` `openselfsup/models/densecl.py`, `necks.py:
//! DenseCLNeck`, `heads/contrastive_head.py` (METHODS.md 1.7). MoCo v2 (see `moco.rs`) plus:
//! - a dense head on the backbone's final map: `Conv1x1(C, C) -> ReLU -> Conv1x1(C, 128)`, giving
//!   one vector per position (S^2 = 49 at 224 on ResNet-50), and its global average (`k2`);
//! - matching on *backbone* features: `sim = q_b^T k_b` (per image, S^2 x S^2, both L2-normalised
//!   along channels), `j*(i) = argmax_j sim[i, j]`; the dense positive of query position `i` is
//!   `q_grid[i] . k_grid[j*(i)]`;
//! - a second queue of pooled dense keys `k2` supplies the dense negatives;
//! - `L = (1 - lambda) * L_single + lambda * L_dense`, both InfoNCE at `T = 0.2`, `lambda = 0.5`;
//!   the dense term averages over the N * S^2 query positions.
//!
//! Choices: the neck's init is the reference's: `DenseCL.init_weights` calls the neck's
//! `init_weights(init_linear='kaiming')`, so the Linear layers are Kaiming-normal (fan-in, ReLU:
//! N(0, 2 / fan_in)) with zero biases, and `_init_weights` leaves the 1x1 convs at PyTorch's
//! default, U(+-1 / sqrt(fan_in)) for weights and biases. (The `'normal'` branch's Linear
//! N(0, 0.01), used here until 2026-11-24, left the global term unlearned on Fashion-MNIST: its
//! InfoNCE rose to log(1 + K) while the dense term fell; docs/benchmarks.md.)
//! Names: `projector.{0,2}` (global, Linear) and `dense_projector.{0,2}` (1x1 conv weights
//! `(out, in, 1, 1)`), the reference's `neck.mlp` and `neck.mlp2`. Shuffle-BN on one device as in `moco.rs`. The warm-up hook (lambda = 0 for
//! 1000 iterations) is off in every shipped config, so it is not implemented.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::Init;
use selfsup_models::{Backbone, Mode, ModelConfig, Vars, Vb};
use serde::{Deserialize, Serialize};

use crate::moco::{self, info_nce, shuffled_forward, validate_contrast, Queue};
use crate::{l2_normalize, Losses, Objective, Step, Teacher};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Hidden width of both heads (default: the backbone's feature width, as the reference).
    #[serde(default)]
    pub proj_hidden: Option<usize>,
    #[serde(default = "moco::default_dim")]
    pub proj_dim: usize,
    #[serde(default = "moco::default_queue")]
    pub queue_size: usize,
    #[serde(default = "moco::default_t")]
    pub temperature: f64,
    #[serde(default = "moco::default_m")]
    pub momentum: f64,
    /// Weight of the dense loss.
    #[serde(default = "default_lambda")]
    pub loss_lambda: f64,
    #[serde(default = "moco::default_splits")]
    pub key_bn_splits: usize,
}

fn default_lambda() -> f64 {
    0.5
}

impl Default for Config {
    /// MoCo v2's defaults and the paper's lambda = 0.5.
    fn default() -> Self {
        let m = moco::Config::default();
        Self {
            proj_hidden: m.proj_hidden,
            proj_dim: m.proj_dim,
            queue_size: m.queue_size,
            temperature: m.temperature,
            momentum: m.momentum,
            loss_lambda: default_lambda(),
            key_bn_splits: m.key_bn_splits,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        validate_contrast(
            "densecl",
            self.proj_dim,
            self.queue_size,
            self.temperature,
            self.momentum,
            self.key_bn_splits,
        )?;
        if !(0.0..=1.0).contains(&self.loss_lambda) {
            candle_core::bail!("objective.densecl.loss_lambda: {} is outside [0, 1]", self.loss_lambda)
        }
        Ok(())
    }
}

/// `DenseCLNeck`: global MLP on the pooled map, 1x1-conv MLP on every position.
struct Neck {
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
}

/// What the neck makes of a backbone map.
struct NeckOut {
    /// (b, dim) global embedding.
    global: Tensor,
    /// (b, s, dim) dense embeddings, positions in raster order.
    grid: Tensor,
    /// (b, dim) average of `grid`.
    pooled_grid: Tensor,
    /// (b, s, c) the backbone's own vectors, for matching.
    backbone: Tensor,
}

impl Neck {
    fn new(c: usize, hidden: usize, dim: usize, vb: Vb) -> Result<Self> {
        // mmcv `kaiming_init(mode='fan_in', nonlinearity='relu')`, bias 0.
        let lin = |i: usize, o: usize, vb: Vb| -> Result<(Tensor, Tensor)> {
            let stdev = (2.0 / i as f64).sqrt();
            Ok((
                vb.params.get_with_hints((o, i), "weight", Init::Randn { mean: 0.0, stdev })?,
                vb.params.get_with_hints(o, "bias", Init::Const(0.0))?,
            ))
        };
        // `nn.Conv2d`'s own reset_parameters: kaiming_uniform(a = sqrt(5)) = U(+-1 / sqrt(fan_in)).
        let conv = |i: usize, o: usize, vb: Vb| -> Result<(Tensor, Tensor)> {
            let bound = 1.0 / (i as f64).sqrt();
            let init = Init::Uniform { lo: -bound, up: bound };
            Ok((vb.params.get_with_hints((o, i, 1, 1), "weight", init)?, vb.params.get_with_hints(o, "bias", init)?))
        };
        let (g, d) = (vb.pp("projector"), vb.pp("dense_projector"));
        Ok(Self {
            fc1: lin(c, hidden, g.pp("0"))?,
            fc2: lin(hidden, dim, g.pp("2"))?,
            conv1: conv(c, hidden, d.pp("0"))?,
            conv2: conv(hidden, dim, d.pp("2"))?,
        })
    }

    /// map: (b, c, h, w) backbone output.
    fn forward(&self, map: &Tensor) -> Result<NeckOut> {
        let (b, c, h, w) = map.dims4()?;
        let apply = |xs: &Tensor, (w, bias): &(Tensor, Tensor)| -> Result<Tensor> {
            let o = w.dim(0)?;
            xs.matmul(&w.reshape((o, ()))?.t()?)?.broadcast_add(bias)
        };
        let tokens = map.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (b, s, c)
        let pooled = tokens.mean(1)?;
        let global = apply(&apply(&pooled, &self.fc1)?.relu()?, &self.fc2)?;
        let flat = tokens.reshape((b * h * w, c))?;
        let grid = apply(&apply(&flat, &self.conv1)?.relu()?, &self.conv2)?;
        let dim = grid.dim(1)?;
        let grid = grid.reshape((b, h * w, dim))?;
        let pooled_grid = grid.mean(1)?;
        Ok(NeckOut { global, grid, pooled_grid, backbone: tokens })
    }
}

/// Unit L2 norm along the last axis of a rank-3 tensor.
fn normalize_last(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&(xs.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
}

pub struct DenseCl {
    cfg: Config,
    online: Box<dyn Backbone>,
    neck: Neck,
    target: Box<dyn Backbone>,
    target_neck: Neck,
    teacher: Teacher,
    queue: Queue,
    queue2: Queue,
    /// (k, k2) of the last `loss`, enqueued by `after_step`.
    pending: Mutex<Option<(Tensor, Tensor)>>,
}

impl DenseCl {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let vb = online.vb(DType::F32, device);
        let backbone = model.build(vb.pp("backbone"))?;
        let c = backbone.num_features();
        let hidden = cfg.proj_hidden.unwrap_or(c);
        let neck = Neck::new(c, hidden, cfg.proj_dim, vb.clone())?;
        let teacher = Teacher::new(online, seed);
        let tvb = teacher.vars.vb(DType::F32, device);
        let target = ModelConfig { drop_path_rate: 0.0, ..model.clone() }.build(tvb.pp("backbone"))?;
        let target_neck = Neck::new(c, hidden, cfg.proj_dim, tvb)?;
        teacher.start("densecl")?;
        Ok(Self {
            cfg: cfg.clone(),
            online: backbone,
            neck,
            target,
            target_neck,
            teacher,
            queue: Queue::new(cfg.queue_size, cfg.proj_dim, seed, device)?,
            queue2: Queue::new(cfg.queue_size, cfg.proj_dim, seed ^ 0xd2, device)?,
            pending: Mutex::new(None),
        })
    }
}

/// The dense positives: for each query position, the dense key at the position whose *backbone*
/// vector is most similar. q_b, k_b: (b, s, c) normalised; k_grid: (b, s, d). Returns (b, s, d).
pub fn matched_keys(q_b: &Tensor, k_b: &Tensor, k_grid: &Tensor) -> Result<Tensor> {
    let (b, s, d) = k_grid.dims3()?;
    let sim = q_b.matmul(&k_b.transpose(1, 2)?)?; // (b, s_q, s_k)
    let idx = sim.argmax(2)?; // (b, s_q), u32
    let offsets = Tensor::arange(0u32, b as u32, q_b.device())?.affine(s as f64, 0.0)?.reshape((b, 1))?;
    let flat = idx.broadcast_add(&offsets)?.flatten_all()?;
    k_grid.reshape((b * s, d))?.index_select(&flat, 0)?.reshape((b, s, d))
}

impl Objective for DenseCl {
    fn num_views(&self) -> usize {
        2
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [im_q, im_k] = views else { candle_core::bail!("densecl needs 2 views, got {}", views.len()) };
        let q = self.neck.forward(&self.online.forward_features(im_q, step.mode(0))?)?;
        let (q_global, q_grid, q_b) =
            (l2_normalize(&q.global)?, normalize_last(&q.grid)?, normalize_last(&q.backbone)?);
        let keys = shuffled_forward(im_k, self.cfg.key_bn_splits, step.key, |xs, mode: Mode| {
            let k = self.target_neck.forward(&self.target.forward_features(xs, mode)?)?;
            Ok(vec![
                l2_normalize(&k.global)?,
                normalize_last(&k.grid)?,
                l2_normalize(&k.pooled_grid)?,
                normalize_last(&k.backbone)?,
            ])
        })?;
        let [k, k_grid, k2, k_b] = &keys.iter().map(Tensor::detach).collect::<Vec<_>>()[..] else {
            unreachable!("four key tensors")
        };
        let (b, s, d) = q_grid.dims3()?;
        let pos = (&q_global * k)?.sum_keepdim(1)?;
        let neg = self.queue.logits(&q_global)?;
        let single = info_nce(&pos, &neg, self.cfg.temperature)?;
        let matched = matched_keys(&q_b, k_b, k_grid)?;
        let pos_dense = (&q_grid * matched)?.sum(2)?.reshape((b * s, 1))?;
        let q_flat = q_grid.reshape((b * s, d))?;
        let neg_dense = self.queue2.logits(&q_flat)?;
        let dense = info_nce(&pos_dense, &neg_dense, self.cfg.temperature)?;
        let lambda = self.cfg.loss_lambda;
        let (single, dense) = ((single * (1.0 - lambda))?, (dense * lambda)?);
        let total = (&single + &dense)?;
        *self.pending.lock().expect("pending keys lock") = Some((k.clone(), k2.clone()));
        Ok(Losses { total, parts: vec![("loss_single", single), ("loss_dense", dense)] })
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.teacher.update(self.cfg.momentum)?;
        if let Some((k, k2)) = self.pending.lock().expect("pending keys lock").take() {
            self.queue.push(&k)?;
            self.queue2.push(&k2)?;
        }
        Ok(())
    }

    fn backbone(&self) -> &dyn Backbone {
        self.online.as_ref()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<_> = self.teacher.state();
        out.extend(self.queue.state("queue"));
        out.extend(self.queue2.state("queue2"));
        out
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.teacher.load(tensors)?;
        self.queue.load("queue", tensors)?;
        self.queue2.load("queue2", tensors)
    }

    fn stats(&self, _progress: f64) -> Vec<(&'static str, f64)> {
        vec![("momentum", self.cfg.momentum)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_takes_the_argmax_over_backbone_similarity() {
        // One image, 3 positions; query position i is most like key position perm[i].
        let q_b = Tensor::new(&[[[1f32, 0.], [0., 1.], [0.6, 0.8]]], &Device::Cpu).unwrap();
        let k_b = Tensor::new(&[[[0f32, 1.], [0.6, 0.8], [1., 0.]]], &Device::Cpu).unwrap();
        let k_grid = Tensor::new(&[[[10f32], [20.], [30.]]], &Device::Cpu).unwrap();
        let m = matched_keys(&q_b, &k_b, &k_grid).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m, [30.0, 10.0, 20.0]);
        // Batches index their own image.
        let two = |t: &Tensor| Tensor::cat(&[t, t], 0).unwrap();
        let k_grid2 = Tensor::cat(&[&k_grid, &(&k_grid + 100.).unwrap()], 0).unwrap();
        let m2 =
            matched_keys(&two(&q_b), &two(&k_b), &k_grid2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m2, [30.0, 10.0, 20.0, 130.0, 110.0, 120.0]);
    }

    /// The neck starts as the reference's does after `init_weights(init_linear='kaiming')`:
    /// Linear N(0, 2 / fan_in) with zero biases, 1x1 convs at PyTorch's default U(+-1 / sqrt(fan_in)).
    #[test]
    fn neck_init_is_the_references_kaiming_branch() {
        let model = ModelConfig { widths: Some(vec![4, 8, 8, 64]), ..crate::tests::tiny_resnet() };
        let cfg = Config { proj_hidden: Some(128), proj_dim: 64, queue_size: 16, ..Config::default() };
        let dcl = DenseCl::new(&cfg, &model, &Vars::new(3), &Device::Cpu, 3).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = |v: &[f32]| {
            let m = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let max_abs = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs()));
        for ((w, b), fan_in) in [(&dcl.neck.fc1, 64f32), (&dcl.neck.fc2, 128.)] {
            let want = (2.0 / fan_in).sqrt();
            let got = std(&values(w));
            assert!((got / want - 1.0).abs() < 0.05, "Linear weight std {got}, want {want}");
            assert!(values(b).iter().all(|v| *v == 0.0), "Linear bias is not zero");
        }
        for ((w, b), fan_in) in [(&dcl.neck.conv1, 64f32), (&dcl.neck.conv2, 128.)] {
            let bound = 1.0 / fan_in.sqrt();
            for (what, v) in [("weight", values(w)), ("bias", values(b))] {
                assert!(max_abs(&v) <= bound, "conv {what} beyond +-{bound}");
                assert!(max_abs(&v) > 0.8 * bound, "conv {what} does not fill +-{bound}");
            }
            let got = std(&values(w));
            assert!((got / (bound / 3f32.sqrt()) - 1.0).abs() < 0.05, "conv weight std {got}");
        }
    }

    /// METHODS.md 3 at small scale: N * S^2 dense rows; every online parameter gets a gradient,
    /// no target parameter does; both queues take their keys; state round-trips.
    #[test]
    fn losses_gradients_and_queues() {
        let model = crate::tests::tiny_resnet();
        let cfg = Config { proj_hidden: Some(16), proj_dim: 8, queue_size: 16, key_bn_splits: 2, ..Config::default() };
        let online = Vars::new(2);
        let mut dcl = DenseCl::new(&cfg, &model, &online, &Device::Cpu, 2).unwrap();
        let v1 = Tensor::randn(0f32, 1., (4, 1, 16, 16), &Device::Cpu).unwrap();
        let v2 = Tensor::randn(0f32, 1., (4, 1, 16, 16), &Device::Cpu).unwrap();
        let l = dcl.loss(&[v1, v2], Step { progress: 0.0, key: 1 }).unwrap();
        let parts: HashMap<_, _> = l.parts.iter().map(|(n, t)| (*n, t.to_scalar::<f32>().unwrap())).collect();
        let total = l.total.to_scalar::<f32>().unwrap();
        assert!((parts["loss_single"] + parts["loss_dense"] - total).abs() < 1e-5);
        let grads = l.total.backward().unwrap();
        selfsup_ops::testing::assert_every_var_has_grad(
            online.params.vars().iter().map(|(n, v)| (n.as_str(), v)),
            &grads,
        );
        for (name, v) in dcl.teacher.vars.params.vars() {
            assert!(grads.get(v.as_tensor()).is_none(), "target {name} got a gradient");
        }
        dcl.after_step(0.0).unwrap();
        assert_eq!((dcl.queue.ptr, dcl.queue2.ptr), (4, 4));
        let state: HashMap<_, _> = dcl.state().into_iter().collect();
        assert!(state.contains_key("queue2") && state.contains_key("queue2_ptr"));
        let online2 = Vars::new(9);
        let mut other = DenseCl::new(&cfg, &model, &online2, &Device::Cpu, 9).unwrap();
        other.load_state(&state).unwrap();
        assert_eq!(other.queue2.keys.to_vec2::<f32>().unwrap(), dcl.queue2.keys.to_vec2::<f32>().unwrap());
    }
}
