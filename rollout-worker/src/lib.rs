//! The rollout worker: holds an inference copy of the policy and serves grouped
//! completions with the token log-probs the trainer needs, over gRPC (`rollout.v1`) and
//! an OpenAI-compatible HTTP API, taking versioned weight updates between decode steps.
//!
//! Data flow: [`grpc`] and [`http`] convert wire requests into a
//! [`request::GenerateRequest`] and submit it through an [`engine::EngineHandle`]; the
//! engine thread validates nothing further, asks the pure [`scheduler::Scheduler`] which
//! sequences run each step (continuous batching under a row limit and a KV-cache budget),
//! runs the model over one paged KV cache (`model::paged`), and streams each group back when its `n`
//! completions are done. Weight chunks are assembled by [`weights`] and applied by the
//! engine between steps. [`metrics`] exposes Prometheus counters under vLLM's names;
//! [`config`] holds the worker's settings. [`generate`] runs the same engine in-process
//! for the `generate` command.
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod request;
pub mod scheduler;
pub mod weights;

pub use config::{EngineConfig, ServerConfig, WorkerConfig};
pub use engine::EngineHandle;
pub use error::EngineError;
pub use generate::{generate, Completion, FinishReason, GenerateOptions};
pub use metrics::Metrics;
pub use request::{Event, GenerateRequest, GroupOutput, PromptInput, PromptSpec};

/// Serves gRPC and HTTP on the two listeners until `shutdown` resolves, then stops the
/// engine. Tests bind both to `127.0.0.1:0`.
pub async fn serve(
    grpc_listener: tokio::net::TcpListener,
    http_listener: tokio::net::TcpListener,
    engine: EngineHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let grpc = tokio::spawn(grpc::serve(grpc_listener, engine.clone(), wait(rx.clone())));
    let http = tokio::spawn(http::serve(http_listener, engine.clone(), wait(rx)));
    // A dead engine (a panic it could not recover from) ends the process with an
    // error, so an orchestrator restarts it instead of keeping a worker that fails
    // every request.
    let died = tokio::select! {
        _ = shutdown => false,
        _ = engine.stopped() => true,
    };
    let _ = tx.send(true);
    let (g, h) = (grpc.await, http.await);
    engine.shutdown();
    g??;
    h??;
    if died {
        anyhow::bail!("the engine thread stopped (see the log above); exiting");
    }
    Ok(())
}
