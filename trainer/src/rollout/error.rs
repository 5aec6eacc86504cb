//! The error type of the rollout client. Every failure traced to a worker names its url.

/// Errors of connecting, generating and pushing weights.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A `RolloutConfig` field is invalid (the message names it).
    #[error("invalid rollout config: {0}")]
    Config(#[from] crate::config::InvalidConfig),

    /// A caller-side mistake detected before anything was sent.
    #[error("invalid rollout input: {0}")]
    InvalidInput(String),

    /// `connect`: no worker answered `Health` in time. `details` gives each worker's error.
    #[error("no rollout worker answered Health within {timeout_secs}s: {details}")]
    NoWorker { timeout_secs: f64, details: String },

    /// `generate`: for `waited_secs` no worker was both healthy and at `min_version`.
    /// `workers` describes every worker's state and last error.
    #[error(
        "no usable rollout worker (healthy, weight version >= {min_version}) for {waited_secs:.1}s; \
         {received} of {total} groups received; workers: {workers}"
    )]
    NoUsableWorker {
        min_version: u64,
        waited_secs: f64,
        received: usize,
        total: usize,
        workers: String,
    },

    /// A worker refused a `Generate` request as invalid (INVALID_ARGUMENT): every worker
    /// would refuse it, so it is not retried.
    #[error("worker {worker} rejected the generate request: {message}")]
    Rejected { worker: String, message: String },

    /// A tensor given to `WeightPush::send` cannot be sent (dtype, duplicate name, copy).
    #[error("weight push: tensor {name:?}: {message}")]
    Tensor { name: String, message: String },

    /// A weight push reached no worker, or every worker dropped out of it.
    /// `failed` lists `url: reason` for each worker.
    #[error("weight push of version {version} failed on every worker: {failed}")]
    PushFailed { version: u64, failed: String },

    /// `rollout.weight_transport = "nccl"` where NCCL cannot carry the push; the message
    /// names the side (the trainer's device, or each CPU worker).
    #[error("rollout.weight_transport = \"nccl\": {0}")]
    WeightTransport(String),

    /// The NCCL path of a push failed (its communicator is aborted); the push is retried
    /// over gRPC / the TCP data plane and the communicator re-formed at the next push.
    #[error("weight push of version {version} over NCCL failed: {why}")]
    NcclFailed { version: u64, why: String },
}

/// Why a `rollout.workers` entry cannot be parsed; the message reads after the entry
/// (`rollout.workers[0] = "..." <message>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerEntryError {
    #[error("must be dns:///HOST:PORT (the port is required)")]
    DnsWithoutPort,
    #[error("has port {port:?}; allowed: 1..65535")]
    BadPort { port: String },
    #[error("must be dns:///HOST:PORT with a host name")]
    DnsWithoutHost,
    #[error("must start with http://, https:// or dns:/// (a name resolving to every worker)")]
    UnknownScheme,
    #[error("is not a valid http(s)://host:port url")]
    BadUrl,
}

/// Why a worker's group cannot be accepted (the worker is failed for a protocol
/// violation). `key` is the prompt job's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupViolation {
    #[error("group for key {key} has {got} completions, expected n = {n}")]
    Count { key: String, got: usize, n: u32 },
    #[error("group for key {key} echoes a different prompt ({got} tokens, sent {sent})")]
    Prompt {
        key: String,
        got: usize,
        sent: usize,
    },
    #[error("group for key {key}: completion {index} has {tokens} tokens but {logprobs} logprobs")]
    Logprobs {
        key: String,
        index: usize,
        tokens: usize,
        logprobs: usize,
    },
    #[error(
        "group for key {key}: completion {index} has finish_reason {finish_reason} (neither stop nor length)"
    )]
    FinishReason {
        key: String,
        index: usize,
        finish_reason: i32,
    },
}

/// Why a tensor cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("undefined tensor")]
    Undefined,
    #[error("{0}")]
    Torch(#[source] tch::TchError),
    #[error("dtype {kind:?} is not a floating-point kind")]
    NotFloat { kind: tch::Kind },
    #[error("conversion to {wire:?} on the host failed: {source}")]
    Conversion {
        wire: super::WireDtype,
        #[source]
        source: tch::TchError,
    },
}

/// Why connecting to a worker or its `Health` probe failed (the worker stays unhealthy
/// and is probed again with backoff). Messages carry the whole cause chain.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{}", super::error_chain(error))]
    Endpoint { error: tonic::transport::Error },
    #[error("an https:// worker needs rollout.ssl_ca_certs (the CA of its certificate)")]
    NoCaCerts,
    #[error("TLS: {}", super::error_chain(error))]
    Tls { error: tonic::transport::Error },
    #[error("connect: {}", super::error_chain(error))]
    Connect { error: tonic::transport::Error },
    #[error("Health: {}", super::status_text(status))]
    Health { status: tonic::Status },
    #[error("Health: the worker is not serving (engine stopped)")]
    NotServing,
    #[error("no Health answer within {secs:.1}s")]
    Timeout { secs: f64 },
}
