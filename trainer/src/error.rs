//! The error of the command runners (`trainer sft`, `grpo`, `eval`, `generate`): the
//! typed error of the part that failed ([`Cause`]), wrapped in the step that was running
//! when it did ([`RunError::Context`]: the file, rank, field or worker), or one of the
//! runners' own failures.
//!
//! Its `Display` is the step alone and [`std::error::Error::source`] the cause, so the
//! binary's report (`Error: loading data.jsonl` / `Caused by: ...`) names both.
use std::path::PathBuf;

use crate::config::{ConfigError, InvalidConfig};
use crate::data::DataError;
use crate::dist::CommError;
use crate::grpo::advantages::AdvantageError;
use crate::grpo::batch::PackError;
use crate::grpo::gather::GatherError;
use crate::grpo::pipeline::PendingStateError;
use crate::grpo::prefix::PrefixPackError;
use crate::inference::client::ClientError;
use crate::inference::jsonl::JsonlError;
use crate::rewards::RewardError;
use crate::rollout::RolloutError;
use crate::runlog::RunLogError;
use crate::zero::engine::EngineError;

/// The typed error of the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    PrefixPack(#[from] PrefixPackError),
    #[error(transparent)]
    Advantage(#[from] AdvantageError),
    #[error(transparent)]
    PendingState(#[from] PendingStateError),
    #[error(transparent)]
    Gather(#[from] GatherError),
    #[error(transparent)]
    Reward(#[from] RewardError),
    #[error(transparent)]
    RunLog(#[from] RunLogError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Jsonl(#[from] JsonlError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] model::TokenizerError),
    #[error(transparent)]
    Hub(#[from] model::hub::HubError),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// A runner's error inside a step of another (a task's failure, with its row).
    #[error(transparent)]
    Run(#[from] Box<RunError>),
}

/// Why a command runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `context` was running (e.g. "loading data.jsonl", "rank 1: joining 2 ranks")
    /// when `source` failed.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Cause>,
    },
    /// A typed error where no more context is needed (it names its own file, field or
    /// worker).
    #[error(transparent)]
    Failed(Box<Cause>),
    /// Invalid settings found before the run starts.
    #[error("configuration: {0}")]
    Configuration(InvalidConfig),
    #[error("configuration: reward_funcs: {0}")]
    RewardFuncs(InvalidConfig),
    #[error("device = \"cuda\" but no CUDA device is available to libtorch")]
    NoCuda,
    #[error("resume_from_checkpoint: {} is not a complete checkpoint (no manifest.json)", dir.display())]
    IncompleteCheckpoint { dir: PathBuf },
    #[error("{}: trainer state has no valid sampler", dir.display())]
    NoSamplerState {
        dir: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Something the step needs is absent (the message names it: row, column, slot).
    #[error("{what}")]
    Missing { what: String },
    /// A dataset given as neither a local path nor a cached Hub dataset.
    #[error("dataset_path: {spec:?} is not a local file or directory (and not found in the local Hugging Face cache)")]
    DatasetNotFound { spec: String },
    /// A row of an eval / generate dataset that cannot be used (`row`, from 0, says which).
    #[error("row {row}: {message}")]
    Row { row: usize, message: String },
    /// A row of `path` that could not be read.
    #[error("{}: row {row}: {message}", path.display())]
    FileRow {
        path: PathBuf,
        row: usize,
        message: String,
    },
    /// A dataset column that holds the wrong kind of value.
    #[error("{column} {name:?}: expected {expected}, got {got}")]
    Column {
        column: &'static str,
        name: String,
        expected: &'static str,
        got: String,
    },
    /// Dynamic sampling spent `max_num_gen_batches` generation rounds and a rank still
    /// misses `short` of its `target` informative groups (`dynamic_sampling_unfilled: error`).
    #[error(
        "dynamic sampling: after max_num_gen_batches = {max_num_gen_batches} generation rounds a rank \
         still misses {short} of its {target} groups with distinct rewards (every \
         completion of the others scored the same); raise max_num_gen_batches, or set \
         dynamic_sampling_unfilled: train to train on the groups there are"
    )]
    DynamicSamplingUnfilled {
        max_num_gen_batches: usize,
        short: usize,
        target: usize,
    },
    /// Fewer dropped (flat) groups than the unfilled batch needs as padding.
    #[error("dynamic sampling: {available} groups to pad the batch with, {needed} needed")]
    DynamicSamplingPadding { available: usize, needed: usize },
    /// Pushing `version` to the workers failed (`why`: rank 0's error, if any).
    #[error("pushing weight version {version} to the rollout workers failed{}", why.as_ref().map(|f| format!(": {f}")).unwrap_or_default())]
    WeightPush { version: u64, why: Option<String> },
    /// A worker returned a group of a version above the last one pushed.
    #[error(
        "worker {worker} returned a group of weight version {version}, above version {pushed} that \
         this trainer pushed last: its weights do not come from this run"
    )]
    VersionAhead {
        worker: String,
        version: u64,
        pushed: u64,
    },
    /// A rollout group does not hold the completions this rank asked for of `group`.
    #[error("group {group} of the round came back with {got} completions, {want} were requested")]
    ShareSize {
        group: usize,
        want: usize,
        got: usize,
    },
    /// A reward function returned the wrong number of scores.
    #[error("reward function {func} returned {scores} scores for {completions} completions")]
    RewardCount {
        func: String,
        scores: usize,
        completions: usize,
    },
    #[error("weight version {version} cannot be incremented")]
    VersionOverflow { version: u64 },
    #[error("a rollout worker serves weight version {highest}, beyond any this trainer pushes; restart it")]
    WorkerAhead { highest: u64 },
}

pub type Result<T, E = RunError> = std::result::Result<T, E>;

macro_rules! from_cause {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for RunError {
            fn from(e: $t) -> Self {
                RunError::Failed(Box::new(Cause::from(e)))
            }
        }
    )*};
}
from_cause!(
    ConfigError,
    InvalidConfig,
    DataError,
    RolloutError,
    EngineError,
    CommError,
    PackError,
    PrefixPackError,
    AdvantageError,
    PendingStateError,
    GatherError,
    RewardError,
    RunLogError,
    ClientError,
    JsonlError,
    model::ModelError,
    model::TokenizerError,
    model::hub::HubError,
    tch::TchError,
    std::io::Error,
    serde_json::Error,
    tokio::task::JoinError,
);

impl From<Cause> for RunError {
    fn from(e: Cause) -> Self {
        RunError::Failed(Box::new(e))
    }
}

impl From<RunError> for Cause {
    fn from(e: RunError) -> Self {
        Cause::Run(Box::new(e))
    }
}

impl RunError {
    /// The error and each of its causes, joined by ": " (what `anyhow`'s `{:#}` prints).
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }

    /// This error as the cause of `context`.
    pub fn context(self, context: impl Into<String>) -> RunError {
        RunError::Context {
            context: context.into(),
            source: Box::new(self.into()),
        }
    }
}

/// `anyhow::Context` for the typed causes: names the step that was running.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| RunError::Missing {
            what: context.into(),
        })
    }

    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| RunError::Missing { what: f().into() })
    }
}

impl<T, E: Into<Cause>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| RunError::Context {
            context: context.into(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| RunError::Context {
            context: f().into(),
            source: Box::new(e.into()),
        })
    }
}
