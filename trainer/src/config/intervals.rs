//! When to log, save and evaluate: transformers' `logging_strategy` / `save_strategy` /
//! `eval_strategy` (`steps`, `epoch`, `no`) with their `*_steps`, and
//! `logging_first_step`. Pure: the loops ask [`Interval::due`] at the end of a step.
use serde::{Deserialize, Serialize};

/// transformers' `IntervalStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    /// Every `*_steps` optimizer steps.
    #[default]
    Steps,
    /// At the end of every pass over the data (every `steps_per_epoch` steps).
    Epoch,
    /// Never (checkpoints: only the final one, which every run writes).
    No,
}

/// transformers' `log_level`: the log filter when `RUST_LOG` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// The default filter (`warn,trainer=info`).
    #[default]
    Passive,
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl LogLevel {
    /// An `EnvFilter` directive.
    pub fn filter(self) -> &'static str {
        match self {
            LogLevel::Passive | LogLevel::Info => "warn,trainer=info",
            LogLevel::Debug => "warn,trainer=debug",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
        }
    }
}

/// A resolved schedule of one periodic action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// Act every this many steps; `None`: never (besides `first` / the last step).
    pub every: Option<u64>,
    /// Also act at step 1 (`logging_first_step`).
    pub first: bool,
}

impl Interval {
    /// `every_steps = 0` under `steps` means never, as `save_steps: 0` always has here.
    pub fn new(strategy: IntervalStrategy, every_steps: u64, steps_per_epoch: u64) -> Self {
        let every = match strategy {
            IntervalStrategy::Steps => (every_steps > 0).then_some(every_steps),
            IntervalStrategy::Epoch => Some(steps_per_epoch.max(1)),
            IntervalStrategy::No => None,
        };
        Interval {
            every,
            first: false,
        }
    }

    /// Whether the action is due after optimizer step `step` (1-based).
    pub fn due(&self, step: u64) -> bool {
        (self.first && step == 1) || self.every.is_some_and(|n| step.is_multiple_of(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_resolve_like_transformers() {
        let steps = Interval::new(IntervalStrategy::Steps, 5, 7);
        assert!(!steps.due(1) && steps.due(5) && steps.due(10) && !steps.due(7));
        let epoch = Interval::new(IntervalStrategy::Epoch, 5, 7);
        assert!(epoch.due(7) && epoch.due(14) && !epoch.due(5));
        let no = Interval::new(IntervalStrategy::No, 5, 7);
        assert!(!(1..100).any(|s| no.due(s)));
        let first = Interval {
            first: true,
            ..Interval::new(IntervalStrategy::Steps, 10, 7)
        };
        assert!(first.due(1) && !first.due(2) && first.due(10));
        assert!(!Interval::new(IntervalStrategy::Steps, 0, 7).due(3));
        assert_eq!(LogLevel::Debug.filter(), "warn,trainer=debug");
    }
}
