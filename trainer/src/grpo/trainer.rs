//! `trainer grpo`: the training loop of one rank.
//!
//! A round: every rank draws the same global prompt batch from the seeded sampler and
//! takes its contiguous slice (whole groups), asks the rollout workers for
//! `num_generations` completions per prompt at the current weight version, scores them
//! with the reward functions, turns rewards into group-relative advantages, packs the
//! completions into `gradient_accumulation_steps` micro-batches and runs
//! `num_iterations` optimizer steps on them (recording the old log-probs first when
//! reusing the batch). Then the new weights are streamed to every worker unit by unit
//! (rank 0 sends, every rank takes part in the gathers) under the next version, which
//! the next round's rollouts must carry. Statistics are summed over ranks and logged
//! under TRL's names.
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use model::LogprobOptions;
use proto::v1 as pb;
use serde_json::json;
use tch::{Kind, Tensor};

use super::advantages::{combine_rewards, group_advantages, ScaleRewards};
use super::batch::{pack, split_even, PackedBatch, Sample};
use super::completions::{completion_rows, completions_table};
use super::config::GrpoConfig;
use super::eval::{evaluate, EvalSet, EvalSums};
use super::loss::{policy_loss, PolicyBatch};
use super::stats::RoundStats;
use crate::data::{self, PromptExample, Sampler, SamplerState};
use crate::dist::{Communicator, ReduceOp, SharedComm};
use crate::metrics::{Phase, StepLog};
use crate::objective::logprob_objective;
use crate::rewards::{build_reward_functions, RewardFunction, RewardInput};
use crate::rollout::{PromptJob, RolloutClient, RolloutGroup};
use crate::session::{publish_final_model, record_memory, Session};
use crate::shutdown::Shutdown;
use crate::zero::{MicroBatch, ZeroEngine};

/// Runs GRPO on this rank until the last step.
pub fn run(cfg: &GrpoConfig) -> Result<()> {
    cfg.validate().map_err(|e| anyhow!("configuration: {e}"))?;
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
        .map_err(|e| anyhow!("configuration: reward_funcs: {e}"))?;
    let world = sess.env.world_size;
    let prompts_per_round = cfg.prompts_per_rank() * world;
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
    // connection; it never steps, so its optimizer state is never touched.
    let (policy_comm, ref_engine): (Box<dyn Communicator>, Option<ZeroEngine>) = if cfg.beta > 0.0 {
        let shared = SharedComm::new(comm);
        let reference = ZeroEngine::new(
            sess.model_cfg.clone(),
            &weights,
            args.zero.clone(),
            args.optim(),
            total,
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
    let client = sess
        .rt
        .block_on(RolloutClient::connect(cfg.rollout.clone()))
        .context("connecting to the rollout workers")?;
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
        total,
        steps_per_epoch,
        eval,
        sess,
    };
    run.resume()?;
    run.sync_workers()?;
    run.evaluate("before training")?;
    let shutdown = Shutdown::install(&run.sess.rt).context("listening for SIGTERM")?;
    while run.engine.steps_done() < run.total {
        run.round()?;
        if shutdown.agreed(run.engine.comm(), run.sess.device)? {
            return run.stop_at_checkpoint();
        }
    }
    run.evaluate("after training")?;
    run.sess.metrics.enter_phase(Phase::Done);
    crate::plot::at_end_of_run(run.sess.is_main(), &cfg.args.output_dir);
    Ok(())
}

struct Grpo<'a> {
    cfg: &'a GrpoConfig,
    sess: Session,
    prompts: Vec<PromptExample>,
    sampler: Sampler,
    funcs: Vec<Box<dyn RewardFunction>>,
    engine: ZeroEngine,
    ref_engine: Option<ZeroEngine>,
    client: RolloutClient,
    /// The weight version the workers serve for the current policy.
    version: u64,
    /// Optimizer steps per pass over the prompts (for the `epoch` strategies).
    steps_per_epoch: u64,
    total: u64,
    eval: Option<EvalSet>,
    pad: i64,
}

/// Wall-clock split of a round, in seconds.
#[derive(Default)]
struct Timings {
    generate: f64,
    reward: f64,
    forward_backward: f64,
    optimizer: f64,
    weight_push: f64,
}

impl Grpo<'_> {
    fn rank(&self) -> usize {
        self.sess.env.rank
    }

    fn resume(&mut self) -> Result<()> {
        let Some(dir) = self.cfg.args.resume_dir()? else {
            return Ok(());
        };
        let (dir, state) = self
            .engine
            .resume(&dir, self.cfg.args.resume_falls_back())?;
        let s: SamplerState = serde_json::from_value(state["sampler"].clone())
            .with_context(|| format!("{}: trainer state has no valid sampler", dir.display()))?;
        self.sampler.restore(&s)?;
        self.version = state["weight_version"].as_u64().unwrap_or(0);
        if self.sess.is_main() {
            println!(
                "resumed from {} at step {}",
                dir.display(),
                self.engine.steps_done()
            );
        }
        Ok(())
    }

    /// Makes every worker serve this policy: rank 0 compares the workers' versions
    /// with the policy's and, if any differs (a resumed run, or workers started from
    /// another checkpoint), pushes the weights under a version above all of them.
    fn sync_workers(&mut self) -> Result<()> {
        let mut decision = Tensor::from_slice(&[0i64, self.version as i64]);
        if self.sess.is_main() {
            let versions: Vec<u64> = self
                .client
                .status()
                .iter()
                .filter_map(|w| w.weight_version)
                .collect();
            let resumed = self.engine.steps_done() > 0;
            let differs = versions.iter().any(|&v| v != self.version);
            if resumed || differs {
                let next = versions
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0)
                    .max(self.version)
                    + 1;
                decision = Tensor::from_slice(&[1i64, next as i64]);
            }
        }
        self.engine.comm().broadcast(&mut decision, 0)?;
        if decision.int64_value(&[0]) == 1 {
            self.push_weights(decision.int64_value(&[1]) as u64)?;
        }
        Ok(())
    }

    /// Streams the policy to every worker under `version` (collective).
    fn push_weights(&mut self, version: u64) -> Result<f64> {
        self.sess.metrics.enter_phase(Phase::WeightSync);
        let t0 = Instant::now();
        let main = self.sess.is_main();
        let rt = &self.sess.rt;
        let mut push = None;
        let mut failure: Option<String> = None;
        if main {
            match rt.block_on(self.client.begin_push(version)) {
                Ok(p) => push = Some(p),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        let visited = self
            .engine
            .visit_full_weights(|name, t| match push.as_mut() {
                Some(p) => rt.block_on(p.send(name, t)).map_err(|e| e.to_string()),
                None => Ok(()),
            });
        if let Err(e) = visited {
            failure.get_or_insert(e.to_string());
        }
        if let (Some(p), None) = (push, &failure) {
            match rt.block_on(p.commit()) {
                Ok(report) => {
                    for (worker, why) in &report.failed {
                        tracing::warn!(%worker, %why, version, "worker missed the weight update");
                    }
                }
                Err(e) => failure = Some(e.to_string()),
            }
        }
        let mut ok = Tensor::from_slice(&[i64::from(failure.is_none())]);
        self.engine.comm().broadcast(&mut ok, 0)?;
        if ok.int64_value(&[0]) == 0 {
            bail!(
                "pushing weight version {version} to the rollout workers failed{}",
                failure.map(|f| format!(": {f}")).unwrap_or_default()
            );
        }
        self.version = version;
        self.sess.rt.block_on(self.client.refresh());
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Held-out accuracy: each rank evaluates its slice of the prompts through the
    /// workers and the sums are all-reduced, so no rank idles in a barrier.
    fn evaluate(&mut self, when: &str) -> Result<()> {
        let Some(eval) = &self.eval else {
            return Ok(());
        };
        self.sess.metrics.enter_phase(Phase::Eval);
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

    /// One generation round: rollouts, rewards, `num_iterations` optimizer steps, push.
    fn round(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let t_round = Instant::now();
        let mut times = Timings::default();
        let (rank, world) = (self.rank(), self.sess.env.world_size);
        let per_round = cfg.prompts_per_rank() * world;
        let batch = self.sampler.next_batch(per_round);
        let mine: Vec<usize> = batch[split_even(per_round, world)[rank].clone()].to_vec();

        self.sess.metrics.enter_phase(Phase::Rollout);
        let t = Instant::now();
        let groups = self.generate(&mine)?;
        times.generate = t.elapsed().as_secs_f64();

        self.sess.metrics.enter_phase(Phase::Reward);
        let t = Instant::now();
        let mut stats = RoundStats::new(self.funcs.len());
        let samples = self.score(&mine, &groups, &mut stats)?;
        times.reward = t.elapsed().as_secs_f64();

        let parts: Vec<PackedBatch> =
            split_even(samples.len(), cfg.args.gradient_accumulation_steps)
                .into_iter()
                .filter(|r| !r.is_empty())
                .map(|r| pack(&samples[r], self.pad))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
        stats.train_tokens = parts.iter().map(|p| p.input_ids.numel() as f64).sum();
        let opts = LogprobOptions {
            chunk_size: cfg.logprob_chunk_size,
            temperature: cfg.temperature,
            with_entropy: false,
        };
        self.sess.metrics.enter_phase(Phase::ForwardBackward);
        let t = Instant::now();
        let old = if cfg.num_iterations > 1 {
            Some(self.logprobs_of(false, &parts, &opts)?)
        } else {
            None
        };
        let reference = if self.ref_engine.is_some() {
            Some(self.logprobs_of(true, &parts, &opts)?)
        } else {
            None
        };
        times.forward_backward += t.elapsed().as_secs_f64();

        let loss_cfg = cfg.loss_config();
        let mut last = None;
        for iteration in 0..cfg.num_iterations {
            let t = Instant::now();
            for (i, part) in parts.iter().enumerate() {
                let mb = MicroBatch {
                    input_ids: part.input_ids.shallow_clone(),
                    attention_mask: None,
                    position_ids: None,
                };
                let first = iteration == 0;
                let opts = LogprobOptions {
                    with_entropy: first,
                    ..opts
                };
                let stats = &mut stats;
                let (old, reference) = (
                    old.as_ref().map(|o| &o[i]),
                    reference.as_ref().map(|r| &r[i]),
                );
                self.engine.forward_backward(&mb, |hidden, head| {
                    logprob_objective(hidden, head, &part.targets, &opts, |view| {
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
                        if first {
                            let s = &loss.stats;
                            stats.loss_tokens += s.tokens;
                            stats.kl_sum += s.kl_sum;
                            stats.low_clipped += s.low_clipped;
                            stats.high_clipped += s.high_clipped;
                            stats.region_clipped += s.region_clipped;
                            if let Some(ent) = view.entropy {
                                stats.entropy_sum += (ent * &part.completion_mask)
                                    .sum(Kind::Float)
                                    .double_value(&[]);
                                stats.entropy_tokens +=
                                    part.completion_mask.sum(Kind::Float).double_value(&[]);
                            }
                        }
                        Ok((loss.loss_sum, loss.count))
                    })
                })?;
            }
            times.forward_backward += t.elapsed().as_secs_f64();
            self.sess.metrics.enter_phase(Phase::Optimizer);
            let t = Instant::now();
            let step = self.engine.step()?;
            times.optimizer += t.elapsed().as_secs_f64();
            self.sess.metrics.steps_total.inc();
            last = Some(step);
            if self.engine.steps_done() >= self.total {
                break;
            }
        }
        let step = last.expect("num_iterations >= 1");

        times.weight_push = self.push_weights(self.version + 1)?;
        stats.all_reduce(self.engine.comm())?;
        self.report(&stats, &step, &times, t_round.elapsed().as_secs_f64());
        self.checkpoint_if_due(step.step, false)?;
        let eval_every =
            crate::config::Interval::new(cfg.eval_strategy, cfg.eval_steps, self.steps_per_epoch);
        if eval_every.due(step.step) && step.step < self.total {
            self.evaluate("during training")?;
        }
        Ok(())
    }

    /// Generates this rank's groups (in prompt order) at the current version.
    fn generate(&mut self, mine: &[usize]) -> Result<Vec<RolloutGroup>> {
        let cfg = self.cfg;
        let jobs: Vec<PromptJob> = mine
            .iter()
            .enumerate()
            .map(|(k, &i)| PromptJob {
                key: k as u64,
                token_ids: self.prompts[i].prompt_ids.clone(),
            })
            .collect();
        let round = self.engine.steps_done() / cfg.num_iterations as u64;
        let seed = cfg
            .args
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(round * self.sess.env.world_size as u64 + self.rank() as u64)
            .wrapping_mul(0x9E37_79B9);
        let sampling = pb::SamplingParams {
            temperature: Some(cfg.temperature),
            top_p: Some(cfg.top_p),
            top_k: cfg.top_k,
            min_p: cfg.min_p,
            max_new_tokens: cfg.max_completion_length as u32,
            seed: Some(seed),
            ..Default::default()
        };
        let groups = self.sess.rt.block_on(self.client.generate(
            jobs,
            cfg.num_generations as u32,
            sampling,
            true,
            self.version,
            |_| {},
        ))?;
        for g in &groups {
            if g.weight_version < self.version {
                bail!(
                    "worker {} returned a group of weight version {} while the policy is at {}",
                    g.worker,
                    g.weight_version,
                    self.version
                );
            }
        }
        Ok(groups)
    }

    /// Rewards, advantages and the samples to train on; fills the reward statistics.
    fn score(
        &mut self,
        mine: &[usize],
        groups: &[RolloutGroup],
        stats: &mut RoundStats,
    ) -> Result<Vec<Sample>> {
        let cfg = self.cfg;
        let n = cfg.num_generations;
        let length = pb::FinishReason::Length as i32;
        let mut inputs = vec![];
        for (g, group) in groups.iter().enumerate() {
            let ex = &self.prompts[mine[g]];
            for c in &group.completions {
                inputs.push(RewardInput {
                    prompt: &ex.prompt_text,
                    completion: &c.text,
                    completion_tokens: c.token_ids.len(),
                    truncated: c.finish_reason == length,
                    group: g,
                    fields: &ex.fields,
                });
            }
        }
        let mut per_func = vec![];
        for f in &self.funcs {
            let scores = f.score(&inputs)?;
            if scores.len() != inputs.len() {
                bail!(
                    "reward function {} returned {} scores for {} completions",
                    f.name(),
                    scores.len(),
                    inputs.len()
                );
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
        drop(inputs);
        let combined =
            combine_rewards(&per_func, &cfg.reward_weights()).map_err(anyhow::Error::msg)?;
        // A group with any unscorable completion is left out of the loss entirely.
        let excluded: Vec<bool> = combined
            .chunks(n)
            .map(|g| g.iter().any(Option::is_none))
            .collect();
        let rewards: Vec<f64> = combined.iter().map(|r| r.unwrap_or(0.0)).collect();
        let adv = self.advantages(&rewards, &excluded)?;
        let step = self.engine.steps_done() + 1;
        if cfg.log_completions
            && self.sess.is_main()
            && cfg.args.log_interval(self.steps_per_epoch).due(step)
        {
            let rows = completion_rows(&self.prompts, mine, groups, &rewards, &adv);
            print!(
                "{}",
                completions_table(step, &rows, cfg.num_completions_to_print)
            );
        }

        stats.groups += groups.len() as f64;
        let mut samples = Vec::with_capacity(groups.len() * n);
        for (g, group) in groups.iter().enumerate() {
            if excluded[g] {
                stats.excluded_groups += 1.0;
            } else {
                let rs = &rewards[g * n..(g + 1) * n];
                if rs.iter().all(|&r| r == rs[0]) {
                    stats.zero_std_groups += 1.0;
                }
                for &r in rs {
                    stats.reward[0] += r;
                    stats.reward[1] += r * r;
                    stats.reward[2] += 1.0;
                }
            }
            for (j, c) in group.completions.iter().enumerate() {
                let truncated = c.finish_reason == length;
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
                    advantage: adv[g * n + j] as f32,
                    in_loss: !(excluded[g] || (cfg.mask_truncated_completions && truncated)),
                });
            }
        }
        Ok(samples)
    }

    /// Group-relative advantages; `batch` scaling divides by the std of every included
    /// reward of the global batch (all ranks), as TRL does after gathering.
    fn advantages(&mut self, rewards: &[f64], excluded: &[bool]) -> Result<Vec<f64>> {
        let n = self.cfg.num_generations;
        let scale = self.cfg.scale_rewards;
        let local = group_advantages(
            rewards,
            n,
            if scale == ScaleRewards::Batch {
                ScaleRewards::None
            } else {
                scale
            },
        )
        .map_err(anyhow::Error::msg)?;
        let mut values = local.values;
        if scale == ScaleRewards::Batch {
            let (mut s, mut sq, mut c) = (0.0, 0.0, 0.0);
            for (g, rs) in rewards.chunks(n).enumerate() {
                if !excluded[g] {
                    for &r in rs {
                        s += r;
                        sq += r * r;
                        c += 1.0;
                    }
                }
            }
            let mut t = Tensor::from_slice(&[s, sq, c]).to_kind(Kind::Float);
            self.engine.comm().all_reduce(&mut t, ReduceOp::Sum)?;
            let (s, sq, c) = (
                t.double_value(&[0]),
                t.double_value(&[1]),
                t.double_value(&[2]),
            );
            let std = if c > 1.0 {
                let mean = s / c;
                ((sq - c * mean * mean) / (c - 1.0)).max(0.0).sqrt()
            } else {
                0.0
            };
            for v in &mut values {
                *v /= std + 1e-4;
            }
        }
        for (g, ex) in excluded.iter().enumerate() {
            if *ex {
                values[g * n..(g + 1) * n].fill(0.0);
            }
        }
        Ok(values)
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
            let mb = MicroBatch {
                input_ids: part.input_ids.shallow_clone(),
                attention_mask: None,
                position_ids: None,
            };
            let lp = engine.forward_no_grad(&mb, |hidden, head| {
                let t = part.targets.size()[1];
                model::token_logprobs(&hidden.narrow(1, 0, t), head, &part.targets, opts)
                    .map(|l| l.logprobs)
                    .map_err(|e| e.to_string())
            })?;
            out.push(lp);
        }
        Ok(out)
    }

    fn report(
        &self,
        stats: &RoundStats,
        step: &crate::zero::StepStats,
        times: &Timings,
        secs: f64,
    ) {
        let mut log = StepLog::new();
        stats.finish(&self.cfg.reward_funcs, &mut log);
        let train_secs = times.forward_backward + times.optimizer;
        for (k, v) in [
            ("loss", step.loss),
            ("grad_norm", step.grad_norm),
            ("learning_rate", step.learning_rate),
            ("epoch", self.sampler.epoch() as f64),
            ("weight_version", self.version as f64),
            ("time/step", secs),
            ("time/generate", times.generate),
            ("time/reward", times.reward),
            ("time/forward_backward", times.forward_backward),
            ("time/optimizer", times.optimizer),
            ("time/weight_push", times.weight_push),
            (
                "tokens_per_second/generation",
                stats.completion_tokens / times.generate.max(1e-9),
            ),
            (
                "tokens_per_second/train",
                stats.train_tokens * self.cfg.num_iterations as f64 / train_secs.max(1e-9),
            ),
        ] {
            log.insert(k.into(), v);
        }
        // Only the live workers (elastic ones that left drop out of the series).
        self.sess.metrics.worker_healthy.reset();
        self.sess.metrics.worker_weight_version.reset();
        for w in self.client.status() {
            let healthy = if w.healthy { 1.0 } else { 0.0 };
            self.sess
                .metrics
                .worker_healthy
                .with_label_values(&[w.url.as_str()])
                .set(healthy);
            if let Some(v) = w.weight_version {
                self.sess
                    .metrics
                    .worker_weight_version
                    .with_label_values(&[w.url.as_str()])
                    .set(v as f64);
            }
        }
        record_memory(&self.sess.metrics, self.engine.memory());
        let (main, out) = (self.sess.is_main(), &self.cfg.args.output_dir);
        crate::runlog::publish_step(&self.sess.metrics, main, out, step.step, &log);
        if self.sess.is_main() {
            let first_func = self
                .cfg
                .reward_funcs
                .first()
                .map(String::as_str)
                .unwrap_or("");
            let workers = self.client.status();
            let healthy = workers.iter().filter(|w| w.healthy).count();
            println!(
                "step {}/{} | reward {:.3} ± {:.3} | {first_func} {:.3} | len {:.1} | clipped {:.2} | loss {:+.4} | grad {:.3} | groups {} | workers {healthy}/{} | {:.1} s (gen {:.1}, reward {:.2}, train {:.1}, opt {:.2}, push {:.2})",
                step.step,
                self.total,
                log["reward"],
                log["reward_std"],
                log.get(&format!("rewards/{first_func}/mean")).copied().unwrap_or(0.0),
                log["completions/mean_length"],
                log["completions/clipped_ratio"],
                step.loss,
                step.grad_norm,
                stats.groups,
                workers.len(),
                secs,
                times.generate,
                times.reward,
                times.forward_backward,
                times.optimizer,
                times.weight_push
            );
            if self
                .cfg
                .args
                .log_interval(self.steps_per_epoch)
                .due(step.step)
                || step.step == self.total
            {
                let fields: Vec<String> = log.iter().map(|(k, v)| format!("{k}={v:.6}")).collect();
                tracing::info!(step = step.step, "{}", fields.join(" "));
            }
        }
    }

    /// SIGTERM: every rank agreed after a finished round; save it (unless the round
    /// already did) and stop.
    fn stop_at_checkpoint(&mut self) -> Result<()> {
        let step = self.engine.steps_done();
        let args = &self.cfg.args;
        let saved = step >= self.total || args.save_interval(self.steps_per_epoch).due(step);
        if !saved {
            self.checkpoint_if_due(step, true)?;
        }
        self.sess.metrics.enter_phase(Phase::Done);
        if self.sess.is_main() {
            println!(
                "stopped by SIGTERM after step {step}: resume_from_checkpoint: latest continues"
            );
        }
        crate::plot::at_end_of_run(self.sess.is_main(), &args.output_dir);
        Ok(())
    }

    fn checkpoint_if_due(&mut self, step: u64, force: bool) -> Result<()> {
        let args = &self.cfg.args;
        let last = step >= self.total;
        if !(force || last || args.save_interval(self.steps_per_epoch).due(step)) {
            return Ok(());
        }
        self.sess.metrics.enter_phase(Phase::Checkpoint);
        let state = json!({
            "command": "grpo",
            "sampler": self.sampler.state(),
            "weight_version": self.version,
        });
        let keep = args.save_total_limit.unwrap_or(usize::MAX);
        let dir = self.engine.save_checkpoint(
            &args.checkpoint_root(),
            &state,
            keep,
            Some(&self.sess.model_dir),
        )?;
        if last && self.sess.is_main() {
            publish_final_model(&dir, &args.output_dir)?;
            println!("final model: {}", args.output_dir.display());
        }
        Ok(())
    }
}
