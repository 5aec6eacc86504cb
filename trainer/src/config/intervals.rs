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

/// transformers' `logging_steps` / `save_steps` / `eval_steps`: a whole number of
/// steps, or a number in (0, 1), that fraction of the run's total steps rounded up (as
/// transformers does; Open-R1's recipes write `save_steps: 0.05`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Steps {
    Count(u64),
    Ratio(f64),
}

impl Steps {
    /// Steps between actions in a run of `total` steps (0: never under `steps`).
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Steps::Count(n) => n,
            Steps::Ratio(r) if r >= 1.0 => r as u64,
            Steps::Ratio(r) => ((total as f64 * r).ceil() as u64).max(1),
        }
    }

    /// `Err` names `field` and what is allowed: a whole number, or a fraction in (0, 1).
    pub fn check(self, field: &str) -> Result<(), super::InvalidConfig> {
        match self {
            Steps::Count(_) => Ok(()),
            Steps::Ratio(r) if r > 0.0 && r < 1.0 => Ok(()),
            Steps::Ratio(r) if r >= 1.0 && r.fract() == 0.0 => Ok(()),
            Steps::Ratio(r) => Err(super::invalid::bad(
                field,
                format!(
                    "{field} must be a whole number of steps or a fraction of the run in (0, 1), got {r}"
                ),
            )),
        }
    }

    pub fn is_zero(self) -> bool {
        self == Steps::Count(0)
    }
}

impl From<u64> for Steps {
    fn from(n: u64) -> Self {
        Steps::Count(n)
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
    /// `every_steps = 0` under `steps` means never, as `save_steps: 0` always has here;
    /// a fraction is of `total` steps.
    pub fn new(
        strategy: IntervalStrategy,
        every_steps: impl Into<Steps>,
        steps_per_epoch: u64,
        total: u64,
    ) -> Self {
        let every_steps = every_steps.into().resolve(total);
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
        let steps = Interval::new(IntervalStrategy::Steps, 5, 7, 100);
        assert!(!steps.due(1) && steps.due(5) && steps.due(10) && !steps.due(7));
        let epoch = Interval::new(IntervalStrategy::Epoch, 5, 7, 100);
        assert!(epoch.due(7) && epoch.due(14) && !epoch.due(5));
        let no = Interval::new(IntervalStrategy::No, 5, 7, 100);
        assert!(!(1..100).any(|s| no.due(s)));
        let first = Interval {
            first: true,
            ..Interval::new(IntervalStrategy::Steps, 10, 7, 100)
        };
        assert!(first.due(1) && !first.due(2) && first.due(10));
        assert!(!Interval::new(IntervalStrategy::Steps, 0, 7, 100).due(3));
        // transformers' fractions of the run: 0.05 of 90 steps is every 5 (4.5 rounded up).
        let ratio = Interval::new(IntervalStrategy::Steps, Steps::Ratio(0.05), 7, 90);
        assert_eq!(ratio.every, Some(5));
        assert_eq!(Steps::Ratio(20.0).resolve(90), 20);
        assert!(Steps::Ratio(0.05).check("save_steps").is_ok());
        assert!(Steps::Ratio(1.5)
            .check("save_steps")
            .unwrap_err()
            .to_string()
            .contains("save_steps must be a whole number"));
        assert_eq!(LogLevel::Debug.filter(), "warn,trainer=debug");
    }
}
