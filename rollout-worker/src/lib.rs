//! The rollout worker: holds an inference copy of the policy and produces completions
//! with the token log-probs the trainer needs.
//!
//! Today it offers offline generation ([`generate`]); the gRPC service with continuous
//! batching, versioned weight updates and the OpenAI-compatible HTTP API build on it.
pub mod generate;

pub use generate::{generate, Completion, FinishReason, GenerateOptions};
