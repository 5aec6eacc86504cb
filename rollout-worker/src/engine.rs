//! The generation engine: one dedicated OS thread owns the model, the KV cache and the
//! [`Scheduler`], and runs the continuous-batching loop; [`EngineHandle`] is the
//! cloneable front the gRPC and HTTP services talk to, over a channel.
//!
//! Data flow per loop iteration (thread `rollout-engine`):
//! 1. Take commands: new jobs (one group of `n` sequences per prompt, queued in the
//!    scheduler), committed weight updates, pause/shutdown.
//! 2. Drop groups whose client went away.
//! 3. If an update is pending and no started group is left, apply it (see below).
//! 4. One step: the [`Scheduler`] gives every running sequence a slot for its pending
//!    token (preempting LIFO when the block pool is short), continues chunked prefills
//!    and admits waiting sequences under `max_num_batched_tokens`; the n completions of
//!    a group prefill their prompt once and share its blocks. All scheduled tokens run as
//!    one packed forward over the paged KV cache (`model::paged`: keys and values written
//!    in place, attention through block tables, nothing padded or copied), then one
//!    sampling pass with one device-to-host transfer. Finished sequences free their
//!    blocks, and a group is sent as soon as its last completion finishes.
//! 5. Started groups quiet for `progress_interval_secs` get an [`Event::Progress`].
//!
//! Failure: a step that returns an error (e.g. out of memory) fails the started groups
//! and frees their blocks; the engine keeps serving (it recovered cleanly). A panic
//! fails every request, marks the engine dead (health NOT_SERVING) and stops the
//! thread; [`EngineHandle::stopped`] resolves, and `serve` exits non-zero.
//!
//! Weight updates never mix versions within a group: once an update is committed, groups
//! that already started finish on the old weights (tagged with the old version) and new
//! groups wait; when no started group is left the staged tensors become the model's
//! between two steps (`weights::apply`: storage swapped where dtypes match, else copied
//! in place), the version increases and waiting groups start on
//! the new weights. Model compute is blocking, which is why it lives on its own thread
//! and never on the tokio runtime. The loop never waits for a command while a pending
//! update could be applied (the last started group may end with no request behind it).
//! At most one update is pending: a newer version supersedes it (its caller gets
//! [`EngineError::Superseded`]), one whose caller went away (the trainer's commit timed
//! out) is dropped, and an update still draining after `DRAIN_WARN_AFTER` (10 s) logs a
//! WARN naming the version and what it waits for; refusals, supersessions and
//! cancellations are WARNs too, the apply one INFO line.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use model::{ParamSpec, Tokenizer, Transformer};
use tokio::sync::{mpsc, oneshot};

use crate::config::{EngineLimits, WorkerConfig};
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::request::{Event, GenerateRequest, Job};
#[allow(unused_imports)]
use crate::scheduler::Scheduler;
use crate::weights::StagedWeights;

mod batching;
pub mod sampler;

/// Facts about the served model that do not change.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    pub architecture: String,
    pub dtype: String,
    pub device: String,
    pub vocab_size: i64,
    pub num_parameters: u64,
    pub eos_token_ids: Vec<i64>,
    pub limits: EngineLimits,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub weight_version: u64,
    pub num_running: usize,
    pub num_waiting: usize,
    pub alive: bool,
    /// Prompt tokens computed (prefill, recomputation after preemption), shared
    /// prefixes not counted.
    pub prefill_tokens: u64,
    /// Most KV blocks in use at once, and the bytes of one block.
    pub kv_blocks_peak: usize,
    pub kv_block_bytes: usize,
}

/// Result of an applied update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateOutcome {
    pub version: u64,
    /// From the commit reaching the engine to the new weights serving.
    pub apply_seconds: f64,
}

/// An accepted request: the prompts as token ids, and the events to come.
#[derive(Debug)]
pub struct Submission {
    pub prompt_token_ids: Vec<Vec<i64>>,
    pub events: mpsc::UnboundedReceiver<Event>,
}

pub(crate) enum Command {
    Generate {
        job: Job,
        arrived: Instant,
        events: mpsc::UnboundedSender<Event>,
    },
    UpdateWeights {
        staged: StagedWeights,
        version: u64,
        reply: oneshot::Sender<Result<UpdateOutcome, EngineError>>,
    },
    SetPaused(bool),
    InjectFault(Fault),
    Shutdown,
}

/// A failure to inject into the next engine step (fault drills and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The step returns an error, as an out-of-memory step does.
    StepError,
    /// The step panics.
    Panic,
}

pub(crate) struct Shared {
    pub(crate) info: ModelInfo,
    pub(crate) specs: Vec<ParamSpec>,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) version: AtomicU64,
    pub(crate) running: AtomicUsize,
    pub(crate) waiting: AtomicUsize,
    /// Sequences accepted and not yet finished; bounds the queue.
    pub(crate) outstanding: AtomicUsize,
    pub(crate) alive: AtomicBool,
    pub(crate) prefill_tokens: AtomicU64,
    pub(crate) kv_blocks_peak: AtomicUsize,
    /// Becomes true when the engine thread has stopped.
    pub(crate) stopped: tokio::sync::watch::Sender<bool>,
}

/// The cloneable front of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.shared.info.name)
            .finish_non_exhaustive()
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] model::TokenizerError),
    #[error("spawning the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl EngineHandle {
    /// Loads the checkpoint and tokenizer named by `config` and starts the engine thread.
    pub fn load(config: &WorkerConfig, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        config.validate()?;
        let device = model::parse_device(&config.device)?;
        let kind = config.dtype.as_deref().and_then(model::config::parse_dtype);
        let tokenizer = Tokenizer::from_dir(&config.model)?;
        let model = Transformer::from_pretrained(&config.model, device, kind)?;
        Self::start(model, tokenizer, config, metrics)
    }

    /// Starts the engine thread serving `model`.
    pub fn start(
        model: Transformer,
        tokenizer: Tokenizer,
        config: &WorkerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let limits = config
            .engine
            .resolve(&model.config, model.kind().elt_size_in_bytes())?;
        let mut eos: Vec<i64> = model.config.eos_token_ids.clone();
        eos.extend(tokenizer.eos_token_ids().iter().map(|&x| i64::from(x)));
        eos.sort_unstable();
        eos.dedup();
        let info = ModelInfo {
            name: config.model_name(),
            path: config.model.display().to_string(),
            architecture: model.config.architecture.model_type().to_string(),
            dtype: model::config::dtype_name(model.kind()).to_string(),
            device: match model.device() {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".to_string(),
            },
            vocab_size: model.config.vocab_size,
            num_parameters: model.weights.num_params() as u64,
            eos_token_ids: eos,
            limits,
        };
        let shared = Arc::new(Shared {
            specs: model::param_specs(&model.config),
            info,
            tokenizer: Arc::new(tokenizer),
            metrics,
            version: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            prefill_tokens: AtomicU64::new(0),
            kv_blocks_peak: AtomicUsize::new(0),
            stopped: tokio::sync::watch::Sender::new(false),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = batching::Engine::new(model, shared.clone())?;
        std::thread::Builder::new()
            .name("rollout-engine".into())
            .spawn(move || engine.run(rx))?;
        Ok(EngineHandle { tx, shared })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Parameter names and shapes an update must provide.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.shared.specs
    }

    pub fn stats(&self) -> Stats {
        Stats {
            weight_version: self.shared.version.load(Ordering::SeqCst),
            num_running: self.shared.running.load(Ordering::SeqCst),
            num_waiting: self.shared.waiting.load(Ordering::SeqCst),
            alive: self.shared.alive.load(Ordering::SeqCst),
            prefill_tokens: self.shared.prefill_tokens.load(Ordering::SeqCst),
            kv_blocks_peak: self.shared.kv_blocks_peak.load(Ordering::SeqCst),
            kv_block_bytes: self.shared.info.limits.kv_bytes_per_token
                * self.shared.info.limits.block_size,
        }
    }

    /// Resolves once the engine thread has stopped (shutdown, or a panic it could not
    /// recover from).
    pub async fn stopped(&self) {
        let mut rx = self.shared.stopped.subscribe();
        let _ = rx.wait_for(|&s| s).await;
    }

    /// Validates `req`, reserves queue room for its sequences and queues it. Fails fast
    /// with [`EngineError::InvalidArgument`] or [`EngineError::Overloaded`].
    pub fn submit(&self, req: GenerateRequest) -> Result<Submission, EngineError> {
        let arrived = Instant::now();
        let s = &self.shared;
        let result = self.try_submit(req, arrived);
        if let Err(e) = &result {
            let reason = match e {
                EngineError::Overloaded { .. } => "overloaded",
                EngineError::Unavailable(_) => "unavailable",
                _ => "invalid_argument",
            };
            s.metrics
                .requests_rejected_total
                .with_label_values(&[reason])
                .inc();
        }
        result
    }

    fn try_submit(
        &self,
        req: GenerateRequest,
        arrived: Instant,
    ) -> Result<Submission, EngineError> {
        let s = &self.shared;
        if !s.alive.load(Ordering::SeqCst) {
            return Err(EngineError::Unavailable(
                "the engine thread has stopped".into(),
            ));
        }
        let job = req.validate(
            &s.info.limits,
            s.info.vocab_size,
            &s.info.eos_token_ids,
            &s.tokenizer,
        )?;
        let requested = job.num_seqs();
        let capacity = s.info.limits.max_num_seqs + s.info.limits.max_waiting_seqs;
        s.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur + requested <= capacity).then_some(cur + requested)
            })
            .map_err(|outstanding| EngineError::Overloaded {
                outstanding,
                requested,
                capacity,
            })?;
        let prompt_token_ids = job.prompts.iter().map(|(_, ids)| ids.clone()).collect();
        let (events, rx) = mpsc::unbounded_channel();
        if self
            .tx
            .send(Command::Generate {
                job,
                arrived,
                events,
            })
            .is_err()
        {
            s.outstanding.fetch_sub(requested, Ordering::SeqCst);
            return Err(EngineError::Unavailable(
                "the engine thread has stopped".into(),
            ));
        }
        Ok(Submission {
            prompt_token_ids,
            events: rx,
        })
    }

    /// Hands a complete update to the engine; resolves once it serves (or is rejected).
    pub async fn update_weights(
        &self,
        staged: StagedWeights,
        version: u64,
    ) -> Result<UpdateOutcome, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::UpdateWeights {
                staged,
                version,
                reply,
            })
            .map_err(|_| EngineError::Unavailable("the engine thread has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("the engine stopped during the update".into()))?
    }

    /// Stops (or resumes) stepping. While paused requests are still accepted, queued or
    /// refused; nothing is generated. For maintenance and for tests that need a queue
    /// that does not drain.
    pub fn set_paused(&self, paused: bool) {
        let _ = self.tx.send(Command::SetPaused(paused));
    }

    /// Makes the next step fail with `fault` (fault drills and tests).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        let _ = self.tx.send(Command::InjectFault(fault));
    }

    /// Stops the engine thread; accepted requests end without their results.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}
