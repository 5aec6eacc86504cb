//! The worker's domain errors. The front ends map them to wire statuses in one place
//! each: `grpc::status` (tonic codes) and `http::ApiError` (HTTP codes).
use crate::weights::WeightError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed or out of the worker's limits; the message names the
    /// field. gRPC INVALID_ARGUMENT, HTTP 400.
    #[error("{0}")]
    InvalidArgument(String),
    /// The bounded queue is full; retry later. gRPC RESOURCE_EXHAUSTED, HTTP 429.
    #[error("worker is at capacity: {outstanding} sequences accepted and unfinished, {requested} more requested, at most {capacity}; retry later")]
    Overloaded {
        outstanding: usize,
        requested: usize,
        capacity: usize,
    },
    /// A weight chunk or commit was rejected; the old weights keep serving.
    #[error("weight update rejected: {0}")]
    Weights(#[from] WeightError),
    /// A weight version that does not increase. gRPC FAILED_PRECONDITION, HTTP 409.
    #[error("weight version {requested} is not greater than the current version {current}")]
    StaleVersion { current: u64, requested: u64 },
    /// A pending (committed, not yet applied) update replaced by a newer version before
    /// it served. gRPC ABORTED, HTTP 409.
    #[error("weight version {version} was superseded by version {by} before it was applied")]
    Superseded { version: u64, by: u64 },
    /// The NCCL weight path cannot run here (a CPU worker, no libnccl) or its
    /// communicator failed. gRPC FAILED_PRECONDITION, HTTP 409.
    #[error("NCCL weight sync: {0}")]
    WeightSync(String),
    /// The engine thread has stopped. gRPC UNAVAILABLE, HTTP 503.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// A model computation failed (e.g. device out of memory); the requests in the
    /// failed step are ended with this error, the worker keeps serving. gRPC INTERNAL.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<model::ModelError> for EngineError {
    fn from(e: model::ModelError) -> Self {
        EngineError::Internal(e.to_string())
    }
}

impl From<tch::TchError> for EngineError {
    fn from(e: tch::TchError) -> Self {
        EngineError::Internal(e.to_string())
    }
}
