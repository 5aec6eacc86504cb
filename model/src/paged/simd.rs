//! The per-block step of the online-softmax kernel ([`super::kernel`]) in AVX2 + FMA
//! intrinsics (x86_64 only; chosen at run time, `head_dim % 8 == 0`).
//!
//! One call folds `n` keys and values of one block of one KV head into `R` query rows
//! (heads of one query token that share this KV head, so they see the same keys): the
//! scores of 8 keys at a time with one transposing reduction, the block maximum, the
//! rescale of the running sum and accumulator, the exponentials and the weighted values,
//! all in fp32. Same arithmetic as [`super::kernel::block_scalar`] except for the order
//! of the additions.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kernel::{exp_nonpos, Elem};

/// Lane `j` = the sum of the lanes of `a[j]`.
#[inline(always)]
unsafe fn transpose_sum(a: &[__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    )
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// [`exp_nonpos`] on 8 lanes (`x <= 0`; below -87, and -inf, give 0).
#[inline(always)]
unsafe fn exp_nonpos8(x: __m256) -> __m256 {
    let under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
    let t = _mm256_mul_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    );
    let i = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    let f = _mm256_mul_ps(_mm256_sub_ps(t, i), _mm256_set1_ps(std::f32::consts::LN_2));
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    let bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)))
}

/// 8 f32 from `p` (unaligned). `lddqu` rather than `_mm256_loadu_ps`, whose portable
/// body (a `copy_nonoverlapping`) carries debug-build precondition checks.
#[inline(always)]
pub unsafe fn ld(p: *const f32) -> __m256 {
    _mm256_castsi256_ps(_mm256_lddqu_si256(p as *const __m256i))
}

/// Scores of one query row against 8 keys (`kb` rows of `d`), lane `j` = key `j`.
/// Pointer steps are `wrapping_add`, in-bounds by the caller's contract (no debug checks
/// in the inner loop).
#[inline(always)]
unsafe fn scores8<T: Elem>(q: *const f32, kb: *const T, d: usize) -> __m256 {
    let mut a = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let qv = ld(q.wrapping_add(c));
        let mut k = kb.wrapping_add(c);
        for a in a.iter_mut() {
            *a = _mm256_fmadd_ps(qv, T::load8(k), *a);
            k = k.wrapping_add(d);
        }
    }
    transpose_sum(&a)
}

/// Folds `n` (`1..=p_stride`) keys `kb` and values `vb` (`[n, d]` each) into rows
/// `0..R`: queries `qs` (`[R, d]`, pre-scaled), running maxima `m`, sums `l` and
/// accumulators `acc` (`[R, d]`). `p` is scratch of `R * p_stride` floats, `p_stride` a
/// multiple of 8.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `d % 8 == 0`; every pointer covers the extent above.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_avx2<T: Elem, const R: usize>(
    qs: *const f32,
    kb: *const T,
    vb: *const T,
    n: usize,
    d: usize,
    m: *mut f32,
    l: *mut f32,
    acc: *mut f32,
    p: *mut f32,
    p_stride: usize,
) {
    let full = n / 8 * 8;
    let chunks = n.div_ceil(8);
    let mut alpha = [0f32; R];
    let mut rows = [p; R];
    for (r, pr) in rows.iter_mut().enumerate() {
        *pr = p.wrapping_add(r * p_stride);
    }
    for (r, alpha) in alpha.iter_mut().enumerate() {
        let q = qs.wrapping_add(r * d);
        let pr = rows[r];
        let mut k = kb;
        for t0 in (0..full).step_by(8) {
            _mm256_storeu_ps(pr.wrapping_add(t0), scores8(q, k, d));
            k = k.wrapping_add(8 * d);
        }
        if full < n {
            // The tail: real keys first, -inf after (exp gives 0 there).
            let mut tail = [f32::NEG_INFINITY; 8];
            for s in tail.iter_mut().take(n - full) {
                let mut acc8 = _mm256_setzero_ps();
                for c in (0..d).step_by(8) {
                    acc8 =
                        _mm256_fmadd_ps(ld(q.wrapping_add(c)), T::load8(k.wrapping_add(c)), acc8);
                }
                *s = hsum(acc8);
                k = k.wrapping_add(d);
            }
            _mm256_storeu_ps(pr.wrapping_add(full), ld(tail.as_ptr()));
        }
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (0..chunks * 8).step_by(8) {
            mv = _mm256_max_ps(mv, ld(pr.wrapping_add(c)));
        }
        let m_old = *m.add(r);
        let m_new = m_old.max(hmax(mv));
        let mn = _mm256_set1_ps(m_new);
        let mut sv = _mm256_setzero_ps();
        for c in (0..chunks * 8).step_by(8) {
            let e = exp_nonpos8(_mm256_sub_ps(ld(pr.wrapping_add(c)), mn));
            _mm256_storeu_ps(pr.wrapping_add(c), e);
            sv = _mm256_add_ps(sv, e);
        }
        *alpha = exp_nonpos(m_old - m_new);
        *l.add(r) = *l.add(r) * *alpha + hsum(sv);
        *m.add(r) = m_new;
    }
    // Weighted values, 8 columns at a time with R accumulators in registers.
    for c in (0..d).step_by(8) {
        let mut a = [_mm256_setzero_ps(); R];
        for (r, a) in a.iter_mut().enumerate() {
            let x = ld(acc.wrapping_add(r * d + c));
            *a = _mm256_mul_ps(x, _mm256_set1_ps(alpha[r]));
        }
        let mut v = vb.wrapping_add(c);
        for t in 0..n {
            let vv = T::load8(v);
            v = v.wrapping_add(d);
            for (a, pr) in a.iter_mut().zip(&rows) {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*pr.wrapping_add(t)), vv, *a);
            }
        }
        for (r, a) in a.iter().enumerate() {
            _mm256_storeu_ps(acc.wrapping_add(r * d + c), *a);
        }
    }
}
