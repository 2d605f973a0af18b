//! Scaffolding for tests of this crate and the crates above it: a tiny
//! random model and servers on 127.0.0.1 that announce and rebalance fast.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use p2p::NodeHandle;

use crate::{Server, ServerConfig, SpanChoice};

/// The model id test servers announce.
pub const MODEL: &str = "tiny";

/// Writes a tiny random Q4_1 model of `blocks` blocks into `dir`.
///
/// # Panics
/// When the file cannot be written.
pub fn tiny_model(dir: &Path, blocks: usize) -> PathBuf {
    let path = dir.join(format!("tiny-{blocks}.gguf"));
    model::testing::write_gguf(&path, blocks, GgmlDType::Q4_1);
    path
}

/// A config for `path` as [`MODEL`] that announces every 500 ms and
/// rebalances every 400 ms.
pub fn config(path: &Path, span: SpanChoice) -> ServerConfig {
    let mut c = ServerConfig::new(MODEL, path, span);
    c.announce_period = Duration::from_millis(500);
    c.rebalance_period = Duration::from_millis(400);
    c
}

/// Starts a server on a new local node that joins through `bootstrap`.
///
/// # Panics
/// When the server cannot start.
pub async fn start(bootstrap: &NodeHandle, config: ServerConfig) -> Server {
    Server::start(config, p2p::testing::local_node(Some(bootstrap)).await)
        .await
        .expect("a test server starts")
}
