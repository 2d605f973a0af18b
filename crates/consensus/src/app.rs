//! The ledger as commonware's [`Application`]: `propose` builds a block from
//! the mempool on the parent's state, `verify` re-executes a peer's block;
//! both on overlays that are never committed (see [`crate::chain`]).
//!
//! Marshal's `Inline` wrapper sits in front: it fetches the ancestry,
//! checks height, parent link and epoch (a block must fall inside the
//! epoch consensus is running), and re-proposes the epoch's last block at
//! the boundary so no block is built past it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use commonware_consensus::marshal::ancestry::Ancestry;
use commonware_consensus::simplex::types::Context;
use commonware_cryptography::{Digested, Digestible as _};
use commonware_runtime::Clock;
use futures::StreamExt as _;

use crate::block::ChainBlock;
use crate::chain::{Chain, ExecError};
use crate::{Digest, PublicKey, Scheme};

/// Consensus context of a proposal: round, leader and parent.
pub type Ctx = Context<Digest, PublicKey>;

/// The ledger application handed to marshal's `Inline` wrapper.
#[derive(Clone)]
pub struct LedgerApp {
    chain: Arc<Chain>,
    max_block_bytes: usize,
    block_interval: Duration,
}

impl LedgerApp {
    /// An application over `chain` building blocks of at most
    /// `max_block_bytes`, each at least `block_interval` after its parent.
    pub fn new(chain: Arc<Chain>, max_block_bytes: usize, block_interval: Duration) -> LedgerApp {
        LedgerApp {
            chain,
            max_block_bytes,
            block_interval,
        }
    }
}

/// Takes blocks from `ancestry` (newest first) down to the committed height.
async fn down_to_committed(
    chain: &Chain,
    mut ancestry: impl Ancestry<ChainBlock>,
) -> Option<Vec<ChainBlock>> {
    let committed = chain.store().head().header.height;
    let mut out = Vec::new();
    while let Some(b) = ancestry.next().await {
        let n = b.inner().number();
        out.push(b.inner().clone());
        if n <= committed {
            return Some(out);
        }
    }
    // The stream ends at genesis, which is always committed, so an early
    // end means marshal stopped.
    None
}

impl<E: Clock + Send + 'static> commonware_consensus::Application<E> for LedgerApp {
    type SigningScheme = Scheme;
    type Context = Ctx;
    type Block = ChainBlock;
    type Input = ();

    fn propose(
        &mut self,
        (runtime, _ctx): (E, Ctx),
        ancestry: impl Ancestry<ChainBlock>,
        _input: (),
    ) -> impl Future<Output = Option<Digested<ChainBlock>>> + Send {
        let chain = Arc::clone(&self.chain);
        let max = self.max_block_bytes;
        let interval = self.block_interval;
        async move {
            let parents = down_to_committed(&chain, ancestry).await?;
            // Pace an idle chain: wait until `interval` after the parent.
            if let Some(parent) = parents.first() {
                let due = UNIX_EPOCH
                    + Duration::from_millis(parent.block().header.timestamp_ms)
                    + interval;
                if let Ok(wait) = due.duration_since(runtime.current()) {
                    runtime.sleep(wait).await;
                }
            }
            let now = runtime
                .current()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            match chain.propose(&parents, now, max) {
                Ok(block) => {
                    tracing::debug!(
                        height = block.number(),
                        txs = block.block().txs.len(),
                        "proposed"
                    );
                    let digest = block.digest();
                    Some(Digested::precomputed(block, digest))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot propose");
                    None
                }
            }
        }
    }

    fn verify(
        &mut self,
        _context: (E, Ctx),
        ancestry: impl Ancestry<ChainBlock>,
    ) -> impl Future<Output = bool> + Send {
        let chain = Arc::clone(&self.chain);
        async move {
            let Some(blocks) = down_to_committed(&chain, ancestry).await else {
                // No verdict: abstain until consensus cancels the request.
                return futures::future::pending().await;
            };
            match chain.verify(&blocks) {
                Ok(()) => true,
                Err(ExecError::Invalid(why)) => {
                    tracing::warn!(height = blocks[0].number(), %why, "rejected block");
                    false
                }
                Err(ExecError::Ledger(e)) => {
                    // A local storage failure says nothing about the block.
                    tracing::error!(error = %e, "cannot verify");
                    futures::future::pending().await
                }
            }
        }
    }
}
