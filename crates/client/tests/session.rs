//! Sessions through servers on 127.0.0.1 over a tiny random model: the chain
//! computes what one process would, survives a server that vanishes
//! mid-session or stops answering, and names the blocks nobody serves; the
//! client's view of the swarm answers from its cache while it refreshes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use client::{BanList, ClientError, InferenceSession, SessionConfig, SwarmView};
use model::testing::max_diff;
use model::{BlockSpan, Checkpoint, LoadOptions};
use p2p::NodeHandle;
use p2p::testing::{eventually, local_node};
use server::testing::{MODEL, config, tiny_model};
use server::{Server, SpanChoice};

const BLOCKS: u32 = 6;
const H: usize = model::testing::HIDDEN;

struct Swarm {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    boot: NodeHandle,
    local: BlockSpan,
    /// Each server with the node it runs on, so a test can pull the plug.
    servers: Vec<(Server, NodeHandle)>,
    view: SwarmView,
}

async fn swarm(spans: &[(u32, u32)]) -> Swarm {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS as usize);
    let boot = local_node(None).await;
    let mut servers = Vec::new();
    for &(a, b) in spans {
        let node = local_node(Some(&boot)).await;
        let server = Server::start(config(&path, SpanChoice::Fixed(a, b)), node.clone())
            .await
            .unwrap();
        servers.push((server, node));
    }
    let view = SwarmView::new(local_node(Some(&boot)).await, MODEL, BLOCKS);
    online(&view, spans.len()).await;
    let local = Checkpoint::open(&path)
        .unwrap()
        .load_span(0..BLOCKS as usize, &LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    Swarm {
        _dir: dir,
        path,
        boot,
        local,
        servers,
        view,
    }
}

/// Waits until `n` servers are announced online.
async fn online(view: &SwarmView, n: usize) {
    eventually(20, || async {
        view.invalidate().await;
        (view.candidates().await.unwrap().len() == n).then_some(())
    })
    .await;
}

fn bans() -> Arc<Mutex<BanList>> {
    Arc::new(Mutex::new(BanList::new(
        Duration::from_secs(60),
        Duration::from_secs(60),
    )))
}

fn config_of(max_length: u32) -> SessionConfig {
    SessionConfig {
        max_length,
        ..SessionConfig::default()
    }
}

fn inputs() -> Vec<Tensor> {
    let mut xs = vec![Tensor::randn(0f32, 1.0, (1, 5, H), &Device::Cpu).unwrap()];
    for _ in 0..6 {
        xs.push(Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap());
    }
    xs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_servers_computes_what_one_process_does() {
    let s = swarm(&[(0, 2), (2, 4), (4, 6)]).await;
    let mut session = InferenceSession::open(s.view.clone(), bans(), config_of(32))
        .await
        .unwrap();
    let route: Vec<_> = session.route().iter().map(|h| h.span.to_string()).collect();
    assert_eq!(route, ["0:2", "2:4", "4:6"]);
    let mut cache = s.local.new_cache(32);
    for x in inputs() {
        let want = s.local.forward(&x, &mut cache).unwrap();
        let got = session.step(&x).await.unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }
    assert_eq!(session.position(), 11);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_is_replaced_and_its_inputs_replayed() {
    let s = swarm(&[(0, 3), (3, 6), (3, 6)]).await;
    let mut session = InferenceSession::open(s.view.clone(), bans(), config_of(32))
        .await
        .unwrap();
    let mut cache = s.local.new_cache(32);
    let xs = inputs();
    for x in &xs[..4] {
        let want = s.local.forward(x, &mut cache).unwrap();
        assert!(max_diff(&session.step(x).await.unwrap(), &want) < 1e-5);
    }
    // Pull the plug on the server carrying blocks 3:6: no goodbye, its
    // connections just drop.
    let victim = session.route()[1].peer;
    let (_, node) = s
        .servers
        .iter()
        .find(|(_, n)| n.peer_id() == victim)
        .unwrap();
    node.shutdown().await;
    // The swarm task has stopped; its connections close on their own tasks
    // a moment later. Step only once the client has seen them go, or a step
    // could still reach the victim.
    eventually(10, || async {
        let peers = s.view.node().connected_peers().await.ok()?;
        (!peers.contains(&victim)).then_some(())
    })
    .await;
    for x in &xs[4..] {
        let want = s.local.forward(x, &mut cache).unwrap();
        assert!(max_diff(&session.step(x).await.unwrap(), &want) < 1e-5);
    }
    assert_eq!(session.failures(), 1);
    assert_ne!(session.route()[1].peer, victim);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blocks_are_named_and_bad_inputs_refused() {
    let s = swarm(&[(0, 2), (4, 6)]).await;
    let err = InferenceSession::open(s.view.clone(), bans(), config_of(32))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::NoRoute { missing, .. } if missing == "2:4"),
        "{err}"
    );

    let s = swarm(&[(0, 6)]).await;
    let mut session = InferenceSession::open(s.view.clone(), bans(), config_of(4))
        .await
        .unwrap();
    let flat = Tensor::zeros((5, H), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        session.step(&flat).await,
        Err(ClientError::InvalidRequest(_))
    ));
    let long = Tensor::zeros((1, 5, H), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        session.step(&long).await,
        Err(ClientError::InvalidRequest(_))
    ));
    // A width the server refuses is the client's fault: no failover.
    let wide = Tensor::zeros((1, 1, H + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        session.step(&wide).await,
        Err(ClientError::Server {
            code: wire::ErrorCode::BadShape,
            ..
        })
    ));
    assert_eq!(session.failures(), 0);
    let x = Tensor::zeros((1, 2, H), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(session.step(&x).await.is_ok());
}

/// A peer that announces `span`, accepts sessions and then never answers a
/// step: a server stalled without closing its streams.
async fn stalled_server(boot: &NodeHandle, span: wire::Span) -> NodeHandle {
    use futures::StreamExt;
    use p2p::inference::protocol::{read_frame, write_frame};
    use wire::{FrameLimits, Request, Response, ServerInfo, ServerState, Throughput};

    let node = local_node(Some(boot)).await;
    let info = ServerInfo {
        model: MODEL.into(),
        num_blocks: BLOCKS,
        span,
        state: ServerState::Online,
        throughput: Throughput {
            inference_rps: 1e6,
            forward_rps: 1e6,
            network_rps: 1e6,
        },
        cache_tokens_left: 1 << 16,
        max_length: 2048,
        dtype: "f32".into(),
        quantization: "F32".into(),
        version: "test".into(),
        wire_version: wire::WIRE_VERSION,
        addrs: vec![],
        using_relay: false,
        next_pings: vec![],
        expires_at_ms: p2p::now_ms() + 60_000,
    };
    let keys = (span.start..span.end)
        .map(|i| p2p::record::block_key(MODEL, i))
        .collect();
    node.announce(info, keys, vec![]).await.unwrap();
    let mut incoming = node.accept_inference().unwrap();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let limits = FrameLimits::default();
                while let Ok(Some(request)) = read_frame(&mut stream, &limits).await {
                    if matches!(request, Request::Open(_)) {
                        let opened = Response::Opened {
                            max_length: 2048,
                            session: 1,
                        };
                        let _ = write_frame(&mut stream, &opened).await;
                    }
                }
            });
        }
    });
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_replaced_after_the_request_timeout() {
    // The stalled peer is the only one with blocks 3:6 when the session
    // opens, so the route goes through it; a real server joins after.
    let s = swarm(&[(0, 3)]).await;
    let stalled = stalled_server(&s.boot, wire::Span::new(3, BLOCKS).unwrap()).await;
    online(&s.view, 2).await;
    // Above the servers' one-second bound on a push: the server before the
    // stalled one waits that long on its push first.
    let session_config = SessionConfig {
        request_timeout: Duration::from_secs(2),
        ..config_of(32)
    };
    let mut session = InferenceSession::open(s.view.clone(), bans(), session_config)
        .await
        .unwrap();
    assert_eq!(session.route()[1].peer, stalled.peer_id());
    let node = local_node(Some(&s.boot)).await;
    let _replacement = Server::start(config(&s.path, SpanChoice::Fixed(3, BLOCKS)), node)
        .await
        .unwrap();
    online(&s.view, 3).await;
    let mut cache = s.local.new_cache(32);
    for x in inputs() {
        let want = s.local.forward(&x, &mut cache).unwrap();
        assert!(max_diff(&session.step(&x).await.unwrap(), &want) < 1e-5);
    }
    assert_eq!(session.failures(), 1);
    assert!(session.route().iter().all(|h| h.peer != stalled.peer_id()));
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_announce_their_activation_precision_and_a_route_that_mixes_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS as usize);
    let boot = local_node(None).await;
    let f32_server = server::testing::start(&boot, config(&path, SpanChoice::Fixed(0, 3))).await;
    let mut q8 = config(&path, SpanChoice::Fixed(3, 6));
    q8.load.precision = model::Precision::Q8;
    let q8_server = server::testing::start(&boot, q8).await;
    let view = SwarmView::new(local_node(Some(&boot)).await, MODEL, BLOCKS);
    online(&view, 2).await;

    let mut session = InferenceSession::open(view.clone(), bans(), config_of(64))
        .await
        .unwrap();
    let route = session.route();
    let named = |others: Vec<(client::Hop, String)>| {
        others
            .into_iter()
            .map(|(hop, dtype)| (hop.span.start, dtype))
            .collect::<Vec<_>>()
    };
    let f32_client = view.hops_not_computing_in(&route, "f32").await.unwrap();
    assert_eq!(named(f32_client), [(3, "q8".to_string())]);
    let q8_client = view.hops_not_computing_in(&route, "q8").await.unwrap();
    assert_eq!(named(q8_client), [(0, "f32".to_string())]);
    // Mixed precisions still serve.
    let x = Tensor::randn(0f32, 1.0, (1, 2, H), &Device::Cpu).unwrap();
    assert!(session.step(&x).await.is_ok());
    session.close().await;
    f32_server.shutdown().await;
    q8_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_view_answers_at_once_and_refreshes_behind_the_caller() {
    let s = swarm(&[(0, 6)]).await;
    // Every answer is stale as soon as it is cached.
    let view =
        SwarmView::new(local_node(Some(&s.boot)).await, MODEL, BLOCKS).with_max_age(Duration::ZERO);
    online(&view, 1).await;
    let node = local_node(Some(&s.boot)).await;
    let _second = Server::start(config(&s.path, SpanChoice::Fixed(0, 6)), node)
        .await
        .unwrap();
    // The cached answer comes back without waiting for a lookup, even one
    // that would now find the second server...
    assert_eq!(view.candidates().await.unwrap().len(), 1);
    // ...and the lookup it started lands for later calls.
    eventually(20, || async {
        (view.candidates().await.unwrap().len() == 2).then_some(())
    })
    .await;
}
