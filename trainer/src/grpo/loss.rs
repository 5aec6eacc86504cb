//! The clipped GRPO policy loss of one micro-batch, as TRL's `GRPOTrainer` computes it.
//!
//! Inputs are per-token log-probabilities `[B, T]` of the completion tokens (B sequences,
//! T completion positions) and one advantage per sequence `[B]`. Per token:
//!
//! ```text
//! token level:     ratio = exp(logp − old)                               [B, T]
//! sequence level:  ratio = exp(Σ_t (logp − old)·m / max(Σ_t m, 1))       [B, 1]  (GSPO)
//! grpo, bnpo, dr_grpo, dapo:
//!        l = −min(min(ratio, delta) · A, clamp(ratio, 1 − epsilon, 1 + epsilon_high) · A)
//!            (min(·, delta) only with `delta` set: INTELLECT-2's two-sided clipping)
//! cispo: l = −detach(min(ratio, epsilon_high)) · A · logp              (MiniMax-M1)
//! sapo:  l = −σ(τ · (ratio − 1)) · 4/τ · A,  τ = τ_pos if A > 0 else τ_neg  (soft gate)
//! l      = l · w                          (the workers' correction, detached: [`correction`])
//! l      = l + beta · (exp(ref − logp) − (ref − logp) − 1)   (if beta > 0: the k3 KL estimator)
//! ```
//!
//! `old` defaults to `logp.detach()` (one policy update per generation batch: the ratio
//! is 1 but its gradient is the policy gradient). `sampler` are the rollout workers'
//! log-probs of the same tokens; the TIS factor corrects for the mismatch between the
//! sampler's and the trainer's numerics (TRL's `vllm_importance_sampling_cap`, token level,
//! truncated).
//!
//! # Denominators
//!
//! The ZeRO engine divides the accumulated gradients by the **global** sum of `count`
//! over all micro-batches and ranks of an optimizer step, so [`policy_loss`] returns a
//! `(loss_sum, count)` pair per micro-batch whose global ratio `Σ loss_sum / Σ count` is
//! the loss of each type (`m` is the mask, sums over the micro-batch unless marked):
//!
//! | `loss_type` | `loss_sum`                                    | `count`  | global loss                                                   |
//! |-------------|-----------------------------------------------|----------|---------------------------------------------------------------|
//! | `grpo`      | `Σ_seq (Σ_t l·m / max(Σ_t m, 1))`             | `B`      | mean over all sequences of each sequence's token mean         |
//! | `bnpo`      | `Σ l·m / max(Σ m, 1)`                         | `1`      | mean over micro-batches of each micro-batch's token mean      |
//! | `dr_grpo`   | `Σ l·m / max_completion_length`               | `B`      | `Σ l·m / (num sequences · max_completion_length)`             |
//! | `dapo`, `cispo` | `Σ l·m`                                   | `Σ m`    | mean over all tokens of the step (TRL's `num_items_in_batch`) |
//! | `sapo`      | as `grpo`                                     | `B`      | as `grpo` (TRL aggregates `sapo` like `grpo`)                 |
//!
//! `bnpo` matches TRL under gradient accumulation, where each micro-batch's token mean is
//! divided by the number of accumulation steps. A fully masked sequence adds 0 to
//! `loss_sum` but still counts as a sequence for `grpo` and `dr_grpo` (as TRL's `.mean()`).
//!
//! Values at masked positions are ignored entirely (they may be padding garbage, `-inf`
//! or NaN): every input is replaced by 0 there before any arithmetic, so neither the loss
//! nor the gradient (exactly 0 at masked positions) can see them.
//!
//! Statistics ([`LossStats`]) are sums over the counted tokens, so micro-batches and
//! ranks combine by addition; they cost one device-to-host copy per call.

use tch::{Device, Kind, Tensor};

pub mod correction;

pub use correction::{correction_weights, IsCorrection, IsCorrectionMode};

/// Whether the importance ratio is per token (GRPO) or one length-normalised ratio per
/// sequence (GSPO), TRL's `importance_sampling_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    #[default]
    Token,
    Sequence,
}

/// How the per-token losses are aggregated (TRL's `loss_type`; see the module docs for
/// the exact denominators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Per-sequence token mean, then mean over sequences (the GRPO paper): long
    /// completions weigh less per token.
    Grpo,
    /// Token mean over the micro-batch ("batch-normalized").
    Bnpo,
    /// Token sum over a constant `B · max_completion_length` (Dr. GRPO): no length bias.
    DrGrpo,
    /// Token mean over the whole step across ranks and micro-batches (DAPO).
    #[default]
    Dapo,
    /// Clipped, detached IS weight times the log-prob (MiniMax-M1); aggregated as `dapo`.
    Cispo,
    /// Soft, temperature-controlled gate instead of clipping (SAPO); aggregated as `grpo`.
    Sapo,
}

impl LossType {
    pub fn name(self) -> &'static str {
        match self {
            LossType::Grpo => "grpo",
            LossType::Bnpo => "bnpo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Dapo => "dapo",
            LossType::Cispo => "cispo",
            LossType::Sapo => "sapo",
        }
    }

    fn is_clipped(self) -> bool {
        matches!(
            self,
            LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo
        )
    }
}

/// Why a policy loss could not be computed. `Config` names the setting; `Input` the
/// tensor (`logprobs`, `mask`, `advantages`, `old_logprobs`, `ref_logprobs`,
/// `sampler_logprobs`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    #[error("{field} {message}")]
    Config { field: String, message: String },
    #[error("{tensor} {message}")]
    Input { tensor: String, message: String },
    #[error("reading loss statistics: {0}")]
    Readback(String),
}

impl LossError {
    fn config(field: &str, message: String) -> Self {
        LossError::Config {
            field: field.into(),
            message,
        }
    }

    fn input(tensor: &str, message: String) -> Self {
        LossError::Input {
            tensor: tensor.into(),
            message,
        }
    }
}

/// The loss runs inside closures whose error type is `String` (the engine's).
impl From<LossError> for String {
    fn from(e: LossError) -> String {
        e.to_string()
    }
}

/// Hyper-parameters of the policy loss (names as in TRL's `GRPOConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    /// Lower clip range: the ratio is clamped from below at `1 − epsilon`.
    pub epsilon: f64,
    /// Upper clip range: the ratio is clamped from above at `1 + epsilon_high` (TRL sets it
    /// to `epsilon` unless given; DAPO's "clip-higher" uses a larger value).
    pub epsilon_high: f64,
    /// Weight of the k3 KL penalty against the reference model; 0 disables it.
    pub beta: f64,
    pub loss_type: LossType,
    /// The constant length denominator of `dr_grpo` (unused by the other types).
    pub max_completion_length: i64,
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Two-sided clipping: the unclipped ratio is capped at `delta` (clipped types only).
    pub delta: Option<f64>,
    /// SAPO's temperatures (TRL defaults 1.0 and 1.05).
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// The correction for the workers' log-probs ([`correction`]); `None` = off.
    pub correction: Option<IsCorrection>,
}

impl Default for PolicyLossConfig {
    /// TRL's `GRPOConfig` defaults (`dapo`, epsilon 0.2, no KL, correction off).
    fn default() -> Self {
        PolicyLossConfig {
            epsilon: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            loss_type: LossType::Dapo,
            max_completion_length: 256,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            correction: None,
        }
    }
}

impl PolicyLossConfig {
    /// Checks the ranges; errors name the field and the allowed values.
    pub fn validate(&self) -> Result<(), LossError> {
        let nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(LossError::config(
                    name,
                    format!("must be finite and >= 0, got {v}"),
                ))
            }
        };
        nonneg("epsilon", self.epsilon)?;
        nonneg("epsilon_high", self.epsilon_high)?;
        nonneg("beta", self.beta)?;
        if self.loss_type == LossType::DrGrpo && self.max_completion_length < 1 {
            return Err(LossError::config(
                "max_completion_length",
                format!(
                    "must be >= 1 for loss_type dr_grpo, got {}",
                    self.max_completion_length
                ),
            ));
        }
        if let Some(c) = self.correction {
            if !(c.cap.is_finite() && c.cap > 0.0) {
                return Err(LossError::config(
                    "vllm_importance_sampling_cap",
                    format!("must be finite and > 0, got {}", c.cap),
                ));
            }
        }
        if let Some(d) = self.delta {
            if !(d.is_finite() && d > 0.0) {
                return Err(LossError::config(
                    "delta",
                    format!("must be finite and > 0, got {d}"),
                ));
            }
        }
        for (name, t) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return Err(LossError::config(
                    name,
                    format!("must be finite and > 0, got {t}"),
                ));
            }
        }
        Ok(())
    }
}

/// One micro-batch of per-token log-probabilities, all `[B, T]` on one device.
pub struct PolicyBatch<'a> {
    /// `[B, T]` float: the current policy's log-probs of the completion tokens, with
    /// autograd history (the only input gradients flow to).
    pub logprobs: &'a Tensor,
    /// `[B, T]`: log-probs of the policy that generated the batch, computed by the trainer.
    /// `None` means `logprobs.detach()` (a single update per generation batch).
    pub old_logprobs: Option<&'a Tensor>,
    /// `[B, T]`: the reference model's log-probs; required when `beta > 0`, otherwise
    /// optional and used only for the KL statistic.
    pub ref_logprobs: Option<&'a Tensor>,
    /// `[B, T]`: the rollout workers' log-probs; required when the correction is on,
    /// ignored otherwise.
    pub sampler_logprobs: Option<&'a Tensor>,
    /// `[B]` float: one advantage per sequence.
    pub advantages: &'a Tensor,
    /// `[B, T]`: 1 for completion tokens that count, 0 for the rest (float, integer or bool).
    pub mask: &'a Tensor,
}

/// Statistics of one micro-batch, each a sum over the counted (mask = 1) tokens so that
/// micro-batches and ranks add up; divide by `tokens` for TRL's means.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossStats {
    /// Number of counted tokens, `Σ m`.
    pub tokens: f64,
    /// `Σ k3(ref, logp)`; 0 when no reference log-probs were given.
    pub kl_sum: f64,
    /// Tokens with `ratio < 1 − epsilon` and `A < 0` (TRL's `clip_ratio/low_*`; 0 for
    /// `cispo` and `sapo`). At the sequence level each token counts its sequence's ratio.
    pub low_clipped: f64,
    /// Tokens with `ratio > 1 + epsilon_high` and `A > 0` (TRL's `clip_ratio/high_*`);
    /// for `cispo`, `ratio > epsilon_high` and `A > 0` (TRL's `cispo_clip_ratio`).
    pub high_clipped: f64,
    /// Tokens clipped on either side (TRL's `clip_ratio/region_mean`).
    pub region_clipped: f64,
    /// `Σ w` over counted tokens of the correction weights (a sequence weight counts once
    /// per token); 0 when the correction is off.
    pub tis_ratio_sum: f64,
}

impl LossStats {
    /// The fields in declaration order, e.g. for one all-reduce across ranks.
    pub fn to_array(&self) -> [f64; 6] {
        [
            self.tokens,
            self.kl_sum,
            self.low_clipped,
            self.high_clipped,
            self.region_clipped,
            self.tis_ratio_sum,
        ]
    }

    /// Inverse of [`LossStats::to_array`].
    pub fn from_array(a: [f64; 6]) -> Self {
        let [tokens, kl_sum, low_clipped, high_clipped, region_clipped, tis_ratio_sum] = a;
        LossStats {
            tokens,
            kl_sum,
            low_clipped,
            high_clipped,
            region_clipped,
            tis_ratio_sum,
        }
    }
}

impl std::ops::AddAssign for LossStats {
    fn add_assign(&mut self, o: Self) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(o.to_array()) {
            *x += y;
        }
        *self = LossStats::from_array(a);
    }
}

/// The loss of one micro-batch in the engine's `(sum, count)` form.
#[derive(Debug)]
pub struct PolicyLoss {
    /// Scalar with autograd history to `logprobs`; see the module docs' table.
    pub loss_sum: Tensor,
    /// The micro-batch's share of the global denominator.
    pub count: i64,
    pub stats: LossStats,
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Checks that `t` has `shape`, a floating kind (or any real kind if `any_kind`), and
/// lives on `device`.
fn check(
    name: &str,
    t: &Tensor,
    shape: &[i64],
    device: Device,
    any_kind: bool,
) -> Result<(), LossError> {
    if t.size() != shape {
        return Err(LossError::input(
            name,
            format!("has shape {:?}, expected {shape:?}", t.size()),
        ));
    }
    let k = t.kind();
    let kind_ok = is_float(k)
        || (any_kind
            && matches!(
                k,
                Kind::Bool | Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
            ));
    if !kind_ok {
        return Err(LossError::input(
            name,
            format!("has kind {k:?}, expected a floating-point kind"),
        ));
    }
    if t.device() != device {
        return Err(LossError::input(
            name,
            format!("is on {:?} but logprobs is on {device:?}", t.device()),
        ));
    }
    Ok(())
}

/// The clipped policy loss of one micro-batch; see the module docs for the formula and
/// the `(loss_sum, count)` convention.
///
/// Computes in f64 if `logprobs` is f64, else in f32 (half-precision inputs are upcast).
/// Errors on bad shapes, kinds or devices (naming the tensor), an invalid config, a
/// missing reference (`beta > 0`) or sampler (correction on), a mask value other than
/// 0/1, or a non-finite input at a counted position.
pub fn policy_loss(batch: &PolicyBatch, cfg: &PolicyLossConfig) -> Result<PolicyLoss, LossError> {
    cfg.validate()?;
    let lp = batch.logprobs;
    let shape = lp.size();
    if shape.len() != 2 {
        return Err(LossError::input(
            "logprobs",
            format!("must be [B, T], got shape {shape:?}"),
        ));
    }
    let dev = lp.device();
    check("logprobs", lp, &shape, dev, false)?;
    check("mask", batch.mask, &shape, dev, true)?;
    check("advantages", batch.advantages, &shape[..1], dev, false)?;
    // The sampler's log-probs are only looked at (and checked) when the correction is on.
    let sampler = batch.sampler_logprobs.filter(|_| cfg.correction.is_some());
    let opt = [
        ("old_logprobs", batch.old_logprobs),
        ("ref_logprobs", batch.ref_logprobs),
        ("sampler_logprobs", sampler),
    ];
    for (name, t) in opt {
        if let Some(t) = t {
            check(name, t, &shape, dev, false)?;
        }
    }
    if cfg.beta > 0.0 && batch.ref_logprobs.is_none() {
        return Err(LossError::input(
            "ref_logprobs",
            format!("is None, but beta = {} > 0 needs ref_logprobs", cfg.beta),
        ));
    }
    if cfg.correction.is_some() && sampler.is_none() {
        return Err(LossError::input(
            "sampler_logprobs",
            "is None, but the importance-sampling correction is on, which needs sampler_logprobs"
                .into(),
        ));
    }

    let ck = if lp.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let m = batch.mask.to_kind(ck);
    let keep = m.ne(0.0);
    // Zero out masked positions before any arithmetic: garbage there can be ±inf/NaN, and
    // `0 · inf` would leak NaN into the sum and the backward pass.
    let clean = |t: &Tensor| t.to_kind(ck).where_scalarother(&keep, 0.0);
    let logp = clean(lp);
    let old = match batch.old_logprobs {
        Some(o) => clean(&o.detach()),
        None => logp.detach(),
    };
    // Likewise for the advantage of a sequence with no counted token.
    let any_token = keep.any_dim(1, false);
    let adv = batch
        .advantages
        .to_kind(ck)
        .where_scalarother(&any_token, 0.0)
        .unsqueeze(1);
    let log_ratio = &logp - &old;
    let log_w = match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => {
            (log_ratio * &m).sum_dim_intlist(1, true, ck)
                / m.sum_dim_intlist(1, true, ck).clamp_min(1.0)
        }
    };
    // [B, T] or [B, 1] (sequence level); everything below broadcasts against [B, T].
    let ratio = log_w.exp();
    let lo = 1.0 - cfg.epsilon;
    let hi = 1.0 + cfg.epsilon_high;
    let policy_term = match cfg.loss_type {
        LossType::Cispo => -(ratio.clamp_max(cfg.epsilon_high).detach() * &adv * &logp),
        LossType::Sapo => {
            let pos = adv.gt(0.0);
            let tau = Tensor::full([1], cfg.sapo_temperature_pos, (ck, dev)).where_self(
                &pos,
                &Tensor::full([1], cfg.sapo_temperature_neg, (ck, dev)),
            );
            let gate = ((&ratio - 1.0) * &tau).sigmoid() * 4.0 / &tau;
            -(gate * &adv)
        }
        _ => {
            let clipped = ratio.clamp(lo, hi) * &adv;
            let capped = match cfg.delta {
                Some(d) => ratio.clamp_max(d),
                None => ratio.shallow_clone(),
            };
            -(capped * &adv).minimum(&clipped)
        }
    };
    let tis = match (cfg.correction, sampler) {
        (Some(c), Some(s)) => Some(correction_weights(&old, &clean(&s.detach()), &m, c)),
        _ => None,
    };
    let weighted = match &tis {
        Some(w) => policy_term * w,
        None => policy_term,
    };
    let kl = batch.ref_logprobs.map(|r| {
        let d = clean(&r.detach()) - &logp;
        d.exp() - &d - 1.0
    });
    let per_token = match &kl {
        Some(kl) if cfg.beta > 0.0 => weighted + kl * cfg.beta,
        _ => weighted,
    };
    let masked = per_token * &m;

    // One host sync for the statistics, the count and the input checks.
    let stats_t = tch::no_grad(|| {
        let mut v = Vec::with_capacity(11);
        let sum = |t: &Tensor| (t * &m).sum(Kind::Double);
        v.push(m.sum(Kind::Double));
        v.push(
            kl.as_ref()
                .map_or_else(|| m.zeros_like().sum(Kind::Double), sum),
        );
        let (low, high) = match cfg.loss_type {
            t if t.is_clipped() => (
                ratio.lt(lo).logical_and(&adv.lt(0.0)),
                ratio.gt(hi).logical_and(&adv.gt(0.0)),
            ),
            LossType::Cispo => (
                ratio.zeros_like().to_kind(Kind::Bool),
                ratio.gt(cfg.epsilon_high).logical_and(&adv.gt(0.0)),
            ),
            _ => {
                let none = ratio.zeros_like().to_kind(Kind::Bool);
                (none.shallow_clone(), none)
            }
        };
        v.push(sum(&low.to_kind(ck)));
        v.push(sum(&high.to_kind(ck)));
        v.push(sum(&low.logical_or(&high).to_kind(ck)));
        v.push(
            tis.as_ref()
                .map_or_else(|| m.zeros_like().sum(Kind::Double), sum),
        );
        // Checks: mask values other than 0/1, then non-finite inputs where they count.
        v.push(m.ne(0.0).logical_and(&m.ne(1.0)).sum(Kind::Double));
        let bad = |t: &Tensor| {
            t.isfinite()
                .logical_not()
                .logical_and(&keep)
                .sum(Kind::Double)
        };
        v.push(bad(lp));
        v.push(
            batch
                .advantages
                .isfinite()
                .logical_not()
                .logical_and(&any_token)
                .sum(Kind::Double),
        );
        for (_, t) in opt {
            v.push(t.map_or_else(|| m.zeros_like().sum(Kind::Double), bad));
        }
        Tensor::stack(&v, 0).to_device(Device::Cpu)
    });
    let s = Vec::<f64>::try_from(&stats_t).map_err(|e| LossError::Readback(e.to_string()))?;
    if s[6] > 0.0 {
        return Err(LossError::input(
            "mask",
            format!("has {} values other than 0 and 1", s[6] as i64),
        ));
    }
    let names = [
        "logprobs",
        "advantages",
        "old_logprobs",
        "ref_logprobs",
        "sampler_logprobs",
    ];
    for (name, n) in names.iter().zip(&s[7..]) {
        if *n > 0.0 {
            return Err(LossError::input(
                name,
                format!(
                    "has {} non-finite values at counted (mask = 1) positions",
                    *n as i64
                ),
            ));
        }
    }
    let stats = LossStats::from_array([s[0], s[1], s[2], s[3], s[4], s[5]]);

    let b = shape[0];
    let (loss_sum, count) = match cfg.loss_type {
        LossType::Grpo | LossType::Sapo => {
            let per_seq = masked.sum_dim_intlist(1, false, ck)
                / m.sum_dim_intlist(1, false, ck).clamp_min(1.0);
            (per_seq.sum(ck), b)
        }
        LossType::Bnpo => (masked.sum(ck) / m.sum(ck).clamp_min(1.0), 1),
        LossType::DrGrpo => (masked.sum(ck) / cfg.max_completion_length as f64, b),
        LossType::Dapo | LossType::Cispo => (masked.sum(ck), stats.tokens.round() as i64),
    };
    Ok(PolicyLoss {
        loss_sum,
        count,
        stats,
    })
}

#[cfg(test)]
mod tests;
