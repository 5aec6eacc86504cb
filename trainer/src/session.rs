//! What both training commands (`sft`, `grpo`) share: the settings named as in
//! transformers' `TrainingArguments`, and the start-up of a rank (launcher environment,
//! threads, device, communicator, tokenizer, initial weights, metrics endpoint, resume).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Context, Result, RunError};
use model::{ModelConfig, Tokenizer, Weights};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::config::{Interval, IntervalStrategy, LogLevel, Steps};
use crate::data::{DatasetConfig, Sampler, SamplerState};
use crate::dist::{self, Communicator, DistConfig, RendezvousEnv};
use crate::metrics::Metrics;
use crate::zero::{
    checkpoint::latest_checkpoint, LrSchedulerKwargs, LrSchedulerType, NonFinitePolicy,
    OptimConfig, ZeroConfig, ZeroEngine,
};

/// Settings shared by `trainer sft` and `trainer grpo` (flattened into their configs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer files).
    pub model_name_or_path: PathBuf,
    /// Checkpoints go to `output_dir/checkpoints/step-N`, the final model (Hugging Face
    /// format) to `output_dir` itself.
    pub output_dir: PathBuf,
    pub dataset: DatasetConfig,
    /// `cpu` or `cuda` (each rank takes `cuda:LOCAL_RANK`).
    pub device: String,
    pub seed: u64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip gradients to this global norm; 0 disables.
    pub max_grad_norm: f64,
    pub lr_scheduler_type: LrSchedulerType,
    pub warmup_ratio: f64,
    /// Warmup steps; when > 0 it replaces `warmup_ratio` (as transformers).
    pub warmup_steps: u64,
    /// `min_lr_rate` / `min_lr` of `cosine_with_min_lr`, `num_cycles` of the cosines.
    pub lr_scheduler_kwargs: LrSchedulerKwargs,
    /// A Jinja chat template replacing the tokenizer's own (Open-R1's `chat_template`).
    pub chat_template: Option<String>,
    /// Hub revision of `model_name_or_path` when it is a Hub id (TRL's `model_revision`).
    pub model_revision: Option<String>,
    /// Passes over the dataset when `max_steps` is not set.
    pub num_train_epochs: f64,
    /// A step with a NaN/inf loss or gradient norm: `skip` (dropped, counted, logged)
    /// or `stop` (the run fails); it never reaches the weights.
    pub on_nonfinite: NonFinitePolicy,
    /// Under `skip`, this many skipped steps in a row stop the run.
    pub max_consecutive_skipped_steps: u64,
    /// Optimizer steps to run; -1 derives them from `num_train_epochs`.
    pub max_steps: i64,
    /// Sequences per rank per micro-batch (GRPO: completions).
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Write the full metrics line to the log every this many steps; the console
    /// progress line and the Prometheus gauges are updated every step regardless.
    /// A whole number, or a fraction of the run in (0, 1).
    pub logging_steps: Steps,
    /// `steps` (every `logging_steps`), `epoch` or `no` (transformers' `logging_strategy`).
    pub logging_strategy: IntervalStrategy,
    /// Also log the full metrics after the first step.
    pub logging_first_step: bool,
    /// Log filter when `RUST_LOG` is unset (transformers' `log_level`).
    pub log_level: LogLevel,
    /// Checkpoint every this many steps (0: only at the end), or a fraction of the run
    /// in (0, 1).
    pub save_steps: Steps,
    /// `steps` (every `save_steps`), `epoch` or `no` (only the final checkpoint).
    pub save_strategy: IntervalStrategy,
    /// Keep this many checkpoints (oldest pruned); unset keeps all.
    pub save_total_limit: Option<usize>,
    /// `latest` (the newest complete checkpoint under output_dir, if any) or a step
    /// directory.
    pub resume_from_checkpoint: Option<String>,
    /// libtorch intra-op threads; unset: OMP_NUM_THREADS, else cores / local ranks.
    pub num_threads: Option<usize>,
    /// Serve Prometheus metrics on this port + LOCAL_RANK (0 picks a free port).
    pub metrics_port: Option<u16>,
    /// Exit status after SIGTERM stopped the run at a checkpoint (see
    /// [`crate::shutdown`]): 0 by default; Kubernetes Jobs that should replace the pods
    /// and resume set a non-zero one matched by their podFailurePolicy (deploy/).
    pub sigterm_exit_code: u8,
    pub zero: ZeroConfig,
    pub dist: DistConfig,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        let optim = OptimConfig::default();
        TrainingArgs {
            model_name_or_path: PathBuf::new(),
            output_dir: PathBuf::new(),
            dataset: DatasetConfig::default(),
            device: "cpu".into(),
            seed: 42,
            learning_rate: optim.learning_rate,
            weight_decay: optim.weight_decay,
            adam_beta1: optim.adam_beta1,
            adam_beta2: optim.adam_beta2,
            adam_epsilon: optim.adam_epsilon,
            max_grad_norm: optim.max_grad_norm,
            lr_scheduler_type: optim.lr_scheduler_type,
            warmup_ratio: optim.warmup_ratio,
            warmup_steps: 0,
            lr_scheduler_kwargs: LrSchedulerKwargs::default(),
            chat_template: None,
            model_revision: None,
            on_nonfinite: optim.on_nonfinite,
            max_consecutive_skipped_steps: optim.max_consecutive_skipped_steps,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            logging_steps: Steps::Count(10),
            logging_strategy: IntervalStrategy::Steps,
            logging_first_step: false,
            log_level: LogLevel::Passive,
            save_steps: Steps::Count(500),
            save_strategy: IntervalStrategy::Steps,
            save_total_limit: None,
            resume_from_checkpoint: None,
            num_threads: None,
            metrics_port: None,
            sigterm_exit_code: 0,
            zero: ZeroConfig::default(),
            dist: DistConfig::default(),
        }
    }
}

impl TrainingArgs {
    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            max_grad_norm: self.max_grad_norm,
            lr_scheduler_type: self.lr_scheduler_type,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: self.warmup_steps,
            lr_scheduler_kwargs: self.lr_scheduler_kwargs,
            on_nonfinite: self.on_nonfinite,
            max_consecutive_skipped_steps: self.max_consecutive_skipped_steps,
        }
    }

    /// When the full metrics line is logged (the last step is logged regardless).
    pub fn log_interval(&self, steps_per_epoch: u64, total: u64) -> Interval {
        Interval {
            first: self.logging_first_step,
            ..Interval::new(
                self.logging_strategy,
                self.logging_steps,
                steps_per_epoch,
                total,
            )
        }
    }

    /// When checkpoints are written (the last step is saved regardless).
    pub fn save_interval(&self, steps_per_epoch: u64, total: u64) -> Interval {
        Interval::new(self.save_strategy, self.save_steps, steps_per_epoch, total)
    }

    /// Field checks; errors name the field and what is allowed.
    pub fn validate(&self) -> Result<(), crate::config::InvalidConfig> {
        use crate::config::invalid::bad;
        if self.model_name_or_path.as_os_str().is_empty() {
            return Err(bad(
                "model_name_or_path",
                "model_name_or_path is required (a Hugging Face model directory)",
            ));
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(bad("output_dir", "output_dir is required"));
        }
        self.dataset
            .validate()
            .map_err(crate::config::InvalidConfig::Dataset)?;
        self.optim().validate()?;
        self.zero.validate()?;
        self.dist.validate()?;
        if !matches!(self.device.as_str(), "cpu" | "cuda") {
            return Err(bad(
                "device",
                format!("device must be cpu or cuda, got {:?}", self.device),
            ));
        }
        if self.per_device_train_batch_size == 0 {
            return Err(bad(
                "per_device_train_batch_size",
                "per_device_train_batch_size must be at least 1",
            ));
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(bad(
                "gradient_accumulation_steps",
                "gradient_accumulation_steps must be at least 1",
            ));
        }
        if self.max_steps == 0 || self.max_steps < -1 {
            return Err(bad(
                "max_steps",
                format!(
                    "max_steps must be -1 (use num_train_epochs) or positive, got {}",
                    self.max_steps
                ),
            ));
        }
        if self.max_steps == -1 && (self.num_train_epochs.is_nan() || self.num_train_epochs <= 0.0)
        {
            return Err(bad(
                "num_train_epochs",
                format!(
                    "num_train_epochs must be positive when max_steps is -1, got {}",
                    self.num_train_epochs
                ),
            ));
        }
        for (field, steps) in [
            ("logging_steps", self.logging_steps),
            ("save_steps", self.save_steps),
        ] {
            steps.check(field)?;
        }
        if self.logging_steps.is_zero() && self.logging_strategy == IntervalStrategy::Steps {
            return Err(bad("logging_steps", "logging_steps must be at least 1"));
        }
        if self.save_total_limit == Some(0) {
            return Err(bad(
                "save_total_limit",
                "save_total_limit must be at least 1 (unset keeps every checkpoint)",
            ));
        }
        if self.num_threads == Some(0) {
            return Err(bad("num_threads", "num_threads must be at least 1"));
        }
        Ok(())
    }

    /// Total optimizer steps: `max_steps`, or `ceil(epochs * items / items_per_step)`.
    pub fn total_steps(&self, items: usize, items_per_step: usize) -> u64 {
        if self.max_steps > 0 {
            return self.max_steps as u64;
        }
        let per_epoch = items as f64 / items_per_step.max(1) as f64;
        (self.num_train_epochs * per_epoch).ceil().max(1.0) as u64
    }

    pub fn checkpoint_root(&self) -> PathBuf {
        self.output_dir.join("checkpoints")
    }

    /// Whether a checkpoint that fails verification may give way to the previous one
    /// (only when resuming from `latest`).
    pub fn resume_falls_back(&self) -> bool {
        self.resume_from_checkpoint.as_deref() == Some("latest")
    }

    /// The checkpoint to resume from, if any.
    pub fn resume_dir(&self) -> Result<Option<PathBuf>> {
        match self.resume_from_checkpoint.as_deref() {
            None => Ok(None),
            Some("latest") => latest_checkpoint(&self.checkpoint_root()).with_context(|| {
                format!(
                    "resume_from_checkpoint: latest: listing {}",
                    self.checkpoint_root().display()
                )
            }),
            Some(dir) => {
                let p = PathBuf::from(dir);
                if !p.join("manifest.json").is_file() {
                    return Err(RunError::IncompleteCheckpoint { dir: p });
                }
                Ok(Some(p))
            }
        }
    }
}

/// A started rank: everything a training loop needs before building its engine.
pub struct Session {
    pub env: RendezvousEnv,
    pub device: Device,
    pub tokenizer: Tokenizer,
    pub model_cfg: ModelConfig,
    /// `model_name_or_path` resolved: the directory, or the Hub cache's snapshot.
    pub model_dir: PathBuf,
    /// Initial weights in float32 on the host (taken by the engine).
    pub weights: Option<Weights>,
    pub comm: Option<Box<dyn Communicator>>,
    pub rt: tokio::runtime::Runtime,
    pub metrics: Arc<Metrics>,
}

/// Reads the launcher's environment (torchrun's variables; none is a world of one) and
/// sets libtorch's intra-op threads ([`dist::intra_op_threads`]); returns both.
pub fn join_environment(num_threads: Option<usize>) -> Result<(RendezvousEnv, usize)> {
    let env = RendezvousEnv::from_env().context("reading the launcher's environment")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let omp = std::env::var("OMP_NUM_THREADS").ok();
    let threads = dist::intra_op_threads(num_threads, omp.as_deref(), cores, env.local_world_size);
    tch::set_num_threads(threads as i32);
    Ok((env, threads))
}

impl Session {
    /// Reads the launcher's environment, sets threads, joins the other ranks, loads the
    /// tokenizer and the initial weights, and starts the metrics endpoint.
    pub fn start(args: &TrainingArgs) -> Result<Session> {
        let (env, threads) = join_environment(args.num_threads)?;
        let device = match args.device.as_str() {
            "cuda" => {
                if !tch::Cuda::is_available() {
                    return Err(RunError::NoCuda);
                }
                Device::Cuda(env.local_rank)
            }
            _ => Device::Cpu,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let metrics = Arc::new(Metrics::new(env.rank));
        if let Some(port) = args.metrics_port {
            let port = if port == 0 {
                0
            } else {
                port + env.local_rank as u16
            };
            let addr = crate::metrics::spawn(&rt, ([0, 0, 0, 0], port).into(), metrics.clone())
                .with_context(|| format!("binding the metrics endpoint on port {port}"))?;
            tracing::info!(rank = env.rank, %addr, "metrics endpoint");
        }
        // A Hub id (`Qwen/Qwen2.5-1.5B-Instruct`) is the cached snapshot; a path is itself.
        let model_dir =
            model::hub::resolve_model(&args.model_name_or_path, args.model_revision.as_deref())
                .context("model_name_or_path")?;
        let mut tokenizer = Tokenizer::from_dir(&model_dir)
            .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?;
        if let Some(template) = &args.chat_template {
            tokenizer
                .set_chat_template(template, Path::new("<chat_template setting>"))
                .context("chat_template")?;
        }
        let (model_cfg, weights) =
            model::load_pretrained(&model_dir, Device::Cpu, Some(Kind::Float))
                .with_context(|| format!("loading {}", model_dir.display()))?;
        let comm = dist::connect(&args.dist, &env, device)
            .with_context(|| format!("rank {}: joining {} ranks", env.rank, env.world_size))?;
        tracing::info!(
            rank = env.rank,
            world_size = env.world_size,
            backend = comm.backend(),
            threads,
            device = ?device,
            "rank started"
        );
        Ok(Session {
            env,
            device,
            tokenizer,
            model_cfg,
            model_dir,
            weights: Some(weights),
            comm: Some(comm),
            rt,
            metrics,
        })
    }

    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }
}

/// The skeleton of a training run that `trainer sft` and `trainer grpo` share: resume
/// from a checkpoint, save when due (every `save_steps` and after the last step), publish
/// the final model, and the one place a loop asks whether it should stop early.
///
/// A loop reads:
///
/// ```text
/// let state = run.resume(&mut engine, is_main)?;            // trainer state, if resumed
/// while engine.steps_done() < run.total() && !run.should_stop() {
///     ... one step ...
///     run.save_if_due(&mut engine, step, || state_json, is_main)?;
/// }
/// ```
pub struct RunSkeleton {
    total: u64,
    save_every: Interval,
    keep: usize,
    root: PathBuf,
    output_dir: PathBuf,
    model_dir: PathBuf,
    args: TrainingArgs,
    stop: Arc<AtomicBool>,
}

impl RunSkeleton {
    /// A run of `total` optimizer steps with `args`' checkpoint settings; `model_dir` is
    /// the resolved checkpoint directory (its tokenizer files go into each export) and
    /// `steps_per_epoch` sizes `save_strategy: epoch`.
    pub fn new(args: &TrainingArgs, total: u64, model_dir: &Path, steps_per_epoch: u64) -> Self {
        RunSkeleton {
            total,
            save_every: args.save_interval(steps_per_epoch, total),
            keep: args.save_total_limit.unwrap_or(usize::MAX),
            root: args.checkpoint_root(),
            output_dir: args.output_dir.clone(),
            model_dir: model_dir.to_path_buf(),
            args: args.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Set to end the run at the next step boundary (a signal handler holds a clone).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Whether the loop should end before its next step (a stop was requested).
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Loads `resume_from_checkpoint` into `engine` (with `latest`, a newest checkpoint
    /// that fails verification falls back to the previous one) and restores `sampler`
    /// from it; returns the checkpoint's trainer state (`None` on a fresh start).
    pub fn resume(
        &self,
        engine: &mut ZeroEngine,
        sampler: &mut Sampler,
        is_main: bool,
    ) -> Result<Option<serde_json::Value>> {
        let Some(dir) = self.args.resume_dir()? else {
            return Ok(None);
        };
        let (dir, state) = engine.resume(&dir, self.args.resume_falls_back())?;
        let s: SamplerState =
            serde_json::from_value(state["sampler"].clone()).map_err(|source| {
                RunError::NoSamplerState {
                    dir: dir.clone(),
                    source,
                }
            })?;
        sampler.restore(&s)?;
        if is_main {
            println!(
                "resumed from {} at step {}",
                dir.display(),
                engine.steps_done()
            );
        }
        Ok(Some(state))
    }

    /// Whether `step` ends with a checkpoint.
    pub fn save_due(&self, step: u64) -> bool {
        step >= self.total || self.save_every.due(step)
    }

    /// Saves a checkpoint (collective) when `step` is due or `force` (a stop agreed by
    /// every rank), with the trainer state from `state`; after the last step rank 0 also
    /// publishes the final model into `output_dir`. Returns the checkpoint directory when
    /// one was written.
    pub fn save_if_due(
        &self,
        engine: &mut ZeroEngine,
        step: u64,
        force: bool,
        state: impl FnOnce() -> serde_json::Value,
        is_main: bool,
    ) -> Result<Option<PathBuf>> {
        if !(force || self.save_due(step)) {
            return Ok(None);
        }
        let dir = engine.save_checkpoint(&self.root, &state(), self.keep, Some(&self.model_dir))?;
        if step >= self.total && is_main {
            publish_final_model(&dir, &self.output_dir)?;
            println!("final model: {}", self.output_dir.display());
        }
        Ok(Some(dir))
    }
}

/// Copies the Hugging Face export of checkpoint `step_dir` (its `hf/`) into `dst`:
/// the final model of a run, loadable by transformers and by the rollout worker.
pub fn publish_final_model(step_dir: &Path, dst: &Path) -> Result<()> {
    let hf = step_dir.join("hf");
    for entry in std::fs::read_dir(&hf).with_context(|| format!("reading {}", hf.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = dst.join(entry.file_name());
            std::fs::copy(entry.path(), &to).with_context(|| {
                format!("copying {} to {}", entry.path().display(), to.display())
            })?;
        }
    }
    Ok(())
}

/// Per-rank model-state bytes to the metrics (the engine also logs them at start).
pub fn record_memory(metrics: &Metrics, m: crate::zero::MemoryReport) {
    metrics
        .model_state_bytes
        .with_label_values(&["params"])
        .set(m.param_bytes as f64);
    metrics
        .model_state_bytes
        .with_label_values(&["grads"])
        .set(m.grad_bytes as f64);
    metrics
        .model_state_bytes
        .with_label_values(&["optimizer"])
        .set(m.optimizer_bytes as f64);
}
