//! Token sampling for the rollout worker: temperature, top-k, top-p, min-p, applied in
//! transformers' order (temperature -> top-k -> top-p -> min-p), then one draw per row
//! from a per-sequence seeded RNG, so a request with a seed is reproducible whatever
//! else shares its batch.
//!
//! Filtering runs on the logits' device; only one uniform number per row crosses from
//! the host, and the sampled ids come back (one host sync per step).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// Sampling parameters of one sequence (OpenAI / vLLM semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: i64,
    /// Keep the smallest set of most likely tokens whose mass reaches top_p; 1 disables.
    pub top_p: f64,
    /// Drop tokens whose probability is below min_p times the top probability; 0 disables.
    pub min_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the ranges; the message names the field and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if self.top_k < 0 {
            return bad(format!(
                "top_k must be >= 0 (0 disables), got {}",
                self.top_k
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }
}

/// A sequence's random stream: ChaCha20 seeded by the request (or by entropy).
#[derive(Debug, Clone)]
pub struct SeqRng(ChaCha20Rng);

impl SeqRng {
    pub fn seeded(seed: u64) -> Self {
        SeqRng(ChaCha20Rng::seed_from_u64(seed))
    }

    pub fn from_entropy() -> Self {
        SeqRng(ChaCha20Rng::from_os_rng())
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// Applies temperature, top-k, top-p and min-p to one row's logits `[V]` (fp32) and
/// returns the filtered logits: removed tokens are `-inf`, so `softmax` of the result
/// is the sampling distribution.
pub fn filter_logits(logits: &Tensor, p: &SamplingParams) -> Tensor {
    let mut x = logits.to_kind(Kind::Float);
    if p.temperature > 0.0 && p.temperature != 1.0 {
        // Not `/=`: `to_kind` returns the caller's tensor when it is already fp32.
        x = &x / p.temperature;
    }
    let v = x.size()[x.dim() - 1];
    if p.top_k > 0 && p.top_k < v {
        let (kth, _) = x.topk(p.top_k, -1, true, true);
        let threshold = kth.narrow(-1, p.top_k - 1, 1);
        x = x.masked_fill(&x.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if p.top_p < 1.0 {
        // transformers' TopPLogitsWarper: sort ascending, drop the prefix whose
        // cumulative mass is <= 1 - top_p, always keeping the most likely token.
        let (sorted, idx) = x.sort(-1, false);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove_sorted = cum.le(1.0 - p.top_p);
        let last = remove_sorted.size()[remove_sorted.dim() - 1] - 1;
        let _ = remove_sorted.narrow(-1, last, 1).fill_(0);
        let remove = remove_sorted.scatter(-1, &idx, &remove_sorted);
        x = x.masked_fill(&remove, f64::NEG_INFINITY);
    }
    if p.min_p > 0.0 {
        let probs = x.softmax(-1, Kind::Float);
        let top = probs.amax(&[-1i64][..], true);
        x = x.masked_fill(&probs.lt_tensor(&(top * p.min_p)), f64::NEG_INFINITY);
    }
    x
}

/// Samples one token per row of `logits` `[B, V]`, row `i` with `params[i]` and
/// `rngs[i]`. Greedy rows take the argmax (ties to the lowest id) and draw nothing.
pub fn sample(logits: &Tensor, params: &[SamplingParams], rngs: &mut [SeqRng]) -> Result<Vec<i64>> {
    let ids = sample_on_device(&logits.to_kind(Kind::Float), params, rngs)?;
    Ok(Vec::<i64>::try_from(ids.to_device(tch::Device::Cpu))?)
}

/// [`sample`] without the transfer: the sampled ids as an `[B]` i64 tensor on the
/// logits' device, so a caller can bring them back together with other results
/// (the rollout engine's one device-to-host copy per step). `logits` `[B, V]` f32.
pub fn sample_on_device(
    logits: &Tensor,
    params: &[SamplingParams],
    rngs: &mut [SeqRng],
) -> Result<Tensor> {
    let size = logits.size();
    if size.len() != 2 || size[0] as usize != params.len() || params.len() != rngs.len() {
        return Err(ModelError::Input(format!(
            "sample: logits {size:?} with {} params and {} rngs",
            params.len(),
            rngs.len()
        )));
    }
    let device = logits.device();
    let mut ids = logits.f_argmax(-1, false)?;
    // Rows with the same settings (the usual case: one request's group) are filtered
    // and sampled as one batch; each row still draws from its own stream, in row order.
    let mut groups: Vec<(SamplingParams, Vec<i64>)> = vec![];
    for (i, p) in params.iter().enumerate() {
        if p.is_greedy() {
            continue;
        }
        match groups.iter_mut().find(|(q, _)| q == p) {
            Some((_, rows)) => rows.push(i as i64),
            None => groups.push((*p, vec![i as i64])),
        }
    }
    let mut uniforms = vec![0f64; params.len()];
    for (i, p) in params.iter().enumerate() {
        if !p.is_greedy() {
            uniforms[i] = rngs[i].uniform();
        }
    }
    for (p, rows) in groups {
        let index = Tensor::from_slice(&rows).to_device(device);
        let probs = filter_logits(&logits.f_index_select(0, &index)?, &p).softmax(-1, Kind::Float);
        let cdf = probs.cumsum(-1, Kind::Float);
        let total = cdf.select(1, -1);
        let u: Vec<f64> = rows.iter().map(|&r| uniforms[r as usize]).collect();
        let u = (Tensor::from_slice(&u)
            .to_device(device)
            .to_kind(Kind::Float)
            * total)
            .unsqueeze(1);
        // First index whose cumulative mass exceeds u; zero-probability tokens have
        // cdf equal to their predecessor's and can never be chosen.
        let picked = u
            .f_searchsorted(&cdf, false, true, "right", None::<Tensor>)?
            .squeeze_dim(1)
            .clamp_max(size[1] - 1);
        ids = ids.f_index_copy(0, &index, &picked)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let x = filter_logits(&Tensor::from_slice(logits), p).softmax(-1, Kind::Float);
        Vec::<f64>::try_from(x.to_kind(Kind::Double)).unwrap()
    }

    #[test]
    fn top_k_keeps_k_most_likely() {
        let p = SamplingParams {
            top_k: 2,
            ..Default::default()
        };
        let pr = probs(&[1.0, 3.0, 2.0, 0.0], &p);
        assert_eq!(pr[0], 0.0);
        assert_eq!(pr[3], 0.0);
        let e = (1.0f64).exp();
        assert!((pr[1] - e / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_mass() {
        // probabilities 0.5, 0.3, 0.2 (ln-space logits)
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let pr = probs(
            &l,
            &SamplingParams {
                top_p: 0.75,
                ..Default::default()
            },
        );
        assert!((pr[0] - 0.5 / 0.8).abs() < 1e-6 && pr[2] == 0.0, "{pr:?}");
        let pr = probs(
            &l,
            &SamplingParams {
                top_p: 0.1,
                ..Default::default()
            },
        );
        assert_eq!(pr, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let l = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let pr = probs(
            &l,
            &SamplingParams {
                min_p: 0.25,
                ..Default::default()
            },
        );
        assert!(pr[2] == 0.0 && pr[1] > 0.0, "{pr:?}");
    }

    #[test]
    fn temperature_sharpens() {
        let l = [1.0f32, 0.0];
        let pr = probs(
            &l,
            &SamplingParams {
                temperature: 0.5,
                ..Default::default()
            },
        );
        let e2 = (2.0f64).exp();
        assert!((pr[0] - e2 / (e2 + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_matches_distribution() {
        let logits = Tensor::from_slice(&[0.2f32.ln(), 0.5f32.ln(), 0.3f32.ln()]).view([1, 3]);
        let p = [SamplingParams::default()];
        let draw = |seed| {
            let mut rng = [SeqRng::seeded(seed)];
            (0..3000)
                .map(|_| sample(&logits, &p, &mut rng).unwrap()[0])
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let freq = |k| a.iter().filter(|&&x| x == k).count() as f64 / a.len() as f64;
        // 3000 draws: the standard error of each frequency is below 0.01.
        assert!(
            (freq(0) - 0.2).abs() < 0.04 && (freq(1) - 0.5).abs() < 0.04,
            "{}",
            freq(1)
        );
    }

    #[test]
    fn greedy_takes_argmax_and_validation_names_fields() {
        let logits = Tensor::from_slice(&[0.0f32, 2.0, 1.0, 5.0, 0.0, 0.0]).view([2, 3]);
        let p = [SamplingParams::greedy(), SamplingParams::greedy()];
        let mut rngs = [SeqRng::seeded(0), SeqRng::seeded(0)];
        assert_eq!(sample(&logits, &p, &mut rngs).unwrap(), vec![1, 0]);
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
