//! Versioned protocol messages and the tensor codec (dtype, shape, bytes;
//! f16/bf16/8-bit compression) with size limits. Shared by `p2p`, `server` and
//! `client`; depends on nothing else in the workspace.
//!
//! Empty until the swarm issue: DESIGN.md fixes its boundary now so the other
//! crates can be laid out around it.
