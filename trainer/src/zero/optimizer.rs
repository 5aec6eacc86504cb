//! AdamW on flat f32 shards, and global-norm gradient clipping. Pure tensor functions;
//! the engine decides which shard each rank owns.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay):
//! `p -= lr * wd * p` (only where the decay mask is 1: no decay on norms and biases),
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
use crate::config::invalid::{bad, InvalidConfig};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::schedule::{LrSchedulerKwargs, LrSchedulerType};

/// Optimizer and schedule settings (names as in TRL / transformers' TrainingArguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip gradients to this global L2 norm; 0 disables.
    pub max_grad_norm: f64,
    pub lr_scheduler_type: LrSchedulerType,
    pub warmup_ratio: f64,
    /// Warmup length in steps; when > 0 it replaces `warmup_ratio` (as transformers).
    pub warmup_steps: u64,
    pub lr_scheduler_kwargs: LrSchedulerKwargs,
    /// A step whose global loss or gradient norm is NaN or infinite: `skip` drops its
    /// update (no weight, moment or schedule change; counted and logged, as DeepSpeed
    /// skips overflowing fp16 steps) or `stop` fails it. Either way it never reaches the
    /// weights.
    pub on_nonfinite: NonFinitePolicy,
    /// Under `skip`, this many skipped steps in a row stop the run all the same.
    pub max_consecutive_skipped_steps: u64,
}

/// What [`OptimConfig::on_nonfinite`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    #[default]
    Skip,
    Stop,
}

impl Default for OptimConfig {
    fn default() -> Self {
        // TRL's GRPOConfig defaults.
        OptimConfig {
            learning_rate: 1e-6,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler_kwargs: LrSchedulerKwargs::default(),
            on_nonfinite: NonFinitePolicy::Skip,
            max_consecutive_skipped_steps: 10,
        }
    }
}

impl OptimConfig {
    /// The first field out of range; the error names it and the allowed values.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let checks = [
            ("learning_rate", self.learning_rate >= 0.0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
            (
                "adam_beta1",
                (0.0..1.0).contains(&self.adam_beta1),
                "in [0, 1)",
            ),
            (
                "adam_beta2",
                (0.0..1.0).contains(&self.adam_beta2),
                "in [0, 1)",
            ),
            ("adam_epsilon", self.adam_epsilon > 0.0, "> 0"),
            (
                "max_grad_norm",
                self.max_grad_norm >= 0.0,
                ">= 0 (0 disables)",
            ),
            (
                "warmup_ratio",
                (0.0..=1.0).contains(&self.warmup_ratio),
                "in [0, 1]",
            ),
            (
                "max_consecutive_skipped_steps",
                self.max_consecutive_skipped_steps >= 1,
                ">= 1",
            ),
        ];
        for (field, ok, allowed) in checks {
            if !ok {
                return Err(bad(field, format!("{field} must be {allowed}")));
            }
        }
        self.lr_scheduler_kwargs
            .min_lr_rate(self.lr_scheduler_type, self.learning_rate)
            .map(|_| ())
    }
}

/// One AdamW step in place on a shard: `param`, `exp_avg`, `exp_avg_sq` and `grad`
/// are `[n]` f32; `decay` is `[n]` f32 of 0/1; `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    param: &mut Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    grad: &Tensor,
    decay: &Tensor,
    cfg: &OptimConfig,
    lr: f64,
    step: u64,
) {
    tch::no_grad(|| {
        if cfg.weight_decay > 0.0 {
            let _ = param.g_sub_(&(decay * (lr * cfg.weight_decay) * &*param));
        }
        let (b1, b2) = (cfg.adam_beta1, cfg.adam_beta2);
        let _ = exp_avg.g_mul_scalar_(b1).g_add_(&(grad * (1.0 - b1)));
        let _ = exp_avg_sq
            .g_mul_scalar_(b2)
            .g_add_(&(grad * grad * (1.0 - b2)));
        let bias1 = 1.0 - b1.powi(step as i32);
        let bias2 = 1.0 - b2.powi(step as i32);
        let denom = exp_avg_sq.sqrt() / bias2.sqrt() + cfg.adam_epsilon;
        let _ = param.g_sub_(&(&*exp_avg / denom * (lr / bias1)));
    });
}

/// PyTorch's `clip_grad_norm_` coefficient: `min(1, max_norm / (norm + 1e-6))`; 1 when
/// clipping is off.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// Sum of squares of a gradient shard, as f64 (one host sync).
pub fn sum_of_squares(grad: &Tensor) -> f64 {
    grad.to_kind(Kind::Double)
        .square()
        .sum(Kind::Double)
        .double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps worked by hand from the update rule (weight decay on the first element
    /// only), so the test does not restate the implementation.
    #[test]
    fn adamw_matches_hand_computed_steps() {
        let cfg = OptimConfig {
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.99,
            adam_epsilon: 1e-8,
            ..OptimConfig::default()
        };
        let mut p = Tensor::from_slice(&[1.0f32, -2.0]);
        let mut m = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        let mut v = m.zeros_like();
        let decay = Tensor::from_slice(&[1.0f32, 0.0]);
        let g = Tensor::from_slice(&[0.5f32, -1.0]);
        adamw_step(&mut p, &mut m, &mut v, &g, &decay, &cfg, 0.1, 1);
        // step 1: m_hat = g, v_hat = g^2 -> update = lr * sign(g) (up to eps);
        // p0 = 1 - 0.1*0.1*1 - 0.1 = 0.89; p1 = -2 + 0.1 = -1.9
        let got = Vec::<f32>::try_from(&p).unwrap();
        assert!(
            (got[0] - 0.89).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6,
            "{got:?}"
        );
        adamw_step(&mut p, &mut m, &mut v, &g, &decay, &cfg, 0.1, 2);
        // step 2 with the same gradient: m_hat = g, v_hat = g^2 again -> same update.
        let got = Vec::<f32>::try_from(&p).unwrap();
        let p0 = 0.89 - 0.1 * 0.1 * 0.89 - 0.1;
        assert!(
            (got[0] - p0 as f32).abs() < 1e-6 && (got[1] + 1.8).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn clipping_coefficient() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert!((clip_coefficient(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coefficient(100.0, 0.0), 1.0);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = OptimConfig {
            adam_beta2: 1.0,
            ..OptimConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("adam_beta2"));
    }
}
