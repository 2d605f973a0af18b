//! Portable kernels: the fallback on CPUs without SIMD support here, and the
//! reference the SIMD kernels are tested against.

use super::{BLOCK, Q8Block, QuantLayout, Row, nibble};

pub(super) fn dequantize_row(layout: QuantLayout, row: Row<'_>, out: &mut [f32]) {
    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
        let d = row.scales[b];
        match layout {
            QuantLayout::Nibbles => {
                let m = row.mins[b];
                let q = &row.quants[b * 16..(b + 1) * 16];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = d * f32::from(nibble(q, i)) + m;
                }
            }
            QuantLayout::Int8 => {
                let q = &row.quants[b * BLOCK..(b + 1) * BLOCK];
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
    }
}

/// `sum_b d_b * (q_b . x_b) + m_b * sum(x_b)` for each token of the tile.
pub(super) fn nibbles<const N: usize>(
    row: Row<'_>,
    xs: &[&[f32]; N],
    xsums: &[&[f32]; N],
) -> [f32; N] {
    let mut acc = [0f32; N];
    for (b, q) in row.quants.chunks_exact(16).enumerate() {
        for t in 0..N {
            let x = &xs[t][b * BLOCK..(b + 1) * BLOCK];
            let dot: f32 = x
                .iter()
                .enumerate()
                .map(|(i, &x)| f32::from(nibble(q, i)) * x)
                .sum();
            acc[t] += row.scales[b] * dot + row.mins[b] * xsums[t][b];
        }
    }
    acc
}

/// `sum_b d_b * (q_b . x_b)` for each token of the tile.
pub(super) fn int8<const N: usize>(row: Row<'_>, xs: &[&[f32]; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (b, q) in row.quants.chunks_exact(BLOCK).enumerate() {
        for t in 0..N {
            let x = &xs[t][b * BLOCK..(b + 1) * BLOCK];
            let dot: f32 = q.iter().zip(x).map(|(&q, &x)| f32::from(q as i8) * x).sum();
            acc[t] += row.scales[b] * dot;
        }
    }
    acc
}

/// Integer dot product of one nibble block with one block of 8-bit
/// activations, both in the kernels' positional order (low nibbles byte by
/// byte, then high ones).
fn nibble_block_q8(q: &[u8], x: &[i8]) -> i32 {
    (0..16)
        .map(|j| {
            i32::from(q[j] & 0x0F) * i32::from(x[j]) + i32::from(q[j] >> 4) * i32::from(x[j + 16])
        })
        .sum()
}

/// [`nibbles`] against 8-bit activations: `sum_b d_b dx_b (q_b . qx_b) + m_b s_b`,
/// with `s_b = dx_b * sum(qx_b)`.
pub(super) fn nibbles_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (b, q) in row.quants.chunks_exact(16).enumerate() {
        for (t, x) in xs.iter().enumerate() {
            let dot = nibble_block_q8(q, &x.quants[b * BLOCK..(b + 1) * BLOCK]);
            acc[t] += row.scales[b] * x.scales[b] * dot as f32 + row.mins[b] * x.sums[b];
        }
    }
    acc
}

/// [`int8`] against 8-bit activations: `sum_b d_b dx_b (q_b . qx_b)`.
pub(super) fn int8_q8<const N: usize>(row: Row<'_>, xs: &[Q8Block<'_>; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (b, q) in row.quants.chunks_exact(BLOCK).enumerate() {
        for (t, x) in xs.iter().enumerate() {
            let dot: i32 = q
                .iter()
                .zip(&x.quants[b * BLOCK..(b + 1) * BLOCK])
                .map(|(&q, &x)| i32::from(q as i8) * i32::from(x))
                .sum();
            acc[t] += row.scales[b] * x.scales[b] * dot as f32;
        }
    }
    acc
}
