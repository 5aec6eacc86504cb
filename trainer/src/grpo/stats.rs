//! Per-step statistics of a GRPO round: each rank accumulates sums over its own groups,
//! one all-reduce makes them global, and [`RoundStats::finish`] turns them into the
//! metrics TRL logs (`reward`, `rewards/<f>/mean`, `clip_ratio/low_mean`, ...).
use tch::Tensor;

use crate::dist::{CommError, Communicator, ReduceOp};
use crate::metrics::StepLog;

/// Sums over this rank's completions; made global by [`RoundStats::all_reduce`].
#[derive(Debug, Clone, Default)]
pub struct RoundStats {
    /// Per reward function: (sum, sum of squares, scored count, unscored count).
    pub per_func: Vec<[f64; 4]>,
    /// Combined reward over included samples: sum, sum of squares, count.
    pub reward: [f64; 3],
    pub groups: f64,
    pub excluded_groups: f64,
    pub zero_std_groups: f64,
    pub completions: f64,
    pub completion_tokens: f64,
    pub truncated: f64,
    /// Largest completion (max-reduced, not summed).
    pub max_completion_tokens: f64,
    pub loss_tokens: f64,
    pub kl_sum: f64,
    pub low_clipped: f64,
    pub high_clipped: f64,
    pub region_clipped: f64,
    pub entropy_sum: f64,
    pub entropy_tokens: f64,
    pub train_tokens: f64,
    /// Prompt tokens of every completion's sample, unpadded (a prompt counts once per
    /// completion, as in the trained batch).
    pub prompt_tokens: f64,
    /// Positions of the trained micro-batches that are padding.
    pub padding_tokens: f64,
    /// Prompt tokens shared-prefix training did not forward (a prompt forwarded once
    /// per micro-batch row instead of once per completion).
    pub prompt_tokens_saved: f64,
    /// Trained groups by staleness (`[j]`: generated `j` versions before the policy).
    pub staleness: Vec<f64>,
    /// Groups dropped for being more than `max_staleness` versions old (regenerated).
    pub stale_dropped: f64,
    /// Seconds this rank waited for its groups (summed over ranks).
    pub rollout_wait: f64,
    /// Seconds of the round during which this rank had no generation running; the
    /// minimum over ranks is an upper bound of the time the workers sat idle.
    pub workers_idle: f64,
    /// Dynamic sampling: generation rounds of the step (the same on every rank, so not
    /// summed; 0 when off), and the groups dropped as flat, left over beyond the batch,
    /// and padding a batch the rounds could not fill.
    pub ds_rounds: f64,
    pub ds_dropped: f64,
    pub ds_surplus: f64,
    pub ds_padding: f64,
}

/// Sums `values` over the ranks in (nearly) f64 precision: each value travels as an f32
/// pair (rounded value + remainder), so sums keep about 48 bits of precision on backends
/// that reduce f32 only. Collective.
pub fn all_reduce_f64(comm: &mut dyn Communicator, values: &mut [f64]) -> Result<(), CommError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let hi: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    let lo: Vec<f32> = values
        .iter()
        .zip(&hi)
        .map(|(&x, &h)| (x - h as f64) as f32)
        .collect();
    let mut t = Tensor::from_slice(&[hi, lo].concat());
    comm.all_reduce(&mut t, ReduceOp::Sum)?;
    let v: Vec<f32> = Vec::try_from(&t).map_err(|source| CommError::Torch {
        op: "all_reduce_f64",
        source,
    })?;
    let n = values.len();
    for (i, x) in values.iter_mut().enumerate() {
        *x = v[i] as f64 + v[n + i] as f64;
    }
    Ok(())
}

impl RoundStats {
    pub fn new(num_funcs: usize, max_staleness: usize) -> RoundStats {
        RoundStats {
            per_func: vec![[0.0; 4]; num_funcs],
            staleness: vec![0.0; max_staleness + 1],
            ..RoundStats::default()
        }
    }

    /// Adds one micro-batch's loss statistics.
    pub fn add_loss(&mut self, s: &super::loss::LossStats) {
        self.loss_tokens += s.tokens;
        self.kl_sum += s.kl_sum;
        self.low_clipped += s.low_clipped;
        self.high_clipped += s.high_clipped;
        self.region_clipped += s.region_clipped;
    }

    fn flat(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.per_func.iter().flatten().copied().collect();
        v.extend(self.reward);
        v.extend([
            self.groups,
            self.excluded_groups,
            self.zero_std_groups,
            self.completions,
            self.completion_tokens,
            self.truncated,
            self.loss_tokens,
            self.kl_sum,
            self.low_clipped,
            self.high_clipped,
            self.region_clipped,
            self.entropy_sum,
            self.entropy_tokens,
            self.train_tokens,
            self.prompt_tokens,
            self.padding_tokens,
            self.prompt_tokens_saved,
            self.stale_dropped,
            self.rollout_wait,
            self.ds_dropped,
            self.ds_surplus,
            self.ds_padding,
        ]);
        v.extend(&self.staleness);
        v
    }

    fn set_flat(&mut self, v: &[f64]) {
        let n = self.per_func.len();
        for (i, f) in self.per_func.iter_mut().enumerate() {
            f.copy_from_slice(&v[4 * i..4 * i + 4]);
        }
        let mut it = v[4 * n..].iter().copied();
        let mut next = || it.next().expect("layout matches flat()");
        self.reward = [next(), next(), next()];
        self.groups = next();
        self.excluded_groups = next();
        self.zero_std_groups = next();
        self.completions = next();
        self.completion_tokens = next();
        self.truncated = next();
        self.loss_tokens = next();
        self.kl_sum = next();
        self.low_clipped = next();
        self.high_clipped = next();
        self.region_clipped = next();
        self.entropy_sum = next();
        self.entropy_tokens = next();
        self.train_tokens = next();
        self.prompt_tokens = next();
        self.padding_tokens = next();
        self.prompt_tokens_saved = next();
        self.stale_dropped = next();
        self.rollout_wait = next();
        self.ds_dropped = next();
        self.ds_surplus = next();
        self.ds_padding = next();
        for x in &mut self.staleness {
            *x = next();
        }
    }

    /// Sums every field over the ranks (the maximum for `max_completion_tokens`, the
    /// minimum for `workers_idle`). Collective.
    pub fn all_reduce(&mut self, comm: &mut dyn Communicator) -> Result<(), CommError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let mut flat = self.flat();
        all_reduce_f64(comm, &mut flat)?;
        self.set_flat(&flat);
        let mut m =
            Tensor::from_slice(&[self.max_completion_tokens as f32, -self.workers_idle as f32]);
        comm.all_reduce(&mut m, ReduceOp::Max)?;
        self.max_completion_tokens = m.double_value(&[0]);
        self.workers_idle = -m.double_value(&[1]);
        Ok(())
    }

    /// The TRL-named metrics of the (global) sums.
    pub fn finish(&self, func_names: &[String], log: &mut StepLog) {
        let mean_std = |s: f64, sq: f64, n: f64| {
            if n < 1.0 {
                return (0.0, 0.0);
            }
            let mean = s / n;
            // Unbiased, as torch.std.
            let var = if n > 1.0 {
                ((sq - n * mean * mean) / (n - 1.0)).max(0.0)
            } else {
                0.0
            };
            (mean, var.sqrt())
        };
        let [s, sq, n] = self.reward;
        let (mean, std) = mean_std(s, sq, n);
        log.insert("reward".into(), mean);
        log.insert("reward_std".into(), std);
        for (name, [s, sq, n, unscored]) in func_names.iter().zip(&self.per_func) {
            let (mean, std) = mean_std(*s, *sq, *n);
            log.insert(format!("rewards/{name}/mean"), mean);
            log.insert(format!("rewards/{name}/std"), std);
            log.insert(format!("rewards/{name}/unscored"), *unscored);
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let included = self.groups - self.excluded_groups;
        log.insert(
            "frac_reward_zero_std".into(),
            ratio(self.zero_std_groups, included),
        );
        log.insert("groups/excluded".into(), self.excluded_groups);
        log.insert(
            "completions/mean_length".into(),
            ratio(self.completion_tokens, self.completions),
        );
        log.insert("completions/max_length".into(), self.max_completion_tokens);
        log.insert(
            "completions/clipped_ratio".into(),
            ratio(self.truncated, self.completions),
        );
        log.insert("kl".into(), ratio(self.kl_sum, self.loss_tokens));
        log.insert(
            "clip_ratio/low_mean".into(),
            ratio(self.low_clipped, self.loss_tokens),
        );
        log.insert(
            "clip_ratio/high_mean".into(),
            ratio(self.high_clipped, self.loss_tokens),
        );
        log.insert(
            "clip_ratio/region_mean".into(),
            ratio(self.region_clipped, self.loss_tokens),
        );
        log.insert(
            "entropy".into(),
            ratio(self.entropy_sum, self.entropy_tokens),
        );
        // Unpadded token counts of the step (TRL's `num_tokens` is their running sum).
        log.insert("tokens/prompt".into(), self.prompt_tokens);
        log.insert("tokens/completion".into(), self.completion_tokens);
        log.insert(
            "tokens/padding_share".into(),
            ratio(self.padding_tokens, self.train_tokens),
        );
        // Share of the prompt tokens not forwarded (0 with shared-prefix training off).
        log.insert(
            "tokens/prompt_saved_share".into(),
            ratio(self.prompt_tokens_saved, self.prompt_tokens),
        );
        let trained: f64 = self.staleness.iter().sum();
        let weighted: f64 = self
            .staleness
            .iter()
            .enumerate()
            .map(|(j, c)| j as f64 * c)
            .sum();
        log.insert("staleness/mean".into(), ratio(weighted, trained));
        let max = self.staleness.iter().rposition(|c| *c > 0.0).unwrap_or(0);
        log.insert("staleness/max".into(), max as f64);
        for (j, c) in self.staleness.iter().enumerate() {
            log.insert(format!("staleness/frac_{j}"), ratio(*c, trained));
        }
        log.insert("groups/stale_dropped".into(), self.stale_dropped);
        if self.ds_rounds > 0.0 {
            log.insert("dynamic_sampling/rounds".into(), self.ds_rounds);
            log.insert("dynamic_sampling/dropped_groups".into(), self.ds_dropped);
            log.insert("dynamic_sampling/surplus_groups".into(), self.ds_surplus);
            log.insert("dynamic_sampling/padding_groups".into(), self.ds_padding);
            log.insert(
                "dynamic_sampling/filled".into(),
                f64::from(u8::from(self.ds_padding == 0.0)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_layout_round_trips_and_metrics_follow_the_sums() {
        let mut s = RoundStats::new(2, 1);
        s.staleness = vec![3.0, 1.0];
        s.per_func = vec![[3.0, 5.0, 4.0, 1.0], [1.0, 1.0, 4.0, 0.0]];
        s.reward = [2.0, 2.0, 4.0];
        s.groups = 2.0;
        s.zero_std_groups = 1.0;
        s.completions = 4.0;
        s.completion_tokens = 40.0;
        s.truncated = 1.0;
        s.loss_tokens = 20.0;
        s.low_clipped = 2.0;
        s.prompt_tokens = 24.0;
        s.ds_dropped = 3.0;
        s.ds_padding = 1.0;
        let mut t = RoundStats::new(2, 1);
        t.set_flat(&s.flat());
        assert_eq!(t.flat(), s.flat());
        let mut log = StepLog::new();
        s.finish(&["accuracy".into(), "format".into()], &mut log);
        assert_eq!(log["reward"], 0.5);
        // rewards 1,1,0,0: unbiased std = sqrt(1/3).
        assert!((log["reward_std"] - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(log["rewards/accuracy/mean"], 0.75);
        assert_eq!(log["rewards/accuracy/unscored"], 1.0);
        assert_eq!(log["frac_reward_zero_std"], 0.5);
        assert_eq!(log["completions/mean_length"], 10.0);
        assert_eq!(log["completions/clipped_ratio"], 0.25);
        assert_eq!(log["clip_ratio/low_mean"], 0.1);
        assert_eq!(log["tokens/prompt"], 24.0);
        assert_eq!(log["tokens/completion"], 40.0);
        assert_eq!(log["staleness/mean"], 0.25);
        assert_eq!(log["staleness/max"], 1.0);
        assert_eq!(log["staleness/frac_0"], 0.75);
        assert!(
            !log.contains_key("dynamic_sampling/rounds"),
            "dynamic sampling off"
        );
        s.ds_rounds = 2.0;
        s.finish(&["accuracy".into(), "format".into()], &mut log);
        assert_eq!(log["dynamic_sampling/rounds"], 2.0);
        assert_eq!(log["dynamic_sampling/dropped_groups"], 3.0);
        assert_eq!(log["dynamic_sampling/filled"], 0.0);
    }
}
