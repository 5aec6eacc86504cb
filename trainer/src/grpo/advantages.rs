//! Rewards to advantages: the weighted sum of reward functions per completion, then the
//! group-relative normalisation of GRPO.
//!
//! Pure `f64` host math (no tensors): rewards come from host-side reward functions and
//! number `groups * num_generations` per step, so there is nothing to gain from a device.
//!
//! The formulas follow TRL's `GRPOTrainer`:
//!
//! ```text
//! reward_i      = Σ_f w_f · r_{f,i}
//! A_i           = (reward_i − mean_g) / (std + 1e-4)      (g = the group of sample i)
//! ```
//!
//! where `mean_g` is the plain mean of the group and `std` depends on [`ScaleRewards`]:
//! the group's unbiased standard deviation (Bessel's correction, `n − 1` in the
//! denominator, as `torch.std`), the unbiased standard deviation of the whole batch, or
//! no scaling at all (`A_i = reward_i − mean_g`).

use serde::{Deserialize, Serialize};

use crate::dist::CommError;

/// Why rewards could not be turned into advantages.
#[derive(Debug, thiserror::Error)]
pub enum AdvantageError {
    /// `input` (rewards, weights, scores, num_generations) does not fit: `message` says how.
    #[error("{message}")]
    Input {
        input: &'static str,
        message: String,
    },
    /// A `scale_rewards` value that is not one of the allowed names.
    #[error("scale_rewards {value:?} is not one of group, batch, none, true, false")]
    ScaleRewards { value: String },
    /// Summing the batch's reward moments over the ranks failed.
    #[error("reducing the batch reward moments over ranks: {0}")]
    Reduce(#[from] CommError),
}

fn input(input: &'static str, message: impl Into<String>) -> AdvantageError {
    AdvantageError::Input {
        input,
        message: message.into(),
    }
}

/// Added to the standard deviation before dividing, so that a group whose completions
/// all got the same reward yields zero advantages instead of a division by zero (TRL's
/// constant).
pub const STD_EPS: f64 = 1e-4;

/// A standard deviation at or below this counts as zero in
/// [`Advantages::zero_std_groups`] (the absolute tolerance of `torch.isclose`, which TRL
/// uses for its `frac_reward_zero_std` metric). Rounding in the mean of equal rewards
/// leaves a std of order 1e-17, not exactly zero.
pub const ZERO_STD_TOL: f64 = 1e-8;

/// Which standard deviation divides the centred rewards (TRL's `scale_rewards`; as in
/// TRL, `true` means `group` and `false` means `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", try_from = "ScaleRewardsValue")]
pub enum ScaleRewards {
    /// Each group's own unbiased std (the GRPO paper).
    #[default]
    Group,
    /// One unbiased std over the whole batch (all groups together), which keeps the
    /// relative scale of groups with little spread ("Tricks or Traps", Liu et al. 2025).
    Batch,
    /// No division: advantages are the centred rewards (Dr. GRPO).
    None,
}

/// `scale_rewards` as written: a name or TRL's booleans.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScaleRewardsValue {
    Bool(bool),
    Name(String),
}

impl TryFrom<ScaleRewardsValue> for ScaleRewards {
    type Error = AdvantageError;
    fn try_from(v: ScaleRewardsValue) -> Result<Self, AdvantageError> {
        match v {
            ScaleRewardsValue::Bool(true) => Ok(ScaleRewards::Group),
            ScaleRewardsValue::Bool(false) => Ok(ScaleRewards::None),
            ScaleRewardsValue::Name(n) => match n.as_str() {
                "group" | "true" => Ok(ScaleRewards::Group),
                "batch" => Ok(ScaleRewards::Batch),
                "none" | "false" => Ok(ScaleRewards::None),
                other => Err(AdvantageError::ScaleRewards {
                    value: other.into(),
                }),
            },
        }
    }
}

/// Per-sample advantages and the per-group statistics they were computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// `[groups * num_generations]`: the advantage of each sample, in input order.
    pub values: Vec<f64>,
    /// `[groups]`: each group's mean reward.
    pub group_mean: Vec<f64>,
    /// `[groups]`: each group's unbiased reward std (0 for a group of one), whatever the
    /// scaling: it is reported so callers can log the spread within prompts.
    pub group_std: Vec<f64>,
    /// Number of groups whose std is at most [`ZERO_STD_TOL`]: all their completions got
    /// the same reward, so all their advantages are zero and they teach nothing. Counted
    /// from the group std under every scaling (TRL counts from the batch std when scaling
    /// by batch, which only tells whether the whole batch is flat).
    pub zero_std_groups: usize,
}

/// Mean and unbiased std (`n − 1` denominator) of `x`; the std of fewer than two values
/// is undefined (`torch.std` gives NaN) and is returned as 0 here, so a lone sample gets
/// a zero advantage rather than poisoning the step.
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let ss: f64 = x.iter().map(|v| (v - mean) * (v - mean)).sum();
    (mean, (ss / (n - 1) as f64).sqrt())
}

/// Group-relative advantages of GRPO.
///
/// `rewards` holds `groups * num_generations` values, the completions of one prompt
/// contiguous (`rewards[g*G .. (g+1)*G]` is group `g`). Each advantage is
/// `(r − mean_g) / (std + 1e-4)` with `mean_g` the group mean and `std`:
///
/// - [`ScaleRewards::Group`]: the unbiased std of the group (`Σ(r − mean_g)² / (G − 1)`),
/// - [`ScaleRewards::Batch`]: the unbiased std of all rewards around the batch mean,
/// - [`ScaleRewards::None`]: no division at all (`A = r − mean_g`).
///
/// With `num_generations == 1` (or a batch of one sample for `Batch`) the std is
/// undefined; it is taken as 0, and the advantages are 0 anyway because every sample
/// equals its group mean. An empty `rewards` gives empty results.
///
/// Errors if `num_generations` is 0, `rewards.len()` is not a multiple of it, or a
/// reward is not finite (the message names the index).
pub fn group_advantages(
    rewards: &[f64],
    num_generations: usize,
    scale: ScaleRewards,
) -> Result<Advantages, AdvantageError> {
    if num_generations == 0 {
        return Err(input(
            "num_generations",
            "num_generations must be at least 1, got 0",
        ));
    }
    if !rewards.len().is_multiple_of(num_generations) {
        return Err(input(
            "rewards",
            format!(
                "rewards has {} values, not a multiple of num_generations = {num_generations} \
             (expected groups * num_generations, each group contiguous)",
                rewards.len()
            ),
        ));
    }
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(input("rewards", format!("reward {i} is not finite: {r}")));
    }
    let groups = rewards.len() / num_generations;
    let mut group_mean = Vec::with_capacity(groups);
    let mut group_std = Vec::with_capacity(groups);
    for chunk in rewards.chunks_exact(num_generations) {
        let (m, s) = mean_std(chunk);
        group_mean.push(m);
        group_std.push(s);
    }
    let zero_std_groups = group_std.iter().filter(|s| **s <= ZERO_STD_TOL).count();
    let batch_std = mean_std(rewards).1;
    let values = rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let g = i / num_generations;
            let centred = r - group_mean[g];
            match scale {
                ScaleRewards::Group => centred / (group_std[g] + STD_EPS),
                ScaleRewards::Batch => centred / (batch_std + STD_EPS),
                ScaleRewards::None => centred,
            }
        })
        .collect();
    Ok(Advantages {
        values,
        group_mean,
        group_std,
        zero_std_groups,
    })
}

/// The total reward of each sample: `Σ_f w_f · r_{f,i}` over the reward functions.
///
/// `per_func[f][i]` is function `f`'s reward for sample `i`; `None` means the function
/// could not score the sample (an unparseable gold answer, say). A sample with `None`
/// from any function of non-zero weight gets `None` (the caller excludes it rather than
/// training on a partial score); a function of weight 0 is ignored entirely, `None` or
/// not. This differs from TRL, whose `nansum` counts a missing reward as 0.
///
/// Errors if there is no reward function, `weights` and `per_func` differ in length, the
/// functions scored different numbers of samples, a weight is not finite, or a function
/// of non-zero weight returned a non-finite reward (messages name the function and sample).
pub fn combine_rewards(
    per_func: &[Vec<Option<f64>>],
    weights: &[f64],
) -> Result<Vec<Option<f64>>, AdvantageError> {
    if per_func.is_empty() {
        return Err(input("scores", "no reward functions: per_func is empty"));
    }
    if per_func.len() != weights.len() {
        return Err(input(
            "reward_weights",
            format!(
                "{} reward functions but {} reward weights",
                per_func.len(),
                weights.len()
            ),
        ));
    }
    if let Some((f, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(input(
            "reward_weights",
            format!("reward weight {f} is not finite: {w}"),
        ));
    }
    let n = per_func[0].len();
    if let Some((f, v)) = per_func.iter().enumerate().find(|(_, v)| v.len() != n) {
        return Err(input(
            "scores",
            format!(
                "reward function {f} scored {} samples, function 0 scored {n}",
                v.len()
            ),
        ));
    }
    for (f, v) in per_func
        .iter()
        .enumerate()
        .filter(|(f, _)| weights[*f] != 0.0)
    {
        if let Some((i, r)) = v
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.filter(|r| !r.is_finite()).map(|r| (i, r)))
        {
            return Err(input(
                "scores",
                format!("reward function {f} returned a non-finite reward {r} for sample {i}"),
            ));
        }
    }
    Ok((0..n)
        .map(|i| {
            per_func
                .iter()
                .zip(weights)
                .filter(|(_, w)| **w != 0.0)
                .try_fold(0.0, |acc, (v, w)| v[i].map(|r| acc + w * r))
        })
        .collect())
}

/// Moments of the included rewards of a batch: what ranks add up to get one std over
/// the global batch (`scale_rewards = batch`). Plain `f64` sums, reduced across ranks in
/// `f64` by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewardMoments {
    pub count: f64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl RewardMoments {
    /// The moments of the rewards of groups not `excluded` (`rewards` holds
    /// `excluded.len() * num_generations` values, groups contiguous).
    pub fn of(rewards: &[f64], num_generations: usize, excluded: &[bool]) -> Self {
        let mut m = RewardMoments::default();
        for (rs, _) in rewards
            .chunks(num_generations.max(1))
            .zip(excluded)
            .filter(|(_, ex)| !**ex)
        {
            for &r in rs {
                m.count += 1.0;
                m.sum += r;
                m.sum_sq += r * r;
            }
        }
        m
    }

    /// Unbiased std (`n − 1`), 0 for fewer than two rewards.
    pub fn std(&self) -> f64 {
        if self.count <= 1.0 {
            return 0.0;
        }
        let mean = self.sum / self.count;
        ((self.sum_sq - self.count * mean * mean) / (self.count - 1.0))
            .max(0.0)
            .sqrt()
    }
}

/// One rank's advantages for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAdvantages {
    /// `[groups * num_generations]`; zero for every sample of an excluded group.
    pub values: Vec<f64>,
    /// Included groups whose rewards are all equal (std at most [`ZERO_STD_TOL`]).
    pub zero_std_groups: usize,
    /// `[groups]`: which groups those are (a rank counts those it owns when groups span
    /// ranks).
    pub zero_std: Vec<bool>,
}

/// Group-relative advantages of one rank's groups, where some groups are `excluded`
/// (left out of the loss: their advantages are 0 and they neither count as zero-std nor
/// enter the batch std).
///
/// `Group` and `None` scaling are per group ([`group_advantages`]). `Batch` divides the
/// centred rewards by the unbiased std of every included reward of the *global* batch,
/// as TRL does after gathering: `reduce` turns this rank's [`RewardMoments`] into the sum
/// over all ranks (the identity on one rank).
pub fn step_advantages(
    rewards: &[f64],
    excluded: &[bool],
    num_generations: usize,
    scale: ScaleRewards,
    reduce: impl FnOnce(RewardMoments) -> Result<RewardMoments, CommError>,
) -> Result<StepAdvantages, AdvantageError> {
    if excluded.len() * num_generations != rewards.len() {
        return Err(input(
            "rewards",
            format!(
                "{} rewards for {} groups of num_generations = {num_generations}",
                rewards.len(),
                excluded.len()
            ),
        ));
    }
    let per_group = if scale == ScaleRewards::Batch {
        ScaleRewards::None
    } else {
        scale
    };
    let local = group_advantages(rewards, num_generations, per_group)?;
    let mut values = local.values;
    if scale == ScaleRewards::Batch {
        let global = reduce(RewardMoments::of(rewards, num_generations, excluded))?;
        let std = global.std();
        for v in &mut values {
            *v /= std + STD_EPS;
        }
    }
    let mut zero_std = vec![false; excluded.len()];
    for (g, ex) in excluded.iter().enumerate() {
        if *ex {
            values[g * num_generations..(g + 1) * num_generations].fill(0.0);
        } else if local.group_std[g] <= ZERO_STD_TOL {
            zero_std[g] = true;
        }
    }
    Ok(StepAdvantages {
        values,
        zero_std_groups: zero_std.iter().filter(|z| **z).count(),
        zero_std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * (1.0 + b.abs())
    }

    #[test]
    fn group_scaling_by_hand() {
        // Group 0: [1, 2, 3] mean 2, unbiased std 1. Group 1: [0, 0, 6] mean 2, std √12.
        let a = group_advantages(&[1.0, 2.0, 3.0, 0.0, 0.0, 6.0], 3, ScaleRewards::Group).unwrap();
        assert_eq!(a.group_mean, vec![2.0, 2.0]);
        assert!(close(a.group_std[0], 1.0));
        assert!(close(a.group_std[1], 12f64.sqrt()));
        let s1 = 12f64.sqrt() + STD_EPS;
        let want = [
            -1.0 / 1.0001,
            0.0,
            1.0 / 1.0001,
            -2.0 / s1,
            -2.0 / s1,
            4.0 / s1,
        ];
        for (got, want) in a.values.iter().zip(want) {
            assert!(close(*got, want), "{got} vs {want}");
        }
        assert_eq!(a.zero_std_groups, 0);
    }

    #[test]
    fn batch_and_none_scaling() {
        let r = [1.0, 2.0, 3.0, 0.0, 0.0, 6.0];
        // Batch mean 2, Σ(r−2)² = 1+0+1+4+4+16 = 26, unbiased std √(26/5).
        let b = group_advantages(&r, 3, ScaleRewards::Batch).unwrap();
        let s = (26.0f64 / 5.0).sqrt() + STD_EPS;
        assert!(close(b.values[0], -1.0 / s));
        assert!(close(b.values[5], 4.0 / s));
        // group_std is still per group.
        assert!(close(b.group_std[0], 1.0));
        let n = group_advantages(&r, 3, ScaleRewards::None).unwrap();
        assert_eq!(n.values, vec![-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]);
    }

    #[test]
    fn equal_rewards_give_zero_advantages_and_count_as_zero_std() {
        // 0.1 * 3 / 3 is not exactly 0.1 in floating point: the tolerance matters.
        let r = [0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.7, 0.7, 0.7];
        for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            let a = group_advantages(&r, 3, scale).unwrap();
            assert_eq!(a.zero_std_groups, 2, "{scale:?}");
            for i in [0, 1, 2, 6, 7, 8] {
                assert!(a.values[i].abs() < 1e-10, "{scale:?} {i}: {}", a.values[i]);
            }
            assert!(a.values[3] > 0.0 && a.values[4] < 0.0);
        }
    }

    #[test]
    fn single_generation_groups_are_zero() {
        let a = group_advantages(&[3.0, -1.0, 7.0], 1, ScaleRewards::Group).unwrap();
        assert_eq!(a.values, vec![0.0, 0.0, 0.0]);
        assert_eq!(a.group_std, vec![0.0, 0.0, 0.0]);
        assert_eq!(a.zero_std_groups, 3);
        let b = group_advantages(&[3.0], 1, ScaleRewards::Batch).unwrap();
        assert_eq!(b.values, vec![0.0]);
    }

    #[test]
    fn empty_rewards_give_empty_results() {
        let a = group_advantages(&[], 4, ScaleRewards::Group).unwrap();
        assert!(a.values.is_empty() && a.group_mean.is_empty() && a.zero_std_groups == 0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let e = group_advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple of num_generations = 2"), "{e}");
        let e = group_advantages(&[1.0], 0, ScaleRewards::Group)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_generations"), "{e}");
        let e = group_advantages(&[1.0, f64::NAN], 2, ScaleRewards::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reward 1 is not finite"), "{e}");
    }

    #[test]
    fn combine_weighted_sum() {
        let per_func = vec![vec![Some(1.0), Some(0.0)], vec![Some(0.5), Some(2.0)]];
        let got = combine_rewards(&per_func, &[1.0, 0.5]).unwrap();
        assert_eq!(got, vec![Some(1.25), Some(1.0)]);
    }

    #[test]
    fn combine_none_excludes_unless_weight_is_zero() {
        let per_func = vec![
            vec![Some(1.0), None, Some(1.0)],
            vec![Some(2.0), Some(2.0), None],
        ];
        // Both weighted: a None anywhere excludes the sample.
        let got = combine_rewards(&per_func, &[1.0, 1.0]).unwrap();
        assert_eq!(got, vec![Some(3.0), None, None]);
        // Function 1 has weight 0: its None no longer matters, nor do its values.
        let got = combine_rewards(&per_func, &[2.0, 0.0]).unwrap();
        assert_eq!(got, vec![Some(2.0), None, Some(2.0)]);
        // Negative weights are allowed (penalties).
        let got = combine_rewards(&per_func, &[0.0, -1.0]).unwrap();
        assert_eq!(got, vec![Some(-2.0), Some(-2.0), None]);
    }

    #[test]
    fn combine_errors() {
        assert!(combine_rewards(&[], &[])
            .unwrap_err()
            .to_string()
            .contains("no reward functions"));
        let per_func = vec![vec![Some(1.0)], vec![Some(1.0), Some(2.0)]];
        let e = combine_rewards(&per_func, &[1.0, 1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("function 1 scored 2 samples"), "{e}");
        let e = combine_rewards(&per_func[..1], &[1.0, 1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 reward functions but 2 reward weights"), "{e}");
        let e = combine_rewards(&per_func[..1], &[f64::INFINITY])
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight 0 is not finite"), "{e}");
        let e = combine_rewards(&[vec![Some(1.0), Some(f64::NAN)]], &[1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite reward NaN for sample 1"), "{e}");
        // ... unless the function has weight 0.
        let per_func = vec![vec![Some(1.0), Some(2.0)], vec![Some(f64::NAN), None]];
        assert_eq!(
            combine_rewards(&per_func, &[1.0, 0.0]).unwrap(),
            vec![Some(1.0), Some(2.0)]
        );
    }

    #[test]
    fn step_advantages_exclude_groups_and_scale_by_the_global_batch_std() {
        // Two groups of 3 on this rank; the second is excluded.
        let rewards = [1.0, 0.0, 0.0, 5.0, 5.0, 7.0];
        let excluded = [false, true];
        let a = step_advantages(&rewards, &excluded, 3, ScaleRewards::Group, Ok).unwrap();
        assert_eq!(&a.values[3..], &[0.0, 0.0, 0.0]);
        assert_eq!(a.zero_std_groups, 0);
        // Another rank contributed rewards 1, 1, 1 (a zero-std group there).
        let other = RewardMoments::of(&[1.0, 1.0, 1.0], 3, &[false]);
        let a = step_advantages(&rewards, &excluded, 3, ScaleRewards::Batch, |m| {
            assert_eq!(m.count, 3.0, "excluded groups stay out of the batch std");
            Ok(RewardMoments {
                count: m.count + other.count,
                sum: m.sum + other.sum,
                sum_sq: m.sum_sq + other.sum_sq,
            })
        })
        .unwrap();
        // Global included rewards 1,0,0,1,1,1: mean 2/3, unbiased var = (6*(1/9)... ) computed directly.
        let all = [1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mean = all.iter().sum::<f64>() / 6.0;
        let std = (all.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
        let expect = (1.0 - 1.0 / 3.0) / (std + STD_EPS);
        assert!(
            (a.values[0] - expect).abs() < 1e-12,
            "{} vs {expect}",
            a.values[0]
        );
        let flat = step_advantages(
            &[2.0, 2.0, 1.0, 3.0],
            &[false, false],
            2,
            ScaleRewards::None,
            Ok,
        )
        .unwrap();
        assert_eq!(flat.zero_std_groups, 1);
        assert!(step_advantages(&rewards, &[false], 3, ScaleRewards::Group, Ok).is_err());
    }
}
