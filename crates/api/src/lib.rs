//! OpenAI-compatible HTTP API, web chat, swarm monitor and metrics, on top of
//! `client`.
//!
//! Empty until the client/API issue.
