//! `hypertensor key | chain | tx | query`: the wallet and chain commands.
//! Thin: argument parsing here, everything else in the `ledger` crate (key
//! files, genesis, the dev node and the typed RPC client) and, for BFT
//! validators, the `consensus` crate (see `chain_bft`).

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

/// The chain: run a dev node or a BFT validator, start a local network,
/// write a genesis, benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum ChainCmd {
    /// Run the embedded dev chain (`--dev`) or one BFT validator
    /// (`--validator-key`), with the JSON-RPC server.
    Run {
        /// Run the single-authority dev chain.
        #[arg(long, conflicts_with = "validator_key")]
        dev: bool,
        /// Run a BFT validator signing with this consensus key file.
        #[arg(long, requires = "data_dir")]
        validator_key: Option<PathBuf>,
        /// The other validators, `CONSENSUSKEY@HOST:PORT` (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Validator p2p listen address.
        #[arg(long, default_value = "127.0.0.1:30333")]
        p2p_addr: SocketAddr,
        /// Data directory (the redb file lives there); in memory when absent (dev only).
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
        /// A genesis chain validator: KEYFILE=TOKENS bonds TOKENS with the
        /// key as both account and consensus key (repeatable).
        #[arg(long = "validator", value_name = "KEY=TOKENS")]
        validators: Vec<String>,
        /// Chain validators on each epoch's committee (top N by bond).
        #[arg(long)]
        committee_size: Option<u32>,
        /// Blocks per chain epoch (committee term).
        #[arg(long)]
        chain_epoch_blocks: Option<u64>,
    },
    /// Start N validator processes on 127.0.0.1 and print their RPC URLs;
    /// stops them on Ctrl-C.
    Localnet {
        /// Number of validators.
        #[arg(long, default_value_t = 4)]
        validators: usize,
        /// Directory for keys, genesis and data (reused when it exists).
        #[arg(long)]
        dir: PathBuf,
        /// Initial balance: KEYFILE=TOKENS or ADDRESS=TOKENS (repeatable).
        #[arg(long = "fund", value_name = "KEY=TOKENS")]
        fund: Vec<String>,
        /// Blocks per chain epoch.
        #[arg(long, default_value_t = 100)]
        chain_epoch_blocks: u64,
    },
    /// Measure finalized transactions per second and time to finality of
    /// 4 BFT validators on loopback beside the dev chain, in one run.
    Bench {
        /// Transactions per engine.
        #[arg(long, default_value_t = 2000)]
        txs: usize,
        /// Validators.
        #[arg(long, default_value_t = 4)]
        validators: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "chain-bench.json")]
        json: PathBuf,
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
                validator_key,
                peers,
                p2p_addr,
                data_dir,
                genesis,
                rpc_addr,
                block_time_ms,
            } => {
                if let Some(key) = validator_key {
                    let data_dir = data_dir.context("--validator-key needs --data-dir")?;
                    return bft::run_validator(
                        &key, &genesis, data_dir, p2p_addr, rpc_addr, &peers,
                    );
                }
                if !dev {
                    bail!("pass --dev for the dev chain or --validator-key for a BFT validator");
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
                validators,
                committee_size,
                chain_epoch_blocks,
            } => {
                let mut g = Genesis::dev(&[]);
                g.chain_id = chain_id;
                if let Some(e) = epoch_length {
                    g.params.epoch_length = e;
                }
                if let Some(n) = committee_size {
                    g.params.committee_size = n;
                }
                if let Some(n) = chain_epoch_blocks {
                    g.params.chain_epoch_blocks = n;
                }
                for f in &fund {
                    g.balances.push(parse_fund(f)?);
                }
                for v in &validators {
                    let b = parse_fund(v)?;
                    g.validators.push(ledger::genesis::GenesisValidator {
                        address: b.address,
                        consensus_key: b.address,
                        bond: b.amount,
                    });
                }
                g.validate()?;
                g.save(&out)?;
                println!("genesis written to {}", out.display());
                Ok(())
            }
            ChainCmd::Localnet {
                validators,
                dir,
                fund,
                chain_epoch_blocks,
            } => {
                let fund = fund
                    .iter()
                    .map(|f| parse_fund(f))
                    .collect::<Result<Vec<_>>>()?;
                bft::localnet(validators, &dir, fund, chain_epoch_blocks)
            }
            ChainCmd::Bench {
                txs,
                validators,
                json,
            } => bft::bench(txs, validators, &json),
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
    /// Bond stake as a chain validator with a consensus key.
    ValidatorBond {
        #[command(flatten)]
        opts: TxOpts,
        /// Consensus public key (defaults to the address of
        /// --consensus-key-file, else the signing key's).
        #[arg(long)]
        consensus_key: Option<Address>,
        /// Consensus key file.
        #[arg(long, conflicts_with = "consensus_key")]
        consensus_key_file: Option<PathBuf>,
        /// Amount in tokens.
        #[arg(long, value_parser = tokens)]
        amount: Amount,
    },
    /// Unbond chain-validator stake; all of it leaves the validator set.
    ValidatorUnbond {
        #[command(flatten)]
        opts: TxOpts,
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
            TxCmd::ValidatorBond {
                opts,
                consensus_key,
                consensus_key_file,
                amount,
            } => {
                let consensus_key = match (consensus_key, consensus_key_file) {
                    (Some(k), _) => k,
                    (None, Some(f)) => Keypair::load(&f)?.address(),
                    (None, None) => Keypair::load(&opts.key)?.address(),
                };
                (
                    opts,
                    Call::BondValidator {
                        consensus_key,
                        amount,
                    },
                )
            }
            TxCmd::ValidatorUnbond { opts, amount } => (opts, Call::UnbondValidator { amount }),
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

/// BFT validators: one validator process, a local network of them, and the
/// chain benchmark. The work is in the `consensus` crate.
mod bft {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, anyhow, bail};
    use consensus::node::{NodeConfig, Peer};
    use ledger::devnode::{DevNode, DevNodeConfig};
    use ledger::genesis::{GenesisBalance, GenesisValidator};
    use ledger::rpc_client::LedgerClient;
    use ledger::{Address, Call, Genesis, Hash32, Keypair, TOKEN, Tx};

    use super::block_on;

    /// Runs one validator until the process is stopped.
    pub fn run_validator(
        key: &Path,
        genesis: &Path,
        data_dir: PathBuf,
        p2p_addr: SocketAddr,
        rpc_addr: SocketAddr,
        peers: &[String],
    ) -> Result<()> {
        let kp = Keypair::load(key)?;
        let genesis = Genesis::load(genesis)?;
        let peers = peers
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<Peer>().map_err(|e| anyhow!("--peers {p}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        consensus::node::run(
            NodeConfig {
                key: consensus::private_key(&kp)?,
                genesis,
                data_dir,
                p2p_addr,
                rpc_addr,
                peers,
                timeouts: Default::default(),
            },
            |rpc| {
                println!("rpc listening on {}", rpc.url());
                let _ = std::io::stdout().flush();
            },
        )?;
        Ok(())
    }

    /// A free port on 127.0.0.1 (released before the validator binds it).
    fn free_port() -> Result<u16> {
        Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    /// Validator processes, killed when dropped.
    pub struct Procs(pub Vec<Child>);

    impl Drop for Procs {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// A local network's layout: keys, genesis, ports.
    struct Layout {
        keys: Vec<PathBuf>,
        genesis: PathBuf,
        ports: Vec<u16>,
        dir: PathBuf,
    }

    fn prepare(
        n: usize,
        dir: &Path,
        fund: Vec<GenesisBalance>,
        chain_epoch_blocks: u64,
    ) -> Result<Layout> {
        std::fs::create_dir_all(dir)?;
        let mut keys = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let p = dir.join(format!("v{i}")).join("key.json");
            let k = if p.exists() {
                Keypair::load(&p)?
            } else {
                let k = Keypair::generate();
                k.save(&p)?;
                k
            };
            addrs.push(k.address());
            keys.push(p);
        }
        let genesis = dir.join("genesis.toml");
        if !genesis.exists() {
            let mut g = Genesis::dev(&[]);
            g.chain_id = "hypertensor-localnet".into();
            g.params.chain_epoch_blocks = chain_epoch_blocks;
            g.params.committee_size = n as u32;
            g.balances = fund;
            for a in &addrs {
                if !g.balances.iter().any(|b| b.address == *a) {
                    g.balances.push(GenesisBalance {
                        address: *a,
                        amount: 1_000 * TOKEN,
                    });
                }
                g.validators.push(GenesisValidator {
                    address: *a,
                    consensus_key: *a,
                    bond: 100 * TOKEN,
                });
            }
            g.validate()?;
            g.save(&genesis)?;
        }
        let ports_file = dir.join("ports.json");
        let ports: Vec<u16> = match std::fs::read_to_string(&ports_file) {
            Ok(s) => serde_json::from_str(&s)?,
            Err(_) => {
                let p = (0..n).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
                std::fs::write(&ports_file, serde_json::to_string(&p)?)?;
                p
            }
        };
        if ports.len() != n {
            bail!(
                "{} holds {} ports, not {n}",
                ports_file.display(),
                ports.len()
            );
        }
        Ok(Layout {
            keys,
            genesis,
            ports,
            dir: dir.to_path_buf(),
        })
    }

    /// Starts validator `i` of `layout`; returns the process and its RPC URL.
    fn spawn(layout: &Layout, i: usize) -> Result<(Child, String)> {
        let mut peers = Vec::new();
        for (j, k) in layout.keys.iter().enumerate() {
            if j != i {
                let a = Keypair::load(k)?.address();
                peers.push(format!("{a}@127.0.0.1:{}", layout.ports[j]));
            }
        }
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["chain", "run", "--validator-key"])
            .arg(&layout.keys[i])
            .arg("--genesis")
            .arg(&layout.genesis)
            .arg("--data-dir")
            .arg(layout.dir.join(format!("v{i}")).join("data"))
            .args(["--p2p-addr", &format!("127.0.0.1:{}", layout.ports[i])])
            .args(["--rpc-addr", "127.0.0.1:0"])
            .args(["--peers", &peers.join(",")])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start a validator process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("rpc listening on ")
            .with_context(|| format!("validator {i} did not start: {line:?}"))?
            .to_string();
        Ok((child, url))
    }

    /// Starts `n` validators on 127.0.0.1, prints their RPC URLs and waits
    /// for Ctrl-C (or a validator exiting).
    pub fn localnet(
        n: usize,
        dir: &Path,
        fund: Vec<GenesisBalance>,
        chain_epoch_blocks: u64,
    ) -> Result<()> {
        if n == 0 {
            bail!("--validators must be at least 1");
        }
        let layout = prepare(n, dir, fund, chain_epoch_blocks)?;
        let mut procs = Procs(Vec::new());
        for i in 0..n {
            let (child, url) = spawn(&layout, i)?;
            procs.0.push(child);
            println!("validator {i} rpc {url}");
        }
        println!("genesis {}", layout.genesis.display());
        std::io::stdout().flush()?;
        block_on(async move {
            loop {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => { r?; break; }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        for (i, c) in procs.0.iter_mut().enumerate() {
                            if let Some(status) = c.try_wait()? {
                                bail!("validator {i} exited: {status}");
                            }
                        }
                    }
                }
            }
            drop(procs);
            Ok(())
        })
    }

    /// One engine's benchmark figures.
    #[derive(serde::Serialize, Clone, Debug)]
    struct Figures {
        engine: String,
        txs: usize,
        seconds: f64,
        tps: f64,
        median_finality_ms: f64,
        p90_finality_ms: f64,
    }

    /// Submits `txs` transfers spread over 16 senders through `urls`
    /// (round robin) and times each from submission to its block arriving
    /// on `watch`'s subscription.
    async fn measure(
        engine: &str,
        urls: &[String],
        watch: &str,
        senders: &[Keypair],
        txs: usize,
    ) -> Result<Figures> {
        let chain_id = LedgerClient::connect(watch)
            .await?
            .chain_info()
            .await?
            .chain_id;
        let submitted: Arc<Mutex<HashMap<Hash32, Instant>>> = Arc::default();
        let finalized: Arc<Mutex<HashMap<Hash32, Instant>>> = Arc::default();
        let sub_client = LedgerClient::connect(watch).await?;
        let mut blocks = sub_client.subscribe_blocks().await?;
        let fin = Arc::clone(&finalized);
        let target = txs;
        let watcher = tokio::spawn(async move {
            while let Some(Ok(b)) = blocks.next().await {
                let now = Instant::now();
                let mut f = fin.lock().unwrap_or_else(|p| p.into_inner());
                for t in &b.txs {
                    f.insert(t.hash(), now);
                }
                if f.len() >= target {
                    break;
                }
            }
        });
        let per = txs.div_ceil(senders.len());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (s, key) in senders.iter().enumerate() {
            let url = urls[s % urls.len()].clone();
            let key = key.clone();
            let chain_id = chain_id.clone();
            let submitted = Arc::clone(&submitted);
            let count = per.min(txs.saturating_sub(s * per));
            tasks.push(tokio::spawn(async move {
                let c = LedgerClient::connect(&url).await?;
                let base = c.next_nonce(&key.address()).await?;
                for n in 0..count as u64 {
                    let tx = Tx {
                        signer: key.address(),
                        nonce: base + n,
                        call: Call::Transfer {
                            to: Address([9; 32]),
                            amount: 1,
                        },
                    }
                    .sign(&key, &chain_id);
                    let at = Instant::now();
                    let h = c.submit(&tx).await?;
                    submitted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(h, at);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        tokio::time::timeout(Duration::from_secs(300), watcher)
            .await
            .context("transactions were not all finalized within 300 s")??;
        let fin = finalized.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sub = submitted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let end = fin.values().max().copied().unwrap_or(start);
        let mut lat: Vec<f64> = sub
            .iter()
            .filter_map(|(h, at)| {
                fin.get(h)
                    .map(|f| f.duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let seconds = end.duration_since(start).as_secs_f64();
        Ok(Figures {
            engine: engine.into(),
            txs,
            seconds,
            tps: txs as f64 / seconds.max(1e-9),
            median_finality_ms: pick(0.5),
            p90_finality_ms: pick(0.9),
        })
    }

    /// `hypertensor chain bench`: the dev chain and `n` BFT validators,
    /// measured the same way in one run.
    pub fn bench(txs: usize, n: usize, json: &Path) -> Result<()> {
        let dir = std::env::temp_dir().join(format!("hypertensor-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let senders: Vec<Keypair> = (0..16u8)
            .map(|i| Keypair::from_seed([200 + i; 32]))
            .collect();
        let fund: Vec<GenesisBalance> = senders
            .iter()
            .map(|k| GenesisBalance {
                address: k.address(),
                amount: 1_000 * TOKEN,
            })
            .collect();

        // Dev chain: one authority sealing every 100 ms, like the BFT pacing.
        let mut dev_genesis = Genesis::dev(&[]);
        dev_genesis.balances = fund.clone();
        let dev = block_on_value(async {
            let node = DevNode::start(DevNodeConfig {
                data_dir: Some(dir.join("dev")),
                genesis: dev_genesis,
                rpc_addr: "127.0.0.1:0".parse()?,
                block_time: Some(Duration::from_millis(100)),
            })
            .await?;
            let url = node.rpc_url();
            let f = measure("dev chain", std::slice::from_ref(&url), &url, &senders, txs).await;
            node.stop().await;
            f
        })?;

        // BFT: n validator processes on loopback.
        let layout = prepare(n, &dir.join("bft"), fund, 1000)?;
        let mut procs = Procs(Vec::new());
        let mut urls = Vec::new();
        for i in 0..n {
            let (child, url) = spawn(&layout, i)?;
            procs.0.push(child);
            urls.push(url);
        }
        let bft = block_on_value(async {
            // Let the validators connect and finalize a first block.
            let c = LedgerClient::connect(&urls[0]).await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.head().await?.header.height < 2 {
                if Instant::now() > deadline {
                    bail!("the validators did not start finalizing");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            measure(
                &format!("BFT, {n} validators"),
                &urls,
                &urls[0],
                &senders,
                txs,
            )
            .await
        })?;
        drop(procs);
        let _ = std::fs::remove_dir_all(&dir);

        println!(
            "| engine | txs | seconds | finalized tx/s | median finality ms | p90 finality ms |"
        );
        println!("|---|---|---|---|---|---|");
        for f in [&dev, &bft] {
            println!(
                "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} |",
                f.engine, f.txs, f.seconds, f.tps, f.median_finality_ms, f.p90_finality_ms
            );
        }
        println!(
            "BFT / dev chain: throughput x{:.2}, median finality x{:.2}",
            bft.tps / dev.tps.max(1e-9),
            bft.median_finality_ms / dev.median_finality_ms.max(1e-9)
        );
        std::fs::write(
            json,
            serde_json::to_string_pretty(&serde_json::json!({
                "dev_chain": dev,
                "bft": bft,
                "ratio_tps": bft.tps / dev.tps.max(1e-9),
                "ratio_median_finality": bft.median_finality_ms / dev.median_finality_ms.max(1e-9),
            }))?,
        )?;
        println!("results written to {}", json.display());
        Ok(())
    }

    fn block_on_value<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(f)
    }
}
