//! The rewards of a round's whole global batch on every rank (TRL gathers them with
//! `accelerator.gather` before normalising per group), so a group that spans ranks gets
//! its mean and std from all its completions; each rank then keeps the advantages of
//! its own slice.
//!
//! One collective per round: an `i64` all-reduce (sum) of `[2 × completions + groups]`
//! values, each written by the one rank that holds it and 0 elsewhere, so the sum is
//! exact: the rewards travel as their `f64` bit patterns.
use tch::Tensor;

use super::layout::{GroupLayout, Share};
use crate::dist::{CommError, Communicator, ReduceOp};

/// A round's combined rewards in global order.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalRewards {
    /// `[global completions]`; `None`: some reward function could not score it.
    pub rewards: Vec<Option<f64>>,
    /// `[groups]`: padding groups of a batch dynamic sampling could not fill.
    pub padding: Vec<bool>,
}

impl GlobalRewards {
    /// `[groups]`: groups left out of the loss (padding, or any completion unscored).
    pub fn excluded(&self, num_generations: usize) -> Vec<bool> {
        self.rewards
            .chunks(num_generations.max(1))
            .zip(&self.padding)
            .map(|(g, pad)| *pad || g.iter().any(Option::is_none))
            .collect()
    }
}

/// Why the rewards could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error(
        "rank {rank} holds {got} rewards in {shares} group shares, its slice of the round \
         has {want} completions in {want_shares} shares"
    )]
    Shape {
        rank: usize,
        got: usize,
        shares: usize,
        want: usize,
        want_shares: usize,
    },
    #[error("gathering the round's rewards: {0}")]
    Comm(#[from] CommError),
}

/// Gathers this rank's `local` rewards (its slice, in order) and the `padding` flag of
/// each of its `shares` into the global batch. Collective.
pub fn gather_rewards(
    comm: &mut dyn Communicator,
    layout: &GroupLayout,
    local: &[Option<f64>],
    shares: &[Share],
    padding: &[bool],
) -> Result<GlobalRewards, GatherError> {
    let rank = comm.rank();
    let slice = layout.slice(rank);
    let want_shares = layout.shares(rank);
    if local.len() != slice.len()
        || shares != want_shares.as_slice()
        || padding.len() != shares.len()
    {
        return Err(GatherError::Shape {
            rank,
            got: local.len(),
            shares: shares.len().max(padding.len()),
            want: slice.len(),
            want_shares: want_shares.len(),
        });
    }
    let (total, groups) = (layout.global_completions(), layout.groups());
    let mut v = vec![0i64; 2 * total + groups];
    for (i, r) in slice.clone().zip(local) {
        if let Some(r) = r {
            v[i] = r.to_bits() as i64;
            v[total + i] = 1;
        }
    }
    for (s, pad) in shares.iter().zip(padding) {
        // Under dynamic sampling every group is whole on one rank; a flag is set by at
        // most one rank per group, so the sum stays 0 or 1.
        if *pad && s.owns_group() {
            v[2 * total + s.group] = 1;
        }
    }
    if comm.world_size() > 1 {
        let mut t = Tensor::from_slice(&v);
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
        v = Vec::try_from(&t).map_err(|source| CommError::Torch {
            op: "gather_rewards",
            source,
        })?;
    }
    Ok(GlobalRewards {
        rewards: (0..total)
            .map(|i| (v[total + i] != 0).then(|| f64::from_bits(v[i] as u64)))
            .collect(),
        padding: v[2 * total..].iter().map(|&p| p != 0).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleComm;

    #[test]
    fn one_rank_gathers_its_own_batch() {
        let layout = GroupLayout {
            num_generations: 2,
            per_rank: 4,
            world: 1,
        };
        let shares = layout.shares(0);
        let local = [Some(1.5), None, Some(-0.0), Some(f64::MIN_POSITIVE)];
        let mut comm = SingleComm;
        let g = gather_rewards(&mut comm, &layout, &local, &shares, &[false, true]).unwrap();
        assert_eq!(g.rewards[0], Some(1.5));
        assert_eq!(g.rewards[1], None);
        assert_eq!(g.rewards[2].map(f64::to_bits), Some((-0.0f64).to_bits()));
        assert_eq!(g.rewards[3], Some(f64::MIN_POSITIVE));
        assert_eq!(g.padding, vec![false, true]);
        assert_eq!(g.excluded(2), vec![true, true]);
        let e = gather_rewards(&mut comm, &layout, &local[..3], &shares, &[false, true])
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds 3 rewards"), "{e}");
    }
}
