//! The Qwen2/Llama decoder: RMSNorm, RoPE, grouped-query attention through
//! `scaled_dot_product_attention`, SwiGLU MLP, tied or untied head.
//!
//! Computation follows transformers' modeling code op for op (RMSNorm in fp32 then cast
//! back, RoPE tables in fp32 then cast, residuals in the model dtype), so fp32 logits
//! agree to ~1e-6 and bf16 to bf16 rounding.
//!
//! Data flow: `ForwardInput` (ids `[B, T]`, optional attention mask and positions) ->
//! [`Transformer::context`] builds the RoPE tables and attention mask once ->
//! [`Transformer::embed`] -> [`Transformer::block`] for each layer (appending to the
//! caller's [`KvCache`]) -> [`Transformer::final_norm`] -> head. The block-by-block
//! methods are public so the trainer can gather one block's parameters at a time
//! (ZeRO-3) and recompute a block during backward (gradient checkpointing);
//! [`layer_forward`] takes the block's weights explicitly for that purpose.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::load_pretrained;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::fused::{segment_mask, Segments};
use crate::kv_cache::KvCache;
use crate::packing::TokenPacking;
use crate::weights::{DecoderLayer, Weights};

/// Rotary position embedding frequencies, `inv_freq` `[head_dim / 2]` in fp32.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// The frequencies of transformers' `ROPE_INIT_FUNCTIONS`, computed with the same
    /// fp32 tensor ops so the tables are bit-identical.
    pub fn new(cfg: &ModelConfig, device: Device) -> Self {
        let d = cfg.head_dim;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / (d as f64);
        let inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
        let inv_freq = match cfg.rope_scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                // Wavelengths longer than low_freq_wavelen are divided by factor.
                let scaled =
                    inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
                let smooth = ((wavelen.reciprocal() * old) - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * (&scaled / factor) + &smooth * &scaled;
                let is_medium = wavelen
                    .lt(high_freq_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
                smoothed.where_self(&is_medium, &scaled)
            }
        };
        Rope { inv_freq }
    }

    /// `(cos, sin)`, each `[B, T, head_dim]` in `kind`, for positions `[B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// What one forward pass takes besides the weights.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// `[B, T]` i64 token ids.
    pub input_ids: &'a Tensor,
    /// `[B, T]`, 1 for real tokens and 0 for (left) padding; `None` means all real.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]` i64 positions; `None` derives them from the mask (and cache) as
    /// transformers' `generate` does.
    pub position_ids: Option<&'a Tensor>,
    /// `[B, T]` i64 segments for shared-prefix training (no cache): 0 = the shared
    /// prefix (prompt), `k >= 1` = branch (completion) `k`, -1 = padding. Key `j` is
    /// visible to query `i` iff `j <= i`, `j` is real and in the prefix or in `i`'s
    /// branch. Needs explicit `position_ids` (each branch continues the prefix's).
    pub segment_ids: Option<&'a Tensor>,
}

impl<'a> ForwardInput<'a> {
    pub fn new(input_ids: &'a Tensor) -> Self {
        ForwardInput {
            input_ids,
            attention_mask: None,
            position_ids: None,
            segment_ids: None,
        }
    }

    pub fn with_mask(mut self, attention_mask: &'a Tensor) -> Self {
        self.attention_mask = Some(attention_mask);
        self
    }

    pub fn with_positions(mut self, position_ids: &'a Tensor) -> Self {
        self.position_ids = Some(position_ids);
        self
    }

    pub fn with_segments(mut self, segment_ids: &'a Tensor) -> Self {
        self.segment_ids = Some(segment_ids);
        self
    }
}

/// Per-forward attention state shared by every layer.
#[derive(Debug)]
pub struct AttentionContext {
    /// `[B, T, head_dim]` in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, 1, T, S]` bool (true = may attend), or `None` when plain causal attention
    /// (`is_causal`) or no masking at all (one new token, no padding) suffices.
    pub mask: Option<Tensor>,
    pub is_causal: bool,
    /// `[B, S]` bool: validity of every key position, cached ones included. Stored in
    /// the cache by [`KvCache::commit`] after the step.
    pub key_mask: Tensor,
    /// Set by [`AttentionContext::pack_real_tokens`]: the blocks take and return the
    /// real tokens as `[1, N, H]` (and `cos`/`sin` are `[1, N, head_dim]`).
    pub packing: Option<TokenPacking>,
    /// The segments of shared-prefix rows (-1 at masked keys) when the fused
    /// [`crate::fused::segment_attention`] runs instead of SDPA under `mask` (CPU
    /// f32/f64; `mask` is then `None`). Packed with the real tokens.
    pub segments: Option<Segments>,
}

impl AttentionContext {
    /// Packs the real tokens (see [`crate::packing`]) when more than
    /// `max_padding_share` of the positions are padding; for forwards without a KV
    /// cache (with cached keys, `key_mask` is wider than the step: left as it is). The
    /// caller then embeds with [`AttentionContext::embed_input`] and takes the final
    /// hidden states back with [`AttentionContext::unpack_output`].
    pub fn pack_real_tokens(mut self, max_padding_share: f64) -> Self {
        if self.key_mask.size()[1] != self.cos.size()[1] {
            return self;
        }
        if let Some(p) = TokenPacking::new(&self.key_mask, max_padding_share) {
            self.cos = p.pack(&self.cos);
            self.sin = p.pack(&self.sin);
            self.segments = self.segments.take().map(|s| {
                let s = s.numbered_by_row();
                Segments {
                    ids: p.pack(&s.ids),
                    row_stride: s.row_stride,
                }
            });
            self.packing = Some(p);
        }
        self
    }

    /// The embeddings of `ids` `[B, T]`: `[B, T, H]`, or `[1, N, H]` of the real tokens
    /// when this context packs them.
    pub fn embed_input(&self, weight: &Tensor, ids: &Tensor) -> Tensor {
        match &self.packing {
            Some(p) => embed(weight, &p.pack_ids(ids)),
            None => embed(weight, ids),
        }
    }

    /// Final hidden states back in the batch's `[B, T, H]` layout (zeros at padding
    /// when packed).
    pub fn unpack_output(&self, h: Tensor) -> Tensor {
        match &self.packing {
            Some(p) => p.unpack(&h),
            None => h,
        }
    }
}

impl KvCache {
    /// Records the key mask of a finished forward step (every layer appended).
    pub fn commit(&mut self, ctx: &AttentionContext) {
        self.set_mask(ctx.key_mask.shallow_clone());
    }
}

/// transformers' `LlamaRMSNorm`: normalise in fp32, cast back, then scale. One fused
/// pass (forward and backward) for CPU f32 tensors ([`crate::fused`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    crate::fused::rms_norm(x, weight, eps)
}

/// Qwen3's per-head RMSNorm over `head_dim` of `[B, T, heads, head_dim]` (before RoPE);
/// the identity for architectures without it.
pub(crate) fn head_norm(x: Tensor, weight: &Option<Tensor>, cfg: &ModelConfig) -> Tensor {
    match weight {
        Some(w) => rms_norm(&x, w, cfg.rms_norm_eps),
        None => x,
    }
}

/// One decoder block: `h + attn(norm(h))`, then `+ mlp(norm(.))`. `h` is `[B, T, H]`.
/// With `kv = Some((cache, i))` this step's keys and values are appended to layer `i`
/// of the cache and attention runs over all cached positions.
pub fn layer_forward(
    cfg: &ModelConfig,
    layer: &DecoderLayer,
    h: &Tensor,
    ctx: &AttentionContext,
    kv: Option<(&mut KvCache, usize)>,
) -> Result<Tensor> {
    decoder_layer(cfg, layer, h, &ctx.cos, &ctx.sin, |q, k, v| {
        contiguous_attention(cfg, q, k, v, ctx, kv)
    })
}

/// Attention over the left-padded contiguous cache: appends `k`, `v` and runs SDPA.
/// `q` is `[B, nh, T, d]`, `k`/`v` `[B, nkv, T, d]`; returns `[B, T, nh * d]`.
fn contiguous_attention(
    cfg: &ModelConfig,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: &AttentionContext,
    kv: Option<(&mut KvCache, usize)>,
) -> Result<Tensor> {
    let (b, t) = (q.size()[0], q.size()[2]);
    let (nh, nkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let packing = ctx.packing.as_ref();
    // Shared-prefix rows on CPU, padded or packed alike: the fused kernel.
    if let (Some(seg), None) = (&ctx.segments, &kv) {
        return Ok(crate::fused::segment_attention(&q, &k, &v, seg));
    }
    let (q, k, v) = match (packing, kv) {
        (Some(_), Some(_)) => {
            return Err(ModelError::Input(
                "packed real tokens are for forwards without a KV cache".into(),
            ))
        }
        // Packed `[1, heads, N, d]` into the padded batch for SDPA.
        (Some(p), None) => (p.unpack_heads(&q), p.unpack_heads(&k), p.unpack_heads(&v)),
        (None, Some((cache, i))) => {
            let (k, v) = cache.append(i, k, v);
            (q, k, v)
        }
        (None, None) => (q, k, v),
    };
    let attn = Tensor::f_scaled_dot_product_attention(
        &q,
        &k,
        &v,
        ctx.mask.as_ref(),
        0.0,
        ctx.is_causal,
        None,
        nh != nkv,
    )?;
    Ok(match packing {
        Some(p) => p.pack_heads(&attn),
        None => attn.transpose(1, 2).reshape([b, t, nh * d]),
    })
}

/// A decoder block with the attention given as `attend(q, k, v)`: `q` `[B, nh, T, d]`,
/// `k`/`v` `[B, nkv, T, d]` after RoPE, returning `[B, T, nh * d]`. `cos`/`sin` are
/// `[B, T, d]`. Shared by the contiguous cache ([`layer_forward`]) and the paged one
/// ([`crate::paged`]).
pub(crate) fn decoder_layer(
    cfg: &ModelConfig,
    layer: &DecoderLayer,
    h: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, t) = (h.size()[0], h.size()[1]);
    let (nh, nkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let a = &layer.self_attn;
    let x = rms_norm(h, &layer.input_layernorm, cfg.rms_norm_eps);
    // RoPE on `[B, T, heads, d]` (one fused pass on CPU), then heads first for SDPA.
    let q = head_norm(a.q_proj.forward(&x).view([b, t, nh, d]), &a.q_norm, cfg);
    let k = head_norm(a.k_proj.forward(&x).view([b, t, nkv, d]), &a.k_norm, cfg);
    let q = crate::fused::rope(&q, cos, sin).transpose(1, 2);
    let k = crate::fused::rope(&k, cos, sin).transpose(1, 2);
    let v = a.v_proj.forward(&x).view([b, t, nkv, d]).transpose(1, 2);
    let attn = attend(q, k, v)?;
    Ok(layer_tail(cfg, layer, h, &attn))
}

/// The rest of a decoder block after attention: `h + o_proj(attn)`, then the MLP with
/// its residual. `attn` is `[B, T, nh * d]`.
pub(crate) fn layer_tail(
    cfg: &ModelConfig,
    layer: &DecoderLayer,
    h: &Tensor,
    attn: &Tensor,
) -> Tensor {
    let h = h + layer.self_attn.o_proj.forward(attn);
    let x = rms_norm(&h, &layer.post_attention_layernorm, cfg.rms_norm_eps);
    let m = &layer.mlp;
    let mlp = m
        .down_proj
        .forward(&(m.gate_proj.forward(&x).silu() * m.up_proj.forward(&x)));
    h + mlp
}

/// A Qwen2 or Llama causal language model.
#[derive(Debug)]
pub struct Transformer {
    pub config: ModelConfig,
    pub weights: Weights,
    rope: Rope,
}

impl Transformer {
    pub fn new(config: ModelConfig, weights: Weights) -> Self {
        let rope = Rope::new(&config, weights.embed_tokens.device());
        Transformer {
            config,
            weights,
            rope,
        }
    }

    /// Loads a Hugging Face checkpoint directory; `kind` `None` keeps the checkpoint's
    /// dtype.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: Device,
        kind: Option<Kind>,
    ) -> Result<Self> {
        let (config, weights) = load_pretrained(dir, device, kind)?;
        Ok(Self::new(config, weights))
    }

    pub fn device(&self) -> Device {
        self.weights.embed_tokens.device()
    }

    /// The compute dtype (that of the weights).
    pub fn kind(&self) -> Kind {
        self.weights.embed_tokens.kind()
    }

    /// Builds the RoPE tables and the attention mask for `input` given what `cache`
    /// already holds; see [`attention_context`].
    pub fn context(
        &self,
        input: &ForwardInput,
        cache: Option<&KvCache>,
    ) -> Result<AttentionContext> {
        attention_context(&self.config, &self.rope, self.kind(), input, cache)
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// `[B, T]` ids to `[B, T, H]` embeddings.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        embed(&self.weights.embed_tokens, ids)
    }

    /// Decoder block `i` with this model's own weights.
    pub fn block(
        &self,
        i: usize,
        h: &Tensor,
        ctx: &AttentionContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        layer_forward(
            &self.config,
            &self.weights.layers[i],
            h,
            ctx,
            cache.map(|c| (c, i)),
        )
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, h: &Tensor) -> Tensor {
        rms_norm(h, &self.weights.norm, self.config.rms_norm_eps)
    }

    /// `[B, T, H]` normalised hidden states to `[B, T, V]` logits in the model dtype.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.weights.head(), None)
    }

    /// All blocks and the final norm: `[B, T, H]`. Appends to `cache` when given.
    pub fn hidden_states(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if let Some(c) = cache.as_deref() {
            if c.num_layers() != self.config.num_hidden_layers {
                return Err(ModelError::Input(format!(
                    "the KV cache has {} layers, the model {}",
                    c.num_layers(),
                    self.config.num_hidden_layers
                )));
            }
        }
        let ctx = self.context(input, cache.as_deref())?;
        let mut h = self.embed(&input.input_ids.to_device(self.device()));
        for i in 0..self.config.num_hidden_layers {
            h = self.block(i, &h, &ctx, cache.as_deref_mut())?;
        }
        if let Some(c) = cache {
            c.commit(&ctx);
        }
        Ok(self.final_norm(&h))
    }

    /// The training forward (no KV cache): as [`Transformer::hidden_states`], with the
    /// real tokens packed (see [`crate::packing`]) when more than `max_padding_share`
    /// of the positions are padding; the padding positions' hidden states are then zero.
    pub fn training_hidden_states(
        &self,
        input: &ForwardInput,
        max_padding_share: f64,
    ) -> Result<Tensor> {
        let ctx = self
            .context(input, None)?
            .pack_real_tokens(max_padding_share);
        let ids = input.input_ids.to_device(self.device());
        let mut h = ctx.embed_input(&self.weights.embed_tokens, &ids);
        for i in 0..self.config.num_hidden_layers {
            h = self.block(i, &h, &ctx, None)?;
        }
        Ok(ctx.unpack_output(self.final_norm(&h)))
    }

    /// Logits `[B, T, V]` (model dtype) of every position. For long sequences prefer
    /// [`Transformer::hidden_states`] with [`crate::logprobs::token_logprobs`], which
    /// never materialises the full logits.
    pub fn forward(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Result<Tensor> {
        Ok(self.logits(&self.hidden_states(input, cache)?))
    }
}

/// Checks ids and mask coming from a request; host sync (reads min/max).
fn check_input(cfg: &ModelConfig, input: &ForwardInput, cache: Option<&KvCache>) -> Result<()> {
    let ids = input.input_ids;
    let size = ids.size();
    if size.len() != 2 || size[1] == 0 {
        return Err(ModelError::Input(format!(
            "input_ids must be [batch, seq] with seq > 0, got {size:?}"
        )));
    }
    if ids.kind() != Kind::Int64 {
        return Err(ModelError::Input(format!(
            "input_ids must be int64, got {:?}",
            ids.kind()
        )));
    }
    let (lo, hi) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
    if lo < 0 || hi >= cfg.vocab_size {
        let bad = if lo < 0 { lo } else { hi };
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary [0, {})",
            cfg.vocab_size
        )));
    }
    for (name, t) in [
        ("attention_mask", input.attention_mask),
        ("position_ids", input.position_ids),
        ("segment_ids", input.segment_ids),
    ] {
        if let Some(t) = t {
            if t.size() != size {
                return Err(ModelError::Input(format!(
                    "{name} has shape {:?}, input_ids {size:?}",
                    t.size()
                )));
            }
        }
    }
    if let Some(c) = cache {
        if c.batch_size() != 0 && c.batch_size() != size[0] {
            return Err(ModelError::Input(format!(
                "the KV cache holds {} sequences, the input {}",
                c.batch_size(),
                size[0]
            )));
        }
    }
    Ok(())
}

/// Builds the RoPE tables (`kind`) and the attention mask for `input` given what
/// `cache` already holds. Validates the input (ids in the vocabulary, shapes). Host
/// syncs: the ids' min/max and whether any position is padding.
pub fn attention_context(
    cfg: &ModelConfig,
    rope: &Rope,
    kind: Kind,
    input: &ForwardInput,
    cache: Option<&KvCache>,
) -> Result<AttentionContext> {
    check_input(cfg, input, cache)?;
    if let Some(seg) = input.segment_ids {
        return segment_context(rope, kind, input, seg, cache);
    }
    let ids = input.input_ids;
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let device = ids.device();
    let past = cache.map_or(0, KvCache::seq_len);
    let new_mask = match input.attention_mask {
        Some(m) => m.to_device(device).to_kind(Kind::Bool),
        None => Tensor::ones([b, t], (Kind::Bool, device)),
    };
    let key_mask = match cache.and_then(KvCache::mask) {
        Some(m) => Tensor::cat(&[m, &new_mask], 1),
        None => new_mask,
    };
    let s = past + t;
    let padded = key_mask.all().int64_value(&[]) == 0;
    let positions = match input.position_ids {
        Some(p) => p.to_device(device),
        None if padded => (key_mask.cumsum(1, Kind::Int64) - 1)
            .clamp_min(0)
            .narrow(1, past, t),
        None => Tensor::arange_start(past, s, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([b, t], false),
    };
    let (cos, sin) = rope.cos_sin(&positions, kind);
    let (mask, is_causal) = if !padded && past == 0 {
        (None, t > 1)
    } else if !padded && t == 1 {
        (None, false)
    } else {
        // Query j (absolute position past + j) sees keys 0..=past + j that are real.
        let q_pos = Tensor::arange_start(past, s, (Kind::Int64, device)).unsqueeze(1);
        let k_pos = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
        let causal = k_pos.le_tensor(&q_pos);
        let mask = causal
            .unsqueeze(0)
            .unsqueeze(0)
            .logical_and(&key_mask.view([b, 1, 1, s]));
        // A padding query sees no key; let it see all of them so SDPA returns finite
        // values (its output is never used), as transformers' `_unmask_unattended`.
        let empty = mask.any_dims(&[-1i64][..], true).logical_not();
        (Some(mask.logical_or(&empty)), false)
    };
    Ok(AttentionContext {
        cos,
        sin,
        mask,
        is_causal,
        key_mask,
        packing: None,
        segments: None,
    })
}

/// The context of a shared-prefix row (see [`ForwardInput::segment_ids`]): attention is
/// causal, restricted to real keys of the prefix or the query's own branch, so each
/// branch sees exactly what it would see after its own copy of the prefix
/// ([`crate::fused::segment_attention`]).
fn segment_context(
    rope: &Rope,
    kind: Kind,
    input: &ForwardInput,
    seg: &Tensor,
    cache: Option<&KvCache>,
) -> Result<AttentionContext> {
    if cache.is_some() {
        return Err(ModelError::Input(
            "segment_ids are for training forwards without a KV cache".into(),
        ));
    }
    let Some(positions) = input.position_ids else {
        return Err(ModelError::Input(
            "segment_ids need explicit position_ids".into(),
        ));
    };
    let device = input.input_ids.device();
    let seg = seg.to_device(device).to_kind(Kind::Int64);
    let mut key_mask = seg.ge(0);
    if let Some(m) = input.attention_mask {
        key_mask = key_mask.logical_and(&m.to_device(device).to_kind(Kind::Bool));
    }
    let seg = Segments::rows(seg.where_scalarother(&key_mask, -1));
    let (cos, sin) = rope.cos_sin(&positions.to_device(device), kind);
    // The fused kernel needs no mask; elsewhere SDPA takes it, built once for all layers.
    let (mask, segments) = if crate::fused::segment_attention_is_fused(device, kind) {
        (None, Some(seg))
    } else {
        (Some(segment_mask(&seg)), None)
    };
    Ok(AttentionContext {
        cos,
        sin,
        mask,
        is_causal: false,
        key_mask,
        packing: None,
        segments,
    })
}

/// `[B, T]` ids to `[B, T, H]` embeddings.
pub fn embed(weight: &Tensor, ids: &Tensor) -> Tensor {
    Tensor::embedding(weight, ids, -1, false, false)
}

/// Picks a device by name: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "unknown device {other:?}; use cpu, cuda, cuda:N or auto"
                ))
            }),
    }
}
