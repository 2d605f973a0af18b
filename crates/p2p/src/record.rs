//! Signed DHT records: a server's [`ServerInfo`] under its own key, and the
//! provider keys that say which servers hold a block.
//!
//! Layout: each server puts one record at `hypertensor/server/{peer_id}` whose
//! value is a [`ServerInfo`] signed by that peer's key, and provides
//! `hypertensor/{model}/block/{i}` for every block it hosts plus
//! [`MODELS_KEY`] (the model index: its providers' records name the models and
//! their block counts). Every peer validates a record before storing it or
//! using it: the signer must be the peer named in the key, the signature must
//! verify, the payload must parse and its expiry must be neither past nor too
//! far ahead.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::kad::RecordKey;
use serde::{Deserialize, Serialize};
use wire::ServerInfo;

/// Largest record value accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Provider key whose providers are all servers, of any model.
pub const MODELS_KEY: &[u8] = b"hypertensor/models";

const SERVER_PREFIX: &str = "hypertensor/server/";
/// Domain separation: a signature over a server record can never be replayed
/// as a signature over anything else the key signs.
const SIGNING_DOMAIN: &[u8] = b"hypertensor/server-info/v1\0";

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The value is larger than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes is too large")]
    TooLarge(usize),
    /// The key is not a server record key.
    #[error("unexpected record key")]
    UnknownKey,
    /// The envelope or public key does not parse.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The signer is not the peer the key names.
    #[error("record for {expected} is signed by {actual}")]
    WrongSigner {
        /// Peer named by the key.
        expected: String,
        /// Peer of the signing key.
        actual: String,
    },
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The payload fails the schema or expiry checks.
    #[error("invalid server info: {0}")]
    Schema(#[from] wire::WireError),
}

#[derive(Serialize, Deserialize)]
struct SignedRecord {
    #[serde(with = "serde_bytes")]
    public_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

/// Key of `peer`'s server record.
pub fn server_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{SERVER_PREFIX}{peer}"))
}

/// Provider key of block `block` of `model`.
pub fn block_key(model: &str, block: u32) -> RecordKey {
    RecordKey::new(&format!("hypertensor/{model}/block/{block}"))
}

/// The peer a server record key names, if it is one.
pub fn peer_of_server_key(key: &RecordKey) -> Option<PeerId> {
    std::str::from_utf8(key.as_ref())
        .ok()?
        .strip_prefix(SERVER_PREFIX)?
        .parse()
        .ok()
}

/// Signs `info` with `key`, giving a record value.
///
/// # Errors
/// When the key cannot sign (never for Ed25519).
pub fn sign(key: &Keypair, info: &ServerInfo) -> Result<Vec<u8>, RecordError> {
    let payload = postcard::to_allocvec(info).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let signature = key
        .sign(&signing_bytes(&payload))
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    let envelope = SignedRecord {
        public_key: key.public().encode_protobuf(),
        payload,
        signature,
    };
    postcard::to_allocvec(&envelope).map_err(|e| RecordError::Malformed(e.to_string()))
}

fn signing_bytes(payload: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, payload].concat()
}

/// Validates the record `value` stored under `key` at time `now_ms`, with
/// expiries allowed at most `max_ttl_ms` ahead; returns the signer and info.
///
/// # Errors
/// [`RecordError`] naming the first failed check.
pub fn verify(
    key: &RecordKey,
    value: &[u8],
    now_ms: u64,
    max_ttl_ms: u64,
) -> Result<(PeerId, ServerInfo), RecordError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(value.len()));
    }
    let expected = peer_of_server_key(key).ok_or(RecordError::UnknownKey)?;
    let (envelope, rest): (SignedRecord, _) =
        postcard::take_from_bytes(value).map_err(|e| RecordError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(RecordError::Malformed("trailing bytes".into()));
    }
    let public = PublicKey::try_decode_protobuf(&envelope.public_key)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    let signer = public.to_peer_id();
    if signer != expected {
        return Err(RecordError::WrongSigner {
            expected: expected.to_string(),
            actual: signer.to_string(),
        });
    }
    if !public.verify(&signing_bytes(&envelope.payload), &envelope.signature) {
        return Err(RecordError::BadSignature);
    }
    let (info, rest): (ServerInfo, _) = postcard::take_from_bytes(&envelope.payload)
        .map_err(|e| RecordError::Schema(wire::WireError::Malformed(e.to_string())))?;
    if !rest.is_empty() {
        return Err(RecordError::Malformed("trailing payload bytes".into()));
    }
    info.validate(now_ms, max_ttl_ms)?;
    Ok((signer, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{ServerState, Span, Throughput};

    fn info(expires_at_ms: u64) -> ServerInfo {
        ServerInfo {
            model: "m".into(),
            num_blocks: 30,
            span: Span { start: 0, end: 10 },
            state: ServerState::Online,
            throughput: Throughput::default(),
            cache_tokens_left: 100,
            max_length: 2048,
            dtype: "f32".into(),
            quantization: "Q4_1".into(),
            version: "0.1.0".into(),
            wire_version: wire::WIRE_VERSION,
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            using_relay: false,
            next_pings: vec![],
            expires_at_ms,
        }
    }

    #[test]
    fn valid_record_verifies() {
        let k = Keypair::generate_ed25519();
        let peer = k.public().to_peer_id();
        let v = sign(&k, &info(2_000)).unwrap();
        let (signer, back) = verify(&server_key(&peer), &v, 1_000, 10_000).unwrap();
        assert_eq!(signer, peer);
        assert_eq!(back, info(2_000));
    }

    #[test]
    fn record_under_another_peers_key_is_refused() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let v = sign(&k, &info(2_000)).unwrap();
        assert!(matches!(
            verify(&server_key(&other), &v, 1_000, 10_000),
            Err(RecordError::WrongSigner { .. })
        ));
    }

    #[test]
    fn tampered_payload_fails_the_signature() {
        let k = Keypair::generate_ed25519();
        let peer = k.public().to_peer_id();
        let mut env: SignedRecord = postcard::from_bytes(&sign(&k, &info(2_000)).unwrap()).unwrap();
        let mut forged = info(2_000);
        forged.throughput.inference_rps = 1e9;
        env.payload = postcard::to_allocvec(&forged).unwrap();
        let v = postcard::to_allocvec(&env).unwrap();
        assert_eq!(
            verify(&server_key(&peer), &v, 1_000, 10_000),
            Err(RecordError::BadSignature)
        );
    }

    #[test]
    fn schema_and_expiry_are_checked() {
        let k = Keypair::generate_ed25519();
        let key = server_key(&k.public().to_peer_id());
        let expired = sign(&k, &info(500)).unwrap();
        assert!(matches!(
            verify(&key, &expired, 1_000, 10_000),
            Err(RecordError::Schema(_))
        ));
        let far = sign(&k, &info(1_000_000)).unwrap();
        assert!(matches!(
            verify(&key, &far, 1_000, 10_000),
            Err(RecordError::Schema(_))
        ));
        let mut bad_span = info(2_000);
        bad_span.span = Span { start: 20, end: 40 };
        let v = sign(&k, &bad_span).unwrap();
        assert!(matches!(
            verify(&key, &v, 1_000, 10_000),
            Err(RecordError::Schema(_))
        ));
        // A signed payload that is not a ServerInfo at all.
        let junk = SignedRecord {
            public_key: k.public().encode_protobuf(),
            payload: vec![1, 2, 3],
            signature: k.sign(&signing_bytes(&[1, 2, 3])).unwrap(),
        };
        let v = postcard::to_allocvec(&junk).unwrap();
        assert!(matches!(
            verify(&key, &v, 1_000, 10_000),
            Err(RecordError::Schema(_))
        ));
        assert!(matches!(
            verify(&key, b"\xff\xff", 1_000, 10_000),
            Err(RecordError::Malformed(_))
        ));
        assert_eq!(
            verify(&key, &vec![0; MAX_RECORD_BYTES + 1], 1_000, 10_000),
            Err(RecordError::TooLarge(MAX_RECORD_BYTES + 1))
        );
        assert_eq!(
            verify(&block_key("m", 0), &expired, 1_000, 10_000),
            Err(RecordError::UnknownKey)
        );
    }
}
