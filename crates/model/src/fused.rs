//! CPU kernels that fuse chains of candle ops on the inference hot path.
//!
//! A decode step moves one position through each block. candle would run
//! its attention as a dozen small ops (two of them tiny GEMMs, each with its
//! own dispatch) and its SiLU-times-up as two passes with a temporary: at
//! this size the dispatch and allocation cost more than the arithmetic.
//! `llama.rs` uses these on the CPU when no gradient is needed; the training
//! path keeps candle's ops, which have a backward, and GPUs keep theirs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
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

    fn row(&self, i: usize, j: usize, k: usize) -> &'a [f32] {
        let at = self.start + i * self.stride[0] + j * self.stride[1] + k * self.stride[2];
        &self.data[at..at + self.dims[3]]
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
        // One (sequence, head) pair: its `t` outputs of width `d`.
        let pair = |n: usize| -> Vec<f32> {
            let (bi, h) = (n / heads, n % heads);
            let kvh = h / group;
            let rows = Pair {
                queries: (0..t).map(|i| q.row(bi, h, i)).collect(),
                keys: (0..s).map(|j| k.row(bi, kvh, j)).collect(),
                values: (0..s).map(|j| v.row(bi, kvh, j)).collect(),
            };
            #[cfg(target_arch = "x86_64")]
            if Kernel::detect().has_avx2() {
                // SAFETY: `has_avx2`.
                return unsafe { rows.attend_avx2() };
            }
            rows.attend()
        };
        // Heads run in parallel once a cache is long enough to pay for the
        // fork; each pair's arithmetic is the same either way.
        let pairs: Vec<Vec<f32>> = if s * t * heads * d >= PARALLEL_WORK {
            (0..b * heads).into_par_iter().map(pair).collect()
        } else {
            (0..b * heads).map(pair).collect()
        };
        let mut out = vec![0f32; b * t * heads * d];
        for (n, ys) in pairs.iter().enumerate() {
            let (bi, h) = (n / heads, n % heads);
            for (i, y) in ys.chunks_exact(d).enumerate() {
                let at = ((bi * t + i) * heads + h) * d;
                out[at..at + d].copy_from_slice(y);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }
}

/// One (sequence, head) pair's rows: its queries, and the keys and values
/// of its key/value head, position by position.
struct Pair<'a> {
    queries: Vec<&'a [f32]>,
    keys: Vec<&'a [f32]>,
    values: Vec<&'a [f32]>,
}

impl Pair<'_> {
    /// Each query's softmax-weighted sum of values, `t * d` floats; query `i`
    /// sits at position `s - t + i` and sees keys up to it.
    #[inline(always)]
    fn attend(&self) -> Vec<f32> {
        let (t, s) = (self.queries.len(), self.keys.len());
        let d = self.queries.first().map_or(0, |q| q.len());
        let scale = 1.0 / (d as f32).sqrt();
        let mut ys = vec![0f32; t * d];
        let mut scores = vec![0f32; s];
        for ((i, y), qi) in ys.chunks_exact_mut(d).enumerate().zip(&self.queries) {
            let scores = &mut scores[..s - t + i + 1];
            for (score, key) in scores.iter_mut().zip(&self.keys) {
                *score = dot(qi, key) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            for (&p, value) in scores.iter().zip(&self.values) {
                for (y, &x) in y.iter_mut().zip(*value) {
                    *y += p * x;
                }
            }
            y.iter_mut().for_each(|y| *y /= sum);
        }
        ys
    }

    /// [`attend`](Self::attend) compiled for AVX2, used where the quant
    /// kernel is an x86 one: a dot product's eight partial sums fill one
    /// register instead of two. The arithmetic is the same lane for lane,
    /// and so are the results: only the vector width changes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self) -> Vec<f32> {
        self.attend()
    }
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

/// `silu(gate) * up`, elementwise, for equal-shaped `gate` and `up` whose last
/// dimension is contiguous (the halves of a stacked projection's output).
/// Returns a contiguous tensor of that shape.
pub(crate) fn silu_times(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.apply_op2_no_bwd(up, &SiluTimes)?)
}

struct SiluTimes;

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
        let mut out = Vec::with_capacity(lg.shape().elem_count());
        for (g, u) in gate_rows.into_iter().zip(up_rows) {
            let (g, u) = (&gate[g..g + width], &up[u..u + width]);
            // candle's own silu, `x / (1 + e^-x)`, so answers do not move.
            out.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
        }
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }
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
        // Widths with and without a tail past the last 8.
        for (t, s, d) in [(1, 130, 64), (3, 17, 12), (2, 2, 8)] {
            let mut rows = |n: usize| -> Vec<Vec<f32>> {
                (0..n)
                    .map(|_| (0..d).map(|_| rng.random_range(-2.0..2.0)).collect())
                    .collect()
            };
            let (queries, keys, values) = (rows(t), rows(s), rows(s));
            let pair = Pair {
                queries: queries.iter().map(Vec::as_slice).collect(),
                keys: keys.iter().map(Vec::as_slice).collect(),
                values: values.iter().map(Vec::as_slice).collect(),
            };
            // SAFETY: `has_avx2`.
            let wide = unsafe { pair.attend_avx2() };
            assert_eq!(wide, pair.attend(), "{t} {s} {d}");
        }
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
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap()
        );
        let other = random(&[2, 3, 41], &mut rng);
        assert!(silu_times(&gate, &other).is_err(), "shapes differ");
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
