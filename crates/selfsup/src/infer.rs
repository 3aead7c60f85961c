//! `selfsup infer`: any registered model, weights from a reference state_dict (timm names; HF
//! transformers for CvT), eval-mode forward on a tensor file, outputs to a tensor file. Parity
//! with the reference can be checked without writing Rust.
//!
//! Choices: the architecture's widths come from its id (or `--widths` for narrow variants); the
//! input channels and (ViT) image size from the input; a ResNet's stem from its `conv1.weight`
//! (7x7 = timm's ImageNet stem). Every tensor of the state_dict must find its place: missing,
//! extra and mis-shaped tensors are one error that lists them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use selfsup_models::{Arch, Family, Mode, ModelConfig, Vars};

pub fn infer(model: &str, weights: &Path, input: &Path, output: &Path, widths: Option<Vec<usize>>) -> Result<()> {
    let arch: Arch = serde_json::from_value(serde_json::Value::String(model.to_string())).map_err(|_| {
        let ids: Vec<String> = Arch::ALL
            .iter()
            .map(|a| serde_json::to_string(a).unwrap_or_default().trim_matches('"').to_string())
            .collect();
        anyhow::anyhow!("--model `{model}` is not a registered architecture; one of: {}", ids.join(", "))
    })?;
    let device = Device::Cpu;
    let inputs =
        candle_core::safetensors::load(input, &device).with_context(|| format!("reading {}", input.display()))?;
    let xs = inputs.get("input").with_context(|| format!("{} has no tensor named `input`", input.display()))?;
    let (n, c, h, w) = xs
        .dims4()
        .map_err(|_| anyhow::anyhow!("{}: `input` must be (N, C, H, W), got {:?}", input.display(), xs.shape()))?;
    let xs = xs.to_dtype(DType::F32)?;
    let state =
        candle_core::safetensors::load(weights, &device).with_context(|| format!("reading {}", weights.display()))?;
    let imagenet_stem = state.get("conv1.weight").is_some_and(|t| t.dims().last() == Some(&7));
    let cfg =
        ModelConfig { arch, in_chans: c, widths, drop_path_rate: 0.0, img_size: Some(h), imagenet_stem, irpe: false };
    if let Family::Vit(_) = cfg.family()? {
        if h != w {
            bail!(
                "{}: ViT input must be square (its position embedding is built for one size), got {h}x{w}",
                input.display()
            )
        }
    }
    let multiple = cfg.size_multiple()?;
    if h % multiple != 0 || w % multiple != 0 {
        bail!("{}: input {h}x{w} is not a multiple of {model}'s total stride {multiple}", input.display())
    }
    let mapped = cfg.map_reference_weights(state)?;
    if !mapped.unused.is_empty() {
        bail!(
            "{}: {} tensor(s) have no place in {model}: {}",
            weights.display(),
            mapped.unused.len(),
            mapped.unused.iter().take(8).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        )
    }
    let vars = Vars::new(0);
    let backbone = cfg.build(vars.vb(DType::F32, &device))?;
    vars.load_exact(&mapped.backbone).with_context(|| format!("loading {} into {model}", weights.display()))?;
    let features = backbone.forward_pooled(&xs, Mode::Eval)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    if let Some((weight, bias)) = &mapped.classifier {
        let (classes, d) = weight.dims2().context("classifier weight must be (classes, features)")?;
        if d != backbone.num_features() || bias.dims() != [classes] {
            bail!(
                "{}: classifier weight {:?} / bias {:?} do not fit {} features",
                weights.display(),
                weight.dims(),
                bias.dims(),
                backbone.num_features()
            )
        }
        let logits = features.matmul(&weight.to_dtype(DType::F32)?.t()?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?;
        out.push(("logits".into(), logits));
    }
    out.push(("features".into(), features));
    selfsup_train::checkpoint::save_tensors(output, &out)?;
    let shapes: HashMap<_, _> = out.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    println!("{model}: {n} image(s) -> {} ({shapes:?})", output.display());
    Ok(())
}
