//! Every committed run config parses and validates, names an objective whose view count matches
//! its `[[views]]`, and (for the CPU-sized `*_fmnist` and `*_segset` ones) builds its model and objective, so a
//! config cannot rot while the code moves.

use std::path::PathBuf;

use candle_core::Device;
use selfsup_models::Vars;
use selfsup_train::RunConfig;

#[test]
fn every_committed_config_parses_and_the_small_ones_build() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let cfg = RunConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(cfg.objective.num_views(), cfg.views.len(), "{name}: views");
        // A `_demo` suffix marks a shorter variant of a recipe (`cargo xtask demo` runs one).
        let parts: Vec<&str> = name.strip_suffix("_demo").unwrap_or(&name).rsplitn(2, '_').collect();
        assert!(
            ["fmnist", "imagenet", "segset"].contains(&parts[0]),
            "{name}: <objective>_<backbone>_<fmnist|imagenet|segset>[_demo]"
        );
        assert!(name.starts_with(cfg.objective.id()), "{name}: objective `{}`", cfg.objective.id());
        if parts[0] != "imagenet" {
            let online = Vars::new(0);
            cfg.objective.build(&cfg.model, &online, &Device::Cpu, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        names.push(name);
    }
    names.sort();
    // Seven objectives, each with a small recipe and the paper's.
    for objective in ["byol", "moco_v2", "densecl", "care", "fcmae", "mae", "lomar"] {
        for scale in ["fmnist", "imagenet"] {
            assert!(
                names.iter().any(|n| n.starts_with(objective) && n.ends_with(&format!("_{scale}"))),
                "no {objective} config for {scale}: {names:?}"
            );
        }
    }
}
