//! The swarm client: routes through servers found over `p2p` and drives the
//! `model` crate's generation loop with remote block spans.
//!
//! Empty until the client/API issue.
