//! The block server: hosts a span of a model's blocks from the `model` crate
//! and serves it to clients over `p2p`.
//!
//! [`Server::start`] measures the machine's [throughput], picks its blocks
//! ([`placement`]), announces itself in the DHT, and answers inference
//! streams, one state machine per stream ([`session`]), pushing each step's
//! outputs to the next server of the client's chain ([`push`]), within the [`Limits`]
//! and the KV-cache [`budget`], admitting only the peers its [`gate`] lets
//! in. With an automatic span it keeps checking whether the swarm needs its
//! blocks elsewhere.
//!
//! Neighbours: `model` (compute), `wire` and the `ledger` client (stake) below,
//! `p2p` beside; the `cli`
//! wires it up as `hypertensor serve`.

pub mod budget;
pub mod config;
pub mod error;
pub mod gate;
pub mod metrics;
pub mod placement;
pub mod testing;
pub mod throughput;

mod compute;
mod push;
mod server;
mod session;
mod state;

#[cfg(feature = "fault-injection")]
pub use config::Fault;
pub use config::{Limits, ServerConfig, SpanChoice};
pub use error::ServerError;
pub use gate::{PeerGate, StakeGate};
pub use server::Server;
