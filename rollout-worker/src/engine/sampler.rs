//! Sampling of one engine step on the logits' device, with one device-to-host transfer:
//! the sampled ids, their log-probs and the top alternatives come back together.
//!
//! The draws are [`model::sampling::sample_on_device`]'s, the one implementation
//! [`model::sample`] also uses, so seeded outputs do not depend on the path.
//! Log-probs are `log_softmax(logits / T)` before truncation (T = 1 when greedy).
use model::{SamplingParams, SeqRng};
use tch::{Device, Kind, Tensor};

use crate::error::EngineError;

/// What one step sampled, per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    /// `k` alternatives per row (`k` = the largest `top_logprobs` asked), or none.
    pub top: Option<(usize, Vec<(i64, f32)>)>,
}

/// Samples row `i` of `logits` `[R, V]` with `params[i]` and `rngs[i]`; `temps[i]` is
/// the log-prob temperature, `top_k` the alternatives to report.
pub fn sample_step(
    logits: &Tensor,
    params: &[SamplingParams],
    rngs: &mut [SeqRng],
    temps: &[f32],
    top_k: usize,
) -> Result<Sampled, EngineError> {
    let r = params.len();
    let size = logits.size();
    if size.len() != 2 || size[0] as usize != r || rngs.len() != r || temps.len() != r {
        return Err(EngineError::Internal(format!(
            "sample_step: logits {size:?} for {r} rows"
        )));
    }
    let logits = logits.to_kind(Kind::Float);
    let device = logits.device();
    let v = size[1];
    let ids = model::sampling::sample_on_device(&logits, params, rngs)?;
    let temps_t = Tensor::from_slice(temps).to_device(device).view([-1, 1]);
    let logp = (&logits / temps_t).f_log_softmax(-1, Kind::Float)?;
    let lp = logp.f_gather(-1, &ids.unsqueeze(1), false)?.view([-1]);
    let mut parts = vec![ids.to_kind(Kind::Double), lp.to_kind(Kind::Double)];
    let k = top_k.min(v as usize);
    if k > 0 {
        let (tv, ti) = logp.f_topk(k as i64, -1, true, true)?;
        parts.push(tv.reshape([-1]).to_kind(Kind::Double));
        parts.push(ti.reshape([-1]).to_kind(Kind::Double));
    }
    // The one transfer of the step.
    let host = Vec::<f64>::try_from(Tensor::f_cat(&parts, 0)?.to_device(Device::Cpu))?;
    let ids: Vec<i64> = host[..r].iter().map(|&x| x as i64).collect();
    let logprobs: Vec<f32> = host[r..2 * r].iter().map(|&x| x as f32).collect();
    let top = (k > 0).then(|| {
        let (tv, ti) = host[2 * r..].split_at(r * k);
        (
            k,
            ti.iter()
                .zip(tv)
                .map(|(&i, &v)| (i as i64, v as f32))
                .collect(),
        )
    });
    Ok(Sampled { ids, logprobs, top })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_equal_model_sample_and_logprobs_are_untruncated() {
        let logits = Tensor::randn([5, 40], (Kind::Float, Device::Cpu));
        let mut params = vec![SamplingParams::default(); 5];
        params[1] = SamplingParams::greedy();
        params[3].top_k = 5;
        params[4].top_p = 0.8;
        params[4].temperature = 0.7;
        let mut a: Vec<SeqRng> = (0..5).map(SeqRng::seeded).collect();
        let mut b = a.clone();
        let reference = model::sample(&logits, &params, &mut a).unwrap();
        let temps: Vec<f32> = params
            .iter()
            .map(|p| {
                if p.is_greedy() {
                    1.0
                } else {
                    p.temperature as f32
                }
            })
            .collect();
        let s = sample_step(&logits, &params, &mut b, &temps, 3).unwrap();
        assert_eq!(s.ids, reference);
        for (i, (&id, &lp)) in s.ids.iter().zip(&s.logprobs).enumerate() {
            let row = (logits.get(i as i64) / temps[i] as f64).log_softmax(-1, Kind::Float);
            let want = row.double_value(&[id]) as f32;
            assert!((lp - want).abs() < 1e-6, "row {i}: {lp} vs {want}");
        }
        let (k, top) = s.top.unwrap();
        assert_eq!((k, top.len()), (3, 15));
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
    }
}
