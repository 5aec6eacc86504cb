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
//! for the `generate` command. [`security`] holds the API key, TLS material and server
//! limits ([`ServeOptions`]); [`http_server`] is the HTTP connection loop.
pub mod config;
pub mod data_plane;
pub mod detok;
pub mod engine;
pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod http_server;
pub mod metrics;
pub mod nccl_sync;
pub mod request;
pub mod run_error;
pub mod scheduler;
pub mod security;
pub mod weights;

pub use config::{EngineConfig, ServerConfig, WorkerConfig};
pub use engine::EngineHandle;
pub use error::EngineError;
pub use generate::{generate, Completion, FinishReason, GenerateOptions};
pub use metrics::Metrics;
pub use request::{Event, GenerateRequest, GroupOutput, PromptInput, PromptSpec};
pub use run_error::{GenerateError, ServeError};
pub use security::{ApiKey, ServeOptions};

/// Serves gRPC and HTTP on the two listeners until `shutdown` resolves, then stops the
/// engine. No API key, no TLS, default limits. Tests bind both to `127.0.0.1:0`.
pub async fn serve(
    grpc_listener: tokio::net::TcpListener,
    http_listener: tokio::net::TcpListener,
    engine: EngineHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(
        grpc_listener,
        http_listener,
        engine,
        ServeOptions::default(),
        shutdown,
    )
    .await
}

/// [`serve`] with the key, TLS and limits of `opts`. After `shutdown`, open streams get
/// `opts.shutdown_timeout` to finish; then the engine stops (ending every stream still
/// open with UNAVAILABLE) and the servers get the same time again before they are cut.
pub async fn serve_with(
    grpc_listener: tokio::net::TcpListener,
    http_listener: tokio::net::TcpListener,
    engine: EngineHandle,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let exposed = [&grpc_listener, &http_listener]
        .iter()
        .any(|l| l.local_addr().is_ok_and(|a| !a.ip().is_loopback()));
    if opts.api_key.is_none() && exposed {
        tracing::warn!(
            "no API key (ROLLOUT_API_KEY or --api-key-file) and listening beyond loopback: \
             anyone who reaches these ports can generate and replace the served weights"
        );
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let opts = std::sync::Arc::new(opts);
    let (o1, o2) = (opts.clone(), opts.clone());
    let (e1, e2) = (engine.clone(), engine.clone());
    let grpc_rx = rx.clone();
    let mut grpc =
        tokio::spawn(async move { grpc::serve_with(grpc_listener, e1, &o1, wait(grpc_rx)).await });
    let mut http =
        tokio::spawn(async move { http::serve_with(http_listener, e2, &o2, wait(rx)).await });
    // A dead engine (a panic it could not recover from) ends the process with an
    // error, so an orchestrator restarts it instead of keeping a worker that fails
    // every request.
    let died = tokio::select! {
        _ = shutdown => false,
        _ = engine.stopped() => true,
    };
    let _ = tx.send(true);
    let grace = opts.shutdown_timeout;
    let both = async {
        let g = (&mut grpc).await;
        let h = (&mut http).await;
        (g, h)
    };
    let (g, h) = match tokio::time::timeout(grace, both).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(
                timeout_secs = grace.as_secs_f64(),
                "streams still open after the shutdown timeout; stopping the engine ends them"
            );
            engine.shutdown();
            if tokio::time::timeout(grace, async {
                let _ = (&mut grpc).await;
                let _ = (&mut http).await;
            })
            .await
            .is_err()
            {
                grpc.abort();
                http.abort();
            }
            return Ok(());
        }
    };
    engine.shutdown();
    g??;
    h??;
    if died {
        return Err(ServeError::EngineStopped);
    }
    Ok(())
}
