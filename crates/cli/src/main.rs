//! The `hypertensor` binary. It parses arguments and hands each command to
//! the crates that do the work; nothing here computes anything itself.

mod bench;
mod local;

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
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Model(cmd) => cmd.run(),
        Command::Generate(args) => args.run(),
        Command::Chat(args) => args.run(),
        Command::Bench(cmd) => cmd.run(),
    }
}
