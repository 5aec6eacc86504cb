//! Why [`crate::serve_with`] or [`crate::generate`] stopped: the typed error of the part
//! that failed (a server, the engine), or the engine thread's end.
use crate::engine::StartError;
use crate::EngineError;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// A server task panicked or was cancelled.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the engine thread stopped (see the log above); exiting")]
    EngineStopped,
}

/// Why an in-process generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("no prompts")]
    NoPrompts,
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine stopped before the generation finished")]
    EngineStopped,
}
