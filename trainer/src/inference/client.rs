//! A client of OpenAI-compatible servers (rollout workers, vLLM, any `/v1/chat/completions`):
//! streamed chat completions over several endpoints, each request sent to the endpoint with the
//! fewest outstanding requests, retried with exponential backoff on another endpoint when a
//! connection fails, a read times out, or the server answers 429/5xx.
//!
//! Data flow: [`Pool::connect`] resolves the model (the first of `/v1/models` unless configured)
//! -> [`Pool::chat`] picks an endpoint, POSTs with `"stream": true`, reads server-sent events
//! (`data: {...}` lines, then `data: [DONE]`), appends each choice's `delta.content`, counts
//! streamed chunks as tokens (or takes `usage` when the server sends it) and reports every
//! chunk to the caller's progress callback.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where the servers are and how to talk to them (shared by `eval` and `generate`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Base URLs including `/v1`, e.g. `http://worker-0:8000/v1`.
    pub endpoints: Vec<String>,
    /// The served model name; default the first of `GET {endpoint}/models`.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer ...`; else read from `api_key_file`, else from the
    /// `OPENAI_API_KEY` or `ROLLOUT_API_KEY` environment variable.
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    /// Longest silence on a streamed response (seconds) before the attempt fails.
    pub request_timeout_secs: f64,
    /// Attempts after the first for one request.
    pub max_retries: u32,
    /// Wait before the first retry (seconds); doubled at each further retry.
    pub retry_backoff_secs: f64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            model: None,
            api_key: None,
            api_key_file: None,
            request_timeout_secs: 600.0,
            max_retries: 3,
            retry_backoff_secs: 1.0,
        }
    }
}

impl ClientConfig {
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |field: &str, message: String| ClientError::Config {
            field: field.into(),
            message,
        };
        if self.endpoints.is_empty() {
            return Err(bad(
                "endpoints",
                "list at least one base URL, e.g. http://127.0.0.1:8000/v1".into(),
            ));
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(bad(
                    "endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if !(self.request_timeout_secs.is_finite() && self.request_timeout_secs > 0.0) {
            return Err(bad(
                "request_timeout_secs",
                format!("must be > 0, got {}", self.request_timeout_secs),
            ));
        }
        if !(self.retry_backoff_secs.is_finite() && self.retry_backoff_secs >= 0.0) {
            return Err(bad(
                "retry_backoff_secs",
                format!("must be >= 0, got {}", self.retry_backoff_secs),
            ));
        }
        Ok(())
    }

    fn resolve_api_key(&self) -> Result<Option<String>, ClientError> {
        if let Some(k) = &self.api_key {
            return Ok(Some(k.clone()));
        }
        if let Some(path) = &self.api_key_file {
            let key = std::fs::read_to_string(path).map_err(|e| ClientError::Config {
                field: "api_key_file".into(),
                message: format!("{}: {e}", path.display()),
            })?;
            return Ok(Some(key.trim().to_string()));
        }
        Ok(["OPENAI_API_KEY", "ROLLOUT_API_KEY"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{field}: {message}")]
    Config { field: String, message: String },
    #[error("{url}: {message}")]
    Transport {
        url: String,
        message: String,
        retryable: bool,
    },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: no model listed by /models")]
    NoModel { url: String },
    #[error("request failed after {attempts} attempts; last error: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<ClientError>,
    },
}

impl ClientError {
    fn retryable(&self) -> bool {
        match self {
            ClientError::Transport { retryable, .. } => *retryable,
            ClientError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Sampling settings of one chat request (OpenAI names).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: Option<u64>,
}

/// One finished completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    /// `stop`, `length`, ... as the server reports it.
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: u64,
    /// The endpoint that served it.
    pub endpoint: String,
}

struct Endpoint {
    url: String,
    outstanding: AtomicUsize,
}

/// Endpoints with their outstanding-request counts and one HTTP client.
pub struct Pool {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    api_key: Option<String>,
    pub model: String,
    cfg: ClientConfig,
}

fn transport(url: &str, e: reqwest::Error) -> ClientError {
    ClientError::Transport {
        url: url.to_string(),
        message: format!("{e}"),
        retryable: true,
    }
}

impl Pool {
    /// Builds the client and resolves the model name (asking the endpoints in turn).
    pub async fn connect(cfg: &ClientConfig) -> Result<Pool, ClientError> {
        cfg.validate()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs_f64(cfg.request_timeout_secs))
            .build()
            .map_err(|e| transport("client", e))?;
        let mut pool = Pool {
            http,
            endpoints: cfg
                .endpoints
                .iter()
                .map(|u| Endpoint {
                    url: u.trim_end_matches('/').to_string(),
                    outstanding: AtomicUsize::new(0),
                })
                .collect(),
            api_key: cfg.resolve_api_key()?,
            model: String::new(),
            cfg: cfg.clone(),
        };
        pool.model = match &cfg.model {
            Some(m) => m.clone(),
            None => pool.first_model().await?,
        };
        Ok(pool)
    }

    async fn first_model(&self) -> Result<String, ClientError> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{}/models", ep.url);
            let r = async {
                let resp = self
                    .auth(self.http.get(&url))
                    .send()
                    .await
                    .map_err(|e| transport(&url, e))?;
                let status = resp.status().as_u16();
                let body = resp.text().await.map_err(|e| transport(&url, e))?;
                if status != 200 {
                    return Err(ClientError::Status {
                        url: url.clone(),
                        status,
                        body,
                    });
                }
                let v: Value = serde_json::from_str(&body).map_err(|e| ClientError::Transport {
                    url: url.clone(),
                    message: format!("invalid JSON: {e}"),
                    retryable: false,
                })?;
                v["data"][0]["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or(ClientError::NoModel { url: url.clone() })
            }
            .await;
            match r {
                Ok(m) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Config {
            field: "endpoints".into(),
            message: "empty".into(),
        }))
    }

    fn auth(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    /// Requests in flight per endpoint, in configuration order.
    pub fn outstanding(&self) -> Vec<usize> {
        self.endpoints
            .iter()
            .map(|e| e.outstanding.load(Ordering::Relaxed))
            .collect()
    }

    /// The endpoint with the fewest outstanding requests, avoiding `avoid` when another exists.
    fn pick(&self, avoid: Option<usize>) -> usize {
        (0..self.endpoints.len())
            .filter(|&i| Some(i) != avoid || self.endpoints.len() == 1)
            .min_by_key(|&i| self.endpoints[i].outstanding.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// One streamed chat completion, with retries; `on_chunk` is called once per streamed
    /// token chunk (for progress).
    pub async fn chat(
        &self,
        req: &ChatRequest,
        on_chunk: &(dyn Fn() + Sync),
    ) -> Result<Completion, ClientError> {
        let mut attempt = 0;
        let mut avoid = None;
        loop {
            let i = self.pick(avoid);
            let ep = &self.endpoints[i];
            ep.outstanding.fetch_add(1, Ordering::Relaxed);
            let r = self.chat_once(&ep.url, req, on_chunk).await;
            ep.outstanding.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(c) => return Ok(c),
                Err(e) if e.retryable() && attempt < self.cfg.max_retries => {
                    let wait = self.cfg.retry_backoff_secs * 2f64.powi(attempt as i32);
                    tracing::warn!(
                        "attempt {} failed: {e}; retrying in {wait:.1} s",
                        attempt + 1
                    );
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    attempt += 1;
                    avoid = Some(i);
                }
                Err(e) if attempt > 0 => {
                    return Err(ClientError::Exhausted {
                        attempts: attempt + 1,
                        last: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn chat_once(
        &self,
        base: &str,
        req: &ChatRequest,
        on_chunk: &(dyn Fn() + Sync),
    ) -> Result<Completion, ClientError> {
        let url = format!("{base}/chat/completions");
        let mut body = json!({
            "model": self.model,
            "messages": req.messages,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
            "n": 1,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(seed) = req.seed {
            body["seed"] = json!(seed);
        }
        let mut resp = self
            .auth(self.http.post(&url))
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(&url, e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Status {
                url,
                status,
                body: body.chars().take(500).collect(),
            });
        }
        let mut sse = SseState::default();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = resp.chunk().await.map_err(|e| transport(&url, e))?;
            let Some(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                match sse.line(line.trim_end()) {
                    Ok(true) => on_chunk(),
                    Ok(false) => {}
                    Err(e) => {
                        return Err(ClientError::Transport {
                            url,
                            message: e.to_string(),
                            retryable: true,
                        })
                    }
                }
                if sse.done {
                    break;
                }
            }
            if sse.done {
                break;
            }
        }
        if !sse.done && sse.finish_reason.is_none() {
            return Err(ClientError::Transport {
                url,
                message: "the stream ended before the completion finished".into(),
                retryable: true,
            });
        }
        Ok(Completion {
            text: sse.text,
            finish_reason: sse.finish_reason,
            prompt_tokens: sse.prompt_tokens,
            completion_tokens: sse.usage_completion.unwrap_or(sse.chunks),
            endpoint: base.to_string(),
        })
    }
}

/// Why one SSE line of a streamed response cannot be used.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("invalid stream chunk {data:?}: {source}")]
    Chunk {
        data: String,
        source: serde_json::Error,
    },
    #[error("server error in stream: {error}")]
    Server { error: Value },
}

/// What one streamed response has delivered so far.
#[derive(Debug, Default)]
struct SseState {
    text: String,
    finish_reason: Option<String>,
    chunks: u64,
    usage_completion: Option<u64>,
    prompt_tokens: Option<u64>,
    done: bool,
}

impl SseState {
    /// Consumes one SSE line; `Ok(true)` for a chunk carrying generated text.
    fn line(&mut self, line: &str) -> Result<bool, StreamError> {
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(false);
        };
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(false);
        }
        let v: Value = serde_json::from_str(data).map_err(|source| StreamError::Chunk {
            data: data.to_string(),
            source,
        })?;
        if let Some(err) = v.get("error") {
            return Err(StreamError::Server { error: err.clone() });
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage_completion = u["completion_tokens"].as_u64();
            self.prompt_tokens = u["prompt_tokens"].as_u64();
        }
        let mut token = false;
        if let Some(choice) = v["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                self.text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                self.finish_reason = Some(f.to_string());
            } else {
                self.chunks += 1;
                token = true;
            }
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_assemble_a_completion() {
        let mut s = SseState::default();
        let lines = [
            r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            "",
            r#"data: {"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":" world"},"finish_reason":null}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
            "data: [DONE]",
        ];
        let tokens: usize = lines.iter().map(|l| usize::from(s.line(l).unwrap())).sum();
        assert_eq!(tokens, 3);
        assert_eq!(s.text, "Hello world!");
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert!(s.done);
        assert!(s.line(r#"data: {"error": {"message": "boom"}}"#).is_err());
        assert!(s.line("data: {not json").is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let c = ClientConfig::default();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("endpoints"));
        let c = ClientConfig {
            endpoints: vec!["ftp://x".into()],
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not an http"));
    }
}
