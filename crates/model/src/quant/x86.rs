//! AVX2 + FMA kernels. Each expands a 32-weight block to four f32 vectors once
//! and multiplies it into every token of the tile.

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

/// # Safety
/// The CPU must support AVX2 and FMA. Every `xs[t]` must hold `row.scales.len() * 32`
/// floats and every `xsums[t]` `row.scales.len()` floats.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn nibbles_avx2<const N: usize>(
    row: Row<'_>,
    xs: [&[f32]; N],
    xsums: [&[f32]; N],
) -> [f32; N] {
    let nb = row.scales.len();
    assert!(row.quants.len() == nb * 16 && row.mins.len() == nb);
    for t in 0..N {
        assert!(xs[t].len() == nb * BLOCK && xsums[t].len() == nb);
    }
    let mask = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut offset = [0f32; N];
    for b in 0..nb {
        // SAFETY: b < nb, and the asserts above bound every pointer below.
        unsafe {
            let raw = _mm_loadu_si128(row.quants.as_ptr().add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            let d = _mm256_set1_ps(*row.scales.get_unchecked(b));
            let m = *row.mins.get_unchecked(b);
            for t in 0..N {
                let x = xs[t].as_ptr().add(b * BLOCK);
                let mut s = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
                s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), s);
                s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x.add(16)), s);
                s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x.add(24)), s);
                acc[t] = _mm256_fmadd_ps(d, s, acc[t]);
                offset[t] += m * *xsums[t].get_unchecked(b);
            }
        }
    }
    std::array::from_fn(|t| hsum(acc[t]) + offset[t])
}

/// # Safety
/// The CPU must support AVX2 and FMA. Every `xs[t]` must hold `row.scales.len() * 32` floats.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8_avx2<const N: usize>(row: Row<'_>, xs: [&[f32]; N]) -> [f32; N] {
    let nb = row.scales.len();
    assert!(row.quants.len() == nb * BLOCK);
    for x in xs {
        assert!(x.len() == nb * BLOCK);
    }
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY: b < nb, and the asserts above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * BLOCK);
            let widen = |p: *const u8| {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
            };
            let w0 = widen(q);
            let w1 = widen(q.add(8));
            let w2 = widen(q.add(16));
            let w3 = widen(q.add(24));
            let d = _mm256_set1_ps(*row.scales.get_unchecked(b));
            for t in 0..N {
                let x = xs[t].as_ptr().add(b * BLOCK);
                let mut s = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
                s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), s);
                s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x.add(16)), s);
                s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x.add(24)), s);
                acc[t] = _mm256_fmadd_ps(d, s, acc[t]);
            }
        }
    }
    std::array::from_fn(|t| hsum(acc[t]))
}
