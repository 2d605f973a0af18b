//! A ready-made dev node: the store (on disk or in memory), the dev chain
//! and the RPC server, wired together. `hypertensor chain run --dev` and the
//! `ledger-devnode` test binary are thin wrappers around [`DevNode::start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::chain::{DevChain, DevChainConfig};
use crate::error::LedgerError;
use crate::genesis::Genesis;
use crate::rpc::{self, RpcServer};
use crate::runtime::Runtime;
use crate::storage::Store;

/// The database file inside a data directory.
pub const DB_FILE: &str = "ledger.redb";

/// Dev node settings.
#[derive(Clone, Debug)]
pub struct DevNodeConfig {
    /// Data directory; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// Genesis.
    pub genesis: Genesis,
    /// RPC bind address (port 0 picks a free port).
    pub rpc_addr: SocketAddr,
    /// Block time; `None` seals on each transaction and on demand.
    pub block_time: Option<Duration>,
}

/// A running dev node.
pub struct DevNode {
    /// The block producer.
    pub chain: DevChain,
    /// The RPC server.
    pub rpc: RpcServer,
}

impl DevNode {
    /// Opens the store, starts the producer and the RPC server.
    pub async fn start(cfg: DevNodeConfig) -> Result<DevNode, LedgerError> {
        let runtime = Runtime::new(&cfg.genesis)?;
        let store = match &cfg.data_dir {
            Some(dir) => Store::open(&dir.join(DB_FILE), &runtime, &cfg.genesis)?,
            None => Store::open_in_memory(&runtime, &cfg.genesis)?,
        };
        let chain = DevChain::start(
            Arc::new(store),
            runtime,
            DevChainConfig {
                block_time: cfg.block_time,
                ..DevChainConfig::default()
            },
        )?;
        let rpc = rpc::serve(chain.clone(), cfg.rpc_addr).await?;
        Ok(DevNode { chain, rpc })
    }

    /// The RPC URL (`http://ADDR`; the same port speaks WebSocket).
    pub fn rpc_url(&self) -> String {
        self.rpc.url()
    }

    /// Stops the RPC server and the producer.
    pub async fn stop(self) {
        let _ = self.rpc.handle.stop();
        self.rpc.handle.stopped().await;
        let chain = self.chain;
        let _ = tokio::task::spawn_blocking(move || chain.stop()).await;
    }
}
