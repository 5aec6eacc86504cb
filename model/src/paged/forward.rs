//! A forward pass over a packed step (vLLM's layout): the tokens of every scheduled
//! sequence, decode tokens and prefill chunks alike, as one `[1, N]` row with no
//! padding; positions come from the caller (the scheduler's lengths). Each layer writes
//! its new keys and values into their slots of the [`PagedKvCache`] and attends through
//! the block tables.
use tch::{Kind, Tensor};

use super::cache::{AttentionBackend, PagedKvCache, SlotIndex};
use super::fused::{decoder_layer_cpu, StepTables};
use super::kernel::SeqSpan;
use crate::error::{ModelError, Result};
use crate::transformer::{decoder_layer, Transformer};

/// One engine step's input: `tokens` packed in span order.
#[derive(Debug, Clone)]
pub struct PagedStep<'a> {
    pub tokens: &'a [i64],
    /// One span per sequence; `q_start` indexes `tokens`, and span `i`'s tokens are at
    /// positions `ctx_len - q_len ..ctx_len` of its sequence.
    pub spans: &'a [SeqSpan<'a>],
}

impl PagedStep<'_> {
    /// Checks the spans tile `tokens` in order and their ids are in the vocabulary (host
    /// memory only; no device sync).
    fn validate(&self, vocab: i64, block_size: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        let mut next = 0;
        for (i, s) in self.spans.iter().enumerate() {
            if s.q_start != next || s.q_len == 0 || s.q_len > s.ctx_len {
                return bad(format!(
                    "span {i}: rows {}..{} (expected to start at {next}), {} keys",
                    s.q_start,
                    s.q_start + s.q_len,
                    s.ctx_len
                ));
            }
            if s.blocks.len() * block_size < s.ctx_len {
                return bad(format!(
                    "span {i}: {} keys do not fit {} blocks of {block_size}",
                    s.ctx_len,
                    s.blocks.len()
                ));
            }
            next += s.q_len;
        }
        if next != self.tokens.len() || next == 0 {
            return bad(format!(
                "the spans cover {next} tokens of {}",
                self.tokens.len()
            ));
        }
        if let Some(&id) = self.tokens.iter().find(|&&t| t < 0 || t >= vocab) {
            return bad(format!(
                "token id {id} is outside the vocabulary [0, {vocab})"
            ));
        }
        Ok(())
    }
}

impl Transformer {
    /// Runs `step` through every layer, writing its keys and values into `cache`, and
    /// returns the logits `[R, V]` (model dtype) of the packed rows `logit_rows`.
    pub fn forward_paged(
        &self,
        step: &PagedStep,
        cache: &mut PagedKvCache,
        logit_rows: &[i64],
    ) -> Result<Tensor> {
        let bs = cache.block_size();
        step.validate(self.config.vocab_size, bs)?;
        let device = self.device();
        let n = step.tokens.len() as i64;
        let mut positions = Vec::with_capacity(step.tokens.len());
        let mut blocks = Vec::with_capacity(step.tokens.len());
        let mut offsets = Vec::with_capacity(step.tokens.len());
        for s in step.spans {
            for p in s.ctx_len - s.q_len..s.ctx_len {
                positions.push(p as i64);
                blocks.push(s.blocks[p / bs] as i64);
                offsets.push((p % bs) as i64);
            }
        }
        let ids = Tensor::from_slice(step.tokens)
            .to_device(device)
            .view([1, n]);
        let pos = Tensor::from_slice(&positions)
            .to_device(device)
            .view([1, n]);
        let (cos, sin) = self.rope().cos_sin(&pos, self.kind());
        let cfg = &self.config;
        let (nh, d) = (cfg.num_attention_heads, cfg.head_dim);
        let mut h = self.embed(&ids);
        if cache.backend() == AttentionBackend::CpuKernel && cache.kind() == Kind::Float {
            // CPU f32: RoPE, slot writes and attention in Rust (see `fused`).
            let flat = blocks
                .iter()
                .zip(&offsets)
                .map(|(&b, &o)| b as usize * bs + o as usize)
                .collect();
            let tables = StepTables::new(&cos, &sin, flat)?;
            for (i, layer) in self.weights.layers.iter().enumerate() {
                h = decoder_layer_cpu(cfg, layer, &h, i, cache, &tables, step.spans)?;
            }
        } else {
            let slots = SlotIndex {
                block: Tensor::from_slice(&blocks).to_device(device),
                offset: Tensor::from_slice(&offsets).to_device(device),
            };
            for (i, layer) in self.weights.layers.iter().enumerate() {
                h = decoder_layer(cfg, layer, &h, &cos, &sin, |q, k, v| {
                    // [1, heads, N, d] -> packed [N, heads, d].
                    let packed = |t: Tensor| t.squeeze_dim(0).transpose(0, 1).contiguous();
                    let (q, k, v) = (packed(q), packed(k), packed(v));
                    cache.write(i, &k, &v, &slots)?;
                    Ok(cache.attend(i, &q, step.spans)?.view([1, n, nh * d]))
                })?;
            }
        }
        let rows = Tensor::from_slice(logit_rows).to_device(device);
        let last = h.squeeze_dim(0).f_index_select(0, &rows)?;
        Ok(self.logits(&self.final_norm(&last)))
    }
}
