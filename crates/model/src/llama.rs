//! The Llama-family transformer, split the way the swarm serves it: token
//! embedding, spans of blocks with per-session KV caches, and the head.
//! Tensors in, tensors out; loading lives in `checkpoint`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{ops, rotary_emb};
use rayon::prelude::*;

use crate::combine::Combiner;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::fused;
use crate::kv_cache::KvCache;
use crate::linear::{FusedLinear, Linear, Precision};
use crate::quant::QuantMatrix;

/// Maps token ids to hidden states `[1, T, hidden]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: EmbeddingTable,
    vocab_size: usize,
    hidden_size: usize,
    device: Device,
}

#[derive(Debug, Clone)]
enum EmbeddingTable {
    /// Rows are dequantized on lookup, so the table stays compact.
    Quant(Arc<QuantMatrix>),
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn new(weight: Linear, device: &Device) -> Result<Self> {
        let (table, vocab_size, hidden_size) = match weight {
            Linear::Quant(m, _) => {
                let (v, h) = (m.rows(), m.cols());
                (EmbeddingTable::Quant(m), v, h)
            }
            Linear::Dense(t) => {
                let (v, h) = t.dims2()?;
                (EmbeddingTable::Dense(t), v, h)
            }
            Linear::Candle(_) => {
                return Err(ModelError::Config(
                    "embedding tables are loaded as float or repacked blocks".into(),
                ));
            }
        };
        Ok(Self {
            table,
            vocab_size,
            hidden_size,
            device: device.clone(),
        })
    }

    /// The table as a linear layer, for models whose LM head is tied to it.
    pub(crate) fn as_linear(&self, precision: Precision) -> Linear {
        match &self.table {
            EmbeddingTable::Quant(m) => Linear::Quant(m.clone(), precision),
            EmbeddingTable::Dense(t) => Linear::Dense(t.clone()),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Looks up `ids`, refusing any id outside the vocabulary.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab_size: self.vocab_size,
            });
        }
        let t = ids.len();
        bind(&self.device)?;
        match &self.table {
            EmbeddingTable::Quant(m) => {
                let mut out = vec![0f32; t * self.hidden_size];
                for (row, &id) in out.chunks_exact_mut(self.hidden_size).zip(ids) {
                    m.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(
                    out,
                    (1, t, self.hidden_size),
                    &self.device,
                )?)
            }
            EmbeddingTable::Dense(table) => {
                let ids = Tensor::new(ids, &self.device)?;
                Ok(table.index_select(&ids, 0)?.unsqueeze(0)?)
            }
        }
    }
}

/// The weights of one transformer block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub(crate) attn_norm: Tensor,
    /// Query, key and value projections.
    pub(crate) qkv: FusedLinear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Tensor,
    /// Gate and up projections.
    pub(crate) gate_up: FusedLinear,
    pub(crate) down: Linear,
}

impl BlockWeights {
    fn size_in_bytes(&self) -> usize {
        let norms = (self.attn_norm.elem_count() + self.ffn_norm.elem_count()) * 4;
        norms
            + self.qkv.size_in_bytes()
            + self.gate_up.size_in_bytes()
            + self.o.size_in_bytes()
            + self.down.size_in_bytes()
    }
}

/// Per-session state of a [`BlockSpan`]: one KV cache per block.
#[derive(Debug, Clone)]
pub struct SpanCache {
    layers: Vec<KvCache>,
}

impl SpanCache {
    /// An empty cache for a run of `blocks` blocks, up to `max_len` positions.
    pub fn new(blocks: usize, max_len: usize) -> Self {
        Self {
            layers: (0..blocks).map(|_| KvCache::new(max_len)).collect(),
        }
    }

    /// Blocks the cache is for.
    pub fn blocks(&self) -> usize {
        self.layers.len()
    }

    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether no position has been processed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls the session back to its first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|c| c.truncate(len));
    }

    /// Bytes the blocks' key and value buffers hold.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::size_in_bytes).sum()
    }
}

/// Blocks `[start, end)` of a model: what one server hosts.
#[derive(Debug, Clone)]
pub struct BlockSpan {
    config: Arc<ModelConfig>,
    range: Range<usize>,
    blocks: Vec<BlockWeights>,
    device: Device,
}

impl BlockSpan {
    pub(crate) fn new(
        config: Arc<ModelConfig>,
        range: Range<usize>,
        blocks: Vec<BlockWeights>,
        device: Device,
    ) -> Self {
        Self {
            config,
            range,
            blocks,
            device,
        }
    }

    /// The blocks this span runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights held.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.iter().map(BlockWeights::size_in_bytes).sum()
    }

    /// Where the weights live and the span computes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh session cache allowing up to `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> SpanCache {
        SpanCache::new(self.blocks.len(), max_len)
    }

    /// Runs the span over new positions `hidden` (`[batch, T, hidden]`),
    /// appending their keys and values to `cache`, and returns the span's output.
    pub fn forward(&self, hidden: &Tensor, cache: &mut SpanCache) -> Result<Tensor> {
        self.forward_range(self.range(), hidden, cache)
    }

    /// Like [`forward`](Self::forward) for blocks `blocks` (absolute indices,
    /// within [`range`](Self::range)) only; `cache` must be for that many blocks.
    pub fn forward_range(
        &self,
        blocks: Range<usize>,
        hidden: &Tensor,
        cache: &mut SpanCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (_, t) = self.check_input(&blocks, hidden)?;
        if cache.layers.len() != blocks.len() {
            return Err(ModelError::InputShape(format!(
                "cache has {} layers, the run has {} blocks",
                cache.layers.len(),
                blocks.len()
            )));
        }
        let pos = cache.len();
        if pos + t > c.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                requested: pos + t,
                limit: c.max_position_embeddings,
            });
        }
        bind(&self.device)?;
        let hidden = hidden.to_dtype(DType::F32)?.to_device(&self.device)?;
        let (cos, sin) = rope_tables(c, pos, t, &self.device)?;
        // With a cache nothing here is differentiable, and the fused
        // attention masks by position itself: only candle's ops (on a GPU)
        // read the mask, a prompt-by-context matrix.
        let mask = if fusable(false, &hidden) {
            None
        } else {
            causal_mask(pos, t, &self.device)?
        };
        let weights = &self.blocks[blocks.start - self.range.start..blocks.end - self.range.start];
        // Run the blocks on a worker of the compute pool: the kernels' parallel
        // loops then fork from a worker (cheap) instead of parking this thread
        // and waking the pool once per matrix (a context switch each time).
        rayon::scope(|_| {
            bind(&self.device)?;
            let mut x = hidden;
            for (block, kv) in weights.iter().zip(cache.layers.iter_mut()) {
                let mut part = Attend {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    mask: mask.clone(),
                    kv: Some(kv),
                };
                x = self.block_forward(block, &x, std::slice::from_mut(&mut part))?;
            }
            Ok(x)
        })
    }

    /// One new position for each of several independent sessions (batch 1
    /// each) through blocks `blocks`, as one batched pass: the projections
    /// and MLPs read each weight once for all sessions, attention runs per
    /// session. Equivalent to calling [`forward_range`](Self::forward_range)
    /// for each; the caches must each be for `blocks.len()` blocks.
    pub fn forward_batch(
        &self,
        blocks: Range<usize>,
        hidden: &[Tensor],
        caches: &mut [SpanCache],
    ) -> Result<Vec<Tensor>> {
        let c = &self.config;
        if hidden.len() != caches.len() || hidden.is_empty() {
            return Err(ModelError::InputShape(format!(
                "{} inputs for {} caches",
                hidden.len(),
                caches.len()
            )));
        }
        for (x, cache) in hidden.iter().zip(caches.iter()) {
            let dims = self.check_input(&blocks, x)?;
            if dims != (1, 1) || cache.layers.len() != blocks.len() {
                return Err(ModelError::InputShape(format!(
                    "batched steps take [1, 1, {}] inputs and {}-block caches, got {:?} and {}",
                    c.hidden_size,
                    blocks.len(),
                    x.dims(),
                    cache.layers.len()
                )));
            }
            if cache.len() + 1 > c.max_position_embeddings {
                return Err(ModelError::ContextTooLong {
                    requested: cache.len() + 1,
                    limit: c.max_position_embeddings,
                });
            }
        }
        bind(&self.device)?;
        let tables = caches
            .iter()
            .map(|cache| rope_tables(c, cache.len(), 1, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let rows = hidden
            .iter()
            .map(|x| x.to_dtype(DType::F32)?.to_device(&self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights = &self.blocks[blocks.start - self.range.start..blocks.end - self.range.start];
        let x = rayon::scope(|_| -> Result<Tensor> {
            bind(&self.device)?;
            let mut x = Tensor::cat(&rows, 0)?;
            for (j, block) in weights.iter().enumerate() {
                let mut parts: Vec<Attend<'_>> = caches
                    .iter_mut()
                    .zip(&tables)
                    .map(|(cache, (cos, sin))| Attend {
                        cos: cos.clone(),
                        sin: sin.clone(),
                        mask: None,
                        kv: Some(&mut cache.layers[j]),
                    })
                    .collect();
                x = self.block_forward(block, &x, &mut parts)?;
            }
            Ok(x)
        })?;
        (0..hidden.len()).map(|i| Ok(x.narrow(0, i, 1)?)).collect()
    }

    /// Gradient of `sum(output * grad_output)` with respect to `hidden`, for a
    /// full sequence (no cache) through blocks `blocks`: what a client needs
    /// to train parameters that sit before these blocks (prompts, adapters).
    /// Weights are frozen.
    pub fn backward_range(
        &self,
        blocks: Range<usize>,
        hidden: &Tensor,
        grad_output: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (_, t) = self.check_input(&blocks, hidden)?;
        if grad_output.dims() != hidden.dims() {
            return Err(ModelError::InputShape(format!(
                "grad_output {:?} must match hidden states {:?}",
                grad_output.dims(),
                hidden.dims()
            )));
        }
        if t > c.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                requested: t,
                limit: c.max_position_embeddings,
            });
        }
        let weights = &self.blocks[blocks.start - self.range.start..blocks.end - self.range.start];
        if !weights
            .iter()
            .all(|w| w.qkv.supports_backward() && w.gate_up.supports_backward())
            || !weights
                .iter()
                .all(|w| w.o.supports_backward() && w.down.supports_backward())
        {
            return Err(ModelError::Unsupported(
                "backward needs f32-activation weights (not --q8)".into(),
            ));
        }
        bind(&self.device)?;
        let x = Var::from_tensor(&hidden.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        let (cos, sin) = rope_tables(c, 0, t, &self.device)?;
        let mask = causal_mask(0, t, &self.device)?;
        let mut h = x.as_tensor().clone();
        for block in weights {
            let mut part = Attend {
                cos: cos.clone(),
                sin: sin.clone(),
                mask: mask.clone(),
                kv: None,
            };
            h = self.block_forward(block, &h, std::slice::from_mut(&mut part))?;
        }
        let grad_output = grad_output.to_dtype(DType::F32)?.to_device(&self.device)?;
        let grads = (h * grad_output)?.sum_all()?.backward()?;
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| ModelError::Unsupported("no gradient reached the inputs".into()))
    }

    /// Checks a run's blocks and its `[batch, T, hidden]` input; returns `(batch, T)`.
    fn check_input(&self, blocks: &Range<usize>, hidden: &Tensor) -> Result<(usize, usize)> {
        let c = &self.config;
        if blocks.start < self.range.start || blocks.end > self.range.end || blocks.is_empty() {
            return Err(ModelError::InputShape(format!(
                "blocks {blocks:?} are not within the span {:?}",
                self.range
            )));
        }
        let (b, t, width) = hidden.dims3().map_err(|_| {
            ModelError::InputShape(format!(
                "hidden states must be [batch, tokens, {}], got {:?}",
                c.hidden_size,
                hidden.dims()
            ))
        })?;
        if width != c.hidden_size || t == 0 || b == 0 {
            return Err(ModelError::InputShape(format!(
                "hidden states must be [batch>0, tokens>0, {}], got {:?}",
                c.hidden_size,
                hidden.dims()
            )));
        }
        Ok((b, t))
    }

    fn block_forward(
        &self,
        w: &BlockWeights,
        x: &Tensor,
        parts: &mut [Attend<'_>],
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        // Without a cache this is the training path: candle's fused norm, rope
        // and softmax have no backward, their compositions do.
        let differentiable = parts.iter().any(|p| p.kv.is_none());
        let norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            Ok(if differentiable {
                ops::rms_norm_slow(x, w, eps)?
            } else {
                rms_norm(x, w, eps)?
            })
        };
        let h = norm(x, &w.attn_norm)?;
        let [q, k, v] = split(w.qkv.forward(&h)?)?;
        let (rows, positions, _) = q.dims3()?;
        let y = match parts {
            // Decode steps, one session's or a batch's (a row each: the
            // projections ran batched, attention runs against each cache).
            each if positions == 1 && rows == each.len() && fusable(differentiable, &q) => {
                self.attend_each(&q, &k, &v, each)?
            }
            [one] => self.attend(&q, &k, &v, one)?,
            many => {
                let ys = many
                    .iter_mut()
                    .enumerate()
                    .map(|(i, p)| {
                        let row = |t: &Tensor| t.narrow(0, i, 1);
                        self.attend(&row(&q)?, &row(&k)?, &row(&v)?, p)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&ys, 0)?
            }
        };
        let x = (x + w.o.forward(&y)?)?;
        let h = norm(&x, &w.ffn_norm)?;
        // silu(gate) * up inside the matmul's tasks where the kernels allow:
        // no parallel pass of its own, nor the two halves in between.
        let gated = if fusable(differentiable, &h) {
            w.gate_up.gated(&h)?
        } else {
            None
        };
        let act = match gated {
            Some(act) => act,
            None => {
                let [gate, up] = split(w.gate_up.forward(&h)?)?;
                if fusable(differentiable, &gate) {
                    fused::silu_times(&gate, &up)?
                } else {
                    (ops::silu(&gate)? * up)?
                }
            }
        };
        let mlp = w.down.forward(&act)?;
        Ok((x + mlp)?)
    }

    /// Attention for independent sessions at one new position each, on the
    /// CPU: row `i` of `q`, `k`, `v` (`[n, 1, heads * head_dim]`) is session
    /// `i`'s. Sessions run in parallel, each rotating its own rows, appending
    /// to its cache and attending over it into its row of the output; the
    /// numbers are [`attend`](Self::attend)'s for each row alone. Candle's
    /// rotations, reshapes and concatenation of the whole batch cost more
    /// than the attention itself, on one core while the others waited, and
    /// the parallel region after them paid to wake those (eight sessions,
    /// a block's attention: 90 us -> 38; a pass of 10 blocks: 4.6 -> 4.1 ms).
    fn attend_each(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        parts: &mut [Attend<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (hd, interleaved) = (c.head_dim, c.rope_style == RopeStyle::Interleaved);
        let width = c.num_heads * hd;
        let kv_shape = (1, c.num_kv_heads, 1, hd);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qs, ks, vs) = (fused::host(&qs)?, fused::host(&ks)?, fused::host(&vs)?);
        let mut out = vec![0f32; parts.len() * width];
        out.par_chunks_mut(width)
            .zip(parts.par_iter_mut())
            .enumerate()
            .try_for_each(|(i, (out, p))| -> Result<()> {
                let kv = p.kv.as_deref_mut().ok_or_else(|| {
                    ModelError::Unsupported("batched attention needs every session's cache".into())
                })?;
                let (cos, cl) = p.cos.storage_and_layout();
                let (sin, sl) = p.sin.storage_and_layout();
                let (cos, sin) = (
                    fused::contiguous(fused::host(&cos)?, cl)?,
                    fused::contiguous(fused::host(&sin)?, sl)?,
                );
                let mut q = fused::token_row(qs, ql, i)?.to_vec();
                let mut k = fused::token_row(ks, kl, i)?.to_vec();
                fused::rotate(&mut q, cos, sin, interleaved);
                fused::rotate(&mut k, cos, sin, interleaved);
                let (keys, values) = kv.append(
                    &Tensor::from_vec(k, kv_shape, &Device::Cpu)?,
                    &Tensor::from_slice(fused::token_row(vs, vl, i)?, kv_shape, &Device::Cpu)?,
                )?;
                fused::attend_position(&q, &keys, &values, out)
            })?;
        Ok(Tensor::from_vec(
            out,
            (parts.len(), 1, width),
            &self.device,
        )?)
    }

    /// Attention of projected `q`, `k`, `v` (`[b, t, heads * head_dim]`) for
    /// one session, appending to its cache; returns `[b, t, heads * head_dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &mut Attend<'_>) -> Result<Tensor> {
        let c = &self.config;
        let differentiable = p.kv.is_none();
        let (b, t, _) = q.dims3()?;
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let rope = |t: &Tensor| -> Result<Tensor> {
            let (cos, sin) = (&p.cos, &p.sin);
            Ok(match (c.rope_style, differentiable) {
                (RopeStyle::Interleaved, false) => rotary_emb::rope_i(t, cos, sin)?,
                (RopeStyle::Interleaved, true) => rotary_emb::rope_i_slow(t, cos, sin)?,
                (RopeStyle::Halves, false) => rotary_emb::rope(t, cos, sin)?,
                (RopeStyle::Halves, true) => rotary_emb::rope_slow(t, cos, sin)?,
            })
        };
        let q = rope(&heads(q, h)?)?;
        let k = rope(&heads(k, kvh)?)?;
        let v = heads(v, kvh)?;
        let (k, v) = match p.kv.as_deref_mut() {
            Some(kv) => kv.append(&k, &v)?,
            None => (k, v),
        };
        // Prompts too: the fused kernel gives each query what a step at its
        // position alone gets, sum for sum, so a prompt and the steps that
        // replay it agree to the bit; and it streams the cache where
        // candle's ops build a score matrix per head (a 1024-token prompt
        // through 10 blocks: 1.0 s -> 0.42 s).
        if fusable(differentiable, &q) {
            return fused::cached_attention(&q, &k, &v);
        }
        let s = k.dim(2)?;
        // Grouped-query attention without copying keys: query heads that share
        // a key/value head are stacked along the token axis.
        let g = h / kvh;
        let q = q.reshape((b, kvh, g * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match &p.mask {
            Some(m) => scores
                .reshape((b, kvh, g, t, s))?
                .broadcast_add(m)?
                .reshape((b, kvh, g * t, s))?,
            None => scores,
        };
        let probs = if differentiable {
            ops::softmax(&scores, D::Minus1)?
        } else {
            ops::softmax_last_dim(&scores)?
        };
        Ok(probs
            .matmul(&v)?
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?)
    }
}

impl Drop for BlockSpan {
    /// A span's GPU buffers are freed on whichever thread drops it last (a
    /// server replacing its span drops the old one on an async worker), and
    /// freeing needs their context current there.
    fn drop(&mut self) {
        let _ = bind(&self.device);
    }
}

/// One session's part of a block's attention: its rotary tables and mask for
/// its new positions, and its cache (`None` on the training path).
struct Attend<'a> {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    kv: Option<&'a mut KvCache>,
}

/// Whether [`crate::fused`]'s hand-written ops may stand in for candle's:
/// they have no backward, and run on the CPU only.
fn fusable(differentiable: bool, x: &Tensor) -> bool {
    !differentiable && x.device().is_cpu()
}

/// RMS norm without a backward: [`fused::rms_norm`] on the CPU (every CPU
/// path, so that they agree), candle's elsewhere.
fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        fused::rms_norm(x, alpha, eps)
    } else {
        Ok(ops::rms_norm(x, alpha, eps)?)
    }
}

/// The outputs of a fused projection as a fixed-size array.
fn split<const N: usize>(outs: Vec<Tensor>) -> Result<[Tensor; N]> {
    outs.try_into().map_err(|v: Vec<Tensor>| {
        ModelError::Config(format!("expected {N} projections, got {}", v.len()))
    })
}

/// Makes `device`'s CUDA context current on the calling thread. candle binds
/// it where it allocates, not everywhere it launches kernels, and servers
/// compute on threads other than the one that loaded the weights.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub(crate) fn bind(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        d.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
    }
    Ok(())
}

/// cos and sin of the rotary angles for positions `[pos, pos + t)`, `[t, head_dim / 2]`.
fn rope_tables(c: &ModelConfig, pos: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / c.head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in pos..pos + t {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

/// Additive mask `[t, pos + t]` hiding later positions; `None` for a single new position.
fn causal_mask(pos: usize, t: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), device)?))
}

/// The final norm and the LM head.
///
/// Concurrent [`forward`](Self::forward) calls from several threads run as
/// one batch ([`crate::combine`]): the head is the largest matrix of a small
/// model, and read once for every waiting session instead of once each.
/// Clones share the batching.
#[derive(Debug, Clone)]
pub struct Head {
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    pub(crate) eps: f32,
    pub(crate) combiner: Arc<Combiner>,
}

impl Head {
    /// Logits `[batch, vocab]` for the last position of `hidden` (`[batch, T, hidden]`).
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let (_, t, _) = hidden.dims3()?;
        if t == 0 {
            return Err(ModelError::InputShape(
                "no positions to predict from".into(),
            ));
        }
        bind(self.norm.device())?;
        let last = hidden
            .narrow(1, t - 1, 1)?
            .to_dtype(DType::F32)?
            .to_device(self.norm.device())?;
        self.combiner.run(last, |last| {
            bind(self.norm.device())?;
            let normed = rms_norm(last, &self.norm, self.eps)?;
            rayon::scope(|_| {
                bind(self.norm.device())?;
                Ok(self.lm_head.forward(&normed)?.squeeze(1)?)
            })
        })
    }

    /// Logits `[batch, T, vocab]` for every position (for scoring and tests).
    pub fn forward_all(&self, hidden: &Tensor) -> Result<Tensor> {
        bind(self.norm.device())?;
        let hidden = hidden.to_dtype(DType::F32)?.to_device(self.norm.device())?;
        let normed = rms_norm(&hidden, &self.norm, self.eps)?;
        self.lm_head.forward(&normed)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.lm_head.out_features()
    }
}

/// A whole model in one process: embedding, every block, head.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// Token embedding.
    pub embedding: Embedding,
    /// Blocks `[0, num_blocks)`.
    pub span: BlockSpan,
    /// Final norm and LM head.
    pub head: Head,
}

impl LocalModel {
    /// Runs new tokens through every block and returns the next-token logits `[vocab]`.
    pub fn step(&self, ids: &[u32], cache: &mut SpanCache) -> Result<Tensor> {
        let hidden = self.embedding.forward(ids)?;
        let out = self.span.forward(&hidden, cache)?;
        Ok(self.head.forward(&out)?.squeeze(0)?)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.head.vocab_size()
    }
}
