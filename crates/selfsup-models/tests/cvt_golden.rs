//! CvT against HF transformers: a `CvtForImageClassification` state_dict (parameters and
//! BatchNorm statistics) loads by name through `remap_key` and reproduces HF's eval-mode
//! features (fixture and script in this crate).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use selfsup_models::cvt::{remap_key, Config, Cvt};
use selfsup_models::{Backbone, Mode, Vars};

#[test]
fn hf_state_dict_loads_by_name_and_reproduces_hf() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cvt.safetensors");
    let all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("__"))
        .filter_map(|(k, v)| remap_key(k).map(|n| (n, v.clone())))
        .collect();
    // HF's port uses exact GELU (the official code QuickGELU).
    let cfg = Config {
        embed_dim: vec![8, 12, 16],
        num_heads: vec![1, 2, 2],
        depth: vec![1, 2, 3],
        quick_gelu: false,
        ..Config::cvt13(3)
    };
    let vars = Vars::new(0);
    let model = Cvt::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
    assert_eq!(vars.params.len() + vars.buffers.len(), tensors.len(), "every HF tensor has a place");
    vars.load(&tensors).unwrap();
    let input = &all["__input"];
    let feats = model.forward_features(input, Mode::Eval).unwrap();
    let pooled = model.forward_pooled(input, Mode::Eval).unwrap();
    let (df, dp) = (common::max_rel(&feats, &all["__features"]), common::max_rel(&pooled, &all["__pooled"]));
    assert!(df < 1e-4 && dp < 1e-4, "features {df}, pooled {dp}");
}
