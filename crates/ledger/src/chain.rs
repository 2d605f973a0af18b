//! Block production: the [`BlockProducer`] trait, the engine-neutral
//! [`build_block`] / [`verify_block`] steps, and the dev chain.
//!
//! The runtime never knows which engine drives it. An engine builds a block
//! by executing transactions on an overlay of the parent state
//! ([`build_block`], what a BFT `propose` does), checks a peer's block the
//! same way ([`verify_block`], what `verify` does), and commits finalized
//! blocks through [`Store::commit`] in one write transaction each. The
//! [`DevChain`] is the one implementation today: a single authority that
//! seals on a timer or on demand.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, oneshot};

use crate::error::{LedgerError, TxError};
use crate::merkle;
use crate::runtime::{BlockContext, Runtime, accounts};
use crate::state::{Changes, Overlay, StateRead};
use crate::storage::{Snapshot, Store};
use crate::tx::SignedTx;
use crate::types::{Address, Block, BlockHeader, Hash32};

/// Something that turns submitted transactions into committed blocks.
/// RPC and tools are written against this trait, not the dev chain.
pub trait BlockProducer: Send + Sync + 'static {
    /// Admits a transaction to the pool after checking it against the
    /// pending state; the error says why it was refused.
    fn submit(&self, tx: SignedTx) -> Result<Hash32, LedgerError>;
    /// The next nonce of an account, counting pooled transactions.
    fn pending_nonce(&self, who: &Address) -> Result<u64, LedgerError>;
    /// Committed blocks, in order, as they are committed.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Block>>;
    /// The committed chain.
    fn store(&self) -> &Arc<Store>;
    /// The runtime.
    fn runtime(&self) -> &Runtime;
    /// Produces a block now if the engine can (the dev chain can; a BFT
    /// engine answers with an error).
    fn seal_now(&self) -> impl Future<Output = Result<Arc<Block>, LedgerError>> + Send;
}

/// A block built on an overlay, ready to commit.
#[derive(Debug)]
pub struct BuiltBlock {
    /// The block.
    pub block: Block,
    /// The state changes it makes.
    pub changes: Changes,
    /// Transactions left out because they failed, with the reason.
    pub rejected: Vec<(Hash32, TxError)>,
}

/// Builds a block on `parent`: runs the runtime on an overlay of `base`
/// (the parent's state), keeps the transactions that apply, computes the
/// state root with `root_with` and never writes.
pub fn build_block(
    runtime: &Runtime,
    base: &dyn StateRead,
    parent: &BlockHeader,
    candidates: Vec<SignedTx>,
    timestamp_ms: u64,
    root_with: impl Fn(&Changes) -> Hash32,
) -> Result<BuiltBlock, LedgerError> {
    let ctx = BlockContext {
        height: parent.height + 1,
        parent_hash: parent.hash(),
    };
    let mut overlay = Overlay::new(base);
    runtime.begin_block(&mut overlay, &ctx)?;
    let mut txs = Vec::with_capacity(candidates.len());
    let mut rejected = Vec::new();
    for tx in candidates {
        match runtime.apply_tx(&mut overlay, &ctx, &tx) {
            Ok(()) => txs.push(tx),
            Err(e) => rejected.push((tx.hash(), e)),
        }
    }
    let changes = overlay.into_changes();
    let hashes: Vec<Hash32> = txs.iter().map(|t| t.hash()).collect();
    let header = BlockHeader {
        height: ctx.height,
        parent_hash: ctx.parent_hash,
        state_root: root_with(&changes),
        tx_root: merkle::tx_root(&hashes),
        timestamp_ms,
    };
    Ok(BuiltBlock {
        block: Block { header, txs },
        changes,
        rejected,
    })
}

/// Re-executes `block` on an overlay of its parent's state and checks its
/// parent link, transaction root and state root. Returns the changes to
/// commit. Never writes.
pub fn verify_block(
    runtime: &Runtime,
    base: &dyn StateRead,
    parent: &BlockHeader,
    block: &Block,
    root_with: impl Fn(&Changes) -> Hash32,
) -> Result<Changes, LedgerError> {
    let h = &block.header;
    if h.height != parent.height + 1 || h.parent_hash != parent.hash() {
        return Err(LedgerError::InvalidBlock(
            "does not extend its parent".into(),
        ));
    }
    let hashes: Vec<Hash32> = block.txs.iter().map(|t| t.hash()).collect();
    if merkle::tx_root(&hashes) != h.tx_root {
        return Err(LedgerError::InvalidBlock(
            "transaction root mismatch".into(),
        ));
    }
    let ctx = BlockContext {
        height: h.height,
        parent_hash: h.parent_hash,
    };
    let mut overlay = Overlay::new(base);
    runtime.apply_block(&mut overlay, &ctx, &block.txs)?;
    let changes = overlay.into_changes();
    if root_with(&changes) != h.state_root {
        return Err(LedgerError::InvalidBlock("state root mismatch".into()));
    }
    Ok(changes)
}

/// Dev chain settings.
#[derive(Clone, Debug)]
pub struct DevChainConfig {
    /// Seal a block every `block_time` (empty blocks included, so epochs
    /// advance). `None`: seal right after each admitted transaction and on
    /// demand only.
    pub block_time: Option<Duration>,
    /// Most transactions waiting in the pool.
    pub max_pool: usize,
}

impl Default for DevChainConfig {
    fn default() -> Self {
        DevChainConfig {
            block_time: Some(Duration::from_secs(1)),
            max_pool: 100_000,
        }
    }
}

struct Pool {
    txs: Vec<SignedTx>,
    hashes: BTreeSet<Hash32>,
    /// Committed state plus the pooled transactions, to check new ones against.
    pending: Overlay<Snapshot>,
}

enum Cmd {
    Seal(Option<oneshot::Sender<Result<Arc<Block>, LedgerError>>>),
    Stop,
}

struct Inner {
    store: Arc<Store>,
    runtime: Runtime,
    pool: Mutex<Pool>,
    blocks: broadcast::Sender<Arc<Block>>,
    cmd: Mutex<mpsc::Sender<Cmd>>,
    config: DevChainConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The embedded dev chain: one authority sealing blocks on a timer or on
/// demand, persisting each to redb before announcing it.
#[derive(Clone)]
pub struct DevChain {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; carry on.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DevChain {
    /// Starts the producer thread over `store`.
    pub fn start(
        store: Arc<Store>,
        runtime: Runtime,
        config: DevChainConfig,
    ) -> Result<DevChain, LedgerError> {
        let (tx, rx) = mpsc::channel();
        let (blocks, _) = broadcast::channel(1024);
        let pending = pending_view(&runtime, &store)?;
        let inner = Arc::new(Inner {
            store,
            runtime,
            pool: Mutex::new(Pool {
                txs: Vec::new(),
                hashes: BTreeSet::new(),
                pending,
            }),
            blocks,
            cmd: Mutex::new(tx),
            config,
            thread: Mutex::new(None),
        });
        // The thread holds a weak reference, so dropping every handle
        // drops the command sender and ends the thread.
        let worker = Arc::downgrade(&inner);
        let block_time = inner.config.block_time;
        let handle = std::thread::Builder::new()
            .name("ledger-devchain".into())
            .spawn(move || Inner::run(worker, rx, block_time))?;
        *lock(&inner.thread) = Some(handle);
        Ok(DevChain { inner })
    }

    /// Stops the producer thread after the block in progress (dropping the
    /// last handle stops it too, without waiting).
    pub fn stop(&self) {
        let _ = lock(&self.inner.cmd).send(Cmd::Stop);
        if let Some(h) = lock(&self.inner.thread).take() {
            let _ = h.join();
        }
    }

    /// Transactions waiting in the pool.
    pub fn pool_len(&self) -> usize {
        lock(&self.inner.pool).txs.len()
    }
}

/// The committed state as the next block will see it before its
/// transactions (start-of-block and epoch work applied), so admission checks
/// match what sealing will do, also on the first block of an epoch.
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

impl Inner {
    fn run(inner: Weak<Inner>, rx: mpsc::Receiver<Cmd>, block_time: Option<Duration>) {
        let mut next = block_time.map(|d| Instant::now() + d);
        loop {
            let msg = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(m) => Some(m),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            let Some(this) = inner.upgrade() else {
                return;
            };
            match msg {
                Some(Cmd::Stop) => return,
                Some(Cmd::Seal(reply)) => {
                    let r = this.seal();
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                None => {
                    if let Err(e) = this.seal() {
                        tracing::error!(error = %e, "sealing failed");
                    }
                    if let (Some(at), Some(d)) = (next, block_time) {
                        // Keep a steady cadence without bursts after a stall.
                        next = Some((at + d).max(Instant::now()));
                    }
                }
            }
        }
    }

    fn seal(&self) -> Result<Arc<Block>, LedgerError> {
        let mut pool = lock(&self.pool);
        let snapshot = self.store.snapshot()?;
        let parent = snapshot.head().header.clone();
        let max = self.runtime.params.max_block_txs as usize;
        let mut candidates = std::mem::take(&mut pool.txs);
        let leftover = if candidates.len() > max {
            candidates.split_off(max)
        } else {
            Vec::new()
        };
        let built = build_block(
            &self.runtime,
            &snapshot,
            &parent,
            candidates,
            now_ms(),
            |c| self.store.root_with(c),
        )?;
        for (h, e) in &built.rejected {
            tracing::warn!(tx = %h, error = %e, "dropped transaction at sealing");
        }
        let block = Arc::new(built.block);
        self.store.commit(&block, built.changes)?;
        tracing::debug!(
            height = block.header.height,
            txs = block.txs.len(),
            "sealed block"
        );

        // Rebuild the pending view on the new head from what is left.
        pool.hashes.clear();
        pool.pending = pending_view(&self.runtime, &self.store)?;
        let ctx = BlockContext {
            height: block.header.height + 1,
            parent_hash: block.hash(),
        };
        for tx in leftover {
            if self.runtime.apply_tx(&mut pool.pending, &ctx, &tx).is_ok() {
                pool.hashes.insert(tx.hash());
                pool.txs.push(tx);
            }
        }
        drop(pool);
        let _ = self.blocks.send(Arc::clone(&block));
        Ok(block)
    }
}

impl BlockProducer for DevChain {
    fn submit(&self, tx: SignedTx) -> Result<Hash32, LedgerError> {
        let inner = &self.inner;
        let hash = tx.hash();
        {
            let mut pool = lock(&inner.pool);
            if pool.hashes.contains(&hash) {
                return Err(TxError::InvalidArgument("transaction already pending".into()).into());
            }
            if pool.txs.len() >= inner.config.max_pool {
                return Err(TxError::InvalidArgument("transaction pool is full".into()).into());
            }
            let head = pool.pending.base().head().clone();
            let ctx = BlockContext {
                height: head.header.height + 1,
                parent_hash: head.hash,
            };
            inner.runtime.apply_tx(&mut pool.pending, &ctx, &tx)?;
            pool.hashes.insert(hash);
            pool.txs.push(tx);
        }
        if inner.config.block_time.is_none() {
            let _ = lock(&inner.cmd).send(Cmd::Seal(None));
        }
        Ok(hash)
    }

    fn pending_nonce(&self, who: &Address) -> Result<u64, LedgerError> {
        let pool = lock(&self.inner.pool);
        Ok(accounts::account(&pool.pending, who)?.nonce)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Block>> {
        self.inner.blocks.subscribe()
    }

    fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    fn seal_now(&self) -> impl Future<Output = Result<Arc<Block>, LedgerError>> + Send {
        let (tx, rx) = oneshot::channel();
        let sent = lock(&self.inner.cmd).send(Cmd::Seal(Some(tx)));
        async move {
            sent.map_err(|_| LedgerError::ProducerStopped)?;
            rx.await.map_err(|_| LedgerError::ProducerStopped)?
        }
    }
}
