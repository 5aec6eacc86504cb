//! The CPU attention kernel over paged KV blocks, in plain Rust over the tensors' memory
//! (per-op libtorch overhead dominates small models, and no libtorch op reads a block
//! table).
//!
//! Layout: queries and output `[N, nh, d]` (the step's tokens packed, no padding); each
//! layer's key and value pools `[num_blocks, nkv, block_size, d]`, so one block of one
//! KV head is `block_size * d` contiguous elements. A sequence's queries are its last
//! `q_len` positions of `ctx_len`; query `j` attends keys `0..=ctx_len - q_len + j`
//! (causal), read through its block table. Work is split by (sequence, KV head): the
//! `nh / nkv` query heads of a KV head read its keys once. Scores are exact softmax
//! (max, exp, sum in fp32), accumulation in fp32, f32 or bf16 storage.
use half::bf16;

/// Where one sequence's queries sit and which blocks hold its keys.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// First row of this sequence in the packed `[N, ...]` queries.
    pub q_start: usize,
    pub q_len: usize,
    /// Keys after this step (cached + new); `q_len <= ctx_len`.
    pub ctx_len: usize,
    pub blocks: &'a [u32],
}

/// Head counts and sizes shared by every call of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// Storage element: f32 or bf16.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Output pointer shared by the worker threads; each writes disjoint rows/heads.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// Queries per tile: their scores over the whole context live in one scratch buffer.
const TILE: usize = 16;

#[inline(always)]
fn dot<T: Elem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] = a[i].mul_add(b[i].to_f32(), acc[i]);
        }
    }
    let mut s = 0f32;
    for (a, b) in qr.iter().zip(kr) {
        s += a * b.to_f32();
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn axpy<T: Elem>(acc: &mut [f32], p: f32, v: &[T]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a = p.mul_add(b.to_f32(), *a);
    }
}

/// `exp(x)` for `x <= 0` (softmax after subtracting the row maximum), vectorisable:
/// `2^i * 2^f` with `i = round(x log2 e)`, `|f| <= 1/2` and a degree-7 Taylor series of
/// `2^f` (truncation below 3e-9 relative); below -87 it is 0.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let i = t.round_ties_even();
    let f = (t - i) * std::f32::consts::LN_2;
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(f, c);
    }
    // 2^i as the float's exponent bits; i in [-126, 0].
    p * f32::from_bits((((i as i32) + 127) as u32) << 23)
}

/// Hints the cache to load `bytes` bytes from `p` (no effect off x86_64).
#[inline(always)]
fn prefetch<T>(p: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(p);
        let base = p.as_ptr() as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetching is a hint; the address is inside `p`.
            unsafe {
                std::arch::x86_64::_mm_prefetch(base.add(off), std::arch::x86_64::_MM_HINT_T0)
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Attention of one (sequence, KV head) unit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn unit<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    span: &SeqSpan,
    kvh: usize,
    out: OutPtr<T>,
    scratch: &mut Vec<f32>,
) {
    let (nh, nkv, d, bs) = (
        geo.num_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    let g = nh / nkv;
    let scale = 1.0 / (d as f32).sqrt();
    let past = span.ctx_len - span.q_len;
    let mut j0 = 0;
    while j0 < span.q_len {
        let tq = TILE.min(span.q_len - j0);
        let rows = tq * g;
        // Keys this tile can see: up to the last query's position.
        let keys = past + j0 + tq;
        scratch.clear();
        scratch.resize(rows * d + rows * keys + rows * d, 0.0);
        let (qs, rest) = scratch.split_at_mut(rows * d);
        let (scores, acc) = rest.split_at_mut(rows * keys);
        // Row r = (j, head): queries in fp32, pre-scaled.
        for j in 0..tq {
            for hh in 0..g {
                let h = kvh * g + hh;
                let src = &q[((span.q_start + j0 + j) * nh + h) * d..][..d];
                let dst = &mut qs[(j * g + hh) * d..][..d];
                for (o, x) in dst.iter_mut().zip(src) {
                    *o = x.to_f32() * scale;
                }
            }
        }
        // Scores, block by block.
        for (bi, &b) in span.blocks.iter().enumerate() {
            let k0 = bi * bs;
            if k0 >= keys {
                break;
            }
            let n = bs.min(keys - k0);
            let base = ((b as usize * nkv + kvh) * bs) * d;
            let kb = &k_pool[base..base + n * d];
            // The next block's keys, and this block's values (read after the softmax).
            if let Some(&nb) = span.blocks.get(bi + 1) {
                if k0 + bs < keys {
                    let nbase = ((nb as usize * nkv + kvh) * bs) * d;
                    prefetch(&k_pool[nbase..nbase + bs.min(keys - k0 - bs) * d]);
                }
            }
            for t in 0..n {
                let key = &kb[t * d..(t + 1) * d];
                for r in 0..rows {
                    scores[r * keys + k0 + t] = dot(&qs[r * d..(r + 1) * d], key);
                }
            }
        }
        // Softmax per row over its causal window, then the weighted values.
        for r in 0..rows {
            let j = r / g;
            let visible = past + j0 + j + 1;
            let row = &mut scores[r * keys..r * keys + visible];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in row.iter_mut() {
                *x = exp_nonpos(*x - m);
            }
            let mut part = [0f32; 8];
            let chunks = row.chunks_exact(8);
            let mut sum: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                for i in 0..8 {
                    part[i] += c[i];
                }
            }
            sum += part.iter().sum::<f32>();
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
        for (bi, &b) in span.blocks.iter().enumerate() {
            let k0 = bi * bs;
            if k0 >= keys {
                break;
            }
            let n = bs.min(keys - k0);
            let base = ((b as usize * nkv + kvh) * bs) * d;
            let vb = &v_pool[base..base + n * d];
            if let Some(&nb) = span.blocks.get(bi + 1) {
                if k0 + bs < keys {
                    let nbase = ((nb as usize * nkv + kvh) * bs) * d;
                    prefetch(&v_pool[nbase..nbase + bs.min(keys - k0 - bs) * d]);
                }
            }
            for r in 0..rows {
                let visible = past + j0 + r / g + 1;
                let a = &mut acc[r * d..(r + 1) * d];
                for t in 0..n.min(visible.saturating_sub(k0)) {
                    axpy(a, scores[r * keys + k0 + t], &vb[t * d..(t + 1) * d]);
                }
            }
        }
        for j in 0..tq {
            for hh in 0..g {
                let h = kvh * g + hh;
                let r = j * g + hh;
                let off = ((span.q_start + j0 + j) * nh + h) * d;
                // SAFETY: each (row, head) is written by exactly one unit; `out` has N*nh*d
                // elements (checked by the caller).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(off), d) };
                for (o, x) in dst.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                    *o = T::from_f32(*x);
                }
            }
        }
        j0 += tq;
    }
}

#[inline(always)]
fn run<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    units: std::ops::Range<usize>,
) {
    let mut scratch = Vec::new();
    for u in units {
        let (s, kvh) = (u / geo.num_kv_heads, u % geo.num_kv_heads);
        unit(geo, q, k_pool, v_pool, &spans[s], kvh, out, &mut scratch);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    units: std::ops::Range<usize>,
) {
    run(geo, q, k_pool, v_pool, spans, out, units)
}

fn run_best<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    units: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { run_avx2(geo, q, k_pool, v_pool, spans, out, units) };
    }
    run(geo, q, k_pool, v_pool, spans, out, units)
}

/// Why a kernel call was refused (shapes that do not agree).
#[derive(Debug, thiserror::Error)]
#[error("paged attention: {0}")]
pub struct KernelError(pub String);

/// Attention of the packed queries `q` `[N, nh, d]` over the paged keys and values,
/// written to `out` `[N, nh, d]`, on up to `threads` threads.
pub fn paged_attention<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: &mut [T],
    threads: usize,
) -> Result<(), KernelError> {
    let (nh, nkv, d, bs) = (
        geo.num_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    if nkv == 0 || !nh.is_multiple_of(nkv) || d == 0 || bs == 0 {
        return Err(KernelError(format!("bad geometry {geo:?}")));
    }
    if q.len() != out.len() || !q.len().is_multiple_of(nh * d) {
        return Err(KernelError(format!(
            "q has {} elements and out {}; both must be N x {nh} x {d}",
            q.len(),
            out.len()
        )));
    }
    let n = q.len() / (nh * d);
    let num_blocks = k_pool.len() / (nkv * bs * d);
    if k_pool.len() != v_pool.len() || k_pool.len() != num_blocks * nkv * bs * d {
        return Err(KernelError("key and value pools differ in size".into()));
    }
    for (i, s) in spans.iter().enumerate() {
        let ok = s.q_len >= 1
            && s.q_len <= s.ctx_len
            && s.q_start + s.q_len <= n
            && s.blocks.len() * bs >= s.ctx_len
            && s.blocks.iter().all(|&b| (b as usize) < num_blocks);
        if !ok {
            return Err(KernelError(format!(
                "sequence {i}: q rows {}..{} of {n}, {} keys in {} blocks of {bs} (pool {num_blocks})",
                s.q_start,
                s.q_start + s.q_len,
                s.ctx_len,
                s.blocks.len()
            )));
        }
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let units = spans.len() * nkv;
    // Work is roughly keys x queries per unit; below ~64k key reads threads cost more
    // than they save.
    let work: usize = spans.iter().map(|s| s.ctx_len * s.q_len).sum::<usize>() * nkv;
    let threads = threads.clamp(1, units.max(1));
    if threads == 1 || work < 65_536 {
        run_best(geo, q, k_pool, v_pool, spans, ptr, 0..units);
        return Ok(());
    }
    // Balance by work: contiguous unit ranges of about equal key reads.
    let cost = |u: usize| {
        let s = &spans[u / nkv];
        s.ctx_len * s.q_len + 64
    };
    let total: usize = (0..units).map(cost).sum();
    let mut bounds = vec![0];
    let mut acc = 0;
    for u in 0..units {
        acc += cost(u);
        if acc * threads >= total * bounds.len() && bounds.len() < threads {
            bounds.push(u + 1);
        }
    }
    if *bounds.last().expect("non-empty") != units {
        bounds.push(units);
    }
    std::thread::scope(|sc| {
        for w in bounds.windows(2).skip(1) {
            let r = w[0]..w[1];
            sc.spawn(move || run_best(geo, q, k_pool, v_pool, spans, ptr, r));
        }
        run_best(geo, q, k_pool, v_pool, spans, ptr, bounds[0]..bounds[1]);
    });
    Ok(())
}
