//! Packing of completions into training micro-batches (pure tensor layout, no model).
//!
//! Each sample is a prompt followed by its completion, right-padded to the longest in
//! the micro-batch. Right padding needs no attention mask under causal attention (real
//! tokens never attend to the padding after them), so the model runs its mask-free path.
//! Every per-token tensor uses the *shifted* layout `[B, L - 1]`: position `t` holds the
//! log-prob of token `t + 1` (the logits at `t` predict the next token), so a completion
//! of length `c` after a prompt of length `p` occupies positions `p - 1 .. p - 1 + c`.
use tch::{Kind, Tensor};

use super::prefix::forwarded_len;

/// One completion to train on.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt_ids: Vec<i64>,
    pub completion_ids: Vec<i64>,
    /// The rollout worker's log-prob of each completion token (same length).
    pub sampler_logprobs: Vec<f32>,
    pub advantage: f32,
    /// Whether the completion's tokens count in the loss (false for excluded groups and,
    /// under `mask_truncated_completions`, for truncated completions).
    pub in_loss: bool,
}

/// A micro-batch in the shifted layout.
#[derive(Debug)]
pub struct PackedBatch {
    /// `[B, L]` i64, right-padded with `pad_id`.
    pub input_ids: Tensor,
    /// `[B, L - 1]` i64: `input_ids[:, 1:]`.
    pub targets: Tensor,
    /// `[B, L - 1]` f32: 1 on completion tokens that count in the loss.
    pub loss_mask: Tensor,
    /// `[B, L - 1]` f32: 1 on every completion token (for statistics such as entropy).
    pub completion_mask: Tensor,
    /// `[B, L - 1]` f32: the workers' log-probs on completion tokens, 0 elsewhere.
    pub sampler_logprobs: Tensor,
    /// `[B]` f32.
    pub advantages: Tensor,
    /// The same samples laid out with shared prefixes, when `shared_prefix_training`
    /// is on: the forward runs on it, the loss on the tensors above.
    pub shared: Option<super::prefix::SharedLayout>,
}

impl PackedBatch {
    /// `[B, L - 1]`: the positions the forward runs on. The last column predicts no
    /// target and, under causal attention, no other position attends to it.
    pub fn forward_ids(&self) -> Tensor {
        let l = self.input_ids.size()[1];
        self.input_ids.narrow(1, 0, l - 1)
    }
}

/// Why samples could not be packed into a micro-batch.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot pack an empty micro-batch")]
    Empty,
    #[error("sample {sample}: empty prompt or completion")]
    EmptySample { sample: usize },
    #[error("sample {sample}: {logprobs} log-probs for {tokens} completion tokens")]
    LogprobCount {
        sample: usize,
        logprobs: usize,
        tokens: usize,
    },
}

/// Packs `samples` (at least one, each with a non-empty prompt and completion and
/// matching log-prob count) into one micro-batch.
pub fn pack(samples: &[Sample], pad_id: i64) -> Result<PackedBatch, PackError> {
    if samples.is_empty() {
        return Err(PackError::Empty);
    }
    let mut len = 0;
    for (i, s) in samples.iter().enumerate() {
        if s.prompt_ids.is_empty() || s.completion_ids.is_empty() {
            return Err(PackError::EmptySample { sample: i });
        }
        if s.sampler_logprobs.len() != s.completion_ids.len() {
            return Err(PackError::LogprobCount {
                sample: i,
                logprobs: s.sampler_logprobs.len(),
                tokens: s.completion_ids.len(),
            });
        }
        len = len.max(s.prompt_ids.len() + s.completion_ids.len());
    }
    let b = samples.len();
    let mut ids = vec![pad_id; b * len];
    let shifted = len - 1;
    let mut loss_mask = vec![0f32; b * shifted];
    let mut completion_mask = vec![0f32; b * shifted];
    let mut sampler = vec![0f32; b * shifted];
    for (row, s) in samples.iter().enumerate() {
        let (p, c) = (s.prompt_ids.len(), s.completion_ids.len());
        let base = row * len;
        ids[base..base + p].copy_from_slice(&s.prompt_ids);
        ids[base + p..base + p + c].copy_from_slice(&s.completion_ids);
        let sbase = row * shifted + p - 1;
        completion_mask[sbase..sbase + c].fill(1.0);
        if s.in_loss {
            loss_mask[sbase..sbase + c].fill(1.0);
        }
        sampler[sbase..sbase + c].copy_from_slice(&s.sampler_logprobs);
    }
    let (b, l, sh) = (b as i64, len as i64, shifted as i64);
    let input_ids = Tensor::from_slice(&ids).view([b, l]);
    Ok(PackedBatch {
        targets: input_ids.narrow(1, 1, sh),
        input_ids,
        loss_mask: Tensor::from_slice(&loss_mask).view([b, sh]),
        completion_mask: Tensor::from_slice(&completion_mask).view([b, sh]),
        sampler_logprobs: Tensor::from_slice(&sampler).view([b, sh]),
        advantages: Tensor::from_slice(&samples.iter().map(|s| s.advantage).collect::<Vec<_>>())
            .to_kind(Kind::Float),
        shared: None,
    })
}

/// Splits `n` items into `parts` contiguous chunks whose sizes differ by at most one
/// (the first `n % parts` chunks are one longer). Empty chunks when `n < parts`.
pub fn split_even(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = q + usize::from(i < r);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Padded tokens of a micro-batch of these lengths: rows × the longest.
fn padded(lengths: &[usize], rows: &[usize]) -> usize {
    rows.iter().map(|&i| lengths[i]).max().unwrap_or(0) * rows.len()
}

/// Consecutive runs of `order` (sample indices, longest first) each of at most `budget`
/// padded tokens (a sample longer than the budget gets a run of its own).
fn greedy_runs(lengths: &[usize], order: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = vec![];
    for &i in order {
        match runs.last_mut() {
            // Longest first: the run's first sample sets its padded length.
            Some(run) if lengths[run[0]] * (run.len() + 1) <= budget => run.push(i),
            _ => runs.push(vec![i]),
        }
    }
    runs
}

fn longest_first(lengths: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable: equal lengths keep their input order, so the plan is deterministic.
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    order
}

/// How many micro-batches of at most `max_tokens` padded tokens the samples of
/// `lengths` (prompt + completion tokens) need when packed longest first (verl's dynamic
/// batch size). Ranks take the maximum of their counts, as every rank must run the same
/// number of micro-batches.
pub fn micro_batches_needed(lengths: &[usize], max_tokens: usize) -> usize {
    greedy_runs(lengths, &longest_first(lengths), max_tokens.max(1)).len()
}

/// Cuts the samples into exactly `parts` micro-batches (`1 <= parts <= lengths.len()`)
/// of similar length, longest first, with as little padding per micro-batch as the
/// count allows: the smallest token budget that greedy packing meets with at most
/// `parts` runs, then the runs with the most rows split until there are `parts`.
/// Returns the sample indices of each micro-batch.
pub fn partition_by_tokens(lengths: &[usize], parts: usize) -> Vec<Vec<usize>> {
    let order = longest_first(lengths);
    let parts = parts.clamp(1, lengths.len().max(1));
    if lengths.is_empty() {
        return vec![];
    }
    let (mut lo, mut hi) = (1usize, padded(lengths, &order).max(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if greedy_runs(lengths, &order, mid).len() <= parts {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut runs = greedy_runs(lengths, &order, lo);
    while runs.len() < parts {
        let (k, _) = runs
            .iter()
            .enumerate()
            .max_by_key(|(k, r)| (r.len(), std::cmp::Reverse(*k)))
            .expect("at least one run");
        let run = runs.remove(k);
        let (a, b) = run.split_at(run.len() / 2);
        runs.insert(k, b.to_vec());
        runs.insert(k, a.to_vec());
    }
    runs
}

/// The units micro-batches are cut from under shared-prefix training: runs of adjacent
/// samples with one prompt (a group, or the part of one a rank holds), so that a
/// micro-batch forwards each prompt once. A run whose shared-prefix row `P + sum (C_i -
/// 1)` ([`forwarded_len`]) exceeds the budget is cut greedily into pieces within it (a
/// completion longer than the budget is a piece alone): the fallback that forwards its
/// prompt more than once.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptUnits {
    /// Sample ranges, in sample order.
    ranges: Vec<std::ops::Range<usize>>,
    /// `P + sum (C_i - 1)` of each unit: the tokens of its shared-prefix row.
    lengths: Vec<usize>,
}

impl PromptUnits {
    /// The units of `samples` of at most `budget` tokens each (`budget` is the smaller
    /// of `micro_batch_max_tokens` and `shared_prefix_max_row_tokens`, so a unit packs
    /// into one row).
    pub fn new(samples: &[Sample], budget: usize) -> Self {
        let mut units = PromptUnits {
            ranges: vec![],
            lengths: vec![],
        };
        let mut start = 0;
        let mut len = 0;
        for (i, s) in samples.iter().enumerate() {
            let (p, c) = (s.prompt_ids.len(), forwarded_len(s.completion_ids.len()));
            let same = i > start && s.prompt_ids == samples[start].prompt_ids;
            if i > start && (!same || len + c > budget) {
                units.ranges.push(start..i);
                units.lengths.push(len);
                start = i;
            }
            len = if i == start { p + c } else { len + c };
        }
        if start < samples.len() {
            units.ranges.push(start..samples.len());
            units.lengths.push(len);
        }
        units
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Tokens of each unit's shared-prefix row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// [`micro_batches_needed`] over the units.
    pub fn micro_batches_needed(&self, max_tokens: usize) -> usize {
        micro_batches_needed(&self.lengths, max_tokens)
    }

    /// Cuts the units into `parts` micro-batches by [`partition_by_tokens`] (fewer
    /// units than parts: the unit with most samples is halved until there are enough,
    /// or every unit is one sample). Returns the sample indices of each micro-batch,
    /// ascending (a unit's samples adjacent).
    pub fn partition(mut self, samples: &[Sample], parts: usize) -> Vec<Vec<usize>> {
        while self.ranges.len() < parts {
            let Some((k, _)) = self
                .ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| r.len() > 1)
                .max_by_key(|(k, r)| (r.len(), std::cmp::Reverse(*k)))
            else {
                break;
            };
            let r = self.ranges.remove(k);
            let mid = r.start + r.len() / 2;
            self.ranges.insert(k, mid..r.end);
            self.ranges.insert(k, r.start..mid);
            let tokens = |r: &std::ops::Range<usize>| {
                samples[r.start].prompt_ids.len()
                    + samples[r.clone()]
                        .iter()
                        .map(|s| forwarded_len(s.completion_ids.len()))
                        .sum::<usize>()
            };
            self.lengths.splice(
                k..k + 1,
                [tokens(&self.ranges[k]), tokens(&self.ranges[k + 1])],
            );
        }
        partition_by_tokens(&self.lengths, parts)
            .into_iter()
            .map(|units| {
                let mut rows: Vec<usize> =
                    units.iter().flat_map(|&u| self.ranges[u].clone()).collect();
                rows.sort_unstable();
                rows
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p: &[i64], c: &[i64], adv: f32, in_loss: bool) -> Sample {
        Sample {
            prompt_ids: p.to_vec(),
            completion_ids: c.to_vec(),
            sampler_logprobs: c.iter().map(|&t| -(t as f32) / 10.0).collect(),
            advantage: adv,
            in_loss,
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        let s = t.size();
        (0..s[0])
            .map(|r| {
                (0..s[1])
                    .map(|c| t.double_value(&[r, c]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn completions_land_in_the_shifted_layout() {
        let b = pack(
            &[
                sample(&[1, 2, 3], &[7, 8], 0.5, true),
                sample(&[4], &[9, 10, 11, 12], -1.0, false),
            ],
            0,
        )
        .unwrap();
        assert_eq!(b.input_ids.size(), [2, 5]);
        assert_eq!(
            rows(&b.input_ids),
            [[1., 2., 3., 7., 8.], [4., 9., 10., 11., 12.]]
        );
        assert_eq!(rows(&b.targets), [[2., 3., 7., 8.], [9., 10., 11., 12.]]);
        // Row 0: prompt 3 -> completion at shifted positions 2, 3.
        assert_eq!(
            rows(&b.completion_mask),
            [[0., 0., 1., 1.], [1., 1., 1., 1.]]
        );
        assert_eq!(rows(&b.loss_mask), [[0., 0., 1., 1.], [0., 0., 0., 0.]]);
        let s = rows(&b.sampler_logprobs);
        assert!((s[0][2] + 0.7).abs() < 1e-6 && (s[0][3] + 0.8).abs() < 1e-6);
        assert!((s[1][0] + 0.9).abs() < 1e-6 && s[0][0] == 0.0);
        assert_eq!(Vec::<f32>::try_from(&b.advantages).unwrap(), [0.5, -1.0]);
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(pack(&[], 0).is_err());
        assert!(pack(&[sample(&[], &[1], 0.0, true)], 0).is_err());
        let mut s = sample(&[1], &[2, 3], 0.0, true);
        s.sampler_logprobs.pop();
        assert!(pack(&[s], 0)
            .unwrap_err()
            .to_string()
            .contains("1 log-probs for 2"));
    }

    #[test]
    fn even_splits() {
        assert_eq!(split_even(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_even(2, 3), vec![0..1, 1..2, 2..2]);
        assert_eq!(split_even(6, 2), vec![0..3, 3..6]);
    }

    #[test]
    fn token_budget_partitions_sort_by_length_and_cover_every_sample() {
        let lengths = [5, 30, 8, 31, 7, 6, 29, 9];
        // Longest first: 31, 30, 29 | 9, 8, 7, 6, 5 with a budget of 96.
        assert_eq!(micro_batches_needed(&lengths, 96), 2);
        assert_eq!(micro_batches_needed(&lengths, 31), 5);
        assert_eq!(
            micro_batches_needed(&lengths, 10),
            8,
            "one sample per run beyond the budget"
        );
        let parts = partition_by_tokens(&lengths, 2);
        assert_eq!(parts, vec![vec![3, 1, 6], vec![7, 2, 4, 5, 0]]);
        for n in 1..=8 {
            let parts = partition_by_tokens(&lengths, n);
            assert_eq!(parts.len(), n);
            let mut all: Vec<usize> = parts.concat();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
            assert!(parts.iter().all(|p| !p.is_empty()));
        }
        // Sorting by length packs less padding than the even split in input order.
        let even: usize = split_even(8, 2)
            .into_iter()
            .map(|r| padded(&lengths, &r.collect::<Vec<_>>()))
            .sum();
        let sorted: usize = partition_by_tokens(&lengths, 2)
            .iter()
            .map(|p| padded(&lengths, p))
            .sum();
        assert!(sorted < even, "{sorted} vs {even}");
    }

    #[test]
    fn prompt_units_keep_runs_whole_and_split_only_beyond_the_budget() {
        let s: Vec<Sample> = [(&[1, 2][..], 4), (&[1, 2], 2), (&[5], 3), (&[1, 2], 5)]
            .iter()
            .map(|(p, c)| sample(p, &vec![9; *c], 0.0, true))
            .collect();
        // A row forwards a completion's tokens but its last. Runs: samples 0-1 (2 + 3 +
        // 1), 2 (1 + 2), 3 (2 + 4: equal prompt, not adjacent).
        let units = PromptUnits::new(&s, 100);
        assert_eq!(units.lengths(), [6, 3, 6]);
        // A budget of 5 cuts the first run after its first completion.
        assert_eq!(PromptUnits::new(&s, 5).lengths(), [5, 3, 3, 6]);
        // Longest first: units 0 and 2 (6 tokens each) share a micro-batch, unit 1 alone.
        let plan = units.clone().partition(&s, 2);
        assert_eq!(plan, vec![vec![0, 1, 3], vec![2]]);
        // More parts than units: the run with most samples is halved.
        let plan = units.partition(&s, 4);
        assert_eq!(plan.len(), 4);
        let mut all = plan.concat();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3]);
    }
}
