//! The libp2p swarm: transports, Kademlia DHT, identity and signed records.
//! Sits between `wire` (below) and `server`/`client` (above).
//!
//! Empty until the swarm issue.
