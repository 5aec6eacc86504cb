//! TRL's correction for the rollout workers' log-probs (`vllm_importance_sampling_*`):
//! the sampler and the trainer are different engines, so the tokens were drawn from a
//! slightly different distribution than the one the loss assumes. The loss is reweighted
//! by the importance ratio of the trainer's "old" policy to the sampler:
//!
//! ```text
//! d      = (old − sampler) · m                         [B, T]
//! token_*:     r = exp(d)                              [B, T]  one weight per token
//! sequence_*:  r = exp(Σ_t d)                          [B, 1]  one weight per sequence
//! *_truncate:  w = min(r, cap)
//! *_mask:      w = r if r <= cap else 0                (the token / sequence is dropped)
//! ```
//!
//! TRL's default is `sequence_mask` with cap 3.0. The weight is detached (neither `old`
//! nor `sampler` carries gradient).
use tch::Tensor;

/// TRL's `vllm_importance_sampling_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IsCorrectionMode {
    /// Per-token ratios clipped from above at the cap.
    TokenTruncate,
    /// Per-token ratios above the cap set to 0.
    TokenMask,
    /// One ratio per sequence (product over its tokens), clipped at the cap.
    SequenceTruncate,
    /// One ratio per sequence; sequences above the cap leave the loss (TRL's default).
    #[default]
    SequenceMask,
}

impl IsCorrectionMode {
    pub fn name(self) -> &'static str {
        match self {
            IsCorrectionMode::TokenTruncate => "token_truncate",
            IsCorrectionMode::TokenMask => "token_mask",
            IsCorrectionMode::SequenceTruncate => "sequence_truncate",
            IsCorrectionMode::SequenceMask => "sequence_mask",
        }
    }

    fn sequence_level(self) -> bool {
        matches!(
            self,
            IsCorrectionMode::SequenceTruncate | IsCorrectionMode::SequenceMask
        )
    }
}

/// The correction's mode and cap (TRL's `vllm_importance_sampling_mode` / `_cap`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsCorrection {
    pub mode: IsCorrectionMode,
    pub cap: f64,
}

/// The detached weights `[B, T]` (token modes) or `[B, 1]` (sequence modes). `old` and
/// `sampler` must already be 0 where `mask` is 0 (see the loss's `clean`); `mask` is
/// float 0/1.
pub fn correction_weights(
    old: &Tensor,
    sampler: &Tensor,
    mask: &Tensor,
    c: IsCorrection,
) -> Tensor {
    tch::no_grad(|| {
        let d = (old - sampler) * mask;
        let d = if c.mode.sequence_level() {
            d.sum_dim_intlist(1, true, d.kind())
        } else {
            d
        };
        let r = d.exp();
        match c.mode {
            IsCorrectionMode::TokenTruncate | IsCorrectionMode::SequenceTruncate => {
                r.clamp_max(c.cap)
            }
            IsCorrectionMode::TokenMask | IsCorrectionMode::SequenceMask => {
                let over = r.gt(c.cap);
                r.masked_fill(&over, 0.0)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_by_hand() {
        // One sequence, two counted tokens with log-ratios ln 2 and ln 1.25, one masked.
        let old = Tensor::from_slice(&[2f64.ln(), 1.25f64.ln(), 0.0]).view([1, 3]);
        let sampler = old.zeros_like();
        let mask = Tensor::from_slice(&[1.0f64, 1.0, 0.0]).view([1, 3]);
        let w = |mode, cap| {
            Vec::<f64>::try_from(
                correction_weights(&old, &sampler, &mask, IsCorrection { mode, cap }).view([-1]),
            )
            .unwrap()
        };
        let near = |a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len());
            assert!(
                a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12),
                "{a:?} vs {b:?}"
            );
        };
        near(&w(IsCorrectionMode::TokenTruncate, 1.5), &[1.5, 1.25, 1.0]);
        near(&w(IsCorrectionMode::TokenMask, 1.5), &[0.0, 1.25, 1.0]);
        // The sequence ratio is 2 * 1.25 = 2.5.
        near(&w(IsCorrectionMode::SequenceTruncate, 2.0), &[2.0]);
        near(&w(IsCorrectionMode::SequenceMask, 2.0), &[0.0]);
        near(&w(IsCorrectionMode::SequenceMask, 3.0), &[2.5]);
    }
}
