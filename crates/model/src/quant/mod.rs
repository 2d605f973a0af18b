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
//!
//! [`QuantMatrix::matmul_q8`] is the opt-in fast path (`--q8`): activations
//! rounded to 8 bits per 32-block, as llama.cpp does, so the dot products run
//! on integers.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

/// Weights per quantization block, for every layout here.
pub const BLOCK: usize = 32;

/// How the integer parts of a [`QuantMatrix`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantLayout {
    /// Two 4-bit values per byte, as eight little-endian 16-bit words: word
    /// `j` holds elements `j`, `j + 8`, `j + 16` and `j + 24`, from the low
    /// bits up. One widening load then gives each 32-bit lane its four
    /// elements, and shifts alone (no byte shuffles) expand the block into
    /// four vectors of eight consecutive elements.
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

    /// What [`Arrangement::Panels`] adds to each integer byte (wrapping):
    /// `vpdpbusd` takes one operand unsigned, and the activations are signed.
    const fn panel_offset(self) -> u8 {
        match self {
            Self::Nibbles => 0,
            Self::Int8 => 0x80,
        }
    }
}

/// Where block `b` of row `r` lies in [`Arrangement::Panels`] (rows of `nb`
/// blocks of `bb` bytes): the first byte of its panel's block, and the row's
/// slot among the block's scales.
fn panel_place(r: usize, b: usize, nb: usize, bb: usize) -> (usize, usize) {
    let block = (r / PANEL) * nb + b;
    (block * PANEL * bb, block * PANEL + r % PANEL)
}

/// Where byte `j` of a row's block lies in its panel's block: four bytes of
/// each row to a 64-byte vector, row `r % PANEL` in lane `r % PANEL`.
fn panel_byte(r: usize, j: usize) -> usize {
    (j / 4) * 4 * PANEL + (r % PANEL) * 4 + j % 4
}

/// How a [`QuantMatrix`]'s rows lie in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrangement {
    /// Row after row, each row's blocks in turn: what every kernel against
    /// f32 activations reads, and the 8-bit kernels other than AVX-512's.
    Rows,
    /// Panels of [`PANEL`] rows (the last padded with zero rows), each
    /// panel's blocks in turn, and within a block the rows side by side: its
    /// integer parts as vectors of 64 bytes whose 4-byte lane `i` holds row
    /// `i`'s bytes `4c..4c + 4` (vector `c`), `Int8` ones offset by 128 to
    /// unsigned; then the sixteen scales, and the sixteen offsets (Nibbles).
    /// AVX-512's 8-bit kernel sums sixteen rows in the lanes of one register
    /// against a token's activations broadcast four bytes at a time, so it
    /// shuffles no weights and sums no register across its lanes.
    Panels,
}

/// Rows a panel of [`Arrangement::Panels`] holds: one per 32-bit lane of an
/// AVX-512 register.
pub const PANEL: usize = 16;

/// A `rows x cols` weight matrix in a repacked quantized layout.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    layout: QuantLayout,
    arrangement: Arrangement,
    rows: usize,
    cols: usize,
    /// One scale per block, `rows * cols / 32` of them (by panel, padded, in
    /// [`Arrangement::Panels`]).
    scales: Vec<f32>,
    /// One additive offset per block (Nibbles only, else empty), as `scales`.
    mins: Vec<f32>,
    quants: Vec<u8>,
}

/// The environment variable that picks a [`Kernel`] by name instead of the
/// fastest one: `scalar`, `avx2` or `avx512` on x86-64, `scalar`, `neon` or
/// `neon-dotprod` on AArch64.
pub const KERNEL_ENV: &str = "HYPERTENSOR_KERNEL";

/// Which instruction set runs the dot products; chosen once per process from
/// the CPU's features ([`Kernel::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable loop, also the reference the SIMD kernels are tested against.
    Scalar,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// AVX-512 F, BW, VL and VNNI, with AVX2 and FMA (x86-64: Zen 4, Ice
    /// Lake and later): integer kernels for 8-bit activations; for f32 ones a
    /// table kernel on short nibble rows, AVX2's elsewhere.
    Avx512,
    /// NEON (AArch64): expanded blocks against f32 activations, widening
    /// multiplies (`smull`) against 8-bit ones.
    Neon,
    /// NEON with the dot product extension (AArch64 from Armv8.2-A, where the
    /// CPU has it: Cortex-A76, Neoverse N1, Apple M1 and later): [`Neon`]'s
    /// kernels for f32 activations, SDOT against 8-bit ones.
    ///
    /// [`Neon`]: Kernel::Neon
    NeonDot,
}

impl Kernel {
    /// Whether this kernel was chosen for a CPU with AVX2 and FMA (either x86
    /// kernel), so that code built for those features may run: the proof
    /// the `unsafe` calls of such code rest on.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx2(self) -> bool {
        matches!(self, Self::Avx2 | Self::Avx512)
    }

    /// The fastest kernel this CPU supports, or the one the environment
    /// variable [`KERNEL_ENV`] names if the CPU supports it (for comparing
    /// kernels on one machine). Decided once per process.
    pub fn detect() -> Self {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let supported = Self::supported();
            let fastest = supported.last().copied().unwrap_or(Self::Scalar);
            let Ok(name) = std::env::var(KERNEL_ENV) else {
                return fastest;
            };
            match supported.into_iter().find(|k| k.name() == name) {
                Some(kernel) => kernel,
                None => {
                    tracing::warn!(
                        "{KERNEL_ENV}={name} is not a kernel this CPU supports; using {}",
                        fastest.name()
                    );
                    fastest
                }
            }
        })
    }

    /// The kernel's name, as [`KERNEL_ENV`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
            Self::NeonDot => "neon-dotprod",
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn supported() -> Vec<Self> {
        let mut kernels = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                kernels.push(Self::Avx2);
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                    kernels.push(Self::Avx512);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON is part of the AArch64 baseline, but checked all the same:
            // the kernels' safety rests on this test, not on the target.
            use std::arch::is_aarch64_feature_detected as has;
            if has!("neon") {
                kernels.push(Self::Neon);
                if has!("dotprod") {
                    kernels.push(Self::NeonDot);
                }
            }
        }
        kernels
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
                    quants.extend(nibble_words(&block[2..18]));
                }
                GgmlDType::Q4_1 => {
                    mins.push(half_at(block, 2));
                    quants.extend(nibble_words(&block[4..20]));
                }
                _ => quants.extend_from_slice(&block[2..34]),
            }
        }
        Some(Self {
            layout,
            arrangement: Arrangement::Rows,
            rows,
            cols,
            scales,
            mins,
            quants,
        })
    }

    /// The arrangement the fastest 8-bit kernel reads on this CPU:
    /// [`Arrangement::Panels`] where `kernel` is AVX-512's, else the matrix
    /// as it is.
    pub fn for_q8(self, kernel: Kernel) -> Self {
        match kernel {
            Kernel::Avx512 => self.into_panels(),
            _ => self,
        }
    }

    /// The matrix in [`Arrangement::Panels`].
    pub fn into_panels(self) -> Self {
        if self.arrangement == Arrangement::Panels {
            return self;
        }
        let (nb, bb) = (self.blocks_per_row(), self.layout.block_bytes());
        let panels = self.rows.div_ceil(PANEL);
        let mut quants = vec![0u8; panels * nb * PANEL * bb];
        let mut scales = vec![0f32; panels * nb * PANEL];
        let mut mins = if self.mins.is_empty() {
            Vec::new()
        } else {
            vec![0f32; scales.len()]
        };
        let offset = self.layout.panel_offset();
        for r in 0..self.rows {
            let row = self.row(r);
            for b in 0..nb {
                let (q_at, s_at) = panel_place(r, b, nb, bb);
                for (j, &q) in row.quants[b * bb..(b + 1) * bb].iter().enumerate() {
                    quants[q_at + panel_byte(r, j)] = q ^ offset;
                }
                scales[s_at] = row.scales[b];
                if let Some(m) = mins.get_mut(s_at) {
                    *m = row.mins[b];
                }
            }
        }
        Self {
            arrangement: Arrangement::Panels,
            scales,
            mins,
            quants,
            ..self
        }
    }

    /// The matrix in [`Arrangement::Rows`].
    pub fn to_rows(&self) -> Self {
        if self.arrangement == Arrangement::Rows {
            return self.clone();
        }
        let (nb, bb) = (self.blocks_per_row(), self.layout.block_bytes());
        let mut out = Self {
            arrangement: Arrangement::Rows,
            scales: Vec::with_capacity(self.rows * nb),
            mins: Vec::with_capacity(if self.mins.is_empty() {
                0
            } else {
                self.rows * nb
            }),
            quants: Vec::with_capacity(self.rows * nb * bb),
            ..*self
        };
        for r in 0..self.rows {
            self.panel_row_into(r, &mut out.quants, &mut out.scales, &mut out.mins);
        }
        out
    }

    /// Appends row `r` of a [`Arrangement::Panels`] matrix, as
    /// [`Arrangement::Rows`] holds it, to the three arrays.
    fn panel_row_into(
        &self,
        r: usize,
        quants: &mut Vec<u8>,
        scales: &mut Vec<f32>,
        mins: &mut Vec<f32>,
    ) {
        let (nb, bb) = (self.blocks_per_row(), self.layout.block_bytes());
        let offset = self.layout.panel_offset();
        for b in 0..nb {
            let (q_at, s_at) = panel_place(r, b, nb, bb);
            quants.extend((0..bb).map(|j| self.quants[q_at + panel_byte(r, j)] ^ offset));
            scales.push(self.scales[s_at]);
            if !self.mins.is_empty() {
                mins.push(self.mins[s_at]);
            }
        }
    }

    /// Stacks matrices with equal width and layout into one, rows in order, so
    /// projections that read the same input run as one parallel loop. The
    /// result is in the first part's arrangement.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|m| m.cols != first.cols || m.layout != first.layout)
        {
            return None;
        }
        // Rows always stack; panels only where no part pads its last one.
        // Anything else stacks as rows, then takes the first part's arrangement.
        let stacks = parts.iter().all(|m| match m.arrangement {
            Arrangement::Rows => first.arrangement == Arrangement::Rows,
            Arrangement::Panels => {
                first.arrangement == Arrangement::Panels && m.rows.is_multiple_of(PANEL)
            }
        });
        if !stacks {
            let rows: Vec<QuantMatrix> = parts.iter().map(|m| m.to_rows()).collect();
            let rows = Self::concat_rows(&rows.iter().collect::<Vec<_>>())?;
            return Some(match first.arrangement {
                Arrangement::Rows => rows,
                Arrangement::Panels => rows.into_panels(),
            });
        }
        let mut out = Self {
            layout: first.layout,
            arrangement: first.arrangement,
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

    /// How the rows lie in memory.
    pub fn arrangement(&self) -> Arrangement {
        self.arrangement
    }

    /// Bytes held, for memory accounting.
    pub fn size_in_bytes(&self) -> usize {
        (self.scales.len() + self.mins.len()) * 4 + self.quants.len()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Row `r` of a matrix in [`Arrangement::Rows`].
    #[inline]
    fn row(&self, r: usize) -> Row<'_> {
        debug_assert_eq!(self.arrangement, Arrangement::Rows);
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
        match self.arrangement {
            Arrangement::Rows => scalar::dequantize_row(self.layout, self.row(r), out),
            Arrangement::Panels => {
                let (mut quants, mut scales, mut mins) = (Vec::new(), Vec::new(), Vec::new());
                self.panel_row_into(r, &mut quants, &mut scales, &mut mins);
                let row = Row {
                    scales: &scales,
                    mins: &mins,
                    quants: &quants,
                };
                scalar::dequantize_row(self.layout, row, out);
            }
        }
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
    /// Rows are split across rayon's pool; within a task, tiles of tokens
    /// share each expanded weight block: up to eight for AVX-512's kernels,
    /// four for the others.
    pub fn matmul(&self, x: &[f32], tokens: usize, kernel: Kernel) -> Vec<f32> {
        self.product(x, tokens, kernel, Output::Rows)
    }

    /// `silu(gate) * up` for `x` of shape `[tokens, cols]`, where this
    /// matrix stacks a gate projection's rows over an up projection's (a
    /// gated MLP's two inputs), returning `[tokens, rows / 2]`: the bits of
    /// [`matmul`](Self::matmul)'s halves put through `silu(gate) * up`,
    /// without the `[tokens, rows]` in between or a parallel pass of its own
    /// (~5% of an 8-session decode step's MLP). See [`gates`](Self::gates).
    pub fn matmul_gated(&self, x: &[f32], tokens: usize, kernel: Kernel) -> Vec<f32> {
        self.product(x, tokens, kernel, Output::Gated)
    }

    /// Whether [`matmul_gated`](Self::matmul_gated) and
    /// [`matmul_q8_gated`](Self::matmul_q8_gated) take this matrix: its rows
    /// halve evenly (into whole panels, where it has them).
    pub fn gates(&self) -> bool {
        let half = self.rows / 2;
        self.rows.is_multiple_of(2)
            && half > 0
            && (self.arrangement == Arrangement::Rows || half.is_multiple_of(PANEL))
    }

    fn product(&self, x: &[f32], tokens: usize, kernel: Kernel, output: Output) -> Vec<f32> {
        assert_eq!(x.len(), tokens * self.cols, "activation length");
        if self.arrangement == Arrangement::Panels {
            // Not a path inference takes: panels are made for 8-bit
            // activations only (`Linear` at `Precision::Q8`).
            return self.to_rows().product(x, tokens, kernel, output);
        }
        if kernel == Kernel::Avx512 && self.cols <= AVX512_F32_COLS {
            // The table kernel meets each block's activations in the 8-bit
            // kernels' order; its table holds the offsets, so no block sums.
            let x = match self.layout {
                QuantLayout::Int8 => AlignedF32::copy(x),
                QuantLayout::Nibbles => AlignedF32::nibble_ordered(x, kernel),
            };
            let acts = Activations {
                x: x.as_slice(),
                xsums: &[],
                cols: self.cols,
            };
            return self.by_rows(tokens, 8, &F32Tiles(self.layout, kernel, acts), output);
        }
        // Elsewhere AVX2's kernels are the faster ones for f32 activations.
        let kernel = match kernel {
            Kernel::Avx512 => Kernel::Avx2,
            other => other,
        };
        let xsums: Vec<f32> = match self.layout {
            QuantLayout::Nibbles => x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect(),
            QuantLayout::Int8 => Vec::new(),
        };
        let x = AlignedF32::copy(x);
        let acts = Activations {
            x: x.as_slice(),
            xsums: &xsums,
            cols: self.cols,
        };
        self.by_rows(tokens, 4, &F32Tiles(self.layout, kernel, acts), output)
    }

    /// [`matmul`](Self::matmul) with the activations first rounded to 8 bits
    /// per 32-block (scale `max|x| / 127`), so each block's dot product is an
    /// exact integer sum: faster, and what llama.cpp computes (AVX-512 sums
    /// Int8 weights offset by 128 and takes the offset back in f32, so there
    /// those results may differ from llama.cpp's in the last bits). Tiles
    /// take up to eight tokens on AVX-512, four elsewhere.
    pub fn matmul_q8(&self, x: &[f32], tokens: usize, kernel: Kernel) -> Vec<f32> {
        self.product_q8(x, tokens, kernel, Output::Rows)
    }

    /// [`matmul_gated`](Self::matmul_gated) with [`matmul_q8`](Self::matmul_q8)'s
    /// 8-bit activations.
    pub fn matmul_q8_gated(&self, x: &[f32], tokens: usize, kernel: Kernel) -> Vec<f32> {
        self.product_q8(x, tokens, kernel, Output::Gated)
    }

    fn product_q8(&self, x: &[f32], tokens: usize, kernel: Kernel, output: Output) -> Vec<f32> {
        assert_eq!(x.len(), tokens * self.cols, "activation length");
        let (kernel, widest) = match (self.arrangement, kernel) {
            // Eight tokens' accumulators, a register each, beside a block's
            // eight vectors of weights.
            (Arrangement::Panels, Kernel::Avx512) => (kernel, 8),
            // Other kernels read rows; tests compare them on both.
            (Arrangement::Panels, _) => {
                return self.to_rows().product_q8(x, tokens, kernel, output);
            }
            // AVX-512's kernel reads panels; on rows AVX2's runs.
            (Arrangement::Rows, Kernel::Avx512) => (Kernel::Avx2, 4),
            (Arrangement::Rows, _) => (kernel, 4),
        };
        let acts = Q8Activations::quantize(x, self.cols, self.layout, kernel);
        self.by_rows(tokens, widest, &Q8Tiles(self.layout, kernel, acts), output)
    }

    /// Every row's dot products with every token, rows split across rayon's
    /// pool, as `[tokens, rows]`, in tiles of at most `widest` tokens; or,
    /// for [`Output::Gated`], `silu(gate) * up` of each task's gate rows and
    /// the up rows half a matrix below them, as `[tokens, rows / 2]`.
    ///
    /// A task takes a few rows and runs token tiles outside, rows inside, so
    /// both its rows' blocks and a tile's activations stay in L1 (rows outside
    /// re-read every token's activations from L2 for each row). Tokens left
    /// after the widest tiles go in one narrower tile (a server's batch of 7
    /// decode steps runs as one tile of 7, or as 4 and 3), not one by one:
    /// each tile expands every weight block once. Every tile width sums a
    /// token's blocks in the same order, so a session's result does not
    /// depend on the batch it ran in.
    fn by_rows(
        &self,
        tokens: usize,
        widest: usize,
        tiles: &impl Tiles,
        output: Output,
    ) -> Vec<f32> {
        // Enough weights per task that rayon's overhead stays small next to
        // the work, and few enough that they stay in L1; whole panels.
        let unit = match self.arrangement {
            Arrangement::Rows => 1,
            Arrangement::Panels => PANEL,
        };
        let (out_rows, weights_per_row) = match output {
            Output::Rows => (self.rows, 1),
            Output::Gated => {
                assert!(
                    self.gates(),
                    "{} rows do not halve into gate and up",
                    self.rows
                );
                (self.rows / 2, 2)
            }
        };
        let rows_per_task = (16_384 / (self.cols * weights_per_row))
            .next_multiple_of(unit)
            .clamp(1, out_rows.next_multiple_of(unit));
        let total = out_rows * tokens;
        let mut out: Vec<f32> = Vec::with_capacity(total);
        // Each tile's results go from a small buffer straight into place, a
        // run of the task's rows per token. Gathering whole tasks' results
        // and copying them into place afterwards took 40% of a 64-token
        // matmul (3072 x 576); writing each result into place at once put a
        // tile's tokens, a whole output row apart, in one cache set.
        let dst = Columns(out.spare_capacity_mut().as_mut_ptr().cast());
        (0..out_rows.div_ceil(rows_per_task))
            .into_par_iter()
            // Tile buffers a worker, reused, rather than ones cleared for
            // every task.
            .for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(tile, up, gated), task| {
                    let first = task * rows_per_task;
                    let rows = first..(first + rows_per_task).min(out_rows);
                    let mut t = 0;
                    while t < tokens {
                        let width = widest.min(8).min(tokens - t);
                        tile.resize(width * rows.len(), 0.0);
                        fill(self, tiles, rows.clone(), t, width, tile);
                        let results: &[f32] = match output {
                            Output::Rows => tile,
                            Output::Gated => {
                                up.resize(tile.len(), 0.0);
                                let up_rows = rows.start + out_rows..rows.end + out_rows;
                                fill(self, tiles, up_rows, t, width, up);
                                gated.resize(tile.len(), 0.0);
                                crate::fused::silu_times_into(tile, up, gated);
                                gated
                            }
                        };
                        for (k, run) in results.chunks_exact(rows.len()).enumerate() {
                            // SAFETY: `rows` lie within `0..out_rows` and
                            // token `t + k` within the output's `tokens`, so
                            // the run is inside it; no other task writes
                            // these rows.
                            unsafe { dst.write((t + k) * out_rows + rows.start, run) };
                        }
                        t += width;
                    }
                },
            );
        // SAFETY: the tasks' rows cover `0..out_rows`, and each task wrote
        // every token's run of its rows (a panic in a task propagates before
        // this line).
        unsafe { out.set_len(total) };
        out
    }

    /// `rows`' dot products with one tile of `N` tokens, into `tile` as
    /// `[N, rows]`, each row's from `dots`.
    fn each_row<const N: usize>(
        &self,
        rows: Range<usize>,
        tile: &mut [f32],
        dots: impl Fn(Row<'_>) -> [f32; N],
    ) {
        let n = rows.len();
        for (i, r) in rows.enumerate() {
            for (k, v) in dots(self.row(r)).into_iter().enumerate() {
                tile[k * n + i] = v;
            }
        }
    }
}

/// A `[tokens, rows]` output being filled, tasks writing disjoint rows.
struct Columns(*mut f32);

impl Columns {
    /// Copies `run` to elements `at..at + run.len()`.
    ///
    /// # Safety
    /// Those elements lie inside the output, and no other thread writes
    /// them meanwhile.
    unsafe fn write(&self, at: usize, run: &[f32]) {
        // Eight floats a store: runs are a few dozen floats, where a call to
        // `memcpy` for each cost more than the copying.
        let (eights, rest) = run.as_chunks::<8>();
        // SAFETY: as the caller promises, for every element written.
        unsafe {
            let to = self.0.add(at);
            for (i, eight) in eights.iter().enumerate() {
                to.add(8 * i).cast::<[f32; 8]>().write_unaligned(*eight);
            }
            for (i, &v) in rest.iter().enumerate() {
                to.add(8 * eights.len() + i).write(v);
            }
        }
    }
}

// SAFETY: tasks write disjoint elements through it (see `by_rows`).
unsafe impl Sync for Columns {}

/// What [`QuantMatrix::by_rows`] hands back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Every row's dot products.
    Rows,
    /// `silu(gate) * up`, the rows being gate's over up's.
    Gated,
}

/// `rows` of `m` against tokens `t..t + width` into `tile`, through the
/// kernel built for that width.
fn fill(
    m: &QuantMatrix,
    tiles: &impl Tiles,
    rows: Range<usize>,
    t: usize,
    width: usize,
    tile: &mut [f32],
) {
    match width {
        8 => tiles.fill::<8>(m, rows, t, tile),
        7 => tiles.fill::<7>(m, rows, t, tile),
        6 => tiles.fill::<6>(m, rows, t, tile),
        5 => tiles.fill::<5>(m, rows, t, tile),
        4 => tiles.fill::<4>(m, rows, t, tile),
        3 => tiles.fill::<3>(m, rows, t, tile),
        2 => tiles.fill::<2>(m, rows, t, tile),
        _ => tiles.fill::<1>(m, rows, t, tile),
    }
}

/// One matmul's activations and kernel, for any tile width.
trait Tiles: Sync {
    /// Rows `rows` of `m` against tokens `t..t + N`, into `tile` as
    /// `[N, rows]`, the tile's activations taken once for all the rows (not
    /// once a row: rebuilding them a row stalled every row on a
    /// store-forwarding miss).
    fn fill<const N: usize>(&self, m: &QuantMatrix, rows: Range<usize>, t: usize, tile: &mut [f32]);
}

/// f32 activations.
struct F32Tiles<'a>(QuantLayout, Kernel, Activations<'a>);

impl Tiles for F32Tiles<'_> {
    fn fill<const N: usize>(
        &self,
        m: &QuantMatrix,
        rows: Range<usize>,
        t: usize,
        tile: &mut [f32],
    ) {
        let xs = self.2.tile::<N>(t);
        #[cfg(target_arch = "x86_64")]
        if self.1 == Kernel::Avx512 {
            // SAFETY: `Kernel::Avx512` is only ever produced by
            // `Kernel::supported` after checking for its features; `matmul`
            // gives it only the matrices it suits, with their activations
            // permuted; lengths are checked inside.
            return unsafe { avx512::rows_f32(m, rows, &xs.0, tile) };
        }
        m.each_row(rows, tile, |row| {
            dot_tile(self.0, self.1, row, (&xs.0, &xs.1))
        });
    }
}

/// Activations rounded to 8 bits.
struct Q8Tiles(QuantLayout, Kernel, Q8Activations);

impl Tiles for Q8Tiles {
    fn fill<const N: usize>(
        &self,
        m: &QuantMatrix,
        rows: Range<usize>,
        t: usize,
        tile: &mut [f32],
    ) {
        let xs = self.2.tile::<N>(t);
        match (m.arrangement, self.1) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512` is only ever produced by
            // `Kernel::supported` after checking for its features; lengths
            // are checked inside.
            (Arrangement::Panels, Kernel::Avx512) => unsafe {
                avx512::panels_q8(m, rows, &xs, tile)
            },
            // `matmul_q8` gives other kernels only rows.
            _ => m.each_row(rows, tile, |row| dot_tile_q8(self.0, self.1, row, &xs)),
        }
    }
}

/// GGML's nibble block (byte `j`: element `j` low, `j + 16` high) in the
/// [`QuantLayout::Nibbles`] order.
fn nibble_words(ggml: &[u8]) -> [u8; 16] {
    let element = |i: usize| (ggml[i % 16] >> (4 * (i / 16))) & 0x0F;
    std::array::from_fn(|byte| {
        let (j, high_half) = (byte / 2, byte % 2);
        element(j + 16 * high_half) | element(j + 8 + 16 * high_half) << 4
    })
}

/// Element `i` of a block in the [`QuantLayout::Nibbles`] order.
fn nibble(q: &[u8], i: usize) -> u8 {
    let (j, k) = (i % 8, i / 8);
    (q[2 * j + k / 2] >> (4 * (k % 2))) & 0x0F
}

/// Where the 8-bit kernels meet each element of a nibble block: they take a
/// block's low nibbles, byte by byte, then its high ones, so position `p`
/// holds element `NIBBLE_Q8_ORDER[p]`. 8-bit activations are stored in this
/// order, so that the integer dot products need no byte shuffles either.
const NIBBLE_Q8_ORDER: [usize; BLOCK] = {
    let mut order = [0; BLOCK];
    let mut p = 0;
    while p < BLOCK {
        let (byte, high) = (p % 16, p / 16);
        // Byte 2j holds elements j (low) and j + 8; byte 2j + 1 holds j + 16 and j + 24.
        order[p] = byte / 2 + 16 * (byte % 2) + 8 * high;
        p += 1;
    }
    order
};

/// The element an 8-bit kernel meets at position `p` of a block of weights
/// in `layout`.
fn q8_element(layout: QuantLayout, p: usize) -> usize {
    match layout {
        QuantLayout::Nibbles => NIBBLE_Q8_ORDER[p],
        QuantLayout::Int8 => p,
    }
}

/// One block of activations rounded to 8 bits.
struct RoundedBlock {
    /// `x / d` rounded, in the order the kernels meet the block's weights
    /// ([`q8_element`]).
    quants: [i8; BLOCK],
    /// The scale, `max|x| / 127`.
    d: f32,
    /// The sum of `quants`.
    sum: i32,
}

/// Rounds a block to `d * q`, `d = max|x| / 127`: each `q` is `(x / d).round()`
/// cast to `i8` as `as` casts (saturating, NaN to 0), the reference every
/// vector version ([`avx2::round_block`]) matches bit for bit.
fn round_block(block: &[f32; BLOCK], layout: QuantLayout) -> RoundedBlock {
    let amax = block
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let rounded = block.map(|v| (v * inv).round() as i8);
    RoundedBlock {
        quants: std::array::from_fn(|p| rounded[q8_element(layout, p)]),
        d,
        sum: rounded.iter().map(|&q| i32::from(q)).sum(),
    }
}

/// One row's blocks.
#[derive(Clone, Copy)]
struct Row<'a> {
    scales: &'a [f32],
    mins: &'a [f32],
    quants: &'a [u8],
}

impl Row<'_> {
    /// The row's block count and bytes a block (`INT8`: a byte a weight,
    /// else two weights a byte), after checking that its integer parts hold
    /// exactly that many blocks: the bound the SIMD kernels' unchecked loads
    /// of weights rely on.
    #[inline]
    fn checked_weights<const INT8: bool>(&self) -> (usize, usize) {
        let block_bytes = if INT8 { BLOCK } else { BLOCK / 2 };
        let nb = self.scales.len();
        assert!(self.quants.len() == nb * block_bytes);
        (nb, block_bytes)
    }

    /// [`checked_weights`](Self::checked_weights), and every token of `xs`
    /// checked to hold as many blocks of f32 activations.
    #[inline]
    fn checked_blocks<const INT8: bool>(&self, xs: &[&[f32]]) -> (usize, usize) {
        let (nb, block_bytes) = self.checked_weights::<INT8>();
        for x in xs {
            assert!(x.len() == nb * BLOCK);
        }
        (nb, block_bytes)
    }

    /// [`checked_weights`](Self::checked_weights), and every token of `xs`
    /// checked to hold as many blocks of 8-bit activations.
    #[inline]
    fn checked_blocks_q8<const INT8: bool>(&self, xs: &[Q8Block<'_>]) -> (usize, usize) {
        let (nb, block_bytes) = self.checked_weights::<INT8>();
        for x in xs {
            assert!(x.quants.len() == nb * BLOCK && x.scales.len() == nb);
        }
        (nb, block_bytes)
    }
}

/// A copy of f32 activations starting on a cache line.
///
/// Every kernel loads a block's 32 floats (128 bytes) in whole vectors, so
/// on a line-aligned copy no load straddles two cache lines; from a tensor's
/// buffer (16-byte aligned) most 64-byte loads did, and the split loads
/// bounded the f32 kernels. The default model's 1536 x 576 Q4_1 matmul
/// against eight tokens on one thread: 279 us from the tensor, 184 us from
/// this copy.
struct AlignedF32 {
    lines: Vec<CacheLine>,
    len: usize,
}

/// Sixteen floats on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

impl AlignedF32 {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![CacheLine([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }

    fn copy(x: &[f32]) -> Self {
        let mut out = Self::zeroed(x.len());
        out.as_mut_slice().copy_from_slice(x);
        out
    }

    /// `x` in [`NIBBLE_Q8_ORDER`], two permutes a block on AVX-512. The
    /// gather element by element ran on one core before each matmul's
    /// parallel part, ~13 us a block of the default model for eight
    /// sessions, while the other core waited.
    fn nibble_ordered(x: &[f32], kernel: Kernel) -> Self {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 && x.len().is_multiple_of(BLOCK) {
            // Written whole, so not zeroed first.
            let mut lines: Vec<CacheLine> = Vec::with_capacity(x.len() / 16);
            // SAFETY: `Kernel::Avx512` comes only from `Kernel::supported`,
            // after checking for AVX-512 F; the capacity holds `x.len()`
            // floats, every one of which `nibble_order` writes, so the lines
            // are initialised whole (`x.len()` is a multiple of 16).
            unsafe {
                avx512::nibble_order(x, lines.as_mut_ptr().cast());
                lines.set_len(x.len() / 16);
            }
            return Self {
                lines,
                len: x.len(),
            };
        }
        let _ = kernel;
        Self::permuted(x, &NIBBLE_Q8_ORDER)
    }

    /// `x` with each 32-block's elements in `order` (`to[i] = from[order[i]]`).
    fn permuted(x: &[f32], order: &[usize; BLOCK]) -> Self {
        let mut out = Self::zeroed(x.len());
        for (to, from) in out
            .as_mut_slice()
            .chunks_exact_mut(BLOCK)
            .zip(x.chunks_exact(BLOCK))
        {
            for (to, &i) in to.iter_mut().zip(order) {
                *to = from[i];
            }
        }
        out
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `CacheLine` is `repr(C)` sixteen f32s with no padding
        // (64 bytes, its alignment), so the lines are `16 * lines.len() >=
        // len` contiguous, initialised floats.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
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

/// One token's activations rounded to 8 bits: per 32-block, the integers,
/// their scale and `scale * sum(integers)` (for the Nibbles offset term).
#[derive(Clone, Copy)]
struct Q8Block<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [f32],
}

/// Blocks of activations one thread rounds before others help: fewer than
/// a 576-wide token's 18 cost less than handing them out.
const PARALLEL_BLOCKS: usize = 32;

/// The widest rows AVX-512's kernels multiply by f32 activations, in tiles
/// of eight tokens, whose activations (32 bytes a column) should stay in L1.
/// At 1536 columns (the default model's down projection) a tile fills a
/// 48 KB L1, yet the table kernel took half AVX2's time there once its
/// activations were line-aligned ([`AlignedF32`]): 576 x 1536 Q4_1 against
/// eight tokens on one thread, 315 us in AVX2's kernel, 157 us (tiles of
/// four instead: 185 us).
const AVX512_F32_COLS: usize = 2048;

/// Activations of one matmul rounded to 8 bits, all tokens, block after
/// block, each block's integers in the order the weights' layout meets them
/// ([`q8_element`]), with a scale and a sum per block.
struct Q8Activations {
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    cols: usize,
}

impl Q8Activations {
    /// Rounds each 32-block of `x` to `d * q`, `d = max|x| / 127`, `q` in
    /// -127..=127 (llama.cpp's Q8_1, with its scales kept in f32), for
    /// weights in `layout`. The x86 kernels round with
    /// [`avx2::round_block`], the others with [`round_block`]; the results
    /// are the same.
    fn quantize(x: &[f32], cols: usize, layout: QuantLayout, kernel: Kernel) -> Self {
        #[cfg(target_arch = "x86_64")]
        if kernel.has_avx2() {
            // SAFETY: `has_avx2`.
            return unsafe { Self::quantize_avx2(x, cols, layout) };
        }
        // Elsewhere every kernel reads what the reference rounding gives.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        Self::quantize_blocks(x, cols, |block| round_block(block, layout))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_avx2(x: &[f32], cols: usize, layout: QuantLayout) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        Self::quantize_blocks(x, cols, |block| unsafe { avx2::round_block(block, layout) })
    }

    /// Rounds every block of `x` with `round` (which returns the block's
    /// integers in the kernel's order within the block, its scale and the
    /// sum of its integers).
    #[inline(always)]
    fn quantize_blocks(
        x: &[f32],
        cols: usize,
        round: impl Fn(&[f32; BLOCK]) -> RoundedBlock + Sync,
    ) -> Self {
        let blocks = x.len() / BLOCK;
        let mut out = Self {
            quants: vec![0; x.len()],
            scales: vec![0.0; blocks],
            sums: vec![0.0; blocks],
            cols,
        };
        let (whole, _) = x.as_chunks::<BLOCK>();
        let (to, _) = out.quants.as_chunks_mut::<BLOCK>();
        // A batch's rounding runs on every core: on one it took a tenth of
        // an 8-step pass while the others waited for the matmul it feeds
        // (and it wakes them for that matmul a little early). A step's few
        // blocks stay on the calling thread.
        whole
            .par_iter()
            .zip(to)
            .zip(out.scales.par_iter_mut().zip(&mut out.sums))
            .with_min_len(PARALLEL_BLOCKS)
            .for_each(|((block, to), (scale, sum))| {
                let rounded = round(block);
                *to = rounded.quants;
                *scale = rounded.d;
                *sum = rounded.d * rounded.sum as f32;
            });
        out
    }

    /// Each block's rounded activations as f32, in element order, with its
    /// scale and sum.
    #[cfg(test)]
    fn dequantize(&self, layout: QuantLayout) -> Vec<(Vec<f32>, f32, f32)> {
        let (blocks, _) = self.quants.as_chunks::<BLOCK>();
        blocks
            .iter()
            .zip(self.scales.iter().zip(&self.sums))
            .map(|(q, (&d, &sum))| {
                let mut values = vec![0f32; BLOCK];
                for (p, &q) in q.iter().enumerate() {
                    values[q8_element(layout, p)] = d * f32::from(q);
                }
                (values, d, sum)
            })
            .collect()
    }

    fn token(&self, t: usize) -> Q8Block<'_> {
        let n = self.cols / BLOCK;
        Q8Block {
            quants: &self.quants[t * self.cols..(t + 1) * self.cols],
            scales: &self.scales[t * n..(t + 1) * n],
            sums: &self.sums[t * n..(t + 1) * n],
        }
    }

    fn tile<const N: usize>(&self, t0: usize) -> [Q8Block<'_>; N] {
        std::array::from_fn(|i| self.token(t0 + i))
    }
}

fn dot_tile_q8<const N: usize>(
    layout: QuantLayout,
    kernel: Kernel,
    row: Row<'_>,
    xs: &[Q8Block<'_>; N],
) -> [f32; N] {
    match (kernel, layout) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Avx2` is only ever produced by `Kernel::supported`
        // after checking that the CPU has AVX2 and FMA; slice lengths are
        // checked inside. (AVX-512 takes whole runs of rows, in `Q8Tiles`.)
        (Kernel::Avx2, QuantLayout::Nibbles) => unsafe { avx2::nibbles_q8(row, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx2, QuantLayout::Int8) => unsafe { avx2::int8_q8(row, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `Kernel::Neon` is only ever produced by `Kernel::supported`
        // after checking that the CPU has NEON, and `Kernel::NeonDot` after
        // checking for the dot product extension as well; slice lengths are
        // checked inside.
        (Kernel::Neon, QuantLayout::Nibbles) => unsafe { neon::nibbles_q8(row, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::Neon, QuantLayout::Int8) => unsafe { neon::int8_q8(row, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::NeonDot, QuantLayout::Nibbles) => unsafe { neon::nibbles_q8_sdot(row, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::NeonDot, QuantLayout::Int8) => unsafe { neon::int8_q8_sdot(row, xs) },
        (_, QuantLayout::Nibbles) => scalar::nibbles_q8(row, xs),
        (_, QuantLayout::Int8) => scalar::int8_q8(row, xs),
    }
}

fn dot_tile<const N: usize>(
    layout: QuantLayout,
    kernel: Kernel,
    row: Row<'_>,
    (xs, xsums): (&[&[f32]; N], &[&[f32]; N]),
) -> [f32; N] {
    match (kernel, layout) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_tile_q8`. (AVX-512 takes rows in pairs, in
        // `F32Tiles`.)
        (Kernel::Avx2, QuantLayout::Nibbles) => unsafe { avx2::nibbles(row, xs, xsums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Kernel::Avx2, QuantLayout::Int8) => unsafe { avx2::int8(row, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as in `dot_tile_q8` (either NEON kernel implies NEON).
        (Kernel::Neon | Kernel::NeonDot, QuantLayout::Nibbles) => unsafe {
            neon::nibbles(row, xs, xsums)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        (Kernel::Neon | Kernel::NeonDot, QuantLayout::Int8) => unsafe { neon::int8(row, xs) },
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

    /// `m` in each arrangement (every kernel runs on both: the ones that
    /// read the other arrangement convert it first).
    fn arrangements(m: &QuantMatrix) -> [QuantMatrix; 2] {
        [m.clone(), m.clone().into_panels()]
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
    fn nibble_words_keep_every_element_where_the_kernels_look() {
        let ggml: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let q = nibble_words(&ggml);
        for i in 0..BLOCK {
            let want = if i < 16 { i as u8 } else { 31 - i as u8 };
            assert_eq!(nibble(&q, i), want, "element {i}");
        }
        // The 8-bit kernels' positional reading (low nibbles, then high).
        for (p, &i) in NIBBLE_Q8_ORDER.iter().enumerate() {
            assert_eq!(
                (q[p % 16] >> (4 * (p / 16))) & 0x0F,
                nibble(&q, i),
                "position {p}"
            );
        }
    }

    #[test]
    fn repacked_blocks_dequantize_like_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, exact) = quantized(dtype, 8, 96);
            assert_eq!(m.dequantize(), exact, "{dtype:?}");
        }
    }

    #[test]
    fn panels_hold_the_same_matrix() {
        // 37 rows pad their last panel; 48 fill three.
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for rows in [37, 48] {
                let (m, exact) = quantized(dtype, rows, 96);
                let panels = m.clone().into_panels();
                assert_eq!(panels.arrangement(), Arrangement::Panels);
                assert_eq!(panels.dequantize(), exact, "{dtype:?} {rows}");
                let back = panels.to_rows();
                assert_eq!(
                    (back.quants, back.scales, back.mins),
                    (m.quants.clone(), m.scales.clone(), m.mins.clone()),
                    "{dtype:?} {rows}"
                );
            }
        }
    }

    #[test]
    fn panels_stack_like_rows() {
        // Whole panels stack as they are; a padded one goes through rows.
        for sizes in [[16, 32], [37, 5]] {
            let parts: Vec<QuantMatrix> = sizes
                .iter()
                .map(|&rows| quantized(GgmlDType::Q4_1, rows, 64).0)
                .collect();
            let rows: Vec<&QuantMatrix> = parts.iter().collect();
            let want = QuantMatrix::concat_rows(&rows).unwrap();
            let panels: Vec<QuantMatrix> = parts.iter().map(|m| m.clone().into_panels()).collect();
            let panels: Vec<&QuantMatrix> = panels.iter().collect();
            let got = QuantMatrix::concat_rows(&panels).unwrap();
            assert_eq!(got.arrangement(), Arrangement::Panels, "{sizes:?}");
            assert_eq!(got.dequantize(), want.dequantize(), "{sizes:?}");
        }
    }

    #[test]
    fn every_kernel_matches_the_exact_product() {
        // Rows up to AVX512_F32_COLS take AVX-512's kernels; longer ones (an
        // odd number of blocks, too) AVX2's.
        for (rows, cols, dtype) in [
            (37, 160, GgmlDType::Q4_0),
            (37, 160, GgmlDType::Q4_1),
            (37, 160, GgmlDType::Q8_0),
            (5, 1056, GgmlDType::Q4_1),
            (5, 2080, GgmlDType::Q4_1),
        ] {
            let (m, w) = quantized(dtype, rows, cols);
            for tokens in [1, 3, 4, 9, 13] {
                let x = random(tokens, cols, 11);
                let want = reference(&w, &x, rows, cols, tokens);
                for kernel in Kernel::supported() {
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
    fn aligned_activations_start_on_a_cache_line_with_their_values() {
        let x = random(3, 160, 5);
        let copy = AlignedF32::copy(&x);
        assert_eq!(copy.as_slice(), &x[..]);
        assert_eq!(copy.as_slice().as_ptr() as usize % 64, 0);
        let permuted = AlignedF32::permuted(&x, &NIBBLE_Q8_ORDER);
        assert_eq!(permuted.as_slice().as_ptr() as usize % 64, 0);
        for kernel in Kernel::supported() {
            let ordered = AlignedF32::nibble_ordered(&x, kernel);
            assert_eq!(ordered.as_slice(), permuted.as_slice(), "{kernel:?}");
        }
        for (to, from) in permuted
            .as_slice()
            .chunks_exact(BLOCK)
            .zip(x.chunks_exact(BLOCK))
        {
            for (&v, &i) in to.iter().zip(&NIBBLE_Q8_ORDER) {
                assert_eq!(v, from[i]);
            }
        }
        assert!(AlignedF32::copy(&[]).as_slice().is_empty());
    }

    /// Batched server steps must give each session what it gets alone, bit
    /// for bit, so concurrency never changes an answer.
    #[test]
    fn a_tokens_result_does_not_depend_on_its_batch() {
        // 5 blocks a row, 18 and 33; 37 rows: tasks of 32 and 5 (in panels,
        // the second padded).
        for (dtype, (rows, cols)) in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
            .into_iter()
            .flat_map(|d| [(d, (37, 160)), (d, (37, 576)), (d, (37, 1056))])
        {
            let (m, _) = quantized(dtype, rows, cols);
            let panels = m.clone().into_panels();
            // Every tile width: 15 runs as 8 and 7 where tiles reach 8 (as 4,
            // 4, 4 and 3 elsewhere), 14 as 8 and 6 (4, 4, 4, 2), 13 as 8 and
            // 5 (4, 4, 4, 1).
            for tokens in [15, 14, 13] {
                let x = random(tokens, cols, 13);
                for kernel in Kernel::supported() {
                    let batch = m.matmul(&x, tokens, kernel);
                    let batch_q8 = m.matmul_q8(&x, tokens, kernel);
                    let panels_q8 = panels.matmul_q8(&x, tokens, kernel);
                    for t in 0..tokens {
                        let one = &x[t * cols..(t + 1) * cols];
                        let mine = t * rows..(t + 1) * rows;
                        assert_eq!(m.matmul(one, 1, kernel), batch[mine.clone()], "{dtype:?}");
                        assert_eq!(
                            m.matmul_q8(one, 1, kernel),
                            batch_q8[mine.clone()],
                            "{dtype:?}"
                        );
                        assert_eq!(
                            panels.matmul_q8(one, 1, kernel),
                            panels_q8[mine],
                            "{dtype:?}"
                        );
                    }
                }
            }
        }
    }

    /// A gated matmul gives `silu(gate) * up` of the plain matmul's halves,
    /// bit for bit, at every tile width, precision, kernel and arrangement;
    /// a matrix whose rows do not halve (into whole panels) is not gated.
    #[test]
    fn gated_matmuls_are_silu_of_the_halves_bit_for_bit() {
        let reference = |full: &[f32], tokens: usize, half: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(tokens * half);
            for row in full.chunks_exact(2 * half) {
                let mut gated = vec![0.0; half];
                crate::fused::silu_times_into(&row[..half], &row[half..], &mut gated);
                out.extend(gated);
            }
            out
        };
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            // 48 rows a half: tasks of 14 gate rows at 576 columns, one short.
            let (m, _) = quantized(dtype, 96, 576);
            let panels = m.clone().into_panels();
            assert!(m.gates() && panels.gates());
            for tokens in [1, 5, 8, 13] {
                let x = random(tokens, 576, 3);
                for kernel in Kernel::supported() {
                    let full = m.matmul(&x, tokens, kernel);
                    let want = reference(&full, tokens, 48);
                    assert_eq!(
                        m.matmul_gated(&x, tokens, kernel),
                        want,
                        "{dtype:?} {kernel:?}"
                    );
                    let full = m.matmul_q8(&x, tokens, kernel);
                    let want = reference(&full, tokens, 48);
                    assert_eq!(m.matmul_q8_gated(&x, tokens, kernel), want);
                    // Panels sum in their own order.
                    let full = panels.matmul_q8(&x, tokens, kernel);
                    let want = reference(&full, tokens, 48);
                    assert_eq!(panels.matmul_q8_gated(&x, tokens, kernel), want);
                }
            }
        }
        let (odd, _) = quantized(GgmlDType::Q4_1, 37, 576);
        let (uneven_panels, _) = quantized(GgmlDType::Q4_1, 40, 576);
        assert!(!odd.gates() && uneven_panels.gates());
        assert!(!uneven_panels.into_panels().gates());
    }

    /// A row's results are the same whichever rows share its task and its
    /// kernel call (AVX-512 runs rows in pairs, and a task's odd row alone).
    #[test]
    fn a_rows_result_does_not_depend_on_its_neighbours() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            // 15 rows a task at 1056 columns: pairs, then a row alone.
            for (rows, cols) in [(37, 576), (37, 1056)] {
                let (m, _) = quantized(dtype, rows, cols);
                let nb = cols / BLOCK;
                let bb = m.layout.block_bytes();
                let tokens = 3;
                let x = random(tokens, cols, 17);
                for kernel in Kernel::supported() {
                    let all = m.matmul(&x, tokens, kernel);
                    for r in 0..rows {
                        let alone = QuantMatrix {
                            rows: 1,
                            scales: m.scales[r * nb..(r + 1) * nb].to_vec(),
                            mins: m.mins.get(r * nb..(r + 1) * nb).unwrap_or(&[]).to_vec(),
                            quants: m.quants[r * nb * bb..(r + 1) * nb * bb].to_vec(),
                            ..m.clone()
                        };
                        let one = alone.matmul(&x, tokens, kernel);
                        for t in 0..tokens {
                            assert_eq!(one[t], all[t * rows + r], "{dtype:?} {kernel:?} row {r}");
                        }
                    }
                }
            }
        }
    }

    /// GGML blocks with scale 1 (and offset -3 for Q4_1) and random integer
    /// parts, and activations whose every block reaches +-127, so that every
    /// 8-bit scale is exactly 1 and all arithmetic stays in exact integers.
    fn integer_case(dtype: GgmlDType, rows: usize, cols: usize) -> (QuantMatrix, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(3);
        let one = f16::from_f32(1.0).to_le_bytes();
        let mut raw = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            raw.extend_from_slice(&one);
            match dtype {
                GgmlDType::Q4_1 => raw.extend_from_slice(&f16::from_f32(-3.0).to_le_bytes()),
                GgmlDType::Q8_0 => {
                    // -128 is outside what GGML writes, but a file may hold it.
                    raw.push(0x80);
                    raw.extend((1..BLOCK).map(|_| rng.random::<u8>()));
                    continue;
                }
                _ => {}
            }
            raw.extend((0..BLOCK / 2).map(|_| rng.random::<u8>()));
        }
        let m = QuantMatrix::from_ggml(dtype, &raw, rows, cols).unwrap();
        let x = (0..cols)
            .map(|c| match c % BLOCK {
                0 => 127.0,
                1 => -127.0,
                _ => rng.random_range(-127i32..=127) as f32,
            })
            .collect::<Vec<f32>>();
        (m, x)
    }

    #[test]
    fn q8_kernels_are_exact_on_integer_data() {
        // 7 rows: one padded panel; 43: tasks of 32 and 11.
        for (dtype, (rows, cols)) in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
            .into_iter()
            .flat_map(|d| [(d, (19, 256)), (d, (7, 576)), (d, (43, 576))])
        {
            let (m, x) = integer_case(dtype, rows, cols);
            let w = m.dequantize();
            let tokens = 13;
            let xs: Vec<f32> = (0..tokens).flat_map(|_| x.iter().copied()).collect();
            let exact: Vec<f32> = (0..tokens)
                .flat_map(|_| {
                    (0..rows).map(|r| {
                        (0..cols)
                            .map(|c| (w[r * cols + c] as i64) * (x[c] as i64))
                            .sum::<i64>() as f32
                    })
                })
                .collect();
            for (kernel, m) in Kernel::supported()
                .into_iter()
                .flat_map(|k| arrangements(&m).map(|m| (k, m)))
            {
                assert_eq!(
                    m.matmul_q8(&xs, tokens, kernel),
                    exact,
                    "{dtype:?} {kernel:?} {:?}",
                    m.arrangement()
                );
            }
        }
    }

    #[test]
    fn q8_matmul_is_the_product_with_rounded_activations() {
        // 5, 33 and 18 blocks. `drift` bounds how far
        // rounding moves a result off the f32 product, relative to 1 + |it|:
        // the rounded reference itself reaches 0.086 on the 576-column
        // matrices' 13 tokens, where a result near zero meets the error.
        for (dtype, (rows, cols, drift)) in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
            .into_iter()
            .flat_map(|d| {
                [
                    (d, (37, 160, 0.05)),
                    (d, (5, 1056, 0.05)),
                    (d, (37, 576, 0.1)),
                ]
            })
        {
            let (m, w) = quantized(dtype, rows, cols);
            for tokens in [1, 4, 6, 13] {
                let x = random(tokens, cols, 5);
                let rounded: Vec<f32> = Q8Activations::quantize(&x, cols, m.layout, Kernel::Scalar)
                    .dequantize(m.layout)
                    .into_iter()
                    .flat_map(|(values, _, _)| values)
                    .collect();
                let want = reference(&w, &rounded, rows, cols, tokens);
                let exact = reference(&w, &x, rows, cols, tokens);
                for (kernel, m) in Kernel::supported()
                    .into_iter()
                    .flat_map(|k| arrangements(&m).map(|m| (k, m)))
                {
                    let got = m.matmul_q8(&x, tokens, kernel);
                    for ((g, w), e) in got.iter().zip(&want).zip(&exact) {
                        assert!(
                            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{dtype:?} {kernel:?}"
                        );
                        // Rounding moves each result a little off the f32 product.
                        assert!(
                            (g - e).abs() < drift * (1.0 + e.abs()),
                            "{dtype:?} {kernel:?} {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_rounds_activations_alike() {
        // Blocks whose scale is exactly 1 put every other value on a tie
        // (x.5), where rounding modes differ; the rest are random.
        let mut x: Vec<f32> = (0..BLOCK)
            .map(|i| match i {
                0 => 127.0,
                _ => (i as f32 - 16.0) + 0.5 * (i % 2) as f32,
            })
            .collect();
        x.extend(random(3, BLOCK, 17));
        x.extend([f32::NAN; BLOCK]);
        x.extend(random(13, BLOCK, 19));
        // 18 blocks as 18 tokens, and as one token.
        for (layout, cols) in [QuantLayout::Nibbles, QuantLayout::Int8]
            .into_iter()
            .flat_map(|l| [(l, BLOCK), (l, x.len())])
        {
            let want = Q8Activations::quantize(&x, cols, layout, Kernel::Scalar);
            if layout == QuantLayout::Int8 {
                // -12.5, as `f32::round` and llama.cpp's reference round it.
                assert_eq!(want.quants[3], -13);
            }
            for kernel in Kernel::supported() {
                let got = Q8Activations::quantize(&x, cols, layout, kernel);
                let bits = |v: Vec<(Vec<f32>, f32, f32)>| {
                    v.into_iter()
                        .flat_map(|(values, d, sum)| values.into_iter().chain([d, sum]))
                        .map(f32::to_bits)
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(got.dequantize(layout)),
                    bits(want.dequantize(layout)),
                    "{kernel:?}"
                );
            }
        }
    }

    /// Each value is `(x / d).round() as i8`, a saturating cast, even
    /// where that is odd: NaNs, infinities, and blocks so small that `1 / d`
    /// overflows.
    #[test]
    fn rounding_is_a_saturating_cast_on_odd_blocks() {
        let odd = |i: usize| match i % 4 {
            0 => f32::NAN,
            1 => i as f32 - 16.5,
            2 => f32::INFINITY,
            _ => -(i as f32),
        };
        let blocks: [Vec<f32>; 3] = [
            (0..BLOCK).map(odd).collect(),
            (0..BLOCK)
                .map(|i| if i % 2 == 0 { 0.0 } else { -1e-38 * i as f32 })
                .collect(),
            (0..BLOCK).map(|i| i as f32 - 15.5).collect(),
        ];
        for block in blocks {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let want: Vec<i8> = block.iter().map(|v| (v * inv).round() as i8).collect();
            // Int8 keeps a lone block's values in order, in every layout.
            for kernel in Kernel::supported() {
                let got = Q8Activations::quantize(&block, BLOCK, QuantLayout::Int8, kernel);
                assert_eq!(got.quants, want, "{kernel:?} {block:?}");
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
