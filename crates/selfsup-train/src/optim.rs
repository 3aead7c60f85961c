//! The optimizers candle lacks, over explicit parameter groups.
//!
//! Semantics follow PyTorch (`torch.optim.SGD`, `torch.optim.AdamW`) and the LARS of the
//! BYOL/SimCLR papers as solo-learn implements it. Parameter groups are decided by rank, the
//! rule timm and the references use: 1-D parameters (biases, norm scales) get no weight decay
//! in AdamW, and neither decay nor trust-ratio adaptation in LARS. SGD decays everything, as
//! MoCo and CARE do. Every parameter must receive a gradient: a missing one is an error that
//! names it (candle's fused norms drop gradients silently; CANDLE.md 1.3).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// The `[optimizer]` table: one sub-table naming the method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    Lars(LarsConfig),
    Adamw(AdamWConfig),
}

impl OptimizerConfig {
    /// Every optimizer id, as the config names them (a test holds this to the variants).
    pub const IDS: &'static [&'static str] = &["sgd", "lars", "adamw"];
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LarsConfig {
    pub lr: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Trust coefficient.
    #[serde(default = "default_eta")]
    pub eta: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
}

fn default_momentum() -> f64 {
    0.9
}
fn default_eta() -> f64 {
    0.001
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_wd() -> f64 {
    0.01
}

impl OptimizerConfig {
    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd(c) => c.lr,
            Self::Lars(c) => c.lr,
            Self::Adamw(c) => c.lr,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let (lr, wd) = match self {
            Self::Sgd(c) => (c.lr, c.weight_decay),
            Self::Lars(c) => (c.lr, c.weight_decay),
            Self::Adamw(c) => (c.lr, c.weight_decay),
        };
        if !(lr.is_finite() && lr > 0.0) {
            bail!("optimizer.lr must be a positive number, got {lr}")
        }
        if !(wd.is_finite() && wd >= 0.0) {
            bail!("optimizer.weight_decay must be non-negative, got {wd}")
        }
        match self {
            Self::Sgd(c) if !(0.0..1.0).contains(&c.momentum) => {
                bail!("optimizer.sgd.momentum must be in [0, 1), got {}", c.momentum)
            }
            Self::Sgd(c) if c.nesterov && c.momentum == 0.0 => {
                bail!("optimizer.sgd.nesterov needs a positive momentum")
            }
            Self::Lars(c) if !(0.0..1.0).contains(&c.momentum) => {
                bail!("optimizer.lars.momentum must be in [0, 1), got {}", c.momentum)
            }
            Self::Adamw(c) if c.betas.iter().any(|b| !(0.0..1.0).contains(b)) => {
                bail!("optimizer.adamw.betas must be in [0, 1), got {:?}", c.betas)
            }
            _ => Ok(()),
        }
    }
}

/// A trainable tensor, whether it is a "decayed" (rank >= 2) parameter, and the factor its
/// learning rate is multiplied by (layer-wise lr decay in fine-tuning; 1 otherwise). As in
/// the references' param groups (`lr = base_lr * lr_scale`), the scaled rate also scales the
/// decoupled weight decay of AdamW.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub lr_scale: f64,
}

impl Param {
    pub fn new(name: String, var: Var) -> Self {
        let decay = var.rank() >= 2;
        Self { name, var, decay, lr_scale: 1.0 }
    }

    pub fn with_lr_scale(mut self, lr_scale: f64) -> Self {
        self.lr_scale = lr_scale;
        self
    }
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Param>,
    /// Per parameter: SGD/LARS momentum buffer, or AdamW (m, v).
    slots: Vec<Vec<Tensor>>,
    steps: u64,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig, params: Vec<Param>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, slots: params.iter().map(|_| Vec::new()).collect(), params, steps: 0 })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    fn grad<'a>(&self, grads: &'a GradStore, p: &Param) -> Result<&'a Tensor> {
        grads.get(p.var.as_tensor()).with_context(|| {
            format!("parameter `{}` received no gradient (an op on its path drops gradients, or it is unused)", p.name)
        })
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = Vec::with_capacity(self.params.len());
        for p in &self.params {
            sq.push(self.grad(grads, p)?.sqr()?.sum_all()?);
        }
        Ok(Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first
    /// (gradient clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for i in 0..self.params.len() {
            let p = &self.params[i];
            let lr = lr * p.lr_scale;
            // Detached, both: arithmetic on a Var (or on a gradient that still references the
            // forward) is tracked, so the momentum slots would chain every step's tensors to
            // the previous step's and memory would grow without bound (measured: 17 MB per
            // step of a small MoCo run). A test holds the slots graph-free.
            let mut g = self.grad(grads, p)?.detach();
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            let w = &p.var.as_tensor().detach();
            let slots = &mut self.slots[i];
            let new_w = match &self.cfg {
                OptimizerConfig::Sgd(c) => {
                    if c.weight_decay != 0.0 {
                        g = (g + (w * c.weight_decay)?)?;
                    }
                    if c.momentum != 0.0 {
                        let buf = match slots.pop() {
                            Some(b) => ((b * c.momentum)? + &g)?,
                            None => g.clone(),
                        };
                        g = if c.nesterov { (g + (&buf * c.momentum)?)? } else { buf.clone() };
                        slots.push(buf);
                    }
                    (w - (g * lr)?)?
                }
                OptimizerConfig::Lars(c) => {
                    if p.decay {
                        if c.weight_decay != 0.0 {
                            g = (g + (w * c.weight_decay)?)?;
                        }
                        let wn = w.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
                        let gn = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
                        if wn > 0.0 && gn > 0.0 {
                            g = (g * (c.eta * wn / gn))?;
                        }
                    }
                    let buf = match slots.pop() {
                        Some(b) => ((b * c.momentum)? + &g)?,
                        None => g.clone(),
                    };
                    let upd = (&buf * lr)?;
                    slots.push(buf);
                    (w - upd)?
                }
                OptimizerConfig::Adamw(c) => {
                    let [b1, b2] = c.betas;
                    if slots.is_empty() {
                        slots.push(g.zeros_like()?);
                        slots.push(g.zeros_like()?);
                    }
                    let m = ((&slots[0] * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((&slots[1] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let m_hat = (&m / (1.0 - b1.powi(t)))?;
                    let v_hat = (&v / (1.0 - b2.powi(t)))?;
                    let decayed = if p.decay { (w * (1.0 - lr * c.weight_decay))? } else { w.clone() };
                    let upd = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    slots[0] = m;
                    slots[1] = v;
                    (decayed - (upd * lr)?)?
                }
            };
            p.var.set(&new_w)?;
        }
        Ok(())
    }

    /// Optimizer state for checkpoints: `optim.<param>.<slot>` plus the step count.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (p, slots) in self.params.iter().zip(&self.slots) {
            for (j, s) in slots.iter().enumerate() {
                out.push((format!("optim.{}.{j}", p.name), s.clone()));
            }
        }
        out.push(("optim.steps".into(), Tensor::new(&[self.steps as f64], &candle_core::Device::Cpu)?));
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let steps = tensors.get("optim.steps").context("checkpoint has no `optim.steps`")?;
        self.steps = steps.to_vec1::<f64>()?[0] as u64;
        for (p, slots) in self.params.iter().zip(self.slots.iter_mut()) {
            slots.clear();
            for j in 0.. {
                match tensors.get(&format!("optim.{}.{j}", p.name)) {
                    Some(t) => slots.push(t.to_device(p.var.device())?),
                    None => break,
                }
            }
            if self.steps > 0 && slots.is_empty() && !matches!(&self.cfg, OptimizerConfig::Sgd(c) if c.momentum == 0.0)
            {
                bail!("checkpoint has no optimizer state for `{}`", p.name)
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `IDS` lists exactly the variants serde knows.
    #[test]
    fn ids_are_the_config_variants() {
        assert_eq!(selfsup_objectives::serde_variant_names::<OptimizerConfig>(), OptimizerConfig::IDS);
    }

    /// One scalar-per-element parameter with a fixed gradient, run for `n` steps.
    fn run(cfg: OptimizerConfig, w0: &[f32], grads: &[&[f32]], rank2: bool) -> Vec<f32> {
        let dev = Device::Cpu;
        let shape: Vec<usize> = if rank2 { vec![1, w0.len()] } else { vec![w0.len()] };
        let var = Var::from_tensor(&Tensor::from_slice(w0, shape.as_slice(), &dev).unwrap()).unwrap();
        let mut opt = Optimizer::new(cfg, vec![Param::new("w".into(), var.clone())]).unwrap();
        for g in grads {
            // d/dw sum(w * g) = g
            let gt = Tensor::from_slice(g, shape.as_slice(), &dev).unwrap();
            let store = (var.as_tensor() * gt).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&store, 0.1, 1.0).unwrap();
        }
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    /// After steps whose gradients come through activations, neither the parameter nor any
    /// optimizer slot carries a graph: one that did chained every step to the previous one.
    #[test]
    fn state_holds_no_graph() {
        let dev = Device::Cpu;
        for cfg in [
            OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.5 }),
            OptimizerConfig::Lars(LarsConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.1, eta: 0.001 }),
            OptimizerConfig::Adamw(AdamWConfig { lr: 0.1, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 }),
        ] {
            let var = Var::from_tensor(&Tensor::ones((2, 3), DType::F32, &dev).unwrap()).unwrap();
            let mut opt = Optimizer::new(cfg, vec![Param::new("w".into(), var.clone())]).unwrap();
            for _ in 0..3 {
                let act = (var.as_tensor() * 2.0).unwrap().tanh().unwrap();
                let store = (var.as_tensor() * act).unwrap().sum_all().unwrap().backward().unwrap();
                opt.step(&store, 0.1, 0.5).unwrap();
            }
            for (name, t) in opt.state().unwrap() {
                assert!(!t.track_op(), "{name} holds a graph");
            }
        }
    }

    #[test]
    fn sgd_momentum_and_nesterov_by_hand() {
        let sgd = |nesterov| OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov, weight_decay: 0.5 });
        // w=1, g=1: step 1: g'=1+0.5=1.5, buf=1.5, w=1-0.15=0.85
        // step 2: g'=1+0.425=1.425, buf=0.9*1.5+1.425=2.775, w=0.85-0.2775=0.5725
        close(&run(sgd(false), &[1.0], &[&[1.0], &[1.0]], true), &[0.5725]);
        // Nesterov: step 1 update = 1.5 + 0.9*1.5 = 2.85 -> w = 0.715
        // step 2: g'=1+0.3575=1.3575, buf=1.35+1.3575=2.7075, upd=1.3575+2.43675=3.79425 -> 0.335575
        close(&run(sgd(true), &[1.0], &[&[1.0], &[1.0]], true), &[0.335575]);
    }

    #[test]
    fn lr_scale_scales_the_step_and_the_decoupled_decay() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[[1f32]], &dev).unwrap()).unwrap();
        let cfg = OptimizerConfig::Adamw(AdamWConfig { lr: 0.1, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 });
        let mut opt = Optimizer::new(cfg, vec![Param::new("w".into(), var.clone()).with_lr_scale(0.5)]).unwrap();
        let store = (var.as_tensor() * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&store, 0.1, 1.0).unwrap();
        // lr 0.05: w = 1 * (1 - 0.05 * 0.1) - 0.05 * 1 = 0.945.
        close(&var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), &[0.945]);
    }

    #[test]
    fn adamw_by_hand_and_no_decay_on_1d() {
        let cfg = OptimizerConfig::Adamw(AdamWConfig { lr: 0.1, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 });
        // Step 1 with g=2: m_hat = 2, v_hat = 4, update = 1; w = 1*(1-0.01) - 0.1 = 0.89.
        close(&run(cfg.clone(), &[1.0], &[&[2.0]], true), &[0.89]);
        // 1-D parameter: no decay -> 0.9.
        close(&run(cfg.clone(), &[1.0], &[&[2.0]], false), &[0.9]);
        // Step 2 with g=-2: m = 0.9*0.2 - 0.2 = -0.02, m_hat = -0.02/0.19; v = 0.999*0.004+0.004 = 0.007996,
        // v_hat = 0.007996/0.001999 = 4.0; update = (-0.105263)/2 = -0.0526316
        let w1 = 0.89f64;
        let want = w1 * 0.99 + 0.1 * 0.0526316;
        close(&run(cfg, &[1.0], &[&[2.0], &[-2.0]], true), &[want]);
    }

    #[test]
    fn lars_trust_ratio_by_hand() {
        let cfg = OptimizerConfig::Lars(LarsConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.0, eta: 0.001 });
        // w = (3, 4) (norm 5), g = (0, 2) (norm 2): trust = 0.001*5/2 = 0.0025; update = 0.1*0.0025*g
        close(&run(cfg.clone(), &[3.0, 4.0], &[&[0.0, 2.0]], true), &[3.0, 4.0 - 0.1 * 0.0025 * 2.0]);
        // 1-D: plain momentum SGD.
        close(&run(cfg, &[3.0, 4.0], &[&[0.0, 2.0]], false), &[3.0, 3.8]);
    }

    #[test]
    fn global_grad_norm_and_clipping_scale() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 1.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[1f32]], &dev).unwrap()).unwrap();
        let cfg = OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 });
        let mut opt =
            Optimizer::new(cfg, vec![Param::new("a".into(), a.clone()), Param::new("b".into(), b.clone())]).unwrap();
        // grads: a -> (3, 0) from 3 * a[0]; b -> 4. Global norm 5.
        let loss = ((a.as_tensor().narrow(0, 0, 1).unwrap() * 3.0).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 5.0).abs() < 1e-6);
        // Clipping to norm 1 scales by 1/5: a[0] -= 0.1 * 3/5, b -= 0.1 * 4/5.
        opt.step(&grads, 0.1, 0.2).unwrap();
        close(&a.as_tensor().to_vec1::<f32>().unwrap(), &[0.94, 1.0]);
        close(&b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), &[0.92]);
    }

    #[test]
    fn missing_gradient_and_bad_config_are_named() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let cfg = OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 });
        let mut opt =
            Optimizer::new(cfg, vec![Param::new("a".into(), a.clone()), Param::new("head.b".into(), b)]).unwrap();
        let store = a.as_tensor().sum_all().unwrap().backward().unwrap();
        let e = opt.step(&store, 0.1, 1.0).unwrap_err().to_string();
        assert!(e.contains("`head.b` received no gradient"), "{e}");
        let bad = OptimizerConfig::Sgd(SgdConfig { lr: -1.0, momentum: 0.0, nesterov: false, weight_decay: 0.0 });
        assert!(Optimizer::new(bad, vec![]).err().unwrap().to_string().contains("optimizer.lr"));
    }
}
