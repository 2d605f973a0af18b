//! A local swarm on 127.0.0.1 over a tiny random model.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use p2p::{Keypair, Node, NodeConfig, NodeHandle};
use server::{Server, ServerConfig, SpanChoice};

pub const MODEL: &str = "tiny";

pub fn tiny_model(dir: &Path, blocks: usize) -> PathBuf {
    let path = dir.join(format!("tiny-{blocks}.gguf"));
    model::testing::write_gguf(&path, blocks, GgmlDType::Q4_1);
    path
}

pub async fn node(bootstrap: Option<&NodeHandle>) -> NodeHandle {
    let mut config = NodeConfig::local();
    match bootstrap {
        Some(b) => config.initial_peers = b.dialable_addrs()[..1].to_vec(),
        None => config.new_swarm = true,
    }
    Node::start(Keypair::generate_ed25519(), config)
        .await
        .unwrap()
}

pub fn config(path: &Path, span: SpanChoice) -> ServerConfig {
    let mut c = ServerConfig::new(MODEL, path, span);
    c.announce_period = Duration::from_millis(500);
    c.rebalance_period = Duration::from_millis(400);
    c
}

pub async fn server(bootstrap: &NodeHandle, config: ServerConfig) -> Server {
    Server::start(config, node(Some(bootstrap)).await)
        .await
        .unwrap()
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds: the swarm
/// converges asynchronously, so tests wait on the outcome, never on a sleep.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
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
