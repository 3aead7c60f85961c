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
