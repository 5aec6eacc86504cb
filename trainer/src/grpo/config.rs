//! The `trainer grpo` configuration. Field names are TRL's `GRPOConfig` names wherever
//! the concept is the same; docs/configuration.md is the reference.
use serde::{Deserialize, Serialize};

use super::advantages::ScaleRewards;
use super::dynamic_sampling::WhenUnfilled;
use super::layout::{check_global_batch, GroupLayout};
use super::loss::{
    ImportanceSamplingLevel, IsCorrection, IsCorrectionMode, LossType, PolicyLossConfig,
};
use crate::config::invalid::bad;
use crate::config::{Command, IntervalStrategy, InvalidConfig, Recipe, Steps};
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
    /// Upper clip range (DAPO's clip-higher); unset means `epsilon`. For `cispo`, the
    /// cap of the detached ratio itself (ScaleRL recommends 5.0).
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at `delta`.
    pub delta: Option<f64>,
    pub loss_type: LossType,
    /// `token` (GRPO) or `sequence` (GSPO: the length-normalised sequence log-ratio).
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// SAPO's gate temperatures for tokens with positive / non-positive advantage.
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps taken on each generated batch (old log-probs are recorded first).
    pub num_iterations: usize,
    /// Truncated completions (no EOS within max_completion_length) are left out of the loss.
    pub mask_truncated_completions: bool,
    /// Forward each group's prompt once, its completions attending to it (shared-prefix
    /// packing); exact to f32 rounding, not bit for bit (off restores the unpacked layout).
    pub shared_prefix_training: bool,
    /// Tokens per shared-prefix row (prompt plus completions); a longer group is split.
    pub shared_prefix_max_row_tokens: usize,
    /// Reweight the loss by the importance ratio exp(old - sampler) between the trainer's
    /// and the workers' log-probs, truncated or masked at the cap: corrects for the two
    /// being different engines (TRL's names and defaults).
    pub vllm_importance_sampling_correction: bool,
    pub vllm_importance_sampling_mode: IsCorrectionMode,
    pub vllm_importance_sampling_cap: f64,
    /// DAPO's dynamic sampling (verl's `algorithm.filter_groups.enable`): groups whose
    /// combined rewards are all equal are dropped and more prompts drawn until the batch
    /// is full.
    pub dynamic_sampling: bool,
    /// Bound on generation rounds per step under dynamic sampling, the first included
    /// (verl's `max_num_gen_batches`, where 0 means unbounded; here at least 1).
    pub max_num_gen_batches: usize,
    /// When the rounds did not fill the batch: `train` on the groups there are (flat ones
    /// pad it, left out of the loss) or `error` (verl's behaviour).
    pub dynamic_sampling_unfilled: WhenUnfilled,
    /// Print `num_completions_to_print` (prompt, completion, reward) rows at each logging
    /// step (TRL's `log_completions`).
    pub log_completions: bool,
    /// Unset: every completion of the step.
    pub num_completions_to_print: Option<usize>,
    pub reward_funcs: Vec<String>,
    /// One weight per reward function; unset gives every function weight 1.
    pub reward_weights: Option<Vec<f64>>,
    pub rewards: RewardsConfig,
    /// Held-out prompts evaluated (accuracy reward) before training, every `eval_steps`,
    /// and after the last step.
    pub eval_dataset: Option<DatasetConfig>,
    /// Evaluate every this many steps (0: only before and after), or a fraction of the
    /// run in (0, 1).
    pub eval_steps: Steps,
    /// `steps` (every `eval_steps`), `epoch`, or `no` (never, even with eval_dataset).
    pub eval_strategy: IntervalStrategy,
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
            delta: None,
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            shared_prefix_training: true,
            shared_prefix_max_row_tokens: 4096,
            vllm_importance_sampling_correction: true,
            vllm_importance_sampling_mode: IsCorrectionMode::SequenceMask,
            vllm_importance_sampling_cap: 3.0,
            dynamic_sampling: false,
            max_num_gen_batches: 4,
            dynamic_sampling_unfilled: WhenUnfilled::Train,
            log_completions: false,
            num_completions_to_print: None,
            reward_funcs: vec!["accuracy".into(), "format".into()],
            reward_weights: None,
            rewards: RewardsConfig::default(),
            eval_dataset: None,
            eval_steps: Steps::Count(0),
            eval_strategy: IntervalStrategy::Steps,
            eval_num_generations: 4,
            logprob_chunk_size: 512,
            rollout: RolloutConfig::default(),
            max_staleness: 0,
            micro_batch_max_tokens: None,
        }
    }
}

impl Recipe for GrpoConfig {
    const COMMAND: Command = Command::Grpo;
}

impl GrpoConfig {
    /// Completions each rank trains on per generation round.
    pub fn completions_per_rank(&self) -> usize {
        self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
    }

    /// Prompts each rank sends per generation round when every rank holds whole groups
    /// (dynamic sampling requires it).
    pub fn prompts_per_rank(&self) -> usize {
        self.completions_per_rank() / self.num_generations.max(1)
    }

    /// Where a round's completions live over `world` ranks (see [`GroupLayout`]).
    pub fn layout(&self, world: usize) -> GroupLayout {
        GroupLayout {
            num_generations: self.num_generations,
            per_rank: self.completions_per_rank(),
            world,
        }
    }

    /// The checks that need the world size, known only at launch: TRL's rule that
    /// `num_generations` divides the global batch (`per_device_train_batch_size × world ×
    /// gradient_accumulation_steps`); the message names the numbers.
    pub fn validate_world(&self, world: usize) -> Result<GroupLayout, InvalidConfig> {
        check_global_batch(
            self.args.per_device_train_batch_size,
            world,
            self.args.gradient_accumulation_steps,
            self.num_generations,
        )
        .map_err(|e| bad("num_generations", e.to_string()))
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
            importance_sampling_level: self.importance_sampling_level,
            delta: self.delta,
            sapo_temperature_pos: self.sapo_temperature_pos,
            sapo_temperature_neg: self.sapo_temperature_neg,
            correction: self
                .vllm_importance_sampling_correction
                .then_some(IsCorrection {
                    mode: self.vllm_importance_sampling_mode,
                    cap: self.vllm_importance_sampling_cap,
                }),
        }
    }

    pub fn reward_weights(&self) -> Vec<f64> {
        self.reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.reward_funcs.len()])
    }

    /// Every check that needs no file or peer; errors name the field and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.args.validate()?;
        if self.shared_prefix_max_row_tokens == 0 {
            return Err(bad(
                "shared_prefix_max_row_tokens",
                "shared_prefix_max_row_tokens must be positive, got 0",
            ));
        }
        if self.num_generations < 2 {
            return Err(bad("num_generations", format!(
                "num_generations must be at least 2 (advantages compare completions of a prompt), got {}",
                self.num_generations
            )));
        }
        // Groups may span ranks (TRL's layout; the global rule is `validate_world`'s),
        // except under dynamic sampling, whose refill draws whole groups per rank.
        let per_rank = self.completions_per_rank();
        if per_rank == 0 {
            return Err(bad(
                "per_device_train_batch_size",
                "per_device_train_batch_size and gradient_accumulation_steps must be at least 1",
            ));
        }
        if self.dynamic_sampling && !per_rank.is_multiple_of(self.num_generations) {
            return Err(bad(
                "dynamic_sampling",
                format!(
                    "dynamic_sampling needs every rank to hold whole groups: \
                     per_device_train_batch_size x gradient_accumulation_steps ({per_rank}) must be \
                     a multiple of num_generations ({}) (groups that span ranks are supported \
                     without dynamic sampling)",
                    self.num_generations
                ),
            ));
        }
        if self.max_prompt_length == 0 || self.max_completion_length == 0 {
            return Err(bad(
                "max_prompt_length",
                "max_prompt_length and max_completion_length must be at least 1",
            ));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(bad(
                "temperature",
                format!(
                    "temperature must be > 0 for GRPO sampling, got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            ));
        }
        if self.top_k < 0 {
            return Err(bad(
                "top_k",
                format!("top_k must be >= 0 (0 disables), got {}", self.top_k),
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(bad(
                "min_p",
                format!("min_p must be in [0, 1), got {}", self.min_p),
            ));
        }
        if self.beta.is_nan() || self.beta < 0.0 {
            return Err(bad("beta", format!("beta must be >= 0, got {}", self.beta)));
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return Err(bad(
                "epsilon",
                format!("epsilon must be in (0, 1), got {}", self.epsilon),
            ));
        }
        if let Some(h) = self.epsilon_high {
            if h.is_nan() || h <= 0.0 {
                return Err(bad(
                    "epsilon_high",
                    format!("epsilon_high must be > 0, got {h}"),
                ));
            }
        }
        if let Some(d) = self.delta {
            if !(d.is_finite() && d > 1.0 + self.epsilon_high.unwrap_or(self.epsilon)) {
                return Err(bad("delta", format!(
                    "delta must be > 1 + epsilon_high (two-sided clipping caps the ratio above the clip range), got {d}"
                )));
            }
        }
        for (name, t) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return Err(bad(name, format!("{name} must be > 0, got {t}")));
            }
        }
        if self.max_num_gen_batches == 0 {
            return Err(bad(
                "max_num_gen_batches",
                "max_num_gen_batches must be at least 1 (generation rounds per step, the first \
                 included; verl's 0 = unbounded is not offered)",
            ));
        }
        if self.num_completions_to_print == Some(0) {
            return Err(bad(
                "num_completions_to_print",
                "num_completions_to_print must be at least 1 (unset prints every completion)",
            ));
        }
        if self.num_iterations == 0 {
            return Err(bad("num_iterations", "num_iterations must be at least 1"));
        }
        if self.micro_batch_max_tokens == Some(0) {
            return Err(bad(
                "micro_batch_max_tokens",
                "micro_batch_max_tokens must be at least 1 (unset: equal-count micro-batches)",
            ));
        }
        if self.max_staleness > MAX_STALENESS {
            return Err(bad(
                "max_staleness",
                format!(
                    "max_staleness must be in 0..={MAX_STALENESS} (rounds generated ahead), got {}",
                    self.max_staleness
                ),
            ));
        }
        if !(self.vllm_importance_sampling_cap.is_finite()
            && self.vllm_importance_sampling_cap > 0.0)
        {
            return Err(bad(
                "vllm_importance_sampling_cap",
                format!(
                    "vllm_importance_sampling_cap must be > 0, got {}",
                    self.vllm_importance_sampling_cap
                ),
            ));
        }
        if self.reward_funcs.is_empty() {
            return Err(bad(
                "reward_funcs",
                "reward_funcs must name at least one reward function",
            ));
        }
        if let Some(w) = &self.reward_weights {
            if w.len() != self.reward_funcs.len() {
                return Err(bad(
                    "reward_weights",
                    format!(
                        "reward_weights has {} entries but reward_funcs has {}",
                        w.len(),
                        self.reward_funcs.len()
                    ),
                ));
            }
            if w.iter().any(|x| !x.is_finite()) {
                return Err(bad(
                    "reward_weights",
                    "reward_weights must be finite numbers",
                ));
            }
        }
        self.rewards.validate()?;
        if let Some(e) = &self.eval_dataset {
            e.validate()
                .map_err(|error| InvalidConfig::EvalDataset { error })?;
        }
        self.eval_steps.check("eval_steps")?;
        if self.eval_num_generations == 0 {
            return Err(bad(
                "eval_num_generations",
                "eval_num_generations must be at least 1",
            ));
        }
        if self.logprob_chunk_size < 1 {
            return Err(bad(
                "logprob_chunk_size",
                "logprob_chunk_size must be at least 1",
            ));
        }
        // The rollout table's messages already name `rollout.<field>`.
        self.rollout.validate()?;
        crate::timeouts::check(&self.args.dist, &self.rollout, &self.rewards)?;
        if self.rollout.workers.is_empty() {
            return Err(bad(
                "rollout.workers",
                "rollout.workers must list at least one worker URL (e.g. http://127.0.0.1:50051)",
            ));
        }
        Ok(())
    }
}
