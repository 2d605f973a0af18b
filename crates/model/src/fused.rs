//! CPU kernels that fuse chains of candle ops on the inference hot path.
//!
//! A decode step moves one position through each block. candle would run
//! its attention as a dozen small ops (two of them tiny GEMMs, each with its
//! own dispatch) and its SiLU-times-up as two passes with a temporary: at
//! this size the dispatch and allocation cost more than the arithmetic.
//! Decode steps rotate and attend row by row on slices ([`rotate`],
//! [`attend_position`]); prompts take the same attention kernel, each
//! position as its own step would. candle's RMS norm sums each row in one
//! chain of dependent adds; [`rms_norm`] sums in lanes.
//! `llama.rs` uses these on the CPU when no gradient is needed; the training
//! path keeps candle's ops, which have a backward, and GPUs keep theirs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
#[cfg(target_arch = "x86_64")]
use crate::quant::Kernel;

/// Causal grouped-query attention: `q` `[b, heads, t, d]` against `k`, `v`
/// `[b, kv_heads, s, d]` (any strides, last dimension contiguous), where the
/// `t` queries are the last `t` of the `s` positions. Returns `[b, t, heads * d]`.
pub(crate) fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(q.apply_op3_no_bwd(k, v, &CachedAttention)?)
}

struct CachedAttention;

/// Multiply-adds (queries x keys x width) above which heads run in parallel:
/// about 20 µs of work, several times a fork's cost.
const PARALLEL_WORK: usize = 1 << 18;

/// A rank-4 f32 view: its data and where each `[i, j, k, ..]` row starts.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 3],
    dims: [usize; 4],
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("cached attention takes f32 {what}")
        };
        let (dims, stride) = (layout.dims(), layout.stride());
        let ([d0, d1, d2, d3], [s0, s1, s2, 1]) = (dims, stride) else {
            candle_core::bail!(
                "cached attention takes rank-4 {what} with a contiguous last dimension, got {dims:?} strides {stride:?}"
            )
        };
        Ok(Self {
            data,
            start: layout.start_offset(),
            stride: [*s0, *s1, *s2],
            dims: [*d0, *d1, *d2, *d3],
        })
    }

    /// The rows from `[i, j, k]` on along dimension `along` (1 or 2).
    fn rows(&self, i: usize, j: usize, k: usize, along: usize) -> Rows<'a> {
        Rows {
            data: self.data,
            start: self.start + i * self.stride[0] + j * self.stride[1] + k * self.stride[2],
            step: self.stride[along],
            width: self.dims[3],
        }
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            View::new(q, lq, "queries")?,
            View::new(k, lk, "keys")?,
            View::new(v, lv, "values")?,
        );
        let [b, heads, t, d] = q.dims;
        let [_, kv_heads, s, _] = k.dims;
        if k.dims != v.dims
            || k.dims[0] != b
            || k.dims[3] != d
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || s < t
        {
            candle_core::bail!(
                "cached attention: queries {:?}, keys {:?}, values {:?} do not fit",
                q.dims,
                k.dims,
                v.dims
            )
        }
        let group = heads / kv_heads;
        // One unit of work: the `group` query heads that share a key/value
        // head, at one position of one sequence. Their rows lie side by
        // side in the output, so units are its `group * d` chunks in order.
        let unit = |n: usize, out: &mut [f32], scratch: &mut Vec<f32>| {
            let (bi, i, kvh) = (n / (t * kv_heads), n / kv_heads % t, n % kv_heads);
            let rows = Group {
                queries: q.rows(bi, kvh * group, i, 1),
                heads: group,
                keys: k.rows(bi, kvh, 0, 2),
                values: v.rows(bi, kvh, 0, 2),
                seen: s - t + i + 1,
            };
            rows.run(out, scratch)
        };
        let mut out = vec![0f32; b * t * heads * d];
        // Units run in parallel once a cache is long enough to pay for the
        // fork; each unit's arithmetic is the same either way.
        if s * t * heads * d >= PARALLEL_WORK {
            out.par_chunks_mut(group * d)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (n, out)| unit(n, out, scratch));
        } else {
            let mut scratch = Vec::new();
            for (n, out) in out.chunks_mut(group * d).enumerate() {
                unit(n, out, &mut scratch);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }
}

/// One session's decode-step attention, alone or in a batch, without a
/// candle op: `q` (its heads' rows of `d`, rotated) at the newest of the `s`
/// positions in `keys` and `values` (`[1, kv_heads, s, d]`, the session's
/// cache), into `out` (`heads * d`). The arithmetic is
/// [`cached_attention`]'s for one query, so a session's result is the same
/// batched or alone; what it saves is the op's tensors, one set a session
/// and block.
pub(crate) fn attend_position(
    q: &[f32],
    keys: &Tensor,
    values: &Tensor,
    out: &mut [f32],
) -> Result<()> {
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let (k, v) = (
        View::new(cpu(&ks)?, kl, "keys")?,
        View::new(cpu(&vs)?, vl, "values")?,
    );
    let [b, kv_heads, s, d] = k.dims;
    if k.dims != v.dims || b != 1 || s == 0 || d == 0 || kv_heads == 0 {
        return Err(ModelError::InputShape(format!(
            "attention of one position: keys {:?}, values {:?}",
            k.dims, v.dims
        )));
    }
    let heads = q.len() / d;
    if q.len() != heads * d || out.len() != q.len() || !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::InputShape(format!(
            "attention of one position: {} query and {} output elements for {kv_heads} heads of {d}",
            q.len(),
            out.len()
        )));
    }
    let group = heads / kv_heads;
    let mut scratch = Vec::new();
    for (kvh, out) in out.chunks_exact_mut(group * d).enumerate() {
        let rows = Group {
            queries: Rows {
                data: q,
                start: kvh * group * d,
                step: d,
                width: d,
            },
            heads: group,
            keys: k.rows(0, kvh, 0, 2),
            values: v.rows(0, kvh, 0, 2),
            seen: s,
        };
        rows.run(out, &mut scratch);
    }
    Ok(())
}

/// Rotates `x` (rows of `d`, one a head) in place by one position's angles
/// (`cos` and `sin`, `d / 2` each), pairing elements `2i` and `2i + 1`
/// (`interleaved`, candle's `rope_i`) or `i` and `i + d / 2` (its `rope`),
/// with candle's arithmetic, so the bits are the same as theirs.
pub(crate) fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len().min(sin.len());
    for row in x.chunks_exact_mut(2 * half) {
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (row[a], row[b]);
            row[a] = x0 * c - x1 * s;
            row[b] = x0 * s + x1 * c;
        }
    }
}

/// A tensor's storage in host memory.
fn cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(data) => Ok(data),
        other => Err(ModelError::Unsupported(format!(
            "a fused CPU op got a tensor on {:?}",
            other.device().location()
        ))),
    }
}

/// The elements of an f32 tensor's host storage.
pub(crate) fn host(storage: &Storage) -> Result<&[f32]> {
    match cpu(storage)? {
        CpuStorage::F32(data) => Ok(data),
        _ => Err(ModelError::Unsupported(format!(
            "a fused CPU op takes f32 tensors, got {:?}",
            storage.dtype()
        ))),
    }
}

/// The elements of contiguous data laid out by `layout`.
pub(crate) fn contiguous<'a>(data: &'a [f32], layout: &Layout) -> Result<&'a [f32]> {
    layout
        .contiguous_offsets()
        .and_then(|(from, to)| data.get(from..to))
        .ok_or_else(|| {
            ModelError::InputShape(format!(
                "contiguous data expected, got {:?} strides {:?}",
                layout.dims(),
                layout.stride()
            ))
        })
}

/// Row `i`'s `width` elements of `[n, 1, width]` data whose last dimension
/// is contiguous (one position each of `n` sessions).
pub(crate) fn token_row<'a>(data: &'a [f32], layout: &Layout, i: usize) -> Result<&'a [f32]> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let ([n, 1, width], [step, _, 1]) = (dims, stride) else {
        return Err(ModelError::InputShape(format!(
            "one row a session takes [n, 1, width] with a contiguous last dimension, got {dims:?} strides {stride:?}"
        )));
    };
    let at = layout.start_offset() + i * step;
    (i < *n)
        .then(|| data.get(at..at + width))
        .flatten()
        .ok_or_else(|| ModelError::InputShape(format!("row {i} of {dims:?} is out of bounds")))
}

/// Equal-width rows spaced evenly through a buffer.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    step: usize,
    width: usize,
}

impl<'a> Rows<'a> {
    #[inline(always)]
    fn get(&self, j: usize) -> &'a [f32] {
        let at = self.start + j * self.step;
        &self.data[at..at + self.width]
    }

    /// Asks for row `j`'s cache lines ahead of use (a no-op past the end
    /// or off x86).
    #[inline(always)]
    fn prefetch(&self, j: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let at = self.start + j * self.step;
            if at + self.width <= self.data.len() {
                let row = self.data[at..].as_ptr();
                for line in (0..self.width).step_by(16) {
                    // SAFETY: a prefetch reads nothing and cannot fault; the
                    // address lies inside `data`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(line) as *const i8) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = j;
    }
}

/// Key and value rows asked for ahead of the one being scored.
const PREFETCH_ROWS: usize = 8;

/// Query heads sharing one key/value head, at one position that sees the
/// first `seen` keys: each key and value is read once for all of them.
struct Group<'a> {
    queries: Rows<'a>,
    heads: usize,
    keys: Rows<'a>,
    values: Rows<'a>,
    seen: usize,
}

impl Group<'_> {
    /// [`attend`](Self::attend), in its AVX2 build where the CPU has AVX2.
    fn run(&self, out: &mut [f32], scratch: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if Kernel::detect().has_avx2() {
            // SAFETY: `has_avx2`.
            return unsafe { self.attend_avx2(out, scratch) };
        }
        self.attend(out, scratch)
    }

    /// Each query's softmax-weighted sum of values into its row of `out`
    /// (`heads * d` floats); `scratch` holds the scores.
    #[inline(always)]
    fn attend(&self, out: &mut [f32], scratch: &mut Vec<f32>) {
        let (g, seen, d) = (self.heads, self.seen, self.keys.width);
        let scale = 1.0 / (d as f32).sqrt();
        scratch.clear();
        scratch.resize(g * seen + g, 0.0);
        let (scores, sums) = scratch.split_at_mut(g * seen);
        for j in 0..seen {
            self.keys.prefetch(j + PREFETCH_ROWS);
            self.values.prefetch(j + PREFETCH_ROWS);
            let key = self.keys.get(j);
            for u in 0..g {
                scores[u * seen + j] = dot(self.queries.get(u), key) * scale;
            }
        }
        for (row, sum) in scores.chunks_exact_mut(seen).zip(sums.iter_mut()) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *sum = exp_less(row, max);
        }
        for ((y, p), sum) in out
            .chunks_exact_mut(d)
            .zip(scores.chunks_exact(seen))
            .zip(&*sums)
        {
            // Sixty-four of a row's sums stay in registers over every value.
            let mut c = 0;
            while c < d {
                let width = if d - c >= 64 { 64 } else { 1 };
                match width {
                    64 => self.weighted_sum::<64>(p, c, &mut y[c..c + 64]),
                    _ => self.weighted_sum::<1>(p, c, &mut y[c..c + 1]),
                }
                c += width;
            }
            y.iter_mut().for_each(|y| *y /= sum);
        }
    }

    /// `y = sum_j p_j * value_j[c..c + W]`, summed over `j` in order (so any
    /// `W` gives each element the same bits).
    #[inline(always)]
    fn weighted_sum<const W: usize>(&self, p: &[f32], c: usize, y: &mut [f32]) {
        let mut acc = [0f32; W];
        for (j, &p) in p.iter().enumerate() {
            let value = &self.values.get(j)[c..c + W];
            for (acc, &x) in acc.iter_mut().zip(value) {
                *acc += p * x;
            }
        }
        y.copy_from_slice(&acc);
    }

    /// [`attend`](Self::attend) compiled for AVX2, used where the quant
    /// kernel is an x86 one: eight lanes fill one register instead of two.
    /// The arithmetic is the same lane for lane, and so are the results:
    /// only the vector width changes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, out: &mut [f32], scratch: &mut Vec<f32>) {
        self.attend(out, scratch)
    }
}

/// Replaces each score `x` by `e^(x - max)` and returns their sum; eight
/// lanes' sums, so the loop vectorizes without reassociating.
#[inline(always)]
fn exp_less(scores: &mut [f32], max: f32) -> f32 {
    let mut sums = [0f32; 8];
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (x, sum) in chunk.iter_mut().zip(&mut sums) {
            *x = exp(*x - max);
            *sum += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        tail += *x;
    }
    sums.iter().sum::<f32>() + tail
}

/// `e^x` within 2 ulp, saturating below `e^-87` (near the smallest normal)
/// and above `e^88` (near the largest float), a NaN staying one: Cephes'
/// `expf` polynomial after taking out `n ln 2`, `n` rounded, whose `2^n` goes
/// straight into the exponent bits. libm's `expf` is a call per value and
/// does not vectorize; this is plain arithmetic, so every vector width gives
/// the same bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, which the low bits then hold.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Within these, 2^n fits a normal float's exponent.
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * std::f32::consts::LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let exponent = rounded
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    e * f32::from_bits(exponent << 23)
}

/// Eight partial sums, so the compiler vectorizes without reassociating.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// RMS norm of each row (along the last dimension) of contiguous `x`,
/// times `alpha`: candle's `rms_norm` with the squares summed in eight
/// lanes ([`dot`]) instead of one chain. A row of 576 took 576 dependent
/// adds, ~0.7 us; a batch's eight rows ran on one core twice a block
/// while the others waited (and fell asleep).
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.apply_op2_no_bwd(alpha, &RmsNorm { eps })?)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-lanes"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        alpha: &CpuStorage,
        la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(alpha)) = (x, alpha) else {
            candle_core::bail!("rms norm takes f32 tensors")
        };
        let (Some((x0, x1)), Some((a0, a1))) = (lx.contiguous_offsets(), la.contiguous_offsets())
        else {
            candle_core::bail!("rms norm takes contiguous tensors")
        };
        let (x, alpha) = (&x[x0..x1], &alpha[a0..a1]);
        let width = lx.dims().last().copied().unwrap_or(1);
        if width == 0 || alpha.len() != width {
            candle_core::bail!("rms norm: rows of {width} against {} weights", alpha.len())
        }
        let mut out = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            #[cfg(target_arch = "x86_64")]
            if Kernel::detect().has_avx2() {
                // SAFETY: `has_avx2`.
                unsafe { rms_norm_row_avx2(row, alpha, self.eps, out) };
                continue;
            }
            rms_norm_row(row, alpha, self.eps, out);
        }
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// One row of [`rms_norm`], with candle's arithmetic past the sum.
#[inline(always)]
fn rms_norm_row(row: &[f32], alpha: &[f32], eps: f32, out: &mut [f32]) {
    let m = (dot(row, row) / row.len() as f32 + eps).sqrt();
    for ((out, &x), &a) in out.iter_mut().zip(row).zip(alpha) {
        *out = x / m * a;
    }
}

/// [`rms_norm_row`] compiled for AVX2: the same arithmetic, lane for lane.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_row_avx2(row: &[f32], alpha: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_row(row, alpha, eps, out)
}

/// `silu(gate) * up`, elementwise, for equal-shaped `gate` and `up` whose last
/// dimension is contiguous (the halves of a stacked projection's output).
/// Returns a contiguous tensor of that shape.
pub(crate) fn silu_times(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.apply_op2_no_bwd(up, &SiluTimes)?)
}

struct SiluTimes;

/// Elements of `silu(gate) * up` one thread computes before others help.
const PARALLEL_ELEMENTS: usize = 3072;

impl CustomOp2 for SiluTimes {
    fn name(&self) -> &'static str {
        "silu-times"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        lg: &Layout,
        up: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("silu-times takes f32 tensors")
        };
        if lg.dims() != lu.dims() {
            candle_core::bail!(
                "silu-times: gate {:?} and up {:?} differ",
                lg.dims(),
                lu.dims()
            )
        }
        let width = lg.dims().last().copied().unwrap_or(1);
        let (gate_rows, up_rows) = (row_starts(lg)?, row_starts(lu)?);
        let mut out = vec![0f32; lg.shape().elem_count()];
        // Rows run on every core once there are a few thousand elements to
        // a thread: a batch's rows ran on one while the others waited for
        // the matmul they feed.
        out.par_chunks_exact_mut(width.max(1))
            .zip(gate_rows.par_iter().zip(&up_rows))
            .with_min_len(PARALLEL_ELEMENTS.div_ceil(width.max(1)))
            .for_each(|(out, (&g, &u))| {
                silu_times_into(&gate[g..g + width], &up[u..u + width], out);
            });
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }
}

/// One row of `silu(g) * u`, candle's `x / (1 + e^-x)` with [`exp`]: libm's
/// `expf` is a call per element, which cost more than the rest of a row.
#[inline(always)]
fn silu_times_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((out, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *out = g / (1.0 + exp(-g)) * u;
    }
}

/// `out = silu(g) * u`, elementwise, in [`silu_times_row`]'s AVX2 build
/// where the CPU has AVX2: [`silu_times`] and a gated matmul's tiles
/// ([`crate::quant::QuantMatrix::matmul_gated`]) both take it, so they
/// agree to the bit.
pub(crate) fn silu_times_into(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect().has_avx2() {
        // SAFETY: `has_avx2`.
        return unsafe { silu_times_avx2(g, u, out) };
    }
    silu_times_row(g, u, out)
}

/// [`silu_times_row`] compiled for AVX2: the same arithmetic, lane for lane.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_times_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
    silu_times_row(g, u, out)
}

/// Where each row (run along the last dimension) of `layout` starts, in
/// order; the last dimension must be contiguous.
fn row_starts(layout: &Layout) -> candle_core::Result<Vec<usize>> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let Some((&1, outer_strides)) = stride.split_last() else {
        if dims.is_empty() {
            return Ok(vec![layout.start_offset()]);
        }
        candle_core::bail!("a contiguous last dimension is needed, got strides {stride:?}")
    };
    let outer = &dims[..dims.len() - 1];
    let mut starts = vec![layout.start_offset()];
    // Expand one leading dimension at a time, innermost last.
    for (&n, &s) in outer.iter().zip(outer_strides) {
        starts = starts
            .iter()
            .flat_map(|&base| (0..n).map(move |i| base + i * s))
            .collect();
    }
    Ok(starts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(dims: &[usize], rng: &mut StdRng) -> Tensor {
        let n = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    /// The same attention as candle ops, the way `llama.rs` runs prompts.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let s = k.dim(2).unwrap();
        let kvh = k.dim(1).unwrap();
        let g = h / kvh;
        let k = k.unsqueeze(2).unwrap().repeat((1, 1, g, 1, 1)).unwrap();
        let k = k.reshape((b, h, s, d)).unwrap();
        let v = v.unsqueeze(2).unwrap().repeat((1, 1, g, 1, 1)).unwrap();
        let v = v.reshape((b, h, s, d)).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j > s - t + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    #[test]
    fn matches_candle_ops_on_strided_caches() {
        let mut rng = StdRng::seed_from_u64(9);
        // The last two are long enough to run their heads in parallel.
        for (b, h, kvh, t, s, d) in [
            (1, 9, 3, 1, 37, 64),
            (2, 4, 4, 3, 5, 12),
            (1, 6, 2, 1, 1, 8),
            (1, 9, 3, 1, 600, 64),
            (2, 4, 2, 3, 400, 64),
        ] {
            let q = random(&[b, h, t, d], &mut rng);
            // Keys and values as the cache holds them: a view of a larger buffer.
            let k = random(&[b, kvh, s + 7, d], &mut rng)
                .narrow(2, 0, s)
                .unwrap();
            let v = random(&[b, kvh, s + 7, d], &mut rng)
                .narrow(2, 0, s)
                .unwrap();
            let got = cached_attention(&q, &k, &v).unwrap();
            let want = reference(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap());
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "{b} {h} {kvh} {t} {s} {d}"
            );
        }
    }

    /// Local and swarm runs must agree token for token whichever CPU each
    /// part runs on, so the vector width may not move a single bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_build_of_attention_gives_the_same_bits() {
        if !Kernel::detect().has_avx2() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        // Widths with and without a tail past the last 8; 1 to 4 heads a group.
        for (g, s, d) in [(3, 130, 64), (1, 17, 12), (4, 2, 8)] {
            let mut rows = |n: usize| -> Vec<f32> {
                (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect()
            };
            let (queries, keys, values) = (rows(g), rows(s), rows(s));
            let rows = |data| Rows {
                data,
                start: 0,
                step: d,
                width: d,
            };
            let group = Group {
                queries: rows(&queries),
                heads: g,
                keys: rows(&keys),
                values: rows(&values),
                seen: s,
            };
            let (mut wide, mut narrow) = (vec![0f32; g * d], vec![0f32; g * d]);
            // SAFETY: `has_avx2`.
            unsafe { group.attend_avx2(&mut wide, &mut Vec::new()) };
            group.attend(&mut narrow, &mut Vec::new());
            assert_eq!(wide, narrow, "{g} {s} {d}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_build_of_silu_gives_the_same_bits() {
        if !Kernel::detect().has_avx2() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(6);
        // Past both ends of `exp`'s range too, and a tail past the last 8.
        let g: Vec<f32> = (0..203).map(|_| rng.random_range(-100.0..100.0)).collect();
        let u: Vec<f32> = (0..203).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (mut wide, mut narrow) = (vec![0f32; 203], vec![0f32; 203]);
        // SAFETY: `has_avx2`.
        unsafe { silu_times_avx2(&g, &u, &mut wide) };
        silu_times_row(&g, &u, &mut narrow);
        assert_eq!(wide, narrow);
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_keeps_nans() {
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(f32::INFINITY).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_times_is_candles_silu_then_mul_on_the_halves_of_a_projection() {
        let mut rng = StdRng::seed_from_u64(4);
        let stacked = random(&[2, 3, 2 * 40], &mut rng);
        let gate = stacked.narrow(2, 0, 40).unwrap();
        let up = stacked.narrow(2, 40, 40).unwrap();
        let got = silu_times(&gate, &up).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
        // Within a few ulp: `exp` is not libm's.
        for (g, w) in got
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(want.to_vec1::<f32>().unwrap())
        {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{g} vs {w}");
        }
        let other = random(&[2, 3, 41], &mut rng);
        assert!(silu_times(&gate, &other).is_err(), "shapes differ");
    }

    /// Batched decode steps rotate and attend without candle's ops; a
    /// session's numbers must still be those of the ops it runs alone.
    #[test]
    fn one_positions_rotation_and_attention_are_the_ops_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        let (heads, kv_heads, d, s) = (9, 3, 64, 37);
        let angles = random(&[1, d / 2], &mut rng);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = random(&[1, heads, 1, d], &mut rng);
        for interleaved in [true, false] {
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap()
            } else {
                candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap()
            };
            let mut got = values(&x);
            rotate(&mut got, &values(&cos), &values(&sin), interleaved);
            assert_eq!(got, values(&want), "interleaved: {interleaved}");
        }
        // Keys and values as a cache holds them: views of larger buffers.
        let k = random(&[1, kv_heads, s + 5, d], &mut rng)
            .narrow(2, 0, s)
            .unwrap();
        let v = random(&[1, kv_heads, s + 5, d], &mut rng)
            .narrow(2, 0, s)
            .unwrap();
        let want = cached_attention(&x, &k, &v).unwrap();
        let mut got = vec![0f32; heads * d];
        attend_position(&values(&x), &k, &v, &mut got).unwrap();
        assert_eq!(got, values(&want));
        // Widths that do not fit are refused, the output untouched.
        let mut short = vec![7f32; heads * d - 1];
        assert!(attend_position(&values(&x), &k, &v, &mut short).is_err());
        assert!(short.iter().all(|&y| y == 7.0));
        let q = vec![0f32; 8 * d];
        assert!(
            attend_position(&q, &k, &v, &mut vec![0f32; 8 * d]).is_err(),
            "8 heads over 3"
        );
    }

    #[test]
    fn session_rows_are_read_in_place_or_refused() {
        let stacked = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 1, 8))
            .unwrap();
        let right = stacked.narrow(2, 5, 3).unwrap();
        let (storage, layout) = right.storage_and_layout();
        let data = host(&storage).unwrap();
        assert_eq!(token_row(data, layout, 1).unwrap(), &[13.0, 14.0, 15.0]);
        assert!(token_row(data, layout, 3).is_err(), "past the last row");
        assert!(contiguous(data, layout).is_err(), "a strided view");
        let flat = stacked.reshape((3, 8)).unwrap();
        let (storage, layout) = flat.storage_and_layout();
        assert!(
            token_row(host(&storage).unwrap(), layout, 0).is_err(),
            "rank 2"
        );
        let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(host(&ints.storage_and_layout().0).is_err(), "not f32");
    }

    #[test]
    fn rms_norm_is_candles_to_rounding_and_refuses_misfits() {
        let mut rng = StdRng::seed_from_u64(12);
        let x = random(&[8, 1, 203], &mut rng);
        let alpha = random(&[203], &mut rng);
        let got = rms_norm(&x, &alpha, 1e-5).unwrap();
        let want = candle_nn::ops::rms_norm(&x, &alpha, 1e-5).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        #[cfg(target_arch = "x86_64")]
        if Kernel::detect().has_avx2() {
            let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (row, alpha) = (values(&x.narrow(0, 0, 1).unwrap()), values(&alpha));
            let (mut wide, mut narrow) = (vec![0f32; 203], vec![0f32; 203]);
            // SAFETY: `has_avx2`.
            unsafe { rms_norm_row_avx2(&row, &alpha, 1e-5, &mut wide) };
            rms_norm_row(&row, &alpha, 1e-5, &mut narrow);
            assert_eq!(wide, narrow, "the vector width moves no bit");
        }
        assert!(rms_norm(&x, &random(&[202], &mut rng), 1e-5).is_err());
        let strided = random(&[8, 1, 406], &mut rng).narrow(2, 0, 203).unwrap();
        assert!(rms_norm(&strided, &alpha, 1e-5).is_err());
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let mut rng = StdRng::seed_from_u64(1);
        let q = random(&[1, 9, 1, 64], &mut rng);
        let k = random(&[1, 4, 5, 64], &mut rng);
        let v = random(&[1, 4, 5, 64], &mut rng);
        assert!(
            cached_attention(&q, &k, &v).is_err(),
            "9 heads over 4 kv heads"
        );
        let k = random(&[1, 3, 5, 32], &mut rng);
        let v = random(&[1, 3, 5, 32], &mut rng);
        assert!(cached_attention(&q, &k, &v).is_err(), "head widths differ");
    }
}
