//! A server's tie to the chain: `serve --subnet --chain-rpc --hotkey`.
//!
//! On start the server's peer id must be a registered node of the subnet with
//! this hotkey, or `serve` refuses to start. While it runs, the server is
//! listed in the DHT only while the node stays registered, and its class,
//! stake and last epoch's score and reward are logged as they change; its
//! subnet validator runs beside it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use ledger::rpc_client::LedgerClient;
use ledger::types::{Node, NodeClass, SubnetId, format_tokens};
use p2p::PeerId;
use server::{PeerGate, Server, StakeGate};

/// How often a chain-connected server re-reads its node.
const FOLLOW_PERIOD: Duration = Duration::from_secs(2);

/// Chain options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ChainServeArgs {
    /// Serve as a registered node of this subnet (needs --chain-rpc and
    /// --hotkey); the peer id must be registered with `tx register-node`.
    #[arg(long, requires_all = ["chain_rpc", "hotkey"])]
    pub subnet: Option<SubnetId>,
    /// The chain's RPC address, http://HOST:PORT.
    #[arg(long)]
    pub chain_rpc: Option<String>,
    /// The node's hotkey file (from `hypertensor key new`); it signs the
    /// validator's proposals and attestations.
    #[arg(long)]
    pub hotkey: Option<PathBuf>,
    /// Answer only peers staked in the subnet with at least this class
    /// (registered, idle, included or validator; `registered` when bare).
    #[arg(long, requires = "subnet", num_args = 0..=1, default_missing_value = "registered")]
    pub require_stake: Option<NodeClass>,
    /// Seconds a peer's stake, as the chain answered, is trusted.
    #[arg(long, default_value_t = 30)]
    pub stake_cache_secs: u64,
}

/// A server's verified registration.
pub struct ChainLink {
    /// The chain.
    pub ledger: LedgerClient,
    /// The subnet served.
    pub subnet: SubnetId,
    /// The node's hotkey.
    pub hotkey: ledger::Keypair,
    peer: PeerId,
    gate: Option<Arc<dyn PeerGate>>,
}

impl ChainServeArgs {
    /// With `--subnet`: connects to the chain and checks that `peer` is a
    /// node of the subnet whose hotkey is `--hotkey`.
    pub async fn connect(&self, peer: PeerId) -> Result<Option<ChainLink>> {
        let (Some(subnet), Some(rpc), Some(hotkey)) = (self.subnet, &self.chain_rpc, &self.hotkey)
        else {
            return Ok(None);
        };
        let hotkey = ledger::Keypair::load(hotkey)
            .with_context(|| format!("cannot read the hotkey {}", hotkey.display()))?;
        let ledger = LedgerClient::connect(rpc)
            .await
            .with_context(|| format!("cannot reach the chain at {rpc}"))?;
        if ledger.subnet(subnet).await?.is_none() {
            bail!("subnet {subnet} does not exist on the chain at {rpc}");
        }
        let proof = ledger
            .proof_of_stake(subnet, &peer.to_string(), NodeClass::Registered)
            .await?;
        let Some(node) = proof.node else {
            bail!(
                "peer {peer} is not a registered node of subnet {subnet}; register it first:\n  \
                 hypertensor tx register-node --rpc {rpc} --key COLDKEY --subnet {subnet} \
                 --peer-id {peer} --hotkey {} --stake AMOUNT",
                hotkey.address()
            );
        };
        if node.hotkey != hotkey.address() {
            bail!(
                "node {} of subnet {subnet} has hotkey {}, but --hotkey holds {}",
                node.id,
                node.hotkey,
                hotkey.address()
            );
        }
        tracing::info!("{}", describe(&node));
        let gate = self.require_stake.map(|class| {
            Arc::new(StakeGate::new(
                ledger.clone(),
                subnet,
                class,
                Duration::from_secs(self.stake_cache_secs),
            )) as Arc<dyn PeerGate>
        });
        Ok(Some(ChainLink {
            ledger,
            subnet,
            hotkey,
            peer,
            gate,
        }))
    }
}

fn describe(n: &Node) -> String {
    let last = match n.last_epoch {
        Some(e) => format!(
            "; epoch {e}: score {}, reward {}",
            n.last_score,
            format_tokens(n.last_reward)
        ),
        None => String::new(),
    };
    format!(
        "chain: node {} of subnet {}, class {:?}, stake {}, reputation {:.1}%{last}",
        n.id,
        n.subnet,
        n.class,
        format_tokens(n.stake),
        f64::from(n.reputation) / 1e4,
    )
}

impl ChainLink {
    /// The proof-of-stake gate, when `--require-stake` asked for one.
    pub fn gate(&self) -> Option<Arc<dyn PeerGate>> {
        self.gate.clone()
    }

    /// Starts this node's subnet validator ([`validator::Validator`]) on
    /// `node`, recomputing spot checks from `checkpoint`; it stops when the
    /// returned sender is dropped.
    pub fn start_validator(
        &self,
        node: p2p::NodeHandle,
        model_id: &str,
        checkpoint: &std::path::Path,
    ) -> tokio::sync::watch::Sender<bool> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let config = validator::ValidatorConfig::new(self.subnet, model_id, checkpoint);
        let run = validator::Validator::new(config).run(
            node,
            self.ledger.clone(),
            self.hotkey.clone(),
            stopped,
        );
        tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::error!("the validator stopped: {e}");
            }
        });
        stop
    }

    /// Follows the node on the chain until cancelled: lists `server` in the
    /// DHT only while the node is registered and logs what changes.
    pub async fn follow(&self, server: &Server) {
        let mut last: Option<Node> = None;
        let mut listed = true;
        let mut tick = tokio::time::interval(FOLLOW_PERIOD);
        loop {
            tick.tick().await;
            let proof = match self
                .ledger
                .proof_of_stake(self.subnet, &self.peer.to_string(), NodeClass::Registered)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("cannot read this node from the chain: {e}");
                    continue;
                }
            };
            match proof.node {
                Some(node) => {
                    if !listed {
                        tracing::info!("registered again: announcing in the DHT");
                        server.set_listed(true);
                        listed = true;
                    }
                    if last.as_ref() != Some(&node) {
                        tracing::info!("{}", describe(&node));
                        last = Some(node);
                    }
                }
                None if listed => {
                    tracing::warn!(
                        "peer {} is no longer a node of subnet {}: withdrawn from the DHT",
                        self.peer,
                        self.subnet
                    );
                    server.set_listed(false);
                    listed = false;
                    last = None;
                }
                None => {}
            }
        }
    }
}
