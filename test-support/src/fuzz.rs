//! A small mutation fuzzer for the stable toolchain (no nightly, so no libFuzzer): each
//! target starts from valid seed inputs and feeds the code under test byte-level
//! mutations of them (bit flips, byte sets to boundary values, truncation, insertion,
//! duplication, splicing with another seed), catching panics.
//!
//! Bounded by executions (`FUZZ_EXECS`, default: a short run fit for the normal test
//! suite) or by time (`FUZZ_SECS`, which `scripts/fuzz.sh` sets). Deterministic for a
//! given `FUZZ_SEED`. Each run prints `FUZZ target=<name> execs=<n> crashes=<k>`; a
//! crash fails the test with the input in hex, to be added as a regression case.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub execs: u64,
    pub crashes: Vec<Vec<u8>>,
}

/// The run's bound, from the environment.
fn budget(default_execs: u64) -> (Option<Duration>, u64) {
    let secs = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    let execs = std::env::var("FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_execs);
    match secs {
        Some(s) if s > 0.0 => (Some(Duration::from_secs_f64(s)), u64::MAX),
        _ => (None, execs),
    }
}

/// One mutation of `input` (`other` is another seed to splice with).
pub fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'9', b'\n'][rng.random_range(0..8)];
            }
            2 if len > 0 => out.truncate(rng.random_range(0..len)),
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                let chunk = out[a..b].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, chunk);
            }
            5 if !other.is_empty() && len > 0 => {
                let cut = rng.random_range(0..len);
                let from = rng.random_range(0..other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            6 if len >= 4 => {
                // A length or count field set to an extreme.
                let i = rng.random_range(0..len - 3);
                let v: u32 = [0, 1, u32::MAX, 0x7fff_ffff, 1 << 20][rng.random_range(0..5)];
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.random_range(0..32);
                out.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    out
}

/// Runs `target` on the seeds, then on mutations of them until the budget is spent
/// (`default_execs` executions unless `FUZZ_SECS` / `FUZZ_EXECS` say otherwise).
/// Panics if any input made `target` panic.
pub fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    default_execs: u64,
    mut target: impl FnMut(&[u8]),
) -> Report {
    assert!(!seeds.is_empty(), "{name}: at least one seed");
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name.len() as u64);
    let (time, max_execs) = budget(default_execs);
    let start = Instant::now();
    let mut report = Report {
        execs: 0,
        crashes: vec![],
    };
    let mut first_panic = None;
    let mut run = |input: &[u8], report: &mut Report| {
        report.execs += 1;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| target(input))) {
            if first_panic.is_none() {
                first_panic = Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                );
            }
            if report.crashes.len() < 16 {
                report.crashes.push(input.to_vec());
            }
        }
    };
    for s in seeds {
        run(s, &mut report);
    }
    loop {
        if report.execs >= max_execs || time.is_some_and(|t| start.elapsed() >= t) {
            break;
        }
        let a = &seeds[rng.random_range(0..seeds.len())];
        let b = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, a, b);
        run(&input, &mut report);
    }
    println!(
        "FUZZ target={name} execs={} crashes={} secs={:.1}",
        report.execs,
        report.crashes.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(first) = report.crashes.first() {
        let hex: String = first.iter().map(|b| format!("{b:02x}")).collect();
        panic!(
            "{name}: {} of {} inputs panicked (first: {:?}); first input (hex): {hex}",
            report.crashes.len(),
            report.execs,
            first_panic.unwrap_or_default()
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_vary_and_crashes_are_reported() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let seed = b"{\"a\": [1, 2, 3]}".to_vec();
        let distinct: std::collections::HashSet<Vec<u8>> =
            (0..200).map(|_| mutate(&mut rng, &seed, b"xyz")).collect();
        assert!(distinct.len() > 150, "{}", distinct.len());
        let r = std::panic::catch_unwind(|| {
            fuzz("panics-on-z", &[b"abc".to_vec()], 2000, |b| {
                assert!(!b.contains(&b'z'), "found z");
            })
        });
        assert!(r.is_err(), "a crashing input must fail the run");
        let ok = fuzz("never-panics", &[b"abc".to_vec()], 100, |b| {
            let _ = std::str::from_utf8(b);
        });
        assert_eq!((ok.execs, ok.crashes.len()), (100, 0));
    }
}
