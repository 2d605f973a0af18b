//! The server's measurement of its own speed, cached on disk.
//!
//! Compute is timed on one block loaded for the purpose, before the server
//! knows which span it will host: `inference_rps` from single-token steps
//! with a warm cache, `forward_rps` from one long forward pass. The network
//! figure is the configured link capacity divided by the bits of one token's
//! activations in and out. Measuring costs seconds, so the result is cached
//! under a key of everything it depends on.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use model::{Checkpoint, LoadOptions};
use serde::{Deserialize, Serialize};
use wire::Throughput;

use crate::error::ServerError;

const DECODE_STEPS: usize = 16;
const FORWARD_TOKENS: usize = 128;

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    inference_rps: f64,
    forward_rps: f64,
}

/// What the measurement depends on: the checkpoint file, the compute threads
/// and the software version.
fn cache_key(checkpoint: &Path, options: &LoadOptions) -> String {
    let len = std::fs::metadata(checkpoint).map(|m| m.len()).unwrap_or(0);
    format!(
        "{}:{len}:{}:{:?}:{:?}:{}",
        checkpoint.display(),
        rayon::current_num_threads(),
        options.device.location(),
        options.precision,
        env!("CARGO_PKG_VERSION")
    )
}

/// Measures (or reads from `cache`) the per-block throughput of `ckpt`.
///
/// # Errors
/// When the block cannot be loaded or run.
pub fn measure(
    ckpt: &Checkpoint,
    options: &LoadOptions,
    cache: Option<&Path>,
    bandwidth_mbps: f64,
) -> Result<Throughput, ServerError> {
    let hidden = ckpt.config().hidden_size;
    // Activations travel in and out as f32.
    let network_rps = bandwidth_mbps * 1e6 / (2.0 * hidden as f64 * 32.0);
    let key = cache_key(ckpt.path(), options);
    if let Some(entry) = cache.and_then(|p| read_cache(p, &key)) {
        return Ok(Throughput {
            inference_rps: entry.inference_rps,
            forward_rps: entry.forward_rps,
            network_rps,
        });
    }
    let block = ckpt.load_span(0..1, options, &mut |_, _| {})?;
    let max_pos = ckpt.config().max_position_embeddings;
    let steps = DECODE_STEPS.min(max_pos.saturating_sub(1)).max(1);
    let tokens = FORWARD_TOKENS.min(max_pos).max(1);
    let one = Tensor::randn(0f32, 1.0, (1, 1, hidden), &Device::Cpu)?.to_dtype(DType::F32)?;
    let mut session = block.new_cache(max_pos);
    block.forward(&one, &mut session)?;
    let start = Instant::now();
    for _ in 0..steps {
        block.forward(&one, &mut session)?;
    }
    let inference_rps = steps as f64 / start.elapsed().as_secs_f64();
    let long = Tensor::randn(0f32, 1.0, (1, tokens, hidden), &Device::Cpu)?;
    let start = Instant::now();
    block.forward(&long, &mut block.new_cache(tokens))?;
    let forward_rps = tokens as f64 / start.elapsed().as_secs_f64();
    tracing::info!(
        inference_rps,
        forward_rps,
        network_rps,
        "measured throughput per block"
    );
    if let Some(path) = cache {
        write_cache(
            path,
            &CacheEntry {
                key,
                inference_rps,
                forward_rps,
            },
        );
    }
    Ok(Throughput {
        inference_rps,
        forward_rps,
        network_rps,
    })
}

fn read_cache(path: &Path, key: &str) -> Option<CacheEntry> {
    let text = std::fs::read_to_string(path).ok()?;
    let entry: CacheEntry = serde_json::from_str(&text).ok()?;
    (entry.key == key && entry.inference_rps > 0.0 && entry.forward_rps > 0.0).then_some(entry)
}

fn write_cache(path: &Path, entry: &CacheEntry) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(entry)?)?;
        std::fs::rename(tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), "cannot cache throughput: {e}");
    }
}
