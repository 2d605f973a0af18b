//! AVX-512 kernels (F, BW, VL and VNNI: Zen 4, Ice Lake and later).
//!
//! Against 8-bit activations, `vpdpbusd` multiplies and sums four byte pairs
//! into each 32-bit lane in one instruction, where AVX2 needs two
//! (`maddubs`, then `madd` against ones), and blocks go two to a register.
//!
//! Against f32 activations only nibble blocks have a kernel here, a table
//! lookup, and [`super::QuantMatrix`] uses it only on rows of up to 1024
//! columns. Zen 4 runs a 512-bit FMA on both of its 256-bit FMA pipes, so
//! merely wider vectors do AVX2's arithmetic in the same time: the
//! straightforward 512-bit kernels measured 7-13% slower on prompts.

use std::arch::x86_64::*;

use super::avx2::{accumulate, dot, nibbles_u8, prefetch_ahead};
use super::{BLOCK, Q8Block, Row};

/// Sums a vector's lanes, always in the same order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// `0.0, 1.0, .., 15.0`: every value a nibble takes.
const NIBBLE_LEVELS: [f32; 16] = {
    let mut levels = [0f32; 16];
    let mut q = 0;
    while q < 16 {
        levels[q] = q as f32;
        q += 1;
    }
    levels
};

/// `sum_b w_b . x_b` per token for nibble blocks, `x` in
/// [`super::NIBBLE_Q8_ORDER`] within each block.
///
/// A block's weights take only sixteen values, `d q + m`, so one FMA makes
/// them all into a table, and `vpermps` (which reads the low four bits of
/// each index) looks sixteen weights up at once: byte `i` of the block gives
/// lane `i`'s low nibble, and shifted by four its high one. That replaces
/// AVX2's conversions and per-token scaling: two FMAs per block and token
/// instead of five half-width ones, and the offsets need no separate sum.
/// Each token sums into two chains (low and high nibbles), the same for any
/// tile width, so tiles of eight tokens fit the 32 registers.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn nibbles<const N: usize>(row: Row<'_>, xs: [&[f32]; N]) -> [f32; N] {
    let nb = row.scales.len();
    assert!(row.quants.len() == nb * BLOCK / 2 && row.mins.len() == nb);
    for x in xs {
        assert!(x.len() == nb * BLOCK);
    }
    // SAFETY: 16 floats.
    let levels = unsafe { _mm512_loadu_ps(NIBBLE_LEVELS.as_ptr()) };
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; N];
    for b in 0..nb {
        // SAFETY: b < nb, and the asserts above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * BLOCK / 2);
            prefetch_ahead(q);
            let table = _mm512_fmadd_ps(
                _mm512_set1_ps(*row.scales.get_unchecked(b)),
                levels,
                _mm512_set1_ps(*row.mins.get_unchecked(b)),
            );
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i));
            let low = _mm512_permutexvar_ps(bytes, table);
            let high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
            for t in 0..N {
                let x = xs[t].as_ptr().add(b * BLOCK);
                acc[t][0] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x), acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x.add(16)), acc[t][1]);
            }
        }
    }
    std::array::from_fn(|t| hsum(_mm512_add_ps(acc[t][0], acc[t][1])))
}

/// Blocks `b` and `b + 1` of nibbles as 64 unsigned bytes: each block's low
/// nibbles byte by byte, then its high ones (the 8-bit activations' order).
///
/// # Safety
/// `q` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn nibble_pair_u8(q: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 32 bytes at `q`.
    let raw = _mm512_castsi256_si512(unsafe { _mm256_loadu_si256(q as *const __m256i) });
    // Each block's 16 bytes twice, [b, b, b + 1, b + 1]; shifting the second
    // copies by 4 brings the high nibbles down (a 64-bit shift pulls the next
    // byte's low bits into each byte's top, which the mask clears).
    let twice = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), raw);
    let shifted = _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
}

/// `[s_b; 8] ++ [s_b+1; 8]`, with `s = d * dx`: the scales of two blocks'
/// integer sums, lane by lane.
///
/// # Safety
/// `d` and `dx` must each point to 2 readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn pair_scales(d: *const f32, dx: *const f32) -> __m512 {
    // SAFETY: the caller guarantees two floats at each pointer.
    let (d, dx) = unsafe {
        (
            _mm_castsi128_ps(_mm_loadl_epi64(d as *const __m128i)),
            _mm_castsi128_ps(_mm_loadl_epi64(dx as *const __m128i)),
        )
    };
    let both = _mm512_castps128_ps512(_mm_mul_ps(d, dx));
    _mm512_permutexvar_ps(
        _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        both,
    )
}

/// Shared loop of both layouts against 8-bit activations:
/// `sum_b d_b dx_b (q_b . qx_b)` per token, two blocks at a time, each
/// block's dot product an exact integer sum.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn scaled_dots_q8<const N: usize, const INT8: bool>(
    row: Row<'_>,
    xs: [Q8Block<'_>; N],
) -> [f32; N] {
    let (nb, _) = row.checked_blocks_q8::<INT8>(&xs);
    // Pairs alternate between two sets of accumulators; a row with an odd
    // number of blocks ends with its last alone in the low half.
    let (even, odd) = accumulate(nb / 2, _mm512_setzero_ps(), |p, acc| {
        // SAFETY: 2p + 2 <= nb.
        unsafe { pair_dots::<N, INT8, true>(row, &xs, 2 * p, acc) }
    });
    let mut total: [__m512; N] = std::array::from_fn(|t| _mm512_add_ps(even[t], odd[t]));
    if nb % 2 == 1 {
        // SAFETY: nb - 1 is the last block.
        unsafe { pair_dots::<N, INT8, false>(row, &xs, nb - 1, &mut total) };
    }
    total.map(|v| hsum(v))
}

/// Adds blocks `b` and `b + 1` (`WHOLE`), or block `b` alone, of `row` times
/// each token's 8-bit activations into `acc`.
///
/// # Safety
/// The blocks must exist in `row` and in every token of `xs`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn pair_dots<const N: usize, const INT8: bool, const WHOLE: bool>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
    b: usize,
    acc: &mut [__m512; N],
) {
    let block_bytes = if INT8 { BLOCK } else { BLOCK / 2 };
    let lanes: __mmask64 = if WHOLE { !0 } else { (1 << BLOCK) - 1 };
    let zero = _mm512_setzero_si512();
    // SAFETY: the caller guarantees the blocks; a lone block's loads are
    // masked to its own bytes.
    unsafe {
        let q = row.quants.as_ptr().add(b * block_bytes);
        prefetch_ahead(q);
        // vpdpbusd takes one unsigned operand: nibbles already are; int8
        // weights give their magnitude and lend their sign to the activations.
        let (unsigned, negative) = if INT8 {
            let w = _mm512_maskz_loadu_epi8(lanes, q as *const i8);
            (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
        } else if WHOLE {
            (nibble_pair_u8(q), 0)
        } else {
            (_mm512_zextsi256_si512(nibbles_u8(q)), 0)
        };
        let d = row.scales.as_ptr().add(b);
        for t in 0..N {
            let x = _mm512_maskz_loadu_epi8(lanes, xs[t].quants.as_ptr().add(b * BLOCK));
            let x = if INT8 {
                _mm512_mask_sub_epi8(x, negative, zero, x)
            } else {
                x
            };
            let sums = _mm512_dpbusd_epi32(zero, unsigned, x);
            let dx = xs[t].scales.as_ptr().add(b);
            let scale = if WHOLE {
                pair_scales(d, dx)
            } else {
                _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(*d * *dx))
            };
            acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[t]);
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn nibbles_q8<const N: usize>(row: Row<'_>, xs: [Q8Block<'_>; N]) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    let dots = scaled_dots_q8::<N, false>(row, xs);
    std::array::from_fn(|t| dots[t] + dot(row.mins, xs[t].sums))
}

/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn int8_q8<const N: usize>(row: Row<'_>, xs: [Q8Block<'_>; N]) -> [f32; N] {
    scaled_dots_q8::<N, true>(row, xs)
}
