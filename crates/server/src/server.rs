//! The server's life cycle: measure, place, announce, load, serve, rebalance,
//! and go offline cleanly.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use model::{BlockSpan, Checkpoint, LoadOptions};
use p2p::{NodeHandle, PeerId, now_ms, record};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wire::{ServerInfo, ServerState, Span, Throughput};

use crate::config::{ServerConfig, SpanChoice};
use crate::error::ServerError;
use crate::metrics::MetricsHandle;
use crate::placement::{self, Peer};
use crate::session::serve_stream;
use crate::state::Shared;
use crate::throughput;

/// A running block server.
pub struct Server {
    shared: Arc<Shared>,
    node: NodeHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("peer", &self.node.peer_id())
            .field("span", &self.span())
            .finish()
    }
}

/// What the background tasks need besides [`Shared`].
struct Context {
    shared: Arc<Shared>,
    node: NodeHandle,
    config: ServerConfig,
    ckpt: Arc<Checkpoint>,
    throughput: Throughput,
    num_blocks: u32,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?
}

fn block_keys(model: &str, span: Span) -> Vec<libp2p::kad::RecordKey> {
    (span.start..span.end)
        .map(|b| record::block_key(model, b))
        .chain(std::iter::once(libp2p::kad::RecordKey::new(
            &record::MODELS_KEY,
        )))
        .collect()
}

async fn load_span(
    ckpt: &Arc<Checkpoint>,
    options: &LoadOptions,
    span: Span,
) -> Result<Arc<BlockSpan>, ServerError> {
    let (ckpt, options) = (ckpt.clone(), options.clone());
    blocking(move || {
        let range = span.start as usize..span.end as usize;
        Ok(Arc::new(ckpt.load_span(range, &options, &mut |_, _| {})?))
    })
    .await
}

impl Server {
    /// Loads the model's blocks, announces them and starts serving on `node`.
    ///
    /// The server announces itself as Joining before it loads its blocks (so
    /// others placing themselves at the same time see it) and Online after.
    ///
    /// # Errors
    /// When the checkpoint cannot be opened or loaded, the span is invalid,
    /// or the node has stopped.
    pub async fn start(config: ServerConfig, node: NodeHandle) -> Result<Self, ServerError> {
        let path = config.checkpoint.clone();
        let ckpt = Arc::new(blocking(move || Ok(Checkpoint::open(path)?)).await?);
        let num_blocks = ckpt.config().num_blocks as u32;
        let measured = {
            let (ckpt, options, cache, bw) = (
                ckpt.clone(),
                config.load.clone(),
                config.throughput_cache.clone(),
                config.bandwidth_mbps,
            );
            blocking(move || throughput::measure(&ckpt, &options, cache.as_deref(), bw)).await?
        };
        let span = match config.span {
            SpanChoice::Fixed(start, end) => {
                if start >= end || end > num_blocks {
                    return Err(ServerError::BadSpan {
                        start,
                        end,
                        num_blocks,
                    });
                }
                Span { start, end }
            }
            SpanChoice::Auto(n) => {
                let others = swarm_peers(&node, &config.model_id, num_blocks).await?;
                let others: Vec<Peer> = others.into_iter().map(|(_, p)| p).collect();
                placement::choose_span(num_blocks, n, &others)
            }
        };
        let mut info = ServerInfo {
            model: config.model_id.clone(),
            num_blocks,
            span,
            state: ServerState::Joining,
            throughput: measured,
            cache_tokens_left: config.limits.cache_tokens,
            max_length: config.limits.max_length,
            dtype: config.load.precision.activation_dtype().into(),
            quantization: ckpt.weight_format(),
            version: env!("CARGO_PKG_VERSION").into(),
            wire_version: wire::WIRE_VERSION,
            addrs: node
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            using_relay: node.using_relay(),
            next_pings: Vec::new(),
            expires_at_ms: now_ms() + 2 * config.announce_period.as_millis() as u64,
        };
        node.announce(info.clone(), block_keys(&config.model_id, span), vec![])
            .await?;
        tracing::info!(model = %config.model_id, %span, "joining: loading blocks");
        let weights = load_span(&ckpt, &config.load, span).await?;
        info.state = ServerState::Online;
        let shared = Arc::new(Shared::new(
            &config,
            weights,
            info,
            corrupt(&config),
            node.clone(),
        ));
        let mut incoming = node.accept_inference()?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        {
            let shared = shared.clone();
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        next = incoming.next() => match next {
                            Some((peer, stream)) => {
                                tokio::spawn(serve_stream(shared.clone(), peer, stream));
                            }
                            None => break,
                        },
                        _ = stopped.changed() => break,
                    }
                }
            }));
        }
        let ctx = Arc::new(Context {
            shared: shared.clone(),
            node: node.clone(),
            config: config.clone(),
            ckpt,
            throughput: measured,
            num_blocks,
        });
        ctx.announce(vec![]).await?;
        tracing::info!(model = %config.model_id, %span, peer = %node.peer_id(), "online");
        tasks.push(tokio::spawn(ctx.clone().announce_loop(stopped.clone())));
        if matches!(config.span, SpanChoice::Auto(_)) {
            tasks.push(tokio::spawn(ctx.rebalance_loop(stopped)));
        }
        Ok(Self {
            shared,
            node,
            stop,
            tasks,
        })
    }

    /// The blocks currently served.
    pub fn span(&self) -> Span {
        self.shared.info().span
    }

    /// The record currently announced.
    pub fn info(&self) -> ServerInfo {
        self.shared.info()
    }

    /// Announces in the DHT (`true`, the start) or withdraws: `false`
    /// announces Offline once and then stays silent until listed again.
    /// Chain-connected servers are listed only while registered.
    pub fn set_listed(&self, listed: bool) {
        self.shared.listed.store(listed, Ordering::Relaxed);
    }

    /// KV-cache positions not reserved by sessions.
    pub fn cache_tokens_left(&self) -> u64 {
        self.shared.budget.free()
    }

    /// A handle that renders the server's Prometheus metrics; it stays
    /// valid (frozen at the last values) after shutdown.
    pub fn metrics(&self) -> MetricsHandle {
        MetricsHandle(self.shared.clone())
    }

    /// Announces Offline, stops accepting streams and stops the background
    /// tasks. Open sessions end when their streams do.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // The tasks only talk to the DHT and load weights: nothing is lost by
        // stopping them mid-way, and waiting could mean waiting out a DHT
        // query to a peer that just vanished.
        for t in self.tasks {
            t.abort();
        }
        let info = self.shared.update_info(|i| {
            i.state = ServerState::Offline;
            i.expires_at_ms = now_ms() + 60_000.min(self.node.max_record_ttl_ms());
        });
        let keys = block_keys(&info.model, info.span);
        let announced = self
            .node
            .announce_final(info, keys, Duration::from_secs(5))
            .await;
        if let Err(e) = announced {
            tracing::warn!("cannot announce going offline: {e}");
        }
        tracing::info!("offline");
    }
}

#[cfg(feature = "fault-injection")]
fn corrupt(config: &ServerConfig) -> bool {
    config.fault == Some(crate::config::Fault::CorruptActivations)
}

#[cfg(not(feature = "fault-injection"))]
fn corrupt(_: &ServerConfig) -> bool {
    false
}

/// Other servers of `model` that are not offline, as placement sees them.
async fn swarm_peers(
    node: &NodeHandle,
    model: &str,
    num_blocks: u32,
) -> Result<Vec<(PeerId, Peer)>, ServerError> {
    Ok(node
        .find_servers(model, num_blocks)
        .await?
        .into_iter()
        .filter(|(p, i)| *p != node.peer_id() && i.state != ServerState::Offline)
        .map(|(p, i)| {
            let peer = Peer {
                span: i.span,
                throughput: i.throughput.effective_rps(),
            };
            (p, peer)
        })
        .collect())
}

impl Context {
    /// Refreshes the record (free cache, expiry, pings to the next servers).
    async fn announce(&self, unprovide: Vec<libp2p::kad::RecordKey>) -> Result<(), ServerError> {
        let servers = self
            .node
            .find_servers(&self.config.model_id, self.num_blocks)
            .await
            .unwrap_or_default();
        let listed = self.shared.listed.load(Ordering::Relaxed);
        if !listed && self.shared.info().state == ServerState::Offline {
            return Ok(());
        }
        let free = self.shared.budget.free();
        let ttl = 2 * self.config.announce_period.as_millis() as u64;
        let info = self.shared.update_info(|i| {
            i.state = if listed {
                ServerState::Online
            } else {
                ServerState::Offline
            };
            i.cache_tokens_left = free;
            i.expires_at_ms = now_ms() + ttl.min(self.node.max_record_ttl_ms());
            i.addrs = self
                .node
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect();
            i.using_relay = self.node.using_relay();
            i.next_pings = servers
                .iter()
                .filter(|(_, s)| s.span.contains(i.span.end))
                .filter_map(|(p, _)| Some((p.to_string(), self.node.rtt(p)?.as_secs_f32() * 1e3)))
                .collect();
        });
        let keys = block_keys(&info.model, info.span);
        self.node.announce(info, keys, unprovide).await?;
        Ok(())
    }

    async fn announce_loop(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.announce_period);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.announce(vec![]).await {
                        tracing::warn!("announce failed: {e}");
                    }
                }
                _ = stopped.changed() => break,
            }
        }
    }

    async fn rebalance_loop(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        loop {
            let base = self.config.rebalance_period.as_secs_f64();
            let wait = base * rand::rng().random_range(0.5..1.5);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                _ = stopped.changed() => break,
            }
            if let Err(e) = self.rebalance_once().await {
                tracing::warn!("rebalance failed: {e}");
            }
        }
    }

    async fn rebalance_once(&self) -> Result<(), ServerError> {
        let found = swarm_peers(&self.node, &self.config.model_id, self.num_blocks).await?;
        let current = Peer {
            span: self.shared.info().span,
            throughput: self.throughput.effective_rps(),
        };
        // Servers that started together chose the same blocks from the same
        // view; if all of them moved at once they would uncover those blocks.
        // Only the one with the smallest peer id moves this round.
        let me = self.node.peer_id();
        let spans: Vec<String> = found.iter().map(|(_, o)| o.span.to_string()).collect();
        if found.iter().any(|(p, o)| o.span == current.span && *p < me) {
            tracing::debug!(span = %current.span, ?spans, "rebalance: a twin with a smaller id moves first");
            return Ok(());
        }
        let others: Vec<Peer> = found.into_iter().map(|(_, p)| p).collect();
        let Some(target) = placement::rebalance(
            self.num_blocks,
            current,
            &others,
            self.config.balance_quality,
        ) else {
            tracing::debug!(span = %current.span, ?spans, "rebalance: staying");
            return Ok(());
        };
        tracing::info!(from = %current.span, to = %target, "moving to blocks the swarm needs more");
        // Keep serving the old blocks while the new ones load.
        let weights = load_span(&self.ckpt, &self.config.load, target).await?;
        self.shared.set_span(weights);
        self.shared.update_info(|i| i.span = target);
        let old: Vec<_> = block_keys(&self.config.model_id, current.span)
            .into_iter()
            .filter(|k| !block_keys(&self.config.model_id, target).contains(k))
            .collect();
        self.announce(old).await
    }
}
