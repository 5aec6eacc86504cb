//! The GRPO math, as pure functions without I/O: rewards to advantages
//! ([`advantages`], host `f64`) and advantages plus per-token log-probs to the clipped
//! policy loss and its statistics ([`loss`], tensors). Both follow TRL's `GRPOTrainer`;
//! `scripts/grpo_reference.py` is an independent PyTorch implementation that the
//! `grpo_golden` test compares against.
//!
//! Data flow of a step: reward functions score each completion → [`combine_rewards`]
//! → [`group_advantages`] per prompt group → [`policy_loss`] per micro-batch, whose
//! `(loss_sum, count)` the ZeRO engine reduces over micro-batches and ranks.
pub mod advantages;
pub mod loss;

pub use advantages::{combine_rewards, group_advantages, Advantages, ScaleRewards};
pub use loss::{policy_loss, LossStats, LossType, PolicyBatch, PolicyLoss, PolicyLossConfig};
