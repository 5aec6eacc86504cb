//! Shared-prefix packing ("Prefix Grouper"): each group's prompt is forwarded once and
//! its completions attend to it, instead of one `[prompt, completion]` row per sample.
//!
//! A packed row is `[prompt, c_1, ..., c_k]` with explicit positions (prompt `0..P`,
//! each completion `P..P + C_i`) and segments (0 = prompt, `i` = completion `i`, -1 =
//! right padding); [`model::ForwardInput::segment_ids`] turns them into the mask under
//! which every completion sees exactly its own unpacked context. The token that
//! predicts `c_i[0]` is the last prompt position (shared by the row's completions), the
//! one that predicts `c_i[t]` is `c_i[t - 1]`'s. A completion's last token predicts
//! nothing and, under that mask, no other token sees it, so the row leaves it out:
//! `c_i` contributes its first `C_i - 1` tokens ([`forwarded_len`]), and the outputs at
//! every other position are those of the full row. [`SharedPrefixBatch::predictors`]
//! lists them sample by sample, token by token — the order in which
//! [`model::Positions::new`] selects the completion tokens of the unpacked layout
//! ([`super::batch::pack`]), so the flat log-probs scatter back into that layout and
//! the loss sees the very same `[B, T]` tensors.
use model::Positions;
use tch::Tensor;

use super::batch::Sample;

/// The forward inputs of a shared-prefix micro-batch.
#[derive(Debug)]
pub struct SharedPrefixBatch {
    /// `[R, L]` i64, right-padded with `pad_id`.
    pub input_ids: Tensor,
    /// `[R, L]` i64.
    pub position_ids: Tensor,
    /// `[R, L]` i64: 0 prompt, `k >= 1` completion `k` of the row, -1 padding.
    pub segment_ids: Tensor,
    /// `N` flat indices into `[R, L]`: the position predicting each completion token.
    pub predictors: Positions,
    /// `[1, N]` i64: the completion tokens in the same order.
    pub targets: Tensor,
    /// Positions of `[R, L]` that are padding.
    pub padding: usize,
    /// Prompt tokens not forwarded thanks to sharing (`(k - 1) * P` per row).
    pub prompt_tokens_saved: usize,
}

/// Why samples could not be packed with shared prefixes.
#[derive(Debug, thiserror::Error)]
pub enum PrefixPackError {
    #[error("cannot pack an empty micro-batch")]
    Empty,
    #[error("sample {sample}: empty prompt or completion")]
    EmptySample { sample: usize },
    #[error("group {group} is empty")]
    EmptyGroup { group: usize },
    #[error("group {group}: sample {sample}'s prompt differs from the group's first")]
    PromptMismatch { group: usize, sample: usize },
    #[error("max_row_tokens must be positive")]
    ZeroBudget,
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// Tokens of a completion of `c` tokens that a shared-prefix row forwards: all but the
/// last, which predicts nothing and which no other token attends to.
pub fn forwarded_len(c: usize) -> usize {
    c.saturating_sub(1)
}

/// Packs `groups` (each: samples sharing one prompt, in the order the unpacked layout
/// lists them) into shared-prefix rows of at most `max_row_tokens` tokens: a group
/// whose `P + sum (C_i - 1)` exceeds it is split greedily into several rows, each with its
/// own copy of the prompt (a completion longer than the budget gets a row alone). The attention mask of a row is `L^2`, so the budget also bounds it.
pub fn pack_shared_prefix(
    groups: &[&[Sample]],
    pad_id: i64,
    max_row_tokens: usize,
) -> Result<SharedPrefixBatch, PrefixPackError> {
    if max_row_tokens == 0 {
        return Err(PrefixPackError::ZeroBudget);
    }
    if groups.is_empty() {
        return Err(PrefixPackError::Empty);
    }
    // Rows as (group, range of samples in the group).
    let mut rows: Vec<(usize, std::ops::Range<usize>)> = vec![];
    let mut sample = 0;
    for (g, group) in groups.iter().enumerate() {
        let Some(first) = group.first() else {
            return Err(PrefixPackError::EmptyGroup { group: g });
        };
        let p = first.prompt_ids.len();
        let mut start = 0;
        let mut len = p;
        for (i, s) in group.iter().enumerate() {
            if s.prompt_ids.is_empty() || s.completion_ids.is_empty() {
                return Err(PrefixPackError::EmptySample { sample: sample + i });
            }
            if s.prompt_ids != first.prompt_ids {
                return Err(PrefixPackError::PromptMismatch {
                    group: g,
                    sample: i,
                });
            }
            let c = forwarded_len(s.completion_ids.len());
            if i > start && len + c > max_row_tokens {
                rows.push((g, start..i));
                start = i;
                len = p;
            }
            len += c;
        }
        rows.push((g, start..group.len()));
        sample += group.len();
    }
    let row_len = |(g, r): &(usize, std::ops::Range<usize>)| {
        let group = groups[*g];
        group[0].prompt_ids.len()
            + group[r.clone()]
                .iter()
                .map(|s| forwarded_len(s.completion_ids.len()))
                .sum::<usize>()
    };
    let l = rows.iter().map(row_len).max().unwrap_or(0);
    let n_rows = rows.len();
    let mut ids = vec![pad_id; n_rows * l];
    let mut pos = vec![0i64; n_rows * l];
    let mut seg = vec![-1i64; n_rows * l];
    let mut predictors = vec![];
    let mut targets = vec![];
    let mut saved = 0;
    let mut used = 0;
    for (row, (g, range)) in rows.iter().enumerate() {
        let group = groups[*g];
        let prompt = &group[0].prompt_ids;
        let p = prompt.len();
        let base = row * l;
        ids[base..base + p].copy_from_slice(prompt);
        seg[base..base + p].fill(0);
        for (t, x) in pos[base..base + p].iter_mut().enumerate() {
            *x = t as i64;
        }
        saved += (range.len() - 1) * p;
        let mut at = base + p;
        for (k, s) in group[range.clone()].iter().enumerate() {
            let c = forwarded_len(s.completion_ids.len());
            ids[at..at + c].copy_from_slice(&s.completion_ids[..c]);
            seg[at..at + c].fill(k as i64 + 1);
            for (t, x) in pos[at..at + c].iter_mut().enumerate() {
                *x = (p + t) as i64;
            }
            predictors.push((base + p - 1) as i64);
            predictors.extend((at..at + c).map(|i| i as i64));
            targets.extend_from_slice(&s.completion_ids);
            at += c;
        }
        used += at - base;
    }
    let shape = [n_rows as i64, l as i64];
    Ok(SharedPrefixBatch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        position_ids: Tensor::from_slice(&pos).view(shape),
        segment_ids: Tensor::from_slice(&seg).view(shape),
        predictors: Positions::from_index(&predictors, shape[0], shape[1])?,
        targets: Tensor::from_slice(&targets).unsqueeze(0),
        padding: n_rows * l - used,
        prompt_tokens_saved: saved,
    })
}

/// A shared-prefix forward layout and the completion positions of the unpacked
/// layout its flat log-probs scatter into.
#[derive(Debug)]
pub struct SharedLayout {
    pub batch: SharedPrefixBatch,
    /// The completion tokens of the unpacked shifted layout `[B, L - 1]`, in order.
    pub unpacked: Positions,
}

/// The shared-prefix layout of `samples` (adjacent samples with equal prompts share
/// one) beside their unpacked `packed` batch (from [`super::batch::pack`]).
pub fn shared_layout(
    samples: &[Sample],
    packed: &super::batch::PackedBatch,
    pad_id: i64,
    max_row_tokens: usize,
) -> Result<SharedLayout, PrefixPackError> {
    Ok(SharedLayout {
        batch: pack_shared_prefix(&prompt_runs(samples), pad_id, max_row_tokens)?,
        unpacked: Positions::new(&packed.completion_mask)?,
    })
}

/// Splits `samples` into consecutive runs with equal prompts (a group's samples are
/// adjacent in a round), the `groups` argument of [`pack_shared_prefix`].
pub fn prompt_runs(samples: &[Sample]) -> Vec<&[Sample]> {
    let mut out = vec![];
    let mut start = 0;
    for i in 1..=samples.len() {
        if i == samples.len() || samples[i].prompt_ids != samples[start].prompt_ids {
            out.push(&samples[start..i]);
            start = i;
        }
    }
    out
}
