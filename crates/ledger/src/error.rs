//! Error types.
//!
//! [`TxError`] is what a user sees when a transaction is refused: every variant
//! names the rule that failed, and a refused transaction changes nothing.
//! [`LedgerError`] wraps it together with storage, codec and configuration
//! failures for the layers above the runtime.

use crate::types::{Address, Amount, NodeClass, NodeId, SubnetId, SubnetState};

/// Why a transaction was refused. A refused transaction leaves the state as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The Ed25519 signature does not verify against the signer and the chain id.
    #[error("bad signature")]
    BadSignature,
    /// The nonce is not the account's next nonce.
    #[error("bad nonce: expected {expected}, got {got}")]
    BadNonce {
        /// The nonce the account expects next.
        expected: u64,
        /// The nonce the transaction carried.
        got: u64,
    },
    /// The account cannot pay the amount plus the fee.
    #[error("insufficient balance: need {need}, have {have}")]
    InsufficientBalance {
        /// What the transaction needs, fee included.
        need: Amount,
        /// What the account holds.
        have: Amount,
    },
    /// A zero or otherwise unusable amount.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    /// The subnet does not exist (or was removed).
    #[error("unknown subnet {0}")]
    UnknownSubnet(SubnetId),
    /// The node does not exist in that subnet.
    #[error("unknown node {node} in subnet {subnet}")]
    UnknownNode {
        /// The subnet.
        subnet: SubnetId,
        /// The node id.
        node: NodeId,
    },
    /// The signer is not the key this call needs (owner, coldkey or hotkey).
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// The subnet is in the wrong state for this call.
    #[error("subnet {subnet} is {state:?}: {why}")]
    WrongSubnetState {
        /// The subnet.
        subnet: SubnetId,
        /// Its current state.
        state: SubnetState,
        /// What the call needed.
        why: String,
    },
    /// The node's class does not allow this call.
    #[error("wrong class: node {node} is {class:?}, needs {needed:?}")]
    WrongClass {
        /// The node.
        node: NodeId,
        /// Its class.
        class: NodeClass,
        /// The class the call needs (at least).
        needed: NodeClass,
    },
    /// Another node of this subnet already uses the peer id.
    #[error("duplicate peer id {0} in this subnet")]
    DuplicatePeerId(String),
    /// Another node of this subnet already uses the hotkey.
    #[error("duplicate hotkey {0} in this subnet")]
    DuplicateHotkey(Address),
    /// A subnet with that name exists.
    #[error("duplicate subnet name {0}")]
    DuplicateSubnetName(String),
    /// The resulting stake would fall outside the subnet's bounds.
    #[error("stake out of range: {got} not in [{min}, {max}]")]
    StakeOutOfRange {
        /// The subnet's minimum stake.
        min: Amount,
        /// The subnet's maximum stake.
        max: Amount,
        /// The stake the call would leave.
        got: Amount,
    },
    /// Too few nodes to activate the subnet.
    #[error("subnet needs at least {needed} nodes to activate, has {have}")]
    NotEnoughNodes {
        /// Required nodes.
        needed: u32,
        /// Registered nodes.
        have: u32,
    },
    /// The subnet holds the maximum number of nodes.
    #[error("subnet is full ({0} nodes)")]
    SubnetFull(u32),
    /// Nothing has finished unbonding yet.
    #[error("nothing to claim")]
    NothingToClaim,
    /// The delegator holds fewer shares than it tries to remove.
    #[error("insufficient shares: have {have}, asked {asked}")]
    InsufficientShares {
        /// Shares held.
        have: Amount,
        /// Shares asked for.
        asked: Amount,
    },
    /// A validator consensus call that is not allowed now.
    #[error("epoch rule: {0}")]
    Epoch(String),
    /// Malformed arguments (name too long, empty peer id, bad scores...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An arithmetic overflow; refused rather than wrapped.
    #[error("arithmetic overflow")]
    Overflow,
    /// The state could not be read or decoded.
    #[error("state: {0}")]
    State(#[from] StateError),
}

/// A failure reading or decoding state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The backing store failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A stored value did not decode; the state is corrupt.
    #[error("corrupt value under key {key}: {why}")]
    Corrupt {
        /// Hex of the key.
        key: String,
        /// Decoder message.
        why: String,
    },
}

/// Errors of the ledger's storage, block production, RPC and configuration layers.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A transaction was refused.
    #[error(transparent)]
    Tx(#[from] TxError),
    /// State access failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// redb failed.
    #[error("database: {0}")]
    Db(String),
    /// Encoding or decoding failed.
    #[error("codec: {0}")]
    Codec(String),
    /// The genesis file or parameters are invalid.
    #[error("genesis: {0}")]
    Genesis(String),
    /// A block did not verify (wrong parent, root or a failing transaction).
    #[error("invalid block: {0}")]
    InvalidBlock(String),
    /// The stored chain does not match the given genesis.
    #[error("chain mismatch: {0}")]
    ChainMismatch(String),
    /// The block producer has stopped.
    #[error("block producer stopped")]
    ProducerStopped,
    /// The block producer cannot do this (e.g. seal on demand under BFT).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A key file problem.
    #[error("key: {0}")]
    Key(String),
    /// An I/O failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// An RPC failure (client side or server start).
    #[error("rpc: {0}")]
    Rpc(String),
}

impl From<redb::Error> for LedgerError {
    fn from(e: redb::Error) -> Self {
        LedgerError::Db(e.to_string())
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for LedgerError {
            fn from(e: $t) -> Self {
                LedgerError::Db(e.to_string())
            }
        }
    )*};
}
redb_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
