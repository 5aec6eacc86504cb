//! ZeRO-style sharded training of the policy.
//!
//! Data flow of one optimizer step: the caller feeds micro-batches to
//! [`ZeroEngine::forward_backward`], which runs the model unit by unit (a unit is the
//! embeddings + final norm + head, or one decoder layer), gathering a unit's parameters
//! first under stage 3, and turns gradients into this rank's shards (stages 2 and 3
//! reduce-scatter each unit as soon as its backward is done). [`ZeroEngine::step`] then
//! divides by the global loss denominator, clips by the global norm, runs AdamW on this
//! rank's f32 master shard and re-assembles compute parameters (all-gather for stages 1
//! and 2; stage 3 keeps only shards). Shard ranges come from [`ShardLayout`] alone.
//! With `overlap_comm` the collectives go through an [`AsyncComm`] queue and overlap
//! the compute around them.
//!
//! [`ShardLayout`]: crate::dist::ShardLayout
//! [`AsyncComm`]: crate::dist::AsyncComm
pub mod checkpoint;
pub mod engine;
pub mod inference;
pub mod optimizer;
pub mod schedule;
pub mod units;

use crate::config::invalid::{bad, InvalidConfig};
use serde::{Deserialize, Serialize};

pub use engine::{LossOutput, MemoryReport, MicroBatch, StepStats, ZeroEngine};
pub use optimizer::{NonFinitePolicy, OptimConfig};
pub use schedule::{LrScheduler, LrSchedulerKwargs, LrSchedulerType};

/// What is sharded across ranks (DeepSpeed's `zero_optimization.stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "u8", into = "u8")]
pub enum ZeroStage {
    /// Plain data parallel: everything replicated, gradients all-reduced.
    Stage0,
    /// Optimizer state (f32 master weights and Adam moments) sharded.
    Stage1,
    /// ... and gradients.
    #[default]
    Stage2,
    /// ... and parameters: each unit is gathered just before use and released after.
    Stage3,
}

impl ZeroStage {
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = InvalidConfig;
    fn try_from(v: u8) -> Result<Self, InvalidConfig> {
        match v {
            0 => Ok(ZeroStage::Stage0),
            1 => Ok(ZeroStage::Stage1),
            2 => Ok(ZeroStage::Stage2),
            3 => Ok(ZeroStage::Stage3),
            other => Err(bad(
                "zero.stage",
                format!("zero stage must be 0, 1, 2 or 3, got {other}"),
            )),
        }
    }
}

impl From<ZeroStage> for u8 {
    fn from(s: ZeroStage) -> u8 {
        s.number()
    }
}

/// Settings of the engine (the `[zero]` table of the trainer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZeroConfig {
    pub stage: ZeroStage,
    /// Keep only each block's input in forward and recompute the block in backward
    /// (TRL's `gradient_checkpointing`). Stage 3 always works this way.
    pub gradient_checkpointing: bool,
    /// Dtype of the compute parameters and gradients: `float32` or `bfloat16`. Master
    /// weights and Adam moments are always float32.
    pub compute_dtype: String,
    /// Overlap communication with compute (DeepSpeed's `overlap_comm`): collectives
    /// run on a thread of their own, stage 3 prefetches the next unit's all-gather
    /// while the current one computes, stages 2-3 reduce-scatter a finished unit's
    /// gradients while the backward goes on, and the step all-gathers a unit's new
    /// parameters while AdamW updates the next. Results are bitwise the same either
    /// way; off runs every collective blocking, in the caller's thread.
    pub overlap_comm: bool,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        ZeroConfig {
            stage: ZeroStage::Stage2,
            gradient_checkpointing: false,
            compute_dtype: "float32".into(),
            overlap_comm: true,
        }
    }
}

impl ZeroConfig {
    /// The compute dtype; the error names the field and the allowed values.
    pub fn compute_kind(&self) -> Result<tch::Kind, InvalidConfig> {
        match model::config::parse_dtype(&self.compute_dtype) {
            Some(k @ (tch::Kind::Float | tch::Kind::BFloat16)) => Ok(k),
            _ => Err(bad(
                "zero.compute_dtype",
                format!(
                    "zero.compute_dtype must be float32 or bfloat16, got {:?}",
                    self.compute_dtype
                ),
            )),
        }
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.compute_kind().map(|_| ())
    }

    /// Whether blocks are recomputed in backward.
    pub fn recompute(&self) -> bool {
        self.gradient_checkpointing || self.stage == ZeroStage::Stage3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let c: ZeroConfig = serde_json::from_str(r#"{"stage": 3}"#).unwrap();
        assert_eq!(c.stage, ZeroStage::Stage3);
        assert!(c.overlap_comm, "overlap_comm defaults to on");
        assert!(c.recompute());
        let c: ZeroConfig = serde_json::from_str(r#"{"overlap_comm": false}"#).unwrap();
        assert!(!c.overlap_comm);
        let e = serde_json::from_str::<ZeroConfig>(r#"{"overlap": false}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `overlap`"), "{e}");
        let e = serde_json::from_str::<ZeroConfig>(r#"{"stage": 4}"#).unwrap_err();
        assert!(e.to_string().contains("0, 1, 2 or 3"), "{e}");
    }
}
