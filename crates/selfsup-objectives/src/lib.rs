//! selfsup-objectives: the self-supervised losses and the state they own.
//!
//! Invariants: objectives do no I/O. The trainer owns the step counter and passes `progress`
//! (0 at the first step, 1 after the last); objectives own what gradients don't train (EMA
//! targets, queues), in their own stores, never handed to the optimizer. `loss` has no side
//! effects beyond BatchNorm statistics; state changes happen in `after_step`.

pub mod byol;
pub mod care;
pub mod densecl;
pub mod fcmae;
pub mod lomar;
pub mod mae;
pub mod moco;

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use selfsup_models::{Backbone, Mode, ModelConfig, Vars};
use serde::{Deserialize, Serialize};

/// A loss and its named parts (for logging).
pub struct Losses {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

/// Where a training step stands: what an objective's loss may depend on besides its views.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// 0 at the first step, 1 after the last.
    pub progress: f64,
    /// The step's random key (a pure function of the run seed and the step number): masks
    /// and drop-path draws derive from it, never from global state.
    pub key: u64,
}

impl Step {
    /// The training mode for forward pass number `salt` of this step (e.g. one per view), so
    /// two forwards of one step draw independent drop-path patterns.
    pub fn mode(&self, salt: u64) -> Mode {
        Mode::Train { key: selfsup_ops::rng::Rng::from_keys(&[self.key, salt]).next_u64() }
    }
}

pub trait Objective {
    /// Views consumed per image.
    fn num_views(&self) -> usize;
    /// views: `num_views` tensors (b, c, h, w) of the same images.
    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses>;
    /// Updates the untrained state (EMA target, queue) after the optimizer step. The defaults of
    /// this and the next three methods are those of a stateless objective (the masked ones).
    fn after_step(&mut self, _progress: f64) -> Result<()> {
        Ok(())
    }
    /// The backbone being pretrained (for evaluation during or after the run).
    fn backbone(&self) -> &dyn Backbone;
    /// Untrained state, by name, for checkpoints.
    fn state(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
    fn load_state(&mut self, _tensors: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// Scalars worth logging at `progress` (e.g. the EMA momentum).
    fn stats(&self, _progress: f64) -> Vec<(&'static str, f64)> {
        vec![]
    }
    /// Pictures of what the objective does to the first images of `views` with the step's
    /// `key`, for people (the trainer writes them as a PNG grid at every checkpoint): columns of
    /// (n, c, h, w) images. Eval mode: drawing changes no state. Default: none.
    fn panel(&self, _views: &[Tensor], _key: u64) -> Result<Vec<Column>> {
        Ok(vec![])
    }
    /// Name prefixes of trainable parameters this objective's loss never reaches (built because
    /// the backbone has them, trained later, e.g. at fine-tuning). The trainer keeps them out
    /// of the optimizer; every other parameter must receive a gradient.
    fn untrained_params(&self) -> Vec<&'static str> {
        vec![]
    }
}

/// The variant names serde accepts for an externally tagged enum `T`, read from the
/// unknown-variant error it gives (serde exposes them nowhere else): lets a test hold a
/// hand-written id list, such as [`ObjectiveConfig::IDS`], to the enum.
pub fn serde_variant_names<T: serde::de::DeserializeOwned>() -> Vec<String> {
    use serde::de::value::{Error, StrDeserializer};
    let err = match T::deserialize(StrDeserializer::<Error>::new("\u{0}")) {
        Ok(_) => return Vec::new(),
        Err(e) => e.to_string(),
    };
    let list = err.split_once("expected ").map_or("", |(_, l)| l.trim_start_matches("one of "));
    list.split(['`', ',', ' ']).filter(|w| !w.is_empty() && *w != "or").map(str::to_string).collect()
}

/// The `[objective]` table of a run config: one sub-table naming the method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ObjectiveConfig {
    Byol(byol::Config),
    Fcmae(fcmae::Config),
    MocoV2(moco::Config),
    Densecl(densecl::Config),
    Lomar(lomar::Config),
    Mae(mae::Config),
    Care(care::Config),
}

impl ObjectiveConfig {
    /// Every objective id, as [`Self::id`] names them (a test holds the two together).
    pub const IDS: &'static [&'static str] = &["byol", "fcmae", "moco_v2", "densecl", "lomar", "mae", "care"];

    /// The objective id (`byol`, ...).
    pub fn id(&self) -> &'static str {
        match self {
            Self::Byol(_) => "byol",
            Self::Fcmae(_) => "fcmae",
            Self::MocoV2(_) => "moco_v2",
            Self::Densecl(_) => "densecl",
            Self::Lomar(_) => "lomar",
            Self::Mae(_) => "mae",
            Self::Care(_) => "care",
        }
    }

    /// Views the objective consumes per image.
    pub fn num_views(&self) -> usize {
        match self {
            Self::Byol(_) => 2,
            Self::Fcmae(_) | Self::Lomar(_) | Self::Mae(_) => 1,
            Self::MocoV2(_) | Self::Densecl(_) | Self::Care(_) => 2,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Byol(c) => c.validate(),
            Self::Fcmae(c) => c.validate(),
            Self::MocoV2(c) => c.validate(),
            Self::Densecl(c) => c.validate(),
            Self::Lomar(c) => c.validate(),
            Self::Mae(c) => c.validate(),
            Self::Care(c) => c.validate(),
        }
    }

    /// Builds the objective; trainable parameters are created in `online`.
    pub fn build(
        &self,
        model: &ModelConfig,
        online: &Vars,
        device: &candle_core::Device,
        seed: u64,
    ) -> Result<Box<dyn Objective>> {
        match self {
            Self::Byol(cfg) => Ok(Box::new(byol::Byol::new(cfg, model, online, device, seed)?)),
            Self::Fcmae(cfg) => Ok(Box::new(fcmae::Fcmae::new(cfg, model, online, device)?)),
            Self::MocoV2(cfg) => Ok(Box::new(moco::MocoV2::new(cfg, model, online, device, seed)?)),
            Self::Densecl(cfg) => Ok(Box::new(densecl::DenseCl::new(cfg, model, online, device, seed)?)),
            Self::Lomar(cfg) => Ok(Box::new(lomar::Lomar::new(cfg, model, online, device)?)),
            Self::Mae(cfg) => Ok(Box::new(mae::Mae::new(cfg, model, online, device)?)),
            Self::Care(cfg) => Ok(Box::new(care::Care::new(cfg, model, online, device, seed)?)),
        }
    }
}

/// The cosine EMA schedule of BYOL (and CARE, MoCo-style teachers):
/// `1 - (1 - base) * (cos(pi * progress) + 1) / 2`, from `base` at 0 to 1 at the end.
pub fn ema_momentum(base: f64, progress: f64) -> f64 {
    let p = progress.clamp(0.0, 1.0);
    1.0 - (1.0 - base) * ((std::f64::consts::PI * p).cos() + 1.0) / 2.0
}

/// A momentum teacher (BYOL's target, MoCo's key encoder, CARE's teacher): its own store, built
/// by the objective, started as a copy of the online store and moved by EMA after each step.
/// Checkpointed under `target.`.
pub struct Teacher {
    pub vars: Vars,
    online: Vars,
}

impl Teacher {
    /// An empty store keyed by `seed`; build the teacher's modules into `vars`, then call
    /// [`Teacher::start`].
    pub fn new(online: &Vars, seed: u64) -> Self {
        Self { vars: Vars::new(seed), online: online.clone() }
    }

    /// Copies the online network into the teacher (every teacher variable must have a namesake).
    pub fn start(&self, what: &str) -> Result<()> {
        copy_into(&self.vars, &self.online, what)
    }

    /// `teacher <- tau teacher + (1 - tau) online` over parameters.
    pub fn update(&self, tau: f64) -> Result<()> {
        ema_update(&self.vars, &self.online, tau)
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.vars.tensors().into_iter().map(|(k, v)| (format!("target.{k}"), v)).collect()
    }

    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.vars.load(&strip_prefix(tensors, "target."))
    }
}

/// Sets every variable of `target` (parameters and buffers) to its namesake in `online`: a
/// momentum encoder starts as a copy. Errors name a target variable without a counterpart.
pub fn copy_into(target: &Vars, online: &Vars, what: &str) -> Result<()> {
    for (name, var) in target.params.vars().into_iter().chain(target.buffers.vars()) {
        match online.params.get(&name).or_else(|| online.buffers.get(&name)) {
            Some(src) => var.set(src.as_tensor())?,
            None => candle_core::bail!("{what}: target variable {name} has no online counterpart"),
        }
    }
    Ok(())
}

/// `target <- tau * target + (1 - tau) * online` over the target's parameters (buffers, i.e.
/// BatchNorm statistics, are the target's own, as in MoCo and BYOL).
pub fn ema_update(target: &Vars, online: &Vars, tau: f64) -> Result<()> {
    for (name, t) in target.params.vars() {
        let o = online.params.get(&name).ok_or_else(|| {
            candle_core::Error::Msg(format!("ema: target parameter {name} has no online counterpart"))
        })?;
        t.set(&((t.as_tensor() * tau)? + (o.as_tensor() * (1.0 - tau))?)?)?;
    }
    Ok(())
}

/// The entries of `tensors` under `prefix`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
}

/// How a panel column's values map to pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Normalised like the views (the trainer undoes the view's mean/std).
    View,
    /// Already in [0, 1] (e.g. an attention map).
    Unit,
}

/// One column of a panel: a title and (n, c, h, w) images.
pub struct Column {
    pub title: &'static str,
    pub images: Tensor,
    pub space: Space,
}

/// The masked-modelling panel: input, masked input, reconstruction, and the reconstruction with
/// the visible patches pasted back (MAE's figure). pred: (b, l, p p c) patches on a `grid`;
/// removed: (b, l), 1 = masked. Under `norm_pix` the prediction is mapped back to pixels with
/// each target patch's own mean and std (as MAE's visualisation does).
pub fn reconstruction_panel(
    imgs: &Tensor,
    pred: &Tensor,
    removed: &Tensor,
    grid: (usize, usize),
    p: usize,
    norm_pix: bool,
) -> Result<Vec<Column>> {
    let (b, c, _, _) = imgs.dims4()?;
    let pred = if norm_pix {
        let (_, mean, std) = fcmae::normalize_patches(&fcmae::patchify(imgs, p)?)?;
        pred.broadcast_mul(&std)?.broadcast_add(&mean)?
    } else {
        pred.clone()
    };
    let (gh, gw) = grid;
    let recon = fcmae::unpatchify(&pred, gh, gw, p, c)?;
    let removed_px =
        fcmae::unpatchify(&removed.unsqueeze(2)?.broadcast_as((b, gh * gw, p * p * c))?.contiguous()?, gh, gw, p, c)?;
    let masked = (imgs * (1.0 - &removed_px)?)?;
    let pasted = (&masked + (&recon * &removed_px)?)?;
    let col = |title, images| Column { title, images, space: Space::View };
    Ok(vec![col("input", imgs.clone()), col("masked", masked), col("reconstruction", recon), col("+ visible", pasted)])
}

/// The masked-modelling loss: per-patch MSE averaged over the masked patches only.
/// pred, target: (b, l, d); removed: (b, l), 1 where the patch was masked.
pub fn masked_patch_mse(pred: &Tensor, target: &Tensor, removed: &Tensor) -> Result<Tensor> {
    let per_patch = (pred - target)?.sqr()?.mean(2)?;
    (per_patch * removed)?.sum_all()? / removed.sum_all()?.to_scalar::<f32>()? as f64
}

/// Rows scaled to unit L2 norm. xs: (b, d).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&(xs.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `IDS` lists exactly the variants serde knows.
    #[test]
    fn ids_are_the_config_variants() {
        assert_eq!(serde_variant_names::<ObjectiveConfig>(), ObjectiveConfig::IDS);
    }

    /// A perfect prediction reconstructs the input exactly; masked patches are zero in the
    /// masked column; pasting the visible patches back gives the input again.
    #[test]
    fn reconstruction_panel_undoes_the_patch_normalisation() {
        let imgs = selfsup_ops::testing::randn(&[2, 3, 8, 12], 3);
        let target = fcmae::normalize_patches(&fcmae::patchify(&imgs, 4).unwrap()).unwrap().0;
        let removed =
            Tensor::new(&[[1f32, 0., 1., 0., 0., 1.], [0., 0., 0., 1., 1., 1.]], &candle_core::Device::Cpu).unwrap();
        let cols = reconstruction_panel(&imgs, &target, &removed, (2, 3), 4, true).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |a: &Tensor, b: &Tensor| v(a).iter().zip(v(b)).all(|(x, y)| (x - y).abs() < 1e-4);
        assert!(close(&cols[2].images, &imgs), "reconstruction");
        assert!(close(&cols[3].images, &imgs), "pasted");
        // Image 0, patch (0, 0) is masked: zero; patch (0, 1) is visible: the input.
        let masked = cols[1].images.get(0).unwrap();
        assert!(v(&masked.narrow(1, 0, 4).unwrap().narrow(2, 0, 4).unwrap()).iter().all(|&x| x == 0.0));
        let vis = |t: &Tensor| t.get(0).unwrap().narrow(1, 0, 4).unwrap().narrow(2, 4, 4).unwrap();
        assert_eq!(v(&vis(&cols[1].images)), v(&vis(&imgs)));
    }

    /// A narrow ResNet-18 on one channel, for objective tests.
    pub(crate) fn tiny_resnet() -> ModelConfig {
        ModelConfig::narrow(selfsup_models::Arch::Resnet18, 1, &[4, 8, 8, 8])
    }

    /// A narrow ViT (16-d, 2 blocks, 2 heads, patch 8) at 32 px on one channel.
    pub(crate) fn tiny_vit(irpe: bool) -> ModelConfig {
        ModelConfig {
            arch: selfsup_models::Arch::VitTinyPatch8,
            widths: Some(vec![16, 2, 2]),
            drop_path_rate: 0.1,
            img_size: Some(32),
            irpe,
            ..tiny_resnet()
        }
    }

    #[test]
    fn momentum_endpoints() {
        assert!((ema_momentum(0.996, 0.0) - 0.996).abs() < 1e-12);
        assert!((ema_momentum(0.996, 1.0) - 1.0).abs() < 1e-12);
        assert!((ema_momentum(0.99, 0.5) - 0.995).abs() < 1e-12);
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let ok: ObjectiveConfig = toml::from_str("[byol]\nproj_dim = 64\n").unwrap();
        assert_eq!(ok.id(), "byol");
        let e = toml::from_str::<ObjectiveConfig>("[byol]\nproj_dimm = 64\n").unwrap_err().to_string();
        assert!(e.contains("proj_dimm"), "{e}");
    }

    /// METHODS.md's shared test: on one fixed batch every objective's loss falls by over 10 % under AdamW (40 steps).
    /// BYOL and FCMAE run their state updates between steps as in training; the queue methods
    /// hold their queue fixed, because on one repeated batch the queue fills with copies of the
    /// positives and the loss must rise (MoCo's negatives are other images by assumption).
    #[test]
    fn every_objective_overfits_one_batch() {
        use candle_core::Device;
        use selfsup_models::{Arch, Vars};
        let resnet = tiny_resnet();
        let atto = ModelConfig { arch: Arch::Convnextv2Atto, widths: Some(vec![8, 8, 16, 16]), ..resnet.clone() };
        let vit = ModelConfig { widths: Some(vec![32, 2, 2]), drop_path_rate: 0.0, ..tiny_vit(true) };
        let cases = [
            ("[byol]\nproj_hidden = 32\nproj_dim = 16\nbase_momentum = 0.9\n", &resnet, 16, true),
            ("[moco_v2]\nproj_dim = 16\nqueue_size = 256\nkey_bn_splits = 2\n", &resnet, 16, false),
            ("[densecl]\nproj_dim = 16\nqueue_size = 256\nkey_bn_splits = 2\n", &resnet, 16, false),
            ("[fcmae]\ndecoder_embed_dim = 64\n", &atto, 64, true),
            (
                "[care]\nproj_hidden = 32\nproj_dim = 16\nbase_momentum = 0.9\ntrans_depth = 2\ntrans_heads = 2\ntrans_dim_head = 4\nfmap_size = 4\n",
                &resnet,
                16,
                true,
            ),
            ("[lomar]\nwindow_size = 3\nnum_window = 2\nmask_ratio = 0.6\n", &vit, 32, true),
            (
                "[mae]\ndecoder_embed_dim = 64\ndecoder_depth = 1\ndecoder_num_heads = 2\n",
                &ModelConfig { irpe: false, ..vit.clone() },
                32,
                true,
            ),
        ];
        for (toml_cfg, model, size, update_state) in cases {
            let cfg: ObjectiveConfig = toml::from_str(toml_cfg).unwrap();
            let online = Vars::new(1);
            let mut obj = cfg.build(model, &online, &Device::Cpu, 1).unwrap();
            let views: Vec<Tensor> =
                (0..obj.num_views()).map(|v| selfsup_ops::testing::randn(&[8, 1, size, size], 10 + v as u64)).collect();
            let frozen = obj.untrained_params();
            let vars: Vec<_> = online
                .params
                .vars()
                .into_iter()
                .filter(|(n, _)| !frozen.iter().any(|f| n.starts_with(f)))
                .map(|(_, v)| v)
                .collect();
            let params = candle_nn::ParamsAdamW { lr: 3e-3, weight_decay: 0.0, ..Default::default() };
            let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(vars, params).unwrap();
            let mut losses = Vec::new();
            for _ in 0..40 {
                let l = obj.loss(&views, Step { progress: 0.0, key: 5 }).unwrap().total;
                losses.push(l.to_scalar::<f32>().unwrap());
                candle_nn::Optimizer::backward_step(&mut opt, &l).unwrap();
                if update_state {
                    obj.after_step(0.0).unwrap();
                }
            }
            // Pictures: the masked objectives show 4 columns, CARE 2, the others none; all at
            // the views' size, one row per image.
            let panel = obj.panel(&views, 5).unwrap();
            let want = match cfg.id() {
                "fcmae" | "mae" | "lomar" => 4,
                "care" => 2,
                _ => 0,
            };
            assert_eq!(panel.len(), want, "{}", cfg.id());
            for col in &panel {
                assert_eq!(col.images.dims()[0], 8, "{} {}", cfg.id(), col.title);
                assert_eq!(&col.images.dims()[2..], &[size, size], "{} {}", cfg.id(), col.title);
            }
            let (first, last) = (losses[0], *losses.last().unwrap());
            assert!(losses.iter().all(|l| l.is_finite()), "{}: {losses:?}", cfg.id());
            assert!(last < 0.9 * first, "{}: {first} -> {last} ({losses:?})", cfg.id());
        }
    }
}
