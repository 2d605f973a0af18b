//! The `/hypertensor/inference/1` stream protocol.
//!
//! [`protocol`] holds the bytes on the wire; [`InferenceStream`] is the
//! client's end of one stream. The server's end, one stream's state machine,
//! lives in the `server` crate, which owns the compute it drives.

pub mod protocol;

use libp2p::{PeerId, Stream, StreamProtocol};
use wire::{FrameLimits, Request, Response};

pub use protocol::FrameError;

/// The protocol name as libp2p negotiates it.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new(wire::INFERENCE_PROTOCOL);

/// The client's end of one inference stream: a session, or one
/// request/response exchange.
pub struct InferenceStream {
    peer: PeerId,
    stream: Stream,
    limits: FrameLimits,
}

impl std::fmt::Debug for InferenceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceStream")
            .field("peer", &self.peer)
            .finish()
    }
}

impl InferenceStream {
    /// Wraps an open stream to `peer`.
    pub fn new(peer: PeerId, stream: Stream, limits: FrameLimits) -> Self {
        Self {
            peer,
            stream,
            limits,
        }
    }

    /// The server at the other end.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one request.
    ///
    /// # Errors
    /// When the stream fails.
    pub async fn send(&mut self, request: &Request) -> Result<(), FrameError> {
        protocol::write_frame(&mut self.stream, request).await
    }

    /// Sends a frame body as is, for robustness tests.
    ///
    /// # Errors
    /// When the stream fails.
    pub async fn send_raw(&mut self, body: &[u8]) -> Result<(), FrameError> {
        protocol::write_raw_frame(&mut self.stream, body).await
    }

    /// Waits for the next response.
    ///
    /// # Errors
    /// [`FrameError::Closed`] when the server ended the stream.
    pub async fn recv(&mut self) -> Result<Response, FrameError> {
        protocol::read_frame(&mut self.stream, &self.limits)
            .await?
            .ok_or(FrameError::Closed)
    }

    /// Sends `request` and waits for its response.
    ///
    /// # Errors
    /// As [`send`](Self::send) and [`recv`](Self::recv).
    pub async fn call(&mut self, request: &Request) -> Result<Response, FrameError> {
        self.send(request).await?;
        self.recv().await
    }

    /// Ends the exchange politely: a session's cache is freed at once.
    pub async fn close(mut self) {
        use futures::AsyncWriteExt;
        let _ = self.send(&Request::Close).await;
        let _ = self.stream.close().await;
    }
}
