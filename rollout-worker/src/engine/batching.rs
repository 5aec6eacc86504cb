//! The engine thread's state and its continuous-batching loop (see the parent module for
//! the data flow). Everything here runs on the `rollout-engine` thread; the only ways in
//! are [`Command`]s, and results leave through each request's event channel.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use model::{ForwardInput, KvCache, SamplingParams, SeqRng, Tokenizer, Transformer};
use tch::{Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

use super::{Command, Shared, UpdateOutcome};
use crate::config::EngineLimits;
use crate::error::EngineError;
use crate::request::{CompletionOutput, Event, FinishReason, GroupOutput, Job, JobParams, Timings};
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
}

struct PendingUpdate {
    staged: StagedWeights,
    version: u64,
    committed: Instant,
    reply: oneshot::Sender<Result<UpdateOutcome, EngineError>>,
}

pub(super) struct Engine {
    model: Transformer,
    shared: Arc<Shared>,
    limits: EngineLimits,
    sched: Scheduler,
    groups: HashMap<u64, Group>,
    seqs: HashMap<SeqId, Seq>,
    /// Row order of `cache`.
    batch: Vec<SeqId>,
    cache: KvCache,
    next_id: u64,
    pending: Option<PendingUpdate>,
    paused: bool,
    version: u64,
    /// Finished groups, sent after the loop iteration published its load, so a client
    /// that sees its result also sees the gauges without it.
    outbox: Vec<(mpsc::UnboundedSender<Event>, Event)>,
}

impl Engine {
    pub(super) fn new(model: Transformer, shared: Arc<Shared>) -> Self {
        let limits = shared.info.limits;
        Engine {
            cache: KvCache::new(model.config.num_hidden_layers),
            model,
            limits,
            sched: Scheduler::new(SchedulerLimits {
                max_num_seqs: limits.max_num_seqs,
                kv_cache_tokens: limits.kv_cache_tokens,
            }),
            shared,
            groups: HashMap::new(),
            seqs: HashMap::new(),
            batch: vec![],
            next_id: 0,
            pending: None,
            paused: false,
            version: 0,
            outbox: vec![],
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
        let _no_grad = tch::no_grad_guard();
        'outer: loop {
            let block = self.paused || self.sched.is_idle();
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
            self.maybe_apply_update();
            if !self.paused && !self.sched.is_idle() {
                let span = tracing::trace_span!("step", running = self.batch.len());
                let _e = span.enter();
                if let Err(e) = self.step() {
                    tracing::error!(error = %e, "engine step failed; failing the running groups");
                    self.fail_started(e);
                }
            }
            self.publish_load();
            for (tx, event) in self.outbox.drain(..) {
                let _ = tx.send(event);
            }
        }
        self.shared.alive.store(false, Ordering::SeqCst);
        self.publish_load();
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
            } => {
                let current = self.pending.as_ref().map_or(self.version, |p| p.version);
                if version <= current {
                    let _ = reply.send(Err(EngineError::StaleVersion {
                        current,
                        requested: version,
                    }));
                } else if self.pending.is_some() {
                    let _ = reply.send(Err(EngineError::InvalidArgument(
                        "another weight update is pending".into(),
                    )));
                } else {
                    self.pending = Some(PendingUpdate {
                        staged,
                        version,
                        committed: Instant::now(),
                        reply,
                    });
                }
            }
            Command::SetPaused(p) => self.paused = p,
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
                self.sched.add(id, prompt.len());
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
                },
            );
        }
    }

    /// Removes every sequence of `gids` from the scheduler, the batch and the maps.
    fn remove_groups(&mut self, gids: &[u64]) {
        let mut gone = HashSet::new();
        for gid in gids {
            if let Some(g) = self.groups.remove(gid) {
                for id in g.seqs {
                    if self.seqs.remove(&id).is_some() {
                        self.sched.remove(id);
                        self.shared.outstanding.fetch_sub(1, Ordering::SeqCst);
                        gone.insert(id);
                    }
                }
            }
        }
        if let Err(e) = self.drop_rows(&gone) {
            tracing::error!(error = %e, "dropping cache rows failed; resetting the batch");
            self.fail_started(e);
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

    /// Ends every started group with `err` and empties the batch.
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
        self.batch.clear();
        self.cache = KvCache::new(self.model.config.num_hidden_layers);
        self.remove_groups(&started);
    }

    /// Drops the rows of `ids` from the batch and the cache.
    fn drop_rows(&mut self, ids: &HashSet<SeqId>) -> Result<(), EngineError> {
        if !self.batch.iter().any(|id| ids.contains(id)) {
            return Ok(());
        }
        let keep: Vec<i64> = (0..self.batch.len() as i64)
            .filter(|&i| !ids.contains(&self.batch[i as usize]))
            .collect();
        self.batch.retain(|id| !ids.contains(id));
        if self.batch.is_empty() {
            self.cache = KvCache::new(self.model.config.num_hidden_layers);
        } else {
            let idx = Tensor::from_slice(&keep).to_device(self.model.device());
            self.cache = self.cache.select(&idx)?;
            self.cache.compact()?;
        }
        Ok(())
    }

    fn maybe_apply_update(&mut self) {
        if self.pending.is_none() || self.groups.values().any(|g| g.started.is_some()) {
            return;
        }
        let p = self.pending.take().expect("checked above");
        let span = tracing::info_span!("weight_sync", version = p.version);
        let _e = span.enter();
        let m = &self.shared.metrics;
        let result = weights::apply(&self.model.weights, &p.staged);
        match result {
            Ok(()) => {
                self.version = p.version;
                self.shared.version.store(p.version, Ordering::SeqCst);
                m.weight_version.set(p.version as i64);
                m.weight_updates_total.with_label_values(&["applied"]).inc();
                let apply_seconds = p.committed.elapsed().as_secs_f64();
                tracing::info!(version = p.version, apply_seconds, "weights updated");
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
        m.kv_cache_usage_perc
            .set(self.sched.kv_tokens_used() as f64 / self.limits.kv_cache_tokens as f64);
    }

    /// One scheduling decision, one decode of the running rows, one prefill of the
    /// admitted ones.
    fn step(&mut self) -> Result<(), EngineError> {
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
        if !decision.preempted.is_empty() {
            let m = &self.shared.metrics;
            m.num_preemptions_total
                .inc_by(decision.preempted.len() as u64);
            let ids: HashSet<SeqId> = decision.preempted.iter().copied().collect();
            self.drop_rows(&ids)?;
        }
        let mut finished = vec![];
        if !self.batch.is_empty() {
            let pending: Vec<i64> = self
                .batch
                .iter()
                .map(|id| {
                    *self.seqs[id]
                        .tokens
                        .last()
                        .expect("running rows have a token")
                })
                .collect();
            let ids = Tensor::from_slice(&pending)
                .view([pending.len() as i64, 1])
                .to_device(self.model.device());
            let hidden = self
                .model
                .hidden_states(&ForwardInput::new(&ids), Some(&mut self.cache))?;
            let logits = self.model.logits(&hidden.select(1, -1));
            let rows = self.batch.clone();
            finished.extend(self.sample_rows(&rows, &logits)?);
        }
        if !decision.admitted.is_empty() {
            let now = Instant::now();
            for id in &decision.admitted {
                let g = self.seqs[id].group;
                let version = self.version;
                let group = self.groups.get_mut(&g).expect("live sequence has a group");
                if group.started.is_none() {
                    group.started = Some(version);
                    group.scheduled_at = Some(now);
                    self.shared
                        .metrics
                        .request_queue_time_seconds
                        .observe((now - group.arrived).as_secs_f64());
                }
            }
            let (new_cache, logits) = self.prefill(&decision.admitted)?;
            self.cache = KvCache::concat(&[&self.cache, &new_cache])?;
            self.batch.extend(decision.admitted.iter().copied());
            finished.extend(self.sample_rows(&decision.admitted, &logits)?);
        }
        if !finished.is_empty() {
            let ids: HashSet<SeqId> = finished.iter().map(|(id, _)| *id).collect();
            self.drop_rows(&ids)?;
            for (id, reason) in finished {
                self.finish_seq(id, reason);
            }
        }
        Ok(())
    }

    /// Prefills `ids` (prompt + tokens so far, left-padded) into a fresh cache; returns
    /// it and the last position's logits `[N, V]`.
    fn prefill(&mut self, ids: &[SeqId]) -> Result<(KvCache, Tensor), EngineError> {
        let inputs: Vec<Vec<i64>> = ids
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let mut v = Vec::with_capacity(s.prompt.len() + s.tokens.len());
                v.extend_from_slice(&s.prompt);
                v.extend_from_slice(&s.tokens);
                v
            })
            .collect();
        let (b, t) = (inputs.len(), inputs.iter().map(Vec::len).max().unwrap_or(0));
        let mut flat = vec![0i64; b * t];
        let mut mask = vec![0i64; b * t];
        for (i, x) in inputs.iter().enumerate() {
            let off = i * t + (t - x.len());
            flat[off..off + x.len()].copy_from_slice(x);
            mask[off..off + x.len()].fill(1);
        }
        let device = self.model.device();
        let shape = [b as i64, t as i64];
        let flat = Tensor::from_slice(&flat).view(shape).to_device(device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(device);
        let mut cache = KvCache::new(self.model.config.num_hidden_layers);
        let hidden = self
            .model
            .hidden_states(&ForwardInput::new(&flat).with_mask(&mask), Some(&mut cache))?;
        let logits = self.model.logits(&hidden.select(1, -1));
        Ok((cache, logits))
    }

    /// Samples the next token of each row from `logits` `[N, V]`, records it with its
    /// log-prob, and returns the rows that finished. One host sync for the tokens, one
    /// for the log-probs.
    fn sample_rows(
        &mut self,
        rows: &[SeqId],
        logits: &Tensor,
    ) -> Result<Vec<(SeqId, FinishReason)>, EngineError> {
        let logits = logits.to_kind(Kind::Float);
        // Log-probs first: `model::sample` may scale its (aliased) fp32 input in place.
        let device = logits.device();
        let temps: Vec<f32> = rows
            .iter()
            .map(|id| self.seqs[id].params.logprob_temperature() as f32)
            .collect();
        let temps = Tensor::from_slice(&temps).view([-1, 1]).to_device(device);
        let logp = (&logits / temps).f_log_softmax(-1, Kind::Float)?;
        let params: Vec<SamplingParams> = rows
            .iter()
            .map(|id| self.seqs[id].params.sampling)
            .collect();
        let mut rngs: Vec<SeqRng> = rows
            .iter()
            .map(|id| {
                let s = self.seqs.get_mut(id).expect("live row");
                std::mem::replace(&mut s.rng, SeqRng::seeded(0))
            })
            .collect();
        let sampled = model::sample(&logits, &params, &mut rngs);
        for (id, rng) in rows.iter().zip(rngs) {
            self.seqs.get_mut(id).expect("live row").rng = rng;
        }
        let next = sampled?;
        let next_t = Tensor::from_slice(&next).view([-1, 1]).to_device(device);
        let lp = Vec::<f32>::try_from(
            logp.f_gather(-1, &next_t, false)?
                .view([-1])
                .to_device(tch::Device::Cpu),
        )?;
        let k = rows
            .iter()
            .map(|id| self.seqs[id].params.top_logprobs)
            .max()
            .unwrap_or(0);
        let tops = if k > 0 {
            let (v, i) = logp.f_topk(k as i64, -1, true, true)?;
            let v = Vec::<f32>::try_from(v.reshape([-1]).to_device(tch::Device::Cpu))?;
            let i = Vec::<i64>::try_from(i.reshape([-1]).to_device(tch::Device::Cpu))?;
            Some((v, i))
        } else {
            None
        };
        let now = Instant::now();
        let m = self.shared.metrics.clone();
        m.generation_tokens_total.inc_by(rows.len() as u64);
        let mut finished = vec![];
        for (r, id) in rows.iter().enumerate() {
            let s = self.seqs.get_mut(id).expect("live row");
            let want = s.params.top_logprobs;
            let top: Vec<(i64, f32)> = match &tops {
                Some((v, i)) if want > 0 => {
                    (0..want).map(|j| (i[r * k + j], v[r * k + j])).collect()
                }
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
            let p = &s.params;
            let reason = if p.stop_token_ids.binary_search(&next[r]).is_ok()
                || (!p.stop.is_empty()
                    && stop_string_at(&self.shared.tokenizer, &s.tokens, &p.stop).is_some())
            {
                Some(FinishReason::Stop)
            } else if s.tokens.len() >= p.max_new_tokens
                || s.prompt.len() + s.tokens.len() >= self.limits.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
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

/// Where a stop string occurs in the decoded `tokens`, if any.
fn stop_string_at(tok: &Tokenizer, tokens: &[i64], stop: &[String]) -> Option<usize> {
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let text = tok.decode(&ids, true).ok()?;
    first_stop(&text, stop)
}
