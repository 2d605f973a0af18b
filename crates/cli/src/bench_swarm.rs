//! `hypertensor bench swarm`: generation through a swarm on loopback against
//! the same generation in one process, in the same run.
//!
//! A bootstrap peer, the servers and the client run in this process over real
//! libp2p connections on 127.0.0.1; every server shares this machine's cores,
//! so the figures price the protocol and routing, not extra hardware.
//!
//! A shared machine's speed drifts by more than the gap being measured
//! (10-20% between runs a minute apart on a 2-core VM), so every setup runs
//! several rounds, each swarm's runs alternating with runs of the local
//! model, and the tables give medians: a swarm's ratio is to the local runs
//! interleaved with it.
//!
//! Concurrent clients can gain only what batching gains when every server
//! shares the same cores: there is no pipeline of machines to fill. So each
//! concurrency round also prices that many clients' work on the local
//! model, compute only, with their decode steps batched, and the table gives
//! that ceiling beside the swarm's ratio.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use model::{GenerationRequest, LocalBlocks, LocalModel, SamplingParams};
use server::{Server, ServerConfig, SpanChoice};

use crate::bench::median;
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
    /// Timed runs of each setup (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the results.
    #[arg(long, default_value = "bench-swarm.json")]
    json: PathBuf,
}

/// Decode speed and time to first token of one configuration (medians),
/// and the local model's decode speed in the runs interleaved with it.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    setup: String,
    decode_tokens_per_s: f64,
    time_to_first_token_ms: f64,
    local_decode_tokens_per_s: f64,
}

/// Aggregate throughput of concurrent clients.
#[derive(Debug, Clone, serde::Serialize)]
struct ConcurrencyRow {
    clients: usize,
    aggregate_tokens_per_s: f64,
    /// Session steps per compute pass, over every server.
    mean_batch: f64,
    /// The most that many clients can gain over one on these cores
    /// ([`compute_ceiling`]).
    compute_ceiling: f64,
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
        let rounds = self.rounds.max(1);
        let run_local = || {
            model::generate(
                &local.embedding,
                &local.head,
                &mut LocalBlocks::new(&local.span, 4096),
                &tokenizer,
                &req,
                &mut |_| true,
            )
        };
        run_local()?;
        let mut local_runs = Vec::new();
        for _ in 0..rounds {
            local_runs.push(run_local()?);
        }
        let mut rows = vec![row("local (one process)", &local_runs, &local_runs)];

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
            let mut remote = client::RemoteModel::load(
                &ckpt,
                view,
                client::SessionConfig::default(),
                options.precision,
            )?;
            let handle = runtime.handle();
            // One warm-up run opens the connections.
            remote.generate(handle, &req, &mut |_| true)?;
            let label = spans
                .iter()
                .map(|(a, b)| format!("{a}:{b}"))
                .collect::<Vec<_>>()
                .join(" + ");
            // Servers pushing to each other, and (the baseline for that) every
            // hop's outputs returning to the client, which sends them on.
            let modes: &[bool] = if n > 1 { &[false, true] } else { &[true] };
            let mut runs = vec![Vec::new(); modes.len()];
            let mut local_runs = Vec::new();
            for _ in 0..rounds {
                local_runs.push(run_local()?);
                for (&push, runs) in modes.iter().zip(&mut runs) {
                    remote.set_push(push);
                    runs.push(remote.generate(handle, &req, &mut |_| true)?);
                }
            }
            for (&push, runs) in modes.iter().zip(&runs) {
                let setup = if push {
                    format!("{n} server(s): {label}")
                } else {
                    format!("{n} server(s), client relays")
                };
                rows.push(row(&setup, runs, &local_runs));
            }
            if n == largest {
                let mut rates = vec![Vec::new(); self.clients.len()];
                let mut ceilings = vec![Vec::new(); self.clients.len()];
                let mut batches = vec![(0.0, 0.0); self.clients.len()];
                for _ in 0..rounds {
                    for (i, &clients) in self.clients.iter().enumerate() {
                        let before = batch_totals(&servers);
                        let start = Instant::now();
                        let tokens = concurrently(&remote, handle, &req, clients)?;
                        rates[i].push(tokens as f64 / start.elapsed().as_secs_f64());
                        let after = batch_totals(&servers);
                        batches[i].0 += after.0 - before.0;
                        batches[i].1 += after.1 - before.1;
                        ceilings[i].push(compute_ceiling(&local, &req, clients)?);
                    }
                }
                for (((&clients, rates), ceilings), (steps, passes)) in
                    self.clients.iter().zip(rates).zip(ceilings).zip(batches)
                {
                    concurrency.push(ConcurrencyRow {
                        clients,
                        aggregate_tokens_per_s: median(rates),
                        mean_batch: steps / f64::max(passes, 1.0),
                        compute_ceiling: median(ceilings),
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

        println!(
            "{rounds} round(s) of {} tokens, medians; x local: to the local runs interleaved with each swarm's",
            self.tokens
        );
        println!("| setup | decode tok/s | x local | time to first token ms |");
        println!("|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.2} | {:.0} |",
                r.setup,
                r.decode_tokens_per_s,
                r.decode_tokens_per_s / r.local_decode_tokens_per_s,
                r.time_to_first_token_ms
            );
        }
        println!();
        println!(
            "| clients ({largest} servers) | aggregate tok/s | x 1 client | steps per pass | compute-only x 1 client |"
        );
        println!("|---|---|---|---|---|");
        let one = concurrency
            .iter()
            .find(|c| c.clients == 1)
            .map_or(1.0, |c| c.aggregate_tokens_per_s);
        for c in &concurrency {
            println!(
                "| {} | {:.1} | {:.2} | {:.2} | {:.2} |",
                c.clients,
                c.aggregate_tokens_per_s,
                c.aggregate_tokens_per_s / one,
                c.mean_batch,
                c.compute_ceiling
            );
        }
        let json = serde_json::json!({
            "tokens": self.tokens,
            "rounds": rounds,
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

/// Runs `clients` generations of `req` at once, each from a thread of its
/// own; returns the tokens generated in all.
fn concurrently(
    remote: &client::RemoteModel,
    handle: &tokio::runtime::Handle,
    req: &GenerationRequest,
    clients: usize,
) -> Result<usize> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..clients)
            .map(|_| s.spawn(|| remote.generate(handle, req, &mut |_| true)))
            .collect();
        runs.into_iter()
            .map(|r| match r.join() {
                Ok(Ok(g)) => Ok(g.token_ids.len()),
                Ok(Err(e)) => Err(anyhow::Error::from(e)),
                Err(_) => Err(anyhow::anyhow!("a client thread panicked")),
            })
            .sum()
    })
}

/// Decode steps timed for [`compute_ceiling`], each way.
const CEILING_STEPS: usize = 12;

/// The most `sessions` concurrent generations of `req` can gain over one on
/// these cores: aggregate tokens per second of `local`, compute only, with
/// every decode step of the sessions run as one batch, against one session
/// alone. Prompts run one after another (a prompt is already a batch of
/// positions, so batching prompts gains little); decode steps are timed at
/// the average context, the prompt and half the new tokens, as medians of
/// [`CEILING_STEPS`] steps each way.
fn compute_ceiling(local: &LocalModel, req: &GenerationRequest, sessions: usize) -> Result<f64> {
    if sessions <= 1 {
        return Ok(1.0);
    }
    let blocks = local.span.range();
    let decode_steps = req.max_new_tokens.saturating_sub(1);
    let context = req.prompt_ids.len() + req.max_new_tokens / 2;
    let positions: Vec<u32> = req
        .prompt_ids
        .iter()
        .copied()
        .cycle()
        .take(context)
        .collect();
    let step = local.embedding.forward(&positions[..1])?;
    let mut prompts = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..sessions {
        let mut cache = local.span.new_cache(context + 1);
        let start = Instant::now();
        let out = local
            .span
            .forward(&local.embedding.forward(&req.prompt_ids)?, &mut cache)?;
        local.head.forward(&out)?;
        prompts.push(start.elapsed().as_secs_f64());
        let rest = &positions[req.prompt_ids.len()..];
        if !rest.is_empty() {
            local
                .span
                .forward(&local.embedding.forward(rest)?, &mut cache)?;
        }
        caches.push(cache);
    }
    let inputs = vec![step; sessions];
    let mut time = |n: usize| -> Result<f64> {
        let caches = &mut caches[..n];
        let start = Instant::now();
        let outputs = local
            .span
            .forward_batch(blocks.clone(), &inputs[..n], caches)?;
        local.head.forward(&Tensor::cat(&outputs, 0)?)?;
        let took = start.elapsed().as_secs_f64();
        caches.iter_mut().for_each(|c| c.truncate(context));
        Ok(took)
    };
    // One session's steps back to back, as it runs alone: between batched
    // steps they would find less of the weights in cache.
    let one = (0..CEILING_STEPS).map(|_| time(1)).collect::<Result<_>>()?;
    let all = (0..CEILING_STEPS)
        .map(|_| time(sessions))
        .collect::<Result<_>>()?;
    let prompt = median(prompts);
    let steps = decode_steps as f64;
    let alone = prompt + steps * median(one);
    let together = sessions as f64 * prompt + steps * median(all);
    Ok(sessions as f64 * alone / together)
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

/// Medians of `runs`, beside the median of the `local` runs interleaved with them.
fn row(setup: &str, runs: &[model::Generation], local: &[model::Generation]) -> Row {
    let decode = |runs: &[model::Generation]| {
        median(
            runs.iter()
                .map(|g| {
                    let decoded = g.token_ids.len().saturating_sub(1) as f64;
                    decoded / g.decode_time.as_secs_f64().max(1e-9)
                })
                .collect(),
        )
    };
    Row {
        setup: setup.into(),
        decode_tokens_per_s: decode(runs),
        time_to_first_token_ms: median(
            runs.iter()
                .map(|g| g.prefill_time.as_secs_f64() * 1e3)
                .collect(),
        ),
        local_decode_tokens_per_s: decode(local),
    }
}
