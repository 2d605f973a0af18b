//! A local swarm on 127.0.0.1 over a tiny random model.

#![allow(dead_code)]

use p2p::NodeHandle;
use server::{Server, ServerConfig};

pub use p2p::testing::eventually;
pub use server::testing::{MODEL, config, tiny_model};

/// Sends the servers' logs to the test output when `RUST_LOG` asks for them
/// (e.g. `RUST_LOG=server=debug`), for diagnosing a failure.
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn node(bootstrap: Option<&NodeHandle>) -> NodeHandle {
    logs();
    p2p::testing::local_node(bootstrap).await
}

pub async fn server(bootstrap: &NodeHandle, config: ServerConfig) -> Server {
    server::testing::start(bootstrap, config).await
}
