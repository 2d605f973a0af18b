//! Several nodes on 127.0.0.1: announcements are found through the DHT, and a
//! forged record sent straight to a node's Kademlia is not stored.

use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::{self, Quorum, Record, store::MemoryStore};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, SwarmBuilder, identity::Keypair, noise, tcp, yamux};
use p2p::testing::eventually;
use p2p::{Node, NodeConfig, NodeHandle, now_ms, record};
use wire::{ServerInfo, ServerState, Span, Throughput};

fn info(model: &str, span: Span, ttl_ms: u64) -> ServerInfo {
    ServerInfo {
        model: model.into(),
        num_blocks: 30,
        span,
        state: ServerState::Online,
        throughput: Throughput {
            inference_rps: 100.0,
            forward_rps: 1000.0,
            network_rps: 1e4,
        },
        cache_tokens_left: 1 << 16,
        max_length: 2048,
        dtype: "f32".into(),
        quantization: "Q4_1".into(),
        version: "test".into(),
        wire_version: wire::WIRE_VERSION,
        addrs: vec![],
        using_relay: false,
        next_pings: vec![],
        expires_at_ms: now_ms() + ttl_ms,
    }
}

async fn start(initial: Option<&NodeHandle>) -> NodeHandle {
    p2p::testing::local_node(initial).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_are_found_through_the_dht() {
    let boot = start(None).await;
    let a = start(Some(&boot)).await;
    let b = start(Some(&boot)).await;
    let client = start(Some(&boot)).await;
    let span_a = Span::new(0, 15).unwrap();
    let span_b = Span::new(15, 30).unwrap();
    let keys = |s: Span| {
        (s.start..s.end)
            .map(|i| record::block_key("m", i))
            .collect::<Vec<_>>()
    };
    eventually(10, || async {
        a.announce(info("m", span_a, 60_000), keys(span_a), vec![])
            .await
            .unwrap();
        b.announce(info("m", span_b, 60_000), keys(span_b), vec![])
            .await
            .unwrap();
        let found = client.find_servers("m", 30).await.unwrap();
        (found.len() == 2).then_some(found)
    })
    .await
    .iter()
    .for_each(|(peer, i)| {
        let expected = if *peer == a.peer_id() { span_a } else { span_b };
        assert_eq!(i.span, expected);
    });
    assert!(client.find_servers("other", 30).await.unwrap().is_empty());

    // Going offline is visible to others.
    let mut offline = info("m", span_a, 60_000);
    offline.state = ServerState::Offline;
    a.announce(offline, vec![], keys(span_a)).await.unwrap();
    eventually(10, || async {
        let i = client.server_info(&a.peer_id()).await.unwrap()?;
        (i.state == ServerState::Offline).then_some(())
    })
    .await;
    for n in [&boot, &a, &b, &client] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_not_stored() {
    let node = start(None).await;
    // A bare Kademlia peer speaking our DHT protocol, outside our validation.
    let key = Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    let mut forger = SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            let mut c = kad::Config::new(StreamProtocol::new("/hypertensor/kad/1.0.0"));
            c.set_query_timeout(Duration::from_secs(5));
            let mut k = kad::Behaviour::with_config(me, MemoryStore::new(me), c);
            k.set_mode(Some(kad::Mode::Server));
            k
        })
        .unwrap()
        .build();
    let addr: Multiaddr = node
        .listen_addrs()
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .unwrap();
    forger.behaviour_mut().add_address(&node.peer_id(), addr);

    // Valid signature by another key, record under our own key: wrong signer.
    let other = Keypair::generate_ed25519();
    let wrong_signer = record::sign(&other, &info("m", Span::new(0, 1).unwrap(), 60_000)).unwrap();
    // Our key, but expiring years from now.
    let too_far = record::sign(
        &key,
        &info("m", Span::new(0, 1).unwrap(), 10 * 365 * 86_400_000),
    )
    .unwrap();
    let valid = record::sign(&key, &info("m", Span::new(0, 1).unwrap(), 60_000)).unwrap();
    for (value, should_store) in [
        (wrong_signer, false),
        (too_far, false),
        (b"junk".to_vec(), false),
        (valid, true),
    ] {
        let rec = Record::new(record::server_key(&me), value);
        forger
            .behaviour_mut()
            .put_record_to(rec, std::iter::once(node.peer_id()), Quorum::One);
        loop {
            if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::PutRecord(_),
                ..
            }) = forger.select_next_some().await
            {
                break;
            }
        }
        // Ask the node itself: did it keep the record?
        let stored = tokio::select! {
            i = node.server_info(&me) => i.unwrap(),
            _ = async { loop { forger.select_next_some().await; } } => unreachable!(),
        };
        assert_eq!(stored.is_some(), should_store);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_swarms_admit_only_holders_of_the_key() {
    let psk = |byte: &str| {
        p2p::parse_psk(&format!(
            "/key/swarm/psk/1.0.0/\n/base16/\n{}\n",
            byte.repeat(32)
        ))
        .unwrap()
    };
    let start = |psk: libp2p::pnet::PreSharedKey, initial: Vec<Multiaddr>| {
        let mut config = NodeConfig::local();
        config.psk = Some(psk);
        config.new_swarm = initial.is_empty();
        config.initial_peers = initial;
        Node::start(Keypair::generate_ed25519(), config)
    };
    let boot = start(psk("ab"), vec![]).await.unwrap();
    // QUIC cannot carry the pre-shared-key handshake: only TCP listens.
    assert!(
        boot.listen_addrs()
            .iter()
            .all(|a| a.to_string().contains("/tcp/"))
    );
    let member = start(psk("ab"), boot.dialable_addrs()).await.unwrap();
    let outsider = start(psk("cd"), boot.dialable_addrs()).await.unwrap();
    eventually(10, || async {
        let peers = member.connected_peers().await.unwrap();
        peers.contains(&boot.peer_id()).then_some(())
    })
    .await;
    // Streams need a connection: the member gets one, the outsider's dial
    // fails at the key handshake.
    let _incoming = boot.accept_inference().unwrap();
    let limits = wire::FrameLimits::default();
    assert!(member.open_inference(boot.peer_id(), limits).await.is_ok());
    assert!(
        outsider
            .open_inference(boot.peer_id(), limits)
            .await
            .is_err()
    );
    assert!(
        !boot
            .connected_peers()
            .await
            .unwrap()
            .contains(&outsider.peer_id())
    );
    for n in [&boot, &member, &outsider] {
        n.shutdown().await;
    }
}

/// Sixteen streams opened at once overflow the acceptor's buffer (it holds
/// one); every exchange still completes, because a stream dropped before its
/// first response is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_streams_is_served() {
    use p2p::inference::protocol::{read_frame, write_frame};
    use wire::{FrameLimits, Request, Response};

    let server = start(None).await;
    let mut incoming = server.accept_inference().unwrap();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let limits = FrameLimits::default();
                while let Ok(Some(Request::Info)) = read_frame(&mut stream, &limits).await {
                    let reply = Response::Opened {
                        max_length: 7,
                        session: 1,
                    };
                    if write_frame(&mut stream, &reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    // Each fresh client opens its burst while its bootstrap connection is
    // still being set up: the moment libp2p-stream alone would leave a stream
    // request waiting forever.
    for _ in 0..4 {
        let client = start(Some(&server)).await;
        let calls = (0..16).map(|_| {
            client.open_inference_with(server.peer_id(), FrameLimits::default(), &Request::Info)
        });
        for result in futures::future::join_all(calls).await {
            let (_, response) = result.unwrap();
            assert!(matches!(response, Response::Opened { max_length: 7, .. }));
        }
        client.shutdown().await;
    }
}

/// Blocks 0..30 of model "m", and their DHT keys.
fn whole_model() -> (Span, Vec<kad::RecordKey>) {
    let span = Span::new(0, 30).unwrap();
    (span, (0..30).map(|i| record::block_key("m", i)).collect())
}

/// Has `server` announce all of model "m" until `looking` finds it.
async fn announce_until_found(server: &NodeHandle, looking: &NodeHandle) {
    let (span, keys) = whole_model();
    eventually(10, || async {
        server
            .announce(info("m", span, 60_000), keys.clone(), vec![])
            .await
            .unwrap();
        (looking.find_servers("m", 30).await.unwrap().len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_do_not_wait_out_peers_that_left() {
    let boot = start(None).await;
    let server = start(Some(&boot)).await;
    // Peers that looked the server up and left: they linger in the others'
    // routing tables, and dials to them go unanswered.
    for _ in 0..4 {
        let gone = start(Some(&boot)).await;
        announce_until_found(&server, &gone).await;
        gone.shutdown().await;
    }
    let client = start(Some(&boot)).await;
    // Kademlia alone would wait for the departed peers until the query
    // timeout; a lookup that has its answer stops within SETTLE_MAX (2 s)
    // of the first one.
    let timeout = NodeConfig::local().query_timeout;
    for _ in 0..2 {
        let found = tokio::time::timeout(timeout / 2, client.find_servers("m", 30))
            .await
            .expect("the lookup settles before the query timeout")
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, server.peer_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_announcement_does_not_wait_out_peers_that_left() {
    let boot = start(None).await;
    let server = start(Some(&boot)).await;
    let client = start(Some(&boot)).await;
    // A peer that looked the server up and left: it lingers in the
    // server's routing table, and dials to it go unanswered.
    let gone = start(Some(&boot)).await;
    for looking in [&gone, &client] {
        announce_until_found(&server, looking).await;
    }
    gone.shutdown().await;

    let (span, keys) = whole_model();
    let mut offline = info("m", span, 60_000);
    offline.state = ServerState::Offline;
    let timeout = NodeConfig::local().query_timeout;
    tokio::time::timeout(timeout / 2, server.announce_final(offline, keys, timeout))
        .await
        .expect("the connected peers answer before the query timeout")
        .unwrap();
    let seen = client.server_info(&server.peer_id()).await.unwrap();
    assert_eq!(seen.map(|i| i.state), Some(ServerState::Offline));
}
