//! GRPO trainer library. The binary (`main.rs`) is a thin command-line layer over it.
//!
//! - [`data`]: dataset rows (JSONL, Parquet) to tokenized GRPO prompts and SFT examples,
//!   with a report of unusable rows, and the seeded epoch sampler.
//! - [`dist`]: collective communication between ranks (rendezvous from torchrun's
//!   environment, a CPU ring over TCP, NCCL for CUDA tensors).
//! - [`grpo`]: the GRPO math as pure functions: reward combination, group advantages,
//!   the clipped policy loss with its `(loss_sum, count)` aggregation and statistics.
//! - [`rollout`]: the client to the rollout workers: batched, fault-tolerant generation
//!   over gRPC and versioned weight pushes.
//! - [`zero`]: ZeRO-1/2/3 sharded training on a communicator: block-by-block forward and
//!   backward, AdamW on f32 master shards, sharded checkpoints.
//! - [`rewards`]: GRPO reward functions: the Open-R1 built-ins (accuracy, format, length,
//!   cosine, ...) and external HTTP reward services.
//! - [`metrics`], [`runlog`], [`plot`]: the Prometheus endpoint, `output_dir/metrics.jsonl`
//!   and its PNG; [`shutdown`]: SIGTERM agreed by all ranks, then a checkpoint.

pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod grpo;
pub mod inference;
pub mod metrics;
pub mod objective;
pub mod plot;
pub mod rewards;
pub mod rollout;
pub mod runlog;
pub mod session;
pub mod sft;
pub mod shutdown;
pub mod timeouts;
pub mod zero;
