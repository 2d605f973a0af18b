//! The dev chain behind JSON-RPC: submission, errors, queries, blocks,
//! subscriptions, HTTP, `proof_of_stake`, and restart on the same database.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use jsonrpsee::core::client::ClientT;
use jsonrpsee::core::rpc_params;
use ledger::chain::BlockProducer;
use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::rpc_client::LedgerClient;
use ledger::storage::Head;
use ledger::types::NodeClass;
use ledger::{Call, Genesis, TOKEN};

const WAIT: Duration = Duration::from_secs(10);

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn funded() -> Genesis {
    let mut g = genesis(6);
    for i in 0..4u8 {
        for k in [cold(i), hot(i)] {
            g.balances.push(ledger::genesis::GenesisBalance {
                address: k.address(),
                amount: 1_000 * TOKEN,
            });
        }
    }
    g
}

async fn instant_node(data_dir: Option<std::path::PathBuf>) -> DevNode {
    DevNode::start(DevNodeConfig {
        data_dir,
        genesis: funded(),
        rpc_addr: local(),
        block_time: None,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_query_errors_and_subscription() {
    let node = instant_node(None).await;
    let c = LedgerClient::connect(&node.rpc_url()).await.unwrap();
    let info = c.chain_info().await.unwrap();
    assert_eq!(info.chain_id, "test");

    let mut sub = c.subscribe_blocks().await.unwrap();
    let (a, b) = (key(1), key(2));
    let h = c
        .sign_and_submit(
            &a,
            Call::Transfer {
                to: b.address(),
                amount: 3 * TOKEN,
            },
        )
        .await
        .unwrap();
    let loc = c.wait_for_tx(&h, WAIT).await.unwrap();
    // The subscription delivers the block that carries it.
    let block = loop {
        let blk = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if blk.header.height == loc.height {
            break blk;
        }
    };
    assert_eq!(block.txs[loc.index as usize].hash(), h);
    assert_eq!(c.block(Some(loc.height)).await.unwrap().unwrap(), block);
    assert_eq!(
        c.account(&b.address()).await.unwrap().balance,
        1_000_003 * TOKEN
    );

    // Clear errors, nothing changes.
    let before = c.account(&a.address()).await.unwrap();
    let stale = ledger::Tx {
        signer: a.address(),
        nonce: 0,
        call: Call::Transfer {
            to: b.address(),
            amount: 1,
        },
    }
    .sign(&a, "test");
    let e = c.submit(&stale).await.unwrap_err().to_string();
    assert!(e.contains("bad nonce: expected 1, got 0"), "{e}");
    let e = c
        .sign_and_submit(
            &a,
            Call::Transfer {
                to: b.address(),
                amount: 10_000_000 * TOKEN,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("insufficient balance"), "{e}");
    let mut forged = stale.clone();
    forged.tx.nonce = 1;
    let e = c.submit(&forged).await.unwrap_err().to_string();
    assert!(e.contains("bad signature"), "{e}");
    assert_eq!(c.account(&a.address()).await.unwrap(), before);

    // Subnet, nodes, activation, proof of stake, epoch view.
    let fee = c.registration_fee().await.unwrap();
    assert_eq!(fee, info.params.subnet_base_fee);
    let h = c
        .sign_and_submit(
            &key(0),
            Call::RegisterSubnet {
                name: "smollm".into(),
                min_stake: 10 * TOKEN,
                max_stake: 500 * TOKEN,
            },
        )
        .await
        .unwrap();
    c.wait_for_tx(&h, WAIT).await.unwrap();
    for i in 0..3u8 {
        let h = c
            .sign_and_submit(
                &cold(i),
                Call::RegisterNode {
                    subnet: 1,
                    hotkey: hot(i).address(),
                    peer_id: format!("peer{i}"),
                    stake: 20 * TOKEN,
                },
            )
            .await
            .unwrap();
        c.wait_for_tx(&h, WAIT).await.unwrap();
    }
    let e = c
        .sign_and_submit(
            &cold(3),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(3).address(),
                peer_id: "peer0".into(),
                stake: 20 * TOKEN,
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate peer id"), "{e}");
    let h = c
        .sign_and_submit(&key(0), Call::ActivateSubnet { subnet: 1 })
        .await
        .unwrap();
    c.wait_for_tx(&h, WAIT).await.unwrap();
    let pos = c
        .proof_of_stake(1, "peer1", NodeClass::Validator)
        .await
        .unwrap();
    assert!(pos.staked);
    assert_eq!(pos.node.unwrap().id, 2);
    assert!(
        !c.proof_of_stake(1, "stranger", NodeClass::Registered)
            .await
            .unwrap()
            .staked
    );
    assert_eq!(c.nodes(1).await.unwrap().len(), 3);
    assert_eq!(c.subnets().await.unwrap()[0].name, "smollm");
    // Seal up to the next epoch on demand: a validator gets elected.
    let ep = c.epoch(1).await.unwrap();
    while c.head().await.unwrap().header.height < ep.next_epoch_at {
        c.seal_block().await.unwrap();
    }
    let ep = c.epoch(1).await.unwrap();
    let v = ep.record.unwrap().validator;
    // The elected validator proposes, the other two attest, over RPC.
    let scores = (1..=3)
        .map(|node| ledger::types::NodeScore { node, score: 1 })
        .collect();
    let h = c
        .sign_and_submit(
            &hot((v - 1) as u8),
            Call::ProposeAttestation { subnet: 1, scores },
        )
        .await
        .unwrap();
    c.wait_for_tx(&h, WAIT).await.unwrap();
    for id in (1..=3u32).filter(|id| *id != v) {
        let h = c
            .sign_and_submit(&hot((id - 1) as u8), Call::Attest { subnet: 1 })
            .await
            .unwrap();
        c.wait_for_tx(&h, WAIT).await.unwrap();
    }
    let e = c
        .sign_and_submit(&hot((v - 1) as u8), Call::Attest { subnet: 1 })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already attested"), "{e}");
    let rec = c.epoch(1).await.unwrap().record.unwrap();
    assert_eq!(rec.attestations.len(), 3);
    assert_eq!(rec.proposal.unwrap().len(), 3);
    let owner_before = c.account(&key(0).address()).await.unwrap().balance;
    let ep = c.epoch(1).await.unwrap();
    while c.head().await.unwrap().header.height < ep.next_epoch_at {
        c.seal_block().await.unwrap();
    }
    let owner_after = c.account(&key(0).address()).await.unwrap().balance;
    assert_eq!(
        owner_after - owner_before,
        info.params.emission_per_epoch / 10,
        "owner's cut paid"
    );
    assert!(c.audit().await.unwrap().holds());

    // Plain HTTP works too.
    let http = jsonrpsee_http_client::HttpClient::builder()
        .build(node.rpc_url())
        .unwrap();
    let head: Head = http.request("ledger_head", rpc_params![]).await.unwrap();
    assert_eq!(head, c.head().await.unwrap());

    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_seals_blocks_and_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DevNodeConfig {
        data_dir: Some(dir.path().to_path_buf()),
        genesis: funded(),
        rpc_addr: local(),
        block_time: Some(Duration::from_millis(20)),
    };
    let node = DevNode::start(cfg.clone()).await.unwrap();
    let mut blocks = node.chain.subscribe();
    let c = LedgerClient::connect(&node.rpc_url()).await.unwrap();
    let mut hashes = vec![];
    for i in 0..5u128 {
        hashes.push(
            c.sign_and_submit(
                &key(1),
                Call::Transfer {
                    to: key(2).address(),
                    amount: i + 1,
                },
            )
            .await
            .unwrap(),
        );
    }
    for h in &hashes {
        c.wait_for_tx(h, WAIT).await.unwrap();
    }
    // The timer keeps sealing empty blocks.
    let start = node.chain.store().head().header.height;
    while tokio::time::timeout(WAIT, blocks.recv())
        .await
        .unwrap()
        .unwrap()
        .header
        .height
        < start + 3
    {}
    let head = node.chain.store().head();
    let acct = c.account(&key(1).address()).await.unwrap();
    drop(c);
    node.stop().await;

    let node = DevNode::start(cfg.clone()).await.unwrap();
    let c = LedgerClient::connect(&node.rpc_url()).await.unwrap();
    assert!(node.chain.store().head().header.height >= head.header.height);
    assert_eq!(
        c.block(Some(head.header.height))
            .await
            .unwrap()
            .unwrap()
            .hash(),
        head.hash
    );
    assert_eq!(c.account(&key(1).address()).await.unwrap(), acct);
    for h in &hashes {
        assert!(c.transaction(h).await.unwrap().is_some());
    }
    node.stop().await;

    // A different genesis on the same data dir is refused.
    let mut other = cfg;
    other.genesis.chain_id = "other".into();
    assert!(DevNode::start(other).await.is_err());
}
