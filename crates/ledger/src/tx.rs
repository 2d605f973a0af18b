//! Signed transactions: the calls, signing and verification, and key files.
//!
//! A transaction is signed over a domain tag, the chain id and the postcard
//! encoding of its body, so a signature is valid on one chain only; the
//! per-account nonce makes it valid once.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{LedgerError, TxError};
use crate::types::{Address, Amount, Hash32, NodeId, NodeScore, SubnetId, amount};

/// What a transaction does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Move balance to another account.
    Transfer {
        /// Recipient.
        to: Address,
        /// Amount.
        #[serde(with = "amount")]
        amount: Amount,
    },
    /// Register a subnet, paying the current registration fee (burned).
    RegisterSubnet {
        /// Unique name, by convention the model id.
        name: String,
        /// Minimum node stake.
        #[serde(with = "amount")]
        min_stake: Amount,
        /// Maximum node stake.
        #[serde(with = "amount")]
        max_stake: Amount,
    },
    /// Activate a registered subnet (owner only, needs the minimum node count).
    ActivateSubnet {
        /// Subnet.
        subnet: SubnetId,
    },
    /// Pause an active subnet (owner only).
    PauseSubnet {
        /// Subnet.
        subnet: SubnetId,
    },
    /// Resume a paused subnet (owner only).
    UnpauseSubnet {
        /// Subnet.
        subnet: SubnetId,
    },
    /// Register a node; the signer is its coldkey and the stake is bonded from it.
    RegisterNode {
        /// Subnet.
        subnet: SubnetId,
        /// Hotkey that signs the node's consensus calls.
        hotkey: Address,
        /// libp2p peer id, unique in the subnet.
        peer_id: String,
        /// Initial stake.
        #[serde(with = "amount")]
        stake: Amount,
    },
    /// Bond more stake to a node (coldkey only).
    AddStake {
        /// Subnet.
        subnet: SubnetId,
        /// Node.
        node: NodeId,
        /// Amount.
        #[serde(with = "amount")]
        amount: Amount,
    },
    /// Unbond stake (coldkey only); removing all of it deregisters the node.
    RemoveStake {
        /// Subnet.
        subnet: SubnetId,
        /// Node.
        node: NodeId,
        /// Amount.
        #[serde(with = "amount")]
        amount: Amount,
    },
    /// Release every unbonding entry of the signer that has matured.
    Claim,
    /// Deposit into a subnet's delegate-stake vault for shares.
    Delegate {
        /// Subnet.
        subnet: SubnetId,
        /// Amount.
        #[serde(with = "amount")]
        amount: Amount,
    },
    /// Redeem vault shares; the tokens unbond over the delegate cooldown.
    Undelegate {
        /// Subnet.
        subnet: SubnetId,
        /// Shares to redeem.
        #[serde(with = "amount")]
        shares: Amount,
    },
    /// The elected validator's scores for the epoch (hotkey; once; free).
    ProposeAttestation {
        /// Subnet.
        subnet: SubnetId,
        /// Scores of Included and Validator nodes.
        scores: Vec<NodeScore>,
    },
    /// A Validator-class node agrees with the epoch's proposal (hotkey; once; free).
    Attest {
        /// Subnet.
        subnet: SubnetId,
    },
    /// Bond stake as a chain validator with a consensus key (the first bond
    /// sets the key; later bonds add stake and must name the same key).
    BondValidator {
        /// The Ed25519 public key that signs this validator's consensus votes.
        consensus_key: Address,
        /// Amount to bond.
        #[serde(with = "amount")]
        amount: Amount,
    },
    /// Unbond chain-validator stake; it is claimable after the unbonding
    /// period, and unbonding all of it removes the validator.
    UnbondValidator {
        /// Amount to unbond.
        #[serde(with = "amount")]
        amount: Amount,
    },
}

impl Call {
    /// Validator consensus calls pay no fee.
    pub fn is_free(&self) -> bool {
        matches!(self, Call::ProposeAttestation { .. } | Call::Attest { .. })
    }
}

/// A transaction body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tx {
    /// The signing account.
    pub signer: Address,
    /// Must equal the signer's account nonce.
    pub nonce: u64,
    /// The call.
    pub call: Call,
}

impl Tx {
    /// The bytes that are signed: a domain tag, the chain id and the body.
    pub fn signing_bytes(&self, chain_id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"hypertensor/tx/v1\0");
        out.extend_from_slice(&(chain_id.len() as u64).to_le_bytes());
        out.extend_from_slice(chain_id.as_bytes());
        // Encoding plain data into a Vec cannot fail.
        out.extend_from_slice(&postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Signs the body for `chain_id`.
    pub fn sign(self, key: &Keypair, chain_id: &str) -> SignedTx {
        let sig = key.signing.sign(&self.signing_bytes(chain_id));
        SignedTx {
            tx: self,
            signature: SigBytes(sig.to_bytes()),
        }
    }
}

/// A 64-byte Ed25519 signature (hex in JSON).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SigBytes(pub [u8; 64]);

impl std::fmt::Debug for SigBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({})", hex::encode(self.0))
    }
}

impl Serialize for SigBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            // serde implements arrays only up to 32 elements.
            serde::Serialize::serialize(&self.0[..], s)
        }
    }
}

impl<'de> Deserialize<'de> for SigBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(s).map_err(serde::de::Error::custom)?
        } else {
            Vec::<u8>::deserialize(d)?
        };
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))?;
        Ok(SigBytes(arr))
    }
}

/// A signed transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTx {
    /// The body.
    pub tx: Tx,
    /// Ed25519 signature by `tx.signer` over [`Tx::signing_bytes`].
    pub signature: SigBytes,
}

impl SignedTx {
    /// The transaction hash (SHA-256 of its postcard encoding).
    pub fn hash(&self) -> Hash32 {
        Hash32::digest(&[
            b"hypertensor/txhash/v1",
            &postcard::to_stdvec(self).unwrap_or_default(),
        ])
    }

    /// Checks the signature for `chain_id`.
    pub fn verify(&self, chain_id: &str) -> Result<(), TxError> {
        let vk = VerifyingKey::from_bytes(&self.tx.signer.0).map_err(|_| TxError::BadSignature)?;
        let sig = Signature::from_bytes(&self.signature.0);
        vk.verify(&self.tx.signing_bytes(chain_id), &sig)
            .map_err(|_| TxError::BadSignature)
    }
}

/// An Ed25519 key pair; its public key is the account address.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({})", self.address())
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    address: Address,
    secret_key: String,
}

impl Keypair {
    /// A fresh key from the OS-seeded thread RNG.
    pub fn generate() -> Keypair {
        Keypair::from_seed(rand::random::<[u8; 32]>())
    }

    /// The key for a 32-byte secret seed (deterministic; tests and benches).
    pub fn from_seed(seed: [u8; 32]) -> Keypair {
        Keypair {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The account address (public key).
    pub fn address(&self) -> Address {
        Address(self.signing.verifying_key().to_bytes())
    }

    /// The 32-byte secret seed, for handing the same key to another
    /// Ed25519 implementation (the consensus engine's).
    pub fn secret_seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// Writes the key as JSON (`address`, `secret_key` hex), readable by the owner only.
    pub fn save(&self, path: &Path) -> Result<(), LedgerError> {
        let kf = KeyFile {
            address: self.address(),
            secret_key: hex::encode(self.signing.to_bytes()),
        };
        let json =
            serde_json::to_string_pretty(&kf).map_err(|e| LedgerError::Key(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(path)
            .map_err(|e| LedgerError::Key(format!("cannot create {}: {e}", path.display())))?;
        std::io::Write::write_all(&mut f, json.as_bytes())?;
        Ok(())
    }

    /// Reads a key file written by [`Keypair::save`].
    pub fn load(path: &Path) -> Result<Keypair, LedgerError> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| LedgerError::Key(format!("cannot read {}: {e}", path.display())))?;
        let kf: KeyFile = serde_json::from_str(&s)
            .map_err(|e| LedgerError::Key(format!("{}: {e}", path.display())))?;
        let bytes = hex::decode(kf.secret_key.trim())
            .map_err(|e| LedgerError::Key(format!("secret_key: {e}")))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| LedgerError::Key("secret_key must be 32 bytes".into()))?;
        let kp = Keypair::from_seed(seed);
        if kp.address() != kf.address {
            return Err(LedgerError::Key(
                "address does not match the secret key".into(),
            ));
        }
        Ok(kp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let k = Keypair::from_seed([7; 32]);
        let tx = Tx {
            signer: k.address(),
            nonce: 0,
            call: Call::Transfer {
                to: Address([1; 32]),
                amount: 5,
            },
        };
        let stx = tx.sign(&k, "dev");
        assert!(stx.verify("dev").is_ok());
        assert_eq!(stx.verify("other"), Err(TxError::BadSignature));
        let mut bad = stx.clone();
        bad.tx.nonce = 1;
        assert_eq!(bad.verify("dev"), Err(TxError::BadSignature));
        let json = serde_json::to_string(&stx).unwrap();
        let back: SignedTx = serde_json::from_str(&json).unwrap();
        assert_eq!(back, stx);
        assert!(back.verify("dev").is_ok());
    }

    #[test]
    fn key_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        let k = Keypair::generate();
        k.save(&p).unwrap();
        assert_eq!(Keypair::load(&p).unwrap().address(), k.address());
        assert!(k.save(&p).is_err(), "never overwrite a key file");
    }
}
