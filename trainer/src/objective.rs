//! Losses defined on per-token log-probs, with the `[B, T, V]` logits never held whole.
//!
//! [`logprob_objective`] takes the engine's final hidden states and head, computes the
//! log-probs of the targets chunk by chunk without autograd, lets the caller build a
//! loss on those `[B, T]` log-probs (a leaf), backpropagates that loss to the log-probs
//! only, and turns the result into `dL/dhidden` with the chunked backward of
//! [`model::token_logprobs_backward`] (which also accumulates the head's gradient). The
//! returned loss is the surrogate `sum(hidden * dL/dhidden)`, shifted to carry the true
//! loss value: its backward through the trunk is exactly the loss's.
use model::{token_logprobs, token_logprobs_backward, LogprobOptions};
use tch::{Kind, Tensor};

use crate::zero::LossOutput;

/// What the caller's loss sees.
pub struct LogprobView<'a> {
    /// `[B, T]` f32 log-probs of the targets; a leaf requiring grad.
    pub logprobs: &'a Tensor,
    /// `[B, T]` f32 entropy of each position's distribution (no grad), when requested.
    pub entropy: Option<&'a Tensor>,
}

/// `hidden` is `[B, L, H]`, `targets` `[B, T]` with `T <= L`: position `t` of the
/// hidden states scores `targets[:, t]`. `loss` returns the summed loss (built from the
/// log-probs leaf) and its item count (see [`LossOutput`]).
pub fn logprob_objective<F>(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
    loss: F,
) -> Result<LossOutput, String>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), String>,
{
    let t = targets.size()[1];
    let h = hidden.narrow(1, 0, t);
    let computed =
        tch::no_grad(|| token_logprobs(&h, head, targets, opts)).map_err(|e| e.to_string())?;
    let leaf = computed.logprobs.detach().set_requires_grad(true);
    let (loss_sum, count) = loss(&LogprobView {
        logprobs: &leaf,
        entropy: computed.entropy.as_ref(),
    })?;
    let value = loss_sum.double_value(&[]);
    if !value.is_finite() {
        return Err(format!("the loss is not finite ({value})"));
    }
    let upstream = if loss_sum.requires_grad() {
        loss_sum.f_backward().map_err(|e| e.to_string())?;
        let g = leaf.grad();
        if g.defined() {
            g
        } else {
            leaf.zeros_like()
        }
    } else {
        leaf.zeros_like()
    };
    let plain = LogprobOptions {
        with_entropy: false,
        ..*opts
    };
    let dh = token_logprobs_backward(&h, head, targets, &plain, &upstream, None)
        .map_err(|e| e.to_string())?;
    let surrogate = (&h * dh.detach()).sum(Kind::Float);
    let shifted = &surrogate - surrogate.detach() + value;
    Ok(LossOutput {
        loss_sum: shifted,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The surrogate's gradients equal plain autograd through full logits.
    #[test]
    fn gradients_match_autograd_through_full_logits() {
        tch::manual_seed(0);
        let (b, l, h, v) = (2, 5, 8, 11);
        let x0 = Tensor::randn([b, l, h], (Kind::Float, tch::Device::Cpu));
        let w0 = Tensor::randn([v, h], (Kind::Float, tch::Device::Cpu));
        let targets = Tensor::randint(v, [b, l - 1], (Kind::Int64, tch::Device::Cpu));
        let weights = Tensor::randn([b, l - 1], (Kind::Float, tch::Device::Cpu));
        let opts = LogprobOptions {
            chunk_size: 2,
            temperature: 0.7,
            with_entropy: true,
        };

        // Reference: autograd through logits / T.
        let x = x0.detach().set_requires_grad(true);
        let w = w0.detach().set_requires_grad(true);
        let logits = x.narrow(1, 0, l - 1).linear::<Tensor>(&w, None) / 0.7;
        let lp = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &targets.unsqueeze(-1), false)
            .squeeze_dim(-1);
        let loss = (lp.exp() * &weights).sum(Kind::Float);
        loss.backward();

        let x2 = x0.detach().set_requires_grad(true);
        let w2 = w0.detach().set_requires_grad(true);
        let out = logprob_objective(&x2, &w2, &targets, &opts, |view| {
            assert!(view.entropy.is_some());
            Ok(((view.logprobs.exp() * &weights).sum(Kind::Float), 3))
        })
        .unwrap();
        assert_eq!(out.count, 3);
        assert!((out.loss_sum.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
        out.loss_sum.backward();
        let dx = (x.grad() - x2.grad()).abs().max().double_value(&[]);
        let dw = (w.grad() - w2.grad()).abs().max().double_value(&[]);
        assert!(dx < 1e-5 && dw < 1e-5, "dx {dx} dw {dw}");
    }

    #[test]
    fn non_finite_losses_are_refused() {
        let x = Tensor::zeros([1, 2, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[1i64]).view([1, 1]);
        let e = logprob_objective(&x, &w, &t, &LogprobOptions::default(), |v| {
            Ok((v.logprobs.sum(Kind::Float) / 0.0, 1))
        })
        .err()
        .unwrap();
        assert!(e.contains("not finite"), "{e}");
    }
}
