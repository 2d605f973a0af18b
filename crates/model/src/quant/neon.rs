//! NEON kernels (AArch64): the Arm counterparts of `avx2.rs`, tested against
//! `scalar.rs` like them. Each kernel expands a 32-weight block once and
//! multiplies it into every token of the tile: to eight f32 vectors of four
//! against f32 activations, to two vectors of 16 bytes against 8-bit ones.
//!
//! Against 8-bit activations there are two integer block products. Every
//! AArch64 CPU has widening multiplies (`smull`, then `sadalp` to add the
//! 16-bit products pairwise into 32-bit lanes): [`Kernel::Neon`]. Armv8.2-A's
//! dot product extension (Cortex-A76, Neoverse N1, Apple M1 and later) sums
//! four byte products into each lane in one instruction, SDOT:
//! [`Kernel::NeonDot`]. Rust still gates its intrinsic (`vdotq_s32`) behind an
//! unstable feature (`stdarch_neon_dotprod`, unstable as of 1.95), so SDOT is
//! inline assembly here, in functions compiled with the `dotprod` target
//! feature so that the assembler accepts it.
//!
//! As in `avx2.rs`, blocks alternate between two sets of accumulators, and a
//! token runs through the same operations in the same order whatever the
//! tile width, so its result does not depend on its batch.
//!
//! Not yet timed on Arm hardware (only run under emulation). Unlike AVX2's
//! kernels these do not prefetch: AArch64's prefetch intrinsic is unstable,
//! and a `prfm` in assembly is worth adding only once measured.
//!
//! [`Kernel::Neon`]: super::Kernel::Neon
//! [`Kernel::NeonDot`]: super::Kernel::NeonDot

use std::arch::aarch64::*;
use std::arch::asm;

use super::{BLOCK, Q8Block, Row};

/// `sum a_i * b_i` over equal-length slices.
#[inline]
#[target_feature(enable = "neon")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n bounds both loads.
        unsafe {
            acc = vfmaq_f32(
                acc,
                vld1q_f32(a.as_ptr().add(i)),
                vld1q_f32(b.as_ptr().add(i)),
            );
        }
        i += 4;
    }
    let mut sum = vaddvq_f32(acc);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// Sixteen bytes `0..=15` as four vectors of four f32.
#[inline]
#[target_feature(enable = "neon")]
fn u8_to_f32(v: uint8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_u8(vget_low_u8(v));
    let hi = vmovl_high_u8(v);
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
        vcvtq_f32_u32(vmovl_high_u16(lo)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
        vcvtq_f32_u32(vmovl_high_u16(hi)),
    ]
}

/// Sixteen signed bytes as four vectors of four f32.
#[inline]
#[target_feature(enable = "neon")]
fn i8_to_f32(v: int8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(v));
    let hi = vmovl_high_s8(v);
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}

/// Two halves of a block, each four vectors, as one block of eight.
#[inline(always)]
fn join<V: Copy>(a: [V; 4], b: [V; 4]) -> [V; 8] {
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The 32 weights of a nibble block as eight vectors of four, unscaled, in
/// element order. Byte `2j` holds elements `j` (low nibble) and `j + 8`
/// (high), byte `2j + 1` elements `j + 16` and `j + 24`: so the low nibbles'
/// even bytes followed by the high nibbles' even bytes are elements 0..16,
/// and the odd bytes likewise 16..32, which two unzips (`uzp1`, `uzp2`) make.
///
/// # Safety
/// `q` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn expand_nibbles(q: *const u8) -> [float32x4_t; 8] {
    // SAFETY: the caller guarantees 16 bytes at `q`.
    let raw = unsafe { vld1q_u8(q) };
    let low = vandq_u8(raw, vdupq_n_u8(0x0F));
    let high = vshrq_n_u8::<4>(raw);
    join(
        u8_to_f32(vuzp1q_u8(low, high)),
        u8_to_f32(vuzp2q_u8(low, high)),
    )
}

/// The 32 weights of an int8 block as eight vectors of four, unscaled.
///
/// # Safety
/// `q` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn expand_int8(q: *const u8) -> [float32x4_t; 8] {
    // SAFETY: the caller guarantees 32 bytes at `q`; each load reads 16 of them.
    let (a, b) = unsafe { (vld1q_s8(q as *const i8), vld1q_s8(q.add(16) as *const i8)) };
    join(i8_to_f32(a), i8_to_f32(b))
}

/// `w . x` for one block of one token, as four lanes still to be summed. Two
/// chains of four multiply-adds rather than one of eight, so that a token's
/// block is not one long latency chain.
///
/// # Safety
/// `x` must point to 32 readable floats.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn block_dot(w: &[float32x4_t; 8], x: *const f32) -> float32x4_t {
    // SAFETY: the caller guarantees 32 floats at `x`; load `i` reads 4 from 4i.
    unsafe {
        let load = |i: usize| vld1q_f32(x.add(4 * i));
        let mut even = vmulq_f32(w[0], load(0));
        let mut odd = vmulq_f32(w[1], load(1));
        even = vfmaq_f32(even, w[2], load(2));
        odd = vfmaq_f32(odd, w[3], load(3));
        even = vfmaq_f32(even, w[4], load(4));
        odd = vfmaq_f32(odd, w[5], load(5));
        even = vfmaq_f32(even, w[6], load(6));
        odd = vfmaq_f32(odd, w[7], load(7));
        vaddq_f32(even, odd)
    }
}

/// Runs `block(b, acc)` for blocks `0..nb`, even blocks into one set of
/// accumulators and odd ones into another, both starting at `zero`, and
/// returns the two sets (as `avx2.rs`'s helper of the same name, which is
/// x86-only: two named arrays, so the accumulators stay in registers).
#[inline(always)]
fn accumulate<V: Copy, const N: usize>(
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

/// Each token's sum over both accumulator sets, lanes always added in the
/// same order.
#[inline]
#[target_feature(enable = "neon")]
fn sum_sets<const N: usize>((even, odd): ([float32x4_t; N], [float32x4_t; N])) -> [f32; N] {
    std::array::from_fn(|t| vaddvq_f32(vaddq_f32(even[t], odd[t])))
}

/// Shared loop of both layouts: `sum_b d_b * (expand(q_b) . x_b)` per token.
/// `INT8` picks the block expansion at compile time, so it inlines.
#[inline]
#[target_feature(enable = "neon")]
fn scaled_dots<const N: usize, const INT8: bool>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    let (nb, block_bytes) = row.checked_blocks::<INT8>(xs);
    let block = |b: usize, acc: &mut [float32x4_t; N]| {
        // SAFETY: b < nb, and the checks above bound every pointer below.
        unsafe {
            let q = row.quants.as_ptr().add(b * block_bytes);
            let w = if INT8 {
                expand_int8(q)
            } else {
                expand_nibbles(q)
            };
            let d = vdupq_n_f32(*row.scales.get_unchecked(b));
            for t in 0..N {
                acc[t] = vfmaq_f32(acc[t], d, block_dot(&w, xs[t].as_ptr().add(b * BLOCK)));
            }
        }
    };
    sum_sets(accumulate(nb, vdupq_n_f32(0.0), block))
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
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
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn int8<const N: usize>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    scaled_dots::<N, true>(row, xs)
}

/// One block's integer products, `w . x` over 32 byte pairs as four 32-bit
/// lanes still to be summed, by widening multiplies: exact, as a product of
/// two bytes (even -128 * -128) fits in 16 bits and `sadalp` widens before
/// adding. The weights come as `(w0, w1)`, the activations as `(x0, x1)`:
/// each pair is a block's first and last 16 bytes.
#[inline]
#[target_feature(enable = "neon")]
fn widening_dot(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    let a = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
    let a = vpadalq_s16(a, vmull_high_s8(w0, x0));
    let b = vpaddlq_s16(vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
    let b = vpadalq_s16(b, vmull_high_s8(w1, x1));
    vaddq_s32(a, b)
}

/// [`widening_dot`] by SDOT: each lane gains four byte products, summed in
/// 32 bits (exact: eight products of at most 2^14 each per lane).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot_dot(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // SAFETY: SDOT reads and writes only these registers, and this function
    // runs only on CPUs with the dot product extension (its target feature).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w0:v}.16b, {x0:v}.16b",
            "sdot {acc:v}.4s, {w1:v}.16b, {x1:v}.16b",
            acc = inout(vreg) acc,
            w0 = in(vreg) w0,
            x0 = in(vreg) x0,
            w1 = in(vreg) w1,
            x1 = in(vreg) x1,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Shared loop of both layouts and both integer products against 8-bit
/// activations: `sum_b d_b dx_b (q_b . qx_b)` per token, each block's dot
/// product an exact integer sum by `int_dot` (`widening_dot` or `sdot_dot`).
///
/// Nibbles need no shuffle: the low nibbles byte by byte, then the high ones,
/// is the order the 8-bit activations are stored in, and values 0..=15 are
/// already signed bytes.
///
/// Not a target-feature function, so that it inlines into its callers,
/// `int_dot` with them: each caller brings its own features (NEON, or NEON
/// and dotprod), which this body and the closure it receives then compile with.
///
/// # Safety
/// The CPU must support NEON, and whatever `int_dot` needs.
#[inline(always)]
unsafe fn scaled_dots_q8<const N: usize, const INT8: bool>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
    int_dot: impl Fn(int8x16_t, int8x16_t, int8x16_t, int8x16_t) -> int32x4_t,
) -> [f32; N] {
    let (nb, block_bytes) = row.checked_blocks_q8::<INT8>(xs);
    let block = |b: usize, acc: &mut [float32x4_t; N]| {
        // SAFETY: b < nb, and the checks above bound every pointer below;
        // the caller guarantees NEON.
        unsafe {
            let q = row.quants.as_ptr().add(b * block_bytes);
            let (w0, w1) = if INT8 {
                (vld1q_s8(q as *const i8), vld1q_s8(q.add(16) as *const i8))
            } else {
                let raw = vld1q_u8(q);
                (
                    vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F))),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)),
                )
            };
            let d = *row.scales.get_unchecked(b);
            for t in 0..N {
                let x = xs[t].quants.as_ptr().add(b * BLOCK);
                let sums = int_dot(w0, w1, vld1q_s8(x), vld1q_s8(x.add(16)));
                let scale = vdupq_n_f32(d * *xs[t].scales.get_unchecked(b));
                acc[t] = vfmaq_f32(acc[t], scale, vcvtq_f32_s32(sums));
            }
        }
    };
    // SAFETY: the caller guarantees NEON.
    unsafe {
        let zero = vdupq_n_f32(0.0);
        sum_sets(accumulate(nb, zero, block))
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn nibbles_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    // SAFETY: the caller guarantees NEON, all `widening_dot` needs.
    let dots = unsafe {
        scaled_dots_q8::<N, false>(row, xs, |w0, w1, x0, x1| widening_dot(w0, w1, x0, x1))
    };
    std::array::from_fn(|t| dots[t] + dot(row.mins, xs[t].sums))
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn int8_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    // SAFETY: as in `nibbles_q8`.
    unsafe { scaled_dots_q8::<N, true>(row, xs, |w0, w1, x0, x1| widening_dot(w0, w1, x0, x1)) }
}

/// [`nibbles_q8`] with SDOT.
///
/// # Safety
/// The CPU must support NEON and the dot product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn nibbles_q8_sdot<const N: usize>(
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
) -> [f32; N] {
    assert!(row.mins.len() == row.scales.len());
    // SAFETY: the caller guarantees NEON and dotprod, all `sdot_dot` needs.
    let dots =
        unsafe { scaled_dots_q8::<N, false>(row, xs, |w0, w1, x0, x1| sdot_dot(w0, w1, x0, x1)) };
    std::array::from_fn(|t| dots[t] + dot(row.mins, xs[t].sums))
}

/// [`int8_q8`] with SDOT.
///
/// # Safety
/// The CPU must support NEON and the dot product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn int8_q8_sdot<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    // SAFETY: as in `nibbles_q8_sdot`.
    unsafe { scaled_dots_q8::<N, true>(row, xs, |w0, w1, x0, x1| sdot_dot(w0, w1, x0, x1)) }
}
