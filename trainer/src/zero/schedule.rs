//! Learning-rate schedules, as transformers' `get_scheduler` defines them (TRL's
//! `lr_scheduler_type` and `warmup_ratio`). Pure: the rate of optimizer step `k`
//! (0-based) is `learning_rate * factor(k)`.
use crate::config::invalid::{bad, InvalidConfig};
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
    /// Linear warmup, then half a cosine down to `min_lr_rate * learning_rate`
    /// (transformers' `cosine_with_min_lr`; the rate comes from `lr_scheduler_kwargs`).
    CosineWithMinLr,
}

/// transformers' `lr_scheduler_kwargs` for the cosine schedules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedulerKwargs {
    /// `cosine_with_min_lr`: the final rate as a fraction of `learning_rate`.
    pub min_lr_rate: Option<f64>,
    /// `cosine_with_min_lr`: the final rate itself (give this or `min_lr_rate`).
    pub min_lr: Option<f64>,
    /// Cosine periods over the decay (transformers' default 0.5: half a cosine).
    pub num_cycles: Option<f64>,
}

impl LrSchedulerKwargs {
    /// The final rate as a fraction of `learning_rate`; errors name the field.
    pub fn min_lr_rate(
        &self,
        kind: LrSchedulerType,
        learning_rate: f64,
    ) -> Result<f64, InvalidConfig> {
        let kw = |m: String| Err(bad("lr_scheduler_kwargs", m));
        match (kind, self.min_lr_rate, self.min_lr) {
            (LrSchedulerType::CosineWithMinLr, Some(_), Some(_)) => {
                kw("lr_scheduler_kwargs: give only one of min_lr_rate and min_lr".into())
            }
            (LrSchedulerType::CosineWithMinLr, Some(r), None) if (0.0..=1.0).contains(&r) => Ok(r),
            (LrSchedulerType::CosineWithMinLr, None, Some(m)) if m >= 0.0 && learning_rate > 0.0 => {
                Ok(m / learning_rate)
            }
            (LrSchedulerType::CosineWithMinLr, None, None) => kw(
                "lr_scheduler_type cosine_with_min_lr needs lr_scheduler_kwargs.min_lr_rate (in [0, 1]) or min_lr"
                    .into(),
            ),
            (LrSchedulerType::CosineWithMinLr, r, m) => kw(format!(
                "lr_scheduler_kwargs: min_lr_rate must be in [0, 1] and min_lr >= 0 (with learning_rate > 0), got {r:?} / {m:?}"
            )),
            (_, None, None) => Ok(0.0),
            _ => kw("lr_scheduler_kwargs: min_lr_rate and min_lr apply only to lr_scheduler_type cosine_with_min_lr".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrScheduler {
    pub kind: LrSchedulerType,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// The cosine schedules' floor, as a fraction of `learning_rate` (0 for `cosine`).
    pub min_lr_rate: f64,
    /// Cosine periods over the decay (0.5: half a cosine).
    pub num_cycles: f64,
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
            min_lr_rate: 0.0,
            num_cycles: 0.5,
        }
    }

    /// The schedule of `optim` over `total_steps`: `warmup_steps` when positive, else
    /// `ceil(warmup_ratio * total_steps)` (transformers' `get_warmup_steps`).
    pub fn from_optim(optim: &super::OptimConfig, total_steps: u64) -> Self {
        let mut s = LrScheduler::new(
            optim.lr_scheduler_type,
            optim.learning_rate,
            optim.warmup_ratio,
            total_steps,
        );
        if optim.warmup_steps > 0 {
            s.warmup_steps = optim.warmup_steps;
        }
        let kw = &optim.lr_scheduler_kwargs;
        s.min_lr_rate = kw
            .min_lr_rate(optim.lr_scheduler_type, optim.learning_rate)
            .unwrap_or(0.0);
        s.num_cycles = kw.num_cycles.unwrap_or(0.5);
        s
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
            LrSchedulerType::Cosine | LrSchedulerType::CosineWithMinLr => {
                let progress = (k_f - w) / (n - w).max(1.0);
                let c =
                    0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
                (c * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0)
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

    #[test]
    fn cosine_with_min_lr_and_warmup_steps_match_transformers() {
        // transformers.get_scheduler("cosine_with_min_lr", num_warmup_steps=2,
        // num_training_steps=10, scheduler_specific_kwargs={"min_lr_rate": 0.1}), lr 1.0.
        let optim = super::super::OptimConfig {
            learning_rate: 1.0,
            lr_scheduler_type: LrSchedulerType::CosineWithMinLr,
            warmup_ratio: 0.5, // overridden by warmup_steps
            warmup_steps: 2,
            lr_scheduler_kwargs: LrSchedulerKwargs {
                min_lr_rate: Some(0.1),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = LrScheduler::from_optim(&optim, 10);
        assert_eq!(s.warmup_steps, 2);
        assert_eq!((s.lr(0), s.lr(1), s.lr(2)), (0.0, 0.5, 1.0));
        // Halfway through the decay: 0.5 * 0.9 + 0.1.
        assert!((s.lr(6) - 0.55).abs() < 1e-12, "{}", s.lr(6));
        // The end of the decay is the floor.
        let end = LrScheduler {
            total_steps: 6,
            ..s
        };
        assert!((end.lr(6) - 0.1).abs() < 1e-12);
        let kw = LrSchedulerKwargs {
            min_lr: Some(0.2),
            ..Default::default()
        };
        assert_eq!(
            kw.min_lr_rate(LrSchedulerType::CosineWithMinLr, 2.0)
                .unwrap(),
            0.1
        );
        assert!(LrSchedulerKwargs::default()
            .min_lr_rate(LrSchedulerType::CosineWithMinLr, 1.0)
            .unwrap_err()
            .to_string()
            .contains("min_lr_rate"));
    }
}
