//! `hypertensor keygen` and `hypertensor serve`: a peer's identity and the
//! block server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use p2p::identity::Claim;
use p2p::{Multiaddr, Node, NodeConfig, NodeHandle};
use server::{Server, ServerConfig, SpanChoice};

use crate::chain_link::{ChainLink, ChainServeArgs};
use crate::local::ModelArgs;

/// Options every swarm peer shares.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Ed25519 identity key file; created on first use. Default: a file in
    /// the cache directory, so the peer id survives restarts.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Peers to join through, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...
    #[arg(long, num_args = 1..)]
    pub initial_peers: Vec<Multiaddr>,
    /// Start a new swarm (the first peer has no one to join).
    #[arg(long)]
    pub new_swarm: bool,
    /// Addresses to listen on (default: TCP and QUIC on all interfaces,
    /// OS-assigned ports).
    #[arg(long, num_args = 1..)]
    pub listen: Vec<Multiaddr>,
    /// Private swarm: a pre-shared key file (go-ipfs swarm.key format);
    /// only peers with the same key can connect.
    #[arg(long)]
    pub swarm_key: Option<PathBuf>,
    /// Do not relay traffic for peers behind NAT.
    #[arg(long)]
    pub no_relay: bool,
}

impl PeerArgs {
    /// Starts the p2p node these options describe, with its identity
    /// claimed for as long as the returned claim lives.
    pub async fn start(&self, default_identity: &str) -> Result<(NodeHandle, Claim)> {
        let path = match &self.identity {
            Some(p) => p.clone(),
            None => model::cache_dir().join(default_identity),
        };
        let claim = claim_identity(&path, "--identity FILE sets another key")?;
        let key = claim.key().clone();
        let mut config = NodeConfig {
            initial_peers: self.initial_peers.clone(),
            new_swarm: self.new_swarm,
            relay_server: !self.no_relay,
            ..NodeConfig::default()
        };
        if !self.listen.is_empty() {
            config.listen = self.listen.clone();
        }
        join_private_swarm(&mut config, self.swarm_key.as_deref())?;
        Ok((Node::start(key, config).await?, claim))
    }
}

/// Claims the identity key file at `path`; `hint` names the option that
/// picks another.
fn claim_identity(path: &Path, hint: &str) -> Result<Claim> {
    p2p::identity::claim(path).with_context(|| format!("cannot run as {} ({hint})", path.display()))
}

/// Makes `config` join only the private swarm whose pre-shared key is in
/// `file`, if one is given.
fn join_private_swarm(config: &mut NodeConfig, file: Option<&Path>) -> Result<()> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading swarm key {}", file.display()))?;
        config.psk = Some(p2p::parse_psk(&text)?);
    }
    Ok(())
}

/// The id a model goes by in the swarm: `explicit`, or the checkpoint's
/// file name without its extension.
pub fn model_id(path: &std::path::Path, explicit: Option<&str>) -> Result<String> {
    match explicit {
        Some(id) => Ok(id.to_string()),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot derive a model id from the path; pass --model-id"),
    }
}

/// How `generate`, `chat` and `api` reach a swarm instead of running every
/// block in this process.
#[derive(Debug, Clone, Args)]
pub struct SwarmArgs {
    /// Run the blocks in the swarm joined through these peers (e.g.
    /// /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...); without it, locally.
    #[arg(long, num_args = 1..)]
    pub initial_peers: Vec<Multiaddr>,
    /// The model's id in the swarm, and the `model` API clients name
    /// (default: the checkpoint's file name without extension, as `serve`
    /// announces it).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Private swarm: the pre-shared key file its servers use.
    #[arg(long)]
    pub swarm_key: Option<PathBuf>,
    /// This client's peer identity key file (created when missing; default:
    /// a throwaway identity). Servers that `--require-stake` serve an API
    /// gateway whose peer id is registered as a node of their subnet.
    #[arg(long)]
    pub client_identity: Option<PathBuf>,
}

impl SwarmArgs {
    /// Whether the blocks run in a swarm.
    pub fn remote(&self) -> bool {
        !self.initial_peers.is_empty()
    }

    /// Joins the swarm (with a throwaway identity unless one is given:
    /// clients need no reputation) and loads the client's half of
    /// `checkpoint`, its head at `precision`; a given identity stays
    /// claimed while the returned claim lives.
    pub async fn connect(
        &self,
        checkpoint: &model::Checkpoint,
        precision: model::Precision,
        max_length: u32,
    ) -> Result<(client::RemoteModel, Option<Claim>)> {
        let mut config = NodeConfig {
            initial_peers: self.initial_peers.clone(),
            // A client relays nothing and serves no DHT records.
            relay_server: false,
            dht_server: false,
            ..NodeConfig::default()
        };
        join_private_swarm(&mut config, self.swarm_key.as_deref())?;
        // A named identity is held, as a server's is: two clients under one
        // peer id would shadow each other (a gateway's id is registered).
        let claim = match &self.client_identity {
            Some(path) => Some(claim_identity(path, "--client-identity")?),
            None => None,
        };
        let key = match &claim {
            Some(claim) => claim.key().clone(),
            None => p2p::Keypair::generate_ed25519(),
        };
        let node = Node::start(key, config).await?;
        let id = model_id(checkpoint.path(), self.model_id.as_deref())?;
        let view = client::SwarmView::new(node, id, checkpoint.config().num_blocks as u32);
        let session = client::SessionConfig {
            max_length,
            ..client::SessionConfig::default()
        };
        let model = client::RemoteModel::load(checkpoint, view, session, precision)?;
        Ok((model, claim))
    }
}

/// Create a peer identity key file.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (refuses to overwrite).
    #[arg(long, short)]
    pub out: PathBuf,
}

impl KeygenArgs {
    pub fn run(self) -> Result<()> {
        let key = p2p::identity::generate(&self.out)?;
        println!("{}", key.public().to_peer_id());
        Ok(())
    }
}

/// Serve a span of a model's blocks to the swarm.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub peer: PeerArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model's id in the swarm (default: the checkpoint's file name
    /// without extension).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Blocks to serve, START:END (END exclusive); fixed, never rebalanced.
    #[arg(long, conflicts_with = "num_blocks")]
    pub blocks: Option<String>,
    /// Serve this many blocks where the swarm needs them, and move when it
    /// needs them elsewhere.
    #[arg(long)]
    pub num_blocks: Option<u32>,
    /// Longest session, in positions.
    #[arg(long, default_value_t = 2048)]
    pub max_length: u32,
    /// KV-cache budget in positions, over all sessions.
    #[arg(long, default_value_t = 65536)]
    pub cache_tokens: u64,
    /// Seconds between DHT announcements.
    #[arg(long, default_value_t = 30)]
    pub announce_period: u64,
    /// Link capacity for the network throughput estimate, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    pub bandwidth_mbps: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks one).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve as a staked node of a subnet.
    #[command(flatten)]
    pub chain: ChainServeArgs,
}

/// Parses `START:END`.
fn parse_blocks(s: &str) -> Result<(u32, u32)> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("--blocks takes START:END, got {s:?}"))?;
    let (a, b) = (a.trim().parse()?, b.trim().parse()?);
    if a >= b {
        bail!("--blocks {s}: START must be below END");
    }
    Ok((a, b))
}

impl ServeArgs {
    pub fn run(self) -> Result<()> {
        // Before the runtime starts any thread: `--threads` is read once.
        let path = self.model.resolve()?;
        let span = match (&self.blocks, self.num_blocks) {
            (Some(b), _) => {
                let (a, b) = parse_blocks(b)?;
                SpanChoice::Fixed(a, b)
            }
            (None, Some(n)) if n > 0 => SpanChoice::Auto(n),
            (None, Some(_)) => bail!("--num-blocks must be at least 1"),
            (None, None) => bail!("give --blocks START:END or --num-blocks N"),
        };
        let model_id = model_id(&path, self.model_id.as_deref())?;
        let mut config = ServerConfig::new(model_id, path, span);
        config.load = self.model.options()?;
        config.limits.max_length = self.max_length;
        config.limits.cache_tokens = self.cache_tokens;
        config.announce_period = Duration::from_secs(self.announce_period.max(1));
        config.bandwidth_mbps = self.bandwidth_mbps;
        config.throughput_cache = Some(model::cache_dir().join("throughput.json"));
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async move {
            let (node, _identity) = self.peer.start("server.key").await?;
            let link = self.chain.connect(node.peer_id()).await?;
            config.gate = link.as_ref().and_then(ChainLink::gate);
            let checkpoint = config.checkpoint.clone();
            let model_id = config.model_id.clone();
            let server = Server::start(config, node.clone()).await?;
            let _validating = link
                .as_ref()
                .map(|l| l.start_validator(node.clone(), &model_id, &checkpoint));
            let info = server.info();
            // Whoever started us may stop reading stdout; that is no reason to die.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "serving blocks {} of {} as {}",
                info.span,
                info.model,
                node.peer_id()
            );
            for addr in node.dialable_addrs() {
                let _ = writeln!(out, "listening on {addr}");
            }
            if let Some(listen) = self.metrics_listen {
                let bound = serve_metrics(listen, server.metrics()).await?;
                let _ = writeln!(out, "metrics on http://{bound}/metrics");
            }
            let _ = out.flush();
            drop(out);
            let following = async {
                match &link {
                    Some(link) => link.follow(&server).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = tokio::signal::ctrl_c() => signal?,
                () = following => {}
            }
            eprintln!("shutting down");
            server.shutdown().await;
            node.shutdown().await;
            Ok(())
        })
    }
}

/// Serves `GET /metrics` in the background; returns the bound address.
async fn serve_metrics(
    listen: std::net::SocketAddr,
    metrics: server::metrics::MetricsHandle,
) -> Result<std::net::SocketAddr> {
    use axum::http::header::CONTENT_TYPE;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render();
            async move { ([(CONTENT_TYPE, server::metrics::CONTENT_TYPE)], text) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
