//! The ledger block as commonware sees it: a [`ChainBlock`] wraps a
//! [`ledger::Block`] with the codec, digest and height traits that simplex
//! and marshal need.
//!
//! The digest is the ledger's header hash, so a block has one identity in
//! redb, JSON-RPC and consensus. The header commits to the transactions only
//! through `tx_root`, so decoding re-derives the root and rejects a block
//! whose transactions do not match it: a peer cannot pair a finalized
//! header with other transactions. Encoding is postcard, which is checked
//! to be canonical on decode (re-encoding must give the same bytes).

use bytes::{BufMut, Bytes};
use commonware_codec::{
    Buf, EncodeSize, Error as CodecError, Read, ReadExt as _, Write, varint::UInt,
};
use commonware_consensus::types::Height;
use commonware_cryptography::{Digestible, sha256::Digest};
use ledger::Hash32;

/// Largest encoded block a node accepts by default (4 MiB).
pub const DEFAULT_MAX_BLOCK_BYTES: usize = 4 * 1024 * 1024;

/// A ledger block with its cached digest and encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBlock {
    block: ledger::Block,
    digest: Digest,
    encoded: Bytes,
}

/// Converts a ledger hash into a commonware digest (same 32 bytes).
pub fn digest_of(h: &Hash32) -> Digest {
    Digest(h.0)
}

/// Converts a commonware digest into a ledger hash.
pub fn hash_of(d: &Digest) -> Hash32 {
    Hash32(d.0)
}

impl ChainBlock {
    /// Wraps a ledger block, computing its digest and encoding once.
    pub fn new(block: ledger::Block) -> ChainBlock {
        let digest = digest_of(&block.hash());
        // Postcard into a Vec fails only for types serde cannot express;
        // a block is plain data.
        let encoded = Bytes::from(postcard::to_stdvec(&block).unwrap_or_default());
        ChainBlock {
            block,
            digest,
            encoded,
        }
    }

    /// The ledger block.
    pub fn block(&self) -> &ledger::Block {
        &self.block
    }

    /// The ledger hash (equal to the digest).
    pub fn hash(&self) -> Hash32 {
        hash_of(&self.digest)
    }

    /// The height as a plain integer.
    pub fn number(&self) -> u64 {
        self.block.header.height
    }

    /// Size of the postcard encoding.
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }
}

impl Write for ChainBlock {
    fn write(&self, buf: &mut impl BufMut) {
        UInt(self.encoded.len() as u64).write(buf);
        buf.put_slice(&self.encoded);
    }
}

impl EncodeSize for ChainBlock {
    fn encode_size(&self) -> usize {
        UInt(self.encoded.len() as u64).encode_size() + self.encoded.len()
    }
}

impl Read for ChainBlock {
    /// The largest encoded block accepted.
    type Cfg = usize;

    fn read_cfg(buf: &mut impl Buf, max: &usize) -> Result<Self, CodecError> {
        let len: u64 = UInt::read(buf)?.into();
        let len = usize::try_from(len).map_err(|_| CodecError::InvalidUsize)?;
        if len > *max {
            return Err(CodecError::InvalidLength(len));
        }
        if buf.remaining() < len {
            return Err(CodecError::EndOfBuffer);
        }
        let bytes = buf.copy_to_bytes(len);
        let block: ledger::Block = postcard::from_bytes(&bytes)
            .map_err(|_| CodecError::Invalid("ChainBlock", "not a postcard ledger block"))?;
        let hashes: Vec<Hash32> = block.txs.iter().map(|t| t.hash()).collect();
        if ledger::merkle::tx_root(&hashes) != block.header.tx_root {
            return Err(CodecError::Invalid(
                "ChainBlock",
                "transactions do not match tx_root",
            ));
        }
        let this = ChainBlock::new(block);
        if this.encoded != bytes {
            return Err(CodecError::Invalid("ChainBlock", "non-canonical encoding"));
        }
        Ok(this)
    }
}

impl Digestible for ChainBlock {
    type Digest = Digest;

    fn digest(&self) -> Digest {
        self.digest
    }
}

impl commonware_consensus::Heightable for ChainBlock {
    fn height(&self) -> Height {
        Height::new(self.block.header.height)
    }
}

impl commonware_consensus::Block for ChainBlock {
    fn parent(&self) -> Digest {
        digest_of(&self.block.header.parent_hash)
    }
}

impl commonware_consensus::BoundedBlock for ChainBlock {
    fn max_encode_size(max: &usize) -> usize {
        UInt(*max as u64).encode_size() + *max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commonware_codec::{Decode, Encode};
    use ledger::{BlockHeader, Call, Keypair, Tx};

    fn sample() -> ChainBlock {
        let k = Keypair::from_seed([3; 32]);
        let tx = Tx {
            signer: k.address(),
            nonce: 0,
            call: Call::Claim,
        }
        .sign(&k, "t");
        let header = BlockHeader {
            height: 5,
            parent_hash: Hash32([1; 32]),
            state_root: Hash32([2; 32]),
            tx_root: ledger::merkle::tx_root(&[tx.hash()]),
            timestamp_ms: 9,
        };
        ChainBlock::new(ledger::Block {
            header,
            txs: vec![tx],
        })
    }

    #[test]
    fn round_trips_and_digest_is_the_header_hash() {
        let b = sample();
        let bytes = b.encode();
        assert_eq!(bytes.len(), b.encode_size());
        let back = ChainBlock::decode_cfg(bytes, &DEFAULT_MAX_BLOCK_BYTES).unwrap();
        assert_eq!(back, b);
        assert_eq!(hash_of(&back.digest()), b.block().hash());
    }

    #[test]
    fn rejects_swapped_transactions_and_oversize() {
        let mut inner = sample().block().clone();
        inner.txs.clear();
        let tampered = ChainBlock::new(inner);
        assert!(ChainBlock::decode_cfg(tampered.encode(), &DEFAULT_MAX_BLOCK_BYTES).is_err());
        let b = sample();
        assert!(ChainBlock::decode_cfg(b.encode(), &10).is_err());
    }
}
