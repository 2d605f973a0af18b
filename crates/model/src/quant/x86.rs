//! AVX2 + FMA kernels. Each expands a 32-weight block to four f32 vectors once
//! and multiplies it into every token of the tile.
//!
//! Blocks alternate between two sets of accumulators: with one set, the
//! 4-cycle latency of the accumulating FMA, not the arithmetic, bounds a
//! single-token (decode) dot product.

use std::arch::x86_64::*;

use super::{BLOCK, Row};

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `sum a_i * b_i` over equal-length slices.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both loads.
        unsafe {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
        i += 8;
    }
    hsum(acc)
        + a[i..n]
            .iter()
            .zip(&b[i..n])
            .map(|(x, y)| x * y)
            .sum::<f32>()
}

/// The 32 weights of a nibble block as four vectors of 8, unscaled.
///
/// # Safety
/// `q` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_nibbles(q: *const u8) -> [__m256; 4] {
    // SAFETY: the caller guarantees 16 bytes at `q`.
    let raw = unsafe { _mm_loadu_si128(q as *const __m128i) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    [
        f(lo),
        f(_mm_srli_si128(lo, 8)),
        f(hi),
        f(_mm_srli_si128(hi, 8)),
    ]
}

/// The 32 weights of an int8 block as four vectors of 8, unscaled.
///
/// # Safety
/// `q` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_int8(q: *const u8) -> [__m256; 4] {
    // SAFETY: the caller guarantees 32 bytes at `q`; each load reads 8 of them.
    unsafe {
        let f = |p: *const u8| {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        };
        [f(q), f(q.add(8)), f(q.add(16)), f(q.add(24))]
    }
}

/// `d * (w . x)` accumulated into `acc` for one block of one token.
///
/// # Safety
/// `x` must point to 32 readable floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_fma(w: &[__m256; 4], d: __m256, x: *const f32, acc: __m256) -> __m256 {
    // SAFETY: the caller guarantees 32 floats at `x`.
    unsafe {
        let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
        s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), s);
        s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), s);
        s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), s);
        _mm256_fmadd_ps(d, s, acc)
    }
}

/// Shared loop of both layouts: `sum_b d_b * (expand(q_b) . x_b)` per token.
/// `INT8` picks the block expansion at compile time, so it inlines.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scaled_dots<const N: usize, const INT8: bool>(row: Row<'_>, xs: [&[f32]; N]) -> [f32; N] {
    let block_bytes = if INT8 { BLOCK } else { BLOCK / 2 };
    let nb = row.scales.len();
    assert!(row.quants.len() == nb * block_bytes);
    for x in xs {
        assert!(x.len() == nb * BLOCK);
    }
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..nb {
        let set = b & 1;
        // SAFETY: b < nb, and the asserts above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * block_bytes);
            let w = if INT8 {
                expand_int8(q)
            } else {
                expand_nibbles(q)
            };
            let d = _mm256_set1_ps(*row.scales.get_unchecked(b));
            for t in 0..N {
                acc[set][t] = block_fma(&w, d, xs[t].as_ptr().add(b * BLOCK), acc[set][t]);
            }
        }
    }
    std::array::from_fn(|t| hsum(_mm256_add_ps(acc[0][t], acc[1][t])))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn nibbles_avx2<const N: usize>(
    row: Row<'_>,
    xs: [&[f32]; N],
    xsums: [&[f32]; N],
) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    let dots = scaled_dots::<N, false>(row, xs);
    // The offsets add `m_b * sum(x_b)`: one short dot product per token.
    std::array::from_fn(|t| dots[t] + dot(row.mins, xsums[t]))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8_avx2<const N: usize>(row: Row<'_>, xs: [&[f32]; N]) -> [f32; N] {
    scaled_dots::<N, true>(row, xs)
}
