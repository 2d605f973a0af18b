//! The state interface the runtime reads and writes through, and its
//! in-memory implementations.
//!
//! The runtime sees a sorted key-value map ([`StateRead`] + [`State`]). An
//! [`Overlay`] buffers writes over a read-only base: block production (and a
//! BFT engine's `propose`/`verify`) executes on an overlay of the parent
//! state and never writes; the resulting [`Changes`] go to redb in one write
//! transaction when the block is committed. Overlays nest, which is how a
//! failing transaction is discarded without touching its block.
//!
//! Keys are built in [`keys`] with big-endian integers so that prefix scans
//! return records in id order. No hash maps: iteration order is the key order.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StateError;

/// A set of writes: `Some(value)` puts, `None` deletes.
pub type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Key-value entries in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Read access to a sorted key-value state.
pub trait StateRead {
    /// The value under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError>;
}

/// Write access on top of [`StateRead`]. Writes cannot fail: implementations buffer them.
pub trait State: StateRead {
    /// Stores `value` under `key`.
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    /// Deletes `key`.
    fn delete(&mut self, key: &[u8]);
}

impl<T: StateRead + ?Sized> StateRead for &T {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        (**self).get(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        (**self).scan_prefix(prefix)
    }
}

/// Uncommitted writes over a read-only base.
#[derive(Debug, Clone)]
pub struct Overlay<B> {
    base: B,
    changes: Changes,
}

impl<B: StateRead> Overlay<B> {
    /// An empty overlay over `base`.
    pub fn new(base: B) -> Self {
        Overlay {
            base,
            changes: Changes::new(),
        }
    }

    /// The buffered writes.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Gives up the base and returns the buffered writes.
    pub fn into_changes(self) -> Changes {
        self.changes
    }

    /// The base.
    pub fn base(&self) -> &B {
        &self.base
    }

    /// Applies `changes` on top of the buffered ones (a child overlay's result).
    pub fn merge(&mut self, changes: Changes) {
        self.changes.extend(changes);
    }
}

impl<B: StateRead> StateRead for Overlay<B> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        let touched = self
            .changes
            .range(prefix.to_vec()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix));
        if !touched {
            // The common case in the epoch step: skip the merge map.
            return self.base.scan_prefix(prefix);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.base.scan_prefix(prefix)?.into_iter().collect();
        for (k, v) in self
            .changes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().collect())
    }
}

impl<B: StateRead> State for Overlay<B> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(value));
    }
    fn delete(&mut self, key: &[u8]) {
        self.changes.insert(key.to_vec(), None);
    }
}

/// A whole state in memory: the base for pure tests, simulations and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    /// The entries.
    pub entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemState {
    /// Applies a change set.
    pub fn apply(&mut self, changes: Changes) {
        for (k, v) in changes {
            match v {
                Some(v) => {
                    self.entries.insert(k, v);
                }
                None => {
                    self.entries.remove(&k);
                }
            }
        }
    }
}

impl StateRead for MemState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.entries.get(key).cloned())
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        Ok(self
            .entries
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl State for MemState {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.entries.insert(key, value);
    }
    fn delete(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }
}

/// Encodes a record for the state (postcard: compact and canonical).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Postcard into a Vec only fails on types serde cannot express, and
    // every state record is plain data.
    postcard::to_stdvec(v).unwrap_or_default()
}

/// Decodes a record, reporting the key on failure.
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StateError> {
    postcard::from_bytes(bytes).map_err(|e| StateError::Corrupt {
        key: hex::encode(key),
        why: e.to_string(),
    })
}

/// Reads and decodes a record.
pub fn get_value<T: DeserializeOwned>(
    s: &(impl StateRead + ?Sized),
    key: &[u8],
) -> Result<Option<T>, StateError> {
    match s.get(key)? {
        Some(b) => Ok(Some(decode(key, &b)?)),
        None => Ok(None),
    }
}

/// Encodes and writes a record.
pub fn put_value<T: Serialize>(s: &mut (impl State + ?Sized), key: Vec<u8>, v: &T) {
    s.put(key, encode(v));
}

/// Reads and decodes every record under a prefix, in key order.
pub fn scan_values<T: DeserializeOwned>(
    s: &(impl StateRead + ?Sized),
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, T)>, StateError> {
    s.scan_prefix(prefix)?
        .into_iter()
        .map(|(k, v)| {
            let t = decode(&k, &v)?;
            Ok((k, t))
        })
        .collect()
}

/// The state's key schema. Integers are big-endian so prefix scans return ids in order.
pub mod keys {
    use crate::types::{Address, NodeId, SubnetId};

    /// Total issuance (`u128`).
    pub const ISSUANCE: &[u8] = b"g/issuance";
    /// Subnet registration fee state ([`crate::runtime::SubnetFeeState`]).
    pub const SUBNET_FEE: &[u8] = b"g/subnet_fee";
    /// Next subnet id (`u32`).
    pub const NEXT_SUBNET: &[u8] = b"g/next_subnet";
    /// Next unbonding sequence number (`u64`).
    pub const UNBOND_SEQ: &[u8] = b"g/unbond_seq";
    /// Randomness accumulator (`Hash32`).
    pub const RANDOMNESS: &[u8] = b"g/randomness";
    /// The genesis params, committed so the state root covers the rules.
    pub const PARAMS: &[u8] = b"g/params";
    /// Prefix of subnet records.
    pub const SUBNET_PREFIX: &[u8] = b"s/";
    /// Prefix of accounts.
    pub const ACCOUNT_PREFIX: &[u8] = b"a/";
    /// Prefix of nodes.
    pub const NODE_PREFIX: &[u8] = b"n/";
    /// Prefix of unbonding entries.
    pub const UNBONDING_PREFIX: &[u8] = b"u/";
    /// Prefix of vaults.
    pub const VAULT_PREFIX: &[u8] = b"v/";
    /// Prefix of chain validators.
    pub const CHAIN_VALIDATOR_PREFIX: &[u8] = b"cv/";

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// An account.
    pub fn account(a: &Address) -> Vec<u8> {
        cat(&[ACCOUNT_PREFIX, &a.0])
    }
    /// A subnet.
    pub fn subnet(id: SubnetId) -> Vec<u8> {
        cat(&[SUBNET_PREFIX, &id.to_be_bytes()])
    }
    /// Subnet name index.
    pub fn subnet_name(name: &str) -> Vec<u8> {
        cat(&[b"sn/", name.as_bytes()])
    }
    /// A node.
    pub fn node(subnet: SubnetId, id: NodeId) -> Vec<u8> {
        cat(&[NODE_PREFIX, &subnet.to_be_bytes(), &id.to_be_bytes()])
    }
    /// All nodes of a subnet.
    pub fn node_prefix(subnet: SubnetId) -> Vec<u8> {
        cat(&[NODE_PREFIX, &subnet.to_be_bytes()])
    }
    /// Peer id index of a subnet.
    pub fn node_peer(subnet: SubnetId, peer_id: &str) -> Vec<u8> {
        cat(&[b"np/", &subnet.to_be_bytes(), peer_id.as_bytes()])
    }
    /// Hotkey index of a subnet.
    pub fn node_hotkey(subnet: SubnetId, hotkey: &Address) -> Vec<u8> {
        cat(&[b"nh/", &subnet.to_be_bytes(), &hotkey.0])
    }
    /// An unbonding entry.
    pub fn unbonding(owner: &Address, unlock_at: u64, seq: u64) -> Vec<u8> {
        cat(&[
            UNBONDING_PREFIX,
            &owner.0,
            &unlock_at.to_be_bytes(),
            &seq.to_be_bytes(),
        ])
    }
    /// All unbonding entries of an owner, in unlock order.
    pub fn unbonding_prefix(owner: &Address) -> Vec<u8> {
        cat(&[UNBONDING_PREFIX, &owner.0])
    }
    /// A subnet's vault.
    pub fn vault(subnet: SubnetId) -> Vec<u8> {
        cat(&[VAULT_PREFIX, &subnet.to_be_bytes()])
    }
    /// A delegator's shares in a subnet's vault.
    pub fn delegation(subnet: SubnetId, who: &Address) -> Vec<u8> {
        cat(&[b"d/", &subnet.to_be_bytes(), &who.0])
    }
    /// All delegations of a subnet.
    pub fn delegation_prefix(subnet: SubnetId) -> Vec<u8> {
        cat(&[b"d/", &subnet.to_be_bytes()])
    }
    /// A chain validator, by bonding account.
    pub fn chain_validator(a: &Address) -> Vec<u8> {
        cat(&[CHAIN_VALIDATOR_PREFIX, &a.0])
    }
    /// Consensus-key index of chain validators (keys are unique).
    pub fn consensus_key(k: &Address) -> Vec<u8> {
        cat(&[b"ck/", &k.0])
    }
    /// The committee of a chain epoch, recorded when the epoch's first block runs.
    pub fn committee(epoch: u64) -> Vec<u8> {
        cat(&[b"ce/", &epoch.to_be_bytes()])
    }
    /// A subnet's current epoch: epoch number, validator, whether proposed.
    pub fn epoch(subnet: SubnetId) -> Vec<u8> {
        cat(&[b"e/", &subnet.to_be_bytes()])
    }
    /// The current epoch's proposal (scores) of a subnet.
    pub fn epoch_proposal(subnet: SubnetId) -> Vec<u8> {
        cat(&[b"ep/", &subnet.to_be_bytes()])
    }
    /// One node's attestation of the current epoch. One key per attestor
    /// keeps `attest` O(log n) however many nodes the subnet has.
    pub fn epoch_attestation(subnet: SubnetId, node: NodeId) -> Vec<u8> {
        cat(&[b"ea/", &subnet.to_be_bytes(), &node.to_be_bytes()])
    }
    /// All attestations of a subnet's current epoch.
    pub fn epoch_attestation_prefix(subnet: SubnetId) -> Vec<u8> {
        cat(&[b"ea/", &subnet.to_be_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_shadows_and_scans_in_order() {
        let mut base = MemState::default();
        base.put(b"p/1".to_vec(), b"a".to_vec());
        base.put(b"p/3".to_vec(), b"c".to_vec());
        base.put(b"q/1".to_vec(), b"z".to_vec());
        let mut o = Overlay::new(&base);
        o.put(b"p/2".to_vec(), b"b".to_vec());
        o.delete(b"p/3");
        assert_eq!(o.get(b"p/3").unwrap(), None);
        assert_eq!(o.get(b"q/1").unwrap(), Some(b"z".to_vec()));
        let keys: Vec<_> = o
            .scan_prefix(b"p/")
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(keys, vec![b"p/1".to_vec(), b"p/2".to_vec()]);
        // Base untouched until applied.
        assert_eq!(base.get(b"p/3").unwrap(), Some(b"c".to_vec()));
        let ch = o.into_changes();
        base.apply(ch);
        assert_eq!(base.get(b"p/3").unwrap(), None);
    }
}
