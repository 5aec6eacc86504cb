//! GRPO: the math as pure functions without I/O, and the training loop around it.
//!
//! - [`advantages`] (host `f64`) turns rewards into group-relative advantages and
//!   [`loss`] (tensors) advantages plus per-token log-probs into the clipped policy loss
//!   and its statistics. Both follow TRL's `GRPOTrainer`; `scripts/grpo_reference.py` is
//!   an independent PyTorch implementation that the `grpo_golden` test compares against.
//! - [`batch`] packs completions into micro-batches; [`stats`] sums a round's statistics
//!   over ranks; [`eval`] scores held-out prompts; [`trainer`] is the loop of one rank
//!   (its phases and their timings in [`phases`], the rollouts requested ahead with
//!   bounded staleness in [`pipeline`], DAPO's dynamic sampling in `fill` around the pure
//!   [`dynamic_sampling`]) and [`config`] its settings; [`layout`] places a round's
//!   groups on the ranks as TRL does (a group may span ranks).
//!
//! Data flow of a step: rollouts from the workers → reward functions score each
//! completion → [`combine_rewards`] → [`group_advantages`] per prompt group →
//! [`policy_loss`] per micro-batch, whose `(loss_sum, count)` the ZeRO engine reduces
//! over micro-batches and ranks → optimizer step → weights pushed to the workers.
pub mod advantages;
pub mod batch;
pub mod completions;
pub mod config;
pub mod dynamic_sampling;
pub mod eval;
mod fill;
pub mod gather;
pub mod layout;
pub mod loss;
pub mod phases;
pub mod pipeline;
pub mod prefix;
mod report;
mod requests;
pub mod stats;
mod sync;
pub mod trainer;

pub use advantages::{
    combine_rewards, group_advantages, step_advantages, Advantages, RewardMoments, ScaleRewards,
};
pub use config::GrpoConfig;
pub use loss::{policy_loss, LossStats, LossType, PolicyBatch, PolicyLoss, PolicyLossConfig};
