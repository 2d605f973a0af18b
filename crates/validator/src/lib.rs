//! The subnet validator, run by every chain-connected server node: it
//! follows the ledger's epochs, measures the other nodes of its subnet
//! through the p2p inference protocol, computes deterministic integer scores,
//! proposes them when elected and attests to the elected validator's
//! proposal when its own scores agree within a tolerance.
//!
//! - [`measure`]: the per-node [`Measurement`] and the [`Prober`] (info,
//!   timed forward, spot check against the local checkpoint);
//! - [`score`]: the pure scoring formula and the tolerance check [`agrees`];
//! - [`epoch`]: the [`Validator`] loop that ties them to the ledger;
//! - [`error`]: [`ValidatorError`], what can stop it.
//!
//! Neighbours: `p2p` carries the probes (a [`p2p::NodeHandle`], normally the
//! server's own), `wire` shapes them, `model` recomputes spot checks, and the
//! `ledger` RPC client reads epochs and nodes and submits
//! `ProposeAttestation` / `Attest`. The `cli` starts a [`Validator`] next to
//! each server that has a hotkey.

#![warn(missing_docs)]

pub mod epoch;
pub mod error;
pub mod measure;
pub mod score;

pub use epoch::{EpochReport, Validator, ValidatorConfig};
pub use error::ValidatorError;
pub use measure::{Measurement, ProbeConfig, ProbeOutcome, Prober};
pub use score::{DEFAULT_TOLERANCE_PPM, Disagreement, agrees, scores};
