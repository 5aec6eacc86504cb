//! `trainer grpo`: the training loop of one rank.
//!
//! A round reads like the algorithm ([`Grpo::round`]): take this round's groups from
//! the rollout [`Pipeline`] (`rollout`), score them (`reward`), turn rewards into
//! group-relative advantages and micro-batches (`advantage`), run `num_iterations`
//! optimizer steps on them (`forward_backward`, `optimizer`; old log-probs are recorded
//! first when the batch is reused), and hand the new weights to the workers
//! (`weight_sync`, streamed unit by unit: rank 0 sends, every rank takes part in the
//! gathers). Each phase is a tracing span and fills the round's [`Timings`].
//!
//! Every rank draws the same global prompt batch from the seeded sampler and takes its
//! contiguous slice of the flattened completions, TRL's layout ([`super::layout`]): a
//! group may span ranks, each rank generating its share, and the rewards are gathered
//! so every group is normalised over all its completions. With `max_staleness = 0` a round generates its
//! groups from the weights of the previous step; with `k >= 1` the next `k` rounds' groups
//! are generated while this one trains, and the push of new weights waits until the
//! oldest batch in flight has arrived (for `k = 1` the workers are then idle, so which
//! version produced each group does not depend on timing). Statistics are summed over
//! ranks and logged under TRL's names; the run skeleton (resume, save when due, publish)
//! is [`RunSkeleton`], shared with `trainer sft`.
use std::time::Instant;

use crate::error::{Context, Result, RunError};
use model::LogprobOptions;
use serde_json::json;
use tch::{Kind, Tensor};

use super::advantages::{combine_rewards, step_advantages};
use super::batch::{
    micro_batches_needed, pack, partition_by_tokens, split_even, PackedBatch, PromptUnits, Sample,
};
use super::completions::{completion_rows, completions_table};
use super::config::GrpoConfig;
use super::eval::{evaluate, EvalSet, EvalSums};
use super::fill::Filled;
use super::gather::gather_rewards;
use super::layout::{GroupLayout, Share};
use super::loss::{policy_loss, PolicyBatch};
use super::phases::{Phase, Timings};
use super::pipeline::{generate_parts, pending_batches, staleness, Pipeline, Request};
use super::prefix::shared_layout;
use super::stats::RoundStats;
use crate::data::{self, PromptExample, Sampler};
use crate::dist::{Communicator, ReduceOp, SharedComm};
use crate::metrics::{Phase as RunPhase, StepLog};
use crate::objective::{logprob_objective_at, logprob_objective_shared, LogprobView};
use crate::rewards::{build_reward_functions, RewardFunction, RewardInput};
use crate::rollout::{PromptJob, RolloutClient, RolloutGroup};
use crate::session::{record_memory, RunSkeleton, Session};
use crate::shutdown::Shutdown;
use crate::zero::engine::BoxError;
use crate::zero::{MicroBatch, StepStats, ZeroEngine};

/// Runs GRPO on this rank until the last step.
pub fn run(cfg: &GrpoConfig) -> Result<()> {
    cfg.validate().map_err(RunError::Configuration)?;
    // TRL's global batch rule needs the world size: the launcher's environment has it.
    let world = crate::dist::RendezvousEnv::from_env()
        .context("reading the launcher's environment")?
        .world_size;
    let layout = cfg.validate_world(world).map_err(RunError::Configuration)?;
    let args = &cfg.args;
    let mut sess = Session::start(args)?;
    let (prompts, report) =
        data::load_prompts(&args.dataset, &sess.tokenizer, cfg.max_prompt_length)
            .with_context(|| format!("loading {}", args.dataset.label().display()))?;
    // eval_strategy `no` turns evaluation off even when eval_dataset is set.
    let eval_on = cfg.eval_strategy != crate::config::IntervalStrategy::No;
    let eval = match cfg.eval_dataset.as_ref().filter(|_| eval_on) {
        Some(d) => {
            let (examples, report) = data::load_prompts(d, &sess.tokenizer, cfg.max_prompt_length)
                .with_context(|| format!("loading eval_dataset {}", d.label().display()))?;
            if sess.is_main() {
                println!("eval dataset: {}", report.summary());
            }
            Some(EvalSet::new(examples, cfg)?)
        }
        None => None,
    };
    if sess.is_main() {
        println!("dataset: {}", report.summary());
    }
    let funcs = build_reward_functions(&cfg.reward_funcs, &cfg.rewards, cfg.max_completion_length)
        .map_err(RunError::RewardFuncs)?;
    let prompts_per_round = layout.groups();
    let total = if args.max_steps > 0 {
        args.max_steps as u64
    } else {
        args.total_steps(prompts.len(), prompts_per_round) * cfg.num_iterations as u64
    };
    let steps_per_epoch =
        prompts.len().div_ceil(prompts_per_round.max(1)) as u64 * cfg.num_iterations as u64;
    let weights = sess.weights.take().expect("weights are taken once");
    let comm = sess.comm.take().expect("communicator is taken once");
    // The reference model (beta > 0) is sharded like the policy and shares its ranks'
    // connection; it never steps, so it holds parameters only.
    let (policy_comm, ref_engine): (Box<dyn Communicator>, Option<ZeroEngine>) = if cfg.beta > 0.0 {
        let shared = SharedComm::new(comm);
        let reference = ZeroEngine::new_frozen(
            sess.model_cfg.clone(),
            &weights,
            args.zero.clone(),
            sess.device,
            Box::new(shared.clone()),
        )?;
        (Box::new(shared), Some(reference))
    } else {
        (comm, None)
    };
    let engine = ZeroEngine::new(
        sess.model_cfg.clone(),
        &weights,
        args.zero.clone(),
        args.optim(),
        total,
        sess.device,
        policy_comm,
    )?;
    drop(weights);
    record_memory(&sess.metrics, engine.memory());
    let compute = args.zero.compute_kind().map_err(RunError::Configuration)?;
    let client = sess
        .rt
        .block_on(RolloutClient::connect(
            cfg.rollout.clone().with_compute_dtype(compute),
        ))
        .context("connecting to the rollout workers")?;
    // `rollout.weight_transport` auto/nccl choose NCCL only for a CUDA policy.
    client.set_policy_device(sess.device);
    client.spread_over_ranks(sess.env.rank, sess.env.world_size);
    let skeleton = RunSkeleton::new(args, total, &sess.model_dir, steps_per_epoch);
    let mut run = Grpo {
        cfg,
        pad: sess.tokenizer.pad_token_id().unwrap_or(0) as i64,
        sampler: Sampler::new(prompts.len(), args.seed),
        prompts,
        funcs,
        engine,
        ref_engine,
        client,
        version: 0,
        pending_push: false,
        pipeline: Pipeline::default(),
        shares: layout.shares(sess.env.rank),
        layout,
        next_round: 0,
        resume_pending: Default::default(),
        total,
        steps_per_epoch,
        eval,
        stale_seen: 0,
        started: Instant::now(),
        steps_at_start: 0,
        sess,
    };
    let is_main = run.sess.is_main();
    if let Some(state) = skeleton.resume(&mut run.engine, &mut run.sampler, is_main)? {
        run.version = state["weight_version"].as_u64().unwrap_or(0);
        run.resume_pending = pending_batches(&state, prompts_per_round, run.prompts.len())?;
    }
    run.steps_at_start = run.engine.steps_done();
    run.next_round = run.engine.steps_done() / cfg.num_iterations as u64;
    run.sync_workers()?;
    run.evaluate("before training")?;
    run.started = Instant::now();
    let shutdown = Shutdown::install(&run.sess.rt).context("listening for SIGTERM")?;
    while run.engine.steps_done() < run.total && !skeleton.should_stop() {
        run.round(&skeleton)?;
        if shutdown.agreed(run.engine.comm(), run.sess.device)? {
            return run.stop_at_checkpoint(&skeleton);
        }
    }
    run.pipeline = Pipeline::default(); // cancels rollouts requested beyond the last step
    run.sync_pending(&mut Timings::default())?;
    run.evaluate("after training")?;
    run.sess.metrics.enter_phase(RunPhase::Done);
    crate::plot::at_end_of_run(run.sess.is_main(), &cfg.args.output_dir);
    Ok(())
}

pub(super) struct Grpo<'a> {
    pub(super) cfg: &'a GrpoConfig,
    pub(super) sess: Session,
    pub(super) prompts: Vec<PromptExample>,
    pub(super) sampler: Sampler,
    pub(super) funcs: Vec<Box<dyn RewardFunction>>,
    pub(super) engine: ZeroEngine,
    ref_engine: Option<ZeroEngine>,
    pub(super) client: RolloutClient,
    /// The weight version the workers serve (the last one pushed).
    pub(super) version: u64,
    /// The policy has stepped since the last push.
    pub(super) pending_push: bool,
    /// Rollouts requested and not yet trained on.
    pipeline: Pipeline,
    /// Where a round's completions live, and this rank's share of each group it touches.
    pub(super) layout: GroupLayout,
    pub(super) shares: Vec<Share>,
    /// The generation round the next requested batch belongs to.
    next_round: u64,
    /// Global prompt batches a checkpoint recorded as requested and not yet trained
    /// (dynamic sampling with `max_staleness >= 1`): requested again, in order, before
    /// the sampler draws anew.
    resume_pending: std::collections::VecDeque<Vec<usize>>,
    pub(super) total: u64,
    /// Optimizer steps per pass over the prompts (for the `epoch` strategies).
    pub(super) steps_per_epoch: u64,
    eval: Option<EvalSet>,
    pad: i64,
    /// Stale groups the rollout client dropped so far (its counter at the last round).
    stale_seen: u64,
    /// When the training loop started (for the ETA), and the step it started from.
    pub(super) started: Instant,
    pub(super) steps_at_start: u64,
}

impl Grpo<'_> {
    fn rank(&self) -> usize {
        self.sess.env.rank
    }

    /// One generation round: rollouts, rewards, advantages, `num_iterations` optimizer
    /// steps; the new weights go to the workers before the next rollouts need them.
    fn round(&mut self, skeleton: &RunSkeleton) -> Result<()> {
        let t_round = Instant::now();
        let mut times = Timings::default();
        let mut stats = RoundStats::new(self.funcs.len(), self.cfg.max_staleness);

        self.sess.metrics.enter_phase(RunPhase::Rollout);
        let (round, prompts, groups) = self.rollouts(&mut times, &mut stats)?;
        self.sess.metrics.enter_phase(RunPhase::Reward);
        let scores = times.time(Phase::Reward, || {
            self.rewards(&prompts, &groups, &mut stats)
        })?;
        let mut batch = Filled::all(prompts, groups, scores);
        if self.cfg.dynamic_sampling {
            batch = self.fill_dynamic(round, batch, &mut times, &mut stats)?;
        }
        let parts = times.time(Phase::Advantage, || self.advantages(&batch, &mut stats))?;
        self.sess.metrics.enter_phase(RunPhase::ForwardBackward);
        let step = self.train(&parts, &mut times, &mut stats)?;
        self.pending_push = true;

        let now = Instant::now();
        stats.workers_idle =
            (now - t_round).as_secs_f64() - self.pipeline.busy_within(t_round, now);
        stats.all_reduce(self.engine.comm())?;
        self.report(&stats, &step, &times, t_round.elapsed().as_secs_f64());
        let state = self.trainer_state();
        if skeleton.save_due(step.step) {
            self.sess.metrics.enter_phase(RunPhase::Checkpoint);
        }
        skeleton.save_if_due(
            &mut self.engine,
            step.step,
            false,
            || state,
            self.sess.is_main(),
        )?;
        let cfg = self.cfg;
        let eval_every = crate::config::Interval::new(
            cfg.eval_strategy,
            cfg.eval_steps,
            self.steps_per_epoch,
            self.total,
        );
        if eval_every.due(step.step) && step.step < self.total {
            self.pipeline.settle(&self.sess.rt);
            self.sync_pending(&mut Timings::default())?;
            self.evaluate("during training")?;
        }
        Ok(())
    }

    /// This round's groups (in prompt order) with their prompt indices, each at most
    /// `max_staleness` versions behind the policy. Pushes the previous step's weights
    /// once the oldest batch has arrived and requests the rounds ahead.
    fn rollouts(
        &mut self,
        times: &mut Timings,
        stats: &mut RoundStats,
    ) -> Result<(u64, Vec<usize>, Vec<RolloutGroup>)> {
        if self.pipeline.is_empty() {
            self.sync_pending(times)?;
            self.request_next();
        }
        let t = Instant::now();
        let (batch, groups) = times
            .time(Phase::Rollout, || self.pipeline.next(&self.sess.rt))
            .expect("a batch was requested");
        stats.rollout_wait += t.elapsed().as_secs_f64();
        let mut groups = groups?;
        self.sync_pending(times)?;
        let rounds = self.total.div_ceil(self.cfg.num_iterations as u64);
        while self.pipeline.len() < self.cfg.max_staleness && self.next_round < rounds {
            self.request_next();
        }
        times.time(Phase::Rollout, || {
            self.drop_stale(batch.round, &batch.prompts, &mut groups, stats)
        })?;
        Ok((batch.round, batch.prompts.clone(), groups))
    }

    /// Draws the next round's prompts and requests their groups at the served version.
    fn request_next(&mut self) {
        let per_round = self.layout.groups();
        let sampler_before = self.sampler.state();
        let batch = match self.resume_pending.pop_front() {
            Some(b) => b,
            None => self.sampler.next_batch(per_round),
        };
        let prompts: Vec<usize> = self.shares.iter().map(|s| batch[s.group]).collect();
        let round = self.next_round;
        self.next_round += 1;
        let parts = self.generation_parts(&prompts, &self.shares, self.round_seed(round));
        self.pipeline.request(
            &self.sess.rt,
            Request {
                round,
                prompts,
                global: batch,
                parts,
                sampler_before,
                min_version: self.version,
                client: &self.client,
            },
        );
    }

    pub(super) fn jobs(&self, prompts: &[usize]) -> Vec<PromptJob> {
        prompts
            .iter()
            .enumerate()
            .map(|(k, &i)| PromptJob {
                key: k as u64,
                token_ids: self.prompts[i].prompt_ids.clone(),
            })
            .collect()
    }

    /// The sampling seed of generation round `round`: completion `c` of the global batch
    /// draws from stream `round_seed + c` whatever the world size (see
    /// [`super::layout`]; on one rank these are the streams of earlier versions).
    pub(super) fn round_seed(&self, round: u64) -> u64 {
        self.cfg
            .args
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(round)
            .wrapping_mul(0x9E37_79B9)
    }

    /// Refuses groups from a version above the one pushed (naming the worker), replaces
    /// groups more than `max_staleness` versions old by fresh ones, and counts both the
    /// staleness of what is trained and the groups dropped.
    fn drop_stale(
        &mut self,
        round: u64,
        prompts: &[usize],
        groups: &mut [RolloutGroup],
        stats: &mut RoundStats,
    ) -> Result<()> {
        let k = self.cfg.max_staleness as u64;
        let mut stale = vec![];
        for (i, g) in groups.iter().enumerate() {
            match staleness(self.version, g.weight_version) {
                Err(v) => {
                    return Err(RunError::VersionAhead {
                        worker: g.worker.clone(),
                        version: v,
                        pushed: self.version,
                    })
                }
                Ok(s) if s > k => stale.push(i),
                Ok(_) => {}
            }
        }
        // Groups the client itself dropped (a worker below the batch's minimum version).
        let seen = self.client.stale_groups_dropped();
        stats.stale_dropped += (seen - self.stale_seen) as f64 + stale.len() as f64;
        self.stale_seen = seen;
        if !stale.is_empty() {
            tracing::debug!(round, count = stale.len(), "regenerating stale groups");
            let idx: Vec<usize> = stale.iter().map(|&i| prompts[i]).collect();
            let shares: Vec<Share> = stale.iter().map(|&i| self.shares[i]).collect();
            let parts = self.generation_parts(&idx, &shares, self.round_seed(round) ^ 0x5EED);
            let fresh = self
                .sess
                .rt
                .block_on(generate_parts(&self.client, parts, self.version))?;
            for (i, mut g) in stale.into_iter().zip(fresh) {
                g.key = i as u64;
                groups[i] = g;
            }
        }
        for g in groups.iter() {
            let s = self.version.saturating_sub(g.weight_version) as usize;
            if let Some(c) = stats.staleness.get_mut(s) {
                *c += 1.0;
            }
        }
        Ok(())
    }

    /// Every reward function's score of every completion; fills the reward statistics.
    pub(super) fn rewards(
        &self,
        prompts: &[usize],
        groups: &[RolloutGroup],
        stats: &mut RoundStats,
    ) -> Result<Vec<Vec<Option<f64>>>> {
        let mut inputs = vec![];
        for (g, group) in groups.iter().enumerate() {
            let ex = &self.prompts[prompts[g]];
            for c in &group.completions {
                inputs.push(RewardInput {
                    prompt: &ex.prompt_text,
                    completion: &c.text,
                    completion_tokens: c.token_ids.len(),
                    truncated: c.truncated(),
                    group: g,
                    fields: &ex.fields,
                });
            }
        }
        let mut per_func = vec![];
        for f in &self.funcs {
            let scores = f.score(&inputs)?;
            if scores.len() != inputs.len() {
                return Err(RunError::RewardCount {
                    func: f.name().to_string(),
                    scores: scores.len(),
                    completions: inputs.len(),
                });
            }
            per_func.push(scores);
        }
        for (acc, scores) in stats.per_func.iter_mut().zip(&per_func) {
            for s in scores {
                match s {
                    Some(x) => {
                        acc[0] += x;
                        acc[1] += x * x;
                        acc[2] += 1.0;
                    }
                    None => acc[3] += 1.0,
                }
            }
        }
        Ok(per_func)
    }

    /// Group-relative advantages over the whole global batch (the rewards gathered from
    /// every rank, so a group spanning ranks is normalised over all its completions) and
    /// the micro-batches of this rank's slice. A group with any unscorable completion, or
    /// padding a batch dynamic sampling could not fill, is left out of the loss entirely.
    fn advantages(&mut self, batch: &Filled, stats: &mut RoundStats) -> Result<Vec<PackedBatch>> {
        let (prompts, groups) = (&batch.prompts[..], &batch.groups[..]);
        let cfg = self.cfg;
        let n = cfg.num_generations;
        let local = combine_rewards(&batch.scores, &cfg.reward_weights())?;
        let global = gather_rewards(
            self.engine.comm(),
            &self.layout,
            &local,
            &self.shares,
            &batch.padding,
        )?;
        let excluded_global = global.excluded(n);
        let all: Vec<f64> = global.rewards.iter().map(|r| r.unwrap_or(0.0)).collect();
        // Every rank holds the global batch: its moments need no reduction.
        let adv = step_advantages(&all, &excluded_global, n, cfg.scale_rewards, Ok)?;
        let mine = self.layout.slice(self.rank());
        let rewards = &all[mine.clone()];
        let adv_values = &adv.values[mine.clone()];
        let excluded: Vec<bool> = self
            .shares
            .iter()
            .map(|s| excluded_global[s.group])
            .collect();
        let step = self.engine.steps_done() + 1;
        if cfg.log_completions
            && self.sess.is_main()
            && cfg
                .args
                .log_interval(self.steps_per_epoch, self.total)
                .due(step)
        {
            let rows = completion_rows(&self.prompts, prompts, groups, rewards, adv_values);
            print!(
                "{}",
                completions_table(step, &rows, cfg.num_completions_to_print)
            );
        }

        // A group spanning ranks is counted by the rank holding its first completion.
        let mut samples = Vec::with_capacity(mine_len(&self.shares));
        let mut offset = 0;
        for (g, group) in groups.iter().enumerate() {
            let share = self.shares[g];
            let len = share.len;
            if share.owns_group() {
                stats.groups += 1.0;
                stats.excluded_groups += f64::from(u8::from(excluded[g]));
                stats.zero_std_groups += f64::from(u8::from(adv.zero_std[share.group]));
            }
            if group.completions.len() != len {
                return Err(RunError::ShareSize {
                    group: share.group,
                    want: len,
                    got: group.completions.len(),
                });
            }
            if !excluded[g] {
                for &r in &rewards[offset..offset + len] {
                    stats.reward[0] += r;
                    stats.reward[1] += r * r;
                    stats.reward[2] += 1.0;
                }
            }
            for (j, c) in group.completions.iter().enumerate() {
                // Global index, full precision: what the layout tests compare.
                tracing::debug!(
                    target: "trainer::grpo::completion",
                    "completion {} reward {:?} advantage {:?} tokens {:?}",
                    mine.start + offset + j,
                    rewards[offset + j],
                    adv_values[offset + j],
                    c.token_ids
                );
                let truncated = c.truncated();
                stats.completions += 1.0;
                stats.completion_tokens += c.token_ids.len() as f64;
                stats.prompt_tokens += group.prompt_ids.len() as f64;
                stats.truncated += f64::from(u8::from(truncated));
                stats.max_completion_tokens =
                    stats.max_completion_tokens.max(c.token_ids.len() as f64);
                samples.push(Sample {
                    prompt_ids: group.prompt_ids.clone(),
                    completion_ids: c.token_ids.clone(),
                    sampler_logprobs: c.logprobs.clone(),
                    advantage: adv_values[offset + j] as f32,
                    in_loss: !(excluded[g] || (cfg.mask_truncated_completions && truncated)),
                });
            }
            offset += len;
        }
        let parts: Vec<PackedBatch> = self
            .micro_batches(&samples)?
            .iter()
            .map(|rows| self.pack_part(&samples, rows))
            .collect::<Result<_>>()?;
        stats.train_tokens = parts.iter().map(forwarded_tokens).sum();
        stats.prompt_tokens_saved = parts.iter().map(prompt_tokens_saved).sum();
        // No layout forwards a completion's last token (it predicts nothing).
        stats.padding_tokens = stats.train_tokens - stats.prompt_tokens - stats.completion_tokens
            + stats.prompt_tokens_saved
            + samples.len() as f64;
        Ok(parts)
    }

    /// One micro-batch of `samples[rows]`; under `shared_prefix_training` the rows are
    /// taken in sample order (a group's completions adjacent, sharing one prompt) and
    /// the shared-prefix layout is attached.
    fn pack_part(&self, samples: &[Sample], rows: &[usize]) -> Result<PackedBatch> {
        let mut rows = rows.to_vec();
        if self.cfg.shared_prefix_training {
            rows.sort_unstable();
        }
        let part: Vec<Sample> = rows.iter().map(|&i| samples[i].clone()).collect();
        let mut packed = pack(&part, self.pad)?;
        if self.cfg.shared_prefix_training {
            let max = self.cfg.shared_prefix_max_row_tokens;
            packed.shared = Some(shared_layout(&part, &packed, self.pad, max)?);
        }
        Ok(packed)
    }

    /// The samples of each micro-batch: `gradient_accumulation_steps` equal-count runs,
    /// or with `micro_batch_max_tokens` runs of similar length within the token budget
    /// (as many on every rank as the rank needing most: collective).
    fn micro_batches(&mut self, samples: &[Sample]) -> Result<Vec<Vec<usize>>> {
        let Some(budget) = self.cfg.micro_batch_max_tokens else {
            return Ok(
                split_even(samples.len(), self.cfg.args.gradient_accumulation_steps)
                    .into_iter()
                    .filter(|r| !r.is_empty())
                    .map(|r| r.collect())
                    .collect(),
            );
        };
        if self.cfg.shared_prefix_training {
            // Whole prompt runs per micro-batch, so each prompt is forwarded once.
            let row_budget = budget.min(self.cfg.shared_prefix_max_row_tokens);
            let units = PromptUnits::new(samples, row_budget);
            let need = self.max_over_ranks(units.micro_batches_needed(budget))?;
            return Ok(units.partition(samples, need));
        }
        let lengths: Vec<usize> = samples
            .iter()
            .map(|s| s.prompt_ids.len() + s.completion_ids.len())
            .collect();
        let need = self.max_over_ranks(micro_batches_needed(&lengths, budget))?;
        Ok(partition_by_tokens(&lengths, need))
    }

    /// `num_iterations` optimizer steps on `parts`; returns the last step's statistics.
    fn train(
        &mut self,
        parts: &[PackedBatch],
        times: &mut Timings,
        stats: &mut RoundStats,
    ) -> Result<StepStats> {
        let cfg = self.cfg;
        let opts = LogprobOptions {
            chunk_size: cfg.logprob_chunk_size,
            temperature: cfg.temperature,
            with_entropy: false,
        };
        let old = if cfg.num_iterations > 1 {
            Some(times.time(Phase::ForwardBackward, || {
                self.logprobs_of(false, parts, &opts)
            })?)
        } else {
            None
        };
        let reference = if self.ref_engine.is_some() {
            Some(times.time(Phase::ForwardBackward, || {
                self.logprobs_of(true, parts, &opts)
            })?)
        } else {
            None
        };
        let mut last = None;
        for iteration in 0..cfg.num_iterations {
            let first = iteration == 0;
            times.time(Phase::ForwardBackward, || -> Result<()> {
                for (i, part) in parts.iter().enumerate() {
                    let old = old.as_ref().map(|o| &o[i]);
                    let reference = reference.as_ref().map(|r| &r[i]);
                    let stats = first.then_some(&mut *stats);
                    self.micro_batch(part, old, reference, &opts, stats)?;
                }
                Ok(())
            })?;
            self.sess.metrics.enter_phase(RunPhase::Optimizer);
            let step = times.time(Phase::Optimizer, || self.engine.step())?;
            self.sess.metrics.steps_total.inc();
            last = Some(step);
            if self.engine.steps_done() >= self.total {
                break;
            }
        }
        Ok(last.expect("num_iterations >= 1"))
    }

    /// Forward and backward of one micro-batch through the policy loss; `stats` (first
    /// iteration only) receives the loss statistics and the entropy.
    fn micro_batch(
        &mut self,
        part: &PackedBatch,
        old: Option<&Tensor>,
        reference: Option<&Tensor>,
        opts: &LogprobOptions,
        mut stats: Option<&mut RoundStats>,
    ) -> Result<()> {
        let loss_cfg = self.cfg.loss_config();
        let opts = LogprobOptions {
            with_entropy: stats.is_some(),
            ..*opts
        };
        let mb = micro_batch_of(part);
        self.engine.forward_backward(&mb, |hidden, head| {
            let loss = |view: &LogprobView<'_>| -> std::result::Result<(Tensor, i64), BoxError> {
                let loss = policy_loss(
                    &PolicyBatch {
                        logprobs: view.logprobs,
                        old_logprobs: old,
                        ref_logprobs: reference,
                        sampler_logprobs: Some(&part.sampler_logprobs),
                        advantages: &part.advantages,
                        mask: &part.loss_mask,
                    },
                    &loss_cfg,
                )?;
                if let Some(stats) = stats.as_deref_mut() {
                    stats.add_loss(&loss.stats);
                    if let Some(ent) = view.entropy {
                        stats.entropy_sum += (ent * &part.completion_mask)
                            .sum(Kind::Float)
                            .double_value(&[]);
                        stats.entropy_tokens +=
                            part.completion_mask.sum(Kind::Float).double_value(&[]);
                    }
                }
                Ok((loss.loss_sum, loss.count))
            };
            match &part.shared {
                Some(sh) => logprob_objective_shared(
                    hidden,
                    head,
                    &sh.batch.predictors,
                    &sh.batch.targets,
                    &sh.unpacked,
                    &opts,
                    loss,
                ),
                None => logprob_objective_at(
                    hidden,
                    head,
                    &part.targets,
                    &part.completion_mask,
                    &opts,
                    loss,
                ),
            }
            .map_err(Into::into)
        })?;
        Ok(())
    }

    /// Log-probs of every micro-batch's targets under the policy (`reference = false`,
    /// the "old" log-probs of a reused batch) or the reference model.
    fn logprobs_of(
        &mut self,
        reference: bool,
        parts: &[PackedBatch],
        opts: &LogprobOptions,
    ) -> Result<Vec<Tensor>> {
        let engine = if reference {
            self.ref_engine
                .as_mut()
                .expect("reference engine exists when beta > 0")
        } else {
            &mut self.engine
        };
        let mut out = vec![];
        for part in parts {
            let mb = micro_batch_of(part);
            let lp = engine.forward_no_grad(&mb, |hidden, head| {
                if let Some(sh) = &part.shared {
                    let h = sh.batch.predictors.gather(hidden)?;
                    let lp = model::token_logprobs(&h, head, &sh.batch.targets, opts)?;
                    return Ok(sh.unpacked.scatter(&lp.logprobs)?);
                }
                let t = part.targets.size()[1];
                let h = hidden.narrow(1, 0, t);
                model::token_logprobs_at(&h, head, &part.targets, &part.completion_mask, opts)
                    .map(|l| l.logprobs)
                    .map_err(Into::into)
            })?;
            out.push(lp);
        }
        Ok(out)
    }

    /// What a checkpoint records besides the engine: the sampler position before the
    /// oldest batch not yet trained, and the version the workers serve.
    /// SIGTERM: every rank agreed after a finished round; save it (unless the round
    /// already did) and stop.
    fn stop_at_checkpoint(&mut self, skeleton: &RunSkeleton) -> Result<()> {
        let step = self.engine.steps_done();
        if !skeleton.save_due(step) {
            self.sess.metrics.enter_phase(RunPhase::Checkpoint);
            let state = self.trainer_state();
            skeleton.save_if_due(&mut self.engine, step, true, || state, self.sess.is_main())?;
        }
        self.sess.metrics.enter_phase(RunPhase::Done);
        if self.sess.is_main() {
            println!(
                "stopped by SIGTERM after step {step}: resume_from_checkpoint: latest continues"
            );
        }
        crate::plot::at_end_of_run(self.sess.is_main(), &self.cfg.args.output_dir);
        Ok(())
    }

    ///
    /// Under dynamic sampling the extra prompts of a round are drawn after the rounds
    /// requested ahead, so "before the oldest batch" is not a position to redraw from:
    /// the state records the sampler as it is and the global prompt batches in flight,
    /// requested again on resume.
    fn trainer_state(&self) -> serde_json::Value {
        if self.cfg.dynamic_sampling && !self.pipeline.is_empty() {
            return json!({
                "command": "grpo",
                "sampler": self.sampler.state(),
                "pending_batches": self.pipeline.global_batches(),
                "weight_version": self.version,
            });
        }
        let sampler = self
            .pipeline
            .oldest_sampler_state()
            .cloned()
            .unwrap_or_else(|| self.sampler.state());
        json!({
            "command": "grpo",
            "sampler": sampler,
            "weight_version": self.version,
        })
    }

    /// Held-out accuracy: each rank evaluates its slice of the prompts through the
    /// workers and the sums are all-reduced, so no rank idles in a barrier.
    fn evaluate(&mut self, when: &str) -> Result<()> {
        let Some(eval) = &self.eval else {
            return Ok(());
        };
        self.sess.metrics.enter_phase(RunPhase::Eval);
        let (rank, world) = (self.rank(), self.sess.env.world_size);
        let mine = split_even(eval.len(), world)[rank].clone();
        let sums = evaluate(
            eval,
            mine,
            &self.client,
            &self.sess.rt,
            self.cfg,
            self.version,
        )?;
        let mut t = Tensor::from_slice(&sums.to_array()).to_kind(Kind::Float);
        self.engine.comm().all_reduce(&mut t, ReduceOp::Sum)?;
        let v: Vec<f32> = Vec::try_from(&t)?;
        let result = EvalSums::from_array(&v);
        if self.sess.is_main() {
            println!(
                "eval {when} (step {}): accuracy greedy {:.3} | sampled (T={}, n={}) {:.3} | {} prompts{}",
                self.engine.steps_done(),
                result.greedy(),
                self.cfg.temperature,
                self.cfg.eval_num_generations,
                result.sampled(),
                result.prompts,
                if result.unscorable > 0.0 {
                    format!(" ({} without a parseable gold answer left out)", result.unscorable)
                } else {
                    String::new()
                }
            );
        }
        let mut log = StepLog::new();
        log.insert("eval/accuracy_greedy".into(), result.greedy());
        log.insert("eval/accuracy_sampled".into(), result.sampled());
        crate::runlog::publish_eval(
            &self.sess.metrics,
            self.sess.is_main(),
            &self.cfg.args.output_dir,
            self.engine.steps_done(),
            &log,
        );
        Ok(())
    }
}

/// Completions this rank holds in `shares`.
fn mine_len(shares: &[Share]) -> usize {
    shares.iter().map(|s| s.len).sum()
}

/// The engine's input for `part`: its shared-prefix rows when it has them.
fn micro_batch_of(part: &PackedBatch) -> MicroBatch {
    match &part.shared {
        Some(sh) => MicroBatch {
            input_ids: sh.batch.input_ids.shallow_clone(),
            attention_mask: None,
            position_ids: Some(sh.batch.position_ids.shallow_clone()),
            segment_ids: Some(sh.batch.segment_ids.shallow_clone()),
        },
        None => MicroBatch {
            input_ids: part.forward_ids(),
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
        },
    }
}

/// Token positions the forward of `part` runs on (padding included).
fn forwarded_tokens(part: &PackedBatch) -> f64 {
    match &part.shared {
        Some(sh) => sh.batch.input_ids.numel() as f64,
        None => part.forward_ids().numel() as f64,
    }
}

/// Prompt tokens `part`'s shared-prefix layout does not forward.
fn prompt_tokens_saved(part: &PackedBatch) -> f64 {
    part.shared
        .as_ref()
        .map_or(0.0, |sh| sh.batch.prompt_tokens_saved as f64)
}
