//! Test helpers shared by the unit tests of this crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use selfsup_objectives::{Losses, Objective};

use crate::RunConfig;

/// Writes a small synthetic MNIST-family dataset (16x16, `classes` stripe patterns) into `dir`.
pub fn synthetic_idx(dir: &Path, n_train: usize, n_test: usize, classes: usize) -> PathBuf {
    use selfsup_data::{dataset, Split};
    dataset::write_mnist_family(dir, Split::Train, &dataset::synthetic_stripes(n_train, 16, classes, 1)).unwrap();
    dataset::write_mnist_family(dir, Split::Test, &dataset::synthetic_stripes(n_test, 16, classes, 2)).unwrap();
    dir.to_path_buf()
}

/// A tiny BYOL run: 64 images, batch 8, `steps` steps, checkpoint every `every`.
pub fn tiny_config(data: &Path, out: &Path, steps: usize, every: usize) -> RunConfig {
    tiny_config_with(data, out, steps, every, BYOL)
}

/// The tiny BYOL objective table of [`tiny_config`].
pub const BYOL: &str = "[objective.byol]\nproj_hidden = 16\nproj_dim = 8\nbase_momentum = 0.9";

/// [`tiny_config`] with another two-view objective table.
pub fn tiny_config_with(data: &Path, out: &Path, steps: usize, every: usize, objective: &str) -> RunConfig {
    let text = format!(
        r#"
seed = 7
epochs = 1
max_steps = {steps}
batch_size = 8
output_dir = "{out}"
log_every = 1
[data]
format = "idx"
path = "{data}"
limit = 64
[model]
arch = "resnet18"
in_chans = 1
widths = [4, 8, 8, 8]
{objective}
[[views]]
size = 16
crop_scale = [0.3, 1.0]
hflip = 0.5
mean = [0.286]
std = [0.353]
[[views]]
size = 16
crop_scale = [0.3, 1.0]
hflip = 0.5
jitter = {{ brightness = 0.4, contrast = 0.4, p = 0.8 }}
mean = [0.286]
std = [0.353]
[optimizer.sgd]
lr = 0.05
momentum = 0.9
weight_decay = 1e-4
[schedule]
warmup_epochs = 0.25
[checkpoint]
every = {every}
keep = 2
"#,
        out = out.display(),
        data = data.display()
    );
    RunConfig::from_toml(&text).expect("valid test config")
}

/// A placeholder objective for swapping in tests; never called.
pub struct Never;

impl Objective for Never {
    fn num_views(&self) -> usize {
        unreachable!()
    }
    fn loss(&self, _: &[Tensor], _: selfsup_objectives::Step) -> candle_core::Result<Losses> {
        unreachable!()
    }
    fn after_step(&mut self, _: f64) -> candle_core::Result<()> {
        unreachable!()
    }
    fn backbone(&self) -> &dyn selfsup_models::Backbone {
        unreachable!()
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        unreachable!()
    }
    fn load_state(&mut self, _: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        unreachable!()
    }
    fn stats(&self, _: f64) -> Vec<(&'static str, f64)> {
        unreachable!()
    }
}
