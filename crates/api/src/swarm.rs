//! [`Backend`] over the swarm client: the blocks run on servers found in the
//! DHT, and the monitor shows their announcements and, when the API follows
//! a chain, the subnet's nodes as the ledger records them.

use client::{ClientError, RemoteModel, ServerView};
use futures::FutureExt;
use futures::future::BoxFuture;
use ledger::LedgerError;
use ledger::rpc_client::LedgerClient;
use ledger::types::{SubnetId, format_tokens};
use model::{ChatMessage, Generation, GenerationRequest};
use tokio::runtime::Handle;
use wire::ServerState;

use crate::backend::{Backend, BackendError};
use crate::monitor::{ChainNode, ChainState, ModelState, PeerState, ServerEntry, SwarmState};

/// One model served by the swarm.
pub struct SwarmBackend {
    model: RemoteModel,
    runtime: Handle,
    chain: Option<(LedgerClient, SubnetId)>,
}

impl std::fmt::Debug for SwarmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmBackend")
            .field("model", &self.model.view().model())
            .finish()
    }
}

impl SwarmBackend {
    /// Serves `model`; `runtime` drives its network while generations run on
    /// blocking threads.
    pub fn new(model: RemoteModel, runtime: Handle) -> Self {
        Self {
            model,
            runtime,
            chain: None,
        }
    }

    /// Also shows the model's `subnet` as `ledger` records it on the monitor.
    pub fn with_chain(mut self, ledger: LedgerClient, subnet: SubnetId) -> Self {
        self.chain = Some((ledger, subnet));
        self
    }

    fn check(&self, model: &str) -> Result<(), BackendError> {
        if model == self.model.view().model() {
            Ok(())
        } else {
            Err(BackendError::UnknownModel(model.into()))
        }
    }
}

impl Backend for SwarmBackend {
    fn models(&self) -> Vec<String> {
        vec![self.model.view().model().to_string()]
    }

    fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<Vec<u32>, BackendError> {
        self.check(model)?;
        let text = self.model.template().render(messages, true)?;
        Ok(self.model.tokenizer().encode(&text)?)
    }

    fn encode(&self, model: &str, text: &str) -> Result<Vec<u32>, BackendError> {
        self.check(model)?;
        Ok(self.model.tokenizer().encode(text)?)
    }

    fn max_length(&self, model: &str) -> Result<usize, BackendError> {
        self.check(model)?;
        Ok(self.model.max_length())
    }

    fn generate(
        &self,
        model: &str,
        req: &GenerationRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, BackendError> {
        self.check(model)?;
        self.model
            .generate(&self.runtime, req, on_text)
            .map_err(backend_error)
    }

    fn swarm_state(&self) -> BoxFuture<'_, SwarmState> {
        async move {
            let view = self.model.view();
            // A failed DHT query shows as an empty swarm, which is what the
            // client sees too.
            let servers = view.servers().await.unwrap_or_default();
            let mut state = ModelState::new(
                view.model(),
                view.num_blocks(),
                servers.iter().map(entry).collect(),
            );
            if let Some((ledger, subnet)) = &self.chain {
                state.chain = match chain_state(ledger, *subnet).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("cannot read subnet {subnet} from the chain: {e}");
                        None
                    }
                };
            }
            SwarmState {
                models: vec![state],
            }
        }
        .boxed()
    }
}

async fn chain_state(ledger: &LedgerClient, subnet: SubnetId) -> Result<ChainState, LedgerError> {
    let epoch = ledger.epoch(subnet).await?;
    let nodes = ledger.nodes(subnet).await?;
    let record = epoch.record.as_ref();
    Ok(ChainState {
        subnet,
        height: epoch.height,
        epoch: epoch.epoch,
        validator: record.map(|r| r.validator),
        proposed: record.is_some_and(|r| r.proposal.is_some()),
        attestations: record
            .map(|r| r.attestations.iter().copied().collect())
            .unwrap_or_default(),
        nodes: nodes
            .into_iter()
            .map(|n| ChainNode {
                id: n.id,
                peer_id: n.peer_id,
                class: format!("{:?}", n.class).to_lowercase(),
                stake: format_tokens(n.stake),
                reputation_ppm: n.reputation,
                last_epoch: n.last_epoch,
                last_score: n.last_score,
                last_reward: format_tokens(n.last_reward),
            })
            .collect(),
    })
}

fn entry(s: &ServerView) -> ServerEntry {
    let i = &s.info;
    ServerEntry {
        peer_id: s.peer.to_string(),
        start: i.span.start,
        end: i.span.end,
        state: match i.state {
            ServerState::Joining => PeerState::Joining,
            ServerState::Online => PeerState::Online,
            ServerState::Offline => PeerState::Offline,
        },
        inference_rps: i.throughput.inference_rps,
        forward_rps: i.throughput.forward_rps,
        network_rps: i.throughput.network_rps,
        cache_tokens_left: i.cache_tokens_left,
        ping_ms: s.rtt.map(|d| d.as_secs_f64() * 1e3),
        version: i.version.clone(),
        using_relay: i.using_relay,
    }
}

/// Sorts swarm failures by who must act: the caller, or the swarm (503).
fn backend_error(e: ClientError) -> BackendError {
    match e {
        ClientError::InvalidRequest(m) => BackendError::BadRequest(m),
        ClientError::Model(m) => m.into(),
        ClientError::Wire(_) | ClientError::Candle(_) => BackendError::Internal(e.to_string()),
        _ => BackendError::Unavailable(e.to_string()),
    }
}
