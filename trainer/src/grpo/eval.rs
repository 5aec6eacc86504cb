//! Held-out evaluation through the rollout workers (the MATH-500-style accuracy check):
//! every prompt gets one greedy completion and `eval_num_generations` sampled ones at
//! the training temperature, scored by the accuracy reward. Prompts whose gold answer
//! cannot be parsed are left out and counted.
use anyhow::{anyhow, Result};
use proto::v1 as pb;

use super::config::GrpoConfig;
use crate::data::PromptExample;
use crate::rewards::{build_reward_functions, RewardFunction, RewardInput};
use crate::rollout::{PromptJob, RolloutClient, RolloutGroup};

/// The held-out prompts and the accuracy reward.
pub struct EvalSet {
    examples: Vec<PromptExample>,
    accuracy: Box<dyn RewardFunction>,
}

/// Mean accuracy, greedy and sampled, over the scorable prompts.
#[derive(Debug, Clone, Copy)]
pub struct EvalResult {
    pub greedy: f64,
    pub sampled: f64,
    pub prompts: usize,
    pub unscorable: usize,
}

impl EvalSet {
    pub fn new(examples: Vec<PromptExample>, cfg: &GrpoConfig) -> Result<EvalSet> {
        let mut funcs = build_reward_functions(
            &["accuracy".to_string()],
            &cfg.rewards,
            cfg.max_completion_length,
        )
        .map_err(|e| anyhow!("eval accuracy reward: {e}"))?;
        Ok(EvalSet {
            examples,
            accuracy: funcs.remove(0),
        })
    }
}

/// Runs the evaluation at `version` (called on one rank).
pub fn evaluate(
    set: &EvalSet,
    client: &RolloutClient,
    rt: &tokio::runtime::Runtime,
    cfg: &GrpoConfig,
    version: u64,
) -> Result<EvalResult> {
    let jobs = || -> Vec<PromptJob> {
        set.examples
            .iter()
            .enumerate()
            .map(|(k, e)| PromptJob {
                key: k as u64,
                token_ids: e.prompt_ids.clone(),
            })
            .collect()
    };
    let base = pb::SamplingParams {
        max_new_tokens: cfg.max_completion_length as u32,
        seed: Some(cfg.args.seed),
        ..Default::default()
    };
    let greedy = rt.block_on(client.generate(
        jobs(),
        1,
        pb::SamplingParams {
            temperature: Some(0.0),
            ..base.clone()
        },
        true,
        version,
        |_| {},
    ))?;
    let sampled = rt.block_on(client.generate(
        jobs(),
        cfg.eval_num_generations as u32,
        pb::SamplingParams {
            temperature: Some(cfg.temperature),
            top_p: Some(cfg.top_p),
            top_k: cfg.top_k,
            min_p: cfg.min_p,
            ..base
        },
        true,
        version,
        |_| {},
    ))?;
    let (g_scores, _) = score(set, &greedy)?;
    let (s_scores, _) = score(set, &sampled)?;
    let mut unscorable = 0;
    let (mut g_sum, mut s_sum, mut s_n, mut prompts) = (0.0, 0.0, 0usize, 0usize);
    for (k, g) in g_scores.iter().enumerate() {
        let s = &s_scores[k];
        if g.is_empty() || g.iter().any(Option::is_none) || s.iter().any(Option::is_none) {
            unscorable += 1;
            continue;
        }
        prompts += 1;
        g_sum += g.iter().flatten().sum::<f64>();
        s_sum += s.iter().flatten().sum::<f64>();
        s_n += s.len();
    }
    Ok(EvalResult {
        greedy: g_sum / prompts.max(1) as f64,
        sampled: s_sum / s_n.max(1) as f64,
        prompts,
        unscorable,
    })
}

/// Accuracy of every completion, grouped by prompt.
fn score(set: &EvalSet, groups: &[RolloutGroup]) -> Result<(Vec<Vec<Option<f64>>>, usize)> {
    let mut inputs = vec![];
    let mut sizes = vec![];
    for g in groups {
        let e = &set.examples[g.key as usize];
        sizes.push(g.completions.len());
        for c in &g.completions {
            inputs.push(RewardInput {
                prompt: &e.prompt_text,
                completion: &c.text,
                completion_tokens: c.token_ids.len(),
                truncated: c.finish_reason == pb::FinishReason::Length as i32,
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
    Ok((out, inputs.len()))
}
