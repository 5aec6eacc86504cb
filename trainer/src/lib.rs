//! GRPO trainer library. The binary (`main.rs`) is a thin command-line layer over it.
//!
//! - [`dist`]: collective communication between ranks (rendezvous from torchrun's
//!   environment, a CPU ring over TCP, NCCL for CUDA tensors).
//! - [`rollout`]: the client to the rollout workers: batched, fault-tolerant generation
//!   over gRPC and versioned weight pushes.
//! - [`zero`]: ZeRO-1/2/3 sharded training on a communicator: block-by-block forward and
//!   backward, AdamW on f32 master shards, sharded checkpoints.

pub mod dist;
pub mod rollout;
pub mod zero;
