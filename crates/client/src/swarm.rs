//! What the client knows of one model's servers: their DHT records and our
//! round trips to them, refreshed at most every `max_age`, in the
//! background while an older answer still serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use p2p::{Multiaddr, NodeHandle, PeerId};
use tokio::sync::Mutex;
use wire::{ServerInfo, ServerState};

use crate::error::ClientError;
use crate::routing::{Candidate, Hop};

/// One server as the client sees it.
#[derive(Debug, Clone)]
pub struct ServerView {
    /// Who.
    pub peer: PeerId,
    /// What it announced.
    pub info: ServerInfo,
    /// Our last ping to it, if connected.
    pub rtt: Option<Duration>,
}

impl ServerView {
    /// The server as a routing candidate.
    pub fn candidate(&self) -> Candidate {
        Candidate {
            peer: self.peer,
            span: self.info.span,
            inference_rps: self.info.throughput.inference_rps,
            network_rps: self.info.throughput.network_rps,
            rtt: self.rtt,
            cache_tokens_left: self.info.cache_tokens_left,
            max_length: self.info.max_length,
        }
    }
}

/// How old a cached answer may be and still serve while a lookup refreshes
/// it; older than this, a caller waits for the lookup.
const STALE_LIMIT: Duration = Duration::from_secs(60);

/// The servers of one model, cached.
#[derive(Debug, Clone)]
pub struct SwarmView {
    node: NodeHandle,
    model: String,
    num_blocks: u32,
    max_age: Duration,
    cache: Arc<Mutex<Option<Snapshot>>>,
    /// Whether a background lookup is under way.
    refreshing: Arc<AtomicBool>,
}

/// The last DHT answer and when it came.
type Snapshot = (Instant, Vec<ServerView>);

impl SwarmView {
    /// Watches `model` (with `num_blocks` blocks) through `node`.
    pub fn new(node: NodeHandle, model: impl Into<String>, num_blocks: u32) -> Self {
        Self {
            node,
            model: model.into(),
            num_blocks,
            max_age: Duration::from_secs(5),
            cache: Arc::new(Mutex::new(None)),
            refreshing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same view, its answers refreshed once older than `max_age`
    /// (five seconds unless set).
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The model id.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Its number of blocks.
    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    /// The p2p node this view queries through.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// Servers announced within `max_age`. An older answer (up to a minute)
    /// still serves while a lookup refreshes it in the background, as
    /// Petals' sequence manager does: a lookup in a swarm that peers have
    /// left waits out its settle time (200 ms or more), which every session
    /// opened just after the cache expired used to pay. With no answer, or
    /// one older than that, the caller waits for the lookup. Every server's
    /// announced addresses are handed to the node, so opening a stream to
    /// it can dial.
    ///
    /// # Errors
    /// When the DHT query fails.
    pub async fn servers(&self) -> Result<Vec<ServerView>, ClientError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, servers)) = cache.as_ref() {
            let age = at.elapsed();
            if age < STALE_LIMIT {
                if age >= self.max_age {
                    self.refresh_in_background();
                }
                return Ok(self.with_rtts(servers.clone()));
            }
        }
        let servers = self.lookup().await?;
        *cache = Some((Instant::now(), servers.clone()));
        Ok(self.with_rtts(servers))
    }

    /// Starts a lookup that replaces the cached answer, unless one is
    /// already under way.
    fn refresh_in_background(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let view = self.clone();
        tokio::spawn(async move {
            match view.lookup().await {
                Ok(servers) => *view.cache.lock().await = Some((Instant::now(), servers)),
                Err(e) => tracing::debug!(model = %view.model, "refreshing the swarm view: {e}"),
            }
            view.refreshing.store(false, Ordering::Release);
        });
    }

    /// Asks the DHT for the model's servers.
    async fn lookup(&self) -> Result<Vec<ServerView>, ClientError> {
        let found = self.node.find_servers(&self.model, self.num_blocks).await?;
        let mut servers = Vec::with_capacity(found.len());
        for (peer, info) in found {
            let addrs: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if !addrs.is_empty() {
                self.node.add_addresses(peer, addrs).await?;
            }
            servers.push(ServerView {
                peer,
                info,
                rtt: None,
            });
        }
        Ok(servers)
    }

    /// Online servers, as routing candidates.
    ///
    /// # Errors
    /// As [`servers`](Self::servers).
    pub async fn candidates(&self) -> Result<Vec<Candidate>, ClientError> {
        Ok(self
            .servers()
            .await?
            .iter()
            .filter(|s| s.info.state == ServerState::Online)
            .map(ServerView::candidate)
            .collect())
    }

    /// The hops of `route` whose servers announce an activation dtype other
    /// than `dtype` ([`model::Precision::activation_dtype`]), with theirs: a
    /// route that mixes precisions gives answers no single process gives.
    ///
    /// # Errors
    /// When the DHT query fails.
    pub async fn hops_not_computing_in(
        &self,
        route: &[Hop],
        dtype: &str,
    ) -> Result<Vec<(Hop, String)>, ClientError> {
        let servers = self.servers().await?;
        Ok(route
            .iter()
            .filter_map(|hop| {
                let theirs = &servers.iter().find(|s| s.peer == hop.peer)?.info.dtype;
                (theirs != dtype).then(|| (*hop, theirs.clone()))
            })
            .collect())
    }

    /// Drops the cached answer, so the next call asks the DHT.
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    fn with_rtts(&self, mut servers: Vec<ServerView>) -> Vec<ServerView> {
        for s in &mut servers {
            s.rtt = self.node.rtt(&s.peer);
        }
        servers
    }
}
