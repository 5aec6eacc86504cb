//! Learning-rate schedules, as transformers' `get_scheduler` defines them (TRL's
//! `lr_scheduler_type` and `warmup_ratio`). Pure: the rate of optimizer step `k`
//! (0-based) is `learning_rate * factor(k)`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Linear warmup, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Linear warmup, then half a cosine to 0 at the last step.
    Cosine,
    /// The same rate throughout (transformers' `constant` ignores warmup).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrScheduler {
    pub kind: LrSchedulerType,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrScheduler {
    /// `warmup_steps = ceil(warmup_ratio * total_steps)`, as transformers computes it.
    pub fn new(
        kind: LrSchedulerType,
        learning_rate: f64,
        warmup_ratio: f64,
        total_steps: u64,
    ) -> Self {
        LrScheduler {
            kind,
            learning_rate,
            warmup_steps: (warmup_ratio * total_steps as f64).ceil() as u64,
            total_steps,
        }
    }

    /// The multiplier of step `k`.
    pub fn factor(&self, k: u64) -> f64 {
        let (w, n) = (self.warmup_steps as f64, self.total_steps as f64);
        let k_f = k as f64;
        let warm = || k_f / w.max(1.0);
        match self.kind {
            LrSchedulerType::Constant => 1.0,
            _ if k < self.warmup_steps => warm(),
            LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((n - k_f) / (n - w).max(1.0)).max(0.0),
            LrSchedulerType::Cosine => {
                let progress = (k_f - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of step `k`.
    pub fn lr(&self, k: u64) -> f64 {
        self.learning_rate * self.factor(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_schedules() {
        // transformers: warmup 2 of 10 steps, lr 1.0.
        let s = LrScheduler::new(LrSchedulerType::Linear, 1.0, 0.15, 10);
        assert_eq!(s.warmup_steps, 2);
        let lin: Vec<f64> = (0..10).map(|k| s.lr(k)).collect();
        assert_eq!(lin[..3], [0.0, 0.5, 1.0]);
        assert!((lin[6] - 0.5).abs() < 1e-12 && (lin[9] - 0.125).abs() < 1e-12);

        let c = LrScheduler::new(LrSchedulerType::Cosine, 2.0, 0.2, 10);
        assert_eq!(c.lr(1), 1.0);
        assert!((c.lr(2) - 2.0).abs() < 1e-12);
        assert!((c.lr(6) - 1.0).abs() < 1e-12); // halfway through the decay
        let k = LrScheduler::new(LrSchedulerType::Constant, 3.0, 0.5, 10);
        assert_eq!(k.lr(0), 3.0);
        let kw = LrScheduler::new(LrSchedulerType::ConstantWithWarmup, 3.0, 0.5, 10);
        assert_eq!((kw.lr(0), kw.lr(5), kw.lr(9)), (0.0, 3.0, 3.0));
    }
}
