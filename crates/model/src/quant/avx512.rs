//! AVX-512 kernels (F, BW, VL and VNNI: Zen 4, Ice Lake and later).
//!
//! Against 8-bit activations, `vpdpbusd` multiplies and sums four byte pairs
//! into each 32-bit lane in one instruction, where AVX2 needs two
//! (`maddubs`, then `madd` against ones), and sixteen blocks share a register,
//! a lane each.
//!
//! Against f32 activations only nibble blocks have a kernel here, a table
//! lookup, and [`super::QuantMatrix`] uses it only on rows of up to 1024
//! columns. Zen 4 runs a 512-bit FMA on both of its 256-bit FMA pipes, so
//! merely wider vectors do AVX2's arithmetic in the same time: the
//! straightforward 512-bit kernels measured 7-13% slower on prompts.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{nibbles_u8, prefetch_ahead};
use super::{BLOCK, GROUP, Q8Block, Q8Order, QuantLayout, QuantMatrix, Row};

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

/// Every token's `sum_b d_b dx_b (q_b . qx_b)` (plus `sum_b m_b sx_b` for
/// nibbles) for rows `rows` of `m`, against 8-bit activations in
/// [`super::Q8Order::Grouped`] order, into `tile` as `[N, rows]`.
///
/// Sixteen blocks go to one register, a 32-bit lane each: `vpdpbusd` adds
/// four byte products into a lane, so eight of them sum each lane's block
/// whole, and one conversion and two FMAs then scale sixteen blocks at once
/// (with a block or two to a register, each had to be converted and scaled
/// apart). The row's blocks arrive block after block, so each group of
/// sixteen is transposed in registers, once for every token of the tile,
/// into eight vectors whose lane `i` holds four bytes of block `i`; the
/// activations were stored in that order when they were rounded.
///
/// Rows that leave [`TAIL`] blocks after whole groups (576 columns, the
/// default model's width) have those blocks summed eight rows to a register
/// ([`tail_dots`]); other leftovers go two to a register, eight lanes each.
/// `Int8` weights: `vpdpbusd` takes one unsigned operand, so the weights are
/// offset by 128 (`q + 128` in 0..=255) and the offset taken back through
/// the activations' block sums, as nibbles' `m` is: `d q = d (q + 128) - 128 d`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn q8_rows<const N: usize>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[Q8Block<'_>; N],
    tile: &mut [f32],
) {
    match m.layout {
        QuantLayout::Nibbles => rows_q8::<N, false>(m, rows, xs, tile),
        QuantLayout::Int8 => rows_q8::<N, true>(m, rows, xs, tile),
    }
}

/// Blocks left after a row's whole groups that [`tail_dots`] sums across
/// rows: a 576-column row's.
const TAIL: usize = 2;

/// Rows whose tails fill a register's sixteen lanes.
pub(super) const TAIL_ROWS: usize = GROUP / TAIL;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn rows_q8<const N: usize, const INT8: bool>(
    m: &QuantMatrix,
    rows: Range<usize>,
    xs: &[Q8Block<'_>; N],
    tile: &mut [f32],
) {
    let n = rows.len();
    assert!(tile.len() == N * n);
    let nb = m.cols / BLOCK;
    // Where the rounding put each block: one layout, read the same here.
    let order = Q8Order::Grouped;
    let (whole, slots) = (order.grouped(nb), order.slots(nb));
    for x in xs {
        assert!(x.quants.len() == nb * BLOCK);
        assert!(x.scales.len() == slots && x.sums.len() == slots);
    }
    let across_rows = nb - whole == TAIL;
    // The loop over rows is here, not around a function called a row: such
    // a function repeated its checks of every token and returned its sums
    // through memory, as costly as a 576-column row's arithmetic.
    for (i, r) in rows.clone().enumerate() {
        let row = m.row(r);
        let (row_blocks, _) = row.checked_weights::<INT8>();
        assert!(row_blocks == nb && (INT8 || row.mins.len() == nb));
        let mut acc = [_mm512_setzero_ps(); N];
        for first in (0..whole).step_by(GROUP) {
            // SAFETY: blocks first..first + GROUP exist in the row and
            // (checked above) in every token.
            unsafe { group_dots::<N, INT8>(row, xs, first, &mut acc) };
        }
        if !across_rows {
            for b in (whole..nb).step_by(2) {
                let (_, _, slot) = order.place(nb, b);
                // SAFETY: as above, for block b and, where the row has it, b + 1.
                unsafe {
                    if b + 1 < nb {
                        pair_dots::<N, INT8, true>(row, xs, b, slot, &mut acc);
                    } else {
                        pair_dots::<N, INT8, false>(row, xs, b, slot, &mut acc);
                    }
                }
            }
        }
        for (k, v) in acc.into_iter().enumerate() {
            tile[k * n + i] = hsum(v);
        }
    }
    if across_rows {
        let acts = TailActivations::new(xs, whole);
        for first in (0..n).step_by(TAIL_ROWS) {
            let tail = Tail {
                first,
                count: (n - first).min(TAIL_ROWS),
                row: rows.start + first,
            };
            // SAFETY: `rows` lie in `m` (`m.row` checked each), and the
            // tile holds `n` results a token.
            unsafe { tail_dots::<N, INT8>(m, tail, &acts, tile) };
        }
    }
}

/// Adds blocks `first..first + GROUP` of `row` times each token's
/// activations into `acc`.
///
/// # Safety
/// The blocks must exist in `row` and, as a whole group, in every token of `xs`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn group_dots<const N: usize, const INT8: bool>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
    first: usize,
    acc: &mut [__m512; N],
) {
    // SAFETY: the caller guarantees the blocks.
    unsafe {
        let w = if INT8 {
            let q = row.quants.as_ptr().add(first * BLOCK);
            int8_group(std::array::from_fn(|r| load_ahead(q.add(64 * r))))
        } else {
            let q = row.quants.as_ptr().add(first * BLOCK / 2);
            nibble_group(std::array::from_fn(|r| load_ahead(q.add(64 * r))))
        };
        let d = _mm512_loadu_ps(row.scales.as_ptr().add(first));
        let m = if INT8 {
            _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
        } else {
            _mm512_loadu_ps(row.mins.as_ptr().add(first))
        };
        for t in 0..N {
            let x = xs[t].quants.as_ptr().add(first * BLOCK) as *const __m512i;
            // Integer sums are exact in any order: two chains hide the
            // latency where few tokens leave the core idle between them.
            let isum = if N <= 2 {
                let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in (0..8).step_by(2) {
                    a = _mm512_dpbusd_epi32(a, w[k], _mm512_loadu_si512(x.add(k)));
                    b = _mm512_dpbusd_epi32(b, w[k + 1], _mm512_loadu_si512(x.add(k + 1)));
                }
                _mm512_add_epi32(a, b)
            } else {
                let mut a = _mm512_setzero_si512();
                for (k, &wk) in w.iter().enumerate() {
                    a = _mm512_dpbusd_epi32(a, wk, _mm512_loadu_si512(x.add(k)));
                }
                a
            };
            let dx = _mm512_loadu_ps(xs[t].scales.as_ptr().add(first));
            let sx = _mm512_loadu_ps(xs[t].sums.as_ptr().add(first));
            let scaled = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), acc[t]);
            acc[t] = _mm512_fmadd_ps(m, sx, scaled);
        }
    }
}

/// Adds blocks `b` and `b + 1` (`BOTH`), or block `b` alone, left over after
/// the row's whole groups, times each token's activations into `acc`: eight
/// lanes a block, its scales and sums from `slot` on.
///
/// # Safety
/// The blocks must exist in `row` and in every token of `xs`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn pair_dots<const N: usize, const INT8: bool, const BOTH: bool>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
    b: usize,
    slot: usize,
    acc: &mut [__m512; N],
) {
    let bytes: __mmask64 = if BOTH { !0 } else { (1 << BLOCK) - 1 };
    let lanes: __mmask16 = if BOTH { !0 } else { 0x00FF };
    // Each block's scale and offset in its eight lanes.
    let spread = |v: *const f32| {
        let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        // SAFETY: the caller guarantees block b (and b + 1 where BOTH).
        let two = unsafe { _mm512_maskz_loadu_ps(if BOTH { 0b11 } else { 0b1 }, v) };
        _mm512_permutexvar_ps(pick, two)
    };
    // SAFETY: the caller guarantees the blocks; loads past them are masked.
    unsafe {
        let w = if INT8 {
            let q = _mm512_maskz_loadu_epi8(bytes, row.quants.as_ptr().add(b * BLOCK) as *const i8);
            _mm512_xor_si512(q, _mm512_set1_epi8(-128))
        } else {
            let q = row.quants.as_ptr().add(b * BLOCK / 2);
            if BOTH {
                nibble_pair_u8(q)
            } else {
                _mm512_zextsi256_si512(nibbles_u8(q))
            }
        };
        let d = spread(row.scales.as_ptr().add(b));
        let m = if INT8 {
            _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
        } else {
            spread(row.mins.as_ptr().add(b))
        };
        for t in 0..N {
            let x = _mm512_maskz_loadu_epi8(bytes, xs[t].quants.as_ptr().add(b * BLOCK));
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
            let dx = _mm512_maskz_loadu_ps(lanes, xs[t].scales.as_ptr().add(slot));
            let sx = _mm512_maskz_loadu_ps(lanes, xs[t].sums.as_ptr().add(slot));
            let scaled = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), acc[t]);
            acc[t] = _mm512_fmadd_ps(m, sx, scaled);
        }
    }
}

/// Each token's two blocks after the whole groups, spread for
/// [`tail_dots`], where lanes `2r` and `2r + 1` hold row `r`'s two blocks:
/// vector `c` has in lane `i` positions `4c..4c + 4` of block `i % 2`, and
/// the scales and sums lie likewise.
struct TailActivations<const N: usize> {
    quants: [[__m512i; 8]; N],
    scales: [__m512; N],
    sums: [__m512; N],
}

impl<const N: usize> TailActivations<N> {
    /// From tokens whose leftover blocks start at block `whole`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    fn new(xs: &[Q8Block<'_>; N], whole: usize) -> Self {
        // The leftover blocks lie block after block, so dword c of block
        // `whole + j` is dword 8j + c of the 64 bytes from block `whole`; each
        // block's scale fills eight slots from `whole + 8j`, an eighth of its
        // sum each.
        let piece = |c: i32| lanes(|lane| (lane % 2) * 8 + c);
        let slot = lanes(|lane| (lane % 2) * 8);
        let zero = _mm512_setzero_ps();
        let mut acts = Self {
            quants: [[_mm512_setzero_si512(); 8]; N],
            scales: [zero; N],
            sums: [zero; N],
        };
        for (t, x) in xs.iter().enumerate() {
            assert!(x.quants.len() >= (whole + TAIL) * BLOCK);
            assert!(x.scales.len() >= whole + 16 && x.sums.len() >= whole + 16);
            // SAFETY: the asserts above.
            unsafe {
                let pair =
                    _mm512_loadu_si512(x.quants.as_ptr().add(whole * BLOCK) as *const __m512i);
                acts.quants[t] =
                    std::array::from_fn(|c| _mm512_permutexvar_epi32(piece(c as i32), pair));
                let scales = _mm512_loadu_ps(x.scales.as_ptr().add(whole));
                acts.scales[t] = _mm512_permutexvar_ps(slot, scales);
                // Times 8 is exact: the eighths were the sums times 0.125.
                let sums = _mm512_loadu_ps(x.sums.as_ptr().add(whole));
                acts.sums[t] =
                    _mm512_mul_ps(_mm512_permutexvar_ps(slot, sums), _mm512_set1_ps(8.0));
            }
        }
        acts
    }
}

/// Up to [`TAIL_ROWS`] rows of a task: `count` of them from row `row` of the
/// matrix, whose results start at column `first` of the task's tile.
#[derive(Debug, Clone, Copy)]
struct Tail {
    first: usize,
    count: usize,
    row: usize,
}

/// Adds each row's two blocks after its whole groups to its results in
/// `tile` (`[N, n]`), eight rows to a register: lanes `2r` and `2r + 1` hold
/// row `r`'s two blocks, transposed as a group's sixteen are, so a token's
/// eight `vpdpbusd` and one scaling cover eight rows where [`pair_dots`]
/// spends one `vpdpbusd`, three loads and four conversions or FMAs on each.
/// A row's two lanes are added, then the sum to its result, so each row
/// sums alike whichever rows share its register.
///
/// # Safety
/// Rows `tail.row..tail.row + tail.count` must be rows of `m` that leave
/// [`TAIL`] blocks after whole groups, and `tile` must hold `N` runs of at
/// least `tail.first + tail.count` results.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn tail_dots<const N: usize, const INT8: bool>(
    m: &QuantMatrix,
    tail: Tail,
    acts: &TailActivations<N>,
    tile: &mut [f32],
) {
    let nb = m.cols / BLOCK;
    let whole = nb - TAIL;
    let n = tile.len() / N;
    // Once per eight rows, and the masked store below relies on it.
    assert!(tail.count <= TAIL_ROWS && tail.first + tail.count <= n);
    let present = |r: usize| r < tail.count;
    let rows: __mmask8 = ((1u32 << tail.count) - 1) as __mmask8;
    // Row r's two scales (and offsets), as one 64-bit lane.
    let strides: [i64; 8] = std::array::from_fn(|r| (r * nb) as i64);
    // SAFETY: the caller guarantees the rows, so every load of a present
    // row is inside `m`, and absent rows are neither loaded nor stored.
    unsafe {
        let strides = _mm512_loadu_si512(strides.as_ptr() as *const __m512i);
        let pairs = |v: &[f32]| {
            let at = v.as_ptr().add(tail.row * nb + whole) as *const f64;
            _mm512_castpd_ps(_mm512_mask_i64gather_pd::<4>(
                _mm512_setzero_pd(),
                rows,
                strides,
                at,
            ))
        };
        let w = if INT8 {
            let q = m.quants.as_ptr();
            int8_group(std::array::from_fn(|r| {
                if present(r) {
                    let at = q.add(((tail.row + r) * nb + whole) * BLOCK);
                    _mm512_loadu_si512(at as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                }
            }))
        } else {
            let half = |r: usize| {
                if present(r) {
                    let at = m
                        .quants
                        .as_ptr()
                        .add(((tail.row + r) * nb + whole) * BLOCK / 2);
                    _mm256_loadu_si256(at as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                }
            };
            nibble_group(std::array::from_fn(|k| {
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half(2 * k)), half(2 * k + 1))
            }))
        };
        let d = pairs(&m.scales);
        let offsets = if INT8 {
            _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
        } else {
            pairs(&m.mins)
        };
        let evens = lanes(|lane| (2 * lane) % 16);
        for t in 0..N {
            let x = &acts.quants[t];
            let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in (0..8).step_by(2) {
                a = _mm512_dpbusd_epi32(a, w[c], x[c]);
                b = _mm512_dpbusd_epi32(b, w[c + 1], x[c + 1]);
            }
            let isum = _mm512_add_epi32(a, b);
            let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, acts.scales[t]));
            let blocks = _mm512_fmadd_ps(offsets, acts.sums[t], scaled);
            // Each row's two lanes added into the first, then the rows side by side.
            let both = _mm512_add_ps(blocks, _mm512_permute_ps::<0b10_11_00_01>(blocks));
            let sums = _mm512_castps512_ps256(_mm512_permutexvar_ps(evens, both));
            let out = tile.as_mut_ptr().add(t * n + tail.first);
            let before = _mm256_maskz_loadu_ps(rows, out);
            _mm256_mask_storeu_ps(out, rows, _mm256_add_ps(before, sums));
        }
    }
}

/// Blocks `b` and `b + 1` of nibbles as 64 unsigned bytes: each block's low
/// nibbles byte by byte, then its high ones (the 8-bit activations' order).
///
/// # Safety
/// `q` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn nibble_pair_u8(q: *const u8) -> __m512i {
    prefetch_ahead(q);
    // SAFETY: the caller guarantees 32 bytes at `q`.
    let raw = _mm512_castsi256_si512(unsafe { _mm256_loadu_si256(q as *const __m256i) });
    // Each block's 16 bytes twice, [b, b, b + 1, b + 1]; shifting the second
    // copies by 4 brings the high nibbles down (a 64-bit shift pulls the next
    // byte's low bits into each byte's top, which the mask clears).
    let twice = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), raw);
    let shifted = _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
}

/// Sixteen nibble blocks (16 bytes each), four to a register of `z`
/// (register r's dword 4b + j is block 4r + b's dword j), as eight vectors of
/// unsigned bytes: vector `c`, lane `i` holds block `i`'s positions
/// `4c..4c + 4` in the 8-bit order (low nibbles of bytes `4c..`, then for
/// `c >= 4` the high ones).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn nibble_group(z: [__m512i; 4]) -> [__m512i; 8] {
    // Dwords j and j + 1 of blocks 0-7 (from z0, z1) and of 8-15 (z2, z3),
    // four blocks to each 128-bit quarter; then quarters regrouped by dword.
    let pick = |j: i32| {
        lanes(|lane| {
            let (quarter, b) = (lane / 4, lane % 4);
            (quarter % 2) * 16 + quarter / 2 + j + 4 * b
        })
    };
    let mut dwords = [_mm512_setzero_si512(); 4];
    for j in [0, 2] {
        let low = _mm512_permutex2var_epi32(z[0], pick(j as i32), z[1]);
        let high = _mm512_permutex2var_epi32(z[2], pick(j as i32), z[3]);
        dwords[j] = _mm512_shuffle_i32x4::<0x44>(low, high);
        dwords[j + 1] = _mm512_shuffle_i32x4::<0xEE>(low, high);
    }
    let mask = _mm512_set1_epi8(0x0F);
    std::array::from_fn(|c| {
        let v = dwords[c % 4];
        if c < 4 {
            _mm512_and_si512(v, mask)
        } else {
            _mm512_and_si512(_mm512_srli_epi16(v, 4), mask)
        }
    })
}

/// Sixteen `Int8` blocks (32 bytes each), two to a register of `z`
/// (register r's dword 8b + k is block 2r + b's dword k), as eight vectors:
/// vector `c`, lane `i` holds block `i`'s bytes `4c..4c + 4`, each plus 128
/// (unsigned).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn int8_group(z: [__m512i; 8]) -> [__m512i; 8] {
    // Blocks 4n..4n + 4 (from z[2n], z[2n + 1]) at dwords 4h..4h + 4: quarter
    // k of `quads[n][h]` holds the four blocks' dword 4h + k.
    let pick = |h: i32| {
        lanes(|lane| {
            let (k, b) = (lane / 4, lane % 4);
            (b / 2) * 16 + 8 * (b % 2) + 4 * h + k
        })
    };
    let (first, second) = (pick(0), pick(1));
    let quads: [[__m512i; 2]; 4] = std::array::from_fn(|n| {
        [
            _mm512_permutex2var_epi32(z[2 * n], first, z[2 * n + 1]),
            _mm512_permutex2var_epi32(z[2 * n], second, z[2 * n + 1]),
        ]
    });
    let offset = _mm512_set1_epi8(-128);
    let mut out = [_mm512_setzero_si512(); 8];
    for h in 0..2 {
        // Quarters 0, 1 (then 2, 3) of blocks 0-7 and of 8-15, then one
        // quarter index from each.
        let low01 = _mm512_shuffle_i32x4::<0x44>(quads[0][h], quads[1][h]);
        let high01 = _mm512_shuffle_i32x4::<0x44>(quads[2][h], quads[3][h]);
        let low23 = _mm512_shuffle_i32x4::<0xEE>(quads[0][h], quads[1][h]);
        let high23 = _mm512_shuffle_i32x4::<0xEE>(quads[2][h], quads[3][h]);
        out[4 * h] = _mm512_shuffle_i32x4::<0x88>(low01, high01);
        out[4 * h + 1] = _mm512_shuffle_i32x4::<0xDD>(low01, high01);
        out[4 * h + 2] = _mm512_shuffle_i32x4::<0x88>(low23, high23);
        out[4 * h + 3] = _mm512_shuffle_i32x4::<0xDD>(low23, high23);
    }
    out.map(|v| _mm512_xor_si512(v, offset))
}

/// Sixteen 32-bit lanes, lane `i` set to `f(i)` (a permutation's indices).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
fn lanes(f: impl Fn(i32) -> i32) -> __m512i {
    let v: [i32; 16] = std::array::from_fn(|i| f(i as i32));
    // SAFETY: 16 i32s.
    unsafe { _mm512_loadu_si512(v.as_ptr() as *const __m512i) }
}

/// 64 bytes at `at`, asking for the line a few rows on as well (rows
/// are too short for the hardware prefetcher to ramp up within one).
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
