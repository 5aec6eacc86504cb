//! GRPO: group-relative advantages, the clipped policy loss, and the training loop that
//! ties rollouts, rewards and the ZeRO engine together.
pub mod batch;
pub mod config;
pub mod eval;
pub mod stats;
pub mod trainer;

pub use config::GrpoConfig;
