//! A validator process: commonware's tokio runtime, authenticated p2p with
//! known peer addresses (`lookup`), the redb store on disk, the validator
//! ([`crate::engine`]) and the ledger's JSON-RPC server on the same tokio
//! runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use commonware_cryptography::{ChaCha20Poly1305, Signer as _};
use commonware_p2p::authenticated::lookup;
use commonware_p2p::{Address, AddressableManager as _};
use commonware_runtime::{Quota, Runner as _, Supervisor as _};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::ordered::Map;
use futures::channel::mpsc;
use ledger::rpc::{self, RpcServer};
use ledger::storage::Store;
use ledger::{Genesis, Runtime};

use crate::block::DEFAULT_MAX_BLOCK_BYTES;
use crate::chain::Chain;
use crate::engine::{self, Channels, Timeouts, channel};
use crate::producer::BftProducer;
use crate::{ConsensusError, PrivateKey, PublicKey};

/// The ledger database inside a validator's data directory.
pub const DB_FILE: &str = "ledger.redb";
/// Consensus storage (marshal archives, simplex journals) inside it.
pub const CONSENSUS_DIR: &str = "consensus";

/// Largest p2p message: a full block plus framing.
const MAX_MESSAGE: u32 = (DEFAULT_MAX_BLOCK_BYTES + 64 * 1024) as u32;

/// Another validator's identity and address.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its consensus public key.
    pub key: PublicKey,
    /// Its p2p address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for Peer {
    type Err = String;

    /// `HEXKEY@HOST:PORT`.
    fn from_str(s: &str) -> Result<Peer, String> {
        use commonware_codec::DecodeExt as _;
        let (key, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("expected KEY@HOST:PORT, got {s}"))?;
        let bytes = hex::decode(key.trim_start_matches("0x")).map_err(|e| format!("key: {e}"))?;
        let key = PublicKey::decode(bytes).map_err(|e| format!("key: {e}"))?;
        let addr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
        Ok(Peer { key, addr })
    }
}

/// A validator process's settings.
pub struct NodeConfig {
    /// Consensus key.
    pub key: PrivateKey,
    /// Genesis (every validator uses the same file).
    pub genesis: Genesis,
    /// Data directory (redb and consensus storage).
    pub data_dir: PathBuf,
    /// p2p listen address.
    pub p2p_addr: SocketAddr,
    /// JSON-RPC listen address (port 0 picks one).
    pub rpc_addr: SocketAddr,
    /// The other validators (this node's own entry is ignored).
    pub peers: Vec<Peer>,
    /// Consensus timing.
    pub timeouts: Timeouts,
}

/// Runs a validator until the process is stopped. `ready` is called once
/// with the RPC server, when it is listening.
pub fn run(
    cfg: NodeConfig,
    ready: impl FnOnce(&RpcServer) + Send + 'static,
) -> Result<(), ConsensusError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(ledger::LedgerError::from)?;
    let runner = commonware_runtime::tokio::Runner::new(
        commonware_runtime::tokio::Config::new()
            .with_storage_directory(cfg.data_dir.join(CONSENSUS_DIR))
            .with_tcp_nodelay(Some(true)),
    );
    runner.start(|context| async move { serve(context, cfg, ready).await })
}

async fn serve(
    context: commonware_runtime::tokio::Context,
    cfg: NodeConfig,
    ready: impl FnOnce(&RpcServer) + Send + 'static,
) -> Result<(), ConsensusError> {
    let runtime = Runtime::new(&cfg.genesis)?;
    let store = Store::open(&cfg.data_dir.join(DB_FILE), &runtime, &cfg.genesis)?;
    let chain = Arc::new(Chain::new(Arc::new(store), runtime, 100_000)?);
    let (gossip_tx, gossip_rx) = mpsc::unbounded();
    let producer = BftProducer::new(Arc::clone(&chain), gossip_tx);
    let server = rpc::serve(producer, cfg.rpc_addr).await?;

    let me = cfg.key.public_key();
    let namespace = format!("hypertensor/{}", cfg.genesis.chain_id).into_bytes();
    let mut directory: Vec<(PublicKey, Address)> = vec![(me.clone(), cfg.p2p_addr.into())];
    for p in &cfg.peers {
        if p.key != me {
            directory.push((p.key.clone(), p.addr.into()));
        }
    }
    let directory = Map::from_iter_dedup(directory);
    let max_peers = std::num::NonZeroUsize::new(directory.len().max(1))
        .ok_or_else(|| ConsensusError::Config("no peers".into()))?;
    let p2p_cfg = lookup::Config::local(
        Cups::<_, ChaCha20Poly1305>::new(
            Sake {
                signer: cfg.key.clone(),
                synchrony_bound: Duration::from_secs(5),
                max_handshake_age: Duration::from_secs(10),
                version: sake::Version::V1,
            },
            cups::Version::V1,
        ),
        &namespace,
        cfg.p2p_addr,
        max_peers,
        MAX_MESSAGE,
        std::num::NonZeroUsize::new(1024).unwrap_or(max_peers),
    );
    let (mut network, mut oracle) = lookup::Network::new(context.child("p2p"), p2p_cfg);
    oracle.track(0, directory);
    // Per peer and channel. Each channel's inbound mailbox holds one burst
    // per possible peer, so a generous quota costs memory up front.
    let quota =
        Quota::per_second(std::num::NonZeroU32::new(1_000).unwrap_or(std::num::NonZeroU32::MIN));
    let channels = Channels {
        votes: network.register(channel::VOTES, quota),
        certificates: network.register(channel::CERTIFICATES, quota),
        resolver: network.register(channel::RESOLVER, quota),
        backfill: network.register(channel::BACKFILL, quota),
        broadcast: network.register(channel::BROADCAST, quota),
        mempool: network.register(channel::MEMPOOL, quota),
    };
    network.start();

    let validator = engine::start(
        context.child("node"),
        engine::Config {
            signer: cfg.key,
            chain,
            blocker: oracle.clone(),
            peers: oracle,
            partition_prefix: "validator".into(),
            namespace,
            timeouts: cfg.timeouts,
            max_block_bytes: DEFAULT_MAX_BLOCK_BYTES,
            gossip: gossip_rx,
        },
        channels,
    );
    tracing::info!(rpc = %server.url(), p2p = %cfg.p2p_addr, key = %me, "validator started");
    ready(&server);
    let _ = validator.await;
    Ok(())
}
