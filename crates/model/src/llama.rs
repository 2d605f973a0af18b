//! The Llama-family transformer, split the way the swarm serves it: token
//! embedding, spans of blocks with per-session KV caches, and the head.
//! Tensors in, tensors out; loading lives in `checkpoint`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ops, rotary_emb};

use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::linear::{FusedLinear, Linear};
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
            Linear::Quant(m) => {
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
    pub(crate) fn as_linear(&self) -> Linear {
        match &self.table {
            EmbeddingTable::Quant(m) => Linear::Quant(m.clone()),
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

    /// A fresh session cache allowing up to `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> SpanCache {
        SpanCache {
            layers: (0..self.blocks.len())
                .map(|_| KvCache::new(max_len))
                .collect(),
        }
    }

    /// Runs the span over new positions `hidden` (`[batch, T, hidden]`),
    /// appending their keys and values to `cache`, and returns the span's output.
    pub fn forward(&self, hidden: &Tensor, cache: &mut SpanCache) -> Result<Tensor> {
        let c = &self.config;
        let (_, t, width) = hidden.dims3().map_err(|_| {
            ModelError::InputShape(format!(
                "hidden states must be [batch, tokens, {}], got {:?}",
                c.hidden_size,
                hidden.dims()
            ))
        })?;
        if width != c.hidden_size || t == 0 {
            return Err(ModelError::InputShape(format!(
                "hidden states must be [batch, tokens>0, {}], got {:?}",
                c.hidden_size,
                hidden.dims()
            )));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(ModelError::InputShape(format!(
                "cache has {} layers, span has {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let pos = cache.len();
        if pos + t > c.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                requested: pos + t,
                limit: c.max_position_embeddings,
            });
        }
        let hidden = hidden.to_dtype(DType::F32)?.to_device(&self.device)?;
        let (cos, sin) = rope_tables(c, pos, t, &self.device)?;
        let mask = causal_mask(pos, t, &self.device)?;
        // Run the blocks on a worker of the compute pool: the kernels' parallel
        // loops then fork from a worker (cheap) instead of parking this thread
        // and waking the pool once per matrix (a context switch each time).
        rayon::scope(|_| {
            let mut x = hidden;
            for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
                x = self.block_forward(block, &x, &cos, &sin, mask.as_ref(), kv)?;
            }
            Ok(x)
        })
    }

    fn block_forward(
        &self,
        w: &BlockWeights,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let h = ops::rms_norm(x, &w.attn_norm, eps)?;
        let x = (x + self.attention(w, &h, cos, sin, mask, kv)?)?;
        let h = ops::rms_norm(&x, &w.ffn_norm, eps)?;
        let [gate, up] = split(w.gate_up.forward(&h)?)?;
        let mlp = w.down.forward(&(ops::silu(&gate)? * up)?)?;
        Ok((x + mlp)?)
    }

    fn attention(
        &self,
        w: &BlockWeights,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let [q, k, v] = split(w.qkv.forward(x)?)?;
        let rope = |t: &Tensor| -> Result<Tensor> {
            Ok(match c.rope_style {
                RopeStyle::Interleaved => rotary_emb::rope_i(t, cos, sin)?,
                RopeStyle::Halves => rotary_emb::rope(t, cos, sin)?,
            })
        };
        let q = rope(&heads(&q, h)?)?;
        let k = rope(&heads(&k, kvh)?)?;
        let v = heads(&v, kvh)?;
        let (k, v) = kv.append(&k, &v)?;
        let s = k.dim(2)?;
        // Grouped-query attention without copying keys: query heads that share
        // a key/value head are stacked along the token axis.
        let g = h / kvh;
        let q = q.reshape((b, kvh, g * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, kvh, g, t, s))?
                .broadcast_add(m)?
                .reshape((b, kvh, g * t, s))?,
            None => scores,
        };
        let probs = ops::softmax_last_dim(&scores)?;
        let y = probs
            .matmul(&v)?
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
        w.o.forward(&y)
    }
}

/// The outputs of a fused projection as a fixed-size array.
fn split<const N: usize>(outs: Vec<Tensor>) -> Result<[Tensor; N]> {
    outs.try_into().map_err(|v: Vec<Tensor>| {
        ModelError::Config(format!("expected {N} projections, got {}", v.len()))
    })
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
#[derive(Debug, Clone)]
pub struct Head {
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    pub(crate) eps: f32,
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
        let last = hidden.narrow(1, t - 1, 1)?.to_dtype(DType::F32)?;
        let normed = ops::rms_norm(&last, &self.norm, self.eps)?;
        rayon::scope(|_| Ok(self.lm_head.forward(&normed)?.squeeze(1)?))
    }

    /// Logits `[batch, T, vocab]` for every position (for scoring and tests).
    pub fn forward_all(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = ops::rms_norm(&hidden.to_dtype(DType::F32)?, &self.norm, self.eps)?;
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
