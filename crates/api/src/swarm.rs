//! [`Backend`] over the swarm client: the blocks run on servers found in the
//! DHT, and the monitor shows their announcements.

use client::{ClientError, RemoteModel, ServerView};
use futures::FutureExt;
use futures::future::BoxFuture;
use model::{ChatMessage, Generation, GenerationRequest};
use tokio::runtime::Handle;
use wire::ServerState;

use crate::backend::{Backend, BackendError};
use crate::monitor::{ModelState, PeerState, ServerEntry, SwarmState};

/// One model served by the swarm.
pub struct SwarmBackend {
    model: RemoteModel,
    runtime: Handle,
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
        Self { model, runtime }
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
            SwarmState {
                models: vec![ModelState::new(
                    view.model(),
                    view.num_blocks(),
                    servers.iter().map(entry).collect(),
                )],
            }
        }
        .boxed()
    }
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
