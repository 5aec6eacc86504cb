//! The host allocator's settings for tensor work on CPU.
//!
//! libtorch's CPU tensors come straight from `malloc`. glibc serves a request above its
//! mmap threshold with a fresh `mmap` and unmaps it on `free`, and it hands the top of
//! the heap back to the kernel once more than its trim threshold is free. Both are
//! dynamic and start small (128 KiB), so a training step, which allocates and frees the
//! same activations and gradients every time, pays page faults on every buffer it
//! touches: the GRPO step of `scripts/bench/grpo_vs_trl.sh` took ~330k page faults per
//! 30 steps. With the settings below the freed memory stays in the heap and is reused:
//! ~88k page faults and ~10% less step time in the same run (docs/benchmarks.md).
//!
//! Applied once at start-up by the `trainer` and `rollout-worker` binaries. glibc's own
//! environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
//! `MALLOC_TOP_PAD_`, `GLIBC_TUNABLES`) win: when any is set, nothing is changed.

/// Requests up to this size are served from the heap, not a fresh mapping.
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Free memory kept at the top of the heap before it is returned to the kernel.
pub const TRIM_THRESHOLD: usize = 256 << 20;
/// Extra memory asked of the kernel whenever the heap grows.
pub const TOP_PAD: usize = 64 << 20;

/// glibc environment variables that mean the user chose the allocator's settings.
const USER_SETTINGS: [&str; 4] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
];

/// What [`tune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuning {
    /// The settings above are in force.
    Applied,
    /// The environment sets glibc's allocator (the named variable); left as it is.
    UserSettings(&'static str),
    /// Not glibc, or glibc refused a setting (the one named).
    Unsupported(&'static str),
}

/// Applies [`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`] and [`TOP_PAD`] unless the
/// environment sets glibc's allocator. Call before the first tensor; later calls return
/// the first one's result and change nothing.
pub fn tune() -> Tuning {
    static DONE: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    DONE.get_or_init(tune_once).clone()
}

fn tune_once() -> Tuning {
    if let Some(var) = USER_SETTINGS.iter().find(|v| std::env::var_os(v).is_some()) {
        return Tuning::UserSettings(var);
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    let settings = [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
        (libc::M_TOP_PAD, TOP_PAD, "M_TOP_PAD"),
    ];
    for (param, value, name) in settings {
        let value = libc::c_int::try_from(value).expect("the settings fit a C int");
        // SAFETY: mallopt takes any parameter/value pair and reports failure by
        // returning 0; it is thread-safe in glibc.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Tuning::Unsupported(name);
        }
    }
    Tuning::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::Unsupported("not glibc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_on_glibc_unless_the_environment_sets_it() {
        // The test binary's environment has none of glibc's variables (CI sets none).
        if let Some(var) = USER_SETTINGS.iter().find(|v| std::env::var_os(v).is_some()) {
            assert_eq!(tune(), Tuning::UserSettings(var));
            return;
        }
        let got = tune();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(got, Tuning::Applied);
        } else {
            assert!(matches!(got, Tuning::Unsupported(_)));
        }
    }
}
