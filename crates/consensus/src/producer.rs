//! The ledger's [`BlockProducer`] over the BFT chain, so the JSON-RPC
//! server, wallet and queries work against a validator exactly as against
//! the dev chain.

use std::sync::Arc;

use futures::channel::mpsc;
use ledger::chain::BlockProducer;
use ledger::storage::Store;
use ledger::{Address, Block, Hash32, LedgerError, Runtime, SignedTx};
use tokio::sync::broadcast;

use crate::chain::Chain;

/// Submissions go into the local pool and out to the other validators.
#[derive(Clone)]
pub struct BftProducer {
    chain: Arc<Chain>,
    gossip: mpsc::UnboundedSender<SignedTx>,
}

impl BftProducer {
    /// A producer over `chain` that gossips admitted transactions on `gossip`.
    pub fn new(chain: Arc<Chain>, gossip: mpsc::UnboundedSender<SignedTx>) -> BftProducer {
        BftProducer { chain, gossip }
    }

    /// The chain view.
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }
}

impl BlockProducer for BftProducer {
    fn submit(&self, tx: SignedTx) -> Result<Hash32, LedgerError> {
        let hash = self.chain.admit(tx.clone())?;
        // Gossip only what this node admitted: peers check it again anyway.
        let _ = self.gossip.unbounded_send(tx);
        Ok(hash)
    }

    fn pending_nonce(&self, who: &Address) -> Result<u64, LedgerError> {
        self.chain.pending_nonce(who)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Block>> {
        self.chain.subscribe()
    }

    fn store(&self) -> &Arc<Store> {
        self.chain.store()
    }

    fn runtime(&self) -> &Runtime {
        self.chain.runtime()
    }

    async fn seal_now(&self) -> Result<Arc<Block>, LedgerError> {
        Err(LedgerError::Unsupported(
            "blocks are produced by BFT consensus; sealing on demand is a dev-chain feature".into(),
        ))
    }
}
