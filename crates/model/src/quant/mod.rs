//! Quantized weight matrices multiplied by f32 activations.
//!
//! llama.cpp and candle both quantize the activations to 8 bits before the dot
//! product. On small models that visibly changes answers (DESIGN.md, "Default
//! model"), so here the activations stay f32 and only the weights are
//! quantized: each 32-weight block is expanded to f32 inside the kernel.
//!
//! At load time the GGML blocks are repacked into one of two layouts that put
//! scales in f32 arrays apart from the integer parts, so the hot loop never
//! converts f16 and every format shares one kernel per width:
//! - [`QuantLayout::Nibbles`]: `w = d * q + m`, `q` in 0..16 (Q4_0 folds its
//!   offset of 8 into `m = -8d`; Q4_1 stores `m` directly);
//! - [`QuantLayout::Int8`]: `w = d * q`, `q` an i8 (Q8_0).

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

/// Weights per quantization block, for every layout here.
pub const BLOCK: usize = 32;

/// How the integer parts of a [`QuantMatrix`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantLayout {
    /// Two 4-bit values per byte: byte `j` of a block holds element `j` in its
    /// low nibble and element `j + 16` in its high nibble (GGML's order).
    Nibbles,
    /// One signed byte per element.
    Int8,
}

impl QuantLayout {
    /// Bytes of integer data per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Nibbles => BLOCK / 2,
            Self::Int8 => BLOCK,
        }
    }
}

/// A row-major `rows x cols` weight matrix in a repacked quantized layout.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    layout: QuantLayout,
    rows: usize,
    cols: usize,
    /// One scale per block, `rows * cols / 32` of them.
    scales: Vec<f32>,
    /// One additive offset per block (Nibbles only, else empty).
    mins: Vec<f32>,
    quants: Vec<u8>,
}

/// Which instruction set runs the dot products; chosen once per call from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable loop, also the reference the SIMD kernels are tested against.
    Scalar,
    /// AVX2 with FMA (x86-64).
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Self::Avx2;
        }
        Self::Scalar
    }
}

impl QuantMatrix {
    /// Repacks raw GGML blocks, or returns `None` for a format without a kernel here.
    ///
    /// `raw` must hold exactly `rows * cols / block_size * type_size` bytes.
    pub fn from_ggml(dtype: GgmlDType, raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let (layout, type_size) = match dtype {
            GgmlDType::Q4_0 => (QuantLayout::Nibbles, 18),
            GgmlDType::Q4_1 => (QuantLayout::Nibbles, 20),
            GgmlDType::Q8_0 => (QuantLayout::Int8, 34),
            _ => return None,
        };
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * type_size {
            return None;
        }
        let n_blocks = rows * cols / BLOCK;
        let mut scales = Vec::with_capacity(n_blocks);
        let mut mins = Vec::with_capacity(if layout == QuantLayout::Nibbles {
            n_blocks
        } else {
            0
        });
        let mut quants = Vec::with_capacity(n_blocks * layout.block_bytes());
        let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for block in raw.chunks_exact(type_size) {
            let d = half_at(block, 0);
            scales.push(d);
            match dtype {
                GgmlDType::Q4_0 => {
                    mins.push(-8.0 * d);
                    quants.extend_from_slice(&block[2..18]);
                }
                GgmlDType::Q4_1 => {
                    mins.push(half_at(block, 2));
                    quants.extend_from_slice(&block[4..20]);
                }
                _ => quants.extend_from_slice(&block[2..34]),
            }
        }
        Some(Self {
            layout,
            rows,
            cols,
            scales,
            mins,
            quants,
        })
    }

    /// Stacks matrices with equal width and layout into one, rows in order, so
    /// projections that read the same input run as one parallel loop.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|m| m.cols != first.cols || m.layout != first.layout)
        {
            return None;
        }
        let mut out = Self {
            layout: first.layout,
            rows: 0,
            cols: first.cols,
            scales: Vec::new(),
            mins: Vec::new(),
            quants: Vec::new(),
        };
        for m in parts {
            out.rows += m.rows;
            out.scales.extend_from_slice(&m.scales);
            out.mins.extend_from_slice(&m.mins);
            out.quants.extend_from_slice(&m.quants);
        }
        Some(out)
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The integer layout.
    pub fn layout(&self) -> QuantLayout {
        self.layout
    }

    /// Bytes held, for memory accounting.
    pub fn size_in_bytes(&self) -> usize {
        (self.scales.len() + self.mins.len()) * 4 + self.quants.len()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.blocks_per_row();
        let bb = self.layout.block_bytes();
        Row {
            scales: &self.scales[r * nb..(r + 1) * nb],
            mins: match self.layout {
                QuantLayout::Nibbles => &self.mins[r * nb..(r + 1) * nb],
                QuantLayout::Int8 => &[],
            },
            quants: &self.quants[r * nb * bb..(r + 1) * nb * bb],
        }
    }

    /// Writes row `r`, dequantized, into `out` (length `cols`). Used for embedding lookups.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        scalar::dequantize_row(self.layout, self.row(r), out);
    }

    /// Dequantizes the whole matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, chunk) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, chunk);
        }
        out
    }

    /// `y = x W^T` for `x` of shape `[tokens, cols]` (row-major), returning `[tokens, rows]`.
    ///
    /// Rows are split across rayon's pool; within a task, tiles of up to four
    /// tokens share each expanded weight block.
    pub fn matmul(&self, x: &[f32], tokens: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), tokens * self.cols, "activation length");
        let xsums: Vec<f32> = match self.layout {
            QuantLayout::Nibbles => x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect(),
            QuantLayout::Int8 => Vec::new(),
        };
        let acts = Activations {
            x,
            xsums: &xsums,
            cols: self.cols,
        };
        // Enough weights per task that rayon's overhead stays small next to the work.
        let rows_per_task = (16_384 / self.cols).clamp(1, self.rows);
        let mut by_row = vec![0f32; self.rows * tokens];
        by_row
            .par_chunks_mut(rows_per_task * tokens)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, out_row) in out.chunks_exact_mut(tokens).enumerate() {
                    let row = self.row(task * rows_per_task + i);
                    dot_row(self.layout, kernel, row, &acts, out_row);
                }
            });
        if tokens == 1 {
            return by_row;
        }
        let mut out = vec![0f32; self.rows * tokens];
        for (r, vals) in by_row.chunks_exact(tokens).enumerate() {
            for (t, v) in vals.iter().enumerate() {
                out[t * self.rows + r] = *v;
            }
        }
        out
    }
}

/// One row's blocks.
#[derive(Clone, Copy)]
struct Row<'a> {
    scales: &'a [f32],
    mins: &'a [f32],
    quants: &'a [u8],
}

/// Activations for one matmul, with per-block sums for the Nibbles offset term.
struct Activations<'a> {
    x: &'a [f32],
    xsums: &'a [f32],
    cols: usize,
}

impl<'a> Activations<'a> {
    fn token(&self, t: usize) -> (&'a [f32], &'a [f32]) {
        let nb = self.cols / BLOCK;
        let xsums = if self.xsums.is_empty() {
            self.xsums
        } else {
            &self.xsums[t * nb..(t + 1) * nb]
        };
        (&self.x[t * self.cols..(t + 1) * self.cols], xsums)
    }

    fn tile<const N: usize>(&self, t0: usize) -> ([&'a [f32]; N], [&'a [f32]; N]) {
        let mut xs = [&[][..]; N];
        let mut ss = [&[][..]; N];
        for i in 0..N {
            (xs[i], ss[i]) = self.token(t0 + i);
        }
        (xs, ss)
    }
}

/// Dot products of one weight row with every token, into `out[t]`.
fn dot_row(
    layout: QuantLayout,
    kernel: Kernel,
    row: Row<'_>,
    acts: &Activations<'_>,
    out: &mut [f32],
) {
    let tokens = out.len();
    let mut t = 0;
    while t + 4 <= tokens {
        let (xs, ss) = acts.tile::<4>(t);
        out[t..t + 4].copy_from_slice(&dot_tile::<4>(layout, kernel, row, xs, ss));
        t += 4;
    }
    while t < tokens {
        let (xs, ss) = acts.tile::<1>(t);
        out[t] = dot_tile::<1>(layout, kernel, row, xs, ss)[0];
        t += 1;
    }
}

fn dot_tile<const N: usize>(
    layout: QuantLayout,
    kernel: Kernel,
    row: Row<'_>,
    xs: [&[f32]; N],
    xsums: [&[f32]; N],
) -> [f32; N] {
    match (kernel, layout) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Avx2` is only ever produced by `Kernel::detect` after
        // checking that the CPU has AVX2 and FMA; slice lengths are checked inside.
        (Kernel::Avx2, QuantLayout::Nibbles) => unsafe { x86::nibbles_avx2(row, xs, xsums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx2, QuantLayout::Int8) => unsafe { x86::int8_avx2(row, xs) },
        (_, QuantLayout::Nibbles) => scalar::nibbles(row, xs, xsums),
        (_, QuantLayout::Int8) => scalar::int8(row, xs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, quantized::QTensor};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    }

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> (QuantMatrix, Vec<f32>) {
        let w = random(rows, cols, 7);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let exact = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let m = QuantMatrix::from_ggml(dtype, &q.data().unwrap(), rows, cols).unwrap();
        (m, exact)
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, tokens: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * tokens];
        for t in 0..tokens {
            for r in 0..rows {
                out[t * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn repacked_blocks_dequantize_like_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, exact) = quantized(dtype, 8, 96);
            assert_eq!(m.dequantize(), exact, "{dtype:?}");
        }
    }

    #[test]
    fn every_kernel_matches_the_exact_product() {
        let (rows, cols) = (37, 160);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, w) = quantized(dtype, rows, cols);
            for tokens in [1, 3, 4, 9] {
                let x = random(tokens, cols, 11);
                let want = reference(&w, &x, rows, cols, tokens);
                for kernel in [Kernel::Scalar, Kernel::detect()] {
                    let got = m.matmul(&x, tokens, kernel);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{dtype:?} {kernel:?} {tokens}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unsupported_formats_and_wrong_sizes_are_refused() {
        assert!(QuantMatrix::from_ggml(GgmlDType::Q6K, &[0; 210], 1, 256).is_none());
        assert!(QuantMatrix::from_ggml(GgmlDType::Q4_1, &[0; 19], 1, 32).is_none());
        assert!(QuantMatrix::from_ggml(GgmlDType::Q8_0, &[0; 34], 1, 33).is_none());
    }
}
