//! The external reward client against a real axum server on `127.0.0.1:0`, run by a background
//! tokio runtime while the client scores from the test's plain thread.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::*;

/// The server and the last request body it received.
struct Server {
    addr: SocketAddr,
    last_request: Arc<Mutex<Option<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let last_request = Arc::new(Mutex::new(None));
        let seen = last_request.clone();
        let record = move |body: &Value| *seen.lock().unwrap() = Some(body.clone());
        let app = Router::new()
            .route(
                "/score",
                post({
                    let record = record.clone();
                    move |headers: HeaderMap, Json(body): Json<Value>| async move {
                        record(&body);
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some("Bearer secret")
                        {
                            return (StatusCode::UNAUTHORIZED, Json(json!({"error": "no token"})));
                        }
                        // Completion length in characters, null for "skip", +100 if truncated.
                        let rewards: Vec<Value> = body["completions"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .zip(body["truncated"].as_array().unwrap())
                            .map(|(c, t)| match c.as_str().unwrap() {
                                "skip" => Value::Null,
                                c => json!(
                                    c.len() as f64 + if t.as_bool().unwrap() { 100.0 } else { 0.0 }
                                ),
                            })
                            .collect();
                        (
                            StatusCode::OK,
                            Json(json!({"rewards": rewards, "version": 1})),
                        )
                    }
                }),
            )
            .route(
                "/fail",
                post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "grader crashed") }),
            )
            .route(
                "/short",
                post(|Json(body): Json<Value>| async move {
                    let n = body["completions"].as_array().unwrap().len();
                    Json(json!({"rewards": vec![1.0; n - 1]}))
                }),
            )
            .route(
                "/string",
                post(|| async { Json(json!({"rewards": [1.0, "high"]})) }),
            )
            .route(
                "/shape",
                post(|| async { Json(json!({"scores": [1.0, 2.0]})) }),
            )
            .route("/text", post(|| async { "1.0 2.0" }))
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Json(json!({"rewards": [1.0, 1.0]}))
                }),
            );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server {
            addr,
            last_request,
            _runtime: runtime,
        }
    }

    fn function(&self, path: &str, timeout_secs: f64) -> ExternalReward {
        let mut headers = BTreeMap::new();
        headers.insert("Authorization".to_string(), "Bearer secret".to_string());
        ExternalReward::new(&ExternalRewardConfig {
            name: "judge".into(),
            url: format!("http://{}{path}", self.addr),
            timeout_secs,
            headers,
        })
        .unwrap()
    }
}

fn row(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn batch<'a>(rows: &'a [Map<String, Value>]) -> Vec<RewardInput<'a>> {
    let completions = ["four", "skip"];
    rows.iter()
        .enumerate()
        .map(|(i, fields)| RewardInput {
            prompt: "2+2?",
            completion: completions[i % 2],
            completion_tokens: 3 + i,
            truncated: i == 1,
            group: 0,
            fields,
        })
        .collect()
}

#[test]
fn scores_and_sends_the_protocol_request() {
    let server = Server::start();
    let rows = [
        row(&[("solution", json!("4")), ("level", json!(1))]),
        row(&[("solution", json!(4)), ("source", json!("gsm8k"))]),
    ];
    let scores = server
        .function("/score", 10.0)
        .score(&batch(&rows))
        .unwrap();
    assert_eq!(scores, vec![Some(4.0), None]);
    let request = server.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(
        request,
        json!({
            "prompts": ["2+2?", "2+2?"],
            "completions": ["four", "skip"],
            "completion_tokens": [3, 4],
            "truncated": [false, true],
            "solution": ["4", 4],
            "level": [1, null],
            "source": [null, "gsm8k"],
        })
    );
}

#[test]
fn missing_header_gives_the_status_and_body() {
    let server = Server::start();
    let f = ExternalReward::new(&ExternalRewardConfig {
        name: "judge".into(),
        url: format!("http://{}/score", server.addr),
        timeout_secs: 10.0,
        headers: BTreeMap::new(),
    })
    .unwrap();
    let rows = [row(&[])];
    let err = f.score(&batch(&rows)).unwrap_err().to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("no token"),
        "{err}"
    );
}

#[test]
fn server_error_names_url_and_status() {
    let server = Server::start();
    let rows = [row(&[]), row(&[])];
    let err = server
        .function("/fail", 10.0)
        .score(&batch(&rows))
        .unwrap_err();
    assert!(
        matches!(err, RewardError::Status { status: 500, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("'judge'") && msg.contains("/fail") && msg.contains("grader crashed"),
        "{msg}"
    );
}

#[test]
fn wrong_length_is_an_error() {
    let server = Server::start();
    let rows = [row(&[]), row(&[])];
    let err = server
        .function("/short", 10.0)
        .score(&batch(&rows))
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("1 rewards for a batch of 2"), "{msg}");
    assert!(msg.contains("/short"), "{msg}");
}

#[test]
fn non_number_and_bad_shapes_are_errors() {
    let server = Server::start();
    let rows = [row(&[]), row(&[])];
    let cases = [
        ("/string", "rewards[1] is \"\\\"high\\\"\" (a string)"),
        ("/shape", "expected an object with a \"rewards\" list"),
        ("/text", "the body is not JSON"),
    ];
    for (path, want) in cases {
        let err = server
            .function(path, 10.0)
            .score(&batch(&rows))
            .unwrap_err();
        assert!(
            matches!(err, RewardError::Response { .. }),
            "{path}: {err:?}"
        );
        assert!(err.to_string().contains(want), "{path}: {err}");
    }
}

#[test]
fn timeout_is_reported_and_bounded() {
    let server = Server::start();
    let rows = [row(&[]), row(&[])];
    let start = Instant::now();
    let err = server
        .function("/slow", 0.3)
        .score(&batch(&rows))
        .unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, RewardError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("within 0.3 s"), "{err}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

#[test]
fn refused_connection_is_a_request_error() {
    // Bind and drop to get a port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = ExternalReward::new(&ExternalRewardConfig {
        name: "judge".into(),
        url: format!("http://{addr}/score"),
        timeout_secs: 5.0,
        headers: BTreeMap::new(),
    })
    .unwrap();
    let rows = [row(&[])];
    let err = f.score(&batch(&rows)).unwrap_err();
    assert!(matches!(err, RewardError::Request { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn column_named_like_a_protocol_key_is_an_error() {
    let f = ExternalReward::new(&ExternalRewardConfig {
        name: "judge".into(),
        url: "http://127.0.0.1:9/score".into(),
        timeout_secs: 5.0,
        headers: BTreeMap::new(),
    })
    .unwrap();
    let rows = [row(&[("prompts", json!("x"))])];
    let err = f.score(&batch(&rows)).unwrap_err().to_string();
    assert!(err.contains("'prompts'") && err.contains("rename"), "{err}");
    assert_eq!(f.score(&[]).unwrap(), Vec::<Option<f64>>::new());
}
