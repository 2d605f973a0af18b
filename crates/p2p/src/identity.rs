//! The persistent Ed25519 identity of a peer, kept in a key file.
//!
//! A server's peer id is what the ledger registers and what clients ban or
//! trust, so it must survive restarts: the key lives in a file written once
//! (mode 0600) in libp2p's protobuf key encoding. A peer running from a key
//! file holds it ([`claim`]), so that a second peer started from the same
//! file on the same machine is refused rather than shadowing the first.

use std::path::Path;

use libp2p::identity::Keypair;

use crate::error::P2pError;

fn identity_error(path: &Path, reason: impl std::fmt::Display) -> P2pError {
    P2pError::Identity {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Creates a new key file at `path`; refuses to overwrite one.
///
/// # Errors
/// When the file exists or cannot be written.
pub fn generate(path: &Path) -> Result<Keypair, P2pError> {
    if path.exists() {
        return Err(identity_error(
            path,
            "already exists; refusing to overwrite",
        ));
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| identity_error(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| identity_error(path, e))?;
    }
    write_private(path, &bytes).map_err(|e| identity_error(path, e))?;
    Ok(key)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Reads the key file at `path`.
///
/// # Errors
/// When it is missing or not a libp2p key.
pub fn load(path: &Path) -> Result<Keypair, P2pError> {
    let bytes = std::fs::read(path).map_err(|e| identity_error(path, e))?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|e| identity_error(path, e))
}

/// Reads the key file at `path`, creating it first when it does not exist.
///
/// # Errors
/// As [`load`] and [`generate`].
pub fn load_or_generate(path: &Path) -> Result<Keypair, P2pError> {
    if path.exists() {
        load(path)
    } else {
        generate(path)
    }
}

/// A key file held by this process for as long as the claim lives.
///
/// Two peers with one key share a peer id: the DHT keeps one of their
/// records, clients reach one of them under both spans, and the ledger
/// counts one node. A second peer on the machine started from the same file
/// (a second `serve` without its own `--identity`) is therefore refused.
#[derive(Debug)]
pub struct Claim {
    key: Keypair,
    /// Holds an exclusive advisory lock on the key file; the operating
    /// system releases it when the file closes, however the process ends.
    _lock: std::fs::File,
}

impl Claim {
    /// The claimed key.
    pub fn key(&self) -> &Keypair {
        &self.key
    }
}

/// [`load_or_generate`], then holds the file until the claim drops.
///
/// # Errors
/// As [`load_or_generate`], and when another running peer holds the file.
pub fn claim(path: &Path) -> Result<Claim, P2pError> {
    let key = load_or_generate(path)?;
    let file = std::fs::File::open(path).map_err(|e| identity_error(path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Claim { key, _lock: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(identity_error(
            path,
            "in use by another running peer; two peers with one key share a peer id \
             and shadow each other, so each needs a key file of its own",
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(identity_error(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/id.key");
        let a = generate(&path).unwrap();
        let b = load_or_generate(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert!(generate(&path).is_err());
        std::fs::write(dir.path().join("bad"), b"garbage").unwrap();
        let err = load(&dir.path().join("bad")).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }

    #[test]
    fn a_claimed_key_file_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let first = claim(&path).unwrap();
        let err = claim(&path).unwrap_err();
        assert!(
            err.to_string().contains("in use by another running peer"),
            "{err}"
        );
        // Reading the key (`keygen`, the swarm command printing peer ids) is
        // still allowed while it is held.
        let peer = load(&path).unwrap().public().to_peer_id();
        assert_eq!(peer, first.key().public().to_peer_id());
        drop(first);
        let again = claim(&path).unwrap();
        assert_eq!(again.key().public().to_peer_id(), peer);
    }
}
