//! Offline batch generation: left-padded prefill, then cached decode steps until every
//! sequence stops. This is the loop the `generate` command runs; the gRPC engine with
//! continuous batching builds on the same model calls.
//!
//! Log-probs returned are the policy's: `log_softmax(logits / temperature)` of the
//! sampled token, before top-k/top-p/min-p truncation (temperature 1 when greedy), which
//! is what the trainer recomputes (TRL's convention).
use model::{sample, ForwardInput, KvCache, SamplingParams, SeqRng, Transformer};
use tch::{Kind, Tensor};

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled (it is included in the tokens).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<i64>,
    /// Sequence `i` uses seed `seed + i`; `None` draws from OS entropy.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Generates one completion per prompt.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> anyhow::Result<Vec<Completion>> {
    opts.sampling.validate()?;
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "empty prompt");
    let device = model.device();
    let b = prompts.len();
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i64; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, p) in prompts.iter().enumerate() {
        let off = i * t + (t - p.len());
        ids[off..off + p.len()].copy_from_slice(p);
        mask[off..off + p.len()].fill(1);
    }
    let shape = [b as i64, t as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mask = Tensor::from_slice(&mask).view(shape).to_device(device);

    let mut rngs: Vec<SeqRng> = (0..b)
        .map(|i| match opts.seed {
            Some(s) => SeqRng::seeded(s.wrapping_add(i as u64)),
            None => SeqRng::from_entropy(),
        })
        .collect();
    let params = vec![opts.sampling; b];
    let temperature = if opts.sampling.is_greedy() {
        1.0
    } else {
        opts.sampling.temperature
    };
    let mut out: Vec<Option<Completion>> = vec![None; b];
    let mut tokens: Vec<Vec<i64>> = vec![vec![]; b];
    let mut logprobs: Vec<Vec<f32>> = vec![vec![]; b];

    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut logits = model
        .forward(&ForwardInput::new(&ids).with_mask(&mask), Some(&mut cache))?
        .select(1, -1);
    for step in 0..opts.max_new_tokens {
        let logits32 = logits.to_kind(Kind::Float);
        // Log-probs before sampling, from a tensor `sample` never sees (it may scale its
        // fp32 input in place).
        let logp_all = (&logits32 / temperature).log_softmax(-1, Kind::Float);
        let next = sample(&logits32, &params, &mut rngs)?;
        let next_t = Tensor::from_slice(&next).to_device(device);
        let lp = logp_all
            .gather(-1, &next_t.unsqueeze(-1), false)
            .squeeze_dim(-1);
        let lp = Vec::<f32>::try_from(lp.to_device(tch::Device::Cpu))?;
        for i in 0..b {
            if out[i].is_some() {
                continue;
            }
            tokens[i].push(next[i]);
            logprobs[i].push(lp[i]);
            let stopped = opts.stop_token_ids.contains(&next[i]);
            if stopped || step + 1 == opts.max_new_tokens {
                out[i] = Some(Completion {
                    tokens: std::mem::take(&mut tokens[i]),
                    logprobs: std::mem::take(&mut logprobs[i]),
                    finish_reason: if stopped {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                });
            }
        }
        if out.iter().all(Option::is_some) {
            break;
        }
        // Finished rows keep decoding their last token; their outputs are ignored.
        logits = model
            .forward(&ForwardInput::new(&next_t.unsqueeze(1)), Some(&mut cache))?
            .select(1, -1);
    }
    Ok(out
        .into_iter()
        .map(|c| {
            c.unwrap_or(Completion {
                tokens: vec![],
                logprobs: vec![],
                finish_reason: FinishReason::Length,
            })
        })
        .collect())
}
