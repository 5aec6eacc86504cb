//! The decoder block of a packed step on CPU in f32 with fewer libtorch calls: the
//! q/k/v projections and the MLP stay libtorch matmuls, while RoPE, the key/value
//! writes into their paged slots and attention run in Rust over the tensors' memory
//! (one pass per layer, no `index_put_`, no transposed copies, no RoPE temporaries).
//! Same arithmetic as [`crate::transformer::decoder_layer`] (`x * cos + rotate_half(x) *
//! sin`, each product rounded as libtorch rounds it), so it is exact against it.
use tch::{Kind, Tensor};

use super::cache::PagedKvCache;
use super::kernel::SeqSpan;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::transformer::{head_norm, layer_tail, rms_norm};
use crate::weights::DecoderLayer;

/// Per step, shared by every layer: RoPE tables `[N, d]` and each token's flat slot
/// (`block * block_size + offset`).
#[derive(Debug)]
pub(crate) struct StepTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub slots: Vec<usize>,
}

impl StepTables {
    /// From `cos`/`sin` `[1, N, d]` (any float kind) and the slots.
    pub fn new(cos: &Tensor, sin: &Tensor, slots: Vec<usize>) -> Result<Self> {
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))?)
        };
        Ok(StepTables {
            cos: host(cos)?,
            sin: host(sin)?,
            slots,
        })
    }
}

/// `x[.., d]` rows rotated in place: `x * cos + rotate_half(x) * sin` with the row's
/// table entry (`rows_per_token` rows share one token's table).
fn rope_rows(x: &mut [f32], d: usize, rows_per_token: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    let mut tmp = [0f32; 512];
    for (r, row) in x.chunks_exact_mut(d).enumerate() {
        let t = r / rows_per_token;
        let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
        let tmp = &mut tmp[..d];
        tmp.copy_from_slice(row);
        for i in 0..half {
            row[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
        }
        for i in half..d {
            row[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
    }
}

/// Mutable f32 view of a contiguous CPU f32 tensor this code owns.
///
/// # Safety
/// `t` must be a contiguous f32 CPU tensor not aliased by another live view.
#[allow(clippy::mut_from_ref)]
unsafe fn f32_mut(t: &Tensor) -> &mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// One decoder block of a packed step `h` `[1, N, H]` (f32, CPU) writing its keys and
/// values into layer `layer` of `cache` at `tables.slots` and attending over `spans`.
pub(crate) fn decoder_layer_cpu(
    cfg: &ModelConfig,
    layer_w: &DecoderLayer,
    h: &Tensor,
    layer: usize,
    cache: &mut PagedKvCache,
    tables: &StepTables,
    spans: &[SeqSpan],
) -> Result<Tensor> {
    let n = h.size()[1];
    let (nh, nkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let du = d as usize;
    if du > 512 || !du.is_multiple_of(2) {
        return Err(ModelError::Input(format!(
            "fused paged layer: head_dim {d} must be even and at most 512"
        )));
    }
    let a = &layer_w.self_attn;
    let x = rms_norm(h, &layer_w.input_layernorm, cfg.rms_norm_eps);
    let q = head_norm(a.q_proj.forward(&x).view([1, n, nh, d]), &a.q_norm, cfg).contiguous();
    let k = head_norm(a.k_proj.forward(&x).view([1, n, nkv, d]), &a.k_norm, cfg).contiguous();
    let v = a.v_proj.forward(&x).contiguous();
    for t in [&q, &k, &v] {
        if t.kind() != Kind::Float || t.device() != tch::Device::Cpu {
            return Err(ModelError::Input(format!(
                "fused paged layer needs f32 on CPU, got {:?} on {:?}",
                t.kind(),
                t.device()
            )));
        }
    }
    // SAFETY: q, k, v are fresh contiguous f32 CPU tensors (checked above) that only
    // this function holds.
    let (qs, ks, vs) = unsafe { (f32_mut(&q), f32_mut(&k), f32_mut(&v)) };
    let nkv_u = nkv as usize;
    rope_rows(qs, du, nh as usize, &tables.cos, &tables.sin);
    rope_rows(ks, du, nkv_u, &tables.cos, &tables.sin);
    cache.write_slots_f32(layer, ks, vs, &tables.slots)?;
    let attn = cache.attend(layer, &q.view([n, nh, d]), spans)?;
    Ok(layer_tail(cfg, layer_w, h, &attn.view([1, n, nh * d])))
}
