//! The CPU attention kernel over paged KV blocks, in plain Rust over the tensors' memory
//! (per-op libtorch overhead dominates small models, and no libtorch op reads a block
//! table).
//!
//! Layout: queries and output `[N, nh, d]` (the step's tokens packed, no padding); each
//! layer's key and value pools `[num_blocks, nkv, block_size, d]`, so one block of one
//! KV head is `block_size * d` contiguous elements. A sequence's queries are its last
//! `q_len` positions of `ctx_len`; query `j` attends keys `0..=ctx_len - q_len + j`
//! (causal), read through its block table.
//!
//! One pass (flash-decoding's online softmax): each block of each KV head is read once
//! per tile of up to [`TILE`] query tokens, and folded into every query head of its GQA
//! group (the `nh / nkv` heads that share it) with a running maximum and sum per row,
//! the accumulator rescaled when the maximum grows; the output is the accumulator over
//! the sum. A unit of work is one sequence and a range of its KV heads (all of them
//! unless threads outnumber sequences), so a block's KV heads, adjacent in the pool, are
//! read in one sweep. Arithmetic in fp32 over f32 or bf16 storage; AVX2 + FMA where the
//! CPU has them (chosen at run time, [`Isa`]), portable Rust otherwise.
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
    /// 8 consecutive elements as fp32 lanes.
    ///
    /// # Safety
    /// `p..p + 8` must be readable; the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        super::simd::ld(p)
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the high half of an f32: widen to 32 bits and shift into place.
        let h = _mm_lddqu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// Output pointer shared by the worker threads; each writes disjoint rows/heads.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// Query tokens per tile: each block read from memory serves all of them.
pub const TILE: usize = 16;

/// Rows (query heads of one token) folded per block call; larger groups are split.
const MAX_ROWS: usize = 4;

/// Which instructions the kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (what the compiler vectorises for the build target).
    Scalar,
    /// AVX2 + FMA intrinsics (x86_64 CPUs that have them, `head_dim % 8 == 0`).
    Avx2Fma,
}

impl Isa {
    /// The fastest this CPU runs for `head_dim`.
    pub fn best(head_dim: usize) -> Isa {
        #[cfg(target_arch = "x86_64")]
        if head_dim.is_multiple_of(8)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
        let _ = head_dim;
        Isa::Scalar
    }
}

/// `exp(x)` for `x <= 0` (softmax after subtracting the row maximum), vectorisable:
/// `2^i * 2^f` with `i = round(x log2 e)`, `|f| <= 1/2` and a degree-7 Taylor series of
/// `2^f` (truncation below 3e-9 relative); below -87 (and -inf) it is 0. Plain `*` and
/// `+` (a `mul_add` is a library call on CPUs without FMA, where this path runs).
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
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
        p = p * f + c;
    }
    // 2^i as the float's exponent bits; i in [-126, 0].
    let r = p * f32::from_bits((((i as i32) + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        r
    }
}

#[inline(always)]
fn dot<T: Elem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i].to_f32();
        }
    }
    let mut s = 0f32;
    for (a, b) in qr.iter().zip(kr) {
        s += a * b.to_f32();
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Portable form of [`super::simd::block_avx2`]: folds `n` keys `kb` and values `vb`
/// (`[n, d]`) into `rows` rows of queries `qs` (`[rows, d]`, pre-scaled), running maxima
/// `m`, sums `l` and accumulators `acc` (`[rows, d]`); `p` is scratch of `n` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_scalar<T: Elem>(
    qs: &[f32],
    kb: &[T],
    vb: &[T],
    n: usize,
    d: usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    p: &mut [f32],
) {
    for r in 0..m.len() {
        let q = &qs[r * d..(r + 1) * d];
        let p = &mut p[..n];
        for (t, s) in p.iter_mut().enumerate() {
            *s = dot(q, &kb[t * d..(t + 1) * d]);
        }
        let m_new = p.iter().copied().fold(m[r], f32::max);
        let mut sum = 0f32;
        for s in p.iter_mut() {
            *s = exp_nonpos(*s - m_new);
            sum += *s;
        }
        let alpha = exp_nonpos(m[r] - m_new);
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        let a = &mut acc[r * d..(r + 1) * d];
        for x in a.iter_mut() {
            *x *= alpha;
        }
        for (t, &pt) in p.iter().enumerate() {
            for (x, v) in a.iter_mut().zip(&vb[t * d..(t + 1) * d]) {
                *x += pt * v.to_f32();
            }
        }
    }
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

/// Per-thread buffers, sized on first use.
#[derive(Default)]
struct Scratch {
    qs: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    p: Vec<f32>,
}

/// Folds one block of KV head `kh` into `rows` rows starting at `row0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fold<T: Elem>(
    isa: Isa,
    s: &mut Scratch,
    row0: usize,
    rows: usize,
    kb: &[T],
    vb: &[T],
    n: usize,
    d: usize,
) {
    let Scratch { qs, acc, m, l, p } = s;
    let (qs, acc) = (
        &qs[row0 * d..(row0 + rows) * d],
        &mut acc[row0 * d..][..rows * d],
    );
    let (m, l) = (&mut m[row0..row0 + rows], &mut l[row0..row0 + rows]);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            let stride = p.len() / MAX_ROWS;
            let args = (
                qs.as_ptr(),
                kb.as_ptr(),
                vb.as_ptr(),
                n,
                d,
                m.as_mut_ptr(),
                l.as_mut_ptr(),
                acc.as_mut_ptr(),
                p.as_mut_ptr(),
                stride,
            );
            // SAFETY: `Isa::Avx2Fma` is only chosen on CPUs with AVX2 and FMA and for
            // `d % 8 == 0`; the slices above hold `rows` rows of `d`, `n` keys, and `p`
            // `MAX_ROWS` rows of `stride >= n` (see `unit`).
            unsafe {
                use super::simd::block_avx2 as f;
                let (a, b, c, n, d, e, g, h, i, j) = args;
                match rows {
                    1 => f::<T, 1>(a, b, c, n, d, e, g, h, i, j),
                    2 => f::<T, 2>(a, b, c, n, d, e, g, h, i, j),
                    3 => f::<T, 3>(a, b, c, n, d, e, g, h, i, j),
                    _ => f::<T, 4>(a, b, c, n, d, e, g, h, i, j),
                }
            }
        }
        _ => block_scalar(qs, kb, vb, n, d, m, l, acc, p),
    }
}

/// Attention of one sequence's queries for KV heads `kvh` (unit of work).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn unit<T: Elem>(
    isa: Isa,
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    span: &SeqSpan,
    kvh: std::ops::Range<usize>,
    out: OutPtr<T>,
    s: &mut Scratch,
) {
    let (nh, nkv, d, bs) = (
        geo.num_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    let g = nh / nkv;
    // Heads this unit serves: `kvh.start * g..kvh.end * g`; row (j, hh) = j * hs + hh.
    let (h0, hs) = (kvh.start * g, kvh.len() * g);
    let scale = 1.0 / (d as f32).sqrt();
    let past = span.ctx_len - span.q_len;
    let stride = bs.div_ceil(8) * 8;
    s.p.resize(MAX_ROWS * stride, 0.0);
    let mut j0 = 0;
    while j0 < span.q_len {
        let tq = TILE.min(span.q_len - j0);
        let rows = tq * hs;
        // Keys this tile can see: up to its last query's position.
        let keys = past + j0 + tq;
        s.qs.clear();
        for j in 0..tq {
            let src = &q[((span.q_start + j0 + j) * nh + h0) * d..][..hs * d];
            s.qs.extend(src.iter().map(|x| x.to_f32() * scale));
        }
        s.acc.clear();
        s.acc.resize(rows * d, 0.0);
        s.m.clear();
        s.m.resize(rows, f32::NEG_INFINITY);
        s.l.clear();
        s.l.resize(rows, 0.0);
        for (bi, &b) in span.blocks.iter().enumerate() {
            let k0 = bi * bs;
            if k0 >= keys {
                break;
            }
            let n = bs.min(keys - k0);
            // This block's KV heads of the unit are adjacent: [b, kvh, bs, d].
            let base = (b as usize * nkv + kvh.start) * bs * d;
            let span_len = kvh.len() * bs * d;
            if let Some(&nb) = span.blocks.get(bi + 1) {
                if k0 + bs < keys {
                    let nbase = (nb as usize * nkv + kvh.start) * bs * d;
                    prefetch(&k_pool[nbase..nbase + span_len]);
                    prefetch(&v_pool[nbase..nbase + span_len]);
                }
            }
            for (i, kh) in kvh.clone().enumerate() {
                let off = base + i * bs * d;
                let (kb, vb) = (&k_pool[off..off + n * d], &v_pool[off..off + n * d]);
                for j in 0..tq {
                    let visible = past + j0 + j + 1;
                    if visible <= k0 {
                        continue;
                    }
                    let nj = n.min(visible - k0);
                    let first = j * hs + (kh - kvh.start) * g;
                    let mut r = 0;
                    while r < g {
                        let rows = MAX_ROWS.min(g - r);
                        fold(isa, s, first + r, rows, kb, vb, nj, d);
                        r += rows;
                    }
                }
            }
        }
        for j in 0..tq {
            let off = ((span.q_start + j0 + j) * nh + h0) * d;
            // SAFETY: each (row, head) is written by exactly one unit; `out` has N*nh*d
            // elements (checked by the caller).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(off), hs * d) };
            for (hh, dst) in dst.chunks_exact_mut(d).enumerate() {
                let r = j * hs + hh;
                let inv = 1.0 / s.l[r];
                for (o, x) in dst.iter_mut().zip(&s.acc[r * d..(r + 1) * d]) {
                    *o = T::from_f32(*x * inv);
                }
            }
        }
        j0 += tq;
    }
}

/// Units `units` of `split` KV-head ranges per sequence.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run<T: Elem>(
    isa: Isa,
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    split: usize,
    units: std::ops::Range<usize>,
) {
    let mut scratch = Scratch::default();
    let per = geo.num_kv_heads / split;
    for u in units {
        let (si, part) = (u / split, u % split);
        let kvh = part * per..(part + 1) * per;
        unit(
            isa,
            geo,
            q,
            k_pool,
            v_pool,
            &spans[si],
            kvh,
            out,
            &mut scratch,
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_avx2<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    split: usize,
    units: std::ops::Range<usize>,
) {
    run(
        Isa::Avx2Fma,
        geo,
        q,
        k_pool,
        v_pool,
        spans,
        out,
        split,
        units,
    )
}

#[allow(clippy::too_many_arguments)]
fn run_isa<T: Elem>(
    isa: Isa,
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: OutPtr<T>,
    split: usize,
    units: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma {
        // SAFETY: `paged_attention_isa` accepts `Avx2Fma` only where the CPU has both.
        return unsafe { run_avx2(geo, q, k_pool, v_pool, spans, out, split, units) };
    }
    run(
        Isa::Scalar,
        geo,
        q,
        k_pool,
        v_pool,
        spans,
        out,
        split,
        units,
    )
}

/// Why a kernel call was refused (shapes that do not agree).
#[derive(Debug, thiserror::Error)]
#[error("paged attention: {0}")]
pub struct KernelError(pub String);

/// Attention of the packed queries `q` `[N, nh, d]` over the paged keys and values,
/// written to `out` `[N, nh, d]`, on up to `threads` threads, with the best [`Isa`].
pub fn paged_attention<T: Elem>(
    geo: Geometry,
    q: &[T],
    k_pool: &[T],
    v_pool: &[T],
    spans: &[SeqSpan],
    out: &mut [T],
    threads: usize,
) -> Result<(), KernelError> {
    let isa = Isa::best(geo.head_dim);
    paged_attention_isa(isa, geo, q, k_pool, v_pool, spans, out, threads)
}

/// [`paged_attention`] with the instructions named (tests and benchmarks compare them);
/// refuses an [`Isa`] this CPU or `head_dim` cannot run.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_isa<T: Elem>(
    isa: Isa,
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
    if isa == Isa::Avx2Fma && Isa::best(d) != Isa::Avx2Fma {
        return Err(KernelError(format!(
            "AVX2 + FMA needs a CPU with both and head_dim % 8 == 0 (head_dim {d})"
        )));
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
    // Work is roughly keys x queries per sequence; below ~64k key reads threads cost
    // more than they save.
    let work: usize = spans.iter().map(|s| s.ctx_len * s.q_len).sum::<usize>() * nkv;
    let threads = if work < 65_536 { 1 } else { threads.max(1) };
    // A unit is one sequence, or one KV head of it when threads outnumber sequences.
    let split = if threads > spans.len() { nkv } else { 1 };
    let units = spans.len() * split;
    let threads = threads.min(units.max(1));
    if threads == 1 {
        run_isa(isa, geo, q, k_pool, v_pool, spans, ptr, split, 0..units);
        return Ok(());
    }
    // Balance by work: contiguous unit ranges of about equal key reads.
    let cost = |u: usize| {
        let s = &spans[u / split];
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
            sc.spawn(move || run_isa(isa, geo, q, k_pool, v_pool, spans, ptr, split, r));
        }
        run_isa(
            isa,
            geo,
            q,
            k_pool,
            v_pool,
            spans,
            ptr,
            split,
            bounds[0]..bounds[1],
        );
    });
    Ok(())
}
