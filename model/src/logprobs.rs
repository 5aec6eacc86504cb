//! Log-probabilities (and entropy) of given tokens, computed a chunk of positions at a
//! time so the fp32 `[B, T, V]` logits never exist at once: at V = 152k and T = 8k that
//! tensor is 4.9 GB per sequence, and long completions are what runs GRPO out of memory.
//!
//! [`token_logprobs`] is the forward. Under autograd every chunk's graph would keep its
//! `[B, chunk, V]` softmax alive until backward, so training uses
//! [`token_logprobs_backward`]: the forward runs without grad, the loss is taken on the
//! `[B, T]` log-probs, and the backward recomputes one chunk at a time, returning the
//! gradient with respect to the hidden states (and accumulating the head's gradient).
//! Peak extra memory is then `O(B * chunk * V)` in both directions.
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// How log-probs are computed.
#[derive(Debug, Clone, Copy)]
pub struct LogprobOptions {
    /// Positions per chunk; the peak extra memory is `B * chunk * V * 4` bytes.
    pub chunk_size: i64,
    /// Logits are divided by this before the softmax (TRL divides by the sampling
    /// temperature so the trainer's log-probs match the sampler's distribution).
    pub temperature: f64,
    /// Also compute the entropy of each position's distribution.
    pub with_entropy: bool,
}

impl Default for LogprobOptions {
    fn default() -> Self {
        LogprobOptions {
            chunk_size: 512,
            temperature: 1.0,
            with_entropy: false,
        }
    }
}

/// Per-token results, `[B, T]` fp32 each.
#[derive(Debug)]
pub struct TokenLogprobs {
    /// `log softmax(logits / temperature)[target]`.
    pub logprobs: Tensor,
    /// `-sum_v p_v log p_v`, when requested.
    pub entropy: Option<Tensor>,
}

fn check(hidden: &Tensor, head: &Tensor, targets: &Tensor, opts: &LogprobOptions) -> Result<()> {
    let (hs, ws, ts) = (hidden.size(), head.size(), targets.size());
    if hs.len() != 3 || ws.len() != 2 || ts.len() != 2 || hs[..2] != ts[..] || hs[2] != ws[1] {
        return Err(ModelError::Input(format!(
            "log-probs need hidden [B, T, H], head [V, H] and targets [B, T]; got {hs:?}, {ws:?}, {ts:?}"
        )));
    }
    if opts.chunk_size <= 0 || opts.temperature.is_nan() || opts.temperature <= 0.0 {
        return Err(ModelError::Input(format!(
            "chunk_size ({}) and temperature ({}) must be positive",
            opts.chunk_size, opts.temperature
        )));
    }
    Ok(())
}

/// One chunk: `(logprobs [B, c], entropy [B, c])` from hidden `[B, c, H]`.
fn chunk(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
) -> Result<(Tensor, Option<Tensor>)> {
    let logits = hidden
        .f_linear::<Tensor>(head, None)?
        .f_to_kind(Kind::Float)?;
    let logits = if opts.temperature != 1.0 {
        logits / opts.temperature
    } else {
        logits
    };
    let logp_all = logits.f_log_softmax(-1, Kind::Float)?;
    let logp = logp_all
        .f_gather(-1, &targets.unsqueeze(-1), false)?
        .squeeze_dim(-1);
    let entropy = if opts.with_entropy {
        Some(-(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float))
    } else {
        None
    };
    Ok((logp, entropy))
}

/// Log-probs of `targets` `[B, T]` under `logits = hidden [B, T, H] @ head [V, H]^T`.
/// `targets[b, t]` is scored by the distribution at position `t` (shift beforehand:
/// the token at t + 1 is predicted by position t).
pub fn token_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
) -> Result<TokenLogprobs> {
    check(hidden, head, targets, opts)?;
    let t = hidden.size()[1];
    let mut logps = vec![];
    let mut ents = vec![];
    let mut start = 0;
    while start < t {
        let len = opts.chunk_size.min(t - start);
        let (lp, ent) = chunk(
            &hidden.narrow(1, start, len),
            head,
            &targets.narrow(1, start, len),
            opts,
        )?;
        logps.push(lp);
        ents.extend(ent);
        start += len;
    }
    Ok(TokenLogprobs {
        logprobs: Tensor::f_cat(&logps, 1)?,
        entropy: if opts.with_entropy {
            Some(Tensor::f_cat(&ents, 1)?)
        } else {
            None
        },
    })
}

/// The backward of [`token_logprobs`], chunk by chunk. Given the upstream gradients
/// `grad_logprobs` (and `grad_entropy`) `[B, T]`, returns `dL/dhidden` `[B, T, H]` and,
/// when `head` requires grad, accumulates `dL/dhead` into `head.grad()`. The caller
/// continues the backward through the trunk with the returned gradient, e.g.
/// `(hidden * grad.detach()).sum().backward()`.
pub fn token_logprobs_backward(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
    grad_logprobs: &Tensor,
    grad_entropy: Option<&Tensor>,
) -> Result<Tensor> {
    check(hidden, head, targets, opts)?;
    let opts = LogprobOptions {
        with_entropy: grad_entropy.is_some(),
        ..*opts
    };
    let t = hidden.size()[1];
    let mut grads = vec![];
    let mut start = 0;
    while start < t {
        let len = opts.chunk_size.min(t - start);
        let h = hidden
            .narrow(1, start, len)
            .detach()
            .set_requires_grad(true);
        let (lp, ent) = chunk(&h, head, &targets.narrow(1, start, len), &opts)?;
        let mut objective = (lp * grad_logprobs.narrow(1, start, len).detach()).sum(Kind::Float);
        if let (Some(ent), Some(g)) = (ent, grad_entropy) {
            objective += (ent * g.narrow(1, start, len).detach()).sum(Kind::Float);
        }
        objective.f_backward()?;
        grads.push(h.grad().to_kind(hidden.kind()));
        start += len;
    }
    Ok(Tensor::f_cat(&grads, 1)?)
}
