//! [`LocalBackend`]: a whole model loaded in this process, served the way
//! Ollama serves one, with no swarm involved.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use futures::FutureExt;
use futures::future::BoxFuture;
use model::{
    ChatMessage, ChatTemplate, Checkpoint, Generation, GenerationRequest, LoadOptions, LocalBlocks,
    LocalModel, Tokenizer,
};

use crate::backend::{Backend, BackendError};
use crate::monitor::{ModelState, PeerState, ServerEntry, SwarmState};

/// Serves one model held entirely in this process.
///
/// Generations run one at a time: they would otherwise compete for the same
/// cores and each get slower, and a queue keeps latency predictable. Later
/// requests wait their turn on the blocking pool.
///
/// For the monitor it reports one model with one pseudo-server, peer id
/// `local`, covering every block; its throughput figures are those of the
/// last generation (0 before the first), and `cache_tokens_left` is the whole
/// context, which each generation gets in turn.
pub struct LocalBackend {
    id: String,
    model: LocalModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_length: usize,
    /// Held for the whole of each generation.
    turn: Mutex<()>,
    /// Tokens per second of the last generation: (prefill, decode).
    speed: Mutex<(f64, f64)>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("id", &self.id)
            .field("blocks", &self.model.span.range())
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// Serves `model` under the id `id`, allowing sequences of up to
    /// `max_length` positions.
    pub fn new(
        id: impl Into<String>,
        model: LocalModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        max_length: usize,
    ) -> Self {
        Self {
            id: id.into(),
            model,
            tokenizer,
            template,
            max_length,
            turn: Mutex::new(()),
            speed: Mutex::new((0.0, 0.0)),
        }
    }

    /// Loads the checkpoint at `path` whole (GGUF or a Hugging Face folder),
    /// with its tokenizer and chat template, as model `id`; the context is
    /// the model's own.
    pub fn load(
        id: impl Into<String>,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Self, model::ModelError> {
        let ckpt = Checkpoint::open(path)?;
        let model = ckpt.load_local(options, &mut |_, _| {})?;
        let tokenizer = ckpt.tokenizer()?;
        let template = ckpt.chat_template(&tokenizer)?;
        let max_length = ckpt.config().max_position_embeddings;
        Ok(Self::new(id, model, tokenizer, template, max_length))
    }

    /// The id the model is served under.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, model: &str) -> Result<(), BackendError> {
        if model == self.id {
            Ok(())
        } else {
            Err(BackendError::UnknownModel(model.into()))
        }
    }

    fn num_blocks(&self) -> u32 {
        self.model.span.range().len() as u32
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<String> {
        vec![self.id.clone()]
    }

    fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<Vec<u32>, BackendError> {
        self.check(model)?;
        let text = self.template.render(messages, true)?;
        Ok(self.tokenizer.encode(&text)?)
    }

    fn encode(&self, model: &str, text: &str) -> Result<Vec<u32>, BackendError> {
        self.check(model)?;
        Ok(self.tokenizer.encode(text)?)
    }

    fn max_length(&self, model: &str) -> Result<usize, BackendError> {
        self.check(model)?;
        Ok(self.max_length)
    }

    fn generate(
        &self,
        model: &str,
        req: &GenerationRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, BackendError> {
        self.check(model)?;
        // The caller's limit may only shrink the model's, never grow it.
        let req = if req.max_length > self.max_length {
            Cow::Owned(GenerationRequest {
                max_length: self.max_length,
                ..req.clone()
            })
        } else {
            Cow::Borrowed(req)
        };
        // The lock guards no data, so a panic in an earlier holder leaves
        // nothing inconsistent behind.
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut blocks = LocalBlocks::new(&self.model.span, req.max_length);
        let g = model::generate(
            &self.model.embedding,
            &self.model.head,
            &mut blocks,
            &self.tokenizer,
            &req,
            on_text,
        )?;
        let prefill = g.prompt_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
        let decoded = g.token_ids.len().saturating_sub(1);
        let decode = if decoded > 0 {
            decoded as f64 / g.decode_time.as_secs_f64().max(1e-9)
        } else {
            0.0
        };
        *self.speed.lock().unwrap_or_else(PoisonError::into_inner) = (prefill, decode);
        Ok(g)
    }

    fn swarm_state(&self) -> BoxFuture<'_, SwarmState> {
        let (prefill, decode) = *self.speed.lock().unwrap_or_else(PoisonError::into_inner);
        let server = ServerEntry {
            peer_id: "local".into(),
            start: 0,
            end: self.num_blocks(),
            state: PeerState::Online,
            inference_rps: decode,
            forward_rps: prefill,
            network_rps: 0.0,
            cache_tokens_left: self.max_length as u64,
            ping_ms: None,
            version: env!("CARGO_PKG_VERSION").into(),
            using_relay: false,
        };
        let state = SwarmState {
            models: vec![ModelState::new(
                self.id.clone(),
                self.num_blocks(),
                vec![server],
            )],
        };
        futures::future::ready(state).boxed()
    }
}
