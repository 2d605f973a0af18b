//! An inference session across a chain of servers, with failover.
//!
//! Each leg of the chain remembers every input it was sent, one entry per
//! step. When a server fails (its stream dies, or it answers with an error),
//! the session bans it, routes its blocks anew, and replays those inputs to
//! the replacement step by step, exactly as they were first sent, so the
//! rebuilt KV cache is bit-for-bit the lost one and greedy output is the same
//! with a failure as without.
//!
//! A step names the sessions after each server, so each pushes its outputs
//! straight to the next (see `wire::message`). The client still reads every
//! server's answer, to keep the inputs for replay, and sends the inputs on
//! itself where a push did not get through.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use p2p::InferenceStream;
use wire::{
    Compression, FrameLimits, NextHop, OpenSession, Request, Response, Span, Step, StepOutput,
    WireTensor,
};

use crate::ban::BanList;
use crate::error::ClientError;
use crate::routing::{self, Hop};
use crate::swarm::SwarmView;

/// How a session talks to servers.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Longest sequence, in positions; servers reserve cache for it.
    pub max_length: u32,
    /// Encoding of hidden states on the wire. `None` (f32) keeps remote
    /// output identical to local compute.
    pub compression: Compression,
    /// Server failures tolerated over the session's life before giving up.
    pub max_failures: u32,
    /// Frame limits for the server's answers.
    pub limits: FrameLimits,
    /// How long one server may take to answer one request (opening a
    /// session or a step) before it counts as failed and is replaced: a
    /// server that stalls without closing its stream must not stall the
    /// session. Keep it well above a second: a server's answer may first
    /// wait up to a second on its push to the next server.
    pub request_timeout: Duration,
    /// Whether servers push each step's outputs to the next server, saving
    /// a round trip through the client per server.
    pub push: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_length: 2048,
            compression: Compression::None,
            max_failures: 8,
            limits: FrameLimits::default(),
            // As Petals' default: long enough for a long prompt's prefill
            // on a slow CPU server.
            request_timeout: Duration::from_secs(180),
            push: true,
        }
    }
}

/// One server's part of the chain.
struct Leg {
    hop: Hop,
    stream: InferenceStream,
    /// The server's id for this session, for the previous server's pushes.
    session: u64,
    /// Every input sent to this leg, one tensor per step, for replay.
    inputs: Vec<Tensor>,
}

impl Leg {
    /// Sends the step at `position` and reads its outputs, and whether the
    /// server pushed them to `next`.
    async fn step(
        &mut self,
        position: u32,
        x: &Tensor,
        next: Vec<NextHop>,
        config: &SessionConfig,
    ) -> Result<(Tensor, bool), ClientError> {
        let request = Request::Step(Step {
            position,
            hidden: encode(x, config.compression)?,
            next,
        });
        within(
            self.hop.peer,
            config.request_timeout,
            self.stream.send(&request),
        )
        .await?
        .map_err(p2p::P2pError::from)?;
        self.output(position, x.dims(), config).await
    }

    /// Reads the outputs of the step at `position`, sent or pushed, shaped
    /// like its inputs `dims`. Answers to earlier steps are stale (a step
    /// both pushed and replayed is answered twice) and skipped.
    async fn output(
        &mut self,
        position: u32,
        dims: &[usize],
        config: &SessionConfig,
    ) -> Result<(Tensor, bool), ClientError> {
        let peer = self.hop.peer;
        loop {
            let response = within(peer, config.request_timeout, self.stream.recv())
                .await?
                .map_err(p2p::P2pError::from)?;
            let StepOutput {
                position: answered,
                forwarded,
                hidden,
            } = match response {
                Response::Step(output) => output,
                other => return Err(unexpected(peer, other)),
            };
            if answered < position {
                continue;
            }
            if answered > position {
                return Err(ClientError::Protocol {
                    peer,
                    reason: format!("asked for position {position}, got {answered}"),
                });
            }
            let out = decode(&hidden)?;
            if out.dims() != dims {
                return Err(ClientError::Protocol {
                    peer,
                    reason: format!("sent {dims:?}, got back {:?}", out.dims()),
                });
            }
            return Ok((out, forwarded));
        }
    }
}

/// A sequence being run through every block of a model, one step at a time.
pub struct InferenceSession {
    view: SwarmView,
    bans: Arc<Mutex<BanList>>,
    config: SessionConfig,
    legs: Vec<Leg>,
    position: u32,
    failures: u32,
}

impl std::fmt::Debug for InferenceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceSession")
            .field("model", &self.view.model())
            .field("route", &self.route())
            .field("position", &self.position)
            .finish()
    }
}

impl InferenceSession {
    /// Routes every block of the view's model and opens a session on each
    /// server of the route.
    ///
    /// # Errors
    /// [`ClientError::NoRoute`] naming the uncovered blocks, or
    /// [`ClientError::Exhausted`] when servers keep refusing.
    pub async fn open(
        view: SwarmView,
        bans: Arc<Mutex<BanList>>,
        config: SessionConfig,
    ) -> Result<Self, ClientError> {
        let mut session = Self {
            view,
            bans,
            config,
            legs: Vec::new(),
            position: 0,
            failures: 0,
        };
        let all = Span {
            start: 0,
            end: session.view.num_blocks(),
        };
        session.legs = session.open_legs(all).await?;
        tracing::info!(route = %session.describe_route(), "session opened");
        Ok(session)
    }

    /// The chain now in use.
    pub fn route(&self) -> Vec<Hop> {
        self.legs.iter().map(|l| l.hop).collect()
    }

    /// The route as `START:END@PEER, ...`, for logs.
    pub fn describe_route(&self) -> String {
        self.legs
            .iter()
            .map(|l| format!("{}@{}", l.hop.span, l.hop.peer))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Positions processed so far.
    pub fn position(&self) -> u32 {
        self.position
    }

    /// Servers that failed during this session.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Runs hidden states `[1, T, hidden]` for the next `T` positions through
    /// every block and returns the last block's output.
    ///
    /// # Errors
    /// A bad input, [`ClientError::NoRoute`] when a failed server's blocks
    /// have no replacement, or [`ClientError::Exhausted`].
    pub async fn step(&mut self, hidden: &Tensor) -> Result<Tensor, ClientError> {
        let (batch, t) = match hidden.dims() {
            [b, t, _] => (*b, *t as u32),
            other => {
                return Err(ClientError::InvalidRequest(format!(
                    "hidden states must be [1, T, hidden], got {other:?}"
                )));
            }
        };
        if batch != 1 || t == 0 {
            return Err(ClientError::InvalidRequest(format!(
                "hidden states must be [1, T, hidden] with T > 0, got {:?}",
                hidden.dims()
            )));
        }
        if self.position + t > self.config.max_length {
            return Err(ClientError::InvalidRequest(format!(
                "{} positions exceed the session's max_length {}",
                self.position + t,
                self.config.max_length
            )));
        }
        let mut x = hidden.clone();
        let mut i = 0;
        // Whether leg `i` already has `x`, pushed by the leg before it.
        let mut pushed = false;
        while i < self.legs.len() {
            let next = self.next_hops(i + 1);
            let leg = &mut self.legs[i];
            let result = if pushed {
                leg.output(self.position, x.dims(), &self.config).await
            } else {
                leg.step(self.position, &x, next, &self.config).await
            };
            match result {
                Ok((out, forwarded)) => {
                    leg.inputs.push(x);
                    x = out;
                    pushed = forwarded;
                    i += 1;
                }
                Err(e) if e.is_server_fault() => {
                    self.replace(i, e).await?;
                    pushed = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.position += t;
        Ok(x)
    }

    /// The sessions from leg `from` on, for a step's pushes; none when
    /// pushing is off.
    fn next_hops(&self, from: usize) -> Vec<NextHop> {
        if !self.config.push {
            return Vec::new();
        }
        self.legs[from.min(self.legs.len())..]
            .iter()
            .map(|l| NextHop {
                peer: l.hop.peer.to_bytes(),
                session: l.session,
            })
            .collect()
    }

    /// Ends every server's session at once, freeing their caches.
    pub async fn close(self) {
        futures::future::join_all(self.legs.into_iter().map(|l| l.stream.close())).await;
    }

    /// Swaps the failed leg `i` for a fresh route over its blocks, replaying
    /// its inputs, until a replacement holds or the failure budget is spent.
    async fn replace(&mut self, i: usize, error: ClientError) -> Result<(), ClientError> {
        let failed = self.legs.remove(i);
        let blocks = failed.hop.span;
        let inputs = failed.inputs;
        let mut culprit = failed.hop.peer;
        let mut last = error.to_string();
        loop {
            self.blame(culprit, blocks, &last)?;
            let mut legs = self.open_legs(blocks).await?;
            match self.replay(&mut legs, &inputs).await {
                Ok(()) => {
                    self.legs.splice(i..i, legs);
                    tracing::info!(route = %self.describe_route(), "session re-routed");
                    return Ok(());
                }
                Err((peer, e)) if e.is_server_fault() => {
                    culprit = peer;
                    last = e.to_string();
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// Bans `peer` and counts the failure against the session's budget.
    fn blame(&mut self, peer: p2p::PeerId, blocks: Span, reason: &str) -> Result<(), ClientError> {
        self.failures += 1;
        let banned_for = self
            .bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ban(peer, Instant::now());
        tracing::warn!(%peer, ?banned_for, "server failed: {reason}");
        if self.failures > self.config.max_failures {
            return Err(ClientError::Exhausted {
                model: self.view.model().into(),
                blocks: blocks.to_string(),
                attempts: self.failures,
                last: reason.into(),
            });
        }
        Ok(())
    }

    /// Feeds `inputs` (one tensor per past step) through `legs` in order, so
    /// each rebuilds the cache its predecessor had.
    async fn replay(
        &self,
        legs: &mut [Leg],
        inputs: &[Tensor],
    ) -> Result<(), (p2p::PeerId, ClientError)> {
        let mut xs = inputs.to_vec();
        for leg in legs {
            let mut position = 0;
            let mut outs = Vec::with_capacity(xs.len());
            for x in &xs {
                let (out, _) = leg
                    .step(position, x, Vec::new(), &self.config)
                    .await
                    .map_err(|e| (leg.hop.peer, e))?;
                position += x.dim(1).map_err(|e| (leg.hop.peer, e.into()))? as u32;
                outs.push(out);
            }
            leg.inputs = std::mem::replace(&mut xs, outs);
        }
        Ok(())
    }

    /// Routes `blocks` around banned servers and opens a session on each hop;
    /// a server that refuses or cannot be reached is banned and the route
    /// planned again.
    async fn open_legs(&mut self, blocks: Span) -> Result<Vec<Leg>, ClientError> {
        let mut refreshed = false;
        'route: loop {
            let mut candidates = self.view.candidates().await?;
            {
                let now = Instant::now();
                let bans = self.bans.lock().unwrap_or_else(|p| p.into_inner());
                candidates.retain(|c| !bans.is_banned(&c.peer, now));
            }
            let hops = match routing::plan(
                &candidates,
                blocks.start..blocks.end,
                u64::from(self.config.max_length),
            ) {
                Ok(hops) => hops,
                Err(_) if !refreshed => {
                    // Our picture may predate a server that just joined.
                    self.view.invalidate().await;
                    refreshed = true;
                    continue;
                }
                Err(missing) => {
                    return Err(ClientError::NoRoute {
                        model: self.view.model().into(),
                        missing: routing::describe(&missing),
                    });
                }
            };
            let mut legs = Vec::with_capacity(hops.len());
            for hop in hops {
                match self.open_leg(hop).await {
                    Ok(leg) => legs.push(leg),
                    Err(e) if e.is_server_fault() => {
                        self.blame(hop.peer, blocks, &e.to_string())?;
                        continue 'route;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(legs);
        }
    }

    async fn open_leg(&self, hop: Hop) -> Result<Leg, ClientError> {
        let open = Request::Open(OpenSession {
            model: self.view.model().into(),
            span: hop.span,
            max_length: self.config.max_length,
            batch: 1,
            compression: self.config.compression,
        });
        let opening = self
            .view
            .node()
            .open_inference_with(hop.peer, self.config.limits, &open);
        let (stream, response) = within(hop.peer, self.config.request_timeout, opening).await??;
        match response {
            Response::Opened { session, .. } => {
                self.bans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forgive(&hop.peer);
                Ok(Leg {
                    hop,
                    stream,
                    session,
                    inputs: Vec::new(),
                })
            }
            other => Err(unexpected(hop.peer, other)),
        }
    }
}

/// Runs `request`, a call to `peer`, for at most `timeout`.
async fn within<T>(
    peer: p2p::PeerId,
    timeout: Duration,
    request: impl std::future::Future<Output = T>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| ClientError::Timeout { peer, timeout })
}

fn encode(x: &Tensor, compression: Compression) -> Result<WireTensor, ClientError> {
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(WireTensor::encode(&values, x.dims(), compression)?)
}

fn decode(t: &WireTensor) -> Result<Tensor, ClientError> {
    Ok(Tensor::from_vec(t.to_f32()?, t.dims(), &Device::Cpu)?)
}

fn unexpected(peer: p2p::PeerId, response: Response) -> ClientError {
    match response {
        Response::Error(e) => ClientError::Server {
            peer,
            code: e.code,
            message: e.message,
        },
        other => ClientError::Protocol {
            peer,
            reason: format!("unexpected {}", response_name(&other)),
        },
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Opened { .. } => "Opened",
        Response::Step(_) => "Step",
        Response::Pushed => "Pushed",
        Response::Forward(_) => "Forward",
        Response::Backward(_) => "Backward",
        Response::Info(_) => "Info",
        Response::Error(_) => "Error",
    }
}
