//! Held-out evaluation through the rollout workers (the MATH-500-style accuracy check):
//! every prompt gets one greedy completion and `eval_num_generations` sampled ones at
//! the training temperature, scored by the accuracy reward. Prompts whose gold answer
//! cannot be parsed are left out and counted.
use crate::error::{Context, Result};

use super::config::GrpoConfig;
use crate::data::PromptExample;
use crate::rewards::{build_reward_functions, RewardFunction, RewardInput};
use crate::rollout::{PromptJob, RolloutClient, RolloutGroup};

/// The held-out prompts and the accuracy reward.
pub struct EvalSet {
    examples: Vec<PromptExample>,
    accuracy: Box<dyn RewardFunction>,
}

/// Accuracy sums over some prompts; summed over ranks, then turned into means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    /// Greedy accuracy summed over scorable prompts.
    pub greedy_sum: f64,
    /// Sampled accuracy summed over the completions of scorable prompts.
    pub sampled_sum: f64,
    pub sampled_count: f64,
    pub prompts: f64,
    pub unscorable: f64,
}

impl EvalSums {
    pub fn to_array(&self) -> [f32; 5] {
        [
            self.greedy_sum as f32,
            self.sampled_sum as f32,
            self.sampled_count as f32,
            self.prompts as f32,
            self.unscorable as f32,
        ]
    }

    pub fn from_array(v: &[f32]) -> EvalSums {
        EvalSums {
            greedy_sum: v[0] as f64,
            sampled_sum: v[1] as f64,
            sampled_count: v[2] as f64,
            prompts: v[3] as f64,
            unscorable: v[4] as f64,
        }
    }

    /// Mean greedy accuracy over scorable prompts.
    pub fn greedy(&self) -> f64 {
        self.greedy_sum / self.prompts.max(1.0)
    }

    /// Mean accuracy over all sampled completions of scorable prompts.
    pub fn sampled(&self) -> f64 {
        self.sampled_sum / self.sampled_count.max(1.0)
    }
}

impl EvalSet {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn new(examples: Vec<PromptExample>, cfg: &GrpoConfig) -> Result<EvalSet> {
        let mut funcs = build_reward_functions(
            &["accuracy".to_string()],
            &cfg.rewards,
            cfg.max_completion_length,
        )
        .context("eval accuracy reward")?;
        Ok(EvalSet {
            examples,
            accuracy: funcs.remove(0),
        })
    }
}

/// Evaluates the prompts `range` of `set` at `version`.
pub fn evaluate(
    set: &EvalSet,
    range: std::ops::Range<usize>,
    client: &RolloutClient,
    rt: &tokio::runtime::Runtime,
    cfg: &GrpoConfig,
    version: u64,
) -> Result<EvalSums> {
    if range.is_empty() {
        return Ok(EvalSums::default());
    }
    let jobs = || -> Vec<PromptJob> {
        set.examples[range.clone()]
            .iter()
            .enumerate()
            .map(|(k, e)| PromptJob {
                key: k as u64,
                token_ids: e.prompt_ids.clone(),
            })
            .collect()
    };
    // Streams by global prompt index, so the sampled accuracy does not depend on the
    // world size.
    let n = cfg.eval_num_generations;
    let sampling = cfg.sampling(Some(cfg.args.seed.wrapping_add((range.start * n) as u64)));
    let greedy =
        rt.block_on(client.generate(jobs(), 1, sampling.greedy(), true, version, |_| {}))?;
    let sampled =
        rt.block_on(client.generate(jobs(), n as u32, sampling, true, version, |_| {}))?;
    let offset = range.start;
    let g_scores = score(set, offset, &greedy)?;
    let s_scores = score(set, offset, &sampled)?;
    let mut sums = EvalSums::default();
    for (g, s) in g_scores.iter().zip(&s_scores) {
        if g.is_empty() || g.iter().any(Option::is_none) || s.iter().any(Option::is_none) {
            sums.unscorable += 1.0;
            continue;
        }
        sums.prompts += 1.0;
        sums.greedy_sum += g.iter().flatten().sum::<f64>();
        sums.sampled_sum += s.iter().flatten().sum::<f64>();
        sums.sampled_count += s.len() as f64;
    }
    Ok(sums)
}

/// Accuracy of every completion, grouped by prompt.
fn score(set: &EvalSet, offset: usize, groups: &[RolloutGroup]) -> Result<Vec<Vec<Option<f64>>>> {
    let mut inputs = vec![];
    let mut sizes = vec![];
    for g in groups {
        let e = &set.examples[offset + g.key as usize];
        sizes.push(g.completions.len());
        for c in &g.completions {
            inputs.push(RewardInput {
                prompt: &e.prompt_text,
                completion: &c.text,
                completion_tokens: c.token_ids.len(),
                truncated: c.truncated(),
                group: g.key as usize,
                fields: &e.fields,
            });
        }
    }
    let scores = set.accuracy.score(&inputs)?;
    let mut out = vec![];
    let mut it = scores.into_iter();
    for n in sizes {
        out.push(it.by_ref().take(n).collect());
    }
    Ok(out)
}
