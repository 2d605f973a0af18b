//! Per-epoch measurement of the swarm, scoring, proposing and attesting;
//! uses `client` and `p2p` to measure and the `ledger` client to submit.
//!
//! Empty until the incentives issue.
