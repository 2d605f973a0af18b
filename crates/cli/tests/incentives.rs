//! Incentives end to end, on 127.0.0.1: a dev chain process, a subnet
//! registered with the wallet commands, three `serve --subnet` processes and
//! a fourth server in this process that returns corrupted activations (the
//! test-only fault hook). Every server validates the others. After some
//! epochs the honest nodes' stake has grown by exactly their score share of
//! the emission, the cheater scored 0 and lost reputation, and a node killed
//! half-way scored 0 and was removed by the rules. The issuance invariant
//! holds at every block seen.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Killed, hypertensor};
use ledger::rpc_client::LedgerClient;
use ledger::types::{Node, NodeId, format_tokens};
use ledger::{Genesis, Keypair, TOKEN};
use p2p::{Multiaddr, NodeConfig};
use server::{Fault, Server, ServerConfig, SpanChoice};

const EPOCH_BLOCKS: u64 = 12;
const BLOCK_MS: u64 = 250;
const SUBNET: u32 = 1;
const MODEL_ID: &str = "tiny";
/// Node ids follow registration order.
const A: NodeId = 1;
const B: NodeId = 2;
/// The node killed half-way.
const C: NodeId = 3;
const CHEATER: NodeId = 4;

/// Runs a wallet command; returns its stdout.
fn run(cache: &Path, args: &[&str]) -> String {
    let out = hypertensor(cache).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Starts a process and returns it with the line of its stdout that starts
/// with `prefix` (what follows the prefix).
fn start(mut command: Command, prefix: &str) -> (Killed, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let child = Killed(child);
    let mut lines = lines.map_while(Result::ok);
    let found = lines
        .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"));
    // Keep draining, so the process never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, found)
}

/// One row of the table: a node after an epoch was closed.
#[derive(Debug, Clone)]
struct Row {
    epoch: u64,
    node: Node,
}

#[test]
fn honest_nodes_earn_while_a_cheater_and_a_dropout_lose() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let model = server::testing::tiny_model(dir.path(), 4);

    // Keys, as an operator makes them.
    run(cache, &["key", "new", "--out", &p("owner.key")]);
    for i in 0..4 {
        run(cache, &["key", "new", "--out", &p(&format!("cold{i}.key"))]);
        run(cache, &["key", "new", "--out", &p(&format!("hot{i}.key"))]);
    }
    let peer_ids: Vec<String> = (0..4)
        .map(|i| {
            run(cache, &["keygen", "--out", &p(&format!("peer{i}.key"))])
                .trim()
                .to_string()
        })
        .collect();

    // A genesis with short epochs and reputation rules that remove a node
    // scored 0 for a few epochs.
    let key = |n: &str| Keypair::load(Path::new(&p(n))).unwrap();
    let mut balances = vec![(key("owner.key").address(), 1_000_000 * TOKEN)];
    balances.extend((0..4).map(|i| (key(&format!("cold{i}.key")).address(), 1_000 * TOKEN)));
    let mut genesis = Genesis::dev(&balances);
    genesis.chain_id = "incentives-test".into();
    genesis.params.epoch_length = EPOCH_BLOCKS;
    genesis.params.node_zero_score_loss = 150_000;
    genesis.params.node_no_attest_loss = 50_000;
    let params = genesis.params.clone();
    std::fs::write(p("genesis.json"), serde_json::to_string(&genesis).unwrap()).unwrap();

    let mut chain_cmd = hypertensor(cache);
    chain_cmd
        .args(["chain", "run", "--dev", "--genesis", &p("genesis.json")])
        .args(["--rpc-addr", "127.0.0.1:0"])
        .args(["--block-time-ms", &BLOCK_MS.to_string()]);
    let (_chain, rpc) = start(chain_cmd, "rpc listening on ");

    let tx = |key: &str, args: &[&str]| {
        let mut all = vec!["tx"];
        all.extend_from_slice(&args[..1]);
        let key = p(key);
        all.extend(["--rpc", &rpc, "--key", &key]);
        all.extend_from_slice(&args[1..]);
        run(cache, &all);
    };
    tx(
        "owner.key",
        &["register-subnet", "--name", MODEL_ID, "--min-stake", "10"],
    );
    // An unregistered peer id cannot serve the subnet.
    let refused = hypertensor(cache)
        .arg("serve")
        .args(["--model", model.to_str().unwrap(), "--model-id", MODEL_ID])
        .args([
            "--blocks",
            "0:4",
            "--new-swarm",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(["--identity", &p("peer0.key")])
        .args([
            "--subnet",
            "1",
            "--chain-rpc",
            &rpc,
            "--hotkey",
            &p("hot0.key"),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains(&format!(
            "peer {} is not a registered node of subnet 1",
            peer_ids[0]
        )) && why.contains("hypertensor tx register-node"),
        "{why}"
    );

    for (i, peer) in peer_ids.iter().enumerate() {
        tx(
            &format!("cold{i}.key"),
            &[
                "register-node",
                "--subnet",
                "1",
                "--hotkey-file",
                &p(&format!("hot{i}.key")),
                "--peer-id",
                peer,
                "--stake",
                "100",
            ],
        );
    }
    tx("owner.key", &["activate-subnet", "--subnet", "1"]);

    // Three honest server processes; the first starts the swarm.
    let m = model.to_str().unwrap();
    let serve = |i: usize, blocks: &str, join: Option<&str>| {
        let mut c = hypertensor(cache);
        c.arg("serve")
            .args(["--model", m, "--model-id", MODEL_ID, "--blocks", blocks])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--announce-period", "1"])
            .args(["--identity", &p(&format!("peer{i}.key"))])
            .args(["--subnet", "1", "--chain-rpc", &rpc])
            .args(["--hotkey", &p(&format!("hot{i}.key"))])
            .env("RUST_LOG", "info");
        match join {
            Some(addr) => c.args(["--initial-peers", addr]),
            None => c.arg("--new-swarm"),
        };
        c
    };
    let (_a, boot) = start(serve(0, "0:2", None), "listening on ");
    let boot_addr: Multiaddr = boot.parse().unwrap();
    let (_b, _) = start(serve(1, "2:4", Some(&boot)), "listening on ");
    let (mut c_proc, _) = start(serve(2, "0:4", Some(&boot)), "listening on ");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // The cheater: a real server and validator in this process, with the
    // fault hook on.
    let ledger = runtime.block_on(LedgerClient::connect(&rpc)).unwrap();
    let cheater_node = runtime.block_on(async {
        let identity = p2p::identity::load(Path::new(&p("peer3.key"))).unwrap();
        let mut config = NodeConfig::local();
        config.initial_peers = vec![boot_addr.clone()];
        let node = p2p::Node::start(identity, config).await.unwrap();
        let mut sc = ServerConfig::new(MODEL_ID, &model, SpanChoice::Fixed(0, 4));
        sc.announce_period = Duration::from_secs(1);
        sc.fault = Some(Fault::CorruptActivations);
        let server = Server::start(sc, node.clone()).await.unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let v =
            validator::Validator::new(validator::ValidatorConfig::new(SUBNET, MODEL_ID, &model));
        let reports = v.reports();
        tokio::spawn(v.run(node, ledger.clone(), key("hot3.key"), stopped));
        (server, stop, reports)
    });

    // Watch every block: the invariant, and each node after every epoch.
    let mut table: Vec<Row> = Vec::new();
    let mut killed_after: Option<u64> = None;
    let mut previous: BTreeMap<NodeId, Node> = BTreeMap::new();
    // The cheater as last seen at an epoch boundary: when the election makes
    // it the proposer, its unattested proposals can get it removed before any
    // epoch is paid, and then it has no row in the table.
    let mut cheater_last: Option<Node> = None;
    let deadline = Instant::now() + Duration::from_secs(150);
    runtime.block_on(async {
        let mut blocks = ledger.subscribe_blocks().await.unwrap();
        loop {
            assert!(
                Instant::now() < deadline,
                "no verdict in time:\n{}",
                render(&table)
            );
            let block = tokio::time::timeout(Duration::from_secs(10), blocks.next())
                .await
                .expect("the chain keeps producing")
                .expect("the subscription stays open")
                .unwrap();
            let audit = ledger.audit().await.unwrap();
            assert!(audit.holds(), "issuance invariant broken: {audit:?}");
            let height = block.header.height;
            if height % EPOCH_BLOCKS != 0 {
                continue;
            }
            let closed = height / EPOCH_BLOCKS - 1;
            let nodes: BTreeMap<NodeId, Node> = ledger
                .nodes(SUBNET)
                .await
                .unwrap()
                .into_iter()
                .map(|n| (n.id, n))
                .collect();
            let paid: Vec<&Node> = nodes
                .values()
                .filter(|n| n.last_epoch == Some(closed))
                .collect();
            if !paid.is_empty() {
                check_payout(&params, &paid, &previous);
                for n in nodes.values() {
                    table.push(Row {
                        epoch: closed,
                        node: n.clone(),
                    });
                }
            }
            if let Some(n) = nodes.get(&CHEATER) {
                cheater_last = Some(n.clone());
            }
            previous = nodes.clone();
            let earned = |id| {
                nodes
                    .get(&id)
                    .is_some_and(|n: &Node| n.last_score > 0 && n.last_epoch == Some(closed))
            };
            if killed_after.is_none() && earned(A) && earned(B) && earned(C) {
                // Everyone honest has been paid once: C drops out.
                c_proc.0.kill().unwrap();
                let _ = c_proc.0.wait();
                killed_after = Some(closed);
            }
            if killed_after.is_some() && !nodes.contains_key(&C) {
                break;
            }
        }
    });
    let killed_after = killed_after.unwrap();
    println!("{}", render(&table));
    if let Some(report) = cheater_node.2.borrow().as_ref() {
        println!(
            "probe bytes per node in epoch {}: {:?}",
            report.epoch, report.probe_bytes_per_node
        );
    }

    let rows = |id: NodeId| table.iter().filter(move |r| r.node.id == id);
    // Honest A and B: paid in every attested epoch, stake grew.
    for id in [A, B] {
        let last = rows(id).next_back().unwrap();
        assert!(last.node.stake > 100 * TOKEN, "node {id} earned nothing");
    }
    // The cheater: never scored, lost reputation.
    assert!(rows(CHEATER).all(|r| r.node.last_score == 0));
    let cheater = cheater_last.expect("the cheater registered");
    assert!(cheater.reputation < params.node_initial_reputation);
    assert!(cheater.stake <= 100 * TOKEN, "only slashes can move it");
    // The dropout: paid before it vanished, never after, and removed (the
    // loop above ends only then).
    assert!(rows(C).any(|r| r.epoch <= killed_after && r.node.last_score > 0));
    assert!(
        rows(C)
            .filter(|r| r.epoch > killed_after)
            .all(|r| r.node.last_score == 0),
        "{}",
        render(&table)
    );
}

/// Each node paid in the closed epoch got exactly its score share of the
/// pool, and its stake grew by that much.
fn check_payout(params: &ledger::Params, paid: &[&Node], before: &BTreeMap<NodeId, Node>) {
    let pool = params.emission_per_epoch
        - params.emission_per_epoch * params.owner_cut as u128 / 1_000_000;
    let total: u128 = paid.iter().map(|n| n.last_score as u128).sum();
    for n in paid {
        let want = (pool * n.last_score as u128)
            .checked_div(total)
            .unwrap_or(0);
        assert_eq!(n.last_reward, want, "node {} reward", n.id);
        if let Some(old) = before.get(&n.id) {
            assert_eq!(n.stake, old.stake + n.last_reward, "node {} stake", n.id);
        }
    }
}

fn render(table: &[Row]) -> String {
    let mut out = String::from(
        "| epoch | node | class | score | reward | stake | reputation |\n|---|---|---|---|---|---|---|\n",
    );
    for r in table {
        let n = &r.node;
        out += &format!(
            "| {} | {} | {:?} | {} | {} | {} | {:.1}% |\n",
            r.epoch,
            n.id,
            n.class,
            n.last_score,
            format_tokens(n.last_reward),
            format_tokens(n.stake),
            f64::from(n.reputation) / 1e4
        );
    }
    out
}
