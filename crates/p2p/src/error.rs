//! Errors of the p2p layer.

use libp2p::PeerId;

/// What went wrong in the swarm, the DHT or a stream.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The identity file could not be read, parsed or written.
    #[error("identity file {path}: {reason}")]
    Identity {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The transport or swarm could not be built or could not listen.
    #[error("transport: {0}")]
    Transport(String),
    /// Neither initial peers nor `--new-swarm` were given.
    #[error(
        "no initial peers: pass --initial-peers MULTIADDR (with /p2p/PEER_ID), or --new-swarm to start a new swarm"
    )]
    NoBootstrap,
    /// An initial peer's address lacks its `/p2p/PEER_ID` suffix or is malformed.
    #[error("bad peer address {addr}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// The pre-shared key is not a valid libp2p swarm key.
    #[error("bad pre-shared key: {0}")]
    BadPsk(String),
    /// A DHT record failed validation.
    #[error("invalid DHT record: {0}")]
    Record(#[from] crate::record::RecordError),
    /// A DHT query failed.
    #[error("DHT query failed: {0}")]
    Query(String),
    /// A stream to a peer could not be opened.
    #[error("cannot open a stream to {peer}: {reason}")]
    OpenStream {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Reading or writing a frame failed.
    #[error("stream: {0}")]
    Stream(#[from] crate::inference::FrameError),
    /// The node's event loop has stopped.
    #[error("the p2p node has shut down")]
    Shutdown,
}
