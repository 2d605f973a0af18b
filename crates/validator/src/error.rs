//! The validator's error type: what can stop [`Validator::run`](crate::Validator::run)
//! or keep a [`Prober`](crate::Prober) from being built.
//!
//! Failures of single probes or submissions are not errors of this kind:
//! probes record them in their [`Measurement`](crate::Measurement), and
//! submissions are logged and retried.

use std::time::Duration;

/// Why the validator could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    /// The ledger RPC failed.
    #[error("ledger: {0}")]
    Ledger(#[from] ledger::LedgerError),
    /// The ledger stayed unreachable for too long.
    #[error("the ledger has been unreachable for {0:?}: {1}")]
    LedgerUnreachable(Duration, String),
    /// The reference checkpoint could not be opened or run.
    #[error("reference model: {0}")]
    Model(#[from] model::ModelError),
    /// The p2p node failed.
    #[error("p2p: {0}")]
    P2p(#[from] p2p::P2pError),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}
