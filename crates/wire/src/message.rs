//! Requests and responses of the inference protocol.
//!
//! One protocol stream carries a session (an [`OpenSession`] followed by
//! [`Step`]s, each answered in order), a server's pushes into other
//! servers' sessions ([`Push`]es, each acknowledged), or a single
//! request/response exchange (`forward`, `backward`, `info`).
//!
//! Pushing saves a client round trip per server: a step may name the
//! sessions that follow it in the client's chain ([`Step::next`]), and the
//! server sends its outputs straight to the first of them, which computes
//! and passes them on in turn. Every server still answers the client, so the
//! client keeps each server's inputs for replay, and sends the inputs itself
//! where a push did not get through ([`StepOutput::forwarded`]).

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::info::{ServerInfo, Span};
use crate::tensor::{Compression, WireTensor};

/// Opens an inference session with server-side KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenSession {
    /// Model id.
    pub model: String,
    /// Blocks to run; must lie within the server's span.
    pub span: Span,
    /// Most positions the session will hold; the server reserves this much cache.
    pub max_length: u32,
    /// Sequences per step.
    pub batch: u32,
    /// How the server should encode the activations it sends back.
    pub compression: Compression,
}

/// One inference step: hidden states of new positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Positions the client believes the session already holds. A smaller value
    /// than the server's rolls the cache back first (replay after a failover or
    /// a rejected draft); a larger one is an error.
    pub position: u32,
    /// `[batch, tokens, hidden]` inputs of the span's first block.
    pub hidden: WireTensor,
    /// Sessions that take this step's outputs next, in chain order: the
    /// server pushes its outputs to the first, with the rest as that push's
    /// own `next`. Empty: answer the client only.
    pub next: Vec<NextHop>,
}

/// A session on another server, as a push target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    /// The server's libp2p peer id, as bytes.
    pub peer: Vec<u8>,
    /// The session id it gave in [`Response::Opened`].
    pub session: u64,
}

/// A step delivered by the previous server of a chain rather than by the
/// session's client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    /// The receiving server's session id.
    pub session: u64,
    /// The step, as the client would have sent it.
    pub step: Step,
}

/// Outputs of one step, pushed or sent by the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The step's `position`: a client skips answers to steps it has
    /// already had answered (a push and a replay can both deliver one).
    pub position: u32,
    /// Whether the outputs were pushed to the step's first `next` session;
    /// if not, the client sends them there itself.
    pub forwarded: bool,
    /// `[batch, tokens, hidden]` outputs of the span's last block.
    pub hidden: WireTensor,
}

/// A full sequence through blocks, without cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// Model id.
    pub model: String,
    /// Blocks to run.
    pub span: Span,
    /// `[batch, tokens, hidden]` inputs.
    pub hidden: WireTensor,
    /// How to encode the reply.
    pub compression: Compression,
}

/// Gradient of a loss with respect to a span's inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackwardRequest {
    /// Model id.
    pub model: String,
    /// Blocks to run.
    pub span: Span,
    /// `[batch, tokens, hidden]` inputs of the forward pass.
    pub hidden: WireTensor,
    /// Gradient of the loss with respect to the span's outputs, same shape.
    pub grad_output: WireTensor,
    /// How to encode the reply.
    pub compression: Compression,
}

/// Client-to-server frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Start a session (first frame of a session stream).
    Open(OpenSession),
    /// Next positions of the open session.
    Step(Step),
    /// A step for a session on this server, from the server before it in
    /// the chain (first and every frame of a push stream).
    Push(Push),
    /// End the session and free its cache.
    Close,
    /// Stateless forward pass.
    Forward(ForwardRequest),
    /// Stateless backward pass.
    Backward(BackwardRequest),
    /// Ask for the server's current [`ServerInfo`].
    Info,
}

/// An error the server reports instead of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Its class.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl std::fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Server-to-client frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The session is open with this cache reservation.
    Opened {
        /// Positions reserved.
        max_length: u32,
        /// The session's id, for other servers' [`Push`]es: random, so
        /// only those the client names can push.
        session: u64,
    },
    /// Outputs of a step.
    Step(StepOutput),
    /// A [`Push`] was accepted into its session.
    Pushed,
    /// Outputs of a forward pass.
    Forward(WireTensor),
    /// Gradient with respect to the inputs.
    Backward(WireTensor),
    /// The server's announcement, fresh.
    Info(Box<ServerInfo>),
    /// The request failed; a session stays usable unless the code says otherwise.
    Error(ErrorFrame),
}

impl Response {
    /// An error frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorFrame {
            code,
            message: message.into(),
        })
    }
}
