//! ConvNeXt V2 against timm: a state_dict exported by timm loads by name (through `remap_key`
//! / `remap_tensor`) and reproduces timm's features (fixture and script in this crate).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device};
use selfsup_models::convnextv2::{remap_key, remap_tensor, Config, ConvNextV2};
use selfsup_models::{Backbone, Mode, Vars};

#[test]
fn timm_state_dicts_load_by_name_and_reproduce_timm() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/convnextv2.safetensors");
    let all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let input = &all["input"];
    for prefix in ["linear", "conv"] {
        let mut weights = HashMap::new();
        for (k, v) in &all {
            let Some(key) = k.strip_prefix(&format!("{prefix}.")) else { continue };
            if key.starts_with("__") {
                continue;
            }
            if let Some(name) = remap_key(key) {
                weights.insert(name.clone(), remap_tensor(&name, v.clone()).unwrap());
            }
        }
        let cfg = Config::atto(3).with_widths(&[8, 16, 24, 32]).unwrap();
        let cfg = Config { depths: vec![1, 1, 2, 1], ..cfg };
        let vars = Vars::new(0);
        let model = ConvNextV2::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.len(), weights.len(), "{prefix}: every timm tensor has a place");
        vars.params.load(&weights).unwrap();
        let feats = model.forward_features(input, Mode::Eval).unwrap();
        let pooled = model.forward_pooled(input, Mode::Eval).unwrap();
        let (df, dp) = (
            common::max_rel(&feats, &all[&format!("{prefix}.__features")]),
            common::max_rel(&pooled, &all[&format!("{prefix}.__pooled")]),
        );
        assert!(df < 1e-4 && dp < 1e-4, "{prefix}: features {df}, pooled {dp}");
    }
}
