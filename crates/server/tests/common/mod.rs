//! A local swarm on 127.0.0.1 over a tiny random model.

#![allow(dead_code)]

use p2p::NodeHandle;
use server::{Server, ServerConfig};

pub use p2p::testing::eventually;
pub use server::testing::{MODEL, config, tiny_model};

pub async fn node(bootstrap: Option<&NodeHandle>) -> NodeHandle {
    p2p::testing::local_node(bootstrap).await
}

pub async fn server(bootstrap: &NodeHandle, config: ServerConfig) -> Server {
    server::testing::start(bootstrap, config).await
}
