//! `hypertensor swarm --chain`: a dev chain beside the local swarm, set up as
//! an operator would with the wallet commands: keys funded from genesis, a
//! subnet for the model, every server registered and staked as a node
//! before the subnet is activated (so they are its founding validators).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::rpc_client::LedgerClient;
use ledger::types::SubnetId;
use ledger::{Call, Genesis, Keypair, TOKEN};
use p2p::PeerId;

/// How long a setup transaction may take to be included.
const INCLUSION: Duration = Duration::from_secs(30);

/// The dev chain of a local swarm and the subnet its servers are nodes of.
pub struct SwarmChain {
    /// The chain, in this process.
    pub node: DevNode,
    /// Its RPC URL.
    pub rpc: String,
    /// The model's subnet.
    pub subnet: SubnetId,
    /// Each server's hotkey file, in server order.
    pub hotkeys: Vec<PathBuf>,
}

/// Writes a fresh key to `path`, replacing an old demo key.
fn fresh_key(path: &Path) -> Result<Keypair> {
    let key = Keypair::generate();
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    key.save(path)?;
    Ok(key)
}

async fn submit(ledger: &LedgerClient, key: &Keypair, call: Call) -> Result<()> {
    let what = format!("{call:?}");
    let tx = ledger.sign_and_submit(key, call).await?;
    ledger
        .wait_for_tx(&tx, INCLUSION)
        .await
        .with_context(|| format!("{what} was not included"))?;
    Ok(())
}

/// Starts a dev chain sealing every `block_time` with `epoch_blocks`-block
/// epochs, registers `model` as a subnet and each of `servers` as a staked
/// node, and activates the subnet. Keys go to `dir`.
pub async fn start(
    dir: &Path,
    model: &str,
    servers: &[PeerId],
    epoch_blocks: u64,
    block_time: Duration,
) -> Result<SwarmChain> {
    if epoch_blocks < 4 {
        bail!("--epoch-blocks must be at least 4");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let owner = fresh_key(&dir.join("owner.key"))?;
    let mut colds = Vec::new();
    let mut hotkeys = Vec::new();
    for i in 0..servers.len() {
        colds.push(fresh_key(&dir.join(format!("coldkey-{i}.key")))?);
        let hot = dir.join(format!("hotkey-{i}.key"));
        fresh_key(&hot)?;
        hotkeys.push(hot);
    }
    let mut balances = vec![(owner.address(), 1_000_000 * TOKEN)];
    balances.extend(colds.iter().map(|k| (k.address(), 10_000 * TOKEN)));
    let mut genesis = Genesis::dev(&balances);
    genesis.params.epoch_length = epoch_blocks;
    genesis.params.min_subnet_nodes = genesis.params.min_subnet_nodes.min(servers.len() as u32);
    let node = DevNode::start(DevNodeConfig {
        data_dir: None,
        genesis,
        rpc_addr: "127.0.0.1:0".parse()?,
        block_time: Some(block_time),
    })
    .await?;
    let rpc = node.rpc_url();
    let ledger = LedgerClient::connect(&rpc).await?;
    submit(
        &ledger,
        &owner,
        Call::RegisterSubnet {
            name: model.to_string(),
            min_stake: 10 * TOKEN,
            max_stake: 10_000 * TOKEN,
        },
    )
    .await?;
    let subnet = ledger
        .subnets()
        .await?
        .into_iter()
        .find(|s| s.name == model)
        .context("the subnet just registered is missing")?
        .id;
    for ((peer, cold), hot) in servers.iter().zip(&colds).zip(&hotkeys) {
        submit(
            &ledger,
            cold,
            Call::RegisterNode {
                subnet,
                hotkey: Keypair::load(hot)?.address(),
                peer_id: peer.to_string(),
                stake: 100 * TOKEN,
            },
        )
        .await?;
    }
    submit(&ledger, &owner, Call::ActivateSubnet { subnet }).await?;
    Ok(SwarmChain {
        node,
        rpc,
        subnet,
        hotkeys,
    })
}
