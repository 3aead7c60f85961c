//! Full-size variants load a timm state_dict by name: every entry of timm's state_dict (names
//! and shapes in `fixtures/timm_names.json`, made by `scripts/make_timm_names.py`) maps through
//! the model's `remap_key` / `remap_tensor` onto a selfsup variable of the same shape, and
//! every selfsup variable is covered. No weights are stored; the models are built at full size.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use selfsup_models::{convnextv2, resnet, vit, Arch, ModelConfig, Vars};

fn full(arch: Arch, imagenet_stem: bool) -> ModelConfig {
    ModelConfig {
        arch,
        in_chans: 3,
        widths: None,
        drop_path_rate: 0.0,
        img_size: Some(224),
        imagenet_stem,
        irpe: false,
    }
}

#[test]
fn full_size_timm_state_dicts_map_onto_selfsup_variables() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/timm_names.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = [
        ("resnet18", full(Arch::Resnet18, true)),
        ("resnet50", full(Arch::Resnet50, true)),
        ("convnextv2_atto", full(Arch::Convnextv2Atto, false)),
        ("convnextv2_nano", full(Arch::Convnextv2Nano, false)),
        ("convnextv2_tiny", full(Arch::Convnextv2Tiny, false)),
        ("vit_tiny_patch16_224", full(Arch::VitTinyPatch16, false)),
        ("vit_small_patch16_224", full(Arch::VitSmallPatch16, false)),
    ];
    for (name, cfg) in cases {
        let vars = Vars::new(0);
        cfg.build(vars.vb(DType::F32, &Device::Cpu)).unwrap();
        let ours: BTreeMap<String, Vec<usize>> =
            vars.params.vars().into_iter().chain(vars.buffers.vars()).map(|(k, v)| (k, v.dims().to_vec())).collect();
        let mut theirs = BTreeMap::new();
        for entry in json["models"][name].as_array().unwrap() {
            let key = entry[0].as_str().unwrap();
            let shape: Vec<usize> = entry[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let mapped = if name.starts_with("resnet") {
                resnet::remap_key(key)
            } else if name.starts_with("convnextv2") {
                convnextv2::remap_key(key)
            } else {
                vit::remap_key(key)
            };
            let Some(mapped) = mapped else { continue };
            let shape = if name.starts_with("convnextv2") {
                let t = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
                convnextv2::remap_tensor(&mapped, t).unwrap().dims().to_vec()
            } else {
                shape
            };
            theirs.insert(mapped, shape);
        }
        let missing: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).take(5).collect();
        let extra: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).take(5).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{name}: not in timm {missing:?}; not in selfsup {extra:?}");
        for (k, s) in &theirs {
            assert_eq!(&ours[k], s, "{name}: {k}");
        }
    }
}
