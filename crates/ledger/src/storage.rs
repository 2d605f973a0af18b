//! redb storage: the committed state, the block log, the transaction index
//! and the chain head.
//!
//! A block is committed in ONE redb write transaction (state changes, the
//! block, its transaction index entries and the new head) with immediate
//! durability, so after a crash the database holds either all of a block or
//! none of it, and restarting resumes at the last committed block. The
//! in-memory backend (`redb::backends::InMemoryBackend`) gives tests the same
//! code path without a disk.

use std::path::Path;
use std::sync::{Mutex, RwLock};

use redb::{Database, ReadOnlyTable, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{LedgerError, StateError};
use crate::genesis::Genesis;
use crate::merkle::StateCommitment;
use crate::runtime::Runtime;
use crate::state::{Changes, StateRead};
use crate::types::{Block, BlockHeader, Hash32, TxLocation};

const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");
const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const TXS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("txs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_HEAD: &str = "head";
const META_GENESIS: &str = "genesis_hash";

/// The committed chain head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The head block's header.
    pub header: BlockHeader,
    /// Its hash.
    pub hash: Hash32,
}

/// The redb-backed chain store.
pub struct Store {
    db: Database,
    commitment: Mutex<StateCommitment>,
    head: RwLock<Head>,
    genesis_hash: Hash32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("head", &self.head()).finish()
    }
}

/// A read-only view of the committed state at one head.
pub struct Snapshot {
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    head: Head,
}

impl Snapshot {
    /// The head this snapshot shows.
    pub fn head(&self) -> &Head {
        &self.head
    }
}

fn backend(e: impl std::fmt::Display) -> StateError {
    StateError::Backend(e.to_string())
}

impl StateRead for Snapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .table
            .get(key)
            .map_err(backend)?
            .map(|g| g.value().to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<crate::state::Entries, StateError> {
        let mut out = Vec::new();
        for item in self.table.range::<&[u8]>(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn codec(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Codec(e.to_string())
}

impl Store {
    /// Opens (or creates) the database at `path`, initialising it from
    /// `genesis` when new, and checking it belongs to `genesis` otherwise.
    pub fn open(path: &Path, runtime: &Runtime, genesis: &Genesis) -> Result<Store, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path)?;
        Store::init(db, runtime, genesis)
    }

    /// A fresh store on redb's in-memory backend.
    pub fn open_in_memory(runtime: &Runtime, genesis: &Genesis) -> Result<Store, LedgerError> {
        let db = redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Store::init(db, runtime, genesis)
    }

    fn init(db: Database, runtime: &Runtime, genesis: &Genesis) -> Result<Store, LedgerError> {
        let genesis_changes = runtime.genesis_changes(genesis)?;
        let mut genesis_commitment = StateCommitment::default();
        genesis_commitment.apply(&genesis_changes);
        let genesis_header = BlockHeader {
            height: 0,
            parent_hash: Hash32::ZERO,
            state_root: genesis_commitment.root(),
            tx_root: Hash32::ZERO,
            timestamp_ms: 0,
        };
        let genesis_hash = genesis_header.hash();

        let stored: Option<Hash32> = {
            let r = db.begin_read()?;
            match r.open_table(META) {
                Ok(t) => match t.get(META_GENESIS)? {
                    Some(g) => Some(postcard::from_bytes(g.value()).map_err(codec)?),
                    None => None,
                },
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            }
        };

        match stored {
            None => {
                let block = Block {
                    header: genesis_header.clone(),
                    txs: vec![],
                };
                let head = Head {
                    header: genesis_header,
                    hash: genesis_hash,
                };
                let w = db.begin_write()?;
                {
                    let mut m = w.open_table(META)?;
                    m.insert(
                        META_GENESIS,
                        postcard::to_stdvec(&genesis_hash)
                            .map_err(codec)?
                            .as_slice(),
                    )?;
                }
                Store::write_block(&w, &block, &head, &genesis_changes)?;
                w.commit()?;
                tracing::info!(genesis = %genesis_hash, "initialised new chain");
                Ok(Store {
                    db,
                    commitment: Mutex::new(genesis_commitment),
                    head: RwLock::new(head),
                    genesis_hash,
                })
            }
            Some(g) if g != genesis_hash => Err(LedgerError::ChainMismatch(format!(
                "database holds chain {g}, genesis file gives {genesis_hash}"
            ))),
            Some(_) => {
                let (head, commitment) = {
                    let r = db.begin_read()?;
                    let m = r.open_table(META)?;
                    let head: Head = match m.get(META_HEAD)? {
                        Some(h) => postcard::from_bytes(h.value()).map_err(codec)?,
                        None => return Err(LedgerError::Db("missing head".into())),
                    };
                    let t = r.open_table(STATE)?;
                    let mut entries = Vec::with_capacity(t.len()? as usize);
                    for item in t.iter()? {
                        let (k, v) = item?;
                        entries.push((k.value().to_vec(), v.value().to_vec()));
                    }
                    let c = StateCommitment::from_entries(
                        entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                    );
                    (head, c)
                };
                if commitment.root() != head.header.state_root {
                    return Err(LedgerError::Db(format!(
                        "state root mismatch at height {}: stored state does not match the head",
                        head.header.height
                    )));
                }
                tracing::info!(height = head.header.height, hash = %head.hash, "resumed chain");
                Ok(Store {
                    db,
                    commitment: Mutex::new(commitment),
                    head: RwLock::new(head),
                    genesis_hash,
                })
            }
        }
    }

    fn write_block(
        w: &redb::WriteTransaction,
        block: &Block,
        head: &Head,
        changes: &Changes,
    ) -> Result<(), LedgerError> {
        {
            let mut t = w.open_table(STATE)?;
            for (k, v) in changes {
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice())?;
                    }
                    None => {
                        t.remove(k.as_slice())?;
                    }
                }
            }
        }
        {
            let mut b = w.open_table(BLOCKS)?;
            b.insert(
                block.header.height,
                postcard::to_stdvec(block).map_err(codec)?.as_slice(),
            )?;
        }
        {
            let mut x = w.open_table(TXS)?;
            for (i, tx) in block.txs.iter().enumerate() {
                let loc = TxLocation {
                    height: block.header.height,
                    index: i as u32,
                };
                x.insert(
                    tx.hash().0.as_slice(),
                    postcard::to_stdvec(&loc).map_err(codec)?.as_slice(),
                )?;
            }
        }
        {
            let mut m = w.open_table(META)?;
            m.insert(
                META_HEAD,
                postcard::to_stdvec(head).map_err(codec)?.as_slice(),
            )?;
        }
        Ok(())
    }

    /// The genesis block hash, the chain's identity.
    pub fn genesis_hash(&self) -> Hash32 {
        self.genesis_hash
    }

    /// The committed head.
    pub fn head(&self) -> Head {
        match self.head.read() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// A read-only snapshot of the committed state.
    pub fn snapshot(&self) -> Result<Snapshot, LedgerError> {
        // Hold the head lock so the snapshot and its head agree.
        let guard = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let r = self.db.begin_read()?;
        let table = r.open_table(STATE)?;
        Ok(Snapshot {
            table,
            head: guard.clone(),
        })
    }

    /// The state root after applying `changes` to the committed state.
    pub fn root_with(&self, changes: &Changes) -> Hash32 {
        match self.commitment.lock() {
            Ok(c) => c.root_with(changes),
            Err(p) => p.into_inner().root_with(changes),
        }
    }

    /// Commits a block built on the current head, with the state changes it
    /// produced, in one durable write transaction.
    pub fn commit(&self, block: &Block, changes: Changes) -> Result<(), LedgerError> {
        let mut head = match self.head.write() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        if block.header.parent_hash != head.hash || block.header.height != head.header.height + 1 {
            return Err(LedgerError::InvalidBlock(format!(
                "block {} does not extend head {}",
                block.header.height, head.header.height
            )));
        }
        let new_head = Head {
            header: block.header.clone(),
            hash: block.hash(),
        };
        let w = self.db.begin_write()?;
        Store::write_block(&w, block, &new_head, &changes)?;
        w.commit()?;
        match self.commitment.lock() {
            Ok(mut c) => c.apply(&changes),
            Err(p) => p.into_inner().apply(&changes),
        }
        *head = new_head;
        Ok(())
    }

    /// The block at `height`.
    pub fn block(&self, height: u64) -> Result<Option<Block>, LedgerError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(BLOCKS)?;
        match t.get(height)? {
            Some(b) => Ok(Some(postcard::from_bytes(b.value()).map_err(codec)?)),
            None => Ok(None),
        }
    }

    /// Where a committed transaction is.
    pub fn tx_location(&self, hash: &Hash32) -> Result<Option<TxLocation>, LedgerError> {
        let r = self.db.begin_read()?;
        let t = match r.open_table(TXS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match t.get(hash.0.as_slice())? {
            Some(b) => Ok(Some(postcard::from_bytes(b.value()).map_err(codec)?)),
            None => Ok(None),
        }
    }
}
