//! `hypertensor swarm`: a whole swarm on this machine in one command. A
//! bootstrap peer in this process, `--servers` server processes splitting the
//! model's blocks, and the API with its web chat and monitor over them, all
//! on 127.0.0.1. Ctrl-C stops everything, each server announcing it leaves.
//! With `--chain`, a dev chain runs beside them ([`swarm_chain`]) and the
//! servers are its staked, validating nodes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::SwarmBackend;
use clap::Args;
use p2p::{Keypair, Node, NodeConfig};

use crate::local::ModelArgs;
use crate::swarm_chain;
use crate::swarm_cli::{SwarmArgs, model_id};

/// Options of `hypertensor swarm`.
#[derive(Debug, Args)]
pub struct SwarmCmd {
    #[command(flatten)]
    model: ModelArgs,
    /// Server processes; the blocks are split evenly between them.
    #[arg(long, default_value_t = 3)]
    servers: u32,
    /// Where the API, the web chat and the monitor listen.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Also run a dev chain: the servers become staked nodes of a subnet for
    /// the model, validate each other every epoch and earn rewards; the
    /// monitor shows their class, stake, reputation, scores and rewards.
    #[arg(long)]
    chain: bool,
    /// Blocks per epoch of the dev chain (with --chain).
    #[arg(long, default_value_t = 20, requires = "chain")]
    epoch_blocks: u64,
    /// Milliseconds between blocks of the dev chain (with --chain).
    #[arg(long, default_value_t = 500, requires = "chain")]
    block_ms: u64,
}

/// `n` contiguous spans splitting `blocks` as evenly as possible.
pub fn split(blocks: u32, n: u32) -> Vec<(u32, u32)> {
    let n = n.clamp(1, blocks.max(1));
    (0..n)
        .map(|i| (blocks * i / n, blocks * (i + 1) / n))
        .collect()
}

/// Server processes, stopped like Ctrl-C stops them when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &self.0 {
            // SIGINT: the server's clean shutdown (it announces Offline).
            // SAFETY: kill(2) with a pid we spawned; no memory is involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        }
        for child in &mut self.0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl SwarmCmd {
    pub fn run(self) -> Result<()> {
        if self.servers == 0 {
            bail!("--servers must be at least 1");
        }
        let checkpoint = self.model.open()?;
        let path = checkpoint.path().to_path_buf();
        let id = model_id(&path, None)?;
        let num_blocks = checkpoint.config().num_blocks as u32;
        let spans = split(num_blocks, self.servers);
        // Every server may use every core: in a chain only the server with
        // the current step computes, and idle rayon workers sleep. Dividing
        // the cores left each of 3 servers one thread on 2 cores, and the
        // swarm decoded at 0.6x local instead of 0.9x.
        let threads = self
            .model
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let keys = model::cache_dir().join("swarm");
        std::fs::create_dir_all(&keys).with_context(|| format!("creating {}", keys.display()))?;

        let runtime = tokio::runtime::Runtime::new()?;
        let boot = runtime.block_on(Node::start(
            Keypair::generate_ed25519(),
            NodeConfig {
                new_swarm: true,
                ..NodeConfig::local()
            },
        ))?;
        let boot_addr = boot
            .dialable_addrs()
            .first()
            .context("the bootstrap peer has no address")?
            .to_string();

        let identities: Vec<_> = (0..spans.len())
            .map(|i| keys.join(format!("server-{i}.key")))
            .collect();
        let chain = if self.chain {
            let peers = identities
                .iter()
                .map(|path| Ok(p2p::identity::load_or_generate(path)?.public().to_peer_id()))
                .collect::<Result<Vec<_>>>()?;
            let chain = runtime.block_on(swarm_chain::start(
                &keys.join("chain"),
                &id,
                &peers,
                self.epoch_blocks,
                Duration::from_millis(self.block_ms.max(50)),
            ))?;
            println!(
                "dev chain at {} (subnet {}, {}-block epochs)",
                chain.rpc, chain.subnet, self.epoch_blocks
            );
            Some(chain)
        } else {
            None
        };

        let exe = std::env::current_exe().context("finding this executable")?;
        let mut servers = Servers(Vec::new());
        for (i, &(a, b)) in spans.iter().enumerate() {
            let mut command = Command::new(&exe);
            command
                .arg("serve")
                .args(["--model", &path.to_string_lossy(), "--model-id", &id])
                .args(["--blocks", &format!("{a}:{b}")])
                .args(["--initial-peers", &boot_addr])
                .args([
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "/ip4/127.0.0.1/udp/0/quic-v1",
                ])
                .args(["--threads", &threads.to_string()])
                .args(["--device", &self.model.device])
                .arg("--identity")
                .arg(&identities[i]);
            if self.model.q8 {
                command.arg("--q8");
            }
            if let Some(chain) = &chain {
                command
                    .args(["--subnet", &chain.subnet.to_string()])
                    .args(["--chain-rpc", &chain.rpc])
                    .arg("--hotkey")
                    .arg(&chain.hotkeys[i]);
            }
            let mut child = command
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a server process")?;
            let stdout = child.stdout.take().context("server stdout")?;
            servers.0.push(child);
            let mut lines = BufReader::new(stdout).lines();
            match lines.next() {
                Some(Ok(line)) => println!("{line}"),
                _ => bail!("server {i} (blocks {a}:{b}) exited before serving; see its log above"),
            }
            // Keep reading, so the server never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
        }

        let swarm = SwarmArgs {
            initial_peers: vec![boot_addr.parse()?],
            model_id: Some(id.clone()),
            swarm_key: None,
            client_identity: None,
        };
        let max_length = checkpoint.config().max_position_embeddings as u32;
        let remote = runtime.block_on(async {
            // A throwaway identity: nothing to hold.
            let (remote, _) = swarm
                .connect(&checkpoint, self.model.precision(), max_length)
                .await?;
            let view = remote.view().clone();
            let online = async {
                loop {
                    view.invalidate().await;
                    if view.candidates().await.map(|c| c.len()).unwrap_or(0) >= spans.len() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(120), online)
                .await
                .context("the servers did not all come online within 120 s")?;
            anyhow::Ok(remote)
        })?;
        let mut backend = SwarmBackend::new(remote, runtime.handle().clone());
        if let Some(chain) = &chain {
            let ledger = runtime.block_on(ledger::rpc_client::LedgerClient::connect(&chain.rpc))?;
            backend = backend.with_chain(ledger, chain.subnet);
        }
        let backend = Arc::new(backend);
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("cannot listen on {}", self.listen))?;
            let addr = listener.local_addr()?;
            let blocks: Vec<String> = spans.iter().map(|(a, b)| format!("{a}:{b}")).collect();
            println!(
                "swarm of {} servers for {id} is up (blocks {})",
                spans.len(),
                blocks.join(", ")
            );
            println!("chat:    http://{addr}/");
            println!("monitor: http://{addr}/monitor");
            println!("OpenAI:  base_url=http://{addr}/v1 model={id}");
            println!("join:    hypertensor serve --initial-peers {boot_addr} --num-blocks N");
            api::serve(listener, backend, async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
                eprintln!("shutting down");
            })
            .await?;
            anyhow::Ok(())
        })?;
        drop(servers);
        runtime.block_on(boot.shutdown());
        if let Some(chain) = chain {
            runtime.block_on(chain.node.stop());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn spans_split_evenly_and_cover_every_block() {
        assert_eq!(split(30, 3), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(split(30, 4), vec![(0, 7), (7, 15), (15, 22), (22, 30)]);
        assert_eq!(split(2, 5), vec![(0, 1), (1, 2)]);
    }
}
