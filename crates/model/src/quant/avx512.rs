//! AVX-512 kernels (F, BW, VL and VNNI: Zen 4, Ice Lake and later).
//!
//! Against 8-bit activations, `vpdpbusd` multiplies and sums four byte pairs
//! into each 32-bit lane in one instruction, where AVX2 needs two
//! (`maddubs`, then `madd` against ones), and sixteen rows share a register,
//! a lane each ([`super::Arrangement::Panels`]).
//!
//! Against f32 activations, nibble blocks go through a table lookup and
//! 8-bit blocks are widened and scaled once for a tile of eight tokens;
//! [`super::QuantMatrix`] uses both only on rows of up to
//! [`super::AVX512_F32_COLS`] columns, their activations line-aligned.
//! Zen 4 runs a 512-bit FMA on both of its 256-bit FMA pipes, so merely
//! wider vectors do AVX2's arithmetic in the same time (the straightforward
//! 512-bit nibble kernel measured 7-13% slower on prompts there); these
//! kernels do less work per weight than AVX2's, not just wider.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::prefetch_ahead;
use super::{Arrangement, BLOCK, PANEL, Q8Block, QuantLayout, QuantMatrix, Row};

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

/// Adds block `b` of every token in `xs` times the block's weights, its
/// first sixteen (in the activations' order) `low` and the rest `high`,
/// into that token's two chains.
///
/// # Safety
/// As the kernels', and every token must hold more than `b` blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn accumulate<const N: usize>(
    acc: &mut [[__m512; 2]; N],
    (low, high): (__m512, __m512),
    xs: &[&[f32]; N],
    b: usize,
) {
    for t in 0..N {
        // SAFETY: the caller's promise: block `b` lies within the token.
        unsafe {
            let x = xs[t].as_ptr().add(b * BLOCK);
            acc[t][0] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x.add(16)), acc[t][1]);
        }
    }
}

/// Each token's result from its two chains.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn chain_sums<const N: usize>(acc: [[__m512; 2]; N]) -> [f32; N] {
    std::array::from_fn(|t| hsum(_mm512_add_ps(acc[t][0], acc[t][1])))
}

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
pub(super) unsafe fn nibbles<const N: usize>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
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
        // SAFETY: b < nb, and the checks above bound every pointer below.
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
            accumulate(&mut acc, (low, high), xs, b);
        }
    }
    chain_sums(acc)
}

/// `sum_b (d_b q_b) . x_b` per token for 8-bit blocks, in element order.
///
/// Each block widens once to two vectors of sixteen weights, scaled as
/// dequantizing scales them, for every token of the tile; then two FMAs per
/// block and token. AVX2's kernel widens in four pieces of eight and takes
/// four FMAs and a scaling FMA per block and token, in tiles of four: the
/// LM head of the default model (49152 x 576 Q8_0) is a fifth of a decode
/// step's work.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn int8<const N: usize>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    let (nb, _) = row.checked_blocks::<true>(xs);
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; N];
    for b in 0..nb {
        // SAFETY: b < nb, and `checked_blocks` bounds every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * BLOCK);
            prefetch_ahead(q);
            let d = _mm512_set1_ps(*row.scales.get_unchecked(b));
            let widen = |p: *const u8| {
                let bytes = _mm_loadu_si128(p as *const __m128i);
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
            };
            let (low, high) = (widen(q), widen(q.add(16)));
            accumulate(&mut acc, (low, high), xs, b);
        }
    }
    chain_sums(acc)
}

/// Every token's `sum_b d_b dx_b (q_b . qx_b) + m_b sx_b` for rows `rows` of
/// `m` (in [`Arrangement::Panels`]), into `tile` as `[N, rows]`.
///
/// A panel's sixteen rows sum in the sixteen lanes of one register: per
/// block, eight `vpdpbusd` against the token's block broadcast four bytes at
/// a time, then one conversion and two FMAs per token, and no sum across
/// lanes, since a row's result is its lane. Summing a row's blocks in the
/// lanes instead (the kernel this one replaced) cost a transposition of each
/// row's weights and a horizontal sum per row and token: 3072 x 576 Q4_1
/// against eight tokens on one thread took 138-150 us, now 63.
///
/// `Int8` weights arrive offset by 128 (unsigned, as `vpdpbusd` takes them)
/// and the offset goes back through the activations' block sums, as
/// nibbles' `m` does: `d q = d (q + 128) - 128 d`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn panels_q8<const N: usize>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[Q8Block<'_>; N],
    tile: &mut [f32],
) {
    match m.layout {
        QuantLayout::Nibbles => panels::<N, false>(m, rows, xs, tile),
        QuantLayout::Int8 => panels::<N, true>(m, rows, xs, tile),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn panels<const N: usize, const INT8: bool>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[Q8Block<'_>; N],
    tile: &mut [f32],
) {
    let n = rows.len();
    assert!(
        m.arrangement == Arrangement::Panels && m.layout.block_bytes() == block_bytes::<INT8>()
    );
    assert!(tile.len() == N * n && rows.start.is_multiple_of(PANEL) && rows.end <= m.rows);
    let nb = m.cols / BLOCK;
    let panels = rows.start / PANEL..rows.end.div_ceil(PANEL);
    let blocks = panels.end * nb * PANEL;
    assert!(m.quants.len() >= blocks * block_bytes::<INT8>() && m.scales.len() >= blocks);
    assert!(INT8 || m.mins.len() >= blocks);
    for x in xs {
        assert!(x.quants.len() == nb * BLOCK && x.scales.len() == nb && x.sums.len() == nb);
    }
    let low = _mm512_set1_epi8(0x0F);
    for p in panels {
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let block = p * nb + b;
            // SAFETY: the asserts above bound every load: the panel's blocks
            // lie in `m`, and block b in every token.
            unsafe {
                let q = m.quants.as_ptr().add(block * PANEL * block_bytes::<INT8>());
                let w: [__m512i; 8] = if INT8 {
                    std::array::from_fn(|c| load_ahead(q.add(64 * c)))
                } else {
                    // Vector c's low nibbles are positions 4c..4c + 4, its
                    // high ones 16 + 4c.. (the 8-bit order).
                    let raw: [__m512i; 4] = std::array::from_fn(|c| load_ahead(q.add(64 * c)));
                    std::array::from_fn(|c| {
                        if c < 4 {
                            _mm512_and_si512(raw[c], low)
                        } else {
                            _mm512_and_si512(_mm512_srli_epi16(raw[c - 4], 4), low)
                        }
                    })
                };
                let d = _mm512_loadu_ps(m.scales.as_ptr().add(block * PANEL));
                let offsets = if INT8 {
                    _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
                } else {
                    _mm512_loadu_ps(m.mins.as_ptr().add(block * PANEL))
                };
                for t in 0..N {
                    let x = xs[t].quants.as_ptr().add(b * BLOCK) as *const i32;
                    let piece = |c: usize| _mm512_set1_epi32(x.add(c).read_unaligned());
                    // Integer sums are exact in any order: two chains hide the
                    // latency where few tokens leave the core idle between them.
                    let isum = if N <= 2 {
                        let (mut a, mut e) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for c in (0..8).step_by(2) {
                            a = _mm512_dpbusd_epi32(a, w[c], piece(c));
                            e = _mm512_dpbusd_epi32(e, w[c + 1], piece(c + 1));
                        }
                        _mm512_add_epi32(a, e)
                    } else {
                        let mut a = _mm512_setzero_si512();
                        for (c, &wc) in w.iter().enumerate() {
                            a = _mm512_dpbusd_epi32(a, wc, piece(c));
                        }
                        a
                    };
                    let dx = _mm512_set1_ps(*xs[t].scales.get_unchecked(b));
                    let sx = _mm512_set1_ps(*xs[t].sums.get_unchecked(b));
                    let scaled =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), acc[t]);
                    acc[t] = _mm512_fmadd_ps(offsets, sx, scaled);
                }
            }
        }
        // The panel's rows that `rows` holds (a padded last panel has fewer).
        let first = p * PANEL - rows.start;
        let present: __mmask16 = ((1u32 << (n - first).min(PANEL)) - 1) as __mmask16;
        for (t, &v) in acc.iter().enumerate() {
            // SAFETY: rows first..first + popcount(present) of token t's run
            // lie in the tile (`tile.len() == N * n`).
            unsafe { _mm512_mask_storeu_ps(tile.as_mut_ptr().add(t * n + first), present, v) };
        }
    }
}

/// Bytes of integer parts a block of the layout holds.
const fn block_bytes<const INT8: bool>() -> usize {
    if INT8 { BLOCK } else { BLOCK / 2 }
}

/// 64 bytes at `at`, asking for the blocks a kilobyte on as well
/// ([`prefetch_ahead`]).
///
/// # Safety
/// 64 bytes must be readable at `at`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn load_ahead(at: *const u8) -> __m512i {
    prefetch_ahead(at);
    // SAFETY: the caller guarantees the bytes.
    unsafe { _mm512_loadu_si512(at as *const __m512i) }
}
