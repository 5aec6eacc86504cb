//! Offline batch generation, the `generate` command: the prompts go through the same
//! engine as the server (paged KV cache, continuous batching, one prefill per group,
//! the same sampling and finish decision), submitted in-process instead of over gRPC.
//!
//! Log-probs returned are the policy's: `log_softmax(logits / temperature)` of the
//! sampled token, before top-k/top-p/min-p truncation (temperature 1 when greedy), which
//! is what the trainer recomputes (TRL's convention).
use std::sync::Arc;

use model::{SamplingParams, Tokenizer, Transformer};

use crate::config::{EngineConfig, WorkerConfig};
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::request::{Event, GenerateRequest, PromptInput, PromptSpec};
use crate::run_error::GenerateError;

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled (it is included in the tokens).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    /// Completions per prompt.
    pub n: usize,
    pub max_new_tokens: usize,
    /// Extra stop ids; the model's end-of-sequence ids always stop (unless `ignore_eos`).
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: bool,
    /// Completion `j` of prompt `i` uses seed `seed + i * n + j`; `None` draws from OS
    /// entropy.
    pub seed: Option<u64>,
    /// Engine capacity (rows, KV budget, block size, chunked prefill).
    pub engine: EngineConfig,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Generates `opts.n` completions per prompt (prompt-major order) with an engine that
/// lives for this call.
pub fn generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Completion>, GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::NoPrompts);
    }
    let mut config = WorkerConfig::new("in-process");
    config.engine = opts.engine.clone();
    config.engine.max_n = config.engine.max_n.max(opts.n);
    config.engine.max_waiting_seqs = config.engine.max_waiting_seqs.max(prompts.len() * opts.n);
    let engine = EngineHandle::start(
        model,
        tokenizer,
        &config,
        Arc::new(Metrics::new(&config.model_name())),
    )?;
    let mut req = GenerateRequest::new(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| PromptSpec {
                id: i.to_string(),
                input: PromptInput::Tokens(p.clone()),
            })
            .collect(),
        opts.max_new_tokens,
    );
    req.n = opts.n;
    req.sampling = opts.sampling;
    req.stop_token_ids = opts.stop_token_ids.clone();
    req.ignore_eos = opts.ignore_eos;
    req.seed = opts.seed;
    let mut sub = engine.submit(req)?;
    let mut groups = vec![];
    while groups.len() < prompts.len() {
        match sub.events.blocking_recv() {
            Some(Event::Group(g)) => groups.push(g),
            Some(Event::Token { .. } | Event::Progress { .. }) => {}
            Some(Event::Error(e)) => {
                engine.shutdown();
                return Err(e.into());
            }
            None => return Err(GenerateError::EngineStopped),
        }
    }
    engine.shutdown();
    groups.sort_by_key(|g| g.prompt_index);
    Ok(groups
        .into_iter()
        .flat_map(|g| g.completions)
        .map(|c| Completion {
            tokens: c.tokens,
            logprobs: c.logprobs,
            finish_reason: c.finish_reason,
        })
        .collect())
}
