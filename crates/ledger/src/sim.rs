//! An in-memory chain driver over [`MemState`] for tests, simulations and
//! benchmarks: the same [`build_block`] / [`verify_block`] path as the dev
//! chain, without redb or threads.

use crate::chain::{build_block, verify_block};
use crate::error::{LedgerError, TxError};
use crate::genesis::Genesis;
use crate::merkle::StateCommitment;
use crate::runtime::{IssuanceAudit, Runtime, accounts};
use crate::state::MemState;
use crate::tx::{Call, Keypair, SignedTx, Tx};
use crate::types::{Address, Block, BlockHeader, Hash32};

/// An in-memory chain.
#[derive(Clone, Debug)]
pub struct SimChain {
    /// The runtime.
    pub runtime: Runtime,
    /// The committed state.
    pub state: MemState,
    /// The head header.
    pub head: BlockHeader,
    commitment: StateCommitment,
}

impl SimChain {
    /// A chain at its genesis block.
    pub fn new(genesis: &Genesis) -> Result<SimChain, LedgerError> {
        let runtime = Runtime::new(genesis)?;
        let changes = runtime.genesis_changes(genesis)?;
        let mut commitment = StateCommitment::default();
        commitment.apply(&changes);
        let mut state = MemState::default();
        state.apply(changes);
        let head = BlockHeader {
            height: 0,
            parent_hash: Hash32::ZERO,
            state_root: commitment.root(),
            tx_root: Hash32::ZERO,
            timestamp_ms: 0,
        };
        Ok(SimChain {
            runtime,
            state,
            head,
            commitment,
        })
    }

    /// Builds and commits a block from `txs`; returns it with the refused ones.
    pub fn produce(
        &mut self,
        txs: Vec<SignedTx>,
    ) -> Result<(Block, Vec<(Hash32, TxError)>), LedgerError> {
        let built = build_block(&self.runtime, &self.state, &self.head, txs, 0, |c| {
            self.commitment.root_with(c)
        })?;
        self.commitment.apply(&built.changes);
        self.state.apply(built.changes);
        self.head = built.block.header.clone();
        Ok((built.block, built.rejected))
    }

    /// Verifies and commits a block produced elsewhere.
    pub fn import(&mut self, block: &Block) -> Result<(), LedgerError> {
        let changes = verify_block(&self.runtime, &self.state, &self.head, block, |c| {
            self.commitment.root_with(c)
        })?;
        self.commitment.apply(&changes);
        self.state.apply(changes);
        self.head = block.header.clone();
        Ok(())
    }

    /// Produces empty blocks up to and including `height`.
    pub fn advance_to(&mut self, height: u64) -> Result<(), LedgerError> {
        while self.head.height < height {
            self.produce(vec![])?;
        }
        Ok(())
    }

    /// The committed state root.
    pub fn root(&self) -> Hash32 {
        self.head.state_root
    }

    /// The next nonce of an account.
    pub fn nonce(&self, who: &Address) -> u64 {
        accounts::account(&self.state, who)
            .map(|a| a.nonce)
            .unwrap_or(0)
    }

    /// Signs `call` by `key` at its committed nonce.
    pub fn tx(&self, key: &Keypair, call: Call) -> SignedTx {
        self.tx_at(key, self.nonce(&key.address()), call)
    }

    /// Signs `call` by `key` at `nonce`.
    pub fn tx_at(&self, key: &Keypair, nonce: u64, call: Call) -> SignedTx {
        Tx {
            signer: key.address(),
            nonce,
            call,
        }
        .sign(key, &self.runtime.chain_id)
    }

    /// Applies one transaction in its own block; returns the refusal, if any.
    pub fn exec(&mut self, key: &Keypair, call: Call) -> Result<(), TxError> {
        let tx = self.tx(key, call);
        let (_, rejected) = self
            .produce(vec![tx])
            .map_err(|e| TxError::InvalidArgument(e.to_string()))?;
        match rejected.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// The issuance audit of the committed state.
    pub fn audit(&self) -> IssuanceAudit {
        Runtime::audit_issuance(&self.state).unwrap_or(IssuanceAudit {
            issuance: 1,
            balances: 0,
            stakes: 0,
            vaults: 0,
            unbonding: 0,
        })
    }
}
