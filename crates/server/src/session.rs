//! One inference stream's state machine, on the server's side.
//!
//! A stream starts with one request. `Open` turns it into a session: the
//! server reserves KV memory, then answers each step in order, whether its
//! client sent it or the previous server pushed it, until `Close`, the end
//! of the stream, or the idle timeout. `Push` makes it a push stream
//! ([`crate::push`]). `Forward`, `Backward` and `Info` get one response.
//! Every failure becomes an error frame; a malformed frame that leaves the
//! stream in sync keeps the session alive, and nothing a peer sends can reach
//! another session but the one it names by its random id.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use model::{BlockSpan, ModelError, SpanCache};
use p2p::inference::protocol::{FrameError, read_frame, write_frame};
use wire::{
    BackwardRequest, Compression, ErrorCode, ForwardRequest, FrameLimits, OpenSession, Request,
    Response, Span, Step, StepOutput, WireError, WireTensor,
};

use crate::compute::SessionCompute;
use crate::push::{Forwarder, serve_pushes};
use crate::state::Shared;

/// The largest first request read from a peer the gate refuses.
const REFUSED_FRAME_BYTES: usize = 64 * 1024;

/// What the next read gave, once bad frames are answered.
pub(crate) enum Next {
    Request(Request),
    /// A bad frame, already answered; the stream is still in sync.
    Skipped,
    /// The stream is over.
    End,
}

/// Serves one inbound stream to completion.
pub(crate) async fn serve_stream(shared: Arc<Shared>, peer: PeerId, mut stream: Stream) {
    if let Some(gate) = &shared.gate
        && let Err(why) = gate.admit(&peer).await
    {
        tracing::debug!(%peer, "refused: {why}");
        // Take the request off the wire first (within a small bound, since
        // nobody vouches for this peer): dropping a stream that is still
        // being written resets it, and the peer would see a reset instead
        // of the reason.
        let small = FrameLimits {
            max_frame_bytes: REFUSED_FRAME_BYTES,
        };
        let _ = tokio::time::timeout(
            shared.limits.idle_timeout,
            read_frame::<_, Request>(&mut stream, &small),
        )
        .await;
        let _ = reply(
            &shared,
            &mut stream,
            Response::error(ErrorCode::Forbidden, why),
        )
        .await;
        let _ = stream.close().await;
        return;
    }
    let Some(admission) = shared.admit(peer) else {
        let _ = reply(
            &shared,
            &mut stream,
            Response::error(
                ErrorCode::TooManyRequests,
                format!(
                    "at most {} concurrent streams per peer",
                    shared.limits.max_streams_per_peer
                ),
            ),
        )
        .await;
        let _ = stream.close().await;
        return;
    };
    let first = loop {
        match next(&shared, &mut stream).await {
            Next::Request(r) => break r,
            Next::Skipped => continue,
            Next::End => return,
        }
    };
    let response = match first {
        Request::Open(open) => {
            run_session(&shared, peer, &mut stream, open).await;
            // Free the slot before the peer can see the stream end: a peer
            // that waits for the end may then open another at once.
            drop(admission);
            let _ = stream.close().await;
            return;
        }
        Request::Push(push) => {
            serve_pushes(&shared, &mut stream, push).await;
            drop(admission);
            let _ = stream.close().await;
            return;
        }
        Request::Forward(f) => forward(&shared, f).await,
        Request::Backward(b) => backward(&shared, b).await,
        Request::Info => Response::Info(Box::new(shared.info())),
        Request::Step(_) | Request::Close => {
            Response::error(ErrorCode::BadRequest, "open a session before sending steps")
        }
    };
    let _ = reply(&shared, &mut stream, response).await;
    drop(admission);
    let _ = stream.close().await;
}

pub(crate) async fn reply<S: AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    response: Response,
) -> Result<(), FrameError> {
    if let Response::Error(e) = &response {
        shared.metrics.error(e.code);
    }
    write_frame(stream, &response).await
}

/// One frame read, before any answer.
enum Read {
    Request(Request),
    /// A bad frame, with the answer it gets and whether the stream ends.
    Bad {
        answer: Response,
        end: bool,
    },
    /// The stream is over.
    End,
}

/// Reads the next request, within the idle timeout, and answers a bad frame.
pub(crate) async fn next(shared: &Shared, stream: &mut Stream) -> Next {
    let read = tokio::time::timeout(shared.limits.idle_timeout, read(shared, stream))
        .await
        .unwrap_or_else(|_| idle(shared));
    match read {
        Read::Request(request) => Next::Request(request),
        Read::End => Next::End,
        Read::Bad { answer, end } => {
            let _ = reply(shared, stream, answer).await;
            if end { Next::End } else { Next::Skipped }
        }
    }
}

async fn read<R: AsyncRead + Unpin>(shared: &Shared, stream: &mut R) -> Read {
    let limits = FrameLimits {
        max_frame_bytes: shared.limits.max_frame_bytes,
    };
    let (code, message, end) = match read_frame(stream, &limits).await {
        Ok(Some(request)) => return Read::Request(request),
        Ok(None) => return Read::End,
        Err(FrameError::Wire(e @ WireError::FrameTooLarge { .. })) => {
            (ErrorCode::PayloadTooLarge, e.to_string(), true)
        }
        Err(e) if e.is_recoverable() => (ErrorCode::BadRequest, e.to_string(), false),
        Err(e) => {
            tracing::debug!("stream ended: {e}");
            return Read::End;
        }
    };
    Read::Bad {
        answer: Response::error(code, message),
        end,
    }
}

fn idle(shared: &Shared) -> Read {
    Read::Bad {
        answer: idle_answer(shared),
        end: true,
    }
}

fn idle_answer(shared: &Shared) -> Response {
    Response::error(
        ErrorCode::IdleTimeout,
        format!("no request for {:?}", shared.limits.idle_timeout),
    )
}

/// Checks that `model` and `span` are served here; returns the weights to use.
fn resolve(shared: &Shared, model: &str, span: Span) -> Result<Arc<BlockSpan>, Response> {
    if model != shared.model_id {
        return Err(Response::error(
            ErrorCode::NotServed,
            format!("this server serves {}, not {model}", shared.model_id),
        ));
    }
    let weights = shared.span();
    let range = weights.range();
    if span.is_empty() || (span.start as usize) < range.start || span.end as usize > range.end {
        return Err(Response::error(
            ErrorCode::NotServed,
            format!(
                "blocks {span} are not within the served {}:{}",
                range.start, range.end
            ),
        ));
    }
    Ok(weights)
}

fn blocks(span: Span) -> Range<usize> {
    span.start as usize..span.end as usize
}

fn bad_shape(e: impl std::fmt::Display) -> Response {
    Response::error(ErrorCode::BadShape, e.to_string())
}

fn model_error(e: ModelError) -> Response {
    match e {
        ModelError::InputShape(m) => Response::error(ErrorCode::BadShape, m),
        e @ ModelError::ContextTooLong { .. } => Response::error(ErrorCode::TooLong, e.to_string()),
        e => {
            tracing::error!("compute failed: {e}");
            Response::error(ErrorCode::Internal, e.to_string())
        }
    }
}

/// Decodes `[batch, tokens, hidden]` activations into a tensor.
fn hidden_tensor(shared: &Shared, t: &WireTensor) -> Result<(Tensor, [usize; 3]), Response> {
    let (values, dims) = t.to_hidden(shared.hidden).map_err(bad_shape)?;
    let tensor = Tensor::from_vec(values, dims.to_vec(), &Device::Cpu).map_err(bad_shape)?;
    Ok((tensor, dims))
}

fn encode(shared: &Shared, t: &Tensor, compression: Compression) -> Result<WireTensor, Response> {
    let internal = |e: &dyn std::fmt::Display| Response::error(ErrorCode::Internal, e.to_string());
    let tampered;
    let t = if shared.corrupt {
        tampered = t.affine(1.0, 0.5).map_err(|e| internal(&e))?;
        &tampered
    } else {
        t
    };
    let values = t
        .flatten_all()
        .and_then(|f| f.to_vec1::<f32>())
        .map_err(|e| internal(&e))?;
    WireTensor::encode(&values, t.dims(), compression).map_err(|e| internal(&e))
}

/// What woke a session: its client, a push, or the idle timer.
enum Event {
    Read(Read),
    Pushed(Step),
    Idle,
}

async fn run_session(shared: &Arc<Shared>, peer: PeerId, stream: &mut Stream, open: OpenSession) {
    let opened = open_session(shared, &open);
    let (weights, _reservation) = match opened {
        Ok(ok) => ok,
        Err(response) => {
            let _ = reply(shared, stream, response).await;
            return;
        }
    };
    let (registration, mut pushed) = shared.pushes.register(open.batch as usize);
    let opened = Response::Opened {
        max_length: open.max_length,
        session: registration.id,
    };
    if reply(shared, stream, opened).await.is_err() {
        return;
    }
    tracing::debug!(%peer, span = %open.span, max_length = open.max_length, "session opened");
    let _open = shared.metrics.session();
    let mut cache = SpanCache::new(open.span.len() as usize, open.max_length as usize);
    let compute = shared.compute.session();
    let mut forwarder = Forwarder::default();
    // Steps come from the client's stream and from pushes, so reads must
    // survive a push winning the race: the half-read frame stays in the
    // stream below.
    let (reader, mut writer) = (&mut *stream).split();
    let reads = futures::stream::unfold(reader, |mut reader| async move {
        let frame = read(shared, &mut reader).await;
        Some((frame, reader))
    });
    let mut reads = std::pin::pin!(reads);
    let idle_timeout = shared.limits.idle_timeout;
    let mut idle_at = std::pin::pin!(tokio::time::sleep(idle_timeout));
    loop {
        let event = tokio::select! {
            frame = reads.next() => Event::Read(frame.unwrap_or(Read::End)),
            Some(step) = pushed.recv() => Event::Pushed(step),
            () = &mut idle_at => Event::Idle,
        };
        idle_at
            .as_mut()
            .reset(tokio::time::Instant::now() + idle_timeout);
        let step = match event {
            Event::Read(Read::Request(Request::Step(step))) | Event::Pushed(step) => step,
            Event::Read(Read::End | Read::Request(Request::Close)) => break,
            Event::Read(Read::Request(_)) => {
                let refusal = Response::error(
                    ErrorCode::BadRequest,
                    "a session stream carries only steps and close",
                );
                if reply(shared, &mut writer, refusal).await.is_err() {
                    break;
                }
                continue;
            }
            Event::Read(Read::Bad { answer, end }) => {
                if reply(shared, &mut writer, answer).await.is_err() || end {
                    break;
                }
                continue;
            }
            Event::Idle => {
                let _ = reply(shared, &mut writer, idle_answer(shared)).await;
                break;
            }
        };
        let session = SessionParts {
            compute: &compute,
            weights: &weights,
            open: &open,
            forwarder: &mut forwarder,
        };
        let response = match session_step(shared, session, &mut cache, step).await {
            Ok(r) | Err(r) => r,
        };
        if reply(shared, &mut writer, response).await.is_err() {
            break;
        }
    }
    tracing::debug!(%peer, "session closed");
}

fn open_session(
    shared: &Shared,
    open: &OpenSession,
) -> Result<(Arc<BlockSpan>, crate::budget::Reservation), Response> {
    let weights = resolve(shared, &open.model, open.span)?;
    let l = &shared.limits;
    if open.max_length == 0 || open.max_length > l.max_length {
        return Err(Response::error(
            ErrorCode::TooLong,
            format!(
                "max_length must be 1..={}, got {}",
                l.max_length, open.max_length
            ),
        ));
    }
    if open.batch == 0 || open.batch > l.max_batch {
        return Err(Response::error(
            ErrorCode::BadRequest,
            format!("batch must be 1..={}, got {}", l.max_batch, open.batch),
        ));
    }
    let tokens = u64::from(open.max_length) * u64::from(open.batch);
    let reservation = shared.budget.reserve(tokens).ok_or_else(|| {
        Response::error(
            ErrorCode::NoCapacity,
            format!(
                "cache budget exhausted: {tokens} positions asked, {} free",
                shared.budget.free()
            ),
        )
    })?;
    Ok((weights, reservation))
}

/// What a session's steps run with.
struct SessionParts<'a> {
    compute: &'a SessionCompute,
    weights: &'a Arc<BlockSpan>,
    open: &'a OpenSession,
    forwarder: &'a mut Forwarder,
}

async fn session_step(
    shared: &Shared,
    SessionParts {
        compute,
        weights,
        open,
        forwarder,
    }: SessionParts<'_>,
    cache: &mut SpanCache,
    step: Step,
) -> Result<Response, Response> {
    let (x, [b, t, _]) = hidden_tensor(shared, &step.hidden)?;
    if b != open.batch as usize {
        return Err(bad_shape(format!(
            "the session has batch {}, the step has {b}",
            open.batch
        )));
    }
    let position = step.position as usize;
    if position > cache.len() {
        return Err(Response::error(
            ErrorCode::BadRequest,
            format!(
                "step at position {position}, but the session holds {}",
                cache.len()
            ),
        ));
    }
    if position + t > open.max_length as usize {
        return Err(Response::error(
            ErrorCode::TooLong,
            format!(
                "{} positions exceed the session's max_length {}",
                position + t,
                open.max_length
            ),
        ));
    }
    // Replay after a failover or a rejected draft rewinds the cache.
    cache.truncate(position);
    let start = Instant::now();
    let owned = std::mem::replace(cache, SpanCache::new(0, 0));
    let (result, owned) = compute
        .step(weights.clone(), blocks(open.span), x, owned)
        .await
        .ok_or_else(|| Response::error(ErrorCode::Internal, "the compute worker stopped"))?;
    *cache = owned;
    let out = result.map_err(model_error)?;
    shared.metrics.computed("step", b * t, start);
    let hidden = encode(shared, &out, open.compression)?;
    // The next server's compute waits on this push; the client's answer
    // does not, so it goes second.
    let forwarded = forwarder
        .forward(shared, &step.next, step.position, &hidden)
        .await;
    Ok(Response::Step(StepOutput {
        position: step.position,
        forwarded,
        hidden,
    }))
}

async fn forward(shared: &Shared, req: ForwardRequest) -> Response {
    let run = async {
        let weights = resolve(shared, &req.model, req.span)?;
        let (x, [b, t, _]) = hidden_tensor(shared, &req.hidden)?;
        let _reservation = reserve_pass(shared, b, t)?;
        let range = blocks(req.span);
        let start = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            weights.forward_range(range.clone(), &x, &mut SpanCache::new(range.len(), t))
        })
        .await
        .map_err(|e| Response::error(ErrorCode::Internal, e.to_string()))?
        .map_err(model_error)?;
        shared.metrics.computed("forward", b * t, start);
        Ok(Response::Forward(encode(shared, &out, req.compression)?))
    };
    run.await.unwrap_or_else(|e| e)
}

async fn backward(shared: &Shared, req: BackwardRequest) -> Response {
    let run = async {
        let weights = resolve(shared, &req.model, req.span)?;
        let (x, [b, t, _]) = hidden_tensor(shared, &req.hidden)?;
        let (g, _) = hidden_tensor(shared, &req.grad_output)?;
        if g.dims() != x.dims() {
            return Err(bad_shape(format!(
                "grad_output {:?} must match hidden states {:?}",
                g.dims(),
                x.dims()
            )));
        }
        let _reservation = reserve_pass(shared, b, t)?;
        let range = blocks(req.span);
        let start = Instant::now();
        let grad = tokio::task::spawn_blocking(move || weights.backward_range(range, &x, &g))
            .await
            .map_err(|e| Response::error(ErrorCode::Internal, e.to_string()))?
            .map_err(model_error)?;
        shared.metrics.computed("backward", b * t, start);
        Ok(Response::Backward(encode(shared, &grad, req.compression)?))
    };
    run.await.unwrap_or_else(|e| e)
}

/// A stateless pass holds its activations for its duration: count them
/// against the same budget as session caches.
fn reserve_pass(
    shared: &Shared,
    batch: usize,
    tokens: usize,
) -> Result<crate::budget::Reservation, Response> {
    if tokens > shared.limits.max_length as usize || batch > shared.limits.max_batch as usize {
        return Err(Response::error(
            ErrorCode::TooLong,
            format!(
                "{batch}x{tokens} exceeds the limits (batch {}, length {})",
                shared.limits.max_batch, shared.limits.max_length
            ),
        ));
    }
    shared
        .budget
        .reserve((batch * tokens) as u64)
        .ok_or_else(|| Response::error(ErrorCode::NoCapacity, "cache budget exhausted"))
}
