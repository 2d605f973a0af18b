//! What a server announces in the DHT about itself ([`ServerInfo`]).
//!
//! `p2p` signs and validates these records; this module only fixes the schema
//! and the checks that need no key.

use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// Blocks `[start, end)` of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Span {
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}

impl Span {
    /// A span, checked to be non-empty.
    ///
    /// # Errors
    /// When `start >= end`.
    pub fn new(start: u32, end: u32) -> Result<Self, WireError> {
        if start >= end {
            return Err(WireError::Malformed(format!("empty span {start}..{end}")));
        }
        Ok(Self { start, end })
    }

    /// Number of blocks.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the span holds no block (never true for a checked span).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether block `b` is in the span.
    pub fn contains(&self, b: u32) -> bool {
        (self.start..self.end).contains(&b)
    }

    /// Whether `inner` lies within this span.
    pub fn covers(&self, inner: Span) -> bool {
        self.start <= inner.start && inner.end <= self.end && !inner.is_empty()
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.start, self.end)
    }
}

/// A server's life cycle as seen by the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerState {
    /// Loading its blocks; not yet serving.
    Joining,
    /// Serving.
    Online,
    /// Shut down cleanly.
    Offline,
}

/// Throughputs a server measured for itself, per block.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Single-token inference steps per second through one block.
    pub inference_rps: f64,
    /// Tokens per second through one block in a long forward pass.
    pub forward_rps: f64,
    /// Tokens per second the server's link can carry.
    pub network_rps: f64,
}

impl Throughput {
    /// The figure placement balances on: compute and network both limit a block.
    pub fn effective_rps(&self) -> f64 {
        self.inference_rps.min(self.network_rps)
    }
}

/// The signed payload of a server's DHT record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Model id, as clients name it.
    pub model: String,
    /// Blocks in the whole model.
    pub num_blocks: u32,
    /// The blocks this server hosts.
    pub span: Span,
    /// Where it is in its life cycle.
    pub state: ServerState,
    /// Measured throughput.
    pub throughput: Throughput,
    /// KV-cache positions still free across sessions.
    pub cache_tokens_left: u64,
    /// Longest session it accepts.
    pub max_length: u32,
    /// Activation dtype of its compute: `f32`, or `q8` for activations
    /// rounded to 8 bits per block against quantized weights.
    pub dtype: String,
    /// Weight format, e.g. `Q4_1`.
    pub quantization: String,
    /// Software version.
    pub version: String,
    /// Wire schema version ([`crate::WIRE_VERSION`]).
    pub wire_version: u16,
    /// Multiaddresses it listens on.
    pub addrs: Vec<String>,
    /// Whether it is reachable only through a relay.
    pub using_relay: bool,
    /// Round-trip times in milliseconds to servers of the following blocks.
    pub next_pings: Vec<(String, f32)>,
    /// Unix time (ms) after which the record is stale.
    pub expires_at_ms: u64,
}

impl ServerInfo {
    /// Checks what a record's bytes alone can show: the span lies within the
    /// model, and the expiry is neither past nor further than `max_ttl_ms`
    /// ahead of `now_ms`.
    ///
    /// # Errors
    /// [`WireError::Malformed`] naming the problem.
    pub fn validate(&self, now_ms: u64, max_ttl_ms: u64) -> Result<(), WireError> {
        if self.span.is_empty() || self.span.end > self.num_blocks {
            return Err(WireError::Malformed(format!(
                "span {} outside a {}-block model",
                self.span, self.num_blocks
            )));
        }
        if self.model.is_empty() || self.model.len() > 256 {
            return Err(WireError::Malformed("model id must be 1-256 bytes".into()));
        }
        if self.expires_at_ms <= now_ms {
            return Err(WireError::Malformed("record expired".into()));
        }
        if self.expires_at_ms > now_ms.saturating_add(max_ttl_ms) {
            return Err(WireError::Malformed(format!(
                "expiry {} ms ahead exceeds the {max_ttl_ms} ms maximum",
                self.expires_at_ms - now_ms
            )));
        }
        if self.addrs.len() > 32 || self.next_pings.len() > 64 {
            return Err(WireError::Malformed("too many addresses or pings".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn info(expires_at_ms: u64) -> ServerInfo {
        ServerInfo {
            model: "m".into(),
            num_blocks: 30,
            span: Span::new(0, 10).unwrap(),
            state: ServerState::Online,
            throughput: Throughput::default(),
            cache_tokens_left: 1,
            max_length: 2048,
            dtype: "f32".into(),
            quantization: "Q4_1".into(),
            version: "0".into(),
            wire_version: crate::WIRE_VERSION,
            addrs: vec![],
            using_relay: false,
            next_pings: vec![],
            expires_at_ms,
        }
    }

    #[test]
    fn expiry_window_is_enforced() {
        assert!(info(1_500).validate(1_000, 1_000).is_ok());
        assert!(info(999).validate(1_000, 1_000).is_err());
        assert!(info(5_000).validate(1_000, 1_000).is_err());
    }

    #[test]
    fn span_must_fit_the_model() {
        let mut i = info(1_500);
        i.span = Span { start: 25, end: 31 };
        assert!(i.validate(1_000, 1_000).is_err());
        i.span = Span { start: 5, end: 5 };
        assert!(i.validate(1_000, 1_000).is_err());
        assert!(Span::new(3, 2).is_err());
        assert!(
            Span::new(0, 30)
                .unwrap()
                .covers(Span { start: 10, end: 20 })
        );
    }
}
