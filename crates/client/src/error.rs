//! Errors of the swarm client.

use p2p::PeerId;
use wire::ErrorCode;

/// What went wrong between the client and the swarm.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No chain of online servers covers these blocks.
    #[error("no online servers of {model} cover blocks {missing} (START:END, END exclusive)")]
    NoRoute {
        /// The model id.
        model: String,
        /// The uncovered ranges, e.g. `3:7, 12:13`.
        missing: String,
    },
    /// Servers kept failing until the retry budget ran out.
    #[error("gave up on blocks {blocks} of {model} after {attempts} failed servers; last: {last}")]
    Exhausted {
        /// The model id.
        model: String,
        /// The blocks that could not be served, `START:END`.
        blocks: String,
        /// How many servers were tried.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A server answered with an error frame.
    #[error("server {peer} refused: {code:?}: {message}")]
    Server {
        /// The server.
        peer: PeerId,
        /// Its error code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// A server answered with a frame that makes no sense here.
    #[error("server {peer} broke the protocol: {reason}")]
    Protocol {
        /// The server.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
    /// A server did not answer one request in time.
    #[error("server {peer} did not answer within {timeout:?}")]
    Timeout {
        /// The server.
        peer: PeerId,
        /// The time it had.
        timeout: std::time::Duration,
    },
    /// The request itself is invalid (shape, length).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The swarm layer failed (stream, DHT, node stopped).
    #[error(transparent)]
    P2p(#[from] p2p::P2pError),
    /// Local model parts (embedding, head, tokenizer) failed.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A tensor could not be encoded or decoded.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ClientError {
    /// Whether another server might succeed where this one failed: a failed
    /// or refused server is worth replacing, a bad request is not.
    pub fn is_server_fault(&self) -> bool {
        match self {
            Self::Server { code, .. } => {
                !matches!(code, ErrorCode::BadRequest | ErrorCode::BadShape)
            }
            Self::Protocol { .. } | Self::Timeout { .. } | Self::P2p(_) | Self::Wire(_) => true,
            _ => false,
        }
    }
}
