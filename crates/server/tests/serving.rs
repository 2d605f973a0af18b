//! A block server on 127.0.0.1 answers sessions, forward, backward and info
//! exactly as local compute would, and turns every bad request into an error
//! frame without disturbing other sessions.

mod common;

use std::time::Duration;

use candle_core::{Device, Tensor};
use common::*;
use model::testing::max_diff;
use model::{Checkpoint, LoadOptions, SpanCache};
use p2p::{InferenceStream, NodeHandle};
use server::{Server, SpanChoice};
use wire::{
    BackwardRequest, Compression, ErrorCode, ForwardRequest, FrameLimits, NextHop, OpenSession,
    Push, Request, Response, Span, Step, StepOutput, WireTensor,
};

const BLOCKS: usize = 4;
const H: usize = model::testing::HIDDEN;

fn wire_tensor(t: &Tensor) -> WireTensor {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    WireTensor::encode(&v, t.dims(), Compression::None).unwrap()
}

fn tensor(w: &WireTensor) -> Tensor {
    Tensor::from_vec(w.to_f32().unwrap(), w.dims(), &Device::Cpu).unwrap()
}

fn open(span: Span, max_length: u32) -> Request {
    Request::Open(OpenSession {
        model: MODEL.into(),
        span,
        max_length,
        batch: 1,
        compression: Compression::None,
    })
}

fn step(position: u32, x: &Tensor) -> Request {
    Request::Step(Step {
        position,
        hidden: wire_tensor(x),
        next: Vec::new(),
    })
}

fn error_code(r: Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn output(r: Response) -> Tensor {
    match r {
        Response::Step(StepOutput { hidden: t, .. })
        | Response::Forward(t)
        | Response::Backward(t) => tensor(&t),
        other => panic!("expected a tensor, got {other:?}"),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ckpt: Checkpoint,
    client: NodeHandle,
    server: Server,
    /// The server's node, kept running after the server shuts down.
    _server_node: NodeHandle,
    peer: p2p::PeerId,
}

async fn fixture(limits: impl FnOnce(&mut server::Limits)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS);
    let boot = node(None).await;
    let mut c = config(&path, SpanChoice::Fixed(0, BLOCKS as u32));
    limits(&mut c.limits);
    let server_node = node(Some(&boot)).await;
    let server = Server::start(c, server_node.clone()).await.unwrap();
    let client = node(Some(&boot)).await;
    let peer = server_peer(&client).await;
    Fixture {
        ckpt: Checkpoint::open(&path).unwrap(),
        _dir: dir,
        client,
        server,
        _server_node: server_node,
        peer,
    }
}

async fn server_peer(client: &NodeHandle) -> p2p::PeerId {
    eventually(10, || async {
        let found = client.find_servers(MODEL, BLOCKS as u32).await.unwrap();
        found.first().map(|(p, _)| *p)
    })
    .await
}

impl Fixture {
    async fn stream(&self) -> InferenceStream {
        self.client
            .open_inference(self.peer, FrameLimits::default())
            .await
            .unwrap()
    }
}

/// The step's output, whether it was pushed on, and the position it answers.
fn step_output(r: Response) -> (Tensor, bool, u32) {
    match r {
        Response::Step(StepOutput {
            position,
            forwarded,
            hidden,
        }) => (tensor(&hidden), forwarded, position),
        other => panic!("expected a step's output, got {other:?}"),
    }
}

fn pushing_step(position: u32, x: &Tensor, to: &NodeHandle, session: u64) -> Request {
    Request::Step(Step {
        position,
        hidden: wire_tensor(x),
        next: vec![NextHop {
            peer: to.peer_id().to_bytes(),
            session,
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_is_pushed_to_the_next_server_and_answered_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS);
    let boot = node(None).await;
    let (first_node, second_node) = (node(Some(&boot)).await, node(Some(&boot)).await);
    let half = BLOCKS as u32 / 2;
    let first = Server::start(
        config(&path, SpanChoice::Fixed(0, half)),
        first_node.clone(),
    )
    .await
    .unwrap();
    let second_blocks = SpanChoice::Fixed(half, BLOCKS as u32);
    let second = Server::start(config(&path, second_blocks), second_node.clone())
        .await
        .unwrap();
    let client = node(Some(&boot)).await;
    // Learn both servers' addresses, as a client does from their records.
    eventually(10, || async {
        let found = client.find_servers(MODEL, BLOCKS as u32).await.unwrap();
        (found.len() == 2).then_some(())
    })
    .await;
    let local = Checkpoint::open(&path)
        .unwrap()
        .load_span(0..BLOCKS, &LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let limits = FrameLimits::default();
    let (first_peer, second_peer) = (first_node.peer_id(), second_node.peer_id());
    let (mut a, _) = client
        .open_inference_with(first_peer, limits, &open(Span::new(0, half).unwrap(), 16))
        .await
        .unwrap();
    let second_span = Span::new(half, BLOCKS as u32).unwrap();
    let (mut b, opened) = client
        .open_inference_with(second_peer, limits, &open(second_span, 16))
        .await
        .unwrap();
    let Response::Opened { session, .. } = opened else {
        panic!("expected Opened, got {opened:?}")
    };

    // The first server answers its client and pushes; the second answers
    // the client without having heard from it.
    let prompt = Tensor::randn(0f32, 1.0, (1, 5, H), &Device::Cpu).unwrap();
    let mut cache = local.new_cache(16);
    let want = local.forward(&prompt, &mut cache).unwrap();
    let want_first = local
        .forward_range(0..half as usize, &prompt, &mut SpanCache::new(2, 16))
        .unwrap();
    let (got, forwarded, _) = step_output(
        a.call(&pushing_step(0, &prompt, &second_node, session))
            .await
            .unwrap(),
    );
    assert!(forwarded);
    assert!(max_diff(&got, &want_first) < 1e-5);
    let (got, forwarded, position) = step_output(b.recv().await.unwrap());
    assert_eq!((forwarded, position), (false, 0));
    assert!(max_diff(&got, &want) < 1e-5);
    let pushes = |s: &Server, outcome: &str| {
        let line = format!("hypertensor_server_pushes_total{{outcome=\"{outcome}\"}} 1");
        s.metrics().render().contains(&line)
    };
    assert!(pushes(&first, "sent") && pushes(&second, "received"));

    // A push to a session that is not there fails: the first server says
    // so, and the client sends the step on itself.
    let next = Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap();
    let want = local.forward(&next, &mut cache).unwrap();
    let wrong = session.wrapping_add(1);
    let (mid, forwarded, _) = step_output(
        a.call(&pushing_step(5, &next, &second_node, wrong))
            .await
            .unwrap(),
    );
    assert!(!forwarded);
    assert!(pushes(&first, "failed"));
    let (got, _, position) = step_output(b.call(&step(5, &mid)).await.unwrap());
    assert_eq!(position, 5);
    assert!(max_diff(&got, &want) < 1e-5);

    // Anyone can ask; only a live session's id is let through, and only
    // with activations that fit it. The session carries on.
    let push = |session: u64, x: &Tensor| {
        Request::Push(Push {
            session,
            step: Step {
                position: 6,
                hidden: wire_tensor(x),
                next: Vec::new(),
            },
        })
    };
    let (_, refused) = client
        .open_inference_with(second_peer, limits, &push(wrong, &next))
        .await
        .unwrap();
    assert_eq!(error_code(refused), ErrorCode::UnknownSession);
    let wide = Tensor::zeros((1, 1, H + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (_, refused) = client
        .open_inference_with(second_peer, limits, &push(session, &wide))
        .await
        .unwrap();
    assert_eq!(error_code(refused), ErrorCode::BadShape);
    let after = Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap();
    let want = local.forward(&after, &mut cache).unwrap();
    let (mid, _, _) = step_output(a.call(&step(6, &after)).await.unwrap());
    let (got, _, _) = step_output(b.call(&step(6, &mid)).await.unwrap());
    assert!(max_diff(&got, &want) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_next_server_is_not_pushed_to_again() {
    let f = fixture(|_| {}).await;
    let whole = Span::new(0, BLOCKS as u32).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap();
    let nowhere = NextHop {
        peer: p2p::PeerId::random().to_bytes(),
        session: 1,
    };
    for _session in 0..2 {
        let mut s = f.stream().await;
        s.call(&open(whole, 8)).await.unwrap();
        for position in 0..2 {
            let step = Request::Step(Step {
                position,
                hidden: wire_tensor(&x),
                next: vec![nowhere.clone()],
            });
            let (_, forwarded, _) = step_output(s.call(&step).await.unwrap());
            assert!(!forwarded);
        }
        s.close().await;
    }
    // Tried once: the other steps, in this session or the next, did not
    // wait on it again.
    let metrics = f.server.metrics().render();
    for line in [
        r#"hypertensor_server_pushes_total{outcome="failed"} 1"#,
        r#"hypertensor_server_pushes_total{outcome="skipped"} 3"#,
        // Every step's wait for the compute worker, apart from its run.
        "hypertensor_server_queue_wait_seconds_count 4",
        "hypertensor_server_compute_duration_seconds_count 4",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_steps_match_local_compute() {
    let f = fixture(|_| {}).await;
    let local = f
        .ckpt
        .load_span(0..BLOCKS, &LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let prompt = Tensor::randn(0f32, 1.0, (1, 5, H), &Device::Cpu).unwrap();
    let next = Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap();

    // Whole span as a session: prompt, then one decode step.
    let mut s = f.stream().await;
    let whole = Span::new(0, BLOCKS as u32).unwrap();
    assert!(matches!(
        s.call(&open(whole, 32)).await.unwrap(),
        Response::Opened { max_length: 32, .. }
    ));
    let mut cache = local.new_cache(32);
    let want = local.forward(&prompt, &mut cache).unwrap();
    assert!(max_diff(&output(s.call(&step(0, &prompt)).await.unwrap()), &want) < 1e-5);
    let want = local.forward(&next, &mut cache).unwrap();
    assert!(max_diff(&output(s.call(&step(5, &next)).await.unwrap()), &want) < 1e-5);
    // Replaying from position 5 rewinds the server's cache: same answer.
    assert!(max_diff(&output(s.call(&step(5, &next)).await.unwrap()), &want) < 1e-5);
    s.close().await;

    // A sub-span, and the stateless forward and backward passes.
    let sub = Span::new(1, 3).unwrap();
    let mut s = f.stream().await;
    s.call(&open(sub, 16)).await.unwrap();
    let want = local
        .forward_range(1..3, &prompt, &mut SpanCache::new(2, 16))
        .unwrap();
    assert!(max_diff(&output(s.call(&step(0, &prompt)).await.unwrap()), &want) < 1e-5);
    let mut s = f.stream().await;
    let fwd = Request::Forward(ForwardRequest {
        model: MODEL.into(),
        span: sub,
        hidden: wire_tensor(&prompt),
        compression: Compression::F16,
    });
    assert!(max_diff(&output(s.call(&fwd).await.unwrap()), &want) < 2e-2);
    let g = Tensor::randn(0f32, 1.0, (1, 5, H), &Device::Cpu).unwrap();
    let mut s = f.stream().await;
    let bwd = Request::Backward(BackwardRequest {
        model: MODEL.into(),
        span: sub,
        hidden: wire_tensor(&prompt),
        grad_output: wire_tensor(&g),
        compression: Compression::None,
    });
    let want = local.backward_range(1..3, &prompt, &g).unwrap();
    assert!(max_diff(&output(s.call(&bwd).await.unwrap()), &want) < 1e-4);

    let metrics = f.server.metrics().render();
    for line in [
        "hypertensor_server_sessions_opened_total 2",
        r#"hypertensor_server_requests_total{kind="step"} 4"#,
        r#"hypertensor_server_requests_total{kind="forward"} 1"#,
        r#"hypertensor_server_requests_total{kind="backward"} 1"#,
        // 5 + 1 + 1 + 5 session positions, 5 forward, 5 backward
        "hypertensor_server_tokens_total 22",
        "hypertensor_server_span_end 4",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    let mut s = f.stream().await;
    match s.call(&Request::Info).await.unwrap() {
        Response::Info(info) => {
            assert_eq!(info.span, whole);
            assert_eq!(info.state, wire::ServerState::Online);
            assert_eq!(info.quantization, "Q4_1");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_frames_and_other_sessions_continue() {
    let f = fixture(|l| {
        l.max_length = 64;
        l.cache_tokens = 100;
        l.max_frame_bytes = 64 * 1024;
        l.max_streams_per_peer = 4;
    })
    .await;
    let whole = Span::new(0, BLOCKS as u32).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, H), &Device::Cpu).unwrap();
    // A healthy session that must be unaffected by everything below.
    let mut good = f.stream().await;
    good.call(&open(whole, 32)).await.unwrap();
    let first = output(good.call(&step(0, &x)).await.unwrap());

    let mut s = f.stream().await;
    let mut o = OpenSession {
        model: "nope".into(),
        span: whole,
        max_length: 16,
        batch: 1,
        compression: Compression::None,
    };
    assert_eq!(
        error_code(s.call(&Request::Open(o.clone())).await.unwrap()),
        ErrorCode::NotServed
    );
    let mut s = f.stream().await;
    o.model = MODEL.into();
    o.span = Span { start: 2, end: 9 };
    assert_eq!(
        error_code(s.call(&Request::Open(o.clone())).await.unwrap()),
        ErrorCode::NotServed
    );
    let mut s = f.stream().await;
    o.span = whole;
    o.max_length = 10_000;
    assert_eq!(
        error_code(s.call(&Request::Open(o.clone())).await.unwrap()),
        ErrorCode::TooLong
    );
    let mut s = f.stream().await;
    o.max_length = 64;
    o.batch = 2; // 128 positions > the 100-position budget (32 already held)
    assert_eq!(
        error_code(s.call(&Request::Open(o.clone())).await.unwrap()),
        ErrorCode::NoCapacity
    );
    let mut s = f.stream().await;
    assert_eq!(
        error_code(s.call(&step(0, &x)).await.unwrap()),
        ErrorCode::BadRequest
    );

    // Inside a session: garbage, wrong width, wrong rank, position ahead,
    // past max_length; the session survives all of them.
    let mut s = f.stream().await;
    s.call(&open(whole, 8)).await.unwrap();
    s.send_raw(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
    assert_eq!(error_code(s.recv().await.unwrap()), ErrorCode::BadRequest);
    let wide = Tensor::zeros((1, 1, H + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        error_code(s.call(&step(0, &wide)).await.unwrap()),
        ErrorCode::BadShape
    );
    let flat = WireTensor::encode(&[0.0; H], &[H], Compression::None).unwrap();
    let flat_step = Request::Step(Step {
        position: 0,
        hidden: flat,
        next: Vec::new(),
    });
    assert_eq!(
        error_code(s.call(&flat_step).await.unwrap()),
        ErrorCode::BadShape
    );
    let mut lying = wire_tensor(&x);
    lying.shape = vec![1, 4, H as u32];
    let lying_step = Request::Step(Step {
        position: 0,
        hidden: lying,
        next: Vec::new(),
    });
    assert_eq!(
        error_code(s.call(&lying_step).await.unwrap()),
        ErrorCode::BadShape
    );
    assert_eq!(
        error_code(s.call(&step(5, &x)).await.unwrap()),
        ErrorCode::BadRequest
    );
    let long = Tensor::zeros((1, 9, H), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        error_code(s.call(&step(0, &long)).await.unwrap()),
        ErrorCode::TooLong
    );
    assert!(max_diff(&output(s.call(&step(0, &x)).await.unwrap()), &first) < 1e-6);

    // An oversized frame ends that stream, and only that stream. The server
    // answers from the length prefix alone and drops the stream, so the rest
    // of the frame may meet a reset before it is all out (seen under load):
    // then the answer is lost with the stream, but it was sent.
    let sent = s.send_raw(&vec![0u8; 65 * 1024]).await;
    match s.recv().await {
        Ok(answer) => assert_eq!(error_code(answer), ErrorCode::PayloadTooLarge),
        Err(e) => assert!(sent.is_err(), "the frame went out but no answer came: {e}"),
    }
    assert!(s.recv().await.is_err());
    let metrics = f.server.metrics().render();
    let line = r#"hypertensor_server_errors_total{code="PayloadTooLarge"} 1"#;
    assert!(metrics.contains(line), "{line} not in {metrics}");

    // Per-peer concurrency: `good` plus 3 more streams is the limit.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut h = f.stream().await;
        h.call(&open(whole, 1)).await.unwrap();
        held.push(h);
    }
    let mut over = f.stream().await;
    assert_eq!(
        error_code(over.recv().await.unwrap()),
        ErrorCode::TooManyRequests
    );
    drop(held);

    let y = Tensor::randn(0f32, 1.0, (1, 1, H), &Device::Cpu).unwrap();
    let mut cache = SpanCache::new(BLOCKS, 32);
    let local = f
        .ckpt
        .load_span(0..BLOCKS, &LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    local.forward(&x, &mut cache).unwrap();
    let want = local.forward(&y, &mut cache).unwrap();
    assert!(max_diff(&output(good.call(&step(3, &y)).await.unwrap()), &want) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_and_idle_clients_release_their_cache() {
    let f = fixture(|l| {
        l.idle_timeout = Duration::from_millis(300);
        l.cache_tokens = 64;
    })
    .await;
    let whole = Span::new(0, BLOCKS as u32).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 2, H), &Device::Cpu).unwrap();
    let mut s = f.stream().await;
    s.call(&open(whole, 64)).await.unwrap();
    s.call(&step(0, &x)).await.unwrap();
    assert_eq!(f.server.cache_tokens_left(), 0);
    drop(s); // the client vanishes mid-session
    eventually(10, || async {
        (f.server.cache_tokens_left() == 64).then_some(())
    })
    .await;

    let mut s = f.stream().await;
    s.call(&open(whole, 64)).await.unwrap();
    assert_eq!(error_code(s.recv().await.unwrap()), ErrorCode::IdleTimeout);
    eventually(10, || async {
        (f.server.cache_tokens_left() == 64).then_some(())
    })
    .await;
    let metrics = f.server.metrics().render();
    for line in [
        "hypertensor_server_sessions_opened_total 2",
        "hypertensor_server_sessions_active 0",
        r#"hypertensor_server_errors_total{code="IdleTimeout"} 1"#,
        "hypertensor_server_cache_tokens_left 64",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    f.server.shutdown().await;
    eventually(10, || async {
        let info = f.client.server_info(&f.peer).await.unwrap()?;
        (info.state == wire::ServerState::Offline).then_some(())
    })
    .await;
}

/// Eight sessions stepping at once (their decode steps meet in the compute
/// worker and run batched) each get exactly what they would alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_get_exact_results() {
    let f = fixture(|_| {}).await;
    let local = f
        .ckpt
        .load_span(0..BLOCKS, &LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let whole = Span::new(0, BLOCKS as u32).unwrap();
    let inputs: Vec<Vec<Tensor>> = (0..8)
        .map(|i| {
            (0..6)
                .map(|j| {
                    Tensor::randn(
                        0f32,
                        1.0,
                        (1, if j == 0 { 1 + i % 3 } else { 1 }, H),
                        &Device::Cpu,
                    )
                    .unwrap()
                })
                .collect()
        })
        .collect();
    let runs = inputs.iter().map(|xs| {
        let f = &f;
        async move {
            // Eight streams opened at once overflow the server's accept
            // buffer; `open_inference_with` reopens the ones it dropped.
            let (mut s, opened) = f
                .client
                .open_inference_with(f.peer, FrameLimits::default(), &open(whole, 32))
                .await
                .unwrap();
            assert!(matches!(opened, Response::Opened { .. }));
            let mut pos = 0;
            let mut outs = Vec::new();
            for x in xs {
                outs.push(output(s.call(&step(pos, x)).await.unwrap()));
                pos += x.dim(1).unwrap() as u32;
            }
            outs
        }
    });
    let results = futures::future::join_all(runs).await;
    for (xs, outs) in inputs.iter().zip(results) {
        let mut cache = local.new_cache(32);
        for (x, got) in xs.iter().zip(outs) {
            let want = local.forward(x, &mut cache).unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
        }
    }
}
