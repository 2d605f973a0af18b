//! The state root: a binary Merkle tree (rs_merkle, SHA-256) over the
//! state's entries in key order.
//!
//! Leaf `i` is `SHA-256(0x00 || len(key) || key || SHA-256(value))` for the
//! `i`-th key; the root of an empty state is all zeros.
//!
//! Why not the `jmt` crate: a Jellyfish Merkle tree stores versioned tree
//! nodes, which needs its own node store in redb plus an overlay of uncommitted
//! nodes for speculative (BFT `propose`/`verify`) execution, roughly doubling
//! the storage layer; it also pulls borsh and friends. rs_merkle is small
//! (only sha2) and well kept. The cost is O(n) hashing per block: we keep
//! every leaf hash in memory ([`StateCommitment`]), rehash only changed
//! entries, and rebuild the tree over the leaf hashes, which takes a few
//! milliseconds for tens of thousands of entries. If the state grows to
//! millions of entries, this module is the one place to swap in a sparse
//! Merkle tree; the root is an opaque [`Hash32`] everywhere else.

use std::collections::BTreeMap;

use rs_merkle::MerkleTree;
use rs_merkle::algorithms::Sha256;
use sha2::Digest;

use crate::state::Changes;
use crate::types::Hash32;

/// The hash of one state entry.
pub fn leaf_hash(key: &[u8], value: &[u8]) -> [u8; 32] {
    let vh: [u8; 32] = sha2::Sha256::digest(value).into();
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update((key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(vh);
    h.finalize().into()
}

/// The Merkle root over leaf hashes in order (zeros when empty).
pub fn root_of(leaves: &[[u8; 32]]) -> Hash32 {
    if leaves.is_empty() {
        return Hash32::ZERO;
    }
    MerkleTree::<Sha256>::from_leaves(leaves)
        .root()
        .map(Hash32)
        .unwrap_or(Hash32::ZERO)
}

/// The root over a list of transaction hashes.
pub fn tx_root(hashes: &[Hash32]) -> Hash32 {
    let leaves: Vec<[u8; 32]> = hashes.iter().map(|h| h.0).collect();
    root_of(&leaves)
}

/// Every leaf hash of the committed state, to compute roots incrementally.
#[derive(Clone, Debug, Default)]
pub struct StateCommitment {
    leaves: BTreeMap<Vec<u8>, [u8; 32]>,
}

impl StateCommitment {
    /// Builds the commitment from every entry of a state.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        StateCommitment {
            leaves: entries
                .into_iter()
                .map(|(k, v)| (k.to_vec(), leaf_hash(k, v)))
                .collect(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// True when the state is empty.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The root of the committed state.
    pub fn root(&self) -> Hash32 {
        let leaves: Vec<[u8; 32]> = self.leaves.values().copied().collect();
        root_of(&leaves)
    }

    /// The root the state would have after `changes`, without applying them.
    pub fn root_with(&self, changes: &Changes) -> Hash32 {
        let mut out = Vec::with_capacity(self.leaves.len() + changes.len());
        let mut base = self.leaves.iter().peekable();
        let mut ch = changes.iter().peekable();
        loop {
            match (base.peek(), ch.peek()) {
                (None, None) => break,
                (Some((_, h)), None) => {
                    out.push(**h);
                    base.next();
                }
                (None, Some((k, v))) => {
                    if let Some(v) = v {
                        out.push(leaf_hash(k, v));
                    }
                    ch.next();
                }
                (Some((bk, bh)), Some((k, v))) => match bk.as_slice().cmp(k.as_slice()) {
                    std::cmp::Ordering::Less => {
                        out.push(**bh);
                        base.next();
                    }
                    std::cmp::Ordering::Greater => {
                        if let Some(v) = v {
                            out.push(leaf_hash(k, v));
                        }
                        ch.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if let Some(v) = v {
                            out.push(leaf_hash(k, v));
                        }
                        base.next();
                        ch.next();
                    }
                },
            }
        }
        root_of(&out)
    }

    /// Applies committed changes.
    pub fn apply(&mut self, changes: &Changes) {
        for (k, v) in changes {
            match v {
                Some(v) => {
                    self.leaves.insert(k.clone(), leaf_hash(k, v));
                }
                None => {
                    self.leaves.remove(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_with_equals_root_after_apply() {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0u32..50)
            .map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; 3]))
            .collect();
        let mut c = StateCommitment::from_entries(entries.iter().map(|(k, v)| (&k[..], &v[..])));
        let mut ch = Changes::new();
        ch.insert(3u32.to_be_bytes().to_vec(), None);
        ch.insert(7u32.to_be_bytes().to_vec(), Some(b"x".to_vec()));
        ch.insert(100u32.to_be_bytes().to_vec(), Some(b"y".to_vec()));
        ch.insert(200u32.to_be_bytes().to_vec(), None);
        let predicted = c.root_with(&ch);
        assert_ne!(predicted, c.root());
        c.apply(&ch);
        assert_eq!(predicted, c.root());
        assert_eq!(c.len(), 50);
        assert_eq!(StateCommitment::default().root(), Hash32::ZERO);
    }
}
