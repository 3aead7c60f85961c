//! Named variable stores with deterministic initialisation, and the builder models take.
//!
//! [`VarStore`] is candle's `VarMap` with two changes selfsup needs: a variable's initial value
//! is a pure function of `(seed, full name)` (candle's CPU RNG cannot be seeded, and a pure
//! function also makes init independent of construction order), and iteration is sorted by
//! name so checkpoints and optimizer state line up run after run.
//!
//! A model gets a [`Vb`]: one `VarBuilder` for trainable parameters and one for buffers
//! (BatchNorm running statistics). The two live in different stores, so the trainer hands the
//! optimizer exactly the parameter store: nothing decides what is trained by matching names.
//! For inference both builders may read the same checkpoint (`Vb::shared`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{init::NormalOrUniform, Init, VarBuilder};
use selfsup_ops::rng::Rng;

/// Named variables, created on first request with a deterministic initial value.
#[derive(Clone)]
pub struct VarStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
}

impl VarStore {
    pub fn new(seed: u64) -> Self {
        Self { vars: Arc::new(Mutex::new(BTreeMap::new())), seed }
    }

    /// A `VarBuilder` that creates (or returns) variables in this store.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// All variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let vars = self.vars.lock().expect("var store lock poisoned");
        vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.vars.lock().expect("var store lock poisoned").get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.vars.lock().expect("var store lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of scalars.
    pub fn num_elements(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Overwrites every variable from `tensors`. The error lists up to five missing or
    /// mis-shaped names; extra entries in `tensors` are ignored (callers check them if they care).
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let vars = self.vars();
        let mut problems = Vec::new();
        for (name, var) in &vars {
            match tensors.get(name) {
                None => problems.push(format!("missing `{name}`")),
                Some(t) if t.dims() != var.dims() => {
                    problems.push(format!("`{name}` has shape {:?}, the model expects {:?}", t.dims(), var.dims()))
                }
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(5);
            candle_core::bail!("{n} tensor(s) do not match: {}", problems.join("; "))
        }
        for (name, var) in vars {
            let t = &tensors[&name];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Copies every variable of `other` (same names and shapes) into this store.
    pub fn copy_from(&self, other: &VarStore) -> Result<()> {
        let tensors = other.vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        self.load(&tensors)
    }

    fn init(&self, shape: &Shape, name: &str, init: Init) -> Result<Vec<f32>> {
        let n = shape.elem_count();
        let mut rng = Rng::from_name(self.seed, name);
        let (normal, lo, hi, mean, std) = match init {
            Init::Const(c) => return Ok(vec![c as f32; n]),
            Init::Uniform { lo, up } => (false, lo, up, 0.0, 0.0),
            Init::Randn { mean, stdev } => (true, 0.0, 0.0, mean, stdev),
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (true, 0.0, 0.0, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (false, -bound, bound, 0.0, 0.0)
                    }
                }
            }
        };
        Ok((0..n).map(|_| if normal { (mean + std * rng.normal()) as f32 } else { rng.range(lo, hi) as f32 }).collect())
    }
}

impl candle_nn::var_builder::SimpleBackend for VarStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.vars.lock().expect("var store lock poisoned");
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: asked {s:?}, stored {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = self.init(&s, name, h)?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable `{name}` in the store"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.lock().expect("var store lock poisoned").contains_key(name)
    }
}

/// A model's parameters and buffers: two stores, one name space.
#[derive(Clone)]
pub struct Vars {
    pub params: VarStore,
    pub buffers: VarStore,
}

impl Vars {
    pub fn new(seed: u64) -> Self {
        // Buffers are constants at init; the seed only matters for parameters.
        Self { params: VarStore::new(seed), buffers: VarStore::new(seed) }
    }

    pub fn vb(&self, dtype: DType, device: &Device) -> Vb<'static> {
        Vb { params: self.params.var_builder(dtype, device), buffers: self.buffers.var_builder(dtype, device) }
    }

    /// Every tensor, parameters then buffers, by name (the checkpoint layout).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let all = self.params.vars().into_iter().chain(self.buffers.vars());
        all.map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    /// Loads parameters and buffers from one name -> tensor map.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.params.load(tensors)?;
        self.buffers.load(tensors)
    }

    /// [`Self::load`], and entries of `tensors` that match no variable are an error too. The
    /// error counts missing, mis-shaped and extra tensors and names up to five of each.
    pub fn load_exact(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let vars: HashMap<String, Var> = self.params.vars().into_iter().chain(self.buffers.vars()).collect();
        let mut missing: Vec<&String> = vars.keys().filter(|k| !tensors.contains_key(*k)).collect();
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
        let mut shaped: Vec<String> = vars
            .iter()
            .filter_map(|(k, v)| tensors.get(k).filter(|t| t.dims() != v.dims()).map(|t| (k, t, v)))
            .map(|(k, t, v)| format!("`{k}` {:?} (model {:?})", t.dims(), v.dims()))
            .collect();
        if missing.is_empty() && extra.is_empty() && shaped.is_empty() {
            return self.load(tensors);
        }
        missing.sort();
        extra.sort();
        shaped.sort();
        let list = |v: Vec<String>| {
            let n = v.len();
            let mut v = v;
            v.truncate(5);
            format!("{n}{}{}", if n > 0 { ": " } else { "" }, v.join(", ")) + if n > 5 { ", ..." } else { "" }
        };
        candle_core::bail!(
            "weights do not fit the model: missing {}; extra {}; mis-shaped {}",
            list(missing.into_iter().map(|k| format!("`{k}`")).collect()),
            list(extra.into_iter().map(|k| format!("`{k}`")).collect()),
            list(shaped)
        )
    }

    pub fn copy_from(&self, other: &Vars) -> Result<()> {
        self.params.copy_from(&other.params)?;
        self.buffers.copy_from(&other.buffers)
    }
}

/// The builder every model constructor takes: parameters and buffers, under one prefix.
#[derive(Clone)]
pub struct Vb<'a> {
    pub params: VarBuilder<'a>,
    pub buffers: VarBuilder<'a>,
}

impl<'a> Vb<'a> {
    /// Both parameters and buffers read from one builder (e.g. a safetensors checkpoint).
    pub fn shared(vb: VarBuilder<'a>) -> Self {
        Self { params: vb.clone(), buffers: vb }
    }

    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let s = s.to_string();
        Self { params: self.params.pp(&s), buffers: self.buffers.pp(s) }
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint that does not fit the model is an error that counts the mismatches and
    /// names the first of them; nothing is loaded.
    #[test]
    fn mismatched_tensors_are_listed_and_nothing_loads() {
        let dev = Device::Cpu;
        let store = VarStore::new(1);
        let vb = store.var_builder(DType::F32, &dev);
        let init = Init::Const(0.0);
        let a = vb.get_with_hints(4, "a.weight", init).unwrap();
        vb.get_with_hints((2, 3), "b.weight", init).unwrap();
        vb.get_with_hints(5, "c.bias", init).unwrap();
        let mut tensors = HashMap::new();
        tensors.insert("a.weight".to_string(), Tensor::ones(4, DType::F32, &dev).unwrap());
        tensors.insert("b.weight".to_string(), Tensor::ones((3, 2), DType::F32, &dev).unwrap());
        let e = store.load(&tensors).unwrap_err().to_string();
        assert!(e.contains("2 tensor(s) do not match"), "{e}");
        assert!(
            e.contains("`b.weight` has shape [3, 2], the model expects [2, 3]") && e.contains("missing `c.bias`"),
            "{e}"
        );
        assert_eq!(a.to_vec1::<f32>().unwrap(), vec![0.0; 4], "a partial load must not happen");
    }

    #[test]
    fn load_exact_lists_missing_extra_and_misshaped() {
        let dev = Device::Cpu;
        let vars = Vars::new(0);
        let vb = vars.vb(DType::F32, &dev);
        vb.params.get_with_hints(4, "a.weight", Init::Const(0.0)).unwrap();
        vb.params.get_with_hints((2, 3), "b.weight", Init::Const(0.0)).unwrap();
        vb.buffers.get_with_hints(2, "bn.running_mean", Init::Const(0.0)).unwrap();
        let t = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev).unwrap();
        let mut tensors = HashMap::from([
            ("a.weight".to_string(), t(&[4])),
            ("b.weight".to_string(), t(&[2, 3])),
            ("bn.running_mean".to_string(), t(&[2])),
        ]);
        vars.load_exact(&tensors).unwrap();
        tensors.insert("head.weight".to_string(), t(&[1]));
        tensors.insert("b.weight".to_string(), t(&[3, 2]));
        tensors.remove("bn.running_mean");
        let e = vars.load_exact(&tensors).unwrap_err().to_string();
        assert!(e.contains("missing 1: `bn.running_mean`"), "{e}");
        assert!(e.contains("extra 1: `head.weight`"), "{e}");
        assert!(e.contains("mis-shaped 1: `b.weight` [3, 2] (model [2, 3])"), "{e}");
    }

    #[test]
    fn init_is_a_function_of_seed_and_name() {
        let dev = Device::Cpu;
        let a = VarStore::new(1);
        let b = VarStore::new(1);
        let c = VarStore::new(2);
        let init = Init::Randn { mean: 0.0, stdev: 1.0 };
        // Different creation order, same values.
        let a1 = a.var_builder(DType::F32, &dev).get_with_hints(4, "x.weight", init).unwrap();
        let _ = b.var_builder(DType::F32, &dev).get_with_hints(3, "other", init).unwrap();
        let b1 = b.var_builder(DType::F32, &dev).get_with_hints(4, "x.weight", init).unwrap();
        let c1 = c.var_builder(DType::F32, &dev).get_with_hints(4, "x.weight", init).unwrap();
        assert_eq!(a1.to_vec1::<f32>().unwrap(), b1.to_vec1::<f32>().unwrap());
        assert_ne!(a1.to_vec1::<f32>().unwrap(), c1.to_vec1::<f32>().unwrap());
        assert_eq!(b.vars().iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["other", "x.weight"]);
    }

    #[test]
    fn load_names_missing_and_misshaped_tensors() {
        let dev = Device::Cpu;
        let s = VarStore::new(0);
        let vb = s.var_builder(DType::F32, &dev);
        vb.get_with_hints(2, "a", Init::Const(0.)).unwrap();
        vb.get_with_hints(3, "b", Init::Const(0.)).unwrap();
        let mut m = HashMap::new();
        m.insert("b".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        let e = s.load(&m).unwrap_err().to_string();
        assert!(e.contains("missing `a`") && e.contains("`b` has shape [4]"), "{e}");
        m.insert("a".to_string(), Tensor::ones(2, DType::F32, &dev).unwrap());
        m.insert("b".to_string(), Tensor::ones(3, DType::F32, &dev).unwrap());
        s.load(&m).unwrap();
        assert_eq!(s.get("a").unwrap().to_vec1::<f32>().unwrap(), [1.0, 1.0]);
    }
}
