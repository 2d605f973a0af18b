//! The swarm snapshot behind the monitor page (`GET /monitor`, which polls
//! `GET /api/v1/state`).
//!
//! The types are plain data so that any backend can fill them: the swarm
//! client from DHT records, [`LocalBackend`](crate::LocalBackend) from itself.

use serde::{Deserialize, Serialize};

/// Every model the backend knows of, and who serves which blocks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SwarmState {
    /// One entry per model.
    pub models: Vec<ModelState>,
}

/// One model: its servers and how well they cover its blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// The model id, as in `/v1/models`.
    pub id: String,
    /// Transformer blocks in the model.
    pub num_blocks: u32,
    /// Every server seen for this model, whatever its state.
    pub servers: Vec<ServerEntry>,
    /// Online servers per block (`num_blocks` entries); a 0 is a hole that
    /// stops generation.
    pub coverage: Vec<u32>,
    /// The model's subnet as the chain records it, when the API follows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainState>,
}

/// A subnet on the chain: its epoch and every registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainState {
    /// Subnet id.
    pub subnet: u32,
    /// Chain head height.
    pub height: u64,
    /// Current epoch.
    pub epoch: u64,
    /// This epoch's elected validator (a node id), once elected.
    pub validator: Option<u32>,
    /// Whether that validator has proposed its scores this epoch.
    pub proposed: bool,
    /// Node ids that attested this epoch.
    pub attestations: Vec<u32>,
    /// Every registered node, by id.
    pub nodes: Vec<ChainNode>,
}

/// One registered node of a subnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainNode {
    /// Node id within the subnet.
    pub id: u32,
    /// Its libp2p peer id, which joins it to a server entry.
    pub peer_id: String,
    /// Registered, idle, included or validator.
    pub class: String,
    /// Bonded stake, in tokens.
    pub stake: String,
    /// Reputation in parts per million.
    pub reputation_ppm: u32,
    /// The last epoch it was scored in.
    pub last_epoch: Option<u64>,
    /// Its score then.
    pub last_score: u64,
    /// The reward added to its stake then, in tokens.
    pub last_reward: String,
}

impl ModelState {
    /// A model entry whose `coverage` is computed from `servers`.
    pub fn new(id: impl Into<String>, num_blocks: u32, servers: Vec<ServerEntry>) -> Self {
        let coverage = coverage(num_blocks, &servers);
        Self {
            id: id.into(),
            num_blocks,
            servers,
            coverage,
            chain: None,
        }
    }
}

/// Online servers per block; spans reaching past `num_blocks` are clipped
/// rather than trusted, since they come from other peers' records.
pub fn coverage(num_blocks: u32, servers: &[ServerEntry]) -> Vec<u32> {
    let mut count = vec![0u32; num_blocks as usize];
    for s in servers.iter().filter(|s| s.state == PeerState::Online) {
        let end = s.end.min(num_blocks) as usize;
        let start = (s.start as usize).min(end);
        for c in &mut count[start..end] {
            *c += 1;
        }
    }
    count
}

/// A server's announced state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Loading its blocks; not serving yet.
    Joining,
    /// Serving.
    Online,
    /// Announced that it left.
    Offline,
}

/// One server as the monitor shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// The server's libp2p peer id.
    pub peer_id: String,
    /// First block served.
    pub start: u32,
    /// One past the last block served.
    pub end: u32,
    /// Joining, online or offline.
    pub state: PeerState,
    /// Tokens per second one inference session gets through its span.
    pub inference_rps: f64,
    /// Tokens per second of a full-sequence forward pass through its span.
    pub forward_rps: f64,
    /// Tokens per second its network link carries; 0 when unknown or when
    /// nothing crosses a network.
    pub network_rps: f64,
    /// KV-cache positions still free for new sessions.
    pub cache_tokens_left: u64,
    /// Round-trip time from this process, when measured.
    pub ping_ms: Option<f64>,
    /// The server's software version.
    pub version: String,
    /// Whether clients reach it through a relay (slower).
    pub using_relay: bool,
}

/// What `GET /api/v1/state` returns: the snapshot and when it was taken, so
/// the page can show how fresh it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateResponse {
    /// Milliseconds since the Unix epoch.
    pub generated_at_ms: u64,
    /// The snapshot.
    #[serde(flatten)]
    pub state: SwarmState,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(start: u32, end: u32, state: PeerState) -> ServerEntry {
        ServerEntry {
            peer_id: "p".into(),
            start,
            end,
            state,
            inference_rps: 0.0,
            forward_rps: 0.0,
            network_rps: 0.0,
            cache_tokens_left: 0,
            ping_ms: None,
            version: String::new(),
            using_relay: false,
        }
    }

    #[test]
    fn coverage_counts_online_servers_only_and_clips_spans() {
        let servers = [
            server(0, 2, PeerState::Online),
            server(1, 4, PeerState::Online),
            server(0, 4, PeerState::Joining),
            server(2, 9, PeerState::Online),
            server(7, 3, PeerState::Online),
        ];
        assert_eq!(coverage(4, &servers), vec![1, 2, 2, 2]);
    }

    #[test]
    fn state_serializes_flat_with_lowercase_states() {
        let r = StateResponse {
            generated_at_ms: 5,
            state: SwarmState {
                models: vec![ModelState::new(
                    "m",
                    2,
                    vec![server(0, 2, PeerState::Online)],
                )],
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["generated_at_ms"], 5);
        assert_eq!(v["models"][0]["servers"][0]["state"], "online");
        assert_eq!(v["models"][0]["coverage"], serde_json::json!([1, 1]));
    }
}
