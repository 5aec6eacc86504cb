//! Packing of completions into training micro-batches (pure tensor layout, no model).
//!
//! Each sample is a prompt followed by its completion, right-padded to the longest in
//! the micro-batch. Right padding needs no attention mask under causal attention (real
//! tokens never attend to the padding after them), so the model runs its mask-free path.
//! Every per-token tensor uses the *shifted* layout `[B, L - 1]`: position `t` holds the
//! log-prob of token `t + 1` (the logits at `t` predict the next token), so a completion
//! of length `c` after a prompt of length `p` occupies positions `p - 1 .. p - 1 + c`.
use tch::{Kind, Tensor};

/// One completion to train on.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt_ids: Vec<i64>,
    pub completion_ids: Vec<i64>,
    /// The rollout worker's log-prob of each completion token (same length).
    pub sampler_logprobs: Vec<f32>,
    pub advantage: f32,
    /// Whether the completion's tokens count in the loss (false for excluded groups and,
    /// under `mask_truncated_completions`, for truncated completions).
    pub in_loss: bool,
}

/// A micro-batch in the shifted layout.
#[derive(Debug)]
pub struct PackedBatch {
    /// `[B, L]` i64, right-padded with `pad_id`.
    pub input_ids: Tensor,
    /// `[B, L - 1]` i64: `input_ids[:, 1:]`.
    pub targets: Tensor,
    /// `[B, L - 1]` f32: 1 on completion tokens that count in the loss.
    pub loss_mask: Tensor,
    /// `[B, L - 1]` f32: 1 on every completion token (for statistics such as entropy).
    pub completion_mask: Tensor,
    /// `[B, L - 1]` f32: the workers' log-probs on completion tokens, 0 elsewhere.
    pub sampler_logprobs: Tensor,
    /// `[B]` f32.
    pub advantages: Tensor,
}

/// Packs `samples` (at least one, each with a non-empty prompt and completion and
/// matching log-prob count) into one micro-batch.
pub fn pack(samples: &[Sample], pad_id: i64) -> Result<PackedBatch, String> {
    if samples.is_empty() {
        return Err("cannot pack an empty micro-batch".into());
    }
    let mut len = 0;
    for (i, s) in samples.iter().enumerate() {
        if s.prompt_ids.is_empty() || s.completion_ids.is_empty() {
            return Err(format!("sample {i}: empty prompt or completion"));
        }
        if s.sampler_logprobs.len() != s.completion_ids.len() {
            return Err(format!(
                "sample {i}: {} log-probs for {} completion tokens",
                s.sampler_logprobs.len(),
                s.completion_ids.len()
            ));
        }
        len = len.max(s.prompt_ids.len() + s.completion_ids.len());
    }
    let b = samples.len();
    let mut ids = vec![pad_id; b * len];
    let shifted = len - 1;
    let mut loss_mask = vec![0f32; b * shifted];
    let mut completion_mask = vec![0f32; b * shifted];
    let mut sampler = vec![0f32; b * shifted];
    for (row, s) in samples.iter().enumerate() {
        let (p, c) = (s.prompt_ids.len(), s.completion_ids.len());
        let base = row * len;
        ids[base..base + p].copy_from_slice(&s.prompt_ids);
        ids[base + p..base + p + c].copy_from_slice(&s.completion_ids);
        let sbase = row * shifted + p - 1;
        completion_mask[sbase..sbase + c].fill(1.0);
        if s.in_loss {
            loss_mask[sbase..sbase + c].fill(1.0);
        }
        sampler[sbase..sbase + c].copy_from_slice(&s.sampler_logprobs);
    }
    let (b, l, sh) = (b as i64, len as i64, shifted as i64);
    let input_ids = Tensor::from_slice(&ids).view([b, l]);
    Ok(PackedBatch {
        targets: input_ids.narrow(1, 1, sh),
        input_ids,
        loss_mask: Tensor::from_slice(&loss_mask).view([b, sh]),
        completion_mask: Tensor::from_slice(&completion_mask).view([b, sh]),
        sampler_logprobs: Tensor::from_slice(&sampler).view([b, sh]),
        advantages: Tensor::from_slice(&samples.iter().map(|s| s.advantage).collect::<Vec<_>>())
            .to_kind(Kind::Float),
    })
}

/// Splits `n` items into `parts` contiguous chunks whose sizes differ by at most one
/// (the first `n % parts` chunks are one longer). Empty chunks when `n < parts`.
pub fn split_even(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = q + usize::from(i < r);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p: &[i64], c: &[i64], adv: f32, in_loss: bool) -> Sample {
        Sample {
            prompt_ids: p.to_vec(),
            completion_ids: c.to_vec(),
            sampler_logprobs: c.iter().map(|&t| -(t as f32) / 10.0).collect(),
            advantage: adv,
            in_loss,
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        let s = t.size();
        (0..s[0])
            .map(|r| {
                (0..s[1])
                    .map(|c| t.double_value(&[r, c]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn completions_land_in_the_shifted_layout() {
        let b = pack(
            &[
                sample(&[1, 2, 3], &[7, 8], 0.5, true),
                sample(&[4], &[9, 10, 11, 12], -1.0, false),
            ],
            0,
        )
        .unwrap();
        assert_eq!(b.input_ids.size(), [2, 5]);
        assert_eq!(
            rows(&b.input_ids),
            [[1., 2., 3., 7., 8.], [4., 9., 10., 11., 12.]]
        );
        assert_eq!(rows(&b.targets), [[2., 3., 7., 8.], [9., 10., 11., 12.]]);
        // Row 0: prompt 3 -> completion at shifted positions 2, 3.
        assert_eq!(
            rows(&b.completion_mask),
            [[0., 0., 1., 1.], [1., 1., 1., 1.]]
        );
        assert_eq!(rows(&b.loss_mask), [[0., 0., 1., 1.], [0., 0., 0., 0.]]);
        let s = rows(&b.sampler_logprobs);
        assert!((s[0][2] + 0.7).abs() < 1e-6 && (s[0][3] + 0.8).abs() < 1e-6);
        assert!((s[1][0] + 0.9).abs() < 1e-6 && s[0][0] == 0.0);
        assert_eq!(Vec::<f32>::try_from(&b.advantages).unwrap(), [0.5, -1.0]);
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(pack(&[], 0).is_err());
        assert!(pack(&[sample(&[], &[1], 0.0, true)], 0).is_err());
        let mut s = sample(&[1], &[2, 3], 0.0, true);
        s.sampler_logprobs.pop();
        assert!(pack(&[s], 0).unwrap_err().contains("1 log-probs for 2"));
    }

    #[test]
    fn even_splits() {
        assert_eq!(split_even(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_even(2, 3), vec![0..1, 1..2, 2..2]);
        assert_eq!(split_even(6, 2), vec![0..3, 3..6]);
    }
}
