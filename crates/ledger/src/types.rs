//! Plain data types of the ledger: addresses, amounts, the state records
//! (accounts, subnets, nodes, vaults, epochs) and blocks.
//!
//! Every record is serde-serializable twice over: compactly with postcard for
//! the state and block encodings (the bytes the state root commits to) and
//! readably as JSON for RPC. `u128` amounts are decimal strings in JSON and
//! TOML, because JSON tooling and TOML integers lose precision above 2^53 / 2^63.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// An amount of the native token in its smallest unit; 10^18 units are one token.
pub type Amount = u128;
/// One token in smallest units.
pub const TOKEN: Amount = 1_000_000_000_000_000_000;
/// Subnet identifier, assigned sequentially from 1.
pub type SubnetId = u32;
/// Node identifier, assigned sequentially per subnet from 1.
pub type NodeId = u32;
/// Parts per million: the ledger's fixed-point unit for reputations, cuts and
/// thresholds (1_000_000 = 1.0). Integers keep consensus state bit-exact.
pub type Ppm = u32;
/// 1.0 in parts per million.
pub const PPM: Ppm = 1_000_000;

/// A 32-byte SHA-256 digest (block hashes, transaction hashes, state roots).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The all-zero hash, used as the genesis parent and the empty root.
    pub const ZERO: Hash32 = Hash32([0; 32]);

    /// SHA-256 of the concatenation of `parts`.
    pub fn digest(parts: &[&[u8]]) -> Hash32 {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        Hash32(h.finalize().into())
    }
}

/// An account address: the account's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Address(pub [u8; 32]);

macro_rules! hex32 {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), hex::encode(self.0))
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let s = s.strip_prefix("0x").unwrap_or(s);
                let bytes = hex::decode(s).map_err(|e| format!("bad hex: {e}"))?;
                let arr: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| "expected 32 bytes (64 hex characters)".to_string())?;
                Ok($t(arr))
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(self.0))
                } else {
                    self.0.serialize(s)
                }
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    Ok($t(<[u8; 32]>::deserialize(d)?))
                }
            }
        }
    };
}
hex32!(Hash32);
hex32!(Address);

/// Serde helper for `u128` amounts: a decimal string in human-readable formats
/// (JSON, TOML; integers are accepted too), a plain `u128` in postcard.
pub mod amount {
    use super::*;

    /// Serializes an amount.
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&v.to_string())
        } else {
            s.serialize_u128(*v)
        }
    }

    /// Deserializes an amount.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        if d.is_human_readable() {
            d.deserialize_any(AmountVisitor)
        } else {
            u128::deserialize(d)
        }
    }

    struct AmountVisitor;
    impl serde::de::Visitor<'_> for AmountVisitor {
        type Value = u128;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an amount as a decimal string or a non-negative integer")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u128, E> {
            v.parse().map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u128, E> {
            Ok(v.into())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<u128, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u128, E> {
            u128::try_from(v).map_err(E::custom)
        }
    }
}

/// Parses a token amount written in tokens with up to 18 decimals
/// (`"1.5"` is 1.5 tokens) into smallest units.
pub fn parse_tokens(s: &str) -> Result<Amount, String> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return Err("empty amount".into());
    }
    if frac.len() > 18 {
        return Err("more than 18 decimals".into());
    }
    let digits = |x: &str| x.chars().all(|c| c.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(format!("not a decimal number: {s}"));
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|e| format!("{e}"))?
    };
    let mut frac_units: u128 = 0;
    if !frac.is_empty() {
        let padded = format!("{frac:0<18}");
        frac_units = padded.parse().map_err(|e| format!("{e}"))?;
    }
    int.checked_mul(TOKEN)
        .and_then(|v| v.checked_add(frac_units))
        .ok_or_else(|| "amount too large".to_string())
}

/// Formats smallest units as tokens, trimming trailing zeros (`1.5`).
pub fn format_tokens(v: Amount) -> String {
    let int = v / TOKEN;
    let frac = v % TOKEN;
    if frac == 0 {
        return int.to_string();
    }
    let f = format!("{frac:018}");
    format!("{int}.{}", f.trim_end_matches('0'))
}

/// An account: a balance and the nonce its next transaction must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Free balance.
    #[serde(with = "amount")]
    pub balance: Amount,
    /// The nonce the next transaction from this account must carry.
    pub nonce: u64,
}

/// Lifecycle state of a subnet. Removal deletes the subnet from state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SubnetState {
    /// Registered, gathering nodes; no epochs run.
    Registered,
    /// Running epochs: elections, scores, emission.
    Active,
    /// Paused by its owner; no epochs run.
    Paused,
}

/// A subnet: one per served model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// Its id.
    pub id: SubnetId,
    /// Unique name, by convention the model id.
    pub name: String,
    /// The account that registered it and receives the owner's cut.
    pub owner: Address,
    /// Lifecycle state.
    pub state: SubnetState,
    /// Height of registration.
    pub registered_at: u64,
    /// Height of activation, if active once.
    pub activated_at: Option<u64>,
    /// Height of the pause, while paused.
    pub paused_at: Option<u64>,
    /// Minimum stake of a node.
    #[serde(with = "amount")]
    pub min_stake: Amount,
    /// Maximum stake a node may bond itself (rewards may exceed it).
    #[serde(with = "amount")]
    pub max_stake: Amount,
    /// Number of registered nodes.
    pub node_count: u32,
    /// Id the next node gets.
    pub next_node_id: NodeId,
    /// Subnet reputation in ppm; removed below the genesis minimum.
    pub reputation: Ppm,
    /// Consecutive epochs spent below the minimum node count while active.
    pub low_node_epochs: u32,
}

/// A node's class; higher classes take part in more of the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeClass {
    /// Just registered; not scored.
    Registered,
    /// Waiting one epoch before it is scored.
    Idle,
    /// Scored by the validator, paid by score share.
    Included,
    /// Also electable as validator and allowed to attest.
    Validator,
}

impl FromStr for NodeClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "registered" => Ok(NodeClass::Registered),
            "idle" => Ok(NodeClass::Idle),
            "included" => Ok(NodeClass::Included),
            "validator" => Ok(NodeClass::Validator),
            _ => Err(format!(
                "unknown class {s} (registered, idle, included, validator)"
            )),
        }
    }
}

/// A node of a subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Subnet it belongs to.
    pub subnet: SubnetId,
    /// Id within the subnet.
    pub id: NodeId,
    /// The account that owns the stake.
    pub coldkey: Address,
    /// The operational key that signs consensus calls.
    pub hotkey: Address,
    /// libp2p peer id, unique within the subnet.
    pub peer_id: String,
    /// Bonded stake.
    #[serde(with = "amount")]
    pub stake: Amount,
    /// Class.
    pub class: NodeClass,
    /// Reputation in ppm.
    pub reputation: Ppm,
    /// Epochs in consensus (scored above zero in an attested epoch) since it
    /// became Included; promotes it to Validator.
    pub consensus_epochs: u32,
    /// Height of registration.
    pub registered_at: u64,
    /// The last attested epoch in which it was Included or above, or `None`.
    pub last_epoch: Option<u64>,
    /// Its score in that epoch (0 when the validator gave it none).
    pub last_score: u64,
    /// The reward added to its stake for that epoch.
    #[serde(with = "amount")]
    pub last_reward: Amount,
}

/// A delegate-stake vault of one subnet. Delegators hold shares of it;
/// the delegators' emission cut raises the stake per share.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vault {
    /// Tokens in the vault.
    #[serde(with = "amount")]
    pub total_stake: Amount,
    /// Shares outstanding.
    #[serde(with = "amount")]
    pub total_shares: Amount,
}

/// Funds leaving stake or a vault, claimable once `unlock_at` is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbonding {
    /// Owner.
    pub owner: Address,
    /// Amount.
    #[serde(with = "amount")]
    pub amount: Amount,
    /// First height at which `claim` releases it.
    pub unlock_at: u64,
}

/// One score in a validator's proposal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeScore {
    /// The node scored.
    pub node: NodeId,
    /// Its score; rewards are paid in proportion to it.
    pub score: u64,
}

/// The current epoch of one active subnet: who validates, what was proposed, who attested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number (`height / epoch_length`).
    pub epoch: u64,
    /// The elected validator.
    pub validator: NodeId,
    /// The proposal, once made.
    pub proposal: Option<Vec<NodeScore>>,
    /// Validator-class nodes that attested (the proposer counts).
    pub attestations: BTreeSet<NodeId>,
}

/// An account bonded as a chain (block-producing) validator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainValidator {
    /// The bonding account; the bond returns to it through unbonding.
    pub address: Address,
    /// The Ed25519 key that signs consensus votes and identifies the node
    /// on the validators' p2p network. Unique among validators.
    pub consensus_key: Address,
    /// Bonded stake; the committee is the top N by bond.
    #[serde(with = "amount")]
    pub bond: Amount,
}

/// A block header. `timestamp_ms` is informational only: the runtime never
/// reads it, so no wall clock reaches consensus state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// Height; the genesis block is 0.
    pub height: u64,
    /// Hash of the parent header.
    pub parent_hash: Hash32,
    /// Merkle root of the state after this block.
    pub state_root: Hash32,
    /// Merkle root of the block's transaction hashes.
    pub tx_root: Hash32,
    /// Producer's wall-clock time, not used by the runtime.
    pub timestamp_ms: u64,
}

impl BlockHeader {
    /// The header hash (SHA-256 of its postcard encoding).
    pub fn hash(&self) -> Hash32 {
        match postcard::to_stdvec(self) {
            Ok(bytes) => Hash32::digest(&[b"hypertensor/header/v1", &bytes]),
            // A header is plain integers and byte arrays; encoding cannot fail.
            Err(_) => Hash32::ZERO,
        }
    }
}

/// A block: a header and the signed transactions it applied, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The header.
    pub header: BlockHeader,
    /// The transactions.
    pub txs: Vec<crate::tx::SignedTx>,
}

impl Block {
    /// The block hash (its header hash).
    pub fn hash(&self) -> Hash32 {
        self.header.hash()
    }
}

/// Where a committed transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxLocation {
    /// Block height.
    pub height: u64,
    /// Index in the block.
    pub index: u32,
}

/// The answer to `proof_of_stake(subnet, peer_id, min_class)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofOfStake {
    /// True when a node with this peer id is registered in the subnet with at
    /// least the subnet's minimum stake and at least `min_class`.
    pub staked: bool,
    /// The node, when one with this peer id exists.
    pub node: Option<Node>,
    /// Height of the state answered from.
    pub height: u64,
}

/// The epoch view of one subnet, as RPC returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochInfo {
    /// Head height.
    pub height: u64,
    /// Current epoch number.
    pub epoch: u64,
    /// Blocks per epoch.
    pub epoch_length: u64,
    /// Height at which the next epoch starts.
    pub next_epoch_at: u64,
    /// The subnet's epoch record, when it is active and has a validator.
    pub record: Option<EpochRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_parsing_round_trips() {
        assert_eq!(parse_tokens("1").unwrap(), TOKEN);
        assert_eq!(parse_tokens("1.5").unwrap(), TOKEN + TOKEN / 2);
        assert_eq!(parse_tokens(".000000000000000001").unwrap(), 1);
        assert!(parse_tokens("1.0000000000000000001").is_err());
        assert!(parse_tokens("abc").is_err());
        assert_eq!(format_tokens(TOKEN + TOKEN / 2), "1.5");
        assert_eq!(format_tokens(3 * TOKEN), "3");
    }

    #[test]
    fn amounts_are_strings_in_json_and_exact() {
        let a = Account {
            balance: u128::MAX,
            nonce: 3,
        };
        let j = serde_json::to_string(&a).unwrap();
        assert!(j.contains(&format!("\"{}\"", u128::MAX)));
        let back: Account = serde_json::from_str(&j).unwrap();
        assert_eq!(back, a);
        let from_int: Account = serde_json::from_str(r#"{"balance":5,"nonce":0}"#).unwrap();
        assert_eq!(from_int.balance, 5);
        let bin = postcard::to_stdvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<Account>(&bin).unwrap(), a);
    }
}
