//! The error type of every `dist` operation. Failures caused by another rank name
//! that rank; nothing here panics on peer or network input.

use std::time::Duration;

/// Errors of rendezvous, the key-value store and the communicators.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A torchrun-style environment variable is missing or malformed.
    #[error("rendezvous environment: {var} {detail}")]
    Env { var: &'static str, detail: String },

    /// A `DistConfig` field has a value outside its allowed range.
    #[error("dist config: field `{field}` {detail}")]
    Config { field: &'static str, detail: String },

    /// Some ranks never registered with the store before the timeout.
    #[error(
        "rendezvous: ranks {missing:?} of world size {world_size} did not arrive within {timeout:?}"
    )]
    RendezvousTimeout {
        missing: Vec<usize>,
        world_size: usize,
        timeout: Duration,
    },

    /// The key-value store could not be reached, or spoke an unexpected protocol.
    #[error("store at {addr}: {detail}")]
    Store { addr: String, detail: String },

    /// Keys did not appear in the store before the timeout.
    #[error("store: keys {missing:?} not set within {timeout:?}")]
    StoreTimeout {
        missing: Vec<String>,
        timeout: Duration,
    },

    /// A caller-side mistake detected before any communication (shape, dtype, root...).
    #[error("{op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },

    /// Another rank died, stalled past the timeout or aborted. `peer` is the rank the
    /// failure was traced back to; `observed_by` is the neighbour that noticed it first.
    #[error("{op}: rank {peer} failed: {detail} (rank {rank} gave up; first noticed by rank {observed_by})")]
    PeerFailed {
        op: String,
        rank: usize,
        peer: usize,
        observed_by: usize,
        detail: String,
    },

    /// Two ranks entered different collectives (or the same one with different
    /// arguments): a program bug that would otherwise hang.
    #[error("{op}: rank {peer} called {theirs} but rank {rank} called {ours}")]
    Mismatch {
        op: String,
        rank: usize,
        peer: usize,
        ours: String,
        theirs: String,
    },

    /// An earlier collective failed; the communicator's links are closed.
    #[error("communicator unusable after an earlier failure: {0}")]
    Poisoned(String),

    /// The NCCL backend was requested where CUDA or libnccl is missing.
    #[error("NCCL backend unavailable: {0}")]
    NcclUnavailable(String),

    /// An NCCL or CUDA driver call failed or did not complete in time.
    #[error("NCCL {op}: {detail}")]
    Nccl { op: &'static str, detail: String },

    /// A libtorch operation on a tensor failed.
    #[error("{op}: tensor operation failed: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },

    /// Local socket setup failed (bind, listen) outside any peer's control.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CommError {
    pub(crate) fn torch(op: &'static str) -> impl FnOnce(tch::TchError) -> CommError {
        move |source| CommError::Torch { op, source }
    }

    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> CommError {
        CommError::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }
}
