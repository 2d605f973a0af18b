//! State shared by the server's tasks and its sessions.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use libp2p::PeerId;
use model::BlockSpan;
use p2p::NodeHandle;
use wire::ServerInfo;

use crate::budget::CacheBudget;
use crate::compute::Compute;
use crate::config::{Limits, ServerConfig};
use crate::gate::PeerGate;
use crate::metrics::ServerMetrics;
use crate::push::Pushes;

pub(crate) struct Shared {
    pub(crate) model_id: String,
    pub(crate) hidden: usize,
    pub(crate) limits: Limits,
    pub(crate) budget: CacheBudget,
    pub(crate) compute: Compute,
    pub(crate) metrics: ServerMetrics,
    /// Return wrong activations (a test fault; always false otherwise).
    pub(crate) corrupt: bool,
    /// Who may open streams.
    pub(crate) gate: Option<Arc<dyn PeerGate>>,
    /// Sessions other servers may push steps into.
    pub(crate) pushes: Arc<Pushes>,
    /// This server's node, for pushing to the next server.
    pub(crate) node: NodeHandle,
    /// Whether to announce in the DHT (false while not registered on chain).
    pub(crate) listed: AtomicBool,
    /// The hosted blocks; replaced when the server moves. Sessions keep the
    /// weights they opened with.
    span: RwLock<Arc<BlockSpan>>,
    info: RwLock<ServerInfo>,
    streams: Mutex<HashMap<PeerId, usize>>,
}

/// One admitted stream; frees its slot on drop.
pub(crate) struct Admission {
    shared: Arc<Shared>,
    peer: PeerId,
}

impl Shared {
    pub(crate) fn new(
        config: &ServerConfig,
        span: Arc<BlockSpan>,
        info: ServerInfo,
        corrupt: bool,
        node: NodeHandle,
    ) -> Self {
        let limits = config.limits.clone();
        let metrics = ServerMetrics::new(limits.cache_tokens);
        Self {
            model_id: config.model_id.clone(),
            hidden: span.config().hidden_size,
            budget: CacheBudget::new(limits.cache_tokens),
            compute: Compute::start(
                config.batching,
                metrics.batch_sizes.clone(),
                metrics.queue_waits.clone(),
            ),
            metrics,
            corrupt,
            gate: config.gate.clone(),
            pushes: Arc::default(),
            node,
            listed: AtomicBool::new(true),
            limits,
            span: RwLock::new(span),
            info: RwLock::new(info),
            streams: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn span(&self) -> Arc<BlockSpan> {
        self.span
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_span(&self, span: Arc<BlockSpan>) {
        *self.span.write().unwrap_or_else(PoisonError::into_inner) = span;
    }

    pub(crate) fn info(&self) -> ServerInfo {
        self.info
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn update_info(&self, f: impl FnOnce(&mut ServerInfo)) -> ServerInfo {
        let mut info = self.info.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut info);
        info.clone()
    }

    pub(crate) fn admit(self: &Arc<Self>, peer: PeerId) -> Option<Admission> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let n = streams.entry(peer).or_default();
        if *n >= self.limits.max_streams_per_peer {
            return None;
        }
        *n += 1;
        Some(Admission {
            shared: self.clone(),
            peer,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.peer);
            }
        }
    }
}
