//! Pushes: a step's outputs sent straight to the next server's session, so
//! a token crosses one link per server instead of a round trip to the
//! client per server (the message shapes are in `wire::message`).
//!
//! [`Pushes`] names this server's sessions that may be pushed to, and the
//! peers lately out of its own pushes' reach; a push stream from the
//! previous server ([`serve_pushes`]) drops each step into its session's
//! queue, and the session computes it as if the client had sent it.
//! [`Forwarder`] is one session's link to the next server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libp2p::{PeerId, Stream};
use p2p::InferenceStream;
use tokio::sync::mpsc;
use wire::{ErrorCode, FrameLimits, NextHop, Push, Request, Response, Step, WireTensor};

use crate::session::{Next, next, reply};
use crate::state::Shared;

/// Pushed steps a session may have waiting; a chain has one step in flight
/// per session, so more means a misbehaving pusher.
const QUEUE: usize = 4;

/// How long a push may take, opening its stream included, before the
/// client is told to send the outputs on itself. The client waits for this
/// answer before it learns that the next server may be gone, so it is short.
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a peer that could not be reached gets no pushes from any
/// session here. Servers behind NATs may never reach each other; without
/// this, each new session would wait out [`PUSH_TIMEOUT`] on its first step.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);

/// This server's sessions that accept pushes, by id, and the peers its own
/// pushes could not reach.
#[derive(Default)]
pub(crate) struct Pushes {
    sessions: Mutex<HashMap<u64, Entry>>,
    unreachable: Mutex<HashMap<PeerId, Instant>>,
}

/// A session as pushes find it.
struct Entry {
    queue: mpsc::Sender<Step>,
    /// Sequences per step, which a push must match.
    batch: usize,
}

/// A session's place in [`Pushes`]; leaves it on drop.
pub(crate) struct Registration {
    pushes: Arc<Pushes>,
    /// The id other servers push to.
    pub(crate) id: u64,
}

impl Pushes {
    /// Registers a session of `batch` sequences under a fresh random id:
    /// only servers its client names can find it.
    pub(crate) fn register(self: &Arc<Self>, batch: usize) -> (Registration, mpsc::Receiver<Step>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let id = loop {
            let id = rand::random::<u64>();
            if !sessions.contains_key(&id) {
                break id;
            }
        };
        sessions.insert(id, Entry { queue: tx, batch });
        let registration = Registration {
            pushes: self.clone(),
            id,
        };
        (registration, rx)
    }

    /// Queues a pushed step for its session, if its activations fit it
    /// (`[batch, tokens, hidden]`). A misfit is refused here, to the pusher:
    /// in the session it would fail a step on the client's stream, for a
    /// fault that is not the client's.
    fn deliver(&self, push: Push, hidden: usize) -> Response {
        let entry = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&push.session)
            .map(|e| (e.queue.clone(), e.batch));
        let unknown = || {
            Response::error(
                ErrorCode::UnknownSession,
                format!("no session {:#x} here", push.session),
            )
        };
        let Some((sender, batch)) = entry else {
            return unknown();
        };
        match push.step.hidden.hidden_dims(hidden) {
            Ok([b, ..]) if b == batch => {}
            Ok(dims) => {
                return Response::error(
                    ErrorCode::BadShape,
                    format!("the session has batch {batch}, the push {dims:?}"),
                );
            }
            Err(e) => return Response::error(ErrorCode::BadShape, e.to_string()),
        }
        match sender.try_send(push.step) {
            Ok(()) => Response::Pushed,
            Err(mpsc::error::TrySendError::Full(_)) => Response::error(
                ErrorCode::TooManyRequests,
                format!("{QUEUE} pushed steps already wait for this session"),
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => unknown(),
        }
    }

    /// Whether `peer` failed to take a push within [`UNREACHABLE_FOR`].
    fn is_unreachable(&self, peer: &PeerId) -> bool {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match unreachable.get(peer) {
            Some(since) if since.elapsed() < UNREACHABLE_FOR => true,
            Some(_) => {
                unreachable.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Notes that `peer` could not be reached just now.
    fn mark_unreachable(&self, peer: PeerId) {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bounded by the peers this server's clients name; forget the
        // expired ones whenever a new one is added.
        unreachable.retain(|_, since| since.elapsed() < UNREACHABLE_FOR);
        unreachable.insert(peer, Instant::now());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.pushes
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Serves a push stream: `first`, then every further push on it, each
/// acknowledged once queued (not once computed: the session answers its
/// own client).
pub(crate) async fn serve_pushes(shared: &Shared, stream: &mut Stream, first: Push) {
    let mut push = first;
    loop {
        let response = shared.pushes.deliver(push, shared.hidden);
        if matches!(response, Response::Pushed) {
            shared.metrics.push("received");
        }
        if reply(shared, stream, response).await.is_err() {
            return;
        }
        push = loop {
            match next(shared, stream).await {
                Next::Request(Request::Push(p)) => break p,
                Next::Request(_) => {
                    let refusal =
                        Response::error(ErrorCode::BadRequest, "a push stream carries only pushes");
                    if reply(shared, stream, refusal).await.is_err() {
                        return;
                    }
                }
                Next::Skipped => {}
                Next::End => return,
            }
        };
    }
}

/// Why a push did not get through.
enum PushError {
    /// No stream, no answer in time, or the link died: the peer is taken
    /// as unreachable for a while.
    Unreachable(String),
    /// The peer answered, refusing it (its session may be gone).
    Refused(String),
}

/// One session's link to the server after it, kept across steps.
#[derive(Default)]
pub(crate) struct Forwarder {
    link: Option<InferenceStream>,
}

impl Forwarder {
    /// Pushes a step's outputs (`hidden`, the step at `position`) to the
    /// first of `next`, with the rest of the chain; whether it got there.
    pub(crate) async fn forward(
        &mut self,
        shared: &Shared,
        next: &[NextHop],
        position: u32,
        hidden: &WireTensor,
    ) -> bool {
        let Some((first, rest)) = next.split_first() else {
            return false;
        };
        let push = Request::Push(Push {
            session: first.session,
            step: Step {
                position,
                hidden: hidden.clone(),
                next: rest.to_vec(),
            },
        });
        let Ok(peer) = PeerId::from_bytes(&first.peer) else {
            tracing::debug!("not pushing to a malformed peer id");
            return false;
        };
        if shared.pushes.is_unreachable(&peer) {
            shared.metrics.push("skipped");
            return false;
        }
        let sent = tokio::time::timeout(PUSH_TIMEOUT, self.send(shared, peer, &push))
            .await
            .unwrap_or_else(|_| {
                let why = format!("no answer within {PUSH_TIMEOUT:?}");
                Err(PushError::Unreachable(why))
            });
        let why = match sent {
            Ok(()) => {
                shared.metrics.push("sent");
                return true;
            }
            Err(PushError::Refused(why)) => why,
            Err(PushError::Unreachable(why)) => {
                self.link = None;
                shared.pushes.mark_unreachable(peer);
                why
            }
        };
        tracing::debug!(%peer, "push failed, the client sends on: {why}");
        shared.metrics.push("failed");
        false
    }

    async fn send(
        &mut self,
        shared: &Shared,
        peer: PeerId,
        push: &Request,
    ) -> Result<(), PushError> {
        let unreachable = |e: &dyn std::fmt::Display| PushError::Unreachable(e.to_string());
        let response = match self.link.as_mut() {
            Some(link) if link.peer() == peer => {
                link.call(push).await.map_err(|e| unreachable(&e))?
            }
            _ => {
                let limits = FrameLimits {
                    max_frame_bytes: shared.limits.max_frame_bytes,
                };
                let (link, response) = shared
                    .node
                    .open_inference_with(peer, limits, push)
                    .await
                    .map_err(|e| unreachable(&e))?;
                self.link = Some(link);
                response
            }
        };
        match response {
            Response::Pushed => Ok(()),
            Response::Error(e) => Err(PushError::Refused(e.to_string())),
            _ => Err(PushError::Refused("an unexpected answer to a push".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Compression;

    const HIDDEN: usize = 8;

    fn push(session: u64, width: usize) -> Push {
        Push {
            session,
            step: Step {
                position: 0,
                hidden: WireTensor::encode(&vec![0.0; width], &[1, 1, width], Compression::None)
                    .unwrap(),
                next: Vec::new(),
            },
        }
    }

    fn code(r: Response) -> ErrorCode {
        match r {
            Response::Error(e) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn pushes_queue_until_full_and_end_with_their_session() {
        let pushes = Arc::new(Pushes::default());
        let (registration, mut queue) = pushes.register(1);
        let id = registration.id;
        for _ in 0..QUEUE {
            assert_eq!(pushes.deliver(push(id, HIDDEN), HIDDEN), Response::Pushed);
        }
        assert_eq!(
            code(pushes.deliver(push(id, HIDDEN), HIDDEN)),
            ErrorCode::TooManyRequests
        );
        // Taking one makes room for one.
        assert!(queue.try_recv().is_ok());
        assert_eq!(pushes.deliver(push(id, HIDDEN), HIDDEN), Response::Pushed);
        assert_eq!(
            code(pushes.deliver(push(id, HIDDEN + 1), HIDDEN)),
            ErrorCode::BadShape
        );
        let (other, _queue) = pushes.register(2);
        assert_ne!(other.id, id);
        assert_eq!(
            code(pushes.deliver(push(other.id, HIDDEN), HIDDEN)),
            ErrorCode::BadShape,
            "a batch-2 session takes only batch-2 pushes"
        );
        drop(registration);
        assert_eq!(
            code(pushes.deliver(push(id, HIDDEN), HIDDEN)),
            ErrorCode::UnknownSession
        );
    }
}
