//! GRPO trainer library. The binary (`main.rs`) is a thin command-line layer over it.
//!
//! - [`dist`]: collective communication between ranks (rendezvous from torchrun's
//!   environment, a CPU ring over TCP, NCCL for CUDA tensors).
//! - [`grpo`]: the GRPO math as pure functions: reward combination, group advantages,
//!   the clipped policy loss with its `(loss_sum, count)` aggregation and statistics.
//! - [`zero`]: ZeRO-1/2/3 sharded training on a communicator: block-by-block forward and
//!   backward, AdamW on f32 master shards, sharded checkpoints.

pub mod dist;
pub mod grpo;
pub mod zero;
