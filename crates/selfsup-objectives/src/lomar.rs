//! LoMaR: local masked reconstruction in small windows (Chen et al., arXiv 2206.00790).
//!
//! Reference: `junchen14/LoMaR@d9ca9c8` `models_lomar.py` (METHODS.md 1.6).
//! - The backbone is a ViT with iRPE (`model.irpe = true`): no absolute position embedding,
//!   position from the contextual key bias on each window's 7x7 grid.
//! - Per image, `num_window` windows of `window_size x window_size` patches; in each window
//!   `int(ws^2 * mask_ratio)` patch embeddings (39 of 49) are replaced by `mask_token`, and the
//!   whole window (class token + 49 tokens, raster order inside the window) goes through the
//!   encoder as one sequence: the batch becomes `b * num_window` sequences.
//! - `encoder_pred = Linear(d, p * p * c)` after the final norm (the reference's "MLP head" is one
//!   Linear; no decoder).
//! - Loss: per-patch normalised pixels (unbiased variance, as `torch.var`), MSE per patch, mean
//!   over the masked patches of all windows.
//!
//! Project decision 3: windows are sampled *per image*. For each image the window tops are the
//! first `num_window` entries of a random permutation of the valid rows and the lefts likewise
//! (the reference's `randperm(H - ws + 1)[:num_window]`, drawn once for the whole batch and, by a
//! reshape mismatch, pairing each image with a single window location). Draws are keyed by the
//! step key and the image index.
//!
//! Choices: Linear layers keep timm's init (trunc-normal 0.02) where the reference uses
//! Xavier-uniform; `mask_token` is N(0, 0.02) as the reference's.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Init;
use selfsup_models::layers::linear_trunc_normal;
use selfsup_models::vit::Vit;
use selfsup_models::{Backbone, Family, Mode, ModelConfig, Vars};
use selfsup_ops::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::fcmae::{normalize_patches, patchify};
use crate::{Losses, Objective, Step};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_window")]
    pub window_size: usize,
    #[serde(default = "default_num_window")]
    pub num_window: usize,
    #[serde(default = "default_ratio")]
    pub mask_ratio: f64,
    #[serde(default = "default_true")]
    pub norm_pix_loss: bool,
}

fn default_window() -> usize {
    7
}
fn default_num_window() -> usize {
    4
}
fn default_ratio() -> f64 {
    0.8
}
fn default_true() -> bool {
    true
}

impl Default for Config {
    /// The paper's: 4 windows of 7x7 patches, 80 % masked, normalised-pixel loss.
    fn default() -> Self {
        Self { window_size: 7, num_window: 4, mask_ratio: 0.8, norm_pix_loss: true }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.window_size == 0 || self.num_window == 0 {
            candle_core::bail!("objective.lomar: window_size and num_window must be positive")
        }
        let masked = (self.window_size.pow(2) as f64 * self.mask_ratio) as usize;
        if masked == 0 || masked >= self.window_size.pow(2) {
            candle_core::bail!(
                "objective.lomar.mask_ratio: {} masks {masked} of a window's {} patches; at least one must be \
                 masked and one visible",
                self.mask_ratio,
                self.window_size.pow(2)
            )
        }
        Ok(())
    }

    /// Patches masked per window: `int(ws^2 * mask_ratio)`.
    pub fn masked_per_window(&self) -> usize {
        (self.window_size.pow(2) as f64 * self.mask_ratio) as usize
    }
}

/// One step's windows: for every (image, window) the patch indices of the window in raster
/// order and which of them are masked.
pub struct Windows {
    /// (b * num_window * ws^2) patch indices into the image's (gh * gw) grid, image-major.
    pub patches: Vec<u32>,
    /// Same layout: 1.0 where the patch is masked.
    pub masked: Vec<f32>,
}

/// Samples the windows of a batch of `b` images on a `gh x gw` patch grid.
pub fn sample_windows(cfg: &Config, b: usize, gh: usize, gw: usize, key: u64) -> Result<Windows> {
    let ws = cfg.window_size;
    if ws > gh || ws > gw {
        candle_core::bail!("lomar: a {ws}x{ws} window does not fit a {gh}x{gw} patch grid")
    }
    let (rows, cols) = (gh - ws + 1, gw - ws + 1);
    if cfg.num_window > rows.min(cols) {
        candle_core::bail!(
            "lomar: num_window = {} needs as many distinct window rows and columns, a {gh}x{gw} grid with \
             {ws}x{ws} windows has {rows} x {cols}",
            cfg.num_window
        )
    }
    let n = ws * ws;
    let masked_count = cfg.masked_per_window();
    let mut patches = Vec::with_capacity(b * cfg.num_window * n);
    let mut masked = Vec::with_capacity(b * cfg.num_window * n);
    for i in 0..b {
        let mut rng = Rng::from_keys(&[key, 0x10a4, i as u64]);
        let mut tops: Vec<usize> = (0..rows).collect();
        let mut lefts: Vec<usize> = (0..cols).collect();
        rng.shuffle(&mut tops);
        rng.shuffle(&mut lefts);
        for w in 0..cfg.num_window {
            let (top, left) = (tops[w], lefts[w]);
            for y in 0..ws {
                for x in 0..ws {
                    patches.push(((top + y) * gw + left + x) as u32);
                }
            }
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            let mut m = vec![0f32; n];
            for &j in &order[..masked_count] {
                m[j] = 1.0;
            }
            masked.extend(m);
        }
    }
    Ok(Windows { patches, masked })
}

pub struct Lomar {
    cfg: Config,
    encoder: Vit,
    mask_token: Tensor,
    pred: selfsup_ops::linear::Linear,
    patch: usize,
    in_chans: usize,
}

impl Lomar {
    pub fn new(cfg: &Config, model: &ModelConfig, online: &Vars, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let Family::Vit(vcfg) = model.family()? else {
            candle_core::bail!("objective lomar needs a vit_* backbone, got {:?}", model.arch)
        };
        if !vcfg.irpe {
            candle_core::bail!(
                "objective lomar needs `model.irpe = true` (LoMaR's ViT has iRPE and no absolute position embedding)"
            )
        }
        let vb = online.vb(DType::F32, device);
        let encoder = Vit::new(&vcfg, vb.pp("backbone"))?;
        let d = vcfg.embed_dim;
        let mask_token = vb.params.get_with_hints((1, 1, d), "mask_token", Init::Randn { mean: 0.0, stdev: 0.02 })?;
        let out = vcfg.patch_size * vcfg.patch_size * vcfg.in_chans;
        let pred = linear_trunc_normal(d, out, vb.pp("encoder_pred"))?;
        Ok(Self { cfg: cfg.clone(), encoder, mask_token, pred, patch: vcfg.patch_size, in_chans: vcfg.in_chans })
    }

    /// (prediction, target, masked), each over (b * num_window, ws^2, ...) windows.
    pub fn reconstruct(&self, imgs: &Tensor, key: u64, mode: Mode) -> Result<(Tensor, Tensor, Tensor, Windows)> {
        let (b, _, h, w) = imgs.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let win = sample_windows(&self.cfg, b, gh, gw, key)?;
        let (ws, nw) = (self.cfg.window_size, self.cfg.num_window);
        let n = ws * ws;
        let seqs = b * nw;
        let dev = imgs.device();
        // Row of (image, patch) in the flattened (b * gh * gw) patch matrix.
        let rows: Vec<u32> =
            win.patches.iter().enumerate().map(|(k, &pi)| (k / (nw * n) * gh * gw) as u32 + pi).collect();
        let rows = Tensor::from_vec(rows, seqs * n, dev)?;
        let embed = self.encoder.patch_embed(imgs)?;
        let d = embed.dim(2)?;
        let tokens = embed.reshape((b * gh * gw, d))?.index_select(&rows, 0)?.reshape((seqs, n, d))?;
        let m = Tensor::from_vec(win.masked.clone(), (seqs, n, 1), dev)?;
        let tokens = (tokens.broadcast_mul(&(1.0 - &m)?)? + m.broadcast_mul(&self.mask_token)?)?;
        let seq = Tensor::cat(&[&self.encoder.cls_with_pos(seqs)?, &tokens], 1)?;
        let out = self.encoder.encode(&seq, (ws, ws), mode)?.narrow(1, 1, n)?;
        let pred = self.pred.forward(&out.reshape((seqs * n, d))?)?.reshape((seqs, n, ()))?;
        let target = patchify(imgs, p)?;
        let dim = target.dim(2)?;
        let target = target.reshape((b * gh * gw, dim))?.index_select(&rows, 0)?.reshape((seqs, n, dim))?;
        let target = if self.cfg.norm_pix_loss { normalize_patches(&target)?.0 } else { target };
        Ok((pred, target, m.squeeze(2)?, win))
    }
}

impl Objective for Lomar {
    fn num_views(&self) -> usize {
        1
    }

    fn loss(&self, views: &[Tensor], step: Step) -> Result<Losses> {
        let [imgs] = views else { candle_core::bail!("lomar needs 1 view, got {}", views.len()) };
        if imgs.dim(1)? != self.in_chans {
            candle_core::bail!("lomar: views have {} channels, the model {}", imgs.dim(1)?, self.in_chans)
        }
        let (pred, target, masked, _) = self.reconstruct(imgs, step.key, step.mode(0))?;
        let total = crate::masked_patch_mse(&pred, &target, &masked)?;
        Ok(Losses { total, parts: vec![] })
    }

    fn backbone(&self) -> &dyn Backbone {
        &self.encoder
    }

    /// Each image's first window: its masked patches greyed, their reconstruction pasted in.
    fn panel(&self, views: &[Tensor], key: u64) -> Result<Vec<crate::Column>> {
        let imgs = &views[0];
        let (b, _, h, w) = imgs.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let (pred, _, _, win) = self.reconstruct(imgs, key, Mode::Eval)?;
        let (nw, n) = (self.cfg.num_window, self.cfg.window_size.pow(2));
        let dim = pred.dim(2)?;
        let pred = pred.to_vec3::<f32>()?;
        let mut full = vec![0f32; b * gh * gw * dim];
        let mut removed = vec![0f32; b * gh * gw];
        for i in 0..b {
            let seq = i * nw;
            for k in 0..n {
                let at = seq * n + k;
                if win.masked[at] == 1.0 {
                    let l = i * gh * gw + win.patches[at] as usize;
                    removed[l] = 1.0;
                    full[l * dim..(l + 1) * dim].copy_from_slice(&pred[seq][k]);
                }
            }
        }
        let dev = imgs.device();
        let full = Tensor::from_vec(full, (b, gh * gw, dim), dev)?;
        let removed = Tensor::from_vec(removed, (b, gh * gw), dev)?;
        crate::reconstruction_panel(imgs, &full, &removed, (gh, gw), p, self.cfg.norm_pix_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// METHODS.md 3 at 224/16: 14x14 grid, 39 masked + 10 visible per window, 4 windows per
    /// image; every image draws its own window positions (Project decision 3).
    #[test]
    fn windows_follow_the_paper_and_are_per_image() {
        let cfg = Config::default();
        let w = sample_windows(&cfg, 3, 14, 14, 5).unwrap();
        assert_eq!(w.patches.len(), 3 * 4 * 49);
        for win in w.masked.chunks(49) {
            assert_eq!(win.iter().filter(|&&m| m == 1.0).count(), 39);
        }
        for win in w.patches.chunks(49) {
            // Raster order inside a 7x7 window.
            let (top, left) = (win[0] as usize / 14, win[0] as usize % 14);
            assert!(top <= 7 && left <= 7);
            for (k, &pi) in win.iter().enumerate() {
                assert_eq!(pi as usize, (top + k / 7) * 14 + left + k % 7);
            }
        }
        let firsts: Vec<Vec<u32>> =
            w.patches.chunks(4 * 49).map(|img| img.iter().step_by(49).copied().collect()).collect();
        assert!(firsts[0] != firsts[1] || firsts[1] != firsts[2], "images share window positions: {firsts:?}");
        let e = sample_windows(&Config { num_window: 9, ..cfg.clone() }, 1, 14, 14, 0).err().unwrap().to_string();
        assert!(e.contains("num_window = 9"), "{e}");
        assert!(Config { mask_ratio: 0.01, ..cfg }.validate().is_err());
    }

    #[test]
    fn loss_counts_masked_patches_and_every_parameter_learns() {
        let model = crate::tests::tiny_vit(true);
        let cfg = Config { window_size: 3, num_window: 2, mask_ratio: 0.6, norm_pix_loss: true };
        let online = Vars::new(2);
        let lomar = Lomar::new(&cfg, &model, &online, &Device::Cpu).unwrap();
        let imgs = Tensor::randn(0f32, 1., (2, 1, 32, 32), &Device::Cpu).unwrap();
        let (pred, target, masked, _) = lomar.reconstruct(&imgs, 3, Mode::Eval).unwrap();
        assert_eq!(pred.dims(), [4, 9, 64]);
        assert_eq!(target.dims(), [4, 9, 64]);
        assert_eq!(masked.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4.0 * 5.0);
        let total = lomar.loss(&[imgs], Step { progress: 0.0, key: 3 }).unwrap().total;
        let grads = total.backward().unwrap();
        let params = online.params.vars();
        selfsup_ops::testing::assert_every_var_has_grad(params.iter().map(|(n, v)| (n.as_str(), v)), &grads);
        let no_irpe = ModelConfig { irpe: false, ..model };
        let e = Lomar::new(&cfg, &no_irpe, &Vars::new(0), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("model.irpe = true"), "{e}");
    }
}
