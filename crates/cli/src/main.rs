//! The `hypertensor` binary. It parses arguments and hands each command to
//! the crates that do the work; nothing here computes anything itself.

mod api_cli;
mod bench;
mod bench_hop;
mod bench_swarm;
mod chain_link;
mod ledger_cli;
mod local;
mod swarm_chain;
mod swarm_cli;
mod swarm_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Hypertensor: large language models served by a swarm of peers, each
/// holding a span of the model's blocks.
#[derive(Debug, Parser)]
#[command(name = "hypertensor", version, about)]
struct Cli {
    /// Log filter, e.g. `info` or `model=debug` (also `RUST_LOG`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage model files: fetch the default model, show where it is.
    #[command(subcommand)]
    Model(local::ModelCmd),
    /// Generate a continuation of a prompt, streaming it to stdout.
    Generate(local::GenerateArgs),
    /// Chat interactively with a model, streaming each answer.
    Chat(local::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API, with a web chat and
    /// a swarm monitor.
    Api(api_cli::ApiArgs),
    /// Create a peer identity key file (prints its peer id).
    Keygen(swarm_cli::KeygenArgs),
    /// Serve a span of a model's blocks to the swarm.
    Serve(swarm_cli::ServeArgs),
    /// A local swarm in one command: a bootstrap peer, server processes
    /// splitting the model, and the API, web chat and monitor over them.
    Swarm(swarm_cmd::SwarmCmd),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Create and inspect account keys.
    #[command(subcommand)]
    Key(ledger_cli::KeyCmd),
    /// Run the ledger chain (dev chain or BFT validators), a localnet, a
    /// genesis file, or the chain benchmark.
    #[command(subcommand)]
    Chain(ledger_cli::ChainCmd),
    /// Sign and submit a ledger transaction.
    #[command(subcommand)]
    Tx(ledger_cli::TxCmd),
    /// Read ledger state over JSON-RPC.
    #[command(subcommand)]
    Query(ledger_cli::QueryCmd),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle asks for its thread count on every matmul and, without this
        // variable, answers by parsing /proc/cpuinfo each time (7% of decode).
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: no other thread has started yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Model(cmd) => cmd.run(),
        Command::Generate(args) => args.run(),
        Command::Chat(args) => args.run(),
        Command::Api(args) => args.run(),
        Command::Keygen(args) => args.run(),
        Command::Serve(args) => args.run(),
        Command::Swarm(cmd) => cmd.run(),
        Command::Bench(cmd) => cmd.run(),
        Command::Key(cmd) => cmd.run(),
        Command::Chain(cmd) => cmd.run(),
        Command::Tx(cmd) => cmd.run(),
        Command::Query(cmd) => cmd.run(),
    }
}
