//! The block server: hosts a span of a model's blocks from the `model` crate
//! and serves it to clients over `p2p`.
//!
//! Empty until the swarm issue.
