//! Fused CPU ops with hand-written backward (csrc/fused_ops.cpp): RMSNorm and rotary
//! embedding as single-pass torch autograd functions; and the attention of shared-prefix
//! rows (csrc/segment_attention.cpp), which visits only the keys each query may see. [`rms_norm`] takes the fused
//! kernel for CPU f32 tensors and [`rope`] for CPU f32/f64 ones (one dtype for all
//! inputs); everything else (GPUs, bf16, mixed dtypes) runs the composite ops, which are
//! also the reference. `model/tests/fused_ops.rs` checks values and gradients against
//! them in f64 (1e-12) and f32.
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn grpo_fused_rms_norm(
        x: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn grpo_fused_rope(
        x: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn grpo_segment_attention(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        seg: *const C_tensor,
        stride: i64,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// Takes the result of a fused call: the tensor, or the C++ exception's message.
fn take(out: *mut C_tensor, err: *mut c_char) -> Result<Tensor, String> {
    if out.is_null() {
        let message = if err.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: a non-null `err` is a NUL-terminated string malloc'd by the C++
            // side for us to free.
            let m = unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            unsafe { libc::free(err.cast()) };
            m
        };
        return Err(message);
    }
    // SAFETY: a non-null result is a `new at::Tensor` we now own, freed by tch's drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// transformers' `LlamaRMSNorm` over the last dimension: `weight * x / sqrt(mean(x^2) +
/// eps)`, normalised in fp32 (f64 inputs too, as transformers casts to float32). The
/// fused kernel takes CPU f32 inputs with an f32 weight; everything else runs the
/// composite op.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let fused = x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && weight.dim() == 1
        && x.dim() >= 1
        && x.size().last() == weight.size().first();
    if fused {
        match rms_norm_fused(x, weight, eps) {
            Ok(t) => return t,
            Err(e) => fallback("rms_norm", &e),
        }
    }
    rms_norm_composite(x, weight, eps)
}

/// The fused RMSNorm kernel itself, in the inputs' dtype (CPU f32 or f64, one dtype for
/// both, `weight` 1-D of `x`'s last size); an error names what torch refused.
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, String> {
    let mut err = std::ptr::null_mut();
    // SAFETY: both pointers are live tensors for the duration of the call.
    let out = unsafe { grpo_fused_rms_norm(x.as_ptr(), weight.as_ptr(), eps, &mut err) };
    take(out, err)
}

/// The composite RMSNorm (the reference of the fused kernel).
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (x32 * (var + eps).rsqrt()).to_kind(kind)
}

/// Rotary embedding of `x` `[B, T, heads, d]` with `cos`/`sin` `[B, T, d]` (constants):
/// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x[.., d/2..], x[.., ..d/2])`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (xs, cs) = (x.size(), cos.size());
    let fused = x.device() == Device::Cpu
        && matches!(x.kind(), Kind::Float | Kind::Double)
        && cos.kind() == x.kind()
        && sin.kind() == x.kind()
        && cos.device() == Device::Cpu
        && sin.device() == Device::Cpu
        && xs.len() == 4
        && xs[3] % 2 == 0
        && cs.len() == 3
        && cs == sin.size()
        && cs[..] == [xs[0], xs[1], xs[3]]
        && !cos.requires_grad()
        && !sin.requires_grad();
    if fused {
        match rope_fused(x, cos, sin) {
            Ok(t) => return t,
            Err(e) => fallback("rope", &e),
        }
    }
    rope_composite(x, cos, sin)
}

/// The fused RoPE kernel itself (CPU f32 or f64, `x` `[B, T, heads, d]` with `d` even,
/// `cos`/`sin` `[B, T, d]` of its dtype); an error names what torch refused.
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, String> {
    let mut err = std::ptr::null_mut();
    // SAFETY: the pointers are live tensors for the duration of the call.
    let out = unsafe { grpo_fused_rope(x.as_ptr(), cos.as_ptr(), sin.as_ptr(), &mut err) };
    take(out, err)
}

/// The composite rotary embedding (the reference of the fused kernel).
pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
    let (cos, sin) = (cos.unsqueeze(2), sin.unsqueeze(2));
    x * &cos + rotated * &sin
}

/// Whether [`segment_attention`] runs the fused kernel for inputs on `device` in `kind`
/// (CPU f32/f64); elsewhere callers build [`segment_mask`] once and run SDPA.
pub fn segment_attention_is_fused(device: Device, kind: Kind) -> bool {
    device == Device::Cpu && matches!(kind, Kind::Float | Kind::Double)
}

/// The segments of shared-prefix rows for [`segment_attention`].
#[derive(Debug)]
pub struct Segments {
    /// `[B, T]` i64: 0 = the shared prompt, `k >= 1` = completion `k`, -1 = padding or a
    /// masked key; with `row_stride > 0`, `row * row_stride + segment`.
    pub ids: Tensor,
    /// 0: each of the `B` sequences is one row. Otherwise a sequence holds several rows
    /// back to back (the packed real tokens of a batch, [`crate::TokenPacking`]), which
    /// never attend to each other; it exceeds every segment id.
    pub row_stride: i64,
}

impl Segments {
    /// One row per sequence.
    pub fn rows(ids: Tensor) -> Self {
        Segments { ids, row_stride: 0 }
    }

    /// The ids with each sequence's row number folded in (`row * (T + 1) + segment`;
    /// padding stays -1), so that the real tokens of all `B` sequences can be packed
    /// into one.
    pub fn numbered_by_row(&self) -> Segments {
        if self.row_stride > 0 {
            return Segments {
                ids: self.ids.shallow_clone(),
                row_stride: self.row_stride,
            };
        }
        let (b, t) = (self.ids.size()[0], self.ids.size()[1]);
        let stride = t + 1;
        let row = Tensor::arange(b, (Kind::Int64, self.ids.device())).view([b, 1]) * stride;
        let ids = (&self.ids + row).where_self(&self.ids.ge(0), &self.ids);
        Segments {
            ids,
            row_stride: stride,
        }
    }
}

/// Attention of shared-prefix rows: `q` `[B, nh, T, d]`, `k`/`v` `[B, nkv, T, d]` (heads
/// share kv heads in groups, as SDPA's `enable_gqa`) and `seg` ([`Segments`]). Query `i`
/// of segment `s` attends to the keys `j <= i` of its row in segment 0 or `s`. Returns
/// `[B, T, nh * d]`. The fused kernel (csrc/segment_attention.cpp) visits only those
/// keys and outputs zeros at padding queries; the composite op (its reference) runs
/// SDPA under [`segment_mask`], where padding queries attend to every key (outputs
/// unused).
pub fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments) -> Tensor {
    if segment_attention_is_fused(q.device(), q.kind()) {
        match segment_attention_fused(q, k, v, seg) {
            Ok(t) => return t,
            Err(e) => fallback("segment_attention", &e),
        }
    }
    segment_attention_composite(q, k, v, &segment_mask(seg))
}

/// The fused segment-attention kernel itself (CPU, one dtype for `q`, `k`, `v`); an
/// error names what torch refused.
pub fn segment_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: &Segments,
) -> Result<Tensor, String> {
    let mut err = std::ptr::null_mut();
    let (ids, stride) = (&seg.ids, seg.row_stride);
    // SAFETY: the pointers are live tensors for the duration of the call.
    let out = unsafe {
        grpo_segment_attention(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            ids.as_ptr(),
            stride,
            &mut err,
        )
    };
    take(out, err)
}

/// The `[B, 1, T, T]` bool SDPA mask of `seg` (see [`segment_attention`]): causal,
/// restricted to valid keys of the query's row in segment 0 or its own. Padding
/// queries, which see no key, see all (their outputs are unused), as transformers'
/// `_unmask_unattended`.
pub fn segment_mask(seg: &Segments) -> Tensor {
    let ids = &seg.ids;
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let (row, local) = if seg.row_stride > 0 {
        (
            ids.floor_divide_scalar(seg.row_stride),
            ids.remainder(seg.row_stride),
        )
    } else {
        (ids.zeros_like(), ids.shallow_clone())
    };
    let idx = Tensor::arange(t, (Kind::Int64, ids.device()));
    let causal = idx.unsqueeze(0).le_tensor(&idx.unsqueeze(1)); // [T (query), T (key)]
    let same_row = row.view([b, 1, t]).eq_tensor(&row.view([b, t, 1]));
    let prompt = local.view([b, 1, t]).eq(0).logical_and(&same_row);
    let own = ids.view([b, 1, t]).eq_tensor(&ids.view([b, t, 1]));
    let related = prompt
        .logical_or(&own)
        .logical_and(&ids.view([b, 1, t]).ge(0));
    let mask = related.logical_and(&causal.unsqueeze(0)).unsqueeze(1);
    let empty = mask.any_dims(&[-1i64][..], true).logical_not();
    mask.logical_or(&empty)
}

/// [`segment_attention`] as SDPA under `mask` (from [`segment_mask`]): `[B, T, nh * d]`.
pub fn segment_attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let (b, nh, t, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let gqa = k.size()[1] != nh;
    Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, gqa)
        .transpose(1, 2)
        .reshape([b, t, nh * d])
}

/// A fused kernel raised (it checks what the caller checked, so this means a torch
/// error such as a failed allocation): the composite op runs instead and either succeeds
/// or raises through tch. Said once per process on stderr, so a slow path is not silent.
fn fallback(op: &str, why: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("model::fused::{op}: falling back to the composite op: {why}");
    }
}
