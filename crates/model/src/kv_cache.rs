//! Per-session key/value caches.

use candle_core::{D, Tensor};

use crate::error::{ModelError, Result};

/// Keys and values of one attention layer for one session, `[batch, kv_heads, len, head_dim]`.
///
/// The buffer grows by doubling up to `max_len`, so memory follows the tokens
/// actually cached, and it can be truncated to roll a session back (a client
/// replaying a prefix after a failover).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache that refuses to grow past `max_len` positions.
    pub fn new(max_len: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            max_len,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffers hold: the capacity, not just the positions cached.
    pub fn size_in_bytes(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `k` and `v` (`[b, h, t, d]`) and returns all cached keys and values.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let new_len = self.len + t;
        if new_len > self.max_len {
            return Err(ModelError::ContextTooLong {
                requested: new_len,
                limit: self.max_len,
            });
        }
        let capacity = self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0));
        if new_len > capacity {
            // Double (at least 16 positions) but never past the session's limit,
            // which may itself be below 16.
            let grown = new_len.next_power_of_two().max(16).min(self.max_len);
            let fresh = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, grown, d), k.dtype(), k.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(fresh(&self.k)?);
            self.v = Some(fresh(&self.v)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            unreachable!("buffers were allocated above")
        };
        if kb.dim(0)? != b || kb.dim(1)? != h || kb.dim(D::Minus1)? != d {
            return Err(ModelError::InputShape(format!(
                "cache holds {:?}, step has {:?}",
                kb.dims(),
                k.dims()
            )));
        }
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = new_len;
        // Views into the buffers, not copies: attention's matmuls take the
        // strided layout, and copying would cost a pass over the whole cache
        // per layer and step.
        Ok((kb.narrow(2, 0, new_len)?, vb.narrow(2, 0, new_len)?))
    }
}

impl Drop for KvCache {
    /// Sessions end, and drop their caches, on threads that never computed:
    /// make the buffers' CUDA context current there so freeing them works.
    fn drop(&mut self) {
        if let Some(k) = &self.k {
            let _ = crate::llama::bind(k.device());
        }
    }
}
