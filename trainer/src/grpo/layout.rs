//! The global batch of a generation round, laid out as TRL's `GRPOTrainer` lays it out:
//! `groups = per_device_train_batch_size × world × gradient_accumulation_steps /
//! num_generations` prompts in sampler order, each repeated `num_generations` times
//! (`RepeatSampler`), the completions flattened (`c = g × num_generations + j`), and rank
//! `r` owning the contiguous slice `[r × P, (r + 1) × P)` with `P` its completions per
//! round (TRL's `process_slice`). A group may therefore span two or more ranks: each rank
//! holds a [`Share`] of every group its slice touches and asks the workers only for
//! those completions.
//!
//! Sampling streams are global: completion `c` of round seed `s` draws from stream
//! `s + c` (the workers seed completion `j` of job `k` of a request with
//! `seed + k × n + j`; [`generation_runs`] picks each request's seed and `n` so that
//! this holds), so the same global layout yields the same completions whatever the
//! world size.
use std::ops::Range;

/// Where a round's completions live: `num_generations` per group, `per_rank` per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    pub num_generations: usize,
    /// Completions each rank trains on per round (`per_device_train_batch_size ×
    /// gradient_accumulation_steps`).
    pub per_rank: usize,
    pub world: usize,
}

/// A rank's part of one group: completions `first .. first + len` of global group
/// `group` (of the round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub group: usize,
    pub first: usize,
    pub len: usize,
}

impl Share {
    /// Whether this share holds the group's first completion: the one rank that counts
    /// the group in the statistics.
    pub fn owns_group(&self) -> bool {
        self.first == 0
    }
}

/// One generation request: shares `shares` (indices into the rank's list), `n`
/// completions each, seeded at `seed_offset` past the round seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRun {
    pub shares: Range<usize>,
    pub n: usize,
    pub seed_offset: u64,
}

impl GroupLayout {
    /// Completions per round over all ranks (TRL's `generation_batch_size`).
    pub fn global_completions(&self) -> usize {
        self.per_rank * self.world
    }

    /// Prompts (groups) per round over all ranks.
    pub fn groups(&self) -> usize {
        self.global_completions() / self.num_generations.max(1)
    }

    /// Whether some group spans ranks (every rank holds whole groups otherwise).
    pub fn spans_ranks(&self) -> bool {
        !self.per_rank.is_multiple_of(self.num_generations.max(1))
    }

    /// Rank `rank`'s completions in the flattened global batch.
    pub fn slice(&self, rank: usize) -> Range<usize> {
        rank * self.per_rank..(rank + 1) * self.per_rank
    }

    /// Rank `rank`'s share of each group its slice touches, in group order.
    pub fn shares(&self, rank: usize) -> Vec<Share> {
        let n = self.num_generations.max(1);
        let Range { start, end } = self.slice(rank);
        let mut out = vec![];
        let mut c = start;
        while c < end {
            let (group, first) = (c / n, c % n);
            let len = (n - first).min(end - c);
            out.push(Share { group, first, len });
            c += len;
        }
        out
    }
}

/// The generation requests of `shares` (group `g`'s completions from `first` on):
/// consecutive whole groups go in one request of `n = num_generations`, a partial share
/// in a request of its own with `n` its length, each seeded so that completion `j` of
/// group `g` draws from stream `round seed + g × num_generations + j`.
pub fn generation_runs(shares: &[Share], num_generations: usize) -> Vec<GenerationRun> {
    let n = num_generations.max(1);
    let whole = |s: &Share| s.first == 0 && s.len == n;
    let mut runs: Vec<GenerationRun> = vec![];
    for (i, s) in shares.iter().enumerate() {
        if let Some(last) = runs.last_mut() {
            let prev = &shares[i - 1];
            if whole(s) && whole(prev) && last.n == n && prev.group + 1 == s.group {
                last.shares.end = i + 1;
                continue;
            }
        }
        runs.push(GenerationRun {
            shares: i..i + 1,
            n: s.len,
            seed_offset: (s.group * n + s.first) as u64,
        });
    }
    runs
}

/// Why a batch shape cannot be laid out in groups (TRL's rule and message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the global train batch per_device_train_batch_size ({per_device}) x world size ({world}) x \
     gradient_accumulation_steps ({accumulation}) = {global} must be evenly divisible by \
     num_generations ({num_generations}); with this batch the valid values for \
     num_generations are: {valid:?}"
)]
pub struct LayoutError {
    pub per_device: usize,
    pub world: usize,
    pub accumulation: usize,
    pub global: usize,
    pub num_generations: usize,
    pub valid: Vec<usize>,
}

/// Checks TRL's rule that `num_generations` divides the global batch.
pub fn check_global_batch(
    per_device: usize,
    world: usize,
    accumulation: usize,
    num_generations: usize,
) -> Result<GroupLayout, LayoutError> {
    let global = per_device * world * accumulation;
    if num_generations == 0 || !global.is_multiple_of(num_generations) {
        return Err(LayoutError {
            per_device,
            world,
            accumulation,
            global,
            num_generations,
            valid: (2..=global).filter(|d| global.is_multiple_of(*d)).collect(),
        });
    }
    Ok(GroupLayout {
        num_generations,
        per_rank: per_device * accumulation,
        world,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: usize, per_rank: usize, world: usize) -> GroupLayout {
        GroupLayout {
            num_generations: n,
            per_rank,
            world,
        }
    }

    #[test]
    fn shares_cover_the_global_batch_once_in_order() {
        for (n, p, w) in [
            (3, 2, 3),
            (7, 16, 7),
            (4, 6, 2),
            (8, 16, 2),
            (5, 3, 5),
            (2, 1, 4),
        ] {
            let l = layout(n, p, w);
            let mut seen = vec![];
            for r in 0..w {
                let shares = l.shares(r);
                assert_eq!(shares.iter().map(|s| s.len).sum::<usize>(), p);
                for s in shares {
                    assert!(s.first + s.len <= n && s.len > 0);
                    seen.extend((0..s.len).map(|j| s.group * n + s.first + j));
                }
            }
            assert_eq!(seen, (0..l.global_completions()).collect::<Vec<_>>());
            // Every group is owned (first completion) by exactly one rank.
            let owners: usize = (0..w)
                .map(|r| l.shares(r).iter().filter(|s| s.owns_group()).count())
                .sum();
            assert_eq!(owners, l.groups());
        }
    }

    #[test]
    fn open_r1_shape_spans_and_whole_groups_do_not() {
        // open-r1: 7 processes x 16 completions, 7 generations: 16 groups.
        let l = check_global_batch(16, 7, 1, 7).unwrap();
        assert_eq!(l.groups(), 16);
        assert!(l.spans_ranks());
        assert_eq!(
            l.shares(1),
            vec![
                Share {
                    group: 2,
                    first: 2,
                    len: 5
                },
                Share {
                    group: 3,
                    first: 0,
                    len: 7
                },
                Share {
                    group: 4,
                    first: 0,
                    len: 4
                },
            ]
        );
        assert!(!check_global_batch(16, 4, 1, 8).unwrap().spans_ranks());
        let e = check_global_batch(2, 2, 1, 3).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("(2) x world size (2) x"), "{msg}");
        assert!(
            msg.contains("= 4 must be evenly divisible by num_generations (3)"),
            "{msg}"
        );
        assert_eq!(e.valid, vec![2, 4]);
    }

    #[test]
    fn runs_seed_every_completion_by_its_global_index() {
        for (n, p, w) in [(3, 2, 3), (7, 16, 7), (4, 6, 2), (4, 12, 1), (4, 8, 2)] {
            let l = layout(n, p, w);
            let mut streams = vec![];
            for r in 0..w {
                let shares = l.shares(r);
                let runs = generation_runs(&shares, n);
                assert_eq!(
                    runs.iter().map(|r| r.shares.len()).sum::<usize>(),
                    shares.len()
                );
                for run in runs {
                    for (k, s) in shares[run.shares.clone()].iter().enumerate() {
                        assert_eq!(s.len, run.n);
                        // The worker's stream of completion j of job k.
                        streams
                            .extend((0..run.n).map(|j| run.seed_offset + (k * run.n + j) as u64));
                    }
                }
            }
            let want: Vec<u64> = (0..l.global_completions() as u64).collect();
            assert_eq!(streams, want, "n {n} per rank {p} world {w}");
        }
        // Whole groups: one request per rank.
        let l = layout(4, 8, 2);
        assert_eq!(generation_runs(&l.shares(1), 4).len(), 1);
    }
}
