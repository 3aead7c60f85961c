//! ResNet against timm: a timm state_dict (parameters and BatchNorm statistics) loads by name
//! through `remap_key` and reproduces timm's eval-mode features, for both block types.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use selfsup_models::resnet::{remap_key, BlockKind, Config, ResNet, StageConfig};
use selfsup_models::{Backbone, Mode, Vars};

#[test]
fn timm_state_dicts_load_by_name_and_reproduce_timm() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resnet.safetensors");
    let all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let input = &all["input"];
    for (prefix, block, depths) in
        [("basic", BlockKind::Basic, [1, 1, 1, 1]), ("bottleneck", BlockKind::Bottleneck, [1, 2, 1, 1])]
    {
        let tensors: HashMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&format!("{prefix}.")).map(|k| (k, v)))
            .filter(|(k, _)| !k.starts_with("__"))
            .filter_map(|(k, v)| remap_key(k).map(|n| (n, v.clone())))
            .collect();
        let stages = depths
            .iter()
            .zip([8, 16, 16, 16])
            .zip([1, 2, 2, 2])
            .map(|((&depth, width), stride)| StageConfig { depth, width, stride })
            .collect();
        let cfg = Config { block, stages, in_chans: 3, stem_width: 64, imagenet_stem: true, drop_path_rate: 0.0 };
        let vars = Vars::new(0);
        let model = ResNet::new(&cfg, vars.vb(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(vars.params.len() + vars.buffers.len(), tensors.len(), "{prefix}: every timm tensor has a place");
        vars.load(&tensors).unwrap();
        let feats = model.forward_features(input, Mode::Eval).unwrap();
        let pooled = model.forward_pooled(input, Mode::Eval).unwrap();
        let df = common::max_rel(&feats, &all[&format!("{prefix}.__features")]);
        let dp = common::max_rel(&pooled, &all[&format!("{prefix}.__pooled")]);
        assert!(df < 1e-4 && dp < 1e-4, "{prefix}: features {df}, pooled {dp}");
    }
}
