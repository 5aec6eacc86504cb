//! A scripted OpenAI-compatible server for `trainer eval` / `trainer generate` tests: streamed
//! chat completions whose content is decided by the prompt, with injectable faults (HTTP 500
//! for the first requests, a server that never answers), a per-chunk delay, and counters of
//! requests in flight (the concurrency bound seen from the server's side).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Default)]
pub struct Script {
    /// Answer the first `fail_first` chat requests with HTTP 500.
    pub fail_first: usize,
    /// Never answer chat requests (accept, then hang).
    pub hang: bool,
    /// Always answer HTTP 500.
    pub always_fail: bool,
    /// Delay between streamed chunks.
    pub chunk_delay: Duration,
    /// Problem `N` gets correct answers for its first `correct(N)` requests.
    pub correct_per_problem: Vec<usize>,
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub served: Mutex<HashMap<usize, usize>>,
    pub auth_headers: Mutex<Vec<Option<String>>>,
}

struct InFlight(Arc<Script>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `Problem N: ...` in the last user message -> N.
fn problem_number(body: &Value) -> Option<usize> {
    let msgs = body["messages"].as_array()?;
    let text = msgs.iter().rev().find(|m| m["role"] == "user")?["content"].as_str()?;
    let rest = text.split("Problem ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

async fn chat(
    State(s): State<Arc<Script>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let k = s.requests.fetch_add(1, Ordering::SeqCst);
    s.auth_headers.lock().unwrap().push(
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    );
    if s.always_fail || k < s.fail_first {
        return (StatusCode::INTERNAL_SERVER_ERROR, "scripted failure").into_response();
    }
    if s.hang {
        std::future::pending::<()>().await;
    }
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(s.clone());
    let n = problem_number(&body).unwrap_or(0);
    let served = {
        let mut m = s.served.lock().unwrap();
        let e = m.entry(n).or_insert(0);
        *e += 1;
        *e - 1
    };
    let correct = served < s.correct_per_problem.get(n).copied().unwrap_or(0);
    let answer = if correct { n as i64 } else { -1 - n as i64 };
    let words: Vec<String> = vec![
        "Let".into(),
        " us".into(),
        " think.".into(),
        format!(" The answer is $\\boxed{{{answer}}}$."),
    ];
    let delay = s.chunk_delay;
    let mut chunks: Vec<String> = words
        .iter()
        .map(|w| {
            json!({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})
                .to_string()
        })
        .collect();
    chunks
        .push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string());
    chunks.push(
        json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": words.len()}})
            .to_string(),
    );
    chunks.push("[DONE]".into());
    let stream = futures::stream::unfold(
        (chunks.into_iter(), Some(guard)),
        move |(mut it, guard)| async move {
            let c = it.next()?;
            tokio::time::sleep(delay).await;
            Some((
                Ok::<_, Infallible>(Bytes::from(format!("data: {c}\n\n"))),
                (it, guard),
            ))
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "scripted-model", "object": "model"}]}))
}

/// A running scripted server: its base URL (with `/v1`) and its script.
pub struct Scripted {
    pub url: String,
    pub script: Arc<Script>,
    _runtime: tokio::runtime::Runtime,
}

impl Scripted {
    pub fn start(script: Script) -> Scripted {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let script = Arc::new(script);
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .with_state(script.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Scripted {
            url,
            script,
            _runtime: runtime,
        }
    }
}

/// A URL on loopback where nothing listens.
pub fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

/// `n` MATH-500-style rows `{"problem": "Problem i: ...", "answer": "i"}`.
pub fn math_rows(n: usize) -> String {
    (0..n)
        .map(|i| json!({"problem": format!("Problem {i}: what is {i}?"), "answer": i.to_string(), "uid": format!("u{i}")}).to_string() + "\n")
        .collect()
}

/// The records of a JSONL file.
pub fn read_jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}
