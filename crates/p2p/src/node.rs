//! The swarm's event loop and the handle other crates use to reach it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use futures::stream::FuturesUnordered;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, upgrade};
use libp2p::identity::Keypair;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, QueryId, QueryResult, Quorum, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, Transport, autonat, identify, noise, ping, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};
use wire::{FrameLimits, ServerInfo};

use crate::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use crate::config::NodeConfig;
use crate::error::P2pError;
use crate::inference::{self, FrameError, InferenceStream};
use crate::record;

/// How long opening an inference stream, dial included, may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Once a peer has answered a lookup, how long it still waits for more:
/// this many times what that first answer took, within [`SETTLE_MIN`] and
/// [`SETTLE_MAX`]. Kademlia would otherwise wait out every peer it was told
/// of that does not reply (departed peers linger in routing tables, and a
/// QUIC dial to one waits for its handshake timeout), up to the whole query
/// timeout: ten seconds for a client's route lookup in a swarm that peers
/// had left.
const SETTLE_FACTOR: u32 = 4;
const SETTLE_MIN: Duration = Duration::from_millis(200);
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// Milliseconds since the Unix epoch: the clock record expiries use.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Command {
    Announce {
        info: Box<ServerInfo>,
        provide: Vec<RecordKey>,
        unprovide: Vec<RecordKey>,
        /// Reply only once the record reached the closest peers (or failed to).
        wait: bool,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    GetProviders {
        key: RecordKey,
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    GetRecord {
        key: RecordKey,
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<()>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// Replies once a connection to `peer` is open, dialing it if needed.
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A query's caller. A lookup holds what it has found so far, and when it
/// started until it is set to settle ([`SETTLE_FACTOR`]).
enum Pending {
    Put(Option<oneshot::Sender<Result<(), P2pError>>>),
    Provide,
    Providers(
        HashSet<PeerId>,
        oneshot::Sender<HashSet<PeerId>>,
        Option<Instant>,
    ),
    Record(Vec<Vec<u8>>, oneshot::Sender<Vec<Vec<u8>>>, Option<Instant>),
}

impl Pending {
    /// A lookup that has found something and is not yet set to settle:
    /// when it started, taken so that it settles once.
    fn take_start_if_found(&mut self) -> Option<Instant> {
        match self {
            Pending::Providers(acc, _, started) if !acc.is_empty() => started.take(),
            Pending::Record(acc, _, started) if !acc.is_empty() => started.take(),
            _ => None,
        }
    }

    /// Answers a lookup with what it has found.
    fn answer(self) {
        match self {
            Pending::Providers(acc, reply, _) => {
                let _ = reply.send(acc);
            }
            Pending::Record(acc, reply, _) => {
                let _ = reply.send(acc);
            }
            Pending::Put(_) | Pending::Provide => {}
        }
    }
}

/// What the event loop shares with handles without a round trip.
#[derive(Default)]
struct Shared {
    listen_addrs: Mutex<Vec<Multiaddr>>,
    rtts: Mutex<HashMap<PeerId, Duration>>,
    using_relay: Mutex<bool>,
}

/// Starts nodes. A node runs until [`NodeHandle::shutdown`] or until every
/// handle is dropped.
#[derive(Debug)]
pub struct Node;

/// Cloneable access to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
    max_record_ttl_ms: u64,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl Node {
    /// Builds the swarm, starts listening, dials the initial peers and runs the
    /// event loop on a tokio task. Returns once every listener has an address.
    ///
    /// # Errors
    /// When the config is invalid or the transport cannot listen.
    pub async fn start(key: Keypair, config: NodeConfig) -> Result<NodeHandle, P2pError> {
        let bootstrap = config.bootstrap_peers()?;
        let mut swarm = build_swarm(&key, &config)?;
        let mut listeners = HashSet::new();
        for addr in &config.listen {
            if config.psk.is_some() && addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
                tracing::warn!(%addr, "private swarms run over TCP only; not listening on QUIC");
                continue;
            }
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| P2pError::Transport(format!("listen on {addr}: {e}")))?;
            listeners.insert(id);
        }
        let shared = Arc::new(Shared::default());
        while !listeners.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                } => {
                    listeners.remove(&listener_id);
                    lock(&shared.listen_addrs).push(address);
                }
                SwarmEvent::ListenerError { error, .. }
                | SwarmEvent::ListenerClosed {
                    reason: Err(error), ..
                } => {
                    return Err(P2pError::Transport(error.to_string()));
                }
                _ => {}
            }
        }
        for (peer, addr) in &bootstrap {
            swarm.behaviour_mut().kad.add_address(peer, addr.clone());
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, "cannot dial initial peer: {e}");
            }
        }
        if !bootstrap.is_empty() {
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().stream.new_control();
        let (tx, rx) = mpsc::channel(64);
        let event_loop = EventLoop {
            swarm,
            key,
            shared: shared.clone(),
            pending: HashMap::new(),
            settling: FuturesUnordered::new(),
            connecting: HashMap::new(),
            bootstrap: bootstrap.into_iter().map(|(_, a)| a).collect(),
            max_record_ttl_ms: config.max_record_ttl.as_millis() as u64,
        };
        tokio::spawn(event_loop.run(rx));
        tracing::info!(%peer_id, addrs = ?lock(&shared.listen_addrs), "p2p node started");
        Ok(NodeHandle {
            peer_id,
            commands: tx,
            control,
            shared,
            max_record_ttl_ms: config.max_record_ttl.as_millis() as u64,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn transport_error(e: impl std::fmt::Display) -> P2pError {
    P2pError::Transport(e.to_string())
}

fn build_swarm(key: &Keypair, config: &NodeConfig) -> Result<Swarm<Behaviour>, P2pError> {
    let tcp_config = tcp::Config::default().nodelay(true);
    let idle = config.idle_connection_timeout;
    let builder = SwarmBuilder::with_existing_identity(key.clone()).with_tokio();
    let swarm = match config.psk {
        None => builder
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(transport_error)?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(transport_error)?
            .with_behaviour(|key, relay| Behaviour::new(key, relay, config))
            .map_err(transport_error)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Some(psk) => builder
            .with_other_transport(|key| private_transport(key, psk, tcp_config))
            .map_err(transport_error)?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(transport_error)?
            .with_behaviour(|key, relay| Behaviour::new(key, relay, config))
            .map_err(transport_error)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };
    Ok(swarm)
}

/// TCP with a pre-shared-key handshake before noise: peers without the key
/// cannot even start the secure channel.
fn private_transport(
    key: &Keypair,
    psk: PreSharedKey,
    tcp_config: tcp::Config,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    Ok(tcp::tokio::Transport::new(tcp_config)
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    key: Keypair,
    shared: Arc<Shared>,
    pending: HashMap<QueryId, Pending>,
    /// Lookups with an answer, each ready when it has waited long enough
    /// for more ([`SETTLE_FACTOR`]).
    settling: FuturesUnordered<BoxFuture<'static, QueryId>>,
    /// Callers of [`Command::Connect`] waiting for a dial to finish.
    connecting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    bootstrap: Vec<Multiaddr>,
    max_record_ttl_ms: u64,
}

impl EventLoop {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(id) = self.settling.next(), if !self.settling.is_empty() => self.settle(id),
                command = commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.close_connections().await;
                        let _ = reply.send(());
                        break;
                    }
                    Some(command) => self.on_command(command),
                    None => break,
                },
            }
        }
        tracing::debug!("p2p node stopped");
    }

    /// Closes every connection and waits, briefly, until they are gone.
    /// Dropping the swarm alone leaves each connection's task running until
    /// it notices, and streams still open on it keep answering: peers would
    /// not see this node leave.
    async fn close_connections(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        while self.swarm.connected_peers().next().is_some() {
            tokio::select! {
                _ = self.swarm.select_next_some() => {}
                () = &mut deadline => break,
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        match command {
            Command::Announce {
                info,
                provide,
                unprovide,
                wait,
                reply,
            } => {
                for key in &unprovide {
                    kad.stop_providing(key);
                }
                let value = match record::sign(&self.key, &info) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                };
                let mut rec = Record::new(record::server_key(self.swarm.local_peer_id()), value);
                rec.expires = Some(expiry_instant(info.expires_at_ms));
                // `put_record` stores locally first; the copies at the closest
                // peers follow in the background, after a lookup of those
                // peers that waits out any that left. A last announcement
                // before shutting down waits, but only for the closest peers
                // this node is connected to, which are there to answer.
                let reached = wait.then(|| self.connected_closest(&rec.key));
                let kad = &mut self.swarm.behaviour_mut().kad;
                let id = match kad.put_record(rec.clone(), Quorum::One) {
                    Ok(id) => id,
                    Err(e) => {
                        let _ = reply.send(Err(P2pError::Query(e.to_string())));
                        return;
                    }
                };
                match reached {
                    None => {
                        self.pending.insert(id, Pending::Put(None));
                        let _ = reply.send(Ok(()));
                    }
                    Some(peers) if peers.is_empty() => {
                        self.pending.insert(id, Pending::Put(Some(reply)));
                    }
                    Some(peers) => {
                        self.pending.insert(id, Pending::Put(None));
                        let id = kad.put_record_to(rec, peers.into_iter(), Quorum::One);
                        self.pending.insert(id, Pending::Put(Some(reply)));
                    }
                }
                let kad = &mut self.swarm.behaviour_mut().kad;
                for key in provide {
                    match kad.start_providing(key) {
                        Ok(id) => {
                            self.pending.insert(id, Pending::Provide);
                        }
                        Err(e) => tracing::warn!("cannot provide: {e}"),
                    }
                }
            }
            Command::GetProviders { key, reply } => {
                let id = kad.get_providers(key);
                self.pending.insert(
                    id,
                    Pending::Providers(HashSet::new(), reply, Some(Instant::now())),
                );
            }
            Command::GetRecord { key, reply } => {
                let id = kad.get_record(key);
                self.pending
                    .insert(id, Pending::Record(Vec::new(), reply, Some(Instant::now())));
            }
            Command::AddAddresses { peer, addrs, reply } => {
                for addr in addrs {
                    self.swarm.add_peer_address(peer, addr);
                }
                let _ = reply.send(());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Connect { peer, reply } => self.connect(peer, reply),
            Command::Shutdown { .. } => {}
        }
    }

    /// Dials `peer` unless connected; `reply` hears when the dial ends. A dial
    /// already under way (the bootstrap's, Kademlia's) is waited on, not
    /// doubled.
    fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<(), String>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                let waiting = self.connecting.entry(peer).or_default();
                waiting.retain(|w| !w.is_closed());
                waiting.push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    fn dial_ended(&mut self, peer: PeerId, outcome: &Result<(), String>) {
        for waiting in self.connecting.remove(&peer).unwrap_or_default() {
            let _ = waiting.send(outcome.clone());
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                self.dial_ended(peer_id, &Ok(()));
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer_id),
                error,
                ..
            } if !self.swarm.is_connected(&peer_id) => {
                self.dial_ended(peer_id, &Err(error.to_string()));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                lock(&self.shared.rtts).insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new: autonat::NatStatus::Private,
                ..
            })) => self.listen_via_relays(),
            SwarmEvent::NewListenAddr { address, .. } => {
                if address.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
                    *lock(&self.shared.using_relay) = true;
                }
                let mut addrs = lock(&self.shared.listen_addrs);
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.shared.listen_addrs).retain(|a| a != &address);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                lock(&self.shared.rtts).remove(&peer_id);
            }
            _ => {}
        }
    }

    /// Behind a NAT, reserve a slot on each bootstrap peer's relay so others
    /// can reach us through it (and upgrade to a direct link with DCUtR).
    fn listen_via_relays(&mut self) {
        for addr in self.bootstrap.clone() {
            let circuit = addr.with(Protocol::P2pCircuit);
            if let Err(e) = self.swarm.listen_on(circuit.clone()) {
                tracing::warn!(%circuit, "cannot listen via relay: {e}");
            }
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => self.on_kad_inbound(request),
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => self.on_query(id, result, step.last, stats.num_successes() > 0),
            _ => {}
        }
    }

    /// Stores what other peers put only after it validates.
    fn on_kad_inbound(&mut self, request: kad::InboundRequest) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        match request {
            kad::InboundRequest::PutRecord {
                source,
                record: Some(mut rec),
                ..
            } => match record::verify(&rec.key, &rec.value, now_ms(), self.max_record_ttl_ms) {
                Ok((_, info)) => {
                    rec.expires = Some(expiry_instant(info.expires_at_ms));
                    if let Err(e) = kad.store_mut().put(rec) {
                        tracing::warn!(%source, "cannot store record: {e}");
                    }
                }
                Err(e) => tracing::warn!(%source, "refused DHT record: {e}"),
            },
            kad::InboundRequest::AddProvider {
                record: Some(provider),
            } if provider.key.as_ref().starts_with(b"hypertensor/") => {
                if let Err(e) = kad.store_mut().add_provider(provider) {
                    tracing::warn!("cannot store provider record: {e}");
                }
            }
            _ => {}
        }
    }

    /// `heard` says whether a peer has answered yet: a lookup's first
    /// results come from the local store, and may be stale.
    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool, heard: bool) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let mut pending = match (pending, result) {
            (Pending::Put(reply), QueryResult::PutRecord(r)) => {
                // Too few peers for a quorum is normal in a young swarm; the
                // record is stored locally either way.
                if let Err(e) = r {
                    tracing::debug!("record put reached no quorum: {e}");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
                Pending::Put(None)
            }
            (Pending::Providers(mut acc, reply, started), QueryResult::GetProviders(r)) => {
                match r {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        acc.extend(providers);
                    }
                    _ => {
                        let _ = reply.send(acc);
                        return;
                    }
                }
                Pending::Providers(acc, reply, started)
            }
            (Pending::Record(mut acc, reply, started), QueryResult::GetRecord(r)) => {
                match r {
                    Ok(kad::GetRecordOk::FoundRecord(peer_record)) => {
                        acc.push(peer_record.record.value);
                    }
                    _ => {
                        let _ = reply.send(acc);
                        return;
                    }
                }
                Pending::Record(acc, reply, started)
            }
            (p, _) => p,
        };
        if last {
            pending.answer();
        } else {
            if heard && let Some(started) = pending.take_start_if_found() {
                let wait = (started.elapsed() * SETTLE_FACTOR).clamp(SETTLE_MIN, SETTLE_MAX);
                self.settling.push(Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    id
                }));
            }
            self.pending.insert(id, pending);
        }
    }

    /// The peers of the routing table closest to `key` (as many as a record
    /// is replicated to by default) that this node is connected to now.
    fn connected_closest(&mut self, key: &RecordKey) -> Vec<PeerId> {
        let target = kad::KBucketKey::new(key.clone());
        let closest: Vec<PeerId> = self
            .swarm
            .behaviour_mut()
            .kad
            .get_closest_local_peers(&target)
            .map(|k| k.into_preimage())
            .take(kad::K_VALUE.get())
            .collect();
        closest
            .into_iter()
            .filter(|p| self.swarm.is_connected(p))
            .collect()
    }

    /// Answers a lookup with what it has found so far and stops it.
    fn settle(&mut self, id: QueryId) {
        let Some(pending) = self.pending.remove(&id) else {
            // It finished on its own meanwhile.
            return;
        };
        pending.answer();
        if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            query.finish();
        }
    }
}

fn expiry_instant(expires_at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(expires_at_ms.saturating_sub(now_ms()))
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Addresses others can dial, each ending in `/p2p/PEER_ID`.
    pub fn dialable_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.shared.listen_addrs)
            .iter()
            .map(|a| a.clone().with_p2p(self.peer_id).unwrap_or_else(|a| a))
            .collect()
    }

    /// Addresses the node listens on, without the peer id.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.shared.listen_addrs).clone()
    }

    /// Whether the node is reachable only through a relay.
    pub fn using_relay(&self) -> bool {
        *lock(&self.shared.using_relay)
    }

    /// The last ping round-trip time to `peer`, if connected.
    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        lock(&self.shared.rtts).get(peer).copied()
    }

    /// The longest expiry ahead a record may claim, in milliseconds.
    pub fn max_record_ttl_ms(&self) -> u64 {
        self.max_record_ttl_ms
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, P2pError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| P2pError::Shutdown)?;
        rx.await.map_err(|_| P2pError::Shutdown)
    }

    /// Signs and publishes `info` as this node's server record, provides the
    /// keys in `provide` and stops providing those in `unprovide`. Returns
    /// once the record is stored locally; copies reach other peers after.
    ///
    /// # Errors
    /// When the node has stopped or the record cannot be signed.
    pub async fn announce(
        &self,
        info: ServerInfo,
        provide: Vec<RecordKey>,
        unprovide: Vec<RecordKey>,
    ) -> Result<(), P2pError> {
        self.command(|reply| Command::Announce {
            info: Box::new(info),
            provide,
            unprovide,
            wait: false,
            reply,
        })
        .await?
    }

    /// Like [`announce`](Self::announce), but returns only once one of the
    /// peers closest to its key that this node is connected to has stored
    /// the record (any peer, when none of them is connected), or `timeout`
    /// passed: the last announcement before the node stops.
    ///
    /// # Errors
    /// When the node has stopped or the record cannot be signed.
    pub async fn announce_final(
        &self,
        info: ServerInfo,
        unprovide: Vec<RecordKey>,
        timeout: Duration,
    ) -> Result<(), P2pError> {
        let sent = self.command(|reply| Command::Announce {
            info: Box::new(info),
            provide: Vec::new(),
            unprovide,
            wait: true,
            reply,
        });
        match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r?,
            Err(_) => Ok(()),
        }
    }

    /// Peers providing `key`.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn providers(&self, key: RecordKey) -> Result<HashSet<PeerId>, P2pError> {
        self.command(|reply| Command::GetProviders { key, reply })
            .await
    }

    /// The freshest valid server record of `peer`, if any.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn server_info(&self, peer: &PeerId) -> Result<Option<ServerInfo>, P2pError> {
        let key = record::server_key(peer);
        let values = self
            .command(|reply| Command::GetRecord {
                key: key.clone(),
                reply,
            })
            .await?;
        let now = now_ms();
        Ok(values
            .iter()
            .filter_map(
                |v| match record::verify(&key, v, now, self.max_record_ttl_ms) {
                    Ok((_, info)) => Some(info),
                    Err(e) => {
                        tracing::debug!(%peer, "ignoring invalid record: {e}");
                        None
                    }
                },
            )
            .max_by_key(|i| i.expires_at_ms))
    }

    /// Every server of `model` with a valid record, found through the
    /// providers of its `num_blocks` blocks.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn find_servers(
        &self,
        model: &str,
        num_blocks: u32,
    ) -> Result<Vec<(PeerId, ServerInfo)>, P2pError> {
        let keys = (0..num_blocks).map(|b| record::block_key(model, b));
        let found = join_all(keys.map(|k| self.providers(k))).await;
        let mut peers = HashSet::new();
        for r in found {
            peers.extend(r?);
        }
        let infos = join_all(peers.iter().map(|p| self.server_info(p))).await;
        let mut servers = Vec::new();
        for (peer, info) in peers.into_iter().zip(infos) {
            if let Some(info) = info?
                && info.model == model
            {
                servers.push((peer, info));
            }
        }
        servers.sort_by_key(|(p, i)| (i.span.start, *p));
        Ok(servers)
    }

    /// Remembers addresses for `peer`, e.g. from its server record. Returns
    /// once the swarm knows them, so a stream opened next can dial.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), P2pError> {
        self.command(|reply| Command::AddAddresses { peer, addrs, reply })
            .await
    }

    /// Peers with an open connection.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, P2pError> {
        self.command(|reply| Command::ConnectedPeers { reply })
            .await
    }

    /// Opens an inference stream to `peer`, dialing it if needed.
    ///
    /// The connection is made first, through the event loop: libp2p-stream
    /// dials by itself only when it has not yet seen the connection, and a
    /// connection that is just being set up makes that dial a no-op whose
    /// stream request then waits forever. [`OPEN_TIMEOUT`] bounds the rest.
    ///
    /// # Errors
    /// [`P2pError::OpenStream`] when the peer is unreachable, does not speak
    /// the protocol or does not answer in time.
    pub async fn open_inference(
        &self,
        peer: PeerId,
        limits: FrameLimits,
    ) -> Result<InferenceStream, P2pError> {
        let fail = |reason: String| P2pError::OpenStream { peer, reason };
        let open = async {
            self.command(|reply| Command::Connect { peer, reply })
                .await?
                .map_err(fail)?;
            self.control
                .clone()
                .open_stream(peer, inference::PROTOCOL)
                .await
                .map_err(|e| fail(e.to_string()))
        };
        let stream = tokio::time::timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| fail(format!("no stream within {OPEN_TIMEOUT:?}")))??;
        Ok(InferenceStream::new(peer, stream, limits))
    }

    /// Opens a stream to `peer`, sends `first` and returns the stream with the
    /// server's response: how every session and one-shot request starts.
    ///
    /// A server drops inbound streams that arrive faster than it accepts them
    /// (libp2p-stream buffers one per protocol), and the opener learns of it
    /// only when the stream fails. A stream that fails before any response was
    /// never served, so it is reopened, a few times with jittered backoff.
    ///
    /// # Errors
    /// When the stream cannot be opened, or the last attempt fails.
    pub async fn open_inference_with(
        &self,
        peer: PeerId,
        limits: FrameLimits,
        first: &wire::Request,
    ) -> Result<(InferenceStream, wire::Response), P2pError> {
        const ATTEMPTS: u32 = 4;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut stream = self.open_inference(peer, limits).await?;
            match stream.call(first).await {
                Ok(response) => return Ok((stream, response)),
                Err(e @ (FrameError::Io(_) | FrameError::Closed)) if attempt < ATTEMPTS => {
                    tracing::debug!(%peer, attempt, "stream failed before its first response: {e}");
                    let base = 5u64 << attempt;
                    let jitter = rand::random::<u64>() % base;
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Starts accepting inference streams; only one acceptor may exist.
    ///
    /// # Errors
    /// When an acceptor is already registered.
    pub fn accept_inference(&self) -> Result<libp2p_stream::IncomingStreams, P2pError> {
        self.control
            .clone()
            .accept(inference::PROTOCOL)
            .map_err(|e| P2pError::Transport(e.to_string()))
    }

    /// Stops the event loop and closes every connection.
    pub async fn shutdown(&self) {
        let _ = self.command(|reply| Command::Shutdown { reply }).await;
    }
}
