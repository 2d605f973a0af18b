//! The composed libp2p behaviour of a Hypertensor peer.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{StreamProtocol, autonat, dcutr, identify, ping, relay};

use crate::config::NodeConfig;

/// Kademlia protocol name: our own, so we never mix records with other DHTs.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hypertensor/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/hypertensor/id/1.0.0";

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) kad: kad::Behaviour<MemoryStore>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: dcutr::Behaviour,
    pub(crate) stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &NodeConfig,
    ) -> Self {
        let peer = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.query_timeout)
            // Records are validated (signature, schema, expiry) before they are
            // stored; see `Node::on_kad_inbound`.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_record_ttl(Some(config.max_record_ttl))
            .set_provider_record_ttl(Some(config.max_record_ttl))
            // Servers re-announce on their own schedule.
            .set_publication_interval(None)
            .set_provider_publication_interval(None);
        let mut kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), kad_config);
        kad.set_mode(Some(if config.dht_server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));
        let relay_server = config
            .relay_server
            .then(|| relay::Behaviour::new(peer, relay::Config::default()));
        Self {
            kad,
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            autonat: autonat::Behaviour::new(peer, autonat::Config::default()),
            relay_server: relay_server.into(),
            relay_client,
            dcutr: dcutr::Behaviour::new(peer),
            stream: libp2p_stream::Behaviour::new(),
        }
    }
}
