//! How a node joins the swarm.

use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use crate::error::P2pError;

/// Settings of one [`Node`](crate::Node).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Addresses to listen on; port 0 picks a free one.
    pub listen: Vec<Multiaddr>,
    /// Peers to bootstrap from; each address ends in `/p2p/PEER_ID`.
    pub initial_peers: Vec<Multiaddr>,
    /// Start a new swarm: allowed to have no initial peers.
    pub new_swarm: bool,
    /// Private swarm key: only peers holding it can connect (TCP only).
    pub psk: Option<PreSharedKey>,
    /// Answer DHT queries and store records (servers); `false` for clients
    /// that only ask.
    pub dht_server: bool,
    /// Relay traffic for peers behind NAT.
    pub relay_server: bool,
    /// How long a DHT query may take.
    pub query_timeout: Duration,
    /// Longest expiry a record may claim, from now.
    pub max_record_ttl: Duration,
    /// Close connections idle this long.
    pub idle_connection_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("static address"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("static address"),
            ],
            initial_peers: Vec::new(),
            new_swarm: false,
            psk: None,
            dht_server: true,
            relay_server: true,
            query_timeout: Duration::from_secs(10),
            max_record_ttl: Duration::from_secs(600),
            idle_connection_timeout: Duration::from_secs(120),
        }
    }
}

impl NodeConfig {
    /// A config for tests and local swarms: TCP and QUIC on 127.0.0.1 with
    /// OS-assigned ports.
    pub fn local() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("static address"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("static address"),
            ],
            ..Self::default()
        }
    }

    /// Checks the bootstrap settings and splits each initial peer address
    /// into its peer id and transport address.
    ///
    /// # Errors
    /// [`P2pError::NoBootstrap`] or [`P2pError::BadAddress`].
    pub fn bootstrap_peers(&self) -> Result<Vec<(PeerId, Multiaddr)>, P2pError> {
        if self.initial_peers.is_empty() && !self.new_swarm {
            return Err(P2pError::NoBootstrap);
        }
        self.initial_peers
            .iter()
            .map(|addr| {
                let peer = addr
                    .iter()
                    .find_map(|p| match p {
                        Protocol::P2p(peer) => Some(peer),
                        _ => None,
                    })
                    .ok_or_else(|| P2pError::BadAddress {
                        addr: addr.to_string(),
                        reason: "it has no /p2p/PEER_ID suffix".into(),
                    })?;
                Ok((peer, addr.clone()))
            })
            .collect()
    }
}

/// Parses a private swarm key in the go-ipfs `swarm.key` format (also what
/// `PreSharedKey`'s `Display` writes).
///
/// # Errors
/// [`P2pError::BadPsk`].
pub fn parse_psk(text: &str) -> Result<PreSharedKey, P2pError> {
    text.parse().map_err(|e| P2pError::BadPsk(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_requires_peers_or_new_swarm() {
        let mut c = NodeConfig::local();
        assert!(matches!(c.bootstrap_peers(), Err(P2pError::NoBootstrap)));
        c.new_swarm = true;
        assert!(c.bootstrap_peers().unwrap().is_empty());
        c.initial_peers = vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()];
        assert!(matches!(
            c.bootstrap_peers(),
            Err(P2pError::BadAddress { .. })
        ));
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        c.initial_peers = vec![format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap()];
        assert_eq!(c.bootstrap_peers().unwrap()[0].0, peer);
    }

    #[test]
    fn psk_parses_the_swarm_key_format() {
        let text = format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32));
        assert!(parse_psk(&text).is_ok());
        assert!(parse_psk("nonsense").is_err());
    }
}
