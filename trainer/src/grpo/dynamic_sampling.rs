//! DAPO's dynamic sampling as a pure batch builder: groups whose rewards are all equal
//! (every completion right, or every one wrong) have zero advantages and teach nothing,
//! so they are dropped and more prompts are drawn until the batch holds
//! `target_groups` informative groups, or `max_num_gen_batches` generation rounds have
//! been spent (then the step trains on what it has). Dropped groups and rounds are
//! counted for the metrics.
//!
//! A group is flat when its rewards' unbiased std is at most
//! [`super::advantages::ZERO_STD_TOL`], the same test as TRL's `frac_reward_zero_std`.
use serde::{Deserialize, Serialize};

use super::advantages::ZERO_STD_TOL;

/// What a step does when `max_num_gen_batches` rounds did not fill its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenUnfilled {
    /// Train on the informative groups there are; flat groups pad the batch to its
    /// shape and are left out of the loss.
    #[default]
    Train,
    /// Stop the run with an error (verl's behaviour past `max_num_gen_batches`).
    Error,
}

/// Whether each group of `num_generations` consecutive combined rewards has any
/// spread. A group with an unscorable completion (`None`) is never informative: it is
/// left out of the loss anyway.
pub fn informative_groups(rewards: &[Option<f64>], num_generations: usize) -> Vec<bool> {
    rewards
        .chunks(num_generations.max(1))
        .map(|g| {
            let n = g.len() as f64;
            let Some(g) = g.iter().copied().collect::<Option<Vec<f64>>>() else {
                return false;
            };
            if g.len() < 2 {
                return false;
            }
            let mean = g.iter().sum::<f64>() / n;
            let var = g.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1.0);
            var.sqrt() > ZERO_STD_TOL
        })
        .collect()
}

/// What dynamic sampling did in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DynamicSamplingStats {
    /// Generation rounds spent (1 when the first round filled the batch).
    pub rounds: usize,
    /// Flat groups dropped.
    pub dropped_groups: usize,
    /// Informative groups beyond the target, left out of the step.
    pub surplus_groups: usize,
    /// The batch reached `target_groups`.
    pub filled: bool,
}

/// Accumulates informative groups over generation rounds.
#[derive(Debug)]
pub struct DynamicBatch<G> {
    target_groups: usize,
    max_rounds: usize,
    kept: Vec<G>,
    stats: DynamicSamplingStats,
}

impl<G> DynamicBatch<G> {
    /// `max_rounds >= 1` (verl's `max_num_gen_batches`).
    pub fn new(target_groups: usize, max_rounds: usize) -> Self {
        DynamicBatch {
            target_groups,
            max_rounds: max_rounds.max(1),
            kept: Vec::new(),
            stats: DynamicSamplingStats::default(),
        }
    }

    /// One generation round: `groups` with their combined rewards (`num_generations`
    /// each, in order). Keeps the informative ones, up to the target; returns the
    /// dropped (flat or unscorable) ones.
    pub fn offer(
        &mut self,
        groups: Vec<G>,
        rewards: &[Option<f64>],
        num_generations: usize,
    ) -> Vec<G> {
        self.stats.rounds += 1;
        let mut dropped = vec![];
        for (g, keep) in groups
            .into_iter()
            .zip(informative_groups(rewards, num_generations))
        {
            if !keep {
                self.stats.dropped_groups += 1;
                dropped.push(g);
            } else if self.kept.len() < self.target_groups {
                self.kept.push(g);
            } else {
                self.stats.surplus_groups += 1;
            }
        }
        self.stats.filled = self.kept.len() >= self.target_groups;
        dropped
    }

    /// A generation round in which this rank had nothing to draw (its batch was full
    /// while another rank's was not).
    pub fn skip_round(&mut self) {
        self.stats.rounds += 1;
    }

    /// Informative groups kept so far.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Groups still missing, or 0 when full or out of rounds: how many prompts the next
    /// round should draw.
    pub fn missing(&self) -> usize {
        if self.stats.filled || self.stats.rounds >= self.max_rounds {
            0
        } else {
            self.target_groups - self.kept.len()
        }
    }

    pub fn finish(self) -> (Vec<G>, DynamicSamplingStats) {
        (self.kept, self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &[f64]) -> Vec<Option<f64>> {
        x.iter().copied().map(Some).collect()
    }

    #[test]
    fn flat_groups_are_dropped_and_more_drawn_until_full() {
        // G = 2: groups [1,1] (flat), [0,1], [0,0] (flat), [1,0].
        assert_eq!(
            informative_groups(&s(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]), 2),
            vec![false, true, false, true]
        );
        let mut b = DynamicBatch::new(3, 4);
        b.offer(
            vec!["a", "b", "c", "d"],
            &s(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
            2,
        );
        assert_eq!(b.missing(), 1);
        let dropped = b.offer(vec!["e", "f"], &s(&[0.5, 0.5, 0.2, 0.9]), 2);
        assert_eq!(dropped, vec!["e"], "the flat groups come back (padding)");
        assert_eq!(b.missing(), 0);
        let (kept, stats) = b.finish();
        assert_eq!(kept, vec!["b", "d", "f"]);
        assert_eq!(
            stats,
            DynamicSamplingStats {
                rounds: 2,
                dropped_groups: 3,
                surplus_groups: 0,
                filled: true
            }
        );
    }

    #[test]
    fn an_unscorable_completion_makes_its_group_uninformative() {
        assert_eq!(
            informative_groups(&[Some(0.0), None, Some(0.0), Some(1.0)], 2),
            vec![false, true]
        );
    }

    #[test]
    fn bounded_by_max_rounds() {
        let mut b = DynamicBatch::new(2, 2);
        b.offer(vec![1, 2], &s(&[0.0, 0.0, 1.0, 1.0]), 2);
        assert_eq!(b.missing(), 2);
        b.offer(vec![3, 4], &s(&[0.0, 1.0, 1.0, 1.0]), 2);
        assert_eq!(b.missing(), 0, "out of rounds");
        let (kept, stats) = b.finish();
        assert_eq!(kept, vec![3]);
        assert!(!stats.filled);
        assert_eq!((stats.rounds, stats.dropped_groups), (2, 3));
        // Surplus informative groups are counted, not trained on.
        let mut b = DynamicBatch::new(1, 1);
        b.offer(vec![1, 2], &s(&[0.0, 1.0, 1.0, 0.0]), 2);
        assert_eq!(b.finish().1.surplus_groups, 1);
    }
}
