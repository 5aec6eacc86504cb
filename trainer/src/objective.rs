//! Losses defined on per-token log-probs, with the `[B, T, V]` logits never held whole.
//!
//! [`logprob_objective_at`] takes the engine's final hidden states and head and the
//! mask of the positions that count (the completion tokens): the hidden states of those
//! positions are gathered first, so the head never runs on prompt or padding positions.
//! When their logits are small (`N * V <= model::FULL_LOGITS_MAX_ELEMENTS`) it computes
//! them whole under autograd, in one pass. Otherwise it computes the log-probs chunk by
//! chunk without autograd, lets the caller build a loss on those `[B, T]` log-probs (a
//! leaf), backpropagates that loss to the log-probs only, and turns the result into
//! `dL/dhidden` with the chunked backward of [`model::token_logprobs_backward`] (which
//! also accumulates the head's gradient). Either way the returned loss is the surrogate
//! `sum(hidden * dL/dhidden)`, shifted to carry the true loss value: its backward
//! through the trunk is exactly the loss's.
use model::{
    token_logprobs, token_logprobs_backward, token_logprobs_full, LogprobOptions, Positions,
    FULL_LOGITS_MAX_ELEMENTS,
};
use tch::{Kind, Tensor};

use crate::zero::engine::BoxError;
use crate::zero::LossOutput;

/// Why a log-prob objective failed: the log-prob kernels, autograd, a non-finite loss
/// or the caller's loss itself (its error as it is).
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("the loss is not finite ({value})")]
    NotFinite { value: f64 },
    #[error(transparent)]
    Loss(BoxError),
}

/// What the caller's loss sees.
pub struct LogprobView<'a> {
    /// `[B, T]` f32 log-probs of the targets, requiring grad; 0 at the positions the
    /// mask leaves out (the loss must not depend on them).
    pub logprobs: &'a Tensor,
    /// `[B, T]` f32 entropy of each position's distribution (no grad), when requested;
    /// 0 where the mask leaves out.
    pub entropy: Option<&'a Tensor>,
}

/// [`logprob_objective_at`] over every position.
pub fn logprob_objective<F>(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
    loss: F,
) -> Result<LossOutput, ObjectiveError>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), BoxError>,
{
    objective(
        hidden,
        head,
        targets,
        None,
        opts,
        FULL_LOGITS_MAX_ELEMENTS,
        loss,
    )
}

/// `hidden` is `[B, L, H]`, `targets` `[B, T]` with `T <= L`: position `t` of the
/// hidden states scores `targets[:, t]`. Only the positions where `mask` `[B, T]` is
/// non-zero are scored (the loss's gradient must be zero elsewhere, as a masked loss's
/// is). `loss` returns the summed loss (built from the log-probs) and its item count
/// (see [`LossOutput`]).
pub fn logprob_objective_at<F>(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    opts: &LogprobOptions,
    loss: F,
) -> Result<LossOutput, ObjectiveError>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), BoxError>,
{
    let max = FULL_LOGITS_MAX_ELEMENTS;
    objective(hidden, head, targets, Some(mask), opts, max, loss)
}

/// Narrows `hidden` to the `T` positions scoring `targets` `[B, T]` and selects the
/// mask's positions (every one without a mask).
fn objective<F>(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    opts: &LogprobOptions,
    full_max_elements: i64,
    loss: F,
) -> Result<LossOutput, ObjectiveError>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), BoxError>,
{
    let err = ObjectiveError::Model;
    let h = hidden.narrow(1, 0, targets.size()[1]);
    match mask {
        Some(mask) => {
            let at = Positions::new(mask).map_err(err)?;
            let ts = at.gather(targets).map_err(err)?;
            let select = Selection {
                predictors: &at,
                unpacked: &at,
            };
            objective_over(&h, head, &ts, Some(select), opts, full_max_elements, loss)
        }
        None => objective_over(&h, head, targets, None, opts, full_max_elements, loss),
    }
}

/// [`logprob_objective_at`] for a shared-prefix forward: `hidden` `[R, L, H]` of the
/// packed rows, `predictors` the position predicting each of the `N` `targets`
/// `[1, N]` (a position may predict several), and `unpacked` where those `N` tokens sit
/// in the unpacked `[B, T]` layout the loss sees. The gradient of a repeated position
/// sums its targets' gradients.
pub fn logprob_objective_shared<F>(
    hidden: &Tensor,
    head: &Tensor,
    predictors: &Positions,
    targets: &Tensor,
    unpacked: &Positions,
    opts: &LogprobOptions,
    loss: F,
) -> Result<LossOutput, ObjectiveError>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), BoxError>,
{
    let select = Selection {
        predictors,
        unpacked,
    };
    let max = FULL_LOGITS_MAX_ELEMENTS;
    objective_over(hidden, head, targets, Some(select), opts, max, loss)
}

/// The scored positions: `predictors` index the hidden states (one per target, a
/// position may repeat) and `unpacked` places the `N` log-probs in the `[B, T]` layout
/// the loss sees (the same positions for a plain masked selection).
#[derive(Clone, Copy)]
struct Selection<'a> {
    predictors: &'a Positions,
    unpacked: &'a Positions,
}

/// The one body: `h` `[R, L, H]` scores `targets`, `[1, N]` under a selection (the
/// positions of `h` its predictors name) or `[R, L]` position by position without one.
fn objective_over<F>(
    h: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    select: Option<Selection<'_>>,
    opts: &LogprobOptions,
    full_max_elements: i64,
    loss: F,
) -> Result<LossOutput, ObjectiveError>
where
    F: FnOnce(&LogprobView<'_>) -> Result<(Tensor, i64), BoxError>,
{
    let err = ObjectiveError::Model;
    let hs = match select {
        Some(s) => s.predictors.gather(h).map_err(err)?,
        None => h.shallow_clone(),
    };
    // Flat `[1, N]` -> the loss's `[B, T]`, and back.
    let spread = |x: Tensor| -> Result<Tensor, ObjectiveError> {
        match select {
            Some(s) => s.unpacked.scatter(&x).map_err(err),
            None => Ok(x),
        }
    };
    let collect = |x: Tensor| -> Result<Tensor, ObjectiveError> {
        match select {
            Some(s) => s.unpacked.gather(&x).map_err(err),
            None => Ok(x),
        }
    };
    let ts_size = targets.size();
    let n = ts_size[0] * ts_size[1];
    let (value, count, dh_selected) = if n == 0 {
        let zeros = spread(targets.zeros_like().to_kind(Kind::Float))?;
        let leaf = zeros.detach().set_requires_grad(true);
        let entropy = opts.with_entropy.then(|| zeros.shallow_clone());
        let (loss_sum, count) = loss(&LogprobView {
            logprobs: &leaf,
            entropy: entropy.as_ref(),
        })
        .map_err(ObjectiveError::Loss)?;
        (loss_sum.double_value(&[]), count, hs.zeros_like())
    } else if n * head.size()[0] <= full_max_elements {
        // One pass: the logits whole, under autograd.
        let leaf = hs.detach().set_requires_grad(true);
        let out = token_logprobs_full(&leaf, head, targets, opts).map_err(err)?;
        let logprobs = spread(out.logprobs)?;
        let entropy = out.entropy.map(|e| spread(e.detach())).transpose()?;
        let (loss_sum, count) = loss(&LogprobView {
            logprobs: &logprobs,
            entropy: entropy.as_ref(),
        })
        .map_err(ObjectiveError::Loss)?;
        let value = finite(&loss_sum)?;
        if loss_sum.requires_grad() {
            loss_sum.f_backward()?;
        }
        let g = leaf.grad();
        (
            value,
            count,
            if g.defined() { g } else { leaf.zeros_like() },
        )
    } else {
        let computed = tch::no_grad(|| token_logprobs(&hs, head, targets, opts)).map_err(err)?;
        let leaf = spread(computed.logprobs)?.detach().set_requires_grad(true);
        let entropy = computed.entropy.map(spread).transpose()?;
        let (loss_sum, count) = loss(&LogprobView {
            logprobs: &leaf,
            entropy: entropy.as_ref(),
        })
        .map_err(ObjectiveError::Loss)?;
        let value = finite(&loss_sum)?;
        let mut upstream = leaf.zeros_like();
        if loss_sum.requires_grad() {
            loss_sum.f_backward()?;
            let g = leaf.grad();
            if g.defined() {
                upstream = g;
            }
        }
        let plain = LogprobOptions {
            with_entropy: false,
            ..*opts
        };
        let upstream = collect(upstream)?;
        let dh =
            token_logprobs_backward(&hs, head, targets, &plain, &upstream, None).map_err(err)?;
        (value, count, dh)
    };
    if !value.is_finite() {
        return Err(ObjectiveError::NotFinite { value });
    }
    // The adjoint of the gather: a repeated predictor sums its targets' gradients.
    let dh = match select {
        Some(s) => s.predictors.scatter_add(&dh_selected).map_err(err)?,
        None => dh_selected,
    };
    let surrogate = (h * dh.detach()).sum(Kind::Float);
    let shifted = &surrogate - surrogate.detach() + value;
    Ok(LossOutput {
        loss_sum: shifted,
        count,
    })
}

/// The loss's value; an error when it is not finite (before any backward).
fn finite(loss_sum: &Tensor) -> Result<f64, ObjectiveError> {
    let value = loss_sum.double_value(&[]);
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ObjectiveError::NotFinite { value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The surrogate's gradients equal plain autograd through full logits, over every
    /// position and over the masked ones only, by the chunked and the one-pass path.
    #[test]
    fn gradients_match_autograd_through_full_logits() {
        tch::manual_seed(0);
        let (b, l, h, v) = (2, 5, 8, 11);
        let x0 = Tensor::randn([b, l, h], (Kind::Float, tch::Device::Cpu));
        let w0 = Tensor::randn([v, h], (Kind::Float, tch::Device::Cpu));
        let targets = Tensor::randint(v, [b, l - 1], (Kind::Int64, tch::Device::Cpu));
        let weights = Tensor::randn([b, l - 1], (Kind::Float, tch::Device::Cpu));
        let mask = Tensor::from_slice(&[0f32, 1., 1., 0., 0., 0., 1., 1.]).view([b, l - 1]);
        let opts = LogprobOptions {
            chunk_size: 2,
            temperature: 0.7,
            with_entropy: true,
        };
        for masked in [false, true] {
            let m = if masked {
                mask.shallow_clone()
            } else {
                mask.ones_like()
            };
            // Reference: autograd through logits / T of every position, masked loss.
            let x = x0.detach().set_requires_grad(true);
            let w = w0.detach().set_requires_grad(true);
            let logits = x.narrow(1, 0, l - 1).linear::<Tensor>(&w, None) / 0.7;
            let lp = logits
                .log_softmax(-1, Kind::Float)
                .gather(-1, &targets.unsqueeze(-1), false)
                .squeeze_dim(-1);
            let loss = (lp.exp() * &weights * &m).sum(Kind::Float);
            loss.backward();
            for full_max in [0, i64::MAX] {
                let x2 = x0.detach().set_requires_grad(true);
                let w2 = w0.detach().set_requires_grad(true);
                let mask = masked.then_some(&m);
                let out = objective(&x2, &w2, &targets, mask, &opts, full_max, |view| {
                    let ent = view.entropy.expect("entropy requested");
                    // Zero off the mask, finite on it.
                    let off = (ent * (m.ones_like() - &m))
                        .abs()
                        .sum(Kind::Float)
                        .double_value(&[]);
                    assert!(!masked || off == 0.0, "entropy off the mask: {off}");
                    Ok(((view.logprobs.exp() * &weights * &m).sum(Kind::Float), 3))
                })
                .unwrap();
                assert_eq!(out.count, 3);
                let dl = (out.loss_sum.double_value(&[]) - loss.double_value(&[])).abs();
                assert!(
                    dl < 1e-5,
                    "masked {masked} full_max {full_max}: loss off by {dl}"
                );
                out.loss_sum.backward();
                let dx = (x.grad() - x2.grad()).abs().max().double_value(&[]);
                let dw = (w.grad() - w2.grad()).abs().max().double_value(&[]);
                assert!(
                    dx < 1e-5 && dw < 1e-5,
                    "masked {masked} full_max {full_max}: dx {dx} dw {dw}"
                );
            }
        }
    }

    /// Shared-prefix selection (a position predicting several targets): the
    /// surrogate's gradients equal plain autograd, by the chunked and one-pass path.
    #[test]
    fn shared_predictors_match_autograd() {
        tch::manual_seed(1);
        let dev = tch::Device::Cpu;
        let (r, l, h, v) = (2, 6, 8, 11);
        let x0 = Tensor::randn([r, l, h], (Kind::Float, dev));
        let w0 = Tensor::randn([v, h], (Kind::Float, dev));
        let index = [2i64, 2, 3, 2, 8, 8, 9];
        let predictors = Positions::from_index(&index, r, l).unwrap();
        let targets = Tensor::randint(v, [1, 7], (Kind::Int64, dev));
        let unpacked = Positions::from_index(&[1, 2, 4, 5, 6, 9, 10], 3, 4).unwrap();
        let weights = Tensor::randn([3, 4], (Kind::Float, dev));
        let opts = LogprobOptions {
            chunk_size: 3,
            temperature: 0.8,
            with_entropy: true,
        };
        let x = x0.detach().set_requires_grad(true);
        let w = w0.detach().set_requires_grad(true);
        let idx = Tensor::from_slice(&index);
        let hs = x.reshape([r * l, h]).index_select(0, &idx);
        let lp = (hs.linear::<Tensor>(&w, None) / 0.8)
            .log_softmax(-1, Kind::Float)
            .gather(-1, &targets.view([7, 1]), false)
            .view([1, 7]);
        let loss = (unpacked.scatter(&lp).unwrap().exp() * &weights).sum(Kind::Float);
        loss.backward();
        for full_max in [0, i64::MAX] {
            let x2 = x0.detach().set_requires_grad(true);
            let w2 = w0.detach().set_requires_grad(true);
            let select = Selection {
                predictors: &predictors,
                unpacked: &unpacked,
            };
            let out = objective_over(&x2, &w2, &targets, Some(select), &opts, full_max, |view| {
                assert!(view.entropy.is_some());
                Ok(((view.logprobs.exp() * &weights).sum(Kind::Float), 7))
            })
            .unwrap();
            let dl = (out.loss_sum.double_value(&[]) - loss.double_value(&[])).abs();
            assert!(dl < 1e-5, "full_max {full_max}: loss off by {dl}");
            out.loss_sum.backward();
            let dx = (x.grad() - x2.grad()).abs().max().double_value(&[]);
            let dw = (w.grad() - w2.grad()).abs().max().double_value(&[]);
            assert!(
                dx < 1e-5 && dw < 1e-5,
                "full_max {full_max}: dx {dx} dw {dw}"
            );
        }
    }

    #[test]
    fn an_empty_mask_gives_zero_gradients() {
        let x = Tensor::randn([1, 3, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([5, 4], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 2]).view([1, 2]);
        let mask = Tensor::zeros([1, 2], (Kind::Float, tch::Device::Cpu));
        let opts = LogprobOptions::default();
        let out = logprob_objective_at(&x, &w, &t, &mask, &opts, |v| {
            Ok(((v.logprobs * &mask).sum(Kind::Float), 0))
        })
        .unwrap();
        out.loss_sum.backward();
        assert_eq!(x.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
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
        assert!(
            matches!(e, ObjectiveError::NotFinite { .. }) && e.to_string().contains("not finite"),
            "{e}"
        );
    }
}
