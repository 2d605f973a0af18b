//! Validators on a real dev chain over real block servers: an elected
//! honest validator proposes, the other honest validators attest, the
//! cheating server scores 0, and the honest nodes' stake grows.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::rpc_client::LedgerClient;
use ledger::types::{NodeClass, NodeScore};
use ledger::{Call, Genesis, Keypair, TOKEN};
use p2p::testing::eventually;
use server::testing::MODEL;
use tokio::sync::watch;
use validator::{EpochReport, Validator, ValidatorConfig};

const WAIT: Duration = Duration::from_secs(10);
const STAKE: u128 = 100 * TOKEN;

fn key(i: u8) -> Keypair {
    Keypair::from_seed([i + 1; 32])
}
fn owner() -> Keypair {
    key(0)
}
fn cold(i: usize) -> Keypair {
    key(10 + i as u8)
}
fn hot(i: usize) -> Keypair {
    key(40 + i as u8)
}

async fn exec(c: &LedgerClient, k: &Keypair, call: Call) {
    let h = c.sign_and_submit(k, call).await.unwrap();
    c.wait_for_tx(&h, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn honest_validators_propose_attest_and_get_paid() {
    init_tracing();
    // Nodes 1-3 honest, node 4 cheats (shifted activations).
    let spans = [(0, 4, false), (0, 2, false), (2, 4, false), (0, 4, true)];
    let swarm = swarm(&spans).await;
    for (node, _) in &swarm.servers {
        wait_for_servers(node, spans.len()).await;
    }

    let mut keys = vec![owner()];
    keys.extend((0..spans.len()).flat_map(|i| [cold(i), hot(i)]));
    let balances: Vec<_> = keys
        .iter()
        .map(|k| (k.address(), 1_000_000 * TOKEN))
        .collect();
    let mut genesis = Genesis::dev(&balances);
    genesis.params.epoch_length = 20;
    let chain = DevNode::start(DevNodeConfig {
        data_dir: None,
        genesis,
        rpc_addr: "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        block_time: Some(Duration::from_millis(100)),
    })
    .await
    .unwrap();
    let url = chain.rpc_url();
    let c = LedgerClient::connect(&url).await.unwrap();

    // Subnet with the honest servers as founding nodes (registered before
    // activation, so they are of class Validator); the cheater joins after
    // activation, so it is never elected and is scored from its third epoch
    // (Registered, Idle, then Included).
    exec(
        &c,
        &owner(),
        Call::RegisterSubnet {
            name: MODEL.into(),
            min_stake: 10 * TOKEN,
            max_stake: 1_000 * TOKEN,
        },
    )
    .await;
    let register = |i: usize| {
        let c = &c;
        let peer = swarm.servers[i].0.peer_id().to_string();
        async move {
            exec(
                c,
                &cold(i),
                Call::RegisterNode {
                    subnet: 1,
                    hotkey: hot(i).address(),
                    peer_id: peer,
                    stake: STAKE,
                },
            )
            .await
        }
    };
    for i in 0..3 {
        register(i).await;
    }
    exec(&c, &owner(), Call::ActivateSubnet { subnet: 1 }).await;
    register(3).await;
    let nodes = c.nodes(1).await.unwrap();
    assert!(nodes[..3].iter().all(|n| n.class == NodeClass::Validator));
    assert_eq!(nodes[3].class, NodeClass::Registered);
    let cheater = nodes[3].id;
    let honest: Vec<u32> = nodes[..3].iter().map(|n| n.id).collect();

    // A validator on each honest server's node.
    let (stop_tx, stop) = watch::channel(false);
    let mut reports = Vec::new();
    let mut tasks = Vec::new();
    for (i, (node, _)) in swarm.servers.iter().enumerate().take(3) {
        let config = ValidatorConfig {
            probe_timeout: Duration::from_secs(5),
            seed: Some(i as u64),
            ..ValidatorConfig::new(1, MODEL, &swarm.path)
        };
        let v = Validator::new(config);
        reports.push(v.reports());
        let ledger = LedgerClient::connect(&url).await.unwrap();
        tasks.push(tokio::spawn(v.run(
            node.clone(),
            ledger,
            hot(i),
            stop.clone(),
        )));
    }

    // Wait for an epoch that scores the cheater and whose proposal all three
    // honest validators back.
    let (epoch, proposer, proposal) = eventually(45, || async {
        let info = c.epoch(1).await.ok()?;
        let rec = info.record?;
        let proposal = rec.proposal?;
        let scored = proposal.iter().any(|s| s.node == cheater);
        (scored && rec.attestations.len() >= 3).then_some((rec.epoch, rec.validator, proposal))
    })
    .await;
    assert!(proposal.iter().any(|s| s.node == cheater));
    let score = |p: &[NodeScore], id| p.iter().find(|s| s.node == id).map_or(0, |s| s.score);
    assert_eq!(score(&proposal, cheater), 0, "{proposal:?}");
    for id in &honest {
        assert!(score(&proposal, *id) > 0, "{proposal:?}");
    }
    assert!(honest.contains(&proposer));

    // Every honest validator's report for that epoch agrees.
    let mut table = Vec::new();
    for (i, rx) in reports.iter().enumerate() {
        let report: EpochReport = eventually(10, || async {
            rx.borrow()
                .clone()
                .filter(|r| r.epoch == epoch && (r.proposed || r.attested))
        })
        .await;
        assert_eq!(report.own_node, honest[i]);
        assert_eq!(report.validator, Some(proposer));
        assert_eq!(report.proposed, proposer == honest[i]);
        assert_eq!(report.attested, proposer != honest[i]);
        assert_eq!(report.disagreement, None);
        assert_eq!(score(&report.scores, cheater), 0);
        let m = report
            .measurements
            .iter()
            .find(|m| m.node == cheater)
            .unwrap();
        assert!(m.spot_check_failures > 0, "{m:?}");
        validator::agrees(&report.scores, &proposal, validator::DEFAULT_TOLERANCE_PPM).unwrap();
        table.push(format!(
            "node {}: rounds {} scores {:?} bytes/node {:?}",
            report.own_node,
            report.rounds,
            report
                .scores
                .iter()
                .map(|s| (s.node, s.score))
                .collect::<Vec<_>>(),
            report.probe_bytes_per_node
        ));
    }
    eprintln!("epoch {epoch}, proposer {proposer}:\n{}", table.join("\n"));

    // At the epoch's end the honest nodes are paid into stake; the cheater is not.
    let stakes = eventually(20, || async {
        let nodes = c.nodes(1).await.ok()?;
        let paid = honest
            .iter()
            .all(|id| nodes.iter().any(|n| n.id == *id && n.stake > STAKE));
        paid.then_some(nodes)
    })
    .await;
    let cheat = stakes.iter().find(|n| n.id == cheater).unwrap();
    assert_eq!(cheat.stake, STAKE, "{cheat:?}");
    assert_eq!(cheat.class, NodeClass::Included);

    stop_tx.send(true).unwrap();
    for t in tasks {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("validators stop")
            .unwrap()
            .unwrap();
    }
    chain.stop().await;
    swarm.shutdown().await;
}
