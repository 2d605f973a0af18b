//! The proof-of-stake gate against a real dev chain over RPC: an unstaked
//! peer gets a clear `Forbidden` frame, a staked one is served, and a refusal
//! is remembered until its cache entry expires.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{MODEL, config, eventually, node, tiny_model};
use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::rpc_client::LedgerClient;
use ledger::types::NodeClass;
use ledger::{Call, Genesis, Keypair, TOKEN};
use p2p::NodeHandle;
use server::{Server, SpanChoice, StakeGate};
use wire::{ErrorCode, FrameLimits, Request, Response};

const WAIT: Duration = Duration::from_secs(10);

async fn info(client: &NodeHandle, server: p2p::PeerId) -> Response {
    let (_, response) = client
        .open_inference_with(server, FrameLimits::default(), &Request::Info)
        .await
        .unwrap();
    response
}

async fn register(chain: &LedgerClient, cold: &Keypair, peer: &NodeHandle) {
    let tx = chain
        .sign_and_submit(
            cold,
            Call::RegisterNode {
                subnet: 1,
                hotkey: Keypair::generate().address(),
                peer_id: peer.peer_id().to_string(),
                stake: 10 * TOKEN,
            },
        )
        .await
        .unwrap();
    chain.wait_for_tx(&tx, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstaked_peers_are_refused_and_answers_expire() {
    let owner = Keypair::generate();
    let chain = DevNode::start(DevNodeConfig {
        data_dir: None,
        genesis: Genesis::dev(&[(owner.address(), 1_000_000 * TOKEN)]),
        rpc_addr: "127.0.0.1:0".parse().unwrap(),
        block_time: None,
    })
    .await
    .unwrap();
    let ledger = LedgerClient::connect(&chain.rpc_url()).await.unwrap();
    let tx = ledger
        .sign_and_submit(
            &owner,
            Call::RegisterSubnet {
                name: MODEL.into(),
                min_stake: 10 * TOKEN,
                max_stake: 100 * TOKEN,
            },
        )
        .await
        .unwrap();
    ledger.wait_for_tx(&tx, WAIT).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), 2);
    let boot = node(None).await;
    let mut c = config(&path, SpanChoice::Fixed(0, 2));
    let ttl = Duration::from_millis(1500);
    c.gate = Some(Arc::new(StakeGate::new(
        ledger.clone(),
        1,
        NodeClass::Registered,
        ttl,
    )));
    let server_node = node(Some(&boot)).await;
    let server = Server::start(c, server_node.clone()).await.unwrap();
    let peer = server_node.peer_id();

    let staked = node(Some(&boot)).await;
    let stranger = node(Some(&boot)).await;
    for client in [&staked, &stranger] {
        client
            .add_addresses(peer, server_node.listen_addrs())
            .await
            .unwrap();
    }
    register(&ledger, &owner, &staked).await;
    assert!(matches!(info(&staked, peer).await, Response::Info(_)));

    let first_asked = std::time::Instant::now();
    match info(&stranger, peer).await {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert!(
                e.message.contains("not a staked node of subnet 1"),
                "{}",
                e.message
            );
            assert!(e.message.contains("register-node"), "{}", e.message);
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
    // Staked now, but the refusal is still cached...
    register(&ledger, &owner, &stranger).await;
    let again = info(&stranger, peer).await;
    // The refusal was cached after `first_asked`: younger than the ttl here.
    if first_asked.elapsed() < ttl {
        assert!(matches!(again, Response::Error(_)), "{again:?}");
    }
    // ...until it expires.
    eventually(10, || async {
        matches!(info(&stranger, peer).await, Response::Info(_)).then_some(())
    })
    .await;
    let metrics = server.metrics().render();
    assert!(
        metrics.contains(r#"hypertensor_server_errors_total{code="Forbidden"}"#),
        "{metrics}"
    );
}
