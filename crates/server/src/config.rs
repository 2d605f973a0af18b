//! What a server is told to do: which model, which blocks, and the limits it
//! enforces on every peer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::LoadOptions;

use crate::gate::PeerGate;

/// Which blocks to host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanChoice {
    /// Exactly these blocks, `[start, end)`; never rebalanced.
    Fixed(u32, u32),
    /// This many blocks, placed where the swarm needs them and moved when the
    /// swarm changes.
    Auto(u32),
}

/// Limits that keep one peer or session from hurting the others.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest session, in positions.
    pub max_length: u32,
    /// KV-cache positions (summed over sessions, times batch) the server may
    /// hold: its memory budget for caches.
    pub cache_tokens: u64,
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Sequences per request.
    pub max_batch: u32,
    /// A session or request with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// Streams one peer may have open at once.
    pub max_streams_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_length: 2048,
            cache_tokens: 32 * 2048,
            max_frame_bytes: 64 << 20,
            max_batch: 8,
            idle_timeout: Duration::from_secs(60),
            max_streams_per_peer: 16,
        }
    }
}

/// Everything [`Server::start`](crate::Server::start) needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Model id announced in the DHT; clients ask for it by this name.
    pub model_id: String,
    /// Checkpoint to load blocks from (GGUF file or HF folder).
    pub checkpoint: PathBuf,
    /// Blocks to host.
    pub span: SpanChoice,
    /// Device and activation precision of the hosted blocks.
    pub load: LoadOptions,
    /// Admission limits.
    pub limits: Limits,
    /// How often the DHT record is refreshed; records expire after twice this.
    pub announce_period: Duration,
    /// How often placement is reconsidered (jittered by up to a half).
    pub rebalance_period: Duration,
    /// Move only if the swarm's minimum block throughput would rise so that
    /// the current one is below this fraction of the new one.
    pub balance_quality: f64,
    /// Where measured throughput is cached; `None` measures every start.
    pub throughput_cache: Option<PathBuf>,
    /// Link capacity assumed for the network estimate, in Mbit/s.
    pub bandwidth_mbps: f64,
    /// Run concurrent sessions' decode steps as one batched pass.
    pub batching: bool,
    /// Who may use the server; `None` serves everyone.
    pub gate: Option<Arc<dyn PeerGate>>,
    /// Deliberate misbehaviour, so tests can check that validators catch it.
    /// Only test builds have it; no command-line flag reaches it.
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
}

/// A way for a test server to cheat.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Shift every returned activation by 0.5: plausible shapes, wrong values.
    CorruptActivations,
}

impl ServerConfig {
    /// Defaults for `checkpoint` served as `model_id`.
    pub fn new(
        model_id: impl Into<String>,
        checkpoint: impl Into<PathBuf>,
        span: SpanChoice,
    ) -> Self {
        Self {
            model_id: model_id.into(),
            checkpoint: checkpoint.into(),
            span,
            load: LoadOptions::default(),
            limits: Limits::default(),
            announce_period: Duration::from_secs(30),
            rebalance_period: Duration::from_secs(60),
            balance_quality: 0.75,
            throughput_cache: None,
            bandwidth_mbps: 100.0,
            batching: true,
            gate: None,
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }
}
