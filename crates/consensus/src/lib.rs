//! Hypertensor's multi-validator chain: the ledger runtime on commonware's
//! simplex BFT consensus.
//!
//! The ledger crate owns the rules, the redb store and JSON-RPC; this crate
//! only drives them. [`app::LedgerApp`] is commonware's `Application`
//! (propose and verify execute on uncommitted overlays), marshal delivers
//! finalized blocks in order and [`engine`] commits each in one redb write
//! transaction before acknowledging it. [`producer::BftProducer`] is the
//! same `BlockProducer` the dev chain implements, so RPC, wallet and query
//! code run unchanged. [`engine`] also runs one simplex engine per chain
//! epoch, with the committee the ledger derives from bonded stake, and
//! gossips the mempool. [`node`] puts a validator on tokio with
//! authenticated p2p and the JSON-RPC server.
//!
//! Neighbours: depends on `ledger` (and commonware); the `cli` crate's
//! `hypertensor chain run --validator-key` and `chain localnet` wrap
//! [`node`].

#![warn(missing_docs)]

pub mod app;
pub mod block;
pub mod chain;
pub mod engine;
pub mod node;
pub mod producer;

/// The vote-signing scheme: ed25519, one vote per committee member.
pub type Scheme = commonware_consensus::simplex::scheme::ed25519::Scheme;
/// A validator's consensus (and p2p) public key.
pub type PublicKey = commonware_cryptography::ed25519::PublicKey;
/// A validator's consensus private key.
pub type PrivateKey = commonware_cryptography::ed25519::PrivateKey;
/// Block digests (SHA-256, equal to the ledger header hash).
pub type Digest = commonware_cryptography::sha256::Digest;

/// Errors of the consensus layer.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    /// A key could not be read or used.
    #[error("key: {0}")]
    Key(String),
    /// Settings or stored state are inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// Consensus storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The p2p network failed.
    #[error("network: {0}")]
    Network(String),
    /// A chain epoch would have nobody to vote.
    #[error("chain epoch {0} has an empty committee")]
    EmptyCommittee(u64),
}

/// Reads a consensus key from a ledger key file (`address`, `secret_key`):
/// the same Ed25519 seed, so the ledger address is the consensus public key.
pub fn load_consensus_key(
    path: &std::path::Path,
) -> Result<(PrivateKey, ledger::Keypair), ConsensusError> {
    let kp = ledger::Keypair::load(path)?;
    Ok((private_key(&kp)?, kp))
}

/// The commonware private key of a ledger key pair (same seed).
pub fn private_key(kp: &ledger::Keypair) -> Result<PrivateKey, ConsensusError> {
    use commonware_codec::DecodeExt as _;
    PrivateKey::decode(kp.secret_seed().to_vec()).map_err(|e| ConsensusError::Key(e.to_string()))
}
