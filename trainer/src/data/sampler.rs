//! Seeded epoch sampling of example indices, resumable from a checkpoint.
//!
//! Epoch `e` visits `0..len` in the order of one permutation drawn from ChaCha20 keyed by
//! `seed` (its 8 little-endian bytes, then zeros) on stream `e`, by a Fisher–Yates shuffle
//! whose draws are unbiased (Lemire's multiply-and-reject on 64-bit outputs). The
//! permutation depends only on `(seed, len, e)`: every rank builds the same one, and a run
//! resumed from [`SamplerState`] continues exactly where it stopped.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::DataError;

/// Where a [`Sampler`] is: the next index is `permutation(seed, len, epoch)[position]`
/// (`position == len` means the epoch is used up; the next draw starts epoch + 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    pub len: usize,
    pub epoch: u64,
    pub position: usize,
}

/// Deals out indices of a dataset of `len` examples, epoch after epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    epoch: u64,
    position: usize,
    /// The permutation of `epoch`.
    order: Vec<usize>,
}

impl Sampler {
    /// A sampler at the start of epoch 0.
    pub fn new(len: usize, seed: u64) -> Self {
        Self {
            seed,
            epoch: 0,
            position: 0,
            order: permutation(seed, len, 0),
        }
    }

    /// The next `n` indices. A batch that runs past the end of an epoch continues with the
    /// next epoch's permutation, so it may repeat an index (only when it spans the
    /// boundary). An empty dataset yields an empty batch.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let len = self.order.len();
        let mut batch = Vec::with_capacity(if len == 0 { 0 } else { n });
        if len == 0 {
            return batch;
        }
        while batch.len() < n {
            if self.position == len {
                self.epoch += 1;
                self.position = 0;
                self.order = permutation(self.seed, len, self.epoch);
            }
            let take = (n - batch.len()).min(len - self.position);
            batch.extend_from_slice(&self.order[self.position..self.position + take]);
            self.position += take;
        }
        batch
    }

    /// The epoch of the last index dealt (0 before any).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The state to checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            len: self.order.len(),
            epoch: self.epoch,
            position: self.position,
        }
    }

    /// Continues from a checkpointed state. Refuses a state for another dataset size or
    /// seed (the order would silently differ) and a position past the end of the epoch.
    pub fn restore(&mut self, s: &SamplerState) -> Result<(), DataError> {
        let mismatch = |field, expected: String, found: String| DataError::SamplerMismatch {
            field,
            expected,
            found,
        };
        let len = self.order.len();
        if s.len != len {
            return Err(mismatch("len", len.to_string(), s.len.to_string()));
        }
        if s.seed != self.seed {
            return Err(mismatch("seed", self.seed.to_string(), s.seed.to_string()));
        }
        if s.position > len {
            return Err(mismatch(
                "position",
                format!("at most {len}"),
                s.position.to_string(),
            ));
        }
        if s.epoch != self.epoch {
            self.order = permutation(self.seed, len, s.epoch);
        }
        self.epoch = s.epoch;
        self.position = s.position;
        Ok(())
    }
}

/// The permutation of `0..len` for `epoch`: Fisher–Yates from the last position down, the
/// swap partner of position `i` drawn uniformly from `0..=i`.
pub fn permutation(seed: u64, len: usize, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform draw from `0..n` (`n >= 1`): Lemire's method, `x * n >> 64` over 64-bit `x`,
/// rejecting the `2^64 mod n` low products that would bias it.
fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(n);
        if (product as u64) >= threshold {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &[usize], len: usize) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        sorted == (0..len).collect::<Vec<_>>()
    }

    #[test]
    fn epochs_are_distinct_permutations_of_the_same_seed() {
        let a = permutation(7, 100, 0);
        let b = permutation(7, 100, 1);
        assert!(is_permutation(&a, 100) && is_permutation(&b, 100));
        assert_ne!(a, b);
        assert_eq!(a, permutation(7, 100, 0));
        assert_ne!(a, permutation(8, 100, 0));
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        assert!(permutation(7, 0, 0).is_empty());
        assert_eq!(permutation(7, 1, 3), [0]);
    }

    #[test]
    fn batches_walk_epochs_in_order() {
        let mut s = Sampler::new(10, 42);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.extend(s.next_batch(4));
        }
        // 20 indices = epochs 0 and 1, each a permutation, crossing the boundary mid-batch.
        assert_eq!(seen[..10], permutation(42, 10, 0)[..]);
        assert_eq!(seen[10..], permutation(42, 10, 1)[..]);
        assert_eq!(s.epoch(), 1);
        assert_eq!(
            s.state(),
            SamplerState {
                seed: 42,
                len: 10,
                epoch: 1,
                position: 10
            }
        );
        let next = s.next_batch(3);
        assert_eq!(next, permutation(42, 10, 2)[..3]);
        assert_eq!(s.epoch(), 2);
        // A batch larger than the dataset spans several epochs.
        let mut big = Sampler::new(3, 1);
        let b = big.next_batch(7);
        assert_eq!(b.len(), 7);
        assert_eq!(big.epoch(), 2);
        assert!(is_permutation(&b[..3], 3) && is_permutation(&b[3..6], 3));
    }

    #[test]
    fn restore_resumes_exactly() {
        let mut a = Sampler::new(17, 5);
        a.next_batch(11);
        a.next_batch(11);
        let state = a.state();
        let expected: Vec<usize> = (0..4).flat_map(|_| a.next_batch(6)).collect();
        let mut b = Sampler::new(17, 5);
        b.restore(&state).unwrap();
        let got: Vec<usize> = (0..4).flat_map(|_| b.next_batch(6)).collect();
        assert_eq!(got, expected);
        // The state survives serialization.
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<SamplerState>(&json).unwrap(), state);
    }

    #[test]
    fn restore_refuses_another_dataset() {
        let mut s = Sampler::new(17, 5);
        let mut state = s.state();
        state.len = 18;
        let err = s.restore(&state).unwrap_err().to_string();
        assert!(
            err.contains("len is 18 in the checkpoint but 17 here"),
            "{err}"
        );
        state.len = 17;
        state.seed = 6;
        assert!(s.restore(&state).unwrap_err().to_string().contains("seed"));
        state.seed = 5;
        state.position = 18;
        assert!(s
            .restore(&state)
            .unwrap_err()
            .to_string()
            .contains("position"));
        // A refused restore leaves the sampler as it was.
        assert_eq!(s.state(), Sampler::new(17, 5).state());
    }

    #[test]
    fn draws_are_uniform() {
        // 60,000 shuffles of 3 elements: each of the 6 orders ~10,000 times. The std of a
        // count is sqrt(60000 * 1/6 * 5/6) ~ 91, so 500 is > 5 std.
        let mut counts = std::collections::HashMap::new();
        for seed in 0..60_000u64 {
            *counts.entry(permutation(seed, 3, 0)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 6);
        for (order, n) in counts {
            assert!((n as i64 - 10_000).abs() < 500, "{order:?}: {n}");
        }
    }

    #[test]
    fn empty_dataset_yields_nothing() {
        let mut s = Sampler::new(0, 1);
        assert!(s.next_batch(4).is_empty());
        assert_eq!(s.epoch(), 0);
    }
}
