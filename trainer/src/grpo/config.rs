//! The `trainer grpo` configuration. Field names are TRL's `GRPOConfig` names wherever
//! the concept is the same; docs/configuration.md is the reference.
use serde::{Deserialize, Serialize};

use super::advantages::ScaleRewards;
use super::loss::{LossType, PolicyLossConfig};
use crate::data::DatasetConfig;
use crate::rewards::RewardsConfig;
use crate::rollout::{RolloutConfig, Sampling};
use crate::session::TrainingArgs;

/// Largest `max_staleness`: each round ahead holds a batch of groups in memory.
pub const MAX_STALENESS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// Completions per prompt (the group size).
    pub num_generations: usize,
    /// Prompts longer than this many tokens are unusable rows (counted, never cut).
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables (TRL: None).
    pub top_k: i64,
    /// 0 disables (TRL: None).
    pub min_p: f64,
    /// KL coefficient against the reference model (the initial policy); 0 skips it.
    pub beta: f64,
    /// Lower clip range: ratios below `1 - epsilon` are clipped.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); unset means `epsilon`.
    pub epsilon_high: Option<f64>,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps taken on each generated batch (old log-probs are recorded first).
    pub num_iterations: usize,
    /// Truncated completions (no EOS within max_completion_length) are left out of the loss.
    pub mask_truncated_completions: bool,
    /// Reweight each token by min(exp(old - sampler), cap): corrects for the workers and
    /// the trainer being different engines (TRL's names).
    pub vllm_importance_sampling_correction: bool,
    pub vllm_importance_sampling_cap: f64,
    pub reward_funcs: Vec<String>,
    /// One weight per reward function; unset gives every function weight 1.
    pub reward_weights: Option<Vec<f64>>,
    pub rewards: RewardsConfig,
    /// Held-out prompts evaluated (accuracy reward) before training, every `eval_steps`,
    /// and after the last step.
    pub eval_dataset: Option<DatasetConfig>,
    /// Evaluate every this many steps (0: only before and after).
    pub eval_steps: u64,
    /// Sampled completions per held-out prompt (at `temperature`), besides one greedy.
    pub eval_num_generations: usize,
    /// Positions per chunk when computing log-probs (peak memory `B * chunk * V`).
    pub logprob_chunk_size: i64,
    pub rollout: RolloutConfig,
    /// Rounds of rollouts requested ahead while the ranks train (TRL's AsyncGRPO
    /// `max_staleness`): every trained group is at most this many weight versions older
    /// than the policy; older ones are dropped, counted and regenerated. 0 is on-policy:
    /// generate, then train.
    pub max_staleness: usize,
    /// Dynamic micro-batches (verl's `use_dynamic_bsz` with `ppo_max_token_len_per_gpu`):
    /// a round's completions are sorted by length and cut into micro-batches of at most
    /// this many padded tokens (every rank runs as many as the rank needing most), instead
    /// of `gradient_accumulation_steps` equal-count ones. Unset: equal-count split.
    pub micro_batch_max_tokens: Option<usize>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            args: TrainingArgs {
                learning_rate: 1e-6,
                ..TrainingArgs::default()
            },
            num_generations: 8,
            max_prompt_length: 512,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            vllm_importance_sampling_correction: true,
            vllm_importance_sampling_cap: 2.0,
            reward_funcs: vec!["accuracy".into(), "format".into()],
            reward_weights: None,
            rewards: RewardsConfig::default(),
            eval_dataset: None,
            eval_steps: 0,
            eval_num_generations: 4,
            logprob_chunk_size: 512,
            rollout: RolloutConfig::default(),
            max_staleness: 0,
            micro_batch_max_tokens: None,
        }
    }
}

impl GrpoConfig {
    /// Completions each rank trains on per generation round.
    pub fn completions_per_rank(&self) -> usize {
        self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
    }

    /// Prompts each rank sends per generation round.
    pub fn prompts_per_rank(&self) -> usize {
        self.completions_per_rank() / self.num_generations.max(1)
    }

    /// How the workers sample training (and evaluation) completions, built once from
    /// the settings; `seed` picks the streams.
    pub fn sampling(&self, seed: Option<u64>) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            max_new_tokens: self.max_completion_length as u32,
            seed,
            ignore_eos: false,
        }
    }

    pub fn loss_config(&self) -> PolicyLossConfig {
        PolicyLossConfig {
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            beta: self.beta,
            loss_type: self.loss_type,
            max_completion_length: self.max_completion_length as i64,
            tis_cap: self
                .vllm_importance_sampling_correction
                .then_some(self.vllm_importance_sampling_cap),
        }
    }

    pub fn reward_weights(&self) -> Vec<f64> {
        self.reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.reward_funcs.len()])
    }

    /// Every check that needs no file or peer; errors name the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        self.args.validate()?;
        if self.num_generations < 2 {
            return Err(format!(
                "num_generations must be at least 2 (advantages compare completions of a prompt), got {}",
                self.num_generations
            ));
        }
        let per_rank = self.completions_per_rank();
        if !per_rank.is_multiple_of(self.num_generations) {
            return Err(format!(
                "per_device_train_batch_size * gradient_accumulation_steps ({per_rank}) must be a \
                 multiple of num_generations ({}) so each rank holds whole groups",
                self.num_generations
            ));
        }
        if self.max_prompt_length == 0 || self.max_completion_length == 0 {
            return Err("max_prompt_length and max_completion_length must be at least 1".into());
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(format!(
                "temperature must be > 0 for GRPO sampling, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return Err(format!(
                "top_k must be >= 0 (0 disables), got {}",
                self.top_k
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1), got {}", self.min_p));
        }
        if self.beta.is_nan() || self.beta < 0.0 {
            return Err(format!("beta must be >= 0, got {}", self.beta));
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return Err(format!("epsilon must be in (0, 1), got {}", self.epsilon));
        }
        if let Some(h) = self.epsilon_high {
            if h.is_nan() || h <= 0.0 {
                return Err(format!("epsilon_high must be > 0, got {h}"));
            }
        }
        if self.num_iterations == 0 {
            return Err("num_iterations must be at least 1".into());
        }
        if self.micro_batch_max_tokens == Some(0) {
            return Err(
                "micro_batch_max_tokens must be at least 1 (unset: equal-count micro-batches)"
                    .into(),
            );
        }
        if self.max_staleness > MAX_STALENESS {
            return Err(format!(
                "max_staleness must be in 0..={MAX_STALENESS} (rounds generated ahead), got {}",
                self.max_staleness
            ));
        }
        if self.vllm_importance_sampling_cap.is_nan() || self.vllm_importance_sampling_cap < 1.0 {
            return Err(format!(
                "vllm_importance_sampling_cap must be >= 1, got {}",
                self.vllm_importance_sampling_cap
            ));
        }
        if self.reward_funcs.is_empty() {
            return Err("reward_funcs must name at least one reward function".into());
        }
        if let Some(w) = &self.reward_weights {
            if w.len() != self.reward_funcs.len() {
                return Err(format!(
                    "reward_weights has {} entries but reward_funcs has {}",
                    w.len(),
                    self.reward_funcs.len()
                ));
            }
            if w.iter().any(|x| !x.is_finite()) {
                return Err("reward_weights must be finite numbers".into());
            }
        }
        self.rewards.validate()?;
        if let Some(e) = &self.eval_dataset {
            e.validate().map_err(|e| format!("eval_dataset: {e}"))?;
        }
        if self.eval_num_generations == 0 {
            return Err("eval_num_generations must be at least 1".into());
        }
        if self.logprob_chunk_size < 1 {
            return Err("logprob_chunk_size must be at least 1".into());
        }
        // The rollout table's messages already name `rollout.<field>`.
        self.rollout.validate()?;
        if self.rollout.workers.is_empty() {
            return Err(
                "rollout.workers must list at least one worker URL (e.g. http://127.0.0.1:50051)"
                    .into(),
            );
        }
        Ok(())
    }
}
