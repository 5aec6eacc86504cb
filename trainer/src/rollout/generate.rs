//! `RolloutClient::generate`: one task per request in flight streams its groups into a
//! channel; the caller's task owns the [`Dispatch`] state, validates each group, fails
//! workers and re-queues what they still owed.

use super::error::GroupViolation;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use super::dispatch::{Dispatch, FlightId, Lookup};
use super::{
    grpc_client, status_text, Completion, FinishReason, Inner, PromptJob, RolloutClient,
    RolloutError, RolloutGroup, Sampling,
};

/// What a flight task reports.
enum FlightEvent {
    Group(FlightId, pb::GroupResult),
    /// The stream ended normally.
    End(FlightId),
    Failed(FlightId, FlightError),
}

enum FlightError {
    Status(tonic::Status),
    /// No group (or no response) for this long.
    Silent(Duration),
}

/// A request slot taken on a worker; dropping it gives the slot back and wakes waiters.
struct SlotGuard {
    inner: Arc<Inner>,
    worker: usize,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.inner.pool().release(self.worker);
        self.inner.bump();
    }
}

/// A flight's task and its slot.
struct Running {
    task: AbortHandle,
    _slot: SlotGuard,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Dropping the call's stream cancels the worker's remaining groups.
        self.task.abort();
    }
}

/// Runs one `Generate` call to its end, forwarding each group.
async fn run_flight(
    id: FlightId,
    mut client: super::WorkerClient,
    req: pb::GenerateRequest,
    timeout: Duration,
    tx: mpsc::Sender<FlightEvent>,
) {
    let outcome = async {
        let mut stream = match tokio::time::timeout(timeout, client.generate(req)).await {
            Err(_) => return FlightEvent::Failed(id, FlightError::Silent(timeout)),
            Ok(Err(s)) => return FlightEvent::Failed(id, FlightError::Status(s)),
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            match tokio::time::timeout(timeout, stream.message()).await {
                Err(_) => return FlightEvent::Failed(id, FlightError::Silent(timeout)),
                Ok(Err(s)) => return FlightEvent::Failed(id, FlightError::Status(s)),
                Ok(Ok(None)) => return FlightEvent::End(id),
                // Liveness only: the timeout measures silence since the last message.
                Ok(Ok(Some(g))) if g.progress.is_some() => continue,
                Ok(Ok(Some(g))) => {
                    if tx.send(FlightEvent::Group(id, g)).await.is_err() {
                        return FlightEvent::End(id);
                    }
                }
            }
        }
    }
    .await;
    let _ = tx.send(outcome).await;
}

/// The request for consecutive jobs `jobs`; see [`super::dispatch`] for the seed offset.
fn request(
    all: &[PromptJob],
    jobs: &[usize],
    n: u32,
    sampling: &Sampling,
    return_text: bool,
) -> pb::GenerateRequest {
    let mut sampling = sampling.to_wire();
    sampling.seed = sampling
        .seed
        .map(|s| s.wrapping_add(jobs[0] as u64 * u64::from(n)));
    pb::GenerateRequest {
        prompts: jobs
            .iter()
            .map(|&j| pb::Prompt {
                id: all[j].key.to_string(),
                input: Some(pb::prompt::Input::TokenIds(pb::TokenIds {
                    ids: all[j].token_ids.clone(),
                })),
            })
            .collect(),
        n,
        sampling: Some(sampling),
        return_text,
    }
}

/// Why a group that maps to `job` cannot be accepted, if it cannot.
fn check_group(g: &pb::GroupResult, job: &PromptJob, n: u32) -> Result<(), GroupViolation> {
    if g.completions.len() != n as usize {
        return Err(GroupViolation::Count {
            key: job.key.to_string(),
            got: g.completions.len(),
            n,
        });
    }
    if g.prompt_token_ids != job.token_ids {
        return Err(GroupViolation::Prompt {
            key: job.key.to_string(),
            got: g.prompt_token_ids.len(),
            sent: job.token_ids.len(),
        });
    }
    if let Some((j, c)) = g
        .completions
        .iter()
        .enumerate()
        .find(|(_, c)| c.logprobs.len() != c.token_ids.len())
    {
        return Err(GroupViolation::Logprobs {
            key: job.key.to_string(),
            index: j,
            tokens: c.token_ids.len(),
            logprobs: c.logprobs.len(),
        });
    }
    if let Some((j, c)) = g
        .completions
        .iter()
        .enumerate()
        .find(|(_, c)| FinishReason::from_wire(c.finish_reason).is_none())
    {
        return Err(GroupViolation::FinishReason {
            key: job.key.to_string(),
            index: j,
            finish_reason: c.finish_reason,
        });
    }
    Ok(())
}

/// The wire completion as the domain type (its finish reason was checked).
fn completion_from_wire(c: pb::Completion) -> Completion {
    Completion {
        finish_reason: FinishReason::from_wire(c.finish_reason).unwrap_or(FinishReason::Length),
        token_ids: c.token_ids,
        logprobs: c.logprobs,
        text: c.text,
    }
}

/// State of one `generate` call besides the pure [`Dispatch`].
struct Call<'a> {
    inner: &'a Arc<Inner>,
    dispatch: Dispatch,
    running: HashMap<FlightId, Running>,
}

impl Call<'_> {
    /// Abandons every flight on `worker`; their missing groups are re-queued.
    fn abandon_worker(&mut self, worker: usize) -> usize {
        let mut requeued = 0;
        for id in self.dispatch.flights_on(worker) {
            requeued += self.dispatch.fail(id);
            self.running.remove(&id);
        }
        requeued
    }

    fn fail_worker(&mut self, worker: usize, reason: String) {
        let url = {
            let mut pool = self.inner.pool();
            pool.mark_failed(worker, reason.clone(), Instant::now());
            pool.slots[worker].url.clone()
        };
        let requeued = self.abandon_worker(worker);
        tracing::warn!(worker = %url, error = %reason, requeued, "rollout worker failed; re-sending its groups");
        self.inner.bump();
    }
}

impl RolloutClient {
    /// Generates one group of `n` completions per job; returns exactly one group per job,
    /// in job order.
    ///
    /// Jobs go out in requests of at most `max_prompts_per_request` consecutive jobs,
    /// spread over usable workers (least in flight first) with at most
    /// `max_requests_per_worker` in flight on each; `on_group` is called for each group
    /// as it arrives. A worker whose call fails, whose stream breaks or which sends no
    /// group for `request_timeout_secs` is marked failed; the groups of its requests not
    /// yet received are re-sent to another usable worker (never duplicated, never lost;
    /// groups already received are kept). Only workers serving weight version
    /// `>= min_version` are usable; a group with an older version (a restarted worker)
    /// is dropped, re-sent, and the worker skipped until a push updates it. Failed
    /// workers are re-probed with backoff and used again once healthy. With a seed set,
    /// completion `j` of job `g` is drawn from stream `seed + g * n + j` whichever
    /// worker serves it, so results do not depend on failures or scheduling.
    ///
    /// Errors: [`RolloutError::NoUsableWorker`] once no worker has been usable for
    /// `request_timeout_secs` (listing every worker's state), and
    /// [`RolloutError::Rejected`] if a worker refuses the request as invalid.
    pub async fn generate(
        &self,
        jobs: Vec<PromptJob>,
        n: u32,
        sampling: Sampling,
        return_text: bool,
        min_version: u64,
        on_group: impl FnMut(&RolloutGroup) + Send,
    ) -> Result<Vec<RolloutGroup>, RolloutError> {
        if n == 0 {
            return Err(RolloutError::InvalidInput("n must be at least 1".into()));
        }
        if let Some((i, j)) = jobs
            .iter()
            .enumerate()
            .find(|(_, j)| j.token_ids.is_empty())
        {
            return Err(RolloutError::InvalidInput(format!(
                "job {i} (key {}) has no prompt tokens",
                j.key
            )));
        }
        if jobs.is_empty() {
            return Ok(vec![]);
        }
        let span = tracing::info_span!("rollout", jobs = jobs.len(), n, min_version);
        self.generate_inner(jobs, n, sampling, return_text, min_version, on_group)
            .instrument(span)
            .await
    }

    async fn generate_inner(
        &self,
        jobs: Vec<PromptJob>,
        n: u32,
        sampling: Sampling,
        return_text: bool,
        min_version: u64,
        mut on_group: impl FnMut(&RolloutGroup) + Send,
    ) -> Result<Vec<RolloutGroup>, RolloutError> {
        let inner = &self.inner;
        let timeout = inner.cfg.request_timeout();
        let mut call = Call {
            inner,
            dispatch: Dispatch::new(jobs.len(), inner.cfg.max_prompts_per_request),
            running: HashMap::new(),
        };
        let mut results: Vec<Option<RolloutGroup>> = (0..jobs.len()).map(|_| None).collect();
        let mut received = 0usize;
        let (tx, mut rx) = mpsc::channel::<FlightEvent>(64);
        // Dropped on return: aborts whatever still runs.
        let mut tasks = JoinSet::new();
        let mut changes = inner.changes.subscribe();
        let mut unusable_since: Option<Instant> = None;

        while !call.dispatch.is_complete() {
            changes.borrow_and_update();
            inner.spawn_due_probes();
            while call.dispatch.has_pending() {
                let Some((worker, channel)) = inner.pool().acquire(min_version) else {
                    break;
                };
                let slot = SlotGuard {
                    inner: inner.clone(),
                    worker,
                };
                let (id, flight) = call.dispatch.start(worker).expect("a request is pending");
                let req = request(&jobs, &flight.jobs, n, &sampling, return_text);
                let task = tasks.spawn(run_flight(
                    id,
                    grpc_client(channel),
                    req,
                    timeout,
                    tx.clone(),
                ));
                call.running.insert(id, Running { task, _slot: slot });
            }
            while tasks.try_join_next().is_some() {}

            let now = Instant::now();
            let (any_usable, next_probe) = {
                let pool = inner.pool();
                (pool.any_usable(min_version), pool.next_probe_at())
            };
            let give_up_at = if any_usable || !call.running.is_empty() {
                unusable_since = None;
                None
            } else {
                let since = *unusable_since.get_or_insert(now);
                if now.duration_since(since) >= timeout {
                    return Err(RolloutError::NoUsableWorker {
                        min_version,
                        waited_secs: now.duration_since(since).as_secs_f64(),
                        received,
                        total: jobs.len(),
                        workers: inner.pool().describe(),
                    });
                }
                Some(since + timeout)
            };
            let wake = [give_up_at, next_probe].into_iter().flatten().min();
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };

            let event = tokio::select! {
                ev = rx.recv() => ev,
                _ = changes.changed() => None,
                _ = sleep => None,
            };
            let Some(event) = event else { continue };
            match event {
                FlightEvent::Group(id, g) => {
                    let Some(worker) = call.dispatch.flight(id).map(|f| f.worker) else {
                        continue; // a late group of an abandoned flight: it was re-queued
                    };
                    let job = match call.dispatch.lookup(id, g.prompt_index) {
                        Lookup::Stale => continue,
                        Lookup::Invalid(why) => {
                            call.fail_worker(worker, format!("protocol violation: {why}"));
                            continue;
                        }
                        Lookup::Job(j) => j,
                    };
                    if let Err(why) = check_group(&g, &jobs[job], n) {
                        call.fail_worker(worker, format!("protocol violation: {why}"));
                        continue;
                    }
                    if g.weight_version < min_version {
                        inner
                            .stale_dropped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Only a restart lowers a worker's version: skip it until a push.
                        let url = {
                            let mut pool = inner.pool();
                            pool.observe_version(worker, g.weight_version);
                            pool.slots[worker].url.clone()
                        };
                        let requeued = call.abandon_worker(worker);
                        tracing::warn!(worker = %url, version = g.weight_version, min_version, requeued,
                            "rollout worker serves a stale weight version (restarted?); skipping it");
                        continue;
                    }
                    call.dispatch.receive(id, g.prompt_index);
                    let url = {
                        let mut pool = inner.pool();
                        pool.count_group(worker);
                        if pool.slots[worker]
                            .version
                            .is_none_or(|v| v < g.weight_version)
                        {
                            pool.observe_version(worker, g.weight_version);
                        }
                        pool.slots[worker].url.clone()
                    };
                    let group = RolloutGroup {
                        key: jobs[job].key,
                        prompt_ids: g.prompt_token_ids,
                        completions: g
                            .completions
                            .into_iter()
                            .map(completion_from_wire)
                            .collect(),
                        weight_version: g.weight_version,
                        worker: url,
                    };
                    on_group(&group);
                    results[job] = Some(group);
                    received += 1;
                }
                FlightEvent::End(id) => {
                    let Some(worker) = call.dispatch.flight(id).map(|f| f.worker) else {
                        continue;
                    };
                    match call.dispatch.finish(id) {
                        Ok(()) => {
                            call.running.remove(&id);
                        }
                        Err(missing) => call.fail_worker(
                            worker,
                            format!("the stream ended with {missing} group(s) missing"),
                        ),
                    }
                }
                FlightEvent::Failed(id, err) => {
                    let Some(worker) = call.dispatch.flight(id).map(|f| f.worker) else {
                        continue;
                    };
                    match err {
                        FlightError::Status(s) if s.code() == tonic::Code::InvalidArgument => {
                            return Err(RolloutError::Rejected {
                                worker: inner.pool().slots[worker].url.clone(),
                                message: s.message().to_string(),
                            });
                        }
                        FlightError::Status(s) => {
                            call.fail_worker(worker, format!("Generate: {}", status_text(&s)))
                        }
                        FlightError::Silent(t) => call.fail_worker(
                            worker,
                            format!("Generate: no group for {:.1}s", t.as_secs_f64()),
                        ),
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|g| g.expect("every job has its group"))
            .collect())
    }
}
