//! The swarm client: finds a model's servers through the DHT, chains the
//! cheapest route of servers that covers every block, and runs inference
//! sessions through it, routing around servers that fail.
//!
//! Neighbours: below are `p2p` (streams and the DHT), `wire` (messages) and
//! `model` (the embedding, head, tokenizer and generation loop the client
//! runs itself); above are `api` and the `hypertensor` commands.
//!
//! - [`routing`]: the route of least expected latency (pure functions);
//! - [`ban`]: failed servers, banned with exponential backoff;
//! - [`swarm`]: the servers of a model, from the DHT and our pings;
//! - [`session`]: one sequence through the chain, with failover and replay;
//! - [`remote`]: a whole model with remote blocks, for generation.

pub mod ban;
pub mod error;
pub mod remote;
pub mod routing;
pub mod session;
pub mod swarm;

pub use ban::BanList;
pub use error::ClientError;
pub use remote::RemoteModel;
pub use routing::{Candidate, Hop};
pub use session::{InferenceSession, SessionConfig};
pub use swarm::{ServerView, SwarmView};
