//! ViT against timm: a timm state_dict loads by name (through `remap_key`) and reproduces
//! timm's tokens and pooled features (fixture and script in this crate).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use selfsup_models::vit::{remap_key, Config, Vit};
use selfsup_models::{Backbone, Mode, Vars};

#[test]
fn timm_state_dict_loads_by_name_and_reproduces_timm() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vit.safetensors");
    let all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let weights: HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("__"))
        .filter_map(|(k, v)| remap_key(k).map(|n| (n, v.clone())))
        .collect();
    let cfg = Config { embed_dim: 24, depth: 2, num_heads: 3, ..Config::tiny(8, 32, 3) };
    let vars = Vars::new(0);
    let model = Vit::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
    assert_eq!(vars.params.len(), weights.len(), "every timm tensor has a place");
    vars.params.load(&weights).unwrap();
    let input = &all["__input"];
    let tokens = model.forward_tokens(input, Mode::Eval).unwrap();
    let pooled = model.forward_pooled(input, Mode::Eval).unwrap();
    let (dt, dp) = (common::max_rel(&tokens, &all["__tokens"]), common::max_rel(&pooled, &all["__pooled"]));
    assert!(dt < 1e-4 && dp < 1e-4, "tokens {dt}, pooled {dp}");
}
