//! Shared inputs for the criterion benches (`cargo xtask bench` runs them and prints a table).
//!
//! Each bench group pairs a fast path with its reference (`fast` / `reference`) so the summary
//! can print their ratio from the same run: the machines are noisy, ratios less so.

// The benches allocate like the `selfsup` binary: mimalloc, never purging freed memory (glibc
// hands large tensors back to the OS and page-faults them in again on every iteration, which
// would be timed as part of every memory-bound op).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sets the allocator options the `selfsup` binary uses; call first in every bench.
pub fn init() {
    // mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// A deterministic normal tensor (the one every selfsup test uses).
pub use selfsup_ops::testing::randn;

/// An objective built from its TOML table on `device`, with AdamW (lr 1e-4, betas (0.9, 0.95),
/// wd 0.05) over the parameters its loss trains: the setup of every whole-step benchmark.
pub fn objective_and_optimizer(
    model: &selfsup_models::ModelConfig,
    objective: &str,
    device: &candle_core::Device,
) -> anyhow::Result<(Box<dyn selfsup_objectives::Objective>, selfsup_train::optim::Optimizer)> {
    use selfsup_train::optim::{AdamWConfig, Optimizer, OptimizerConfig, Param};
    let cfg: selfsup_objectives::ObjectiveConfig = toml::from_str(objective)?;
    let online = selfsup_models::Vars::new(0);
    let obj = cfg.build(model, &online, device, 0)?;
    let frozen = obj.untrained_params();
    let params = online
        .params
        .vars()
        .into_iter()
        .filter(|(n, _)| !frozen.iter().any(|f| n.starts_with(f)))
        .map(|(n, v)| Param::new(n, v))
        .collect();
    let adamw = AdamWConfig { lr: 1e-4, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.05 };
    Ok((obj, Optimizer::new(OptimizerConfig::Adamw(adamw), params)?))
}
