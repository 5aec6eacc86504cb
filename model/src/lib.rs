//! The policy model shared by trainer ranks and rollout workers: Qwen2, Qwen3 (dense) and Llama
//! decoders computed exactly as Hugging Face transformers computes them.
//!
//! Data flow: a checkpoint directory (`config.json`, safetensors, tokenizer files) is read
//! by [`checkpoint::load_pretrained`] into a [`ModelConfig`] and [`Weights`] named like
//! the checkpoint keys; [`Transformer`] runs them block by block with a caller-owned
//! [`KvCache`]; [`logprobs`] scores tokens in chunks; [`sampling`] draws the next token;
//! [`tokenizer`] turns chat messages into ids and back. [`checkpoint::save_pretrained`]
//! writes the same format back for transformers and vLLM.
//!
//! This crate knows nothing of networking, async runtimes or collectives.
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fused;
pub mod host_alloc;
pub mod hub;
pub mod kv_cache;
pub mod logprobs;
pub mod packing;
pub mod paged;
pub mod pycompat;
pub mod sampling;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use checkpoint::{load_pretrained, save_pretrained};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use logprobs::{
    token_logprobs, token_logprobs_at, token_logprobs_backward, token_logprobs_full,
    LogprobOptions, Positions, TokenLogprobs, FULL_LOGITS_MAX_ELEMENTS,
};
pub use packing::TokenPacking;
pub use sampling::{sample, SamplingParams, SeqRng};
pub use tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer, TokenizerError};
pub use transformer::{
    attention_context, embed, layer_forward, parse_device, rms_norm, AttentionContext,
    ForwardInput, Rope, Transformer,
};
pub use weights::{param_specs, ParamSpec, Weights};
