//! External reward service: one HTTP POST per step batch.
//!
//! Request (`Content-Type: application/json`), one entry per completion, in batch order:
//! ```json
//! {"prompts": ["..."], "completions": ["..."], "completion_tokens": [12], "truncated": [false],
//!  "<column>": [...]}
//! ```
//! with one `"<column>"` list for every dataset column present in any row of the batch (`null`
//! for rows without it). A column named like a protocol key (`prompts`, `completions`,
//! `completion_tokens`, `truncated`) is an error.
//!
//! Expected answer: HTTP 2xx with `{"rewards": [number | null, ...]}` of the batch length (other
//! keys are ignored); `null` means "cannot score this sample". Anything else (another status, a
//! body that is not JSON, no `rewards` list, a wrong length, an entry that is neither a number nor
//! null, no answer within `timeout_secs`) is a [`RewardError`] naming the URL and the problem.
//!
//! The client is reqwest's blocking one: scoring runs on a plain thread. It is built on first use,
//! because building it inside an async runtime panics.

use crate::config::invalid::{bad, InvalidConfig};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::{ExternalRewardConfig, RewardError, RewardFunction, RewardInput};

/// Keys of the request that are not dataset columns.
const PROTOCOL_KEYS: [&str; 4] = ["prompts", "completions", "completion_tokens", "truncated"];

/// Longest request time accepted for `timeout_secs` (one day).
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// How much of an error response body is quoted in the error.
const BODY_QUOTE_CHARS: usize = 500;

/// Checks one `[[rewards.external]]` entry; the error's field is the entry's field and
/// its message starts with that name (the caller prefixes which entry).
pub(super) fn validate_entry(cfg: &ExternalRewardConfig) -> Result<(), InvalidConfig> {
    match reqwest::Url::parse(&cfg.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        Ok(_) => {
            return Err(bad(
                "url",
                format!("url '{}' must be an http:// or https:// URL", cfg.url),
            ))
        }
        Err(e) => {
            return Err(bad(
                "url",
                format!("url '{}' is not a valid URL: {e}", cfg.url),
            ))
        }
    }
    if !(cfg.timeout_secs.is_finite()
        && cfg.timeout_secs > 0.0
        && cfg.timeout_secs <= MAX_TIMEOUT_SECS)
    {
        return Err(bad(
            "timeout_secs",
            format!(
                "timeout_secs must be in (0, {MAX_TIMEOUT_SECS}] seconds, got {}",
                cfg.timeout_secs
            ),
        ));
    }
    header_map(cfg).map(|_| ())
}

fn header_map(cfg: &ExternalRewardConfig) -> Result<HeaderMap, InvalidConfig> {
    let mut headers = HeaderMap::new();
    for (name, value) in &cfg.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
            bad(
                "headers",
                format!("headers: '{name}' is not a valid header name: {e}"),
            )
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|e| {
            bad(
                &format!("headers.{name}"),
                format!("headers.{name}: not a valid header value: {e}"),
            )
        })?;
        value.set_sensitive(true); // kept out of Debug output
        headers.insert(header, value);
    }
    Ok(headers)
}

/// A reward function served over HTTP (see the module doc for the protocol).
#[derive(Debug)]
pub struct ExternalReward {
    name: String,
    url: String,
    timeout: Duration,
    headers: HeaderMap,
    /// Built on the first `score`, on the scoring thread.
    client: OnceLock<Result<Client, reqwest::Error>>,
}

impl ExternalReward {
    /// From a validated-or-not entry; returns the validation error (prefixed by the name).
    pub fn new(cfg: &ExternalRewardConfig) -> Result<Self, InvalidConfig> {
        validate_entry(cfg).map_err(|e| {
            bad(
                &format!("rewards.external.{}", e.field()),
                format!("rewards.external '{}': {e}", cfg.name),
            )
        })?;
        Ok(Self {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            timeout: Duration::from_secs_f64(cfg.timeout_secs),
            headers: header_map(cfg)?,
            client: OnceLock::new(),
        })
    }

    fn client(&self) -> Result<&Client, RewardError> {
        let client = self.client.get_or_init(|| {
            Client::builder()
                .timeout(self.timeout)
                .default_headers(self.headers.clone())
                .build()
        });
        client.as_ref().map_err(|e| RewardError::Request {
            function: self.name.clone(),
            url: self.url.clone(),
            message: format!("cannot build the HTTP client: {}", error_chain(e)),
        })
    }

    /// The JSON request body for `batch`.
    fn request_body(&self, batch: &[RewardInput<'_>]) -> Result<Value, RewardError> {
        let mut body = Map::new();
        body.insert(
            "prompts".into(),
            batch.iter().map(|i| Value::from(i.prompt)).collect(),
        );
        body.insert(
            "completions".into(),
            batch.iter().map(|i| Value::from(i.completion)).collect(),
        );
        body.insert(
            "completion_tokens".into(),
            batch
                .iter()
                .map(|i| Value::from(i.completion_tokens))
                .collect(),
        );
        body.insert(
            "truncated".into(),
            batch.iter().map(|i| Value::from(i.truncated)).collect(),
        );
        for input in batch {
            for column in input.fields.keys() {
                if body.contains_key(column) {
                    if PROTOCOL_KEYS.contains(&column.as_str()) {
                        return Err(RewardError::InvalidInput {
                            function: self.name.clone(),
                            problem: format!(
                                "dataset column '{column}' has the name of a request key of the \
                                 external reward protocol ({}); rename the column",
                                PROTOCOL_KEYS.join(", ")
                            ),
                        });
                    }
                    continue;
                }
                let values = batch
                    .iter()
                    .map(|i| i.fields.get(column).cloned().unwrap_or(Value::Null))
                    .collect();
                body.insert(column.clone(), values);
            }
        }
        Ok(Value::Object(body))
    }

    fn response_error(&self, problem: String) -> RewardError {
        RewardError::Response {
            function: self.name.clone(),
            url: self.url.clone(),
            problem,
        }
    }

    /// Checks the answer's shape and reads the rewards.
    fn parse_rewards(&self, body: &str, expected: usize) -> Result<Vec<Option<f64>>, RewardError> {
        let value: Value = serde_json::from_str(body).map_err(|e| {
            self.response_error(format!("the body is not JSON ({e}): {}", quote(body)))
        })?;
        let Some(rewards) = value.get("rewards") else {
            return Err(self.response_error(format!(
                "expected an object with a \"rewards\" list, got {}",
                quote(body)
            )));
        };
        let Some(rewards) = rewards.as_array() else {
            return Err(self.response_error(format!(
                "\"rewards\" must be a list, got {}",
                quote(&rewards.to_string())
            )));
        };
        if rewards.len() != expected {
            return Err(self.response_error(format!(
                "{} rewards for a batch of {expected} completions",
                rewards.len()
            )));
        }
        rewards
            .iter()
            .enumerate()
            .map(|(i, r)| match r {
                Value::Null => Ok(None),
                Value::Number(n) => n.as_f64().map(Some).ok_or_else(|| {
                    self.response_error(format!("rewards[{i}] = {n} is not a finite number"))
                }),
                other => Err(self.response_error(format!(
                    "rewards[{i}] is {} ({}), expected a number or null",
                    quote(&other.to_string()),
                    crate::data::type_name(other)
                ))),
            })
            .collect()
    }
}

impl RewardFunction for ExternalReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<Option<f64>>, RewardError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let body = self.request_body(batch)?;
        let client = self.client()?;
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                RewardError::Timeout {
                    function: self.name.clone(),
                    url: self.url.clone(),
                    timeout_secs: self.timeout.as_secs_f64(),
                }
            } else {
                RewardError::Request {
                    function: self.name.clone(),
                    url: self.url.clone(),
                    message: error_chain(&e),
                }
            }
        };
        let response = client
            .post(&self.url)
            .json(&body)
            .send()
            .map_err(transport)?;
        let status = response.status();
        let text = response.text().map_err(transport)?;
        if !status.is_success() {
            return Err(RewardError::Status {
                function: self.name.clone(),
                url: self.url.clone(),
                status: status.as_u16(),
                body: quote(&text),
            });
        }
        self.parse_rewards(&text, batch.len())
    }
}

/// An error and its sources, `a: b: c` (reqwest's top-level message alone hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `text`, or its first [`BODY_QUOTE_CHARS`] characters marked as cut with the full length.
fn quote(text: &str) -> String {
    let count = text.chars().count();
    if count <= BODY_QUOTE_CHARS {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(BODY_QUOTE_CHARS).collect();
    format!("{head:?}... ({count} characters in all)")
}

#[cfg(test)]
#[path = "external_tests.rs"]
mod tests;
