//! Shared fixtures: a tiny model, block servers on 127.0.0.1 (some of them
//! cheating) and waiting on the DHT.
#![allow(dead_code)]

use std::path::PathBuf;

use p2p::NodeHandle;
use p2p::testing::{eventually, local_node};
use server::testing::{MODEL, config, tiny_model};
use server::{Fault, Server, SpanChoice};

/// Blocks of the tiny test model.
pub const BLOCKS: u32 = 4;

/// Logs to the test output when `RUST_LOG` asks for it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A swarm of block servers over one tiny model.
pub struct Swarm {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub boot: NodeHandle,
    /// Each server with the node it runs on (the node a validator shares).
    pub servers: Vec<(NodeHandle, Server)>,
}

/// Starts one server per `(start, end, cheating)`.
pub async fn swarm(spans: &[(u32, u32, bool)]) -> Swarm {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS as usize);
    let boot = local_node(None).await;
    let mut servers = Vec::new();
    for &(start, end, cheat) in spans {
        let mut c = config(&path, SpanChoice::Fixed(start, end));
        if cheat {
            c.fault = Some(Fault::CorruptActivations);
        }
        let node = local_node(Some(&boot)).await;
        let server = Server::start(c, node.clone()).await.unwrap();
        servers.push((node, server));
    }
    Swarm {
        _dir: dir,
        path,
        boot,
        servers,
    }
}

/// Waits until `node` finds `n` servers of the model in the DHT.
pub async fn wait_for_servers(node: &NodeHandle, n: usize) {
    eventually(20, || async {
        let found = node.find_servers(MODEL, BLOCKS).await.ok()?;
        (found.len() >= n).then_some(())
    })
    .await
}

impl Swarm {
    /// Shuts every server down.
    pub async fn shutdown(self) {
        for (node, server) in self.servers {
            server.shutdown().await;
            node.shutdown().await;
        }
        self.boot.shutdown().await;
    }
}
