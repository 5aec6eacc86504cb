//! Domain types of a generation request and its results, and the one validation both
//! front ends go through.
//!
//! Data flow: gRPC (`grpc.rs`) and HTTP (`http.rs`) convert their wire requests into a
//! [`GenerateRequest`]; [`GenerateRequest::validate`] resolves prompts to token ids (chat
//! template, tokenizer) and checks every limit, yielding a [`Job`] the engine thread can
//! run without further checks. The engine answers with [`Event`]s: optional per-token
//! deltas (for streaming HTTP) and one [`GroupOutput`] per prompt.
use std::time::Duration;

use model::tokenizer::{ChatMessage, ChatTemplateOptions};
use model::{SamplingParams, Tokenizer};

use crate::config::EngineLimits;
use crate::error::EngineError;
pub use crate::generate::FinishReason;

/// Most stop strings per request, and the longest one in bytes: each is searched for
/// in the decoded tail after every token (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most `stop_token_ids` per request.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// How a prompt is given.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Token ids, used as given.
    Tokens(Vec<i64>),
    /// Text, encoded with the tokenizer's special tokens (as vLLM's completions API).
    Text(String),
    /// Chat messages, rendered with the chat template plus the generation prompt.
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptSpec {
    /// Echoed back; free-form.
    pub id: String,
    pub input: PromptInput,
}

/// A request for `n` completions of each prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompts: Vec<PromptSpec>,
    pub n: usize,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<i64>,
    pub stop: Vec<String>,
    /// The model's end-of-sequence tokens do not stop generation.
    pub ignore_eos: bool,
    /// Completion `j` of prompt `i` uses `seed + i * n + j`.
    pub seed: Option<u64>,
    /// Alternatives per token to report (0: none).
    pub top_logprobs: usize,
    /// Emit an [`Event::Token`] per sampled token.
    pub stream_tokens: bool,
    /// Decode each completion's text.
    pub return_text: bool,
}

impl GenerateRequest {
    /// A request with the given prompts and OpenAI-like defaults otherwise.
    pub fn new(prompts: Vec<PromptSpec>, max_new_tokens: usize) -> Self {
        GenerateRequest {
            prompts,
            n: 1,
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop_token_ids: vec![],
            stop: vec![],
            ignore_eos: false,
            seed: None,
            top_logprobs: 0,
            stream_tokens: false,
            return_text: false,
        }
    }

    /// Number of sequences the request asks for.
    pub fn num_seqs(&self) -> usize {
        self.prompts.len().saturating_mul(self.n)
    }

    /// Resolves the prompts and checks every limit; errors name the field.
    pub fn validate(
        self,
        limits: &EngineLimits,
        vocab_size: i64,
        eos_token_ids: &[i64],
        tokenizer: &Tokenizer,
    ) -> Result<Job, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidArgument(m));
        if self.prompts.is_empty() {
            return bad("prompts: at least one prompt is required".into());
        }
        if self.n == 0 || self.n > limits.max_n {
            return bad(format!(
                "n must be in [1, {}], got {}",
                limits.max_n, self.n
            ));
        }
        let capacity = limits.max_num_seqs + limits.max_waiting_seqs;
        if self.num_seqs() > capacity {
            return bad(format!(
                "{} prompts x n = {} is {} sequences; this worker accepts at most {capacity} at once",
                self.prompts.len(),
                self.n,
                self.num_seqs()
            ));
        }
        if let Err(e) = self.sampling.validate() {
            return bad(e
                .to_string()
                .trim_start_matches("invalid input: ")
                .to_string());
        }
        let room = limits.max_model_len - 1;
        if self.max_new_tokens == 0 || self.max_new_tokens > room {
            return bad(format!(
                "max_new_tokens must be in [1, {room}] (the context is max_model_len = {} tokens, and a prompt needs one), got {}",
                limits.max_model_len, self.max_new_tokens
            ));
        }
        if self.top_logprobs > limits.max_top_logprobs {
            return bad(format!(
                "top_logprobs must be at most {}, got {}",
                limits.max_top_logprobs, self.top_logprobs
            ));
        }
        let entries = (self.num_seqs() as u64)
            .saturating_mul(self.max_new_tokens as u64)
            .saturating_mul(1 + self.top_logprobs as u64);
        if entries > limits.max_response_tokens {
            return bad(format!(
                "the response would hold up to {} prompts x n = {} x max_tokens = {} x (1 + top_logprobs = {}) = {entries} token entries; this worker returns at most {} (engine.max_response_tokens): ask for fewer",
                self.prompts.len(),
                self.n,
                self.max_new_tokens,
                self.top_logprobs,
                limits.max_response_tokens
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(format!(
                "stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                self.stop.len()
            ));
        }
        if let Some(i) = self.stop.iter().position(|s| s.len() > MAX_STOP_BYTES) {
            return bad(format!(
                "stop[{i}] is {} bytes long; at most {MAX_STOP_BYTES} are allowed",
                self.stop[i].len()
            ));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return bad(format!(
                "stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                self.stop_token_ids.len()
            ));
        }
        for (i, &id) in self.stop_token_ids.iter().enumerate() {
            if id < 0 || id >= vocab_size {
                return bad(format!(
                    "stop_token_ids[{i}] = {id} is outside the vocabulary [0, {vocab_size})"
                ));
            }
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return bad(format!("stop[{i}] is an empty string"));
        }
        let mut prompts = Vec::with_capacity(self.prompts.len());
        for (i, p) in self.prompts.into_iter().enumerate() {
            let ids = resolve_prompt(i, p.input, tokenizer)?;
            if ids.is_empty() {
                return bad(format!("prompts[{i}] is empty"));
            }
            if let Some((pos, &id)) = ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id < 0 || id >= vocab_size)
            {
                return bad(format!(
                    "prompts[{i}]: token id {id} at position {pos} is outside the vocabulary [0, {vocab_size})"
                ));
            }
            if ids.len() + self.max_new_tokens > limits.max_model_len {
                return bad(format!(
                    "prompts[{i}] has {} tokens; with max_new_tokens = {} that exceeds max_model_len = {}",
                    ids.len(),
                    self.max_new_tokens,
                    limits.max_model_len
                ));
            }
            prompts.push((p.id, ids));
        }
        let mut stop_token_ids = self.stop_token_ids;
        if !self.ignore_eos {
            stop_token_ids.extend_from_slice(eos_token_ids);
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        Ok(Job {
            prompts,
            n: self.n,
            params: JobParams {
                sampling: self.sampling,
                max_new_tokens: self.max_new_tokens,
                stop_token_ids,
                stop: self.stop,
                seed: self.seed,
                top_logprobs: self.top_logprobs,
                stream_tokens: self.stream_tokens,
                return_text: self.return_text,
            },
        })
    }
}

fn resolve_prompt(i: usize, input: PromptInput, tok: &Tokenizer) -> Result<Vec<i64>, EngineError> {
    let bad = |e: model::TokenizerError| EngineError::InvalidArgument(format!("prompts[{i}]: {e}"));
    let ids: Vec<u32> = match input {
        PromptInput::Tokens(ids) => return Ok(ids),
        PromptInput::Text(text) => tok.encode(&text, true).map_err(bad)?,
        PromptInput::Chat(messages) => {
            if messages.is_empty() {
                return Err(EngineError::InvalidArgument(format!(
                    "prompts[{i}] has no messages"
                )));
            }
            let opts = ChatTemplateOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            tok.encode_chat(&messages, &opts).map_err(bad)?
        }
    };
    Ok(ids.into_iter().map(i64::from).collect())
}

/// Per-request settings the engine applies to every sequence of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct JobParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Request stop ids plus the model's end-of-sequence ids (unless ignored), sorted.
    pub stop_token_ids: Vec<i64>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub top_logprobs: usize,
    pub stream_tokens: bool,
    pub return_text: bool,
}

impl JobParams {
    /// The temperature the returned log-probs are computed at: the sampling
    /// temperature, or 1 for greedy decoding.
    pub fn logprob_temperature(&self) -> f64 {
        if self.sampling.is_greedy() {
            1.0
        } else {
            self.sampling.temperature
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// `(id, token ids)` per prompt.
    pub prompts: Vec<(String, Vec<i64>)>,
    pub n: usize,
    pub params: JobParams,
}

impl Job {
    pub fn num_seqs(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// One finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOutput {
    pub tokens: Vec<i64>,
    /// `log_softmax(logits / T)[token]` before truncation; see `rollout.proto`.
    pub logprobs: Vec<f32>,
    /// Per token, the `top_logprobs` most likely `(token, logprob)` (same distribution).
    pub top_logprobs: Vec<Vec<(i64, f32)>>,
    pub finish_reason: FinishReason,
    /// Decoded text (ends before a matched stop string), when requested.
    pub text: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

/// All `n` completions of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOutput {
    pub prompt_index: usize,
    pub prompt_id: String,
    pub prompt_token_ids: Vec<i64>,
    pub completions: Vec<CompletionOutput>,
    /// The weight version that produced every token of the group.
    pub weight_version: u64,
    pub timings: Timings,
}

/// What the engine sends back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token (only when `stream_tokens`).
    Token {
        prompt_index: usize,
        completion_index: usize,
        token: i64,
        logprob: f32,
        top_logprobs: Vec<(i64, f32)>,
    },
    /// A started group is still generating: `tokens_generated` over its completions so
    /// far. Sent every `progress_interval_secs` while the group runs, so a client can
    /// tell a slow generation from a silent worker.
    Progress {
        prompt_index: usize,
        tokens_generated: usize,
    },
    /// A finished group.
    Group(GroupOutput),
    /// The request failed after it was accepted; no further events follow.
    Error(EngineError),
}

/// Whether a sequence stops after its latest token, and why: a stop token (the last
/// one of `generated`), a stop string in `text` (the decoded completion, given when
/// the request has stop strings), `max_new_tokens`, or the context (`prompt_len` +
/// generated reaching `max_model_len`). Pure; the engine's only finish decision.
pub fn finish_reason(
    params: &JobParams,
    generated: &[i64],
    prompt_len: usize,
    max_model_len: usize,
    text: Option<&str>,
) -> Option<FinishReason> {
    let last = *generated.last()?;
    let stop_string = text.is_some_and(|t| params.stop.iter().any(|s| t.contains(s.as_str())));
    if params.stop_token_ids.binary_search(&last).is_ok() || stop_string {
        Some(FinishReason::Stop)
    } else if generated.len() >= params.max_new_tokens
        || prompt_len + generated.len() >= max_model_len
    {
        Some(FinishReason::Length)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(stop_ids: Vec<i64>, stop: Vec<&str>, max_new_tokens: usize) -> JobParams {
        JobParams {
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop_token_ids: stop_ids,
            stop: stop.into_iter().map(String::from).collect(),
            seed: None,
            top_logprobs: 0,
            stream_tokens: false,
            return_text: false,
        }
    }

    #[test]
    fn finish_reason_stop_tokens_strings_and_lengths() {
        let p = params(vec![2, 9], vec!["END"], 4);
        assert_eq!(finish_reason(&p, &[], 3, 100, None), None);
        assert_eq!(finish_reason(&p, &[5], 3, 100, None), None);
        assert_eq!(
            finish_reason(&p, &[5, 9], 3, 100, None),
            Some(FinishReason::Stop)
        );
        // A stop id earlier in the completion does not count again.
        assert_eq!(finish_reason(&p, &[9, 5], 3, 100, None), None);
        assert_eq!(
            finish_reason(&p, &[5, 6], 3, 100, Some("xx END")),
            Some(FinishReason::Stop)
        );
        assert_eq!(finish_reason(&p, &[5, 6], 3, 100, Some("xx EN")), None);
        assert_eq!(
            finish_reason(&p, &[5, 6, 7, 8], 3, 100, None),
            Some(FinishReason::Length)
        );
        // The context runs out first: 3 + 2 = max_model_len.
        assert_eq!(
            finish_reason(&p, &[5, 6], 3, 5, None),
            Some(FinishReason::Length)
        );
        // A stop token at the last allowed position is a stop, not a length.
        assert_eq!(
            finish_reason(&p, &[5, 6, 7, 2], 3, 100, None),
            Some(FinishReason::Stop)
        );
    }
}
