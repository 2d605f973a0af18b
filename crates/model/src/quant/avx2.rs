//! AVX2 + FMA kernels, and the loop helpers the AVX-512 ones share. Each
//! kernel expands a 32-weight block once and multiplies it into every token
//! of the tile: to four f32 vectors against f32 activations, to 32 bytes
//! against 8-bit ones.
//!
//! Blocks alternate between two sets of accumulators: with one set, the
//! 4-cycle latency of the accumulating FMA, not the arithmetic, bounds a
//! single-token (decode) dot product.

use std::arch::x86_64::*;

use super::{BLOCK, Q8Block, QuantLayout, RoundedBlock, Row};

/// How far ahead of the block being expanded its row's integers are
/// prefetched, in bytes: a few rows on. Rows are short (18 blocks for the
/// default model), too short for the hardware prefetcher to ramp up within
/// one, so without this each row start waits on memory; measured +5-15% on
/// decode (512 and 2048 did no better).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the cache line `PREFETCH_AHEAD` bytes past `q`. A hint: it never
/// faults, so it may point past the matrix's end.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn prefetch_ahead(q: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_AHEAD) as *const i8)
}

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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    let mut sum = hsum(acc);
    // A plain loop: the iterator chain this replaces compiled to a call per
    // element, 5% of decode for rows of 18 blocks.
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// The 32 weights of a nibble block as four vectors of 8, unscaled: one
/// widening load puts word `j` (elements `j`, `j + 8`, `j + 16`, `j + 24`) in
/// lane `j`, and shifts take each vector's nibble out of every lane.
///
/// # Safety
/// `q` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_nibbles(q: *const u8) -> [__m256; 4] {
    // SAFETY: the caller guarantees 16 bytes at `q`.
    let words = _mm256_cvtepu16_epi32(unsafe { _mm_loadu_si128(q as *const __m128i) });
    let mask = _mm256_set1_epi32(0x0F);
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(words, mask)),
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 4), mask)),
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 8), mask)),
        // Bits above 15 are zero: no mask needed.
        _mm256_cvtepi32_ps(_mm256_srli_epi32(words, 12)),
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
fn scaled_dots<const N: usize, const INT8: bool>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    let (nb, block_bytes) = row.checked_blocks::<INT8>(xs);
    let block = |b: usize, acc: &mut [__m256; N]| {
        // SAFETY: b < nb, and the checks above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * block_bytes);
            prefetch_ahead(q);
            let w = if INT8 {
                expand_int8(q)
            } else {
                expand_nibbles(q)
            };
            let d = _mm256_set1_ps(*row.scales.get_unchecked(b));
            for t in 0..N {
                acc[t] = block_fma(&w, d, xs[t].as_ptr().add(b * BLOCK), acc[t]);
            }
        }
    };
    sum_sets(accumulate(nb, _mm256_setzero_ps(), block))
}

/// Runs `block(b, acc)` for blocks `0..nb`, even blocks into one set of
/// accumulators and odd ones into another, both starting at `zero`, and
/// returns the two sets.
///
/// The sets are two named arrays, not one indexed by `b & 1`: a runtime
/// index keeps the accumulators in memory, and the store-to-load round trip
/// then bounds the loop.
#[inline(always)]
pub(super) fn accumulate<V: Copy, const N: usize>(
    nb: usize,
    zero: V,
    mut block: impl FnMut(usize, &mut [V; N]),
) -> ([V; N], [V; N]) {
    let mut even = [zero; N];
    let mut odd = even;
    let mut b = 0;
    while b + 2 <= nb {
        block(b, &mut even);
        block(b + 1, &mut odd);
        b += 2;
    }
    if b < nb {
        block(b, &mut even);
    }
    (even, odd)
}

/// Each token's sum over both accumulator sets.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum_sets<const N: usize>((even, odd): ([__m256; N], [__m256; N])) -> [f32; N] {
    std::array::from_fn(|t| hsum(_mm256_add_ps(even[t], odd[t])))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn nibbles<const N: usize>(
    row: Row<'_>,
    xs: &[&[f32]; N],
    xsums: &[&[f32]; N],
) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    let dots = scaled_dots::<N, false>(row, xs);
    // The offsets add `m_b * sum(x_b)`: one short dot product per token.
    std::array::from_fn(|t| dots[t] + dot(row.mins, xsums[t]))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8<const N: usize>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    scaled_dots::<N, true>(row, xs)
}

/// The 32 weights of a nibble block as unsigned bytes: low nibbles byte by
/// byte, then high ones (the 8-bit activations are stored in that order).
///
/// # Safety
/// `q` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn nibbles_u8(q: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 bytes at `q`.
    let raw = unsafe { _mm_loadu_si128(q as *const __m128i) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Shared loop of both layouts against 8-bit activations:
/// `sum_b d_b dx_b (q_b . qx_b)` per token, each block's dot product an exact
/// integer sum. `maddubs` cannot saturate: its unsigned operand is at most 128
/// and the signed one at most 127 in magnitude, so a pair is below 2^15.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scaled_dots_q8<const N: usize, const INT8: bool>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
) -> [f32; N] {
    let (nb, block_bytes) = row.checked_blocks_q8::<INT8>(xs);
    let ones = _mm256_set1_epi16(1);
    let block = |b: usize, acc: &mut [__m256; N]| {
        // SAFETY: b < nb, and the checks above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * block_bytes);
            prefetch_ahead(q);
            // `maddubs` takes one unsigned operand: nibbles already are; int8
            // weights give their magnitude and lend their sign to the activations.
            let w = if INT8 {
                _mm256_loadu_si256(q as *const __m256i)
            } else {
                nibbles_u8(q)
            };
            let unsigned = if INT8 { _mm256_sign_epi8(w, w) } else { w };
            let d = *row.scales.get_unchecked(b);
            for t in 0..N {
                let x = _mm256_loadu_si256(xs[t].quants.as_ptr().add(b * BLOCK) as *const __m256i);
                let x = if INT8 { _mm256_sign_epi8(x, w) } else { x };
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, x), ones);
                let scale = _mm256_set1_ps(d * *xs[t].scales.get_unchecked(b));
                acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[t]);
            }
        }
    };
    sum_sets(accumulate(nb, _mm256_setzero_ps(), block))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn nibbles_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    let dots = scaled_dots_q8::<N, false>(row, xs);
    std::array::from_fn(|t| dots[t] + dot(row.mins, xs[t].sums))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    scaled_dots_q8::<N, true>(row, xs)
}

/// [`super::round_block`] eight lanes at a time, bit for bit: a block took
/// about 170 cycles through the reference's per-element order and copies,
/// and the rounding of a batch's activations ran on one core while the
/// others waited for the matmul it feeds.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn round_block(block: &[f32; BLOCK], layout: QuantLayout) -> RoundedBlock {
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: four vectors of eight floats within the block.
    let v: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * i)) });
    // `max` keeps its second operand unless the first is greater, as the
    // reference's comparison does: a NaN never wins. The maximum of the
    // rest is the same in any order.
    let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
        _mm256_max_ps(_mm256_andnot_ps(sign, x), m)
    });
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let (lowest, highest) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let q: [__m256i; 4] = v.map(|x| {
        let y = _mm256_mul_ps(x, inv);
        // NaN to 0, as `as` casts it.
        let y = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(y, y), y);
        // Half away from zero, as `f32::round`: the truncation, plus one
        // toward the sign where the part dropped is at least a half. The
        // subtraction is exact below 2^23, and above it nothing is dropped
        // (an infinity's NaN difference compares false).
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let dropped = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
        let away = _mm256_or_ps(_mm256_and_ps(y, sign), one);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(dropped, half), away);
        // Saturating to the i8 range, as `as` casts.
        let r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, up), lowest), highest);
        _mm256_cvttps_epi32(r)
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
    let ordered = match layout {
        QuantLayout::Int8 => q,
        // Positions 0..16 take elements 0..8 interleaved with 16..24, and
        // positions 16..32 elements 8..16 with 24..32 (`NIBBLE_Q8_ORDER`).
        QuantLayout::Nibbles => {
            let interleave = |a: __m256i, b: __m256i| {
                let (lo, hi) = (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
                (
                    _mm256_permute2x128_si256::<0x20>(lo, hi),
                    _mm256_permute2x128_si256::<0x31>(lo, hi),
                )
            };
            let (p0, p1) = interleave(q[0], q[2]);
            let (p2, p3) = interleave(q[1], q[3]);
            [p0, p1, p2, p3]
        }
    };
    // Packing works within 128-bit halves: it leaves each vector's first
    // four bytes, then each one's last four; the permutation restores them.
    let words = (
        _mm256_packs_epi32(ordered[0], ordered[1]),
        _mm256_packs_epi32(ordered[2], ordered[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(words.0, words.1),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    let mut quants = [0i8; BLOCK];
    // SAFETY: 32 bytes.
    unsafe { _mm256_storeu_si256(quants.as_mut_ptr() as *mut __m256i, bytes) };
    RoundedBlock { quants, d, sum }
}
