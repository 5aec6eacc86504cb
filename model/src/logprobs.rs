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

/// Logits of at most this many elements (`N * V`, N the scored positions) are computed
/// whole under autograd by [`token_logprobs_full`] instead of chunk by chunk with a
/// recomputing backward: one pass through the head instead of two. Measured with
/// `cargo run -p model --example logprob_bench` (1 thread, H = 512, V = 8k and 32k):
/// the single pass was 1.1-1.6x faster at every size from 2^19 to 2^26 elements, so
/// the bound is memory: 2^24 f32 elements are 64 MiB per copy, and the logits, their
/// softmax and its gradient live at once (about 200 MB); larger inputs stay chunked.
pub const FULL_LOGITS_MAX_ELEMENTS: i64 = 1 << 24;

/// The scored positions of a `[B, T]` batch: the non-zero entries of a mask (the
/// completion tokens), so the head never runs on prompt or padding positions.
/// [`Positions::gather`] packs `[B, T, ...]` into `[1, N, ...]` in row-major order and
/// [`Positions::scatter`] puts `[1, N, ...]` back, zero elsewhere.
#[derive(Debug)]
pub struct Positions {
    /// Flat `b * T + t` indices of the selected positions, i64 `[N]`.
    index: Tensor,
    batch: i64,
    len: i64,
    /// No index repeats (false for shared-prefix predictors): scatter needs it.
    distinct: bool,
}

impl Positions {
    /// Explicit flat `b * T + t` indices into a `[batch, len]` layout, in the order the
    /// gathered tensors take. An index may repeat (the last prompt position predicts
    /// the first token of every completion of a shared-prefix row): gather then copies
    /// it and the backward sums the copies' gradients; scatter needs distinct indices.
    pub fn from_index(index: &[i64], batch: i64, len: i64) -> Result<Self> {
        if batch < 0 || len < 0 {
            return Err(ModelError::Input(format!(
                "a position layout is [B, T] with B, T >= 0; got [{batch}, {len}]"
            )));
        }
        if let Some(&bad) = index.iter().find(|&&i| i < 0 || i >= batch * len) {
            return Err(ModelError::Input(format!(
                "position index {bad} is outside the [{batch}, {len}] layout"
            )));
        }
        let mut sorted = index.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Ok(Positions {
            index: Tensor::from_slice(index),
            batch,
            len,
            distinct: sorted.len() == index.len(),
        })
    }

    /// The positions where `mask` `[B, T]` (any dtype) is non-zero.
    pub fn new(mask: &Tensor) -> Result<Self> {
        let s = mask.size();
        if s.len() != 2 {
            return Err(ModelError::Input(format!(
                "a position mask is [B, T]; got {s:?}"
            )));
        }
        let index = mask
            .f_reshape([-1])?
            .f_ne(0)?
            .f_nonzero()?
            .f_squeeze_dim(-1)?;
        Ok(Positions {
            index,
            batch: s[0],
            len: s[1],
            distinct: true,
        })
    }

    /// Number of selected positions.
    pub fn count(&self) -> i64 {
        self.index.size()[0]
    }

    fn check(&self, x: &Tensor, what: &str) -> Result<Vec<i64>> {
        let s = x.size();
        if s.len() < 2 || s[0] != self.batch || s[1] != self.len {
            return Err(ModelError::Input(format!(
                "{what} {s:?} does not match the position mask [{}, {}]",
                self.batch, self.len
            )));
        }
        Ok(s[2..].to_vec())
    }

    /// `[B, T, ...]` -> `[1, N, ...]` (differentiable).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let rest = self.check(x, "tensor")?;
        let flat: Vec<i64> = [self.batch * self.len].into_iter().chain(rest).collect();
        let index = self.index.to_device(x.device());
        Ok(x.f_reshape(flat.as_slice())?
            .f_index_select(0, &index)?
            .f_unsqueeze(0)?)
    }

    /// `[1, N, ...]` -> `[B, T, ...]`, zero at the positions not selected
    /// (differentiable).
    pub fn scatter(&self, x: &Tensor) -> Result<Tensor> {
        if !self.distinct {
            return Err(ModelError::Input(
                "scatter needs distinct positions (a shared-prefix index repeats)".into(),
            ));
        }
        self.spread(x, "scatter", |zeros, index, src| {
            zeros.f_index_copy(0, index, src)
        })
    }

    /// `[1, N, ...]` -> `[B, T, ...]`, summing the rows of repeated positions (the
    /// adjoint of [`Positions::gather`]: the gradient it passes back), zero elsewhere.
    pub fn scatter_add(&self, x: &Tensor) -> Result<Tensor> {
        self.spread(x, "scatter_add", |zeros, index, src| {
            zeros.f_index_add(0, index, src)
        })
    }

    /// `[1, N, ...]` -> `[B, T, ...]` by `op(zeros [B * T, ...], index [N], x [N, ...])`.
    fn spread(
        &self,
        x: &Tensor,
        what: &str,
        op: impl FnOnce(&Tensor, &Tensor, &Tensor) -> std::result::Result<Tensor, tch::TchError>,
    ) -> Result<Tensor> {
        let s = x.size();
        if s.len() < 2 || s[0] != 1 || s[1] != self.count() {
            return Err(ModelError::Input(format!(
                "{what} takes [1, {}, ...]; got {s:?}",
                self.count()
            )));
        }
        let rest = &s[2..];
        let flat: Vec<i64> = [self.batch * self.len]
            .iter()
            .chain(rest)
            .copied()
            .collect();
        let full: Vec<i64> = [self.batch, self.len].iter().chain(rest).copied().collect();
        let index = self.index.to_device(x.device());
        let zeros = Tensor::f_zeros(flat.as_slice(), (x.kind(), x.device()))?;
        Ok(op(&zeros, &index, &x.f_squeeze_dim(0)?)?.f_reshape(full.as_slice())?)
    }
}

/// [`token_logprobs`] of the positions where `mask` `[B, T]` is non-zero only (the
/// head runs on those alone); the log-probs and entropy are 0 elsewhere.
pub fn token_logprobs_at(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    opts: &LogprobOptions,
) -> Result<TokenLogprobs> {
    check(hidden, head, targets, opts)?;
    let at = Positions::new(mask)?;
    if at.count() == 0 {
        let zeros = || targets.zeros_like().to_kind(Kind::Float);
        return Ok(TokenLogprobs {
            logprobs: zeros(),
            entropy: opts.with_entropy.then(zeros),
        });
    }
    let out = token_logprobs(&at.gather(hidden)?, head, &at.gather(targets)?, opts)?;
    Ok(TokenLogprobs {
        logprobs: at.scatter(&out.logprobs)?,
        entropy: out.entropy.map(|e| at.scatter(&e)).transpose()?,
    })
}

/// The log-probs of `targets` `[1, N]` from `hidden` `[1, N, H]` in one pass under
/// autograd (the `[N, V]` logits whole): differentiable with respect to `hidden` and
/// `head`. For `N * V <= FULL_LOGITS_MAX_ELEMENTS`; larger inputs use the chunked pair.
pub fn token_logprobs_full(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    opts: &LogprobOptions,
) -> Result<TokenLogprobs> {
    check(hidden, head, targets, opts)?;
    let t = hidden.size()[1];
    let (logprobs, entropy) = chunk(hidden, head, targets, opts)?;
    debug_assert_eq!(logprobs.size()[1], t);
    Ok(TokenLogprobs { logprobs, entropy })
}
