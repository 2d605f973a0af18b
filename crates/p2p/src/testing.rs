//! Scaffolding for tests of this crate and the crates above it: local nodes
//! on 127.0.0.1 and waiting on an outcome of the asynchronous swarm.

use std::future::Future;
use std::time::Duration;

use crate::{Keypair, Node, NodeConfig, NodeHandle};

/// A node on 127.0.0.1 with OS-assigned ports that joins through
/// `bootstrap`, or starts a new swarm without one.
///
/// # Panics
/// When the node cannot start: this is test scaffolding.
pub async fn local_node(bootstrap: Option<&NodeHandle>) -> NodeHandle {
    let mut config = NodeConfig::local();
    match bootstrap {
        Some(b) => config.initial_peers = b.dialable_addrs()[..1].to_vec(),
        None => config.new_swarm = true,
    }
    Node::start(Keypair::generate_ed25519(), config)
        .await
        .expect("a local node starts")
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds: the swarm
/// converges asynchronously, so tests wait on the outcome, never on a sleep.
///
/// # Panics
/// When the time runs out.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
