//! DAPO's dynamic sampling inside a round ([`Grpo::fill_dynamic`]): the round's first
//! batch is scored, groups whose combined rewards are all equal are dropped, and more
//! prompts are drawn from the same seeded sampler and generated until every rank holds
//! `prompts_per_rank` informative groups or `max_num_gen_batches` generation rounds are
//! spent (verl's `filter_groups`). The extra rounds are collective: every rank draws the
//! same global batch of `missing * world` prompts (the most any rank misses) and takes
//! its slice, so the sampler stays identical on every rank and a checkpoint records its
//! exact position; a rank already full consumes its slice without generating it.
//!
//! A batch still short after the last round either trains (flat groups pad it to its
//! shape, left out of the loss, so every rank runs the same micro-batches) or stops the
//! run, as `dynamic_sampling_unfilled` says.
use crate::error::{Result, RunError};
use tch::Tensor;

use super::advantages::combine_rewards;
use super::batch::split_even;
use super::dynamic_sampling::{DynamicBatch, WhenUnfilled};
use super::phases::{Phase, Timings};
use super::stats::RoundStats;
use super::trainer::Grpo;
use crate::dist::ReduceOp;
use crate::rollout::RolloutGroup;

/// A round's batch in the layout the advantage phase takes: per group its prompt index
/// and completions; per reward function one score per completion, group after group.
pub(super) struct Filled {
    pub prompts: Vec<usize>,
    pub groups: Vec<RolloutGroup>,
    pub scores: Vec<Vec<Option<f64>>>,
    /// Flat groups padding a batch the rounds could not fill (left out of the loss).
    pub padding: Vec<bool>,
}

impl Filled {
    /// The batch as generated (no dynamic sampling).
    pub fn all(
        prompts: Vec<usize>,
        groups: Vec<RolloutGroup>,
        scores: Vec<Vec<Option<f64>>>,
    ) -> Filled {
        Filled {
            padding: vec![false; groups.len()],
            prompts,
            groups,
            scores,
        }
    }
}

/// One group with its scores (per reward function, `num_generations` each).
struct Entry {
    prompt: usize,
    group: RolloutGroup,
    scores: Vec<Vec<Option<f64>>>,
}

impl Grpo<'_> {
    /// Dynamic sampling of round `round`, starting from its first batch (already
    /// scored); see the module documentation. Collective.
    pub(super) fn fill_dynamic(
        &mut self,
        round: u64,
        first: Filled,
        times: &mut Timings,
        stats: &mut RoundStats,
    ) -> Result<Filled> {
        let cfg = self.cfg;
        let target = cfg.prompts_per_rank();
        let (rank, world) = (self.sess.env.rank, self.sess.env.world_size);
        let mut batch = DynamicBatch::new(target, cfg.max_num_gen_batches);
        let mut flat = self.offer(&mut batch, first)?;
        let mut extra = 0u64;
        loop {
            let m = self.max_over_ranks(batch.missing())?;
            if m == 0 {
                break;
            }
            extra += 1;
            let global = self.sampler.next_batch(m * world);
            let split = split_even(m * world, world)[rank].clone();
            let mine = global[split.clone()].to_vec();
            if batch.missing() == 0 {
                batch.skip_round();
                continue;
            }
            // Streams by global completion index, as the round's first batch.
            let seed = (self.round_seed(round) ^ extra.wrapping_mul(0xD1CE_5EED_0000_0001))
                .wrapping_add((split.start * cfg.num_generations) as u64);
            let jobs = self.jobs(&mine);
            let n = cfg.num_generations as u32;
            let groups = times.time(Phase::Rollout, || {
                self.sess.rt.block_on(self.client.generate(
                    jobs,
                    n,
                    cfg.sampling(Some(seed)),
                    true,
                    self.version,
                    |_| {},
                ))
            })?;
            let scores = times.time(Phase::Reward, || self.rewards(&mine, &groups, stats))?;
            flat.extend(self.offer(&mut batch, Filled::all(mine, groups, scores))?);
        }
        let (mut kept, ds) = batch.finish();
        let short = self.max_over_ranks(target - kept.len())?;
        if short > 0 && cfg.dynamic_sampling_unfilled == WhenUnfilled::Error {
            return Err(RunError::DynamicSamplingUnfilled {
                max_num_gen_batches: cfg.max_num_gen_batches,
                short,
                target,
            });
        }
        let pad = target - kept.len();
        if flat.len() < pad {
            return Err(RunError::DynamicSamplingPadding {
                available: flat.len(),
                needed: pad,
            });
        }
        stats.ds_rounds = ds.rounds as f64;
        stats.ds_dropped += ds.dropped_groups as f64;
        stats.ds_surplus += ds.surplus_groups as f64;
        stats.ds_padding += pad as f64;
        let informative = kept.len();
        kept.extend(flat.into_iter().take(pad));
        // The staleness of what is trained (the first batch's was counted already).
        stats.staleness.iter_mut().for_each(|c| *c = 0.0);
        let num_funcs = self.funcs.len();
        let mut out = Filled {
            prompts: vec![],
            groups: vec![],
            scores: vec![vec![]; num_funcs],
            padding: vec![],
        };
        for (i, mut e) in kept.into_iter().enumerate() {
            let s = self.version.saturating_sub(e.group.weight_version) as usize;
            if let Some(c) = stats.staleness.get_mut(s) {
                *c += 1.0;
            }
            e.group.key = i as u64;
            out.prompts.push(e.prompt);
            out.groups.push(e.group);
            for (acc, s) in out.scores.iter_mut().zip(e.scores) {
                acc.extend(s);
            }
            out.padding.push(i >= informative);
        }
        Ok(out)
    }

    /// Offers a scored batch to `batch`; returns its dropped groups.
    fn offer(&self, batch: &mut DynamicBatch<Entry>, b: Filled) -> Result<Vec<Entry>> {
        let n = self.cfg.num_generations;
        let combined = combine_rewards(&b.scores, &self.cfg.reward_weights())?;
        let entries: Vec<Entry> = b
            .prompts
            .into_iter()
            .zip(b.groups)
            .enumerate()
            .map(|(g, (prompt, group))| Entry {
                prompt,
                group,
                scores: b
                    .scores
                    .iter()
                    .map(|f| f[g * n..(g + 1) * n].to_vec())
                    .collect(),
            })
            .collect();
        Ok(batch.offer(entries, &combined, n))
    }

    pub(super) fn max_over_ranks(&mut self, x: usize) -> Result<usize> {
        let mut t = Tensor::from_slice(&[x as i64]);
        self.engine.comm().all_reduce(&mut t, ReduceOp::Max)?;
        Ok(t.int64_value(&[0]) as usize)
    }
}
