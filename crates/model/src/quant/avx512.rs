//! AVX-512 kernels (F, BW, VL and VNNI: Zen 4, Ice Lake and later).
//!
//! Against 8-bit activations, `vpdpbusd` multiplies and sums four byte pairs
//! into each 32-bit lane in one instruction, where AVX2 needs two
//! (`maddubs`, then `madd` against ones), and sixteen rows share a register,
//! a lane each ([`super::Arrangement::Panels`]).
//!
//! Against f32 activations, nibble blocks go through a table lookup and
//! 8-bit blocks are widened and scaled once for a tile of eight tokens, and
//! two rows share each load of a token's activations;
//! [`super::QuantMatrix`] uses both only on rows of up to
//! [`super::AVX512_F32_COLS`] columns, their activations line-aligned.
//! Zen 4 runs a 512-bit FMA on both of its 256-bit FMA pipes, so merely
//! wider vectors do AVX2's arithmetic in the same time (the straightforward
//! 512-bit nibble kernel measured 7-13% slower on prompts there); these
//! kernels do less work per weight than AVX2's, not just wider.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::prefetch_ahead;
use super::{Arrangement, BLOCK, NIBBLE_Q8_ORDER, PANEL, Q8Block, QuantLayout, QuantMatrix, Row};

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

/// How a layout's block `b` of a row becomes its 32 weights, as two vectors
/// in the order the activations are in.
trait Expand {
    /// The row's block count, after checking that its parts hold that many
    /// blocks (the bound the kernels' unchecked loads rely on).
    fn checked(row: &Row<'_>) -> usize;

    /// Block `b`'s weights: the first sixteen, then the rest.
    ///
    /// # Safety
    /// As the kernels', and `b` below [`checked`](Self::checked)'s count.
    unsafe fn expand(row: &Row<'_>, b: usize) -> (__m512, __m512);
}

/// Nibble blocks, `x` in [`super::NIBBLE_Q8_ORDER`] within each block.
///
/// A block's weights take only sixteen values, `d q + m`, so one FMA makes
/// them all into a table, and `vpermps` (which reads the low four bits of
/// each index) looks sixteen weights up at once: byte `i` of the block gives
/// lane `i`'s low nibble, and shifted by four its high one. That replaces
/// AVX2's conversions and per-token scaling, and the offsets need no
/// separate sum.
struct Nibbles;

impl Expand for Nibbles {
    #[inline(always)]
    fn checked(row: &Row<'_>) -> usize {
        let nb = row.scales.len();
        assert!(row.quants.len() == nb * BLOCK / 2 && row.mins.len() == nb);
        nb
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn expand(row: &Row<'_>, b: usize) -> (__m512, __m512) {
        // SAFETY: the caller's promise bounds every load.
        unsafe {
            let q = row.quants.as_ptr().add(b * BLOCK / 2);
            prefetch_ahead(q);
            let table = _mm512_fmadd_ps(
                _mm512_set1_ps(*row.scales.get_unchecked(b)),
                _mm512_loadu_ps(NIBBLE_LEVELS.as_ptr()),
                _mm512_set1_ps(*row.mins.get_unchecked(b)),
            );
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i));
            (
                _mm512_permutexvar_ps(bytes, table),
                _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
            )
        }
    }
}

/// 8-bit blocks, in element order: each widens to two vectors of sixteen
/// weights, scaled as dequantizing scales them. AVX2's kernel widens in four
/// pieces of eight and takes four FMAs and a scaling FMA per block and
/// token, in tiles of four: the LM head of the default model (49152 x 576
/// Q8_0) is a fifth of a decode step's work.
struct Int8;

impl Expand for Int8 {
    #[inline(always)]
    fn checked(row: &Row<'_>) -> usize {
        row.checked_weights::<true>().0
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn expand(row: &Row<'_>, b: usize) -> (__m512, __m512) {
        // SAFETY: the caller's promise bounds every load.
        unsafe {
            let q = row.quants.as_ptr().add(b * BLOCK);
            prefetch_ahead(q);
            let d = _mm512_set1_ps(*row.scales.get_unchecked(b));
            let widen = |p: *const u8| {
                let bytes = _mm_loadu_si128(p as *const __m128i);
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
            };
            (widen(q), widen(q.add(16)))
        }
    }
}

/// `from`'s 32-blocks, each in [`super::NIBBLE_Q8_ORDER`], written to
/// `to`: the order's indices, taken across a block's two vectors, are
/// `vpermt2ps`'s.
///
/// # Safety
/// The CPU must support AVX-512 F, `to` must be valid for writing
/// `from.len()` floats, and `from.len()` must be a multiple of 32.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn nibble_order(from: &[f32], to: *mut f32) {
    let order = NIBBLE_Q8_ORDER.map(|i| i as i32);
    // SAFETY: 32 indices; block `b`'s loads lie in `from` and its stores in
    // the caller's `from.len()` floats.
    unsafe {
        let low = _mm512_loadu_si512(order.as_ptr().cast());
        let high = _mm512_loadu_si512(order.as_ptr().add(16).cast());
        for (b, f) in from.chunks_exact(BLOCK).enumerate() {
            let (a, c) = (
                _mm512_loadu_ps(f.as_ptr()),
                _mm512_loadu_ps(f.as_ptr().add(16)),
            );
            let t = to.add(b * BLOCK);
            _mm512_storeu_ps(t, _mm512_permutex2var_ps(a, low, c));
            _mm512_storeu_ps(t.add(16), _mm512_permutex2var_ps(a, high, c));
        }
    }
}

/// `sum_b w_b . x_b` for each of `R` rows and `N` tokens, as `[row][token]`.
///
/// Two rows share each load of a token's activations, which halves the
/// loads per FMA: one row at a time issued as many loads as FMAs. A pass
/// of the default model's first 10 blocks on two threads (medians of 300,
/// alternating processes) went from 5.26-5.39 to 4.72-4.81 ms for eight
/// sessions and from 1.60 to 1.41 ms for one.
///
/// Each row and token sums into one chain, block by block, low sixteen
/// weights then high; every `R` and `N` sums in that order, so a result does
/// not depend on the tile or the row's neighbour, and `R = 2` with eight
/// tokens keeps its sixteen chains beside the weights in the 32 registers.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn rows_dot<E: Expand, const R: usize, const N: usize>(
    rows: [Row<'_>; R],
    xs: &[&[f32]; N],
) -> [[f32; N]; R] {
    let nb = E::checked(&rows[0]);
    for row in &rows[1..] {
        assert!(E::checked(row) == nb);
    }
    for x in xs {
        assert!(x.len() == nb * BLOCK);
    }
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for b in 0..nb {
        // SAFETY: b < nb, and the checks above bound every pointer below.
        unsafe {
            let mut w = [(_mm512_setzero_ps(), _mm512_setzero_ps()); R];
            for r in 0..R {
                w[r] = E::expand(&rows[r], b);
            }
            for t in 0..N {
                let x = xs[t].as_ptr().add(b * BLOCK);
                let (low, high) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
                for r in 0..R {
                    acc[r][t] =
                        _mm512_fmadd_ps(w[r].1, high, _mm512_fmadd_ps(w[r].0, low, acc[r][t]));
                }
            }
        }
    }
    let mut sums = [[0.0; N]; R];
    // The tree costs the same for one sum as for sixteen.
    if R * N < 8 {
        for r in 0..R {
            for t in 0..N {
                sums[r][t] = hsum(acc[r][t]);
            }
        }
        return sums;
    }
    const { assert!(R * N <= 16) };
    let mut v = [_mm512_setzero_ps(); 16];
    for r in 0..R {
        for t in 0..N {
            v[r * N + t] = acc[r][t];
        }
    }
    let all = hsums(&v);
    for r in 0..R {
        for t in 0..N {
            sums[r][t] = all[r * N + t];
        }
    }
    sums
}

/// Each vector's [`hsum`], bit for bit, sixteen at once: each step adds
/// the same lanes as `hsum`'s, but for several vectors in one register,
/// 45 shuffles and adds where sixteen `hsum`s take 128. At 576 columns
/// (18 blocks a row) a tile's sixteen sums cost about a tenth of a pair of
/// rows' work.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn hsums(v: &[__m512; 16]) -> [f32; 16] {
    // Lanes i and i + 8: two vectors' eight partial sums in one register.
    let mut halves = [_mm512_setzero_ps(); 8];
    for (k, h) in halves.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        *h = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        );
    }
    // Lanes j and j + 4 of those: four vectors' four partial sums.
    let mut quarters = [_mm512_setzero_ps(); 4];
    for (m, q) in quarters.iter_mut().enumerate() {
        let (a, b) = (halves[2 * m], halves[2 * m + 1]);
        *q = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        );
    }
    // Lanes 0 + 2 and 1 + 3 of each quarter: eight vectors' two partial sums.
    let mut pairs = [_mm512_setzero_ps(); 2];
    for (p, pair) in pairs.iter_mut().enumerate() {
        let (a, b) = (
            _mm512_castps_pd(quarters[2 * p]),
            _mm512_castps_pd(quarters[2 * p + 1]),
        );
        *pair = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    let (a, b) = (pairs[0], pairs[1]);
    let sums = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(a, b),
        _mm512_shuffle_ps::<0xDD>(a, b),
    );
    let mut lanes = [0f32; 16];
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
    // Vector q + 4j's sum ends in lane 4q + j.
    let mut out = [0f32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = lanes[4 * (i % 4) + i / 4];
    }
    out
}

/// Rows `rows` of `m` against the `N` tokens `xs` (f32), into `tile` as
/// `[N, rows]`, two rows at a time ([`rows_dot`]). Nibble activations come
/// permuted ([`super::NIBBLE_Q8_ORDER`]).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn rows_f32<const N: usize>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[&[f32]; N],
    tile: &mut [f32],
) {
    match m.layout {
        QuantLayout::Nibbles => pairs::<Nibbles, N>(m, rows, xs, tile),
        QuantLayout::Int8 => pairs::<Int8, N>(m, rows, xs, tile),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn pairs<E: Expand, const N: usize>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[&[f32]; N],
    tile: &mut [f32],
) {
    let n = rows.len();
    assert!(tile.len() == N * n);
    let mut put = |i: usize, dots: [f32; N]| {
        for (t, v) in dots.into_iter().enumerate() {
            tile[t * n + i] = v;
        }
    };
    let first = rows.start;
    let mut r = first;
    while r + 2 <= rows.end {
        // SAFETY: the CPU features are this function's own.
        let [a, b] = unsafe { rows_dot::<E, 2, N>([m.row(r), m.row(r + 1)], xs) };
        put(r - first, a);
        put(r + 1 - first, b);
        r += 2;
    }
    if r < rows.end {
        // SAFETY: as above.
        let [a] = unsafe { rows_dot::<E, 1, N>([m.row(r)], xs) };
        put(r - first, a);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Kernel;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn sixteen_sums_at_once_match_one_at_a_time_bit_for_bit() {
        if !Kernel::supported().contains(&Kernel::Avx512) {
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        // Magnitudes far apart, so that any other order of the adds rounds
        // differently.
        let values: Vec<f32> = (0..256)
            .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..8)))
            .collect();
        // SAFETY: the CPU has AVX-512 (checked above); each load reads 16
        // of the 256 floats.
        unsafe {
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, x) in v.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(values[16 * i..].as_ptr());
            }
            let all = hsums(&v);
            for (i, x) in v.into_iter().enumerate() {
                assert_eq!(all[i].to_bits(), hsum(x).to_bits(), "vector {i}");
            }
        }
    }
}
