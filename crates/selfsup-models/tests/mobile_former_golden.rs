//! Mobile-Former against the reference (AAboys/MobileFormer): a state_dict exported by the
//! reference loads by name (through `remap_key`) and reproduces its pre-logits features and
//! logits (fixture and script in this crate: 26M's nine blocks with group_num 4, and 294M's
//! first three blocks, both with 32-wide tokens and a 64-wide pre-logits layer).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use selfsup_models::mobile_former::{remap_key, Config, MobileFormer};
use selfsup_models::{Backbone, Mode, Vars};

#[test]
fn reference_state_dicts_load_by_name_and_reproduce_the_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mobile_former.safetensors");
    let all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let input = &all["input"];
    let small = |cfg: Config| Config { token_dim: 32, num_features: 64, ..cfg };
    let mf294m = Config::mf294m(3);
    let cases = [
        ("mf26m", small(Config::mf26m(3))),
        ("mf294m", small(Config { blocks: mf294m.blocks[..3].to_vec(), ..mf294m })),
    ];
    for (prefix, cfg) in cases {
        let mut weights = HashMap::new();
        let mut head = HashMap::new();
        for (k, v) in &all {
            let Some(key) = k.strip_prefix(&format!("{prefix}.")) else { continue };
            let v = v.to_dtype(DType::F32).unwrap();
            match remap_key(key) {
                _ if key.starts_with("__") => {}
                Some(name) => {
                    weights.insert(name, v);
                }
                None => {
                    head.insert(key.to_string(), v);
                }
            }
        }
        let vars = Vars::new(0);
        let model = MobileFormer::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        // Every reference tensor has its place, and every variable is in the state_dict.
        vars.load_exact(&weights).unwrap();
        assert_eq!(cfg.num_params(10), vars.params.num_elements() + 64 * 10 + 10, "{prefix}");
        let pre_logits = model.forward_pooled(input, Mode::Eval).unwrap();
        let classifier = selfsup_ops::linear::Linear::new(
            head["classifier.classifier.1.weight"].clone(),
            Some(head["classifier.classifier.1.bias"].clone()),
        );
        let logits = classifier.forward(&pre_logits).unwrap();
        let (dp, dl) = (
            common::max_rel(&pre_logits, &all[&format!("{prefix}.__pre_logits")]),
            common::max_rel(&logits, &all[&format!("{prefix}.__logits")]),
        );
        eprintln!("{prefix}: pre-logits {dp:e}, logits {dl:e}");
        assert!(dp < 1e-4 && dl < 1e-4, "{prefix}: pre-logits {dp}, logits {dl}");
        let feats: Tensor = model.forward_features(input, Mode::Eval).unwrap();
        assert_eq!(feats.dim(1).unwrap(), cfg.blocks.last().unwrap().c, "{prefix}");
    }
}
