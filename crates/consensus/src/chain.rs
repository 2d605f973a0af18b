//! One validator's view of the ledger: the committed redb store, the blocks
//! executed but not yet finalized, and the mempool.
//!
//! Execution for `propose` and `verify` runs on an overlay of the committed
//! state plus the changes of the uncommitted ancestors, and never writes.
//! Finalized blocks are committed through [`Chain::commit_finalized`] in one
//! redb write transaction each. One lock ([`Chain::exec`]) orders the two,
//! because the state root of an overlay is computed against the committed
//! commitment, which must not move while a block is being executed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use ledger::chain::{build_block, verify_block};
use ledger::runtime::{BlockContext, accounts, validators};
use ledger::state::{Changes, Overlay};
use ledger::storage::{Snapshot, Store};
use ledger::types::{BlockHeader, ChainValidator};
use ledger::{Address, Block, Hash32, LedgerError, Runtime, SignedTx, TxError};
use tokio::sync::broadcast;

use crate::block::ChainBlock;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; carry on.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A block executed on its parent's state, not yet committed.
struct Executed {
    height: u64,
    changes: Arc<Changes>,
}

/// The transaction pool: admitted transactions in arrival order, checked
/// against the committed state plus the pool itself.
struct Pool {
    txs: BTreeMap<u64, SignedTx>,
    by_hash: HashMap<Hash32, u64>,
    next_seq: u64,
    pending: Overlay<Snapshot>,
}

/// What a validator knows about the chain.
pub struct Chain {
    store: Arc<Store>,
    runtime: Runtime,
    exec: Mutex<()>,
    executed: Mutex<HashMap<Hash32, Executed>>,
    pool: Mutex<Pool>,
    max_pool: usize,
    blocks: broadcast::Sender<Arc<Block>>,
}

/// Why a block cannot be executed on what this node holds.
#[derive(Debug)]
pub(crate) enum ExecError {
    /// The block or its ancestry conflicts with the finalized chain, or
    /// breaks a rule: it is invalid for good.
    Invalid(String),
    /// Storage failed.
    Ledger(LedgerError),
}

impl From<LedgerError> for ExecError {
    fn from(e: LedgerError) -> Self {
        ExecError::Ledger(e)
    }
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecError::Invalid(s) => write!(f, "invalid: {s}"),
            ExecError::Ledger(e) => write!(f, "{e}"),
        }
    }
}

fn merged(base: &Changes, more: &Changes) -> Changes {
    let mut all = base.clone();
    all.extend(more.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

impl Chain {
    /// A chain view over `store`, with a pool of at most `max_pool` transactions.
    pub fn new(store: Arc<Store>, runtime: Runtime, max_pool: usize) -> Result<Chain, LedgerError> {
        let pending = pending_view(&runtime, &store)?;
        let (blocks, _) = broadcast::channel(1024);
        Ok(Chain {
            store,
            runtime,
            exec: Mutex::new(()),
            executed: Mutex::new(HashMap::new()),
            pool: Mutex::new(Pool {
                txs: BTreeMap::new(),
                by_hash: HashMap::new(),
                next_seq: 0,
                pending,
            }),
            max_pool,
            blocks,
        })
    }

    /// The committed store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Committed blocks, as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Block>> {
        self.blocks.subscribe()
    }

    /// Blocks per chain epoch.
    pub fn epoch_blocks(&self) -> u64 {
        self.runtime.params.chain_epoch_blocks
    }

    /// The committee of chain epoch `epoch`: the recorded one once the
    /// epoch's first block is committed, otherwise derived from the
    /// committed state when it is the end of the previous epoch.
    pub fn committee(&self, epoch: u64) -> Result<Option<Vec<ChainValidator>>, LedgerError> {
        let snap = self.store.snapshot()?;
        if let Some(c) = validators::committee(&snap, epoch)? {
            return Ok(Some(c));
        }
        let head = snap.head().header.height;
        if epoch > 0 && head + 1 == epoch * self.epoch_blocks() {
            return Ok(Some(validators::top(
                &snap,
                self.runtime.params.committee_size,
            )?));
        }
        Ok(None)
    }

    /// The committed block at `height`, wrapped for consensus.
    pub fn block_at(&self, height: u64) -> Result<Option<ChainBlock>, LedgerError> {
        Ok(self.store.block(height)?.map(ChainBlock::new))
    }

    /// Executes `chain` (oldest first; the first block's parent must be the
    /// committed head, or the list must be empty) and returns the cumulative
    /// changes over the committed state, with the header of the last block
    /// (or the head). Caller holds the exec lock.
    fn replay(
        &self,
        snapshot: &Snapshot,
        chain: &[ChainBlock],
    ) -> Result<(Changes, BlockHeader), ExecError> {
        let mut cum = Changes::new();
        let mut parent = snapshot.head().header.clone();
        for b in chain {
            let hash = b.hash();
            let known = lock(&self.executed)
                .get(&hash)
                .map(|e| Arc::clone(&e.changes));
            let changes = match known {
                Some(c) => c,
                None => {
                    let mut base = Overlay::new(snapshot);
                    base.merge(cum.clone());
                    let c = verify_block(&self.runtime, &base, &parent, b.block(), |c| {
                        self.store.root_with(&merged(&cum, c))
                    })
                    .map_err(|e| ExecError::Invalid(e.to_string()))?;
                    let c = Arc::new(c);
                    lock(&self.executed).insert(
                        hash,
                        Executed {
                            height: b.number(),
                            changes: Arc::clone(&c),
                        },
                    );
                    c
                }
            };
            cum.extend(changes.iter().map(|(k, v)| (k.clone(), v.clone())));
            parent = b.block().header.clone();
        }
        Ok((cum, parent))
    }

    /// Trims `newest_first` (a block and its ancestors, newest first, down
    /// to at least the committed height) to the uncommitted part, oldest
    /// first, checking that it extends the committed head.
    fn uncommitted(
        &self,
        snapshot: &Snapshot,
        newest_first: &[ChainBlock],
    ) -> Result<Vec<ChainBlock>, ExecError> {
        let head = snapshot.head();
        let mut out: Vec<ChainBlock> = newest_first
            .iter()
            .take_while(|b| b.number() > head.header.height)
            .cloned()
            .collect();
        let anchor = newest_first.get(out.len());
        match anchor {
            Some(a) if a.number() == head.header.height && a.hash() == head.hash => {}
            _ => {
                return Err(ExecError::Invalid(
                    "does not extend the finalized chain".into(),
                ));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Builds a block on `parent_chain` (the parent and its ancestors,
    /// newest first, reaching down to the committed head), from the pool.
    pub(crate) fn propose(
        &self,
        parent_chain: &[ChainBlock],
        timestamp_ms: u64,
        max_block_bytes: usize,
    ) -> Result<ChainBlock, ExecError> {
        let _g = lock(&self.exec);
        let snapshot = self.store.snapshot()?;
        let ancestors = self.uncommitted(&snapshot, parent_chain)?;
        let (cum, parent) = self.replay(&snapshot, &ancestors)?;
        let included: BTreeSet<Hash32> = ancestors
            .iter()
            .flat_map(|b| b.block().txs.iter().map(|t| t.hash()))
            .collect();
        let max_txs = self.runtime.params.max_block_txs as usize;
        // Leave room for the header and length prefixes.
        let budget = max_block_bytes.saturating_sub(1024);
        let mut used = 0usize;
        let candidates: Vec<SignedTx> = {
            let pool = lock(&self.pool);
            let mut out = Vec::new();
            for tx in pool.txs.values() {
                if out.len() >= max_txs {
                    break;
                }
                if included.contains(&tx.hash()) {
                    continue;
                }
                let size = postcard::to_stdvec(tx)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if used.saturating_add(size) > budget {
                    break;
                }
                used += size;
                out.push(tx.clone());
            }
            out
        };
        let mut base = Overlay::new(&snapshot);
        base.merge(cum.clone());
        let built = build_block(
            &self.runtime,
            &base,
            &parent,
            candidates,
            timestamp_ms.max(parent.timestamp_ms),
            |c| self.store.root_with(&merged(&cum, c)),
        )?;
        if !built.rejected.is_empty() {
            tracing::debug!(rejected = built.rejected.len(), "left transactions out");
        }
        let block = ChainBlock::new(built.block);
        lock(&self.executed).insert(
            block.hash(),
            Executed {
                height: block.number(),
                changes: Arc::new(built.changes),
            },
        );
        Ok(block)
    }

    /// Re-executes `chain[0]` on its ancestors (`chain[1..]`, newest first,
    /// reaching down to the committed head) and checks its roots. A block
    /// at or below the committed height is valid only if it is the
    /// committed block.
    pub(crate) fn verify(&self, chain: &[ChainBlock]) -> Result<(), ExecError> {
        let Some(block) = chain.first() else {
            return Err(ExecError::Invalid("empty ancestry".into()));
        };
        if let Some(parent) = chain.get(1)
            && block.block().header.timestamp_ms < parent.block().header.timestamp_ms
        {
            return Err(ExecError::Invalid("timestamp before its parent's".into()));
        }
        let _g = lock(&self.exec);
        let snapshot = self.store.snapshot()?;
        if block.number() <= snapshot.head().header.height {
            return match self.store.block(block.number())? {
                Some(b) if b.hash() == block.hash() => Ok(()),
                _ => Err(ExecError::Invalid(
                    "conflicts with a finalized block".into(),
                )),
            };
        }
        let blocks = self.uncommitted(&snapshot, chain)?;
        self.replay(&snapshot, &blocks)?;
        Ok(())
    }

    /// Applies a finalized block to redb in one write transaction. Returns
    /// false when the height is already committed (a repeated delivery), and
    /// an error when the block does not extend the committed head or
    /// conflicts with it.
    pub(crate) fn commit_finalized(&self, block: &ChainBlock) -> Result<bool, ExecError> {
        let committed = {
            let _g = lock(&self.exec);
            let snapshot = self.store.snapshot()?;
            let head = snapshot.head().clone();
            let h = block.number();
            if h <= head.header.height {
                return match self.store.block(h)? {
                    Some(b) if b.hash() == block.hash() => Ok(false),
                    _ => Err(ExecError::Invalid(format!(
                        "finalized block {h} conflicts with the committed one"
                    ))),
                };
            }
            if h != head.header.height + 1 || block.block().header.parent_hash != head.hash {
                return Err(ExecError::Invalid(format!(
                    "finalized block {h} does not extend committed head {}",
                    head.header.height
                )));
            }
            let (changes, _) = self.replay(&snapshot, std::slice::from_ref(block))?;
            drop(snapshot);
            self.store.commit(block.block(), changes)?;
            lock(&self.executed).retain(|_, e| e.height > h);
            Arc::new(block.block().clone())
        };
        self.rebuild_pool()?;
        let _ = self.blocks.send(committed);
        Ok(true)
    }

    /// Re-checks the pool against the new head: committed and now-invalid
    /// transactions leave it.
    fn rebuild_pool(&self) -> Result<(), LedgerError> {
        let mut pool = lock(&self.pool);
        pool.pending = pending_view(&self.runtime, &self.store)?;
        let head = pool.pending.base().head().clone();
        let ctx = BlockContext {
            height: head.header.height + 1,
            parent_hash: head.hash,
        };
        let txs = std::mem::take(&mut pool.txs);
        pool.by_hash.clear();
        for (seq, tx) in txs {
            if self.runtime.apply_tx(&mut pool.pending, &ctx, &tx).is_ok() {
                pool.by_hash.insert(tx.hash(), seq);
                pool.txs.insert(seq, tx);
            }
        }
        Ok(())
    }

    /// Admits a transaction after checking it against the committed state
    /// plus the pool. Duplicates (pooled or committed) are refused.
    pub fn admit(&self, tx: SignedTx) -> Result<Hash32, LedgerError> {
        let hash = tx.hash();
        let mut pool = lock(&self.pool);
        if pool.by_hash.contains_key(&hash) {
            return Err(TxError::InvalidArgument("transaction already pending".into()).into());
        }
        if self.store.tx_location(&hash)?.is_some() {
            return Err(TxError::InvalidArgument("transaction already committed".into()).into());
        }
        if pool.txs.len() >= self.max_pool {
            return Err(TxError::InvalidArgument("transaction pool is full".into()).into());
        }
        let head = pool.pending.base().head().clone();
        let ctx = BlockContext {
            height: head.header.height + 1,
            parent_hash: head.hash,
        };
        self.runtime.apply_tx(&mut pool.pending, &ctx, &tx)?;
        let seq = pool.next_seq;
        pool.next_seq += 1;
        pool.by_hash.insert(hash, seq);
        pool.txs.insert(seq, tx);
        Ok(hash)
    }

    /// The next nonce of an account, counting pooled transactions.
    pub fn pending_nonce(&self, who: &Address) -> Result<u64, LedgerError> {
        let pool = lock(&self.pool);
        Ok(accounts::account(&pool.pending, who)?.nonce)
    }

    /// Up to `max` of the oldest pooled transactions.
    pub fn pool_oldest(&self, max: usize) -> Vec<SignedTx> {
        lock(&self.pool).txs.values().take(max).cloned().collect()
    }

    /// Transactions waiting in the pool.
    pub fn pool_len(&self) -> usize {
        lock(&self.pool).txs.len()
    }
}

/// The committed state as the next block sees it before its transactions.
fn pending_view(runtime: &Runtime, store: &Store) -> Result<Overlay<Snapshot>, LedgerError> {
    let snapshot = store.snapshot()?;
    let head = snapshot.head().clone();
    let mut o = Overlay::new(snapshot);
    runtime.begin_block(
        &mut o,
        &BlockContext {
            height: head.header.height + 1,
            parent_hash: head.hash,
        },
    )?;
    Ok(o)
}
