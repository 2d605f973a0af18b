//! `hypertensor bench swarm`: generation through a swarm on loopback against
//! the same generation in one process, in the same run.
//!
//! A bootstrap peer, the servers and the client run in this process over real
//! libp2p connections on 127.0.0.1; every server shares this machine's cores,
//! so the figures price the protocol and routing, not extra hardware.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use model::{GenerationRequest, LocalBlocks, SamplingParams};
use server::{Server, ServerConfig, SpanChoice};

use crate::local::ModelArgs;
use crate::swarm_cmd::split;

/// Options of `bench swarm`.
#[derive(Debug, Args)]
pub struct SwarmBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Concurrent clients for the aggregate table (through the largest swarm).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
    /// Swarm sizes to time, each splitting the blocks evenly.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    servers: Vec<usize>,
    /// Where to write the results.
    #[arg(long, default_value = "bench-swarm.json")]
    json: PathBuf,
}

/// Decode speed and time to first token of one configuration.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    setup: String,
    decode_tokens_per_s: f64,
    time_to_first_token_ms: f64,
}

/// Aggregate throughput of concurrent clients.
#[derive(Debug, Clone, serde::Serialize)]
struct ConcurrencyRow {
    clients: usize,
    aggregate_tokens_per_s: f64,
    /// Session steps per compute pass, over every server.
    mean_batch: f64,
}

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when";

impl SwarmBench {
    pub fn run(self) -> Result<()> {
        let ckpt = self.model.open()?;
        let num_blocks = ckpt.config().num_blocks as u32;
        let tokenizer = ckpt.tokenizer()?;
        let req = GenerationRequest {
            prompt_ids: tokenizer.encode(PROMPT)?,
            max_new_tokens: self.tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            max_length: 4096,
        };

        let options = self.model.options()?;
        let local = ckpt.load_local(&options, &mut |_, _| {})?;
        let mut rows = Vec::new();
        let g = model::generate(
            &local.embedding,
            &local.head,
            &mut LocalBlocks::new(&local.span, 4096),
            &tokenizer,
            &req,
            &mut |_| true,
        )?;
        rows.push(row("local (one process)", &g));
        drop(local);

        let runtime = tokio::runtime::Runtime::new()?;
        let boot = runtime.block_on(p2p::testing::local_node(None));
        let mut concurrency = Vec::new();
        let largest = self.servers.iter().copied().max().unwrap_or(1);
        for &n in &self.servers {
            let spans = split(num_blocks, n as u32);
            let servers = runtime.block_on(async {
                let mut servers = Vec::new();
                for &(a, b) in &spans {
                    let node = p2p::testing::local_node(Some(&boot)).await;
                    let mut config =
                        ServerConfig::new("bench", ckpt.path(), SpanChoice::Fixed(a, b));
                    config.load = options.clone();
                    servers.push((Server::start(config, node.clone()).await?, node));
                }
                Ok::<_, anyhow::Error>(servers)
            })?;
            let view = runtime.block_on(async {
                let node = p2p::testing::local_node(Some(&boot)).await;
                let view = client::SwarmView::new(node, "bench", num_blocks);
                p2p::testing::eventually(60, || async {
                    view.invalidate().await;
                    let online = view.candidates().await.ok()?.len();
                    (online == spans.len()).then_some(())
                })
                .await;
                view
            });
            let mut remote =
                client::RemoteModel::load(&ckpt, view, client::SessionConfig::default())?;
            let handle = runtime.handle();
            // One warm-up run opens the connections.
            remote.generate(handle, &req, &mut |_| true)?;
            let label = spans
                .iter()
                .map(|(a, b)| format!("{a}:{b}"))
                .collect::<Vec<_>>()
                .join(" + ");
            if n > 1 {
                // The baseline for servers pushing to each other: every
                // hop's outputs return to the client, which sends them on.
                remote.set_push(false);
                let g = remote.generate(handle, &req, &mut |_| true)?;
                rows.push(row(&format!("{n} server(s), client relays"), &g));
                remote.set_push(true);
            }
            let g = remote.generate(handle, &req, &mut |_| true)?;
            rows.push(row(&format!("{n} server(s): {label}"), &g));
            if n == largest {
                for &clients in &self.clients {
                    let batches_before = batch_totals(&servers);
                    let start = Instant::now();
                    let tokens: usize = std::thread::scope(|s| {
                        let runs: Vec<_> = (0..clients)
                            .map(|_| s.spawn(|| remote.generate(handle, &req, &mut |_| true)))
                            .collect();
                        runs.into_iter()
                            .map(|r| match r.join() {
                                Ok(Ok(g)) => Ok(g.token_ids.len()),
                                Ok(Err(e)) => Err(anyhow::Error::from(e)),
                                Err(_) => Err(anyhow::anyhow!("a client thread panicked")),
                            })
                            .sum::<Result<usize>>()
                    })?;
                    let elapsed = start.elapsed().as_secs_f64();
                    let (steps, passes) = batch_totals(&servers);
                    concurrency.push(ConcurrencyRow {
                        clients,
                        aggregate_tokens_per_s: tokens as f64 / elapsed,
                        mean_batch: (steps - batches_before.0)
                            / (passes - batches_before.1).max(1.0),
                    });
                }
            }
            runtime.block_on(async {
                remote.view().node().shutdown().await;
                for (server, node) in servers {
                    server.shutdown().await;
                    node.shutdown().await;
                }
            });
        }
        runtime.block_on(boot.shutdown());

        let base = rows[0].decode_tokens_per_s;
        println!("| setup | decode tok/s | x local | time to first token ms |");
        println!("|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.2} | {:.0} |",
                r.setup,
                r.decode_tokens_per_s,
                r.decode_tokens_per_s / base,
                r.time_to_first_token_ms
            );
        }
        println!();
        println!("| clients ({largest} servers) | aggregate tok/s | x 1 client | steps per pass |");
        println!("|---|---|---|---|");
        let one = concurrency
            .iter()
            .find(|c| c.clients == 1)
            .map_or(1.0, |c| c.aggregate_tokens_per_s);
        for c in &concurrency {
            println!(
                "| {} | {:.1} | {:.2} | {:.2} |",
                c.clients,
                c.aggregate_tokens_per_s,
                c.aggregate_tokens_per_s / one,
                c.mean_batch
            );
        }
        let json = serde_json::json!({
            "tokens": self.tokens,
            "device": format!("{:?}", options.device.location()),
            "precision": format!("{:?}", options.precision),
            "prompt_tokens": req.prompt_ids.len(),
            "decode": rows,
            "concurrency": concurrency,
        });
        std::fs::write(&self.json, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", self.json.display()))?;
        eprintln!("wrote {}", self.json.display());
        Ok(())
    }
}

/// Session steps and compute passes so far, summed over `servers`, from
/// their metrics.
fn batch_totals(servers: &[(Server, p2p::NodeHandle)]) -> (f64, f64) {
    let mut totals = (0.0, 0.0);
    for (server, _) in servers {
        let text = server.metrics().render();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        totals.0 += value("hypertensor_server_batch_size_sum ");
        totals.1 += value("hypertensor_server_batch_size_count ");
    }
    totals
}

fn row(setup: &str, g: &model::Generation) -> Row {
    let decoded = g.token_ids.len().saturating_sub(1) as f64;
    Row {
        setup: setup.into(),
        decode_tokens_per_s: decoded / g.decode_time.as_secs_f64().max(1e-9),
        time_to_first_token_ms: g.prefill_time.as_secs_f64() * 1e3,
    }
}
