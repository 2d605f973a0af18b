//! The Hypertensor ledger: the incentive plane's deterministic runtime,
//! its redb storage with a Merkle state root, the embedded dev-chain block
//! producer and the JSON-RPC server and client.
//!
//! Layers, bottom up, each usable without the ones above:
//! - [`types`], [`tx`], [`genesis`]: data, signed transactions, configuration;
//! - [`state`]: the key-value state interface and its overlay;
//! - [`runtime`]: the pure state machine (accounts, subnets, nodes, epochs, vaults);
//! - [`merkle`] and [`storage`]: the state root and the redb-backed chain;
//! - [`chain`]: the [`chain::BlockProducer`] trait and the dev chain;
//! - [`rpc`], [`rpc_client`], [`devnode`]: JSON-RPC and a ready-made dev node;
//! - [`sim`]: an in-memory chain for tests, simulations and benchmarks.
//!
//! Neighbours: the `validator` crate and the servers call this crate through
//! [`rpc_client::LedgerClient`]; the `cli` crate wraps it. The ledger depends
//! on no other workspace crate.

#![warn(missing_docs)]

pub mod chain;
pub mod devnode;
pub mod error;
pub mod genesis;
pub mod merkle;
pub mod rpc;
pub mod rpc_client;
pub mod runtime;
pub mod sim;
pub mod state;
pub mod storage;
pub mod tx;
pub mod types;

pub use error::{LedgerError, StateError, TxError};
pub use genesis::{Genesis, Params};
pub use runtime::{BlockContext, Runtime};
pub use tx::{Call, Keypair, SignedTx, Tx};
pub use types::{Address, Amount, Block, BlockHeader, Hash32, TOKEN};
