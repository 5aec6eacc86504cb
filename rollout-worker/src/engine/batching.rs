//! The engine thread's state and its continuous-batching loop (see the parent module for
//! the data flow). Everything here runs on the `rollout-engine` thread; the only ways in
//! are [`Command`]s, and results leave through each request's event channel.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::paged::{PagedKvCache, PagedStep, SeqSpan};
use model::{SamplingParams, SeqRng, Transformer};
use tokio::sync::{mpsc, oneshot};

use super::sampler::sample_step;
use super::{Command, Shared, UpdateOutcome};
use crate::config::EngineLimits;
use crate::detok::{IncrementalDecoder, StopScan};
use crate::error::EngineError;
use crate::request::{
    finish_reason, CompletionOutput, Event, FinishReason, GroupOutput, Job, JobParams, Timings,
};
use crate::scheduler::{Scheduler, SchedulerLimits, SeqId};
use crate::weights::{self, StagedWeights};

struct Group {
    events: mpsc::UnboundedSender<Event>,
    prompt_index: usize,
    prompt_id: String,
    prompt: Arc<Vec<i64>>,
    completions: Vec<Option<CompletionOutput>>,
    seqs: Vec<SeqId>,
    remaining: usize,
    /// Set when its first sequence is scheduled; pins the weight version.
    started: Option<u64>,
    arrived: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    /// Tokens sampled for the group so far, and when it last reported progress.
    generated: usize,
    last_progress: Instant,
}

struct Seq {
    group: u64,
    index: usize,
    prompt: Arc<Vec<i64>>,
    params: Arc<JobParams>,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(i64, f32)>>,
    rng: SeqRng,
    last_token_at: Option<Instant>,
    /// The text decoded incrementally for the stop-string check (None without stop strings).
    stop_text: Option<(IncrementalDecoder, StopScan)>,
}

struct PendingUpdate {
    staged: StagedWeights,
    version: u64,
    committed: Instant,
    reply: oneshot::Sender<Result<UpdateOutcome, EngineError>>,
    /// The slow-drain warning was logged.
    warned: bool,
}

/// A committed update still waiting for in-flight groups after this long logs a WARN.
pub(super) const DRAIN_WARN_AFTER: Duration = Duration::from_secs(10);

pub(super) struct Engine {
    model: Transformer,
    shared: Arc<Shared>,
    limits: EngineLimits,
    sched: Scheduler,
    groups: HashMap<u64, Group>,
    seqs: HashMap<SeqId, Seq>,
    cache: PagedKvCache,
    next_id: u64,
    pending: Option<PendingUpdate>,
    paused: bool,
    /// Injected into the next step.
    fault: Option<super::Fault>,
    version: u64,
    /// Finished groups, sent after the loop iteration published its load, so a client
    /// that sees its result also sees the gauges without it.
    outbox: Vec<(mpsc::UnboundedSender<Event>, Event)>,
}

impl Engine {
    pub(super) fn new(model: Transformer, shared: Arc<Shared>) -> Result<Self, model::ModelError> {
        let limits = shared.info.limits;
        let cache = PagedKvCache::new(
            &model.config,
            limits.num_blocks,
            limits.block_size,
            model.kind(),
            model.device(),
        )?;
        tracing::info!(
            backend = ?cache.backend(),
            blocks = limits.num_blocks,
            block_size = limits.block_size,
            bytes = cache.bytes(),
            "paged KV cache allocated"
        );
        if cache.backend() != model::paged::AttentionBackend::CpuKernel {
            tracing::warn!(
                "no fused paged-attention kernel for {:?} on {:?}: attention gathers the blocks into a padded copy for SDPA",
                model.kind(),
                model.device()
            );
        }
        Ok(Engine {
            cache,
            model,
            limits,
            sched: Scheduler::new(SchedulerLimits {
                max_num_seqs: limits.max_num_seqs,
                num_blocks: limits.num_blocks,
                block_size: limits.block_size,
                max_num_batched_tokens: limits.max_num_batched_tokens,
                enable_prefix_caching: limits.enable_prefix_caching,
                share_group_prompts: limits.share_group_prompts,
            }),
            shared,
            groups: HashMap::new(),
            seqs: HashMap::new(),
            next_id: 0,
            pending: None,
            paused: false,
            fault: None,
            version: 0,
            outbox: vec![],
        })
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
        let _no_grad = tch::no_grad_guard();
        'outer: loop {
            // Never wait for a command while a committed update could be applied now: the
            // last started group may have finished in the step just taken, and with no
            // further request the update would otherwise wait for one.
            let block = self.paused || (self.sched.is_idle() && self.pending.is_none());
            let first = if block {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                None
            };
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                if !self.command(cmd) {
                    break 'outer;
                }
            }
            self.drop_cancelled();
            self.drop_abandoned_update();
            self.maybe_apply_update();
            if !self.paused && !self.sched.is_idle() {
                let span = tracing::trace_span!("step", running = self.sched.num_running());
                let _e = span.enter();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        // A failed step (e.g. out of memory) leaves no state behind: its
                        // sequences' blocks are freed and the prefix index is dropped.
                        tracing::error!(error = %e, "engine step failed; failing the running groups");
                        self.fail_started(e);
                    }
                    Err(panic) => {
                        let msg = panic_message(&panic);
                        tracing::error!(panic = %msg, "engine step panicked; stopping the engine");
                        self.fail_all(EngineError::Internal(format!("the engine panicked: {msg}")));
                        break 'outer;
                    }
                }
                if !self.limits.step_delay.is_zero() {
                    std::thread::sleep(self.limits.step_delay);
                }
            }
            self.report_progress();
            self.publish_load();
            for (tx, event) in self.outbox.drain(..) {
                let _ = tx.send(event);
            }
        }
        self.shared.alive.store(false, Ordering::SeqCst);
        self.publish_load();
        for (tx, event) in self.outbox.drain(..) {
            let _ = tx.send(event);
        }
        let _ = self.shared.stopped.send(true);
    }

    /// Sends each started group that has been quiet for the progress interval the
    /// number of tokens it has so far (the Generate stream's liveness messages).
    fn report_progress(&mut self) {
        let Some(every) = self.limits.progress_interval else {
            return;
        };
        let now = Instant::now();
        for g in self.groups.values_mut() {
            if g.started.is_some() && now - g.last_progress >= every {
                g.last_progress = now;
                let _ = g.events.send(Event::Progress {
                    prompt_index: g.prompt_index,
                    tokens_generated: g.generated,
                });
            }
        }
    }

    /// Ends every group, started or waiting, with `err`.
    fn fail_all(&mut self, err: EngineError) {
        let all: Vec<u64> = self.groups.keys().copied().collect();
        for gid in &all {
            let _ = self.groups[gid].events.send(Event::Error(err.clone()));
        }
        self.remove_groups(&all);
    }

    /// Handles one command; false to stop the engine.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Generate {
                job,
                arrived,
                events,
            } => self.add_job(job, arrived, events),
            Command::UpdateWeights {
                staged,
                version,
                reply,
            } => self.accept_update(staged, version, reply),
            Command::SetPaused(p) => self.paused = p,
            Command::InjectFault(f) => self.fault = Some(f),
            Command::Shutdown => return false,
        }
        true
    }

    fn add_job(&mut self, job: Job, arrived: Instant, events: mpsc::UnboundedSender<Event>) {
        let params = Arc::new(job.params);
        let n = job.n;
        let m = &self.shared.metrics;
        for (pi, (prompt_id, ids)) in job.prompts.into_iter().enumerate() {
            m.prompt_tokens_total.inc_by((ids.len() * n) as u64);
            let prompt = Arc::new(ids);
            let gid = self.next_id;
            self.next_id += 1;
            let mut seqs = Vec::with_capacity(n);
            for j in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                let rng = match params.seed {
                    Some(s) => SeqRng::seeded(s.wrapping_add((pi * n + j) as u64)),
                    None => SeqRng::from_entropy(),
                };
                self.sched.add(id, gid, prompt.to_vec());
                self.seqs.insert(
                    id,
                    Seq {
                        group: gid,
                        index: j,
                        prompt: prompt.clone(),
                        params: params.clone(),
                        tokens: vec![],
                        logprobs: vec![],
                        top_logprobs: vec![],
                        rng,
                        last_token_at: None,
                        stop_text: (!params.stop.is_empty())
                            .then(|| (IncrementalDecoder::default(), StopScan::new(&params.stop))),
                    },
                );
                seqs.push(id);
            }
            self.groups.insert(
                gid,
                Group {
                    events: events.clone(),
                    prompt_index: pi,
                    prompt_id,
                    prompt,
                    completions: vec![None; n],
                    seqs,
                    remaining: n,
                    started: None,
                    arrived,
                    scheduled_at: None,
                    first_token_at: None,
                    generated: 0,
                    last_progress: arrived,
                },
            );
        }
    }

    /// Removes every sequence of `gids` from the scheduler, the batch and the maps.
    fn remove_groups(&mut self, gids: &[u64]) {
        for gid in gids {
            if let Some(g) = self.groups.remove(gid) {
                for id in g.seqs {
                    if self.seqs.remove(&id).is_some() {
                        self.sched.remove(id);
                        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        }
    }

    /// Takes a committed update: a version not above the newest known one is refused; a
    /// newer one replaces a pending update (whose caller is told it was superseded), so
    /// an update whose caller gave up never blocks the next one.
    fn accept_update(
        &mut self,
        staged: StagedWeights,
        version: u64,
        reply: oneshot::Sender<Result<UpdateOutcome, EngineError>>,
    ) {
        let m = &self.shared.metrics;
        let current = self.pending.as_ref().map_or(self.version, |p| p.version);
        if version <= current {
            tracing::warn!(
                version,
                current,
                serving = self.version,
                "weight update refused: its version is not above the newest one"
            );
            // Counted as rejected by the front end that gets the error.
            let _ = reply.send(Err(EngineError::StaleVersion {
                current,
                requested: version,
            }));
            return;
        }
        if let Some(old) = self.pending.take() {
            let caller_gone = old.reply.is_closed();
            tracing::warn!(
                version = old.version,
                by = version,
                waited_seconds = old.committed.elapsed().as_secs_f64(),
                caller_gone,
                "pending weight update superseded before it was applied"
            );
            m.weight_updates_total
                .with_label_values(&["superseded"])
                .inc();
            let _ = old.reply.send(Err(EngineError::Superseded {
                version: old.version,
                by: version,
            }));
        }
        let started = self.groups.values().filter(|g| g.started.is_some()).count();
        tracing::debug!(
            version,
            serving = self.version,
            started_groups = started,
            "weight update committed; applying once the started groups finish"
        );
        self.pending = Some(PendingUpdate {
            staged,
            version,
            committed: Instant::now(),
            reply,
            warned: false,
        });
    }

    /// Drops a pending update whose caller went away (the trainer gave up on the
    /// commit and counts this worker as having missed the version): new groups start
    /// again on the serving weights, and the next push is not refused.
    fn drop_abandoned_update(&mut self) {
        let Some(p) = &mut self.pending else {
            return;
        };
        if p.reply.is_closed() {
            tracing::warn!(
                version = p.version,
                serving = self.version,
                waited_seconds = p.committed.elapsed().as_secs_f64(),
                "pending weight update cancelled: its commit's caller went away; the old weights keep serving"
            );
            self.shared
                .metrics
                .weight_updates_total
                .with_label_values(&["cancelled"])
                .inc();
            self.pending = None;
            return;
        }
        if !p.warned && p.committed.elapsed() >= DRAIN_WARN_AFTER {
            p.warned = true;
            let started: Vec<&Group> = self
                .groups
                .values()
                .filter(|g| g.started.is_some())
                .collect();
            tracing::warn!(
                version = p.version,
                waited_seconds = p.committed.elapsed().as_secs_f64(),
                started_groups = started.len(),
                unfinished_sequences = started.iter().map(|g| g.remaining).sum::<usize>(),
                running = self.sched.num_running(),
                waiting = self.sched.num_waiting(),
                paused = self.paused,
                "committed weight update still waits for in-flight groups"
            );
        }
    }

    fn drop_cancelled(&mut self) {
        let closed: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.events.is_closed())
            .map(|(&k, _)| k)
            .collect();
        if !closed.is_empty() {
            tracing::debug!(groups = closed.len(), "client went away; cancelling groups");
            self.remove_groups(&closed);
        }
    }

    /// Ends every started group with `err`; their blocks return to the pool and the
    /// prefix index (whose blocks the failed step may have half written) is dropped.
    fn fail_started(&mut self, err: EngineError) {
        let started: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.started.is_some())
            .map(|(&k, _)| k)
            .collect();
        for gid in &started {
            let _ = self.groups[gid].events.send(Event::Error(err.clone()));
        }
        self.remove_groups(&started);
        self.sched.reset_prefix_cache();
    }

    fn maybe_apply_update(&mut self) {
        if self.pending.is_none() || self.groups.values().any(|g| g.started.is_some()) {
            return;
        }
        let mut p = self.pending.take().expect("checked above");
        let span = tracing::info_span!("weight_sync", version = p.version);
        let _e = span.enter();
        let m = &self.shared.metrics;
        let result = weights::apply(&self.model.weights, &mut p.staged);
        match result {
            Ok(applied) => {
                // Cached prefixes hold keys of the old weights.
                self.sched.reset_prefix_cache();
                self.version = p.version;
                self.shared.version.store(p.version, Ordering::SeqCst);
                m.weight_version.set(p.version as i64);
                m.weight_updates_total.with_label_values(&["applied"]).inc();
                let apply_seconds = p.committed.elapsed().as_secs_f64();
                tracing::info!(
                    version = p.version,
                    apply_seconds,
                    swapped = applied.swapped,
                    copied = applied.copied,
                    "weights updated"
                );
                let _ = p.reply.send(Ok(UpdateOutcome {
                    version: p.version,
                    apply_seconds,
                }));
            }
            Err(e) => {
                m.weight_updates_total
                    .with_label_values(&["rejected"])
                    .inc();
                let _ = p.reply.send(Err(e.into()));
            }
        }
    }

    fn publish_load(&self) {
        let (running, waiting) = (self.sched.num_running(), self.sched.num_waiting());
        self.shared.running.store(running, Ordering::SeqCst);
        self.shared.waiting.store(waiting, Ordering::SeqCst);
        let m = &self.shared.metrics;
        m.num_requests_running.set(running as i64);
        m.num_requests_waiting.set(waiting as i64);
        m.kv_cache_usage_perc.set(self.sched.kv_cache_usage());
        let (queries, hits) = self.sched.prefix_cache_stats();
        m.prefix_cache_queries
            .inc_by(queries - m.prefix_cache_queries.get());
        m.prefix_cache_hits.inc_by(hits - m.prefix_cache_hits.get());
        let used = self.sched.num_used_blocks();
        self.shared.kv_blocks_peak.fetch_max(used, Ordering::SeqCst);
    }

    /// One scheduling decision and one packed forward of every scheduled token: decode
    /// tokens and prefill chunks together, no padding, keys and values written in place.
    fn step(&mut self) -> Result<(), EngineError> {
        match self.fault.take() {
            Some(super::Fault::StepError) => {
                return Err(EngineError::Internal("injected step failure".into()))
            }
            Some(super::Fault::Panic) => panic!("injected engine panic"),
            None => {}
        }
        let draining = self.pending.is_some();
        let decision = {
            let (groups, seqs) = (&self.groups, &self.seqs);
            self.sched.schedule(|id| {
                !draining
                    || seqs
                        .get(&id)
                        .is_some_and(|s| groups[&s.group].started.is_some())
            })
        };
        let m = self.shared.metrics.clone();
        if !decision.preempted.is_empty() {
            m.num_preemptions_total
                .inc_by(decision.preempted.len() as u64);
        }
        let now = Instant::now();
        for id in &decision.admitted {
            let g = self.seqs[id].group;
            let version = self.version;
            let group = self.groups.get_mut(&g).expect("live sequence has a group");
            if group.started.is_none() {
                group.started = Some(version);
                group.scheduled_at = Some(now);
                group.last_progress = now;
                m.request_queue_time_seconds
                    .observe((now - group.arrived).as_secs_f64());
            }
        }
        if decision.scheduled.is_empty() {
            return Ok(());
        }
        for &(src, dst) in &decision.copies {
            self.cache.copy_block(src, dst)?;
        }
        let mut tokens = Vec::with_capacity(decision.num_tokens());
        let mut meta = Vec::with_capacity(decision.scheduled.len());
        let mut logit_rows = vec![];
        let mut rows = vec![];
        let mut prefill = 0u64;
        for x in &decision.scheduled {
            meta.push((tokens.len(), x.len, x.start + x.len));
            tokens.extend_from_slice(&self.sched.tokens(x.id)[x.start..x.start + x.len]);
            let s = &self.seqs[&x.id];
            let decode = x.len == 1
                && !s.tokens.is_empty()
                && x.start + 1 == s.prompt.len() + s.tokens.len();
            if !decode {
                prefill += x.len as u64;
            }
            if x.sample {
                for id in std::iter::once(x.id).chain(x.forks.iter().copied()) {
                    logit_rows.push(tokens.len() as i64 - 1);
                    rows.push(id);
                }
            }
        }
        self.shared
            .prefill_tokens
            .fetch_add(prefill, Ordering::SeqCst);
        let logits = {
            let spans: Vec<SeqSpan> = decision
                .scheduled
                .iter()
                .zip(&meta)
                .map(|(x, &(q_start, q_len, ctx_len))| SeqSpan {
                    q_start,
                    q_len,
                    ctx_len,
                    blocks: self.sched.blocks(x.id),
                })
                .collect();
            let step = PagedStep {
                tokens: &tokens,
                spans: &spans,
            };
            self.model
                .forward_paged(&step, &mut self.cache, &logit_rows)?
        };
        if rows.is_empty() {
            return Ok(());
        }
        let finished = self.sample_rows(&rows, &logits)?;
        for (id, reason) in finished {
            self.finish_seq(id, reason);
        }
        Ok(())
    }

    /// Samples the next token of each row from `logits` `[N, V]`, records it with its
    /// log-prob, and returns the rows that finished. One device-to-host transfer.
    fn sample_rows(
        &mut self,
        rows: &[SeqId],
        logits: &tch::Tensor,
    ) -> Result<Vec<(SeqId, FinishReason)>, EngineError> {
        let temps: Vec<f32> = rows
            .iter()
            .map(|id| self.seqs[id].params.logprob_temperature() as f32)
            .collect();
        let params: Vec<SamplingParams> = rows
            .iter()
            .map(|id| self.seqs[id].params.sampling)
            .collect();
        let k = rows
            .iter()
            .map(|id| self.seqs[id].params.top_logprobs)
            .max()
            .unwrap_or(0);
        let mut rngs: Vec<SeqRng> = rows
            .iter()
            .map(|id| {
                let s = self.seqs.get_mut(id).expect("live row");
                std::mem::replace(&mut s.rng, SeqRng::seeded(0))
            })
            .collect();
        let sampled = sample_step(logits, &params, &mut rngs, &temps, k);
        for (id, rng) in rows.iter().zip(rngs) {
            self.seqs.get_mut(id).expect("live row").rng = rng;
        }
        let sampled = sampled?;
        let (next, lp) = (&sampled.ids, &sampled.logprobs);
        let now = Instant::now();
        let m = self.shared.metrics.clone();
        m.generation_tokens_total.inc_by(rows.len() as u64);
        let mut finished = vec![];
        for (r, id) in rows.iter().enumerate() {
            self.sched.append_token(*id, next[r]);
            let s = self.seqs.get_mut(id).expect("live row");
            let want = s.params.top_logprobs;
            let top: Vec<(i64, f32)> = match &sampled.top {
                Some((k, t)) if want > 0 => t[r * k..r * k + want].to_vec(),
                _ => vec![],
            };
            s.tokens.push(next[r]);
            s.logprobs.push(lp[r]);
            if want > 0 {
                s.top_logprobs.push(top.clone());
            }
            if let Some(t) = s.last_token_at {
                m.inter_token_latency_seconds
                    .observe((now - t).as_secs_f64());
            }
            s.last_token_at = Some(now);
            let group = self
                .groups
                .get_mut(&s.group)
                .expect("live sequence has a group");
            group.generated += 1;
            if group.first_token_at.is_none() {
                group.first_token_at = Some(now);
                m.time_to_first_token_seconds
                    .observe((now - group.arrived).as_secs_f64());
            }
            if s.params.stream_tokens {
                let _ = group.events.send(Event::Token {
                    prompt_index: group.prompt_index,
                    completion_index: s.index,
                    token: next[r],
                    logprob: lp[r],
                    top_logprobs: top,
                });
            }
            // The stop string found in the text so far and its held-back tail (a full
            // decode of the tokens), searched only where a new one can begin.
            let text = match &mut s.stop_text {
                Some((decoder, scan)) => {
                    let new = decoder
                        .step(&self.shared.tokenizer, &s.tokens)
                        .unwrap_or_default();
                    scan.push(&new, decoder.held(), &s.params.stop);
                    scan.matched(&s.params.stop)
                }
                None => None,
            };
            if let Some(reason) = finish_reason(
                &s.params,
                &s.tokens,
                s.prompt.len(),
                self.limits.max_model_len,
                text,
            ) {
                finished.push((*id, reason));
            }
        }
        Ok(finished)
    }

    /// Records a finished sequence; sends its group when it was the last one.
    fn finish_seq(&mut self, id: SeqId, reason: FinishReason) {
        self.sched.remove(id);
        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
        let Some(s) = self.seqs.remove(&id) else {
            return;
        };
        let m = &self.shared.metrics;
        m.request_success_total
            .with_label_values(&[match reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            }])
            .inc();
        let text = if s.params.return_text {
            let ids: Vec<u32> = s.tokens.iter().map(|&t| t as u32).collect();
            let text = self.shared.tokenizer.decode(&ids, true).unwrap_or_default();
            Some(match first_stop(&text, &s.params.stop) {
                Some(at) => text[..at].to_string(),
                None => text,
            })
        } else {
            None
        };
        let g = self
            .groups
            .get_mut(&s.group)
            .expect("live sequence has a group");
        g.completions[s.index] = Some(CompletionOutput {
            tokens: s.tokens,
            logprobs: s.logprobs,
            top_logprobs: s.top_logprobs,
            finish_reason: reason,
            text,
        });
        g.remaining -= 1;
        if g.remaining > 0 {
            return;
        }
        let g = self.groups.remove(&s.group).expect("present above");
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map_or(Default::default(), |t| t - g.arrived);
        m.e2e_request_latency_seconds
            .observe((now - g.arrived).as_secs_f64());
        let out = GroupOutput {
            prompt_index: g.prompt_index,
            prompt_id: g.prompt_id,
            prompt_token_ids: g.prompt.to_vec(),
            completions: g.completions.into_iter().flatten().collect(),
            weight_version: g.started.unwrap_or(self.version),
            timings: Timings {
                queue: since(g.scheduled_at),
                time_to_first_token: since(g.first_token_at),
                total: now - g.arrived,
            },
        };
        self.outbox.push((g.events, Event::Group(out)));
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The message of a caught panic.
fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
