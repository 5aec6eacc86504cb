//! The trainer's client to the rollout workers (`rollout.v1` over gRPC).
//!
//! Data flow: [`RolloutClient::connect`] probes every worker (`Health`) into the
//! [`pool`] (plain state: health, weight version, calls in flight, backoff).
//! [`RolloutClient::generate`] cuts the prompt jobs into requests ([`dispatch`], plain
//! state), sends each to the least-loaded usable worker as a streaming `Generate` call,
//! and collects the groups as they stream in; a worker whose call fails, whose stream
//! breaks or stays silent is marked failed and the groups it still owed are re-sent
//! elsewhere. [`RolloutClient::begin_push`] opens a client-streaming `UpdateWeights` per
//! worker; [`WeightPush::send`] streams each tensor to all of them in chunks and
//! [`WeightPush::commit`] commits the new version. The failure tests' fault-injecting
//! proxy lives in the `test-support` crate. docs/rollout-client.md states the failure
//! semantics.

pub mod config;
mod data_feed;
pub mod dispatch;
pub mod error;
mod generate;
pub mod pool;
pub mod push;
pub mod resolve;
pub mod transport;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::v1 as pb;

pub use config::{RolloutConfig, WireDtype};
pub use error::{ProbeError, RolloutError};
pub use pool::WorkerStatus;
pub use push::{PushReport, WeightPush};
pub use transport::{Conn, Transport, WorkerClient};

/// Largest message either side sends (the worker's own limit).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// One prompt to complete: `key` is the caller's and comes back on its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptJob {
    pub key: u64,
    /// Token ids, sent as given (no BOS added); each must be < the vocabulary size.
    pub token_ids: Vec<i64>,
}

/// Why a completion ended (the domain form of `rollout.v1.FinishReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string ended it.
    Stop,
    /// `max_new_tokens` (or the context length) was reached: the completion is truncated.
    Length,
}

impl FinishReason {
    /// The wire value; `None` for `UNSPECIFIED` or an unknown number (a protocol violation).
    pub fn from_wire(v: i32) -> Option<Self> {
        match pb::FinishReason::try_from(v) {
            Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
            Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
            _ => None,
        }
    }
}

/// One sampled completion with the worker's policy log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Sampled token ids, a stop token included.
    pub token_ids: Vec<i64>,
    /// One per token: `log_softmax(logits / temperature)[token]` under the weights that
    /// produced the group (before top-k/top-p/min-p truncation).
    pub logprobs: Vec<f32>,
    /// Decoded text when asked for (`return_text`), else empty.
    pub text: String,
    pub finish_reason: FinishReason,
}

impl Completion {
    /// Ended by the length limit, not by a stop token.
    pub fn truncated(&self) -> bool {
        self.finish_reason == FinishReason::Length
    }
}

/// How to sample (the domain form of `rollout.v1.SamplingParams`); built once from the
/// trainer's settings and mapped to the wire in one place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f64,
    /// 1 disables.
    pub top_p: f64,
    /// 0 disables.
    pub top_k: i64,
    /// 0 disables.
    pub min_p: f64,
    pub max_new_tokens: u32,
    /// Completion `j` of job `g` draws from stream `seed + g * n + j`; `None`: entropy.
    pub seed: Option<u64>,
    /// Keep generating past the model's end-of-sequence tokens (benchmarks, tests).
    pub ignore_eos: bool,
}

impl Sampling {
    /// Greedy decoding with the same length limit and seed.
    pub fn greedy(self) -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            ..self
        }
    }

    pub(crate) fn to_wire(self) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature: Some(self.temperature),
            top_p: Some(self.top_p),
            top_k: self.top_k,
            min_p: self.min_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            ..Default::default()
        }
    }
}

/// The `n` completions of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutGroup {
    /// The job's key.
    pub key: u64,
    /// The prompt as the worker saw it (equals the job's token ids).
    pub prompt_ids: Vec<i64>,
    /// Exactly `n` completions with their policy log-probs.
    pub completions: Vec<Completion>,
    /// The weight version that produced every token of the group.
    pub weight_version: u64,
    /// Url of the worker that produced it.
    pub worker: String,
}

/// A cloneable handle to the workers; clones share the pool (health, in-flight bounds).
#[derive(Clone)]
pub struct RolloutClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RolloutConfig,
    transport: Transport,
    wire: WireDtype,
    pool: Mutex<Pool>,
    /// Bumped whenever a request slot is released or a probe reports, so a waiting
    /// `generate` re-examines the pool (a watch never loses a change).
    changes: tokio::sync::watch::Sender<u64>,
    /// The `workers` entries; `dns:///` ones are resolved again when `next_resolve` passes.
    sources: Vec<resolve::WorkerSource>,
    next_resolve: Mutex<Instant>,
    /// Groups dropped because their weight version was below the call's minimum.
    stale_dropped: std::sync::atomic::AtomicU64,
    /// Host buffers of converted tensors, reused by every push (`push::WireBuffers`).
    wire_buffers: push::WireBuffers,
    /// Rank 0's NCCL weight-sync communicator and choice (`push::nccl_push`).
    nccl: push::nccl_push::NcclState,
}

type Pool = pool::Pool<Conn>;

impl Inner {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        // The pool holds plain counters; a panic elsewhere cannot leave it inconsistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn apply_probe(&self, i: usize, result: Result<(Conn, u64), ProbeError>) {
        {
            let mut pool = self.pool();
            match result {
                Ok((channel, version)) => {
                    if pool.healthy(i) {
                        tracing::debug!(worker = %pool.slots[i].url, version, "rollout worker healthy");
                    } else {
                        tracing::info!(worker = %pool.slots[i].url, version, "rollout worker healthy");
                    }
                    pool.probe_succeeded(i, channel, version);
                }
                Err(e) => {
                    tracing::debug!(worker = %pool.slots[i].url, error = %e, "probe failed");
                    pool.probe_failed(i, e.to_string(), Instant::now());
                }
            }
        }
        self.bump();
    }

    /// Resolves the `dns:///` entries again if `dns_refresh_secs` passed since the last
    /// time, and adds / retires workers accordingly (see [`resolve`]).
    async fn resolve_if_due(&self) {
        if !self.sources.iter().any(resolve::WorkerSource::is_dns) {
            return;
        }
        {
            let mut next = self.next_resolve.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now < *next {
                return;
            }
            *next = now + self.cfg.dns_refresh();
        }
        let (urls, errors) = resolve::resolve(&self.sources).await;
        for e in &errors {
            tracing::warn!(error = %e, "resolving rollout workers");
        }
        // A failed lookup keeps the workers known so far rather than retiring them all.
        if !errors.is_empty() && urls.is_empty() {
            return;
        }
        let (added, retired) = self.pool().sync_urls(&urls, Instant::now());
        for url in &added {
            tracing::info!(worker = %url, "rollout worker joined (serves once it has the current weights)");
        }
        for url in &retired {
            tracing::info!(worker = %url, "rollout worker left");
        }
        if !(added.is_empty() && retired.is_empty()) {
            self.bump();
        }
    }

    /// Probes, in background tasks, the failed workers whose backoff has elapsed.
    fn spawn_due_probes(self: &Arc<Self>) {
        let due = self.pool().take_due_probes(Instant::now(), false);
        for (i, url) in due {
            let inner = self.clone();
            tokio::spawn(async move {
                let r = probe(&inner.transport, url, inner.cfg.connect_timeout()).await;
                inner.apply_probe(i, r);
            });
        }
    }

    /// Probes now, and waits for, every failed worker (all of them when `force`, else
    /// those whose backoff has elapsed).
    async fn probe_now(&self, force: bool) {
        let due = self.pool().take_due_probes(Instant::now(), force);
        let timeout = self.cfg.connect_timeout();
        let results = futures::future::join_all(
            due.iter()
                .map(|(_, url)| probe(&self.transport, url.clone(), timeout)),
        )
        .await;
        for ((i, _), r) in due.into_iter().zip(results) {
            self.apply_probe(i, r);
        }
    }
}

/// A tonic error with its causes ("transport error" alone says nothing).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = std::error::Error::source(s) {
        text.push_str(&format!(" ({})", error_chain(src)));
    }
    text
}

fn grpc_client(conn: Conn) -> WorkerClient {
    conn.client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Connects to `url` afresh and asks `Health`, all within `timeout`. Returns the
/// connection and the version the worker serves.
async fn probe(
    transport: &Transport,
    url: String,
    timeout: Duration,
) -> Result<(Conn, u64), ProbeError> {
    probe_over(transport, url, None, timeout).await
}

/// [`probe`] over `live` when the worker has a healthy connection (no new TCP and
/// HTTP/2 handshake), else over a fresh one.
async fn probe_over(
    transport: &Transport,
    url: String,
    live: Option<Conn>,
    timeout: Duration,
) -> Result<(Conn, u64), ProbeError> {
    let attempt = async {
        let channel = match live {
            Some(c) => c,
            None => transport.connect(url, timeout).await?,
        };
        let health = grpc_client(channel.clone())
            .health(pb::HealthRequest {})
            .await
            .map_err(|status| ProbeError::Health { status })?
            .into_inner();
        if health.status != pb::health_response::Status::Serving as i32 {
            return Err(ProbeError::NotServing);
        }
        Ok((channel, health.weight_version))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ProbeError::Timeout {
                secs: timeout.as_secs_f64(),
            })
        })
}

impl RolloutClient {
    /// This client is trainer rank `rank` of `world`: see [`Pool::spread_over_ranks`].
    pub fn spread_over_ranks(&self, rank: usize, world: usize) {
        self.inner.pool().spread_over_ranks(rank, world);
    }

    /// Connects; fails if no worker answers Health within `connect_timeout_secs` (the
    /// message lists each worker's error). Workers that do not answer are probed again
    /// later with backoff.
    pub async fn connect(cfg: RolloutConfig) -> Result<Self, RolloutError> {
        cfg.validate()?;
        let wire = cfg.wire_dtype()?;
        let sources = cfg.worker_sources();
        let (urls, errors) = resolve::resolve(&sources).await;
        if urls.is_empty() {
            return Err(RolloutError::NoWorker {
                timeout_secs: cfg.connect_timeout_secs,
                details: errors.join("; "),
            });
        }
        let pool = Pool::new(
            &urls,
            cfg.max_requests_per_worker,
            cfg.retry_backoff(),
            Instant::now(),
        );
        let next_resolve = Mutex::new(Instant::now() + cfg.dns_refresh());
        let env_key = std::env::var("ROLLOUT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        let transport = Transport::from_config(&cfg, env_key.as_deref())?;
        let inner = Arc::new(Inner {
            cfg,
            transport,
            wire,
            pool: Mutex::new(pool),
            changes: tokio::sync::watch::Sender::new(0),
            sources,
            next_resolve,
            stale_dropped: Default::default(),
            wire_buffers: Default::default(),
            nccl: Default::default(),
        });
        inner.probe_now(true).await;
        let pool = inner.pool();
        if !(0..pool.slots.len()).any(|i| pool.healthy(i)) {
            return Err(RolloutError::NoWorker {
                timeout_secs: inner.cfg.connect_timeout_secs,
                details: pool.describe(),
            });
        }
        drop(pool);
        Ok(RolloutClient { inner })
    }

    /// The dtype weight pushes carry on the wire.
    pub fn wire_dtype(&self) -> WireDtype {
        self.inner.wire
    }

    /// The settings this client runs with.
    pub fn config(&self) -> &RolloutConfig {
        &self.inner.cfg
    }

    /// Asks every worker for its health and weight version now and waits for the
    /// answers. Ranks that did not push learn the version rank 0 pushed this way; a
    /// worker that does not answer is failed and re-probed with backoff.
    pub async fn refresh(&self) {
        self.inner.resolve_if_due().await;
        // Healthy workers answer over their live connection; a reconnect per push
        // costs every rank a TCP and HTTP/2 handshake per worker and step.
        let targets: Vec<(usize, String, Option<Conn>)> = {
            let mut pool = self.inner.pool();
            let due = pool.take_all_probes();
            due.into_iter()
                .map(|(i, url)| {
                    let live = pool.slots[i].conn.clone();
                    (i, url, live)
                })
                .collect()
        };
        let timeout = self.inner.cfg.connect_timeout();
        let results = futures::future::join_all(targets.iter().map(|(_, url, live)| {
            probe_over(&self.inner.transport, url.clone(), live.clone(), timeout)
        }))
        .await;
        for ((i, _, _), r) in targets.into_iter().zip(results) {
            match r {
                Ok(_) => self.inner.apply_probe(i, r),
                Err(e) => {
                    self.inner
                        .pool()
                        .refresh_failed(i, e.to_string(), Instant::now());
                    self.inner.bump();
                }
            }
        }
    }

    /// Groups dropped so far (by every `generate` of this client and its clones) because
    /// they came from a weight version below the call's `min_version`; each was re-sent.
    pub fn stale_groups_dropped(&self) -> u64 {
        self.inner
            .stale_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the client knows about each worker, in config order.
    pub fn status(&self) -> Vec<WorkerStatus> {
        self.inner.pool().status()
    }
}
