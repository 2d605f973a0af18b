//! The prober against real block servers: an honest server passes the spot
//! check, a server returning shifted activations fails it, and a peer that
//! is absent or not in the DHT counts as an unanswered probe. Scores follow.

mod common;

use std::time::Duration;

use common::*;
use p2p::PeerId;
use p2p::testing::local_node;
use server::testing::MODEL;
use validator::{Measurement, ProbeConfig, ProbeOutcome, Prober, scores};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_passes_cheater_fails_absent_is_unanswered() {
    init_tracing();
    let swarm = swarm(&[(0, BLOCKS, false), (1, 3, true)]).await;
    let me = local_node(Some(&swarm.boot)).await;
    wait_for_servers(&me, 2).await;
    let config = ProbeConfig {
        seed: Some(7),
        timeout: Duration::from_secs(5),
        ..ProbeConfig::new(MODEL)
    };
    let prober = Prober::open(me.clone(), &swarm.path, config).await.unwrap();
    assert_eq!(prober.num_blocks(), BLOCKS);
    let found = prober.discover().await.unwrap();
    let info_of = |peer: PeerId| {
        found
            .iter()
            .find(|(p, _)| *p == peer)
            .map(|(_, i)| i.clone())
            .unwrap()
    };
    let honest_peer = swarm.servers[0].0.peer_id();
    let cheat_peer = swarm.servers[1].0.peer_id();
    let honest_info = info_of(honest_peer);
    let cheat_info = info_of(cheat_peer);

    let mut honest = Measurement::new(1, honest_peer.to_string());
    let mut cheat = Measurement::new(2, cheat_peer.to_string());
    let mut absent = Measurement::new(3, PeerId::random().to_string());
    let mut hidden = Measurement::new(4, honest_peer.to_string());
    let mut garbled = Measurement::new(5, "not-a-peer-id");
    for round in 0..2 {
        assert_eq!(
            prober.probe(&mut honest, Some(&honest_info)).await,
            ProbeOutcome::Passed
        );
        if round == 0 {
            let bytes = honest.probe_bytes();
            eprintln!(
                "probe bytes per round (tiny model, hidden {}, 8 tokens, {BLOCKS} blocks): \
                 sent {} received {} total {bytes}",
                model::testing::HIDDEN,
                honest.bytes_sent,
                honest.bytes_received
            );
            assert!(bytes > 2 * 8 * model::testing::HIDDEN as u64 * 4);
        }
        let outcome = prober.probe(&mut cheat, Some(&cheat_info)).await;
        assert!(
            matches!(outcome, ProbeOutcome::SpotCheckFailed(ref why) if why.contains("differ")),
            "{outcome:?}"
        );
        // Registered but gone: the DHT record is stale, nobody answers.
        let outcome = prober.probe(&mut absent, Some(&honest_info)).await;
        assert!(
            matches!(outcome, ProbeOutcome::Unanswered(_)),
            "{outcome:?}"
        );
        // Registered, running, but not in the DHT.
        assert!(matches!(
            prober.probe(&mut hidden, None).await,
            ProbeOutcome::Unanswered(_)
        ));
        assert!(matches!(
            prober.probe(&mut garbled, Some(&honest_info)).await,
            ProbeOutcome::Unanswered(_)
        ));
    }
    assert_eq!((honest.probes, honest.answered), (2, 2));
    assert_eq!((honest.spot_checks, honest.spot_check_failures), (2, 0));
    assert_eq!(honest.span, Some((0, BLOCKS)));
    assert_eq!(honest.ping_us.len(), 2);
    assert_eq!(honest.throughput_mtps.len(), 2);
    assert!(honest.throughput_mtps.iter().all(|&t| t > 0));
    assert_eq!((cheat.probes, cheat.answered), (2, 2));
    assert_eq!((cheat.spot_checks, cheat.spot_check_failures), (2, 2));
    assert_eq!(cheat.span, Some((1, 3)));
    for m in [&absent, &hidden, &garbled] {
        assert_eq!((m.probes, m.answered, m.spot_checks), (2, 0, 0), "{m:?}");
    }
    assert_eq!(
        hidden.probe_bytes(),
        0,
        "nothing sent to a node not in the DHT"
    );

    let s = scores(&[honest, cheat, absent, hidden, garbled], BLOCKS);
    let by_node: Vec<(u32, u64)> = s.iter().map(|s| (s.node, s.score)).collect();
    assert!(by_node[0].1 > 0, "{by_node:?}");
    assert!(by_node[1..].iter().all(|(_, s)| *s == 0), "{by_node:?}");

    me.shutdown().await;
    swarm.shutdown().await;
}
