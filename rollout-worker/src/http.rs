//! The OpenAI-compatible HTTP front end (as vLLM serves it), plus `/metrics` and `/health`.
//!
//! Data flow: a JSON body is parsed into the OpenAI request shape, converted to a
//! [`GenerateRequest`] (`n`, `temperature`, `top_p`, `max_tokens`, `stop`, `logprobs`,
//! `seed`, and vLLM's `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`), submitted to the
//! [`EngineHandle`], and the engine's events are rendered either as one JSON response
//! (all groups collected) or as server-sent events: one chunk per sampled token with the
//! text delta decoded so far, a last chunk per choice with its `finish_reason`, then
//! `data: [DONE]`. Choice `i * n + j` is completion `j` of prompt `i`. Domain errors map
//! to HTTP statuses in one place, [`ApiError::from`].
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use model::tokenizer::ChatMessage;
use model::{SamplingParams, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::detok::{IncrementalDecoder, StopScan};
use crate::engine::EngineHandle;
use crate::error::EngineError;
use crate::request::{
    CompletionOutput, Event, FinishReason, GenerateRequest, GroupOutput, PromptInput, PromptSpec,
};
use crate::security::ServeOptions;

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// The one mapping from domain errors to HTTP statuses.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match e {
            EngineError::InvalidArgument(_) | EngineError::Weights(_) => StatusCode::BAD_REQUEST,
            EngineError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            EngineError::StaleVersion { .. }
            | EngineError::Superseded { .. }
            | EngineError::WeightSync(_) => StatusCode::CONFLICT,
            EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

fn error_body(status: StatusCode, message: &str) -> Value {
    let kind = match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(error_body(self.status, &self.message))).into_response()
    }
}

/// The HTTP routes over `engine`, without authentication.
pub fn router(engine: EngineHandle) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(engine)
}

/// The routes behind the API key check of `opts` (when it has a key).
pub fn router_with(engine: EngineHandle, opts: &ServeOptions) -> Router {
    let app = router(engine);
    match &opts.api_key {
        None => app,
        Some(_) => app.layer(axum::middleware::from_fn_with_state(
            Arc::new(opts.clone()),
            require_api_key,
        )),
    }
}

/// `Authorization: Bearer <key>` on every route but the open ones (vLLM's `--api-key`).
async fn require_api_key(
    State(opts): State<Arc<ServeOptions>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|h| h.as_bytes());
    let ok =
        opts.is_open(req.uri().path()) || opts.api_key.as_ref().is_some_and(|k| k.accepts(header));
    if ok {
        return next.run(req).await;
    }
    let message = if header.is_some() {
        "the Authorization header does not hold this worker's API key"
    } else {
        "missing Authorization header: send `Authorization: Bearer <ROLLOUT_API_KEY>`"
    };
    let status = StatusCode::UNAUTHORIZED;
    (
        status,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(error_body(status, message)),
    )
        .into_response()
}

/// Serves HTTP on `listener` until `shutdown` resolves, without key or TLS.
pub async fn serve(
    listener: TcpListener,
    engine: EngineHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, engine, &ServeOptions::default(), shutdown).await
}

/// Serves HTTP on `listener` with the key, TLS and limits of `opts`.
pub async fn serve_with(
    listener: TcpListener,
    engine: EngineHandle,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http_server::serve_router(listener, router_with(engine, opts), opts, shutdown).await
}

async fn health(State(engine): State<EngineHandle>) -> Response {
    let l = engine.stats();
    let status = if l.alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if l.alive { "ok" } else { "stopped" },
        "weight_version": l.weight_version,
        "num_running_seqs": l.num_running,
        "num_waiting_seqs": l.num_waiting,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(engine): State<EngineHandle>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        engine.metrics().render(),
    )
        .into_response()
}

async fn models(State(engine): State<EngineHandle>) -> Json<Value> {
    let i = engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": i.name,
            "object": "model",
            "created": now_secs(),
            "owned_by": "grpo-rs",
            "root": i.path,
            "max_model_len": i.limits.max_model_len,
            "weight_version": engine.stats().weight_version,
        }],
    }))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:04x}",
        now_secs(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `"text"` or `["a", "b"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The `prompt` of /v1/completions: text, texts, token ids or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// Sampling fields shared by both endpoints (OpenAI names, vLLM extensions).
#[derive(Debug, Default, Deserialize)]
struct CommonParams {
    model: Option<String>,
    n: Option<usize>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stop_token_ids: Vec<i64>,
    #[serde(default)]
    ignore_eos: bool,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: CompletionPrompt,
    /// Number of alternatives per token (legacy API); `0` returns only the sampled ones.
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: CommonParams,
}

/// Chat message content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    common: CommonParams,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Converts the shared fields; `prompts` and `top_logprobs` come from the endpoint.
fn build_request(
    engine: &EngineHandle,
    c: CommonParams,
    prompts: Vec<PromptInput>,
    max_tokens: Option<usize>,
    top_logprobs: usize,
) -> Result<GenerateRequest, ApiError> {
    let name = &engine.info().name;
    if let Some(m) = c.model.as_deref() {
        if m != name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("the model `{m}` does not exist; this worker serves `{name}`"),
            });
        }
    }
    Ok(GenerateRequest {
        prompts: prompts
            .into_iter()
            .map(|input| PromptSpec {
                id: String::new(),
                input,
            })
            .collect(),
        n: c.n.unwrap_or(1),
        sampling: SamplingParams {
            temperature: c.temperature.unwrap_or(1.0),
            top_p: c.top_p.unwrap_or(1.0),
            // vLLM and OpenAI clients use -1 for "disabled".
            top_k: c.top_k.map_or(0, |k| if k == -1 { 0 } else { k }),
            min_p: c.min_p.unwrap_or(0.0),
        },
        max_new_tokens: max_tokens.unwrap_or(16),
        stop_token_ids: c.stop_token_ids,
        stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        ignore_eos: c.ignore_eos,
        seed: c.seed,
        top_logprobs,
        stream_tokens: c.stream,
        return_text: true,
    })
}

/// Which endpoint a response is rendered for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    Completions { logprobs: bool },
    Chat { logprobs: bool },
}

async fn completions(
    State(engine): State<EngineHandle>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: CompletionBody = parse(&body)?;
    if b.echo {
        return Err(ApiError::bad_request("echo is not supported"));
    }
    let prompts = match b.prompt {
        CompletionPrompt::Text(t) => vec![PromptInput::Text(t)],
        CompletionPrompt::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
        CompletionPrompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
        CompletionPrompt::TokenLists(v) => v.into_iter().map(PromptInput::Tokens).collect(),
    };
    let stream = b.common.stream;
    let max_tokens = b.common.max_tokens;
    let req = build_request(
        &engine,
        b.common,
        prompts,
        max_tokens,
        b.logprobs.unwrap_or(0),
    )?;
    respond(
        engine,
        req,
        Api::Completions {
            logprobs: b.logprobs.is_some(),
        },
        stream,
    )
    .await
}

async fn chat_completions(
    State(engine): State<EngineHandle>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: ChatBody = parse(&body)?;
    let messages = b
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => parts
                    .into_iter()
                    .filter(|p| p.kind == "text")
                    .map(|p| p.text)
                    .collect::<Vec<_>>()
                    .join(""),
            };
            ChatMessage::new(m.role, content)
        })
        .collect();
    let stream = b.common.stream;
    let max_tokens = b.max_completion_tokens.or(b.common.max_tokens);
    let top = if b.logprobs {
        b.top_logprobs.unwrap_or(0)
    } else {
        0
    };
    let req = build_request(
        &engine,
        b.common,
        vec![PromptInput::Chat(messages)],
        max_tokens,
        top,
    )?;
    respond(
        engine,
        req,
        Api::Chat {
            logprobs: b.logprobs,
        },
        stream,
    )
    .await
}

async fn respond(
    engine: EngineHandle,
    req: GenerateRequest,
    api: Api,
    stream: bool,
) -> Result<Response, ApiError> {
    let n = req.n;
    let stop = req.stop.clone();
    let span = tracing::info_span!("rollout", prompts = req.prompts.len(), n, stream);
    let _e = span.enter();
    let sub = crate::http_server::submit_blocking(&engine, req).await?;
    let ctx = Ctx {
        id: new_id(match api {
            Api::Completions { .. } => "cmpl",
            Api::Chat { .. } => "chatcmpl",
        }),
        created: now_secs(),
        model: engine.info().name.clone(),
        api,
        n,
        stop,
    };
    if stream {
        let events = crate::http_server::bounded_events(sub.events);
        let s = sse_stream(engine, ctx, events, sub.prompt_token_ids.len() * n);
        return Ok(Sse::new(s).into_response());
    }
    let mut events = sub.events;
    let mut groups = vec![];
    while groups.len() < sub.prompt_token_ids.len() {
        match events.recv().await {
            Some(Event::Group(g)) => groups.push(g),
            Some(Event::Token { .. } | Event::Progress { .. }) => {}
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(EngineError::Unavailable("the engine stopped".into()).into()),
        }
    }
    groups.sort_by_key(|g| g.prompt_index);
    Ok(Json(ctx.full_response(engine.tokenizer(), &groups)).into_response())
}

/// Fields every response of one request shares.
struct Ctx {
    id: String,
    created: u64,
    model: String,
    api: Api,
    n: usize,
    /// The request's stop strings (streamed text is held back while one may be forming).
    stop: Vec<String>,
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn token_str(tok: &Tokenizer, id: i64) -> String {
    tok.decode(&[id as u32], false).unwrap_or_default()
}

impl Ctx {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completions { .. }, _) => "text_completion",
            (Api::Chat { .. }, false) => "chat.completion",
            (Api::Chat { .. }, true) => "chat.completion.chunk",
        }
    }

    /// The `logprobs` object of `tokens` (legacy completions or chat format); `offset`
    /// is the text offset of the first token.
    fn logprobs(
        &self,
        tok: &Tokenizer,
        tokens: &[i64],
        lps: &[f32],
        tops: &[Vec<(i64, f32)>],
        offset: usize,
    ) -> Value {
        match self.api {
            Api::Completions { logprobs: false } | Api::Chat { logprobs: false } => Value::Null,
            Api::Completions { logprobs: true } => {
                let strs: Vec<String> = tokens.iter().map(|&t| token_str(tok, t)).collect();
                let mut offsets = Vec::with_capacity(strs.len());
                let mut at = offset;
                for s in &strs {
                    offsets.push(at);
                    at += s.len();
                }
                let top: Vec<Value> = tops
                    .iter()
                    .map(|alts| {
                        Value::Object(
                            alts.iter()
                                .map(|&(t, lp)| (token_str(tok, t), json!(lp)))
                                .collect(),
                        )
                    })
                    .collect();
                json!({
                    "tokens": strs,
                    "token_logprobs": lps,
                    "top_logprobs": if tops.is_empty() { Value::Null } else { json!(top) },
                    "text_offset": offsets,
                })
            }
            Api::Chat { logprobs: true } => {
                let entry = |t: i64, lp: f32| {
                    let s = token_str(tok, t);
                    json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .zip(lps)
                    .enumerate()
                    .map(|(i, (&t, &lp))| {
                        let mut e = entry(t, lp);
                        let alts: Vec<Value> = tops
                            .get(i)
                            .map(|a| a.iter().map(|&(t, lp)| entry(t, lp)).collect())
                            .unwrap_or_default();
                        e["top_logprobs"] = json!(alts);
                        e
                    })
                    .collect();
                json!({"content": content})
            }
        }
    }

    fn full_response(&self, tok: &Tokenizer, groups: &[GroupOutput]) -> Value {
        let mut choices = vec![];
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for g in groups {
            prompt_tokens += g.prompt_token_ids.len();
            for (j, c) in g.completions.iter().enumerate() {
                completion_tokens += c.tokens.len();
                choices.push(self.choice(tok, g.prompt_index * self.n + j, c));
            }
        }
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "weight_version": groups.first().map_or(0, |g| g.weight_version),
        })
    }

    fn choice(&self, tok: &Tokenizer, index: usize, c: &CompletionOutput) -> Value {
        let text = c.text.clone().unwrap_or_default();
        let logprobs = self.logprobs(tok, &c.tokens, &c.logprobs, &c.top_logprobs, 0);
        match self.api {
            Api::Completions { .. } => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_str(c.finish_reason),
                "token_ids": c.tokens,
            }),
            Api::Chat { .. } => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_str(c.finish_reason),
                "token_ids": c.tokens,
            }),
        }
    }

    /// One streamed chunk for choice `index`.
    fn chunk(
        &self,
        index: usize,
        text: &str,
        first: bool,
        logprobs: Value,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = finish.map(finish_str);
        let choice = match self.api {
            Api::Completions { .. } => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Api::Chat { .. } => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

/// Incremental detokenization of one streamed choice.
struct ChoiceState {
    tokens: Vec<i64>,
    decoder: IncrementalDecoder,
    text: StopScan,
    /// Bytes of the decoded text already sent.
    sent: usize,
    started: bool,
    done: bool,
}

impl ChoiceState {
    fn new(stop: &[String]) -> Self {
        Self {
            tokens: vec![],
            decoder: IncrementalDecoder::default(),
            text: StopScan::new(stop),
            sent: 0,
            started: false,
            done: false,
        }
    }

    /// The text that is safe to send after a new token: held back are an incomplete
    /// UTF-8 tail and anything that could still become a stop string. Only a window of
    /// the last tokens is decoded ([`IncrementalDecoder`]).
    fn delta(&mut self, tok: &Tokenizer, stop: &[String]) -> String {
        let new = self.decoder.step(tok, &self.tokens).unwrap_or_default();
        self.text.push(&new, self.decoder.held(), stop);
        let end = self.text.safe_end();
        match self.text.text().get(self.sent..end) {
            Some(out) if end > self.sent => {
                let out = out.to_string();
                self.sent = end;
                out
            }
            _ => String::new(),
        }
    }
}

fn sse_stream(
    engine: EngineHandle,
    ctx: Ctx,
    events: tokio::sync::mpsc::Receiver<Event>,
    num_choices: usize,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct St {
        engine: EngineHandle,
        ctx: Ctx,
        events: tokio::sync::mpsc::Receiver<Event>,
        choices: Vec<ChoiceState>,
        queue: std::collections::VecDeque<String>,
        finished: bool,
    }
    let st = St {
        engine,
        events,
        choices: (0..num_choices)
            .map(|_| ChoiceState::new(&ctx.stop))
            .collect(),
        queue: Default::default(),
        finished: false,
        ctx,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.finished {
                return None;
            }
            let tok = st.engine.tokenizer();
            match st.events.recv().await {
                Some(Event::Token {
                    prompt_index,
                    completion_index,
                    token,
                    logprob,
                    top_logprobs,
                }) => {
                    let index = prompt_index * st.ctx.n + completion_index;
                    let c = &mut st.choices[index];
                    c.tokens.push(token);
                    let text = c.delta(tok, &st.ctx.stop);
                    let first = !c.started;
                    c.started = true;
                    let tops = if top_logprobs.is_empty() {
                        vec![]
                    } else {
                        vec![top_logprobs]
                    };
                    let lp = st.ctx.logprobs(tok, &[token], &[logprob], &tops, 0);
                    st.queue
                        .push_back(st.ctx.chunk(index, &text, first, lp, None).to_string());
                }
                Some(Event::Group(g)) => {
                    for (j, comp) in g.completions.iter().enumerate() {
                        let index = g.prompt_index * st.ctx.n + j;
                        let c = &mut st.choices[index];
                        let text = comp.text.clone().unwrap_or_default();
                        let rest = text.get(c.sent.min(text.len())..).unwrap_or("").to_string();
                        let first = !c.started;
                        c.done = true;
                        let chunk = st.ctx.chunk(
                            index,
                            &rest,
                            first,
                            Value::Null,
                            Some(comp.finish_reason),
                        );
                        st.queue.push_back(chunk.to_string());
                    }
                    if st.choices.iter().all(|c| c.done) {
                        st.queue.push_back("[DONE]".into());
                        st.finished = true;
                    }
                }
                Some(Event::Progress { .. }) => {}
                Some(Event::Error(e)) => {
                    let e = ApiError::from(e);
                    st.queue
                        .push_back(error_body(e.status, &e.message).to_string());
                    st.finished = true;
                }
                None => {
                    let msg = "the request ended early: the engine stopped, or this client fell too far behind";
                    st.queue
                        .push_back(error_body(StatusCode::SERVICE_UNAVAILABLE, msg).to_string());
                    st.finished = true;
                }
            }
        }
    })
}
