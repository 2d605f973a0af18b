//! `hypertensor key | chain | tx | query`: the wallet and dev-chain
//! commands. Thin: argument parsing here, everything else in the `ledger`
//! crate (key files, genesis, the dev node and the typed RPC client).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::genesis::GenesisBalance;
use ledger::rpc_client::LedgerClient;
use ledger::types::{NodeClass, NodeId, SubnetId, format_tokens, parse_tokens};
use ledger::{Address, Amount, Call, Genesis, Keypair};

/// Default RPC endpoint of a local dev chain.
pub const DEFAULT_RPC: &str = "http://127.0.0.1:9944";

fn tokens(s: &str) -> Result<Amount, String> {
    parse_tokens(s)
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Account key files.
#[derive(clap::Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a new Ed25519 account key file (never overwrites).
    New {
        /// Where to write the key file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the account address (public key) of a key file.
    Show {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
}

impl KeyCmd {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        match self {
            KeyCmd::New { out } => {
                let k = Keypair::generate();
                k.save(&out)?;
                println!("address {}", k.address());
                println!("key file {}", out.display());
            }
            KeyCmd::Show { key } => {
                let k = Keypair::load(&key)?;
                println!("address {}", k.address());
            }
        }
        Ok(())
    }
}

/// The chain: run a dev node, write a dev genesis.
#[derive(clap::Subcommand, Debug)]
pub enum ChainCmd {
    /// Run the embedded dev chain with its JSON-RPC server.
    Run {
        /// Run the single-authority dev chain (the only engine so far).
        #[arg(long)]
        dev: bool,
        /// Data directory (the redb file lives there); in memory when absent.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Genesis file (TOML, or JSON when it ends in .json).
        #[arg(long)]
        genesis: PathBuf,
        /// RPC listen address; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:9944")]
        rpc_addr: SocketAddr,
        /// Block time in milliseconds; 0 seals on each transaction.
        #[arg(long, default_value_t = 1000)]
        block_time_ms: u64,
    },
    /// Write a dev genesis file with default params.
    Genesis {
        /// Output file (TOML, or JSON when it ends in .json).
        #[arg(long)]
        out: PathBuf,
        /// Chain id.
        #[arg(long, default_value = "hypertensor-dev")]
        chain_id: String,
        /// Initial balance: KEYFILE=TOKENS or ADDRESS=TOKENS (repeatable).
        #[arg(long = "fund", value_name = "KEY=TOKENS")]
        fund: Vec<String>,
        /// Blocks per epoch.
        #[arg(long)]
        epoch_length: Option<u64>,
    },
}

fn parse_fund(spec: &str) -> Result<GenesisBalance> {
    let (who, amount) = spec
        .rsplit_once('=')
        .with_context(|| format!("--fund {spec}: expected KEYFILE=TOKENS or ADDRESS=TOKENS"))?;
    let amount = parse_tokens(amount).map_err(|e| anyhow::anyhow!("--fund {spec}: {e}"))?;
    let address = match who.parse::<Address>() {
        Ok(a) => a,
        Err(_) => Keypair::load(Path::new(who))?.address(),
    };
    Ok(GenesisBalance { address, amount })
}

impl ChainCmd {
    /// Runs the command; `run` serves until Ctrl-C.
    pub fn run(self) -> Result<()> {
        match self {
            ChainCmd::Run {
                dev,
                data_dir,
                genesis,
                rpc_addr,
                block_time_ms,
            } => {
                if !dev {
                    bail!("only the dev chain exists so far: pass --dev");
                }
                let genesis = Genesis::load(&genesis)?;
                block_on(async move {
                    let node = DevNode::start(DevNodeConfig {
                        data_dir,
                        genesis,
                        rpc_addr,
                        block_time: (block_time_ms > 0)
                            .then(|| Duration::from_millis(block_time_ms)),
                    })
                    .await?;
                    println!("rpc listening on {}", node.rpc_url());
                    std::io::stdout().flush()?;
                    tokio::signal::ctrl_c().await?;
                    node.stop().await;
                    Ok(())
                })
            }
            ChainCmd::Genesis {
                out,
                chain_id,
                fund,
                epoch_length,
            } => {
                let mut g = Genesis::dev(&[]);
                g.chain_id = chain_id;
                if let Some(e) = epoch_length {
                    g.params.epoch_length = e;
                }
                for f in &fund {
                    g.balances.push(parse_fund(f)?);
                }
                g.validate()?;
                g.save(&out)?;
                println!("genesis written to {}", out.display());
                Ok(())
            }
        }
    }
}

/// Options every transaction command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct TxOpts {
    /// RPC URL of a ledger node.
    #[arg(long, env = "HYPERTENSOR_RPC", default_value = DEFAULT_RPC)]
    pub rpc: String,
    /// The signing key file.
    #[arg(long)]
    pub key: PathBuf,
    /// Seconds to wait for inclusion (0: do not wait).
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
}

/// Signed transactions.
#[derive(clap::Subcommand, Debug)]
pub enum TxCmd {
    /// Send tokens.
    Transfer {
        #[command(flatten)]
        opts: TxOpts,
        /// Recipient address.
        #[arg(long)]
        to: Address,
        /// Amount in tokens (e.g. 1.5).
        #[arg(long, value_parser = tokens)]
        amount: Amount,
    },
    /// Register a subnet (one per model), paying the current fee.
    RegisterSubnet {
        #[command(flatten)]
        opts: TxOpts,
        /// Unique name, by convention the model id.
        #[arg(long)]
        name: String,
        /// Minimum node stake in tokens.
        #[arg(long, value_parser = tokens, default_value = "10")]
        min_stake: Amount,
        /// Maximum node stake in tokens.
        #[arg(long, value_parser = tokens, default_value = "10000")]
        max_stake: Amount,
    },
    /// Activate a subnet you own (needs the minimum node count).
    ActivateSubnet {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
    },
    /// Register a node; the signing key is its coldkey.
    RegisterNode {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Hotkey address (defaults to the address of --hotkey-file, else the coldkey).
        #[arg(long)]
        hotkey: Option<Address>,
        /// Hotkey key file.
        #[arg(long, conflicts_with = "hotkey")]
        hotkey_file: Option<PathBuf>,
        /// libp2p peer id of the node.
        #[arg(long)]
        peer_id: String,
        /// Initial stake in tokens.
        #[arg(long, value_parser = tokens)]
        stake: Amount,
    },
    /// Add stake to a node (coldkey).
    Stake {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Node id.
        #[arg(long)]
        node: NodeId,
        /// Amount in tokens.
        #[arg(long, value_parser = tokens)]
        amount: Amount,
    },
    /// Unbond stake from a node (coldkey); all of it deregisters the node.
    Unstake {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Node id.
        #[arg(long)]
        node: NodeId,
        /// Amount in tokens.
        #[arg(long, value_parser = tokens)]
        amount: Amount,
    },
    /// Claim every unbonding entry that has matured.
    Claim {
        #[command(flatten)]
        opts: TxOpts,
    },
    /// Delegate tokens to a subnet's vault for shares.
    Delegate {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Amount in tokens.
        #[arg(long, value_parser = tokens)]
        amount: Amount,
    },
    /// Redeem vault shares (written like tokens: 1 share unit = 1e-18).
    Undelegate {
        #[command(flatten)]
        opts: TxOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Shares to redeem.
        #[arg(long, value_parser = tokens)]
        shares: Amount,
    },
}

impl TxCmd {
    /// Signs, submits and (by default) waits for inclusion.
    pub fn run(self) -> Result<()> {
        let (opts, call) = self.into_call()?;
        let key = Keypair::load(&opts.key)?;
        block_on(async move {
            let c = LedgerClient::connect(&opts.rpc).await?;
            let hash = c.sign_and_submit(&key, call).await?;
            println!("submitted {hash}");
            if opts.wait_secs > 0 {
                let loc = c
                    .wait_for_tx(&hash, Duration::from_secs(opts.wait_secs))
                    .await?;
                println!("included in block {} at index {}", loc.height, loc.index);
            }
            Ok(())
        })
    }

    fn into_call(self) -> Result<(TxOpts, Call)> {
        Ok(match self {
            TxCmd::Transfer { opts, to, amount } => (opts, Call::Transfer { to, amount }),
            TxCmd::RegisterSubnet {
                opts,
                name,
                min_stake,
                max_stake,
            } => (
                opts,
                Call::RegisterSubnet {
                    name,
                    min_stake,
                    max_stake,
                },
            ),
            TxCmd::ActivateSubnet { opts, subnet } => (opts, Call::ActivateSubnet { subnet }),
            TxCmd::RegisterNode {
                opts,
                subnet,
                hotkey,
                hotkey_file,
                peer_id,
                stake,
            } => {
                let hotkey = match (hotkey, hotkey_file) {
                    (Some(h), _) => h,
                    (None, Some(f)) => Keypair::load(&f)?.address(),
                    (None, None) => Keypair::load(&opts.key)?.address(),
                };
                (
                    opts,
                    Call::RegisterNode {
                        subnet,
                        hotkey,
                        peer_id,
                        stake,
                    },
                )
            }
            TxCmd::Stake {
                opts,
                subnet,
                node,
                amount,
            } => (
                opts,
                Call::AddStake {
                    subnet,
                    node,
                    amount,
                },
            ),
            TxCmd::Unstake {
                opts,
                subnet,
                node,
                amount,
            } => (
                opts,
                Call::RemoveStake {
                    subnet,
                    node,
                    amount,
                },
            ),
            TxCmd::Claim { opts } => (opts, Call::Claim),
            TxCmd::Delegate {
                opts,
                subnet,
                amount,
            } => (opts, Call::Delegate { subnet, amount }),
            TxCmd::Undelegate {
                opts,
                subnet,
                shares,
            } => (opts, Call::Undelegate { subnet, shares }),
        })
    }
}

/// Options every query takes.
#[derive(clap::Args, Debug, Clone)]
pub struct QueryOpts {
    /// RPC URL of a ledger node.
    #[arg(long, env = "HYPERTENSOR_RPC", default_value = DEFAULT_RPC)]
    pub rpc: String,
}

/// Read the chain state (JSON output; amounts in 1e-18 token units).
#[derive(clap::Subcommand, Debug)]
pub enum QueryCmd {
    /// An account's balance, nonce and unbonding entries.
    Account {
        #[command(flatten)]
        opts: QueryOpts,
        /// Address (or use --key).
        #[arg(long, required_unless_present = "key")]
        address: Option<Address>,
        /// Key file whose address to show.
        #[arg(long, conflicts_with = "address")]
        key: Option<PathBuf>,
    },
    /// A subnet, or all subnets when --subnet is absent.
    Subnet {
        #[command(flatten)]
        opts: QueryOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: Option<SubnetId>,
    },
    /// A node, or all nodes of the subnet when --node is absent.
    Node {
        #[command(flatten)]
        opts: QueryOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// Node id.
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// The current epoch of a subnet: number, validator, proposal, attestations.
    Epoch {
        #[command(flatten)]
        opts: QueryOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
    },
    /// A block (the head when --height is absent).
    Block {
        #[command(flatten)]
        opts: QueryOpts,
        /// Height.
        #[arg(long)]
        height: Option<u64>,
    },
    /// Whether a peer id is staked in a subnet with at least a class.
    ProofOfStake {
        #[command(flatten)]
        opts: QueryOpts,
        /// Subnet id.
        #[arg(long)]
        subnet: SubnetId,
        /// libp2p peer id.
        #[arg(long)]
        peer_id: String,
        /// Minimum class: registered, idle, included or validator.
        #[arg(long, default_value = "included")]
        min_class: NodeClass,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

impl QueryCmd {
    /// Runs the query and prints JSON.
    pub fn run(self) -> Result<()> {
        block_on(async move {
            match self {
                QueryCmd::Account { opts, address, key } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    let address = match (address, key) {
                        (Some(a), _) => a,
                        (None, Some(k)) => Keypair::load(&k)?.address(),
                        (None, None) => bail!("pass --address or --key"),
                    };
                    let account = c.account(&address).await?;
                    let unbonding = c.unbonding(&address).await?;
                    print_json(&serde_json::json!({
                        "address": address,
                        "balance_tokens": format_tokens(account.balance),
                        "account": account,
                        "unbonding": unbonding,
                    }))
                }
                QueryCmd::Subnet { opts, subnet } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    match subnet {
                        Some(id) => match c.subnet(id).await? {
                            Some(s) => print_json(&s),
                            None => bail!("no subnet {id}"),
                        },
                        None => print_json(&c.subnets().await?),
                    }
                }
                QueryCmd::Node { opts, subnet, node } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    match node {
                        Some(id) => match c.node(subnet, id).await? {
                            Some(n) => print_json(&n),
                            None => bail!("no node {id} in subnet {subnet}"),
                        },
                        None => print_json(&c.nodes(subnet).await?),
                    }
                }
                QueryCmd::Epoch { opts, subnet } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    print_json(&c.epoch(subnet).await?)
                }
                QueryCmd::Block { opts, height } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    match c.block(height).await? {
                        Some(b) => print_json(&b),
                        None => bail!("no block at that height"),
                    }
                }
                QueryCmd::ProofOfStake {
                    opts,
                    subnet,
                    peer_id,
                    min_class,
                } => {
                    let c = LedgerClient::connect(&opts.rpc).await?;
                    print_json(&c.proof_of_stake(subnet, &peer_id, min_class).await?)
                }
            }
        })
    }
}
