//! `hypertensor bench hop`: what one hop through a server costs beyond its
//! compute, on loopback.
//!
//! A bootstrap peer, a server holding block 0 of the model and a client run
//! in this process over real libp2p connections on 127.0.0.1. The baseline is
//! the same block stepped locally in the same run; the hop overhead is the
//! median remote round trip minus the median local step.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use model::{Checkpoint, LoadOptions};
use p2p::{Keypair, Node, NodeConfig};
use server::{Server, ServerConfig, SpanChoice};
use wire::{Compression, FrameLimits, OpenSession, Request, Response, Span, Step, WireTensor};

use crate::bench::median;

/// Options of `bench hop`.
#[derive(Debug, Args)]
pub struct HopBench {
    /// `default`, a .gguf file, or a Hugging Face folder.
    #[arg(long, default_value = "default")]
    model: String,
    /// Timed steps per mode.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Concurrent sessions for the batching table (whole model on one server).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sessions: Vec<usize>,
    /// Decode steps per session in the batching table.
    #[arg(long, default_value_t = 32)]
    batch_steps: usize,
    /// Where to write the results.
    #[arg(long, default_value = "bench-hop.json")]
    json: PathBuf,
}

struct BatchRow {
    sessions: usize,
    batching: bool,
    steps_per_s: f64,
}

/// Aggregate decode steps/s of `sessions` concurrent sessions through one
/// server holding every block.
async fn concurrent_steps(
    client: &p2p::NodeHandle,
    server: p2p::PeerId,
    model_id: &str,
    num_blocks: u32,
    hidden: usize,
    sessions: usize,
    steps: usize,
) -> Result<f64> {
    let values = vec![0.1f32; hidden];
    let run = |_| async {
        let open = Request::Open(OpenSession {
            model: model_id.into(),
            span: Span {
                start: 0,
                end: num_blocks,
            },
            max_length: steps as u32 + 1,
            batch: 1,
            compression: Compression::None,
        });
        let (mut s, _) = client
            .open_inference_with(server, FrameLimits::default(), &open)
            .await?;
        let hidden = WireTensor::encode(&values, &[1, 1, hidden], Compression::None)?;
        for position in 0..steps {
            let step = Request::Step(Step {
                position: position as u32,
                hidden: hidden.clone(),
                next: Vec::new(),
            });
            if let Response::Error(e) = s.call(&step).await? {
                bail!("step failed: {e}");
            }
        }
        s.close().await;
        Ok::<_, anyhow::Error>(())
    };
    let t = Instant::now();
    for r in futures::future::join_all((0..sessions).map(run)).await {
        r?;
    }
    Ok((sessions * steps) as f64 / t.elapsed().as_secs_f64())
}

struct Row {
    mode: &'static str,
    local_us: f64,
    remote_us: f64,
    bytes_per_token: usize,
}

impl HopBench {
    pub fn run(self) -> Result<()> {
        let path = model::resolve_model(&self.model)?;
        let ckpt = Checkpoint::open(&path)?;
        let hidden = ckpt.config().hidden_size;
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        // 16 positions of headroom; the model's context caps the steps.
        let context = ckpt.config().max_position_embeddings;
        let max_len = (self.steps + 16).min(context);
        if max_len <= 16 {
            bail!("the model's context ({context} positions) is too short for this benchmark");
        }
        let steps = max_len - 16;
        let local = ckpt.load_span(0..1, &LoadOptions::default(), &mut |_, _| {})?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, hidden), &Device::Cpu)?;
        let mut cache = local.new_cache(max_len);
        let mut local_times = Vec::new();
        for _ in 0..steps {
            let t = Instant::now();
            local.forward(&x, &mut cache)?;
            local_times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let local_us = median(local_times);
        let values = x.flatten_all()?.to_vec1::<f32>()?;

        let runtime = tokio::runtime::Runtime::new()?;
        let rows = runtime.block_on(async {
            let start = |bootstrap: Option<&p2p::NodeHandle>| {
                let mut config = NodeConfig::local();
                match bootstrap {
                    Some(b) => config.initial_peers = b.dialable_addrs()[..1].to_vec(),
                    None => config.new_swarm = true,
                }
                Node::start(Keypair::generate_ed25519(), config)
            };
            let boot = start(None).await?;
            let server_node = start(Some(&boot)).await?;
            let mut config = ServerConfig::new("bench", &path, SpanChoice::Fixed(0, 1));
            config.limits.max_length = max_len as u32;
            let server = Server::start(config, server_node.clone()).await?;
            let client = start(Some(&boot)).await?;
            client
                .add_addresses(server_node.peer_id(), server_node.listen_addrs())
                .await?;
            let mut rows = Vec::new();
            for (mode, compression) in [("f32", Compression::None), ("f16", Compression::F16)] {
                let mut s = client
                    .open_inference(server_node.peer_id(), FrameLimits::default())
                    .await?;
                let open = Request::Open(OpenSession {
                    model: "bench".into(),
                    span: Span { start: 0, end: 1 },
                    max_length: max_len as u32,
                    batch: 1,
                    compression,
                });
                if !matches!(s.call(&open).await?, Response::Opened { .. }) {
                    bail!("the server refused the session");
                }
                let hidden = WireTensor::encode(&values, &[1, 1, hidden], compression)?;
                let mut times = Vec::new();
                let mut bytes = 0;
                for position in 0..steps {
                    let step = Request::Step(Step {
                        position: position as u32,
                        hidden: hidden.clone(),
                        next: Vec::new(),
                    });
                    let t = Instant::now();
                    let response = s.call(&step).await?;
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                    let Response::Step(_) = &response else {
                        bail!("step failed: {response:?}");
                    };
                    bytes = wire::encode_frame(&step)?.len() + wire::encode_frame(&response)?.len();
                }
                s.close().await;
                rows.push(Row {
                    mode,
                    local_us,
                    remote_us: median(times),
                    bytes_per_token: bytes,
                });
            }
            server.shutdown().await;
            server_node.shutdown().await;

            let num_blocks = ckpt.config().num_blocks as u32;
            let mut batch_rows = Vec::new();
            for batching in [false, true] {
                let node = start(Some(&boot)).await?;
                let mut config =
                    ServerConfig::new("bench-all", &path, SpanChoice::Fixed(0, num_blocks));
                config.batching = batching;
                let server = Server::start(config, node.clone()).await?;
                client
                    .add_addresses(node.peer_id(), node.listen_addrs())
                    .await?;
                for &n in &self.sessions {
                    let steps_per_s = concurrent_steps(
                        &client,
                        node.peer_id(),
                        "bench-all",
                        num_blocks,
                        hidden,
                        n,
                        self.batch_steps,
                    )
                    .await?;
                    batch_rows.push(BatchRow {
                        sessions: n,
                        batching,
                        steps_per_s,
                    });
                }
                server.shutdown().await;
                node.shutdown().await;
            }
            for n in [client, boot] {
                n.shutdown().await;
            }
            Ok::<_, anyhow::Error>((rows, batch_rows))
        })?;
        let (rows, batch_rows) = rows;

        println!("| wire | local step us | remote step us | hop overhead us | bytes/token |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {} |",
                r.mode,
                r.local_us,
                r.remote_us,
                r.remote_us - r.local_us,
                r.bytes_per_token
            );
        }
        println!();
        println!(
            "| sessions | batching | aggregate decode steps/s (whole model) | x vs 1 session |"
        );
        println!("|---|---|---|---|");
        for r in &batch_rows {
            let base = batch_rows
                .iter()
                .find(|b| b.batching == r.batching && b.sessions == 1)
                .map_or(r.steps_per_s, |b| b.steps_per_s);
            println!(
                "| {} | {} | {:.1} | {:.2} |",
                r.sessions,
                if r.batching { "on" } else { "off" },
                r.steps_per_s,
                r.steps_per_s / base
            );
        }
        let batching: Vec<_> = batch_rows
            .iter()
            .map(|r| serde_json::json!({"sessions": r.sessions, "batching": r.batching, "steps_per_s": r.steps_per_s}))
            .collect();
        let hops: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "wire": r.mode, "local_step_us": r.local_us, "remote_step_us": r.remote_us,
                    "hop_overhead_us": r.remote_us - r.local_us, "bytes_per_token": r.bytes_per_token,
                    "hidden_size": hidden, "steps": steps,
                })
            })
            .collect();
        let json = serde_json::json!({ "hop": hops, "batching": batching });
        std::fs::write(&self.json, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", self.json.display()))?;
        eprintln!("wrote {}", self.json.display());
        Ok(())
    }
}
