//! The libp2p swarm every Hypertensor peer runs: TCP and QUIC with noise and
//! yamux (or a pre-shared-key private network over TCP), Kademlia, identify,
//! ping, AutoNAT, relay client and server, and DCUtR hole punching.
//!
//! Above the transport it offers what the serving plane needs: a persistent
//! Ed25519 [identity], signed [`ServerInfo`](wire::ServerInfo) announcements
//! in the DHT that every peer validates before storing or using ([`record`]),
//! and the `/hypertensor/inference/1` stream protocol ([`inference`]).
//!
//! Sits between `wire` (the bytes, below) and `server` / `client` (above). The
//! swarm runs on its own task; [`NodeHandle`] is the cheap, cloneable way in.

pub mod config;
pub mod error;
pub mod identity;
pub mod inference;
pub mod record;
pub mod testing;

mod behaviour;
mod node;

pub use config::{NodeConfig, parse_psk};
pub use error::P2pError;
pub use inference::InferenceStream;
pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use node::{Node, NodeHandle, now_ms};
