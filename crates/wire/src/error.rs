//! Decoding failures and the error codes carried in error frames.

use serde::{Deserialize, Serialize};

/// Why bytes from a peer could not be turned into a message or tensor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame is larger than the receiver accepts.
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    FrameTooLarge {
        /// Declared or actual size.
        size: usize,
        /// The receiver's limit.
        limit: usize,
    },
    /// The bytes are not a valid message of the expected schema.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A tensor's header disagrees with its data or with what was expected.
    #[error("bad tensor: {0}")]
    BadTensor(String),
}

impl From<postcard::Error> for WireError {
    fn from(e: postcard::Error) -> Self {
        Self::Malformed(e.to_string())
    }
}

/// Machine-readable class of an error frame, so clients can decide whether to
/// retry elsewhere (server-side trouble) or give up (their own mistake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request could not be decoded or breaks the protocol.
    BadRequest,
    /// A tensor has the wrong dtype, shape or size.
    BadShape,
    /// The server does not serve that model or those blocks.
    NotServed,
    /// The frame exceeds the payload limit.
    PayloadTooLarge,
    /// The session would exceed its `max_length` or the server's limit.
    TooLong,
    /// The server's KV-cache budget cannot hold the session.
    NoCapacity,
    /// The peer already has as many open requests as allowed.
    TooManyRequests,
    /// The session was idle too long and was closed.
    IdleTimeout,
    /// The peer is not admitted (for example, not staked).
    Forbidden,
    /// The server failed while computing.
    Internal,
    /// A push named a session this server does not hold (closed, timed
    /// out, or never opened here).
    UnknownSession,
}

impl ErrorCode {
    /// Whether another server might succeed where this one failed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::NoCapacity | Self::TooManyRequests | Self::IdleTimeout | Self::Internal
        )
    }
}
