//! The HTTP connection loop under the OpenAI-compatible router: TLS, a connection limit,
//! a header read timeout, a cap on idle keep-alive connections, and a shutdown bounded
//! in time.
//!
//! Data flow: each accepted TCP connection takes a permit of a semaphore of
//! `max_connections` (none left: the connection is closed at once, and counted), is
//! wrapped in TLS when configured (the handshake bounded by the header timeout), and is
//! served by hyper's HTTP/1.1 connection with `header_read_timeout` (a client that
//! trickles its headers is cut). A response that would leave more than
//! `max_idle_connections` connections idle (open, no request in flight) carries
//! `Connection: close`, so a burst of one-request connections does not leave hundreds
//! of idle sockets in the client's pool (see [`IdleCap`]). On shutdown the listener closes, idle keep-alive
//! connections end, requests in flight (SSE streams included) get `shutdown_timeout`,
//! then every connection still open is dropped.
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
#[cfg(test)]
use std::time::Instant;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::engine::{EngineHandle, Submission};
use crate::error::EngineError;
use crate::request::{Event, GenerateRequest, PromptInput};
use crate::security::ServeOptions;

/// Serves `app` on `listener` until `shutdown` resolves (see the module docs).
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let tls = match &opts.tls {
        Some(t) => Some(TlsAcceptor::from(
            t.rustls_config().map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    let cap = Arc::new(IdleCap {
        permits: permits.clone(),
        max_connections: opts.max_connections,
        max_idle: opts.max_idle_connections,
        busy: AtomicUsize::new(0),
    });
    let app = app.layer(axum::middleware::from_fn_with_state(cap, cap_idle));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let header_timeout = opts.header_read_timeout;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                %peer,
                max_connections = opts.max_connections,
                "http connection refused: server.max_connections are open"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let _permit = permit;
            serve_connection(stream, app, tls, header_timeout, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            timeout_secs = opts.shutdown_timeout.as_secs_f64(),
            "http: connections still open after the shutdown timeout are cut"
        );
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Counts what the idle keep-alive cap needs: open connections (the permits taken) and
/// requests in flight. HTTP/1.1 runs one request at a time per connection, so the idle
/// connections are the open ones less the requests in flight. A streamed response counts
/// as finished once its head is sent.
struct IdleCap {
    permits: Arc<Semaphore>,
    max_connections: usize,
    max_idle: usize,
    busy: AtomicUsize,
}

impl IdleCap {
    /// Idle connections once the response being finished is sent (its own included).
    fn idle_after_response(&self) -> usize {
        let open = self.max_connections - self.permits.available_permits();
        open.saturating_sub(self.busy.load(Ordering::SeqCst))
    }
}

/// A request in flight; counted until dropped (also when the client goes away).
struct InFlight<'a>(&'a IdleCap);

impl<'a> InFlight<'a> {
    fn new(cap: &'a IdleCap) -> Self {
        cap.busy.fetch_add(1, Ordering::SeqCst);
        InFlight(cap)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Adds `Connection: close` to a response that would leave more than `max_idle`
/// connections idle; hyper then closes the connection after it.
async fn cap_idle(
    axum::extract::State(cap): axum::extract::State<Arc<IdleCap>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let in_flight = InFlight::new(&cap);
    let mut resp = next.run(req).await;
    drop(in_flight);
    if cap.idle_after_response() > cap.max_idle {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let svc = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let result = match tls {
        Some(acceptor) => {
            match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(s), svc))
                        .await
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            }
        }
        None => {
            watcher
                .watch(builder.serve_connection(TokioIo::new(stream), svc))
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Submits `req`. Prompts given as token ids are validated in place (range checks
/// only); text and chat prompts run the tokenizer and the chat template, which must not
/// hold up the async reactor, so they are submitted from a blocking thread.
pub(crate) async fn submit_blocking(
    engine: &EngineHandle,
    req: GenerateRequest,
) -> Result<Submission, EngineError> {
    if req
        .prompts
        .iter()
        .all(|p| matches!(p.input, PromptInput::Tokens(_)))
    {
        return engine.submit(req);
    }
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.submit(req))
        .await
        .map_err(|e| EngineError::Internal(format!("request validation task failed: {e}")))?
}

/// Events buffered for one streaming HTTP response. A client that stops reading
/// lets it fill; then the request is cancelled (its sequences leave the batch) and the
/// stream ends, instead of the events piling up in memory.
pub const SSE_BUFFER_EVENTS: usize = 4096;

/// Moves the engine's events into a bounded channel; drops the engine's receiver (which
/// cancels the request) when the reader is [`SSE_BUFFER_EVENTS`] behind.
pub(crate) fn bounded_events(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> tokio::sync::mpsc::Receiver<Event> {
    let (tx, rx) = tokio::sync::mpsc::channel(SSE_BUFFER_EVENTS);
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            match tx.try_send(e) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        buffered = SSE_BUFFER_EVENTS,
                        "streaming client stopped reading; request cancelled"
                    );
                    return;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(i: usize) -> Event {
        Event::Token {
            prompt_index: 0,
            completion_index: 0,
            token: i as i64,
            logprob: 0.0,
            top_logprobs: vec![],
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_cancels_its_request() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut bounded = bounded_events(rx);
        // A reader that keeps up sees every event in order.
        for i in 0..10 {
            tx.send(token(i)).unwrap();
        }
        for i in 0..10 {
            match bounded.recv().await {
                Some(Event::Token { token, .. }) => assert_eq!(token, i),
                other => panic!("{other:?}"),
            }
        }
        // One that stops: once the buffer is full the engine's side is closed, which
        // is how the engine learns to drop the request's sequences.
        for i in 0..SSE_BUFFER_EVENTS + 10 {
            if tx.send(token(i)).is_err() {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !tx.is_closed() {
            assert!(
                Instant::now() < deadline,
                "the engine side was never closed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut drained = 0;
        while bounded.recv().await.is_some() {
            drained += 1;
        }
        assert_eq!(drained, SSE_BUFFER_EVENTS, "buffered events are bounded");
    }
}
