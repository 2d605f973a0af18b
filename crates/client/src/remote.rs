//! A model whose blocks run in the swarm: the client holds the embedding,
//! the final norm and LM head, and the tokenizer, and drives the `model`
//! crate's generation loop through an [`InferenceSession`].

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use model::{
    BlockRunner, ChatTemplate, Checkpoint, Embedding, Generation, GenerationRequest, Head,
    LoadOptions, ModelError, Precision, Tokenizer,
};
use tokio::runtime::Handle;

use crate::ban::BanList;
use crate::error::ClientError;
use crate::session::{InferenceSession, SessionConfig};
use crate::swarm::SwarmView;

/// The client's half of a model served by the swarm.
pub struct RemoteModel {
    view: SwarmView,
    bans: Arc<Mutex<BanList>>,
    session: SessionConfig,
    embedding: Embedding,
    head: Head,
    /// The head's precision, which the servers' should match.
    precision: Precision,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_length: usize,
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteModel")
            .field("model", &self.view.model())
            .finish()
    }
}

impl RemoteModel {
    /// Loads the client-side parts of `checkpoint`; its blocks are found in
    /// the swarm as `view`'s model. `precision` is the head's: a swarm whose
    /// servers round activations to 8 bits gives the same tokens as one
    /// process doing so only when the client's head rounds them too.
    ///
    /// # Errors
    /// When the checkpoint's embedding, head or tokenizer cannot be loaded,
    /// or the view's block count differs from the checkpoint's.
    pub fn load(
        checkpoint: &Checkpoint,
        view: SwarmView,
        session: SessionConfig,
        precision: Precision,
    ) -> Result<Self, ClientError> {
        let config = checkpoint.config();
        if view.num_blocks() as usize != config.num_blocks {
            return Err(ClientError::InvalidRequest(format!(
                "the checkpoint has {} blocks, the swarm's {} has {}",
                config.num_blocks,
                view.model(),
                view.num_blocks()
            )));
        }
        // The client's half stays on the CPU: the servers' outputs arrive there.
        let options = LoadOptions {
            precision,
            ..LoadOptions::default()
        };
        let embedding = checkpoint.load_embedding(&options)?;
        let head = checkpoint.load_head(&options, Some(&embedding))?;
        let tokenizer = checkpoint.tokenizer()?;
        let template = checkpoint.chat_template(&tokenizer)?;
        Ok(Self {
            max_length: config
                .max_position_embeddings
                .min(session.max_length as usize),
            view,
            bans: Arc::new(Mutex::new(BanList::default())),
            session,
            embedding,
            head,
            precision,
            tokenizer,
            template,
        })
    }

    /// Replaces the ban policy (tests use short bans).
    pub fn with_bans(mut self, bans: BanList) -> Self {
        self.bans = Arc::new(Mutex::new(bans));
        self
    }

    /// Whether servers push each step's outputs on to the next server in
    /// sessions opened from now on ([`SessionConfig::push`]).
    pub fn set_push(&mut self, push: bool) {
        self.session.push = push;
    }

    /// The swarm this model runs in.
    pub fn view(&self) -> &SwarmView {
        &self.view
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Longest sequence a generation may reach.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Opens a session over every block.
    ///
    /// # Errors
    /// As [`InferenceSession::open`].
    pub async fn open_session(&self, max_length: u32) -> Result<InferenceSession, ClientError> {
        let config = SessionConfig {
            max_length,
            ..self.session
        };
        let session = InferenceSession::open(self.view.clone(), self.bans.clone(), config).await?;
        let ours = self.precision.activation_dtype();
        // Mixing is allowed (any server may serve any client), but the user
        // should know why the answers differ from a local run's.
        if let Ok(others) = self
            .view
            .hops_not_computing_in(&session.route(), ours)
            .await
        {
            for (hop, theirs) in others {
                tracing::warn!(
                    "server {} computes blocks {} with {theirs} activations, this client with {ours}: answers will differ from one process's",
                    hop.peer,
                    hop.span
                );
            }
        }
        Ok(session)
    }

    /// Generates through the swarm, as `model::generate` does locally.
    ///
    /// Blocking: call it from a thread outside the async runtime (e.g.
    /// `spawn_blocking`); `runtime` drives the network.
    ///
    /// # Errors
    /// A bad request, or a swarm failure the session could not route around.
    pub fn generate(
        &self,
        runtime: &Handle,
        req: &GenerationRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, ClientError> {
        // Servers reserve cache for the whole session: ask for what this
        // generation can reach, not for the model's full context.
        let max_length = req
            .max_length
            .min(self.max_length)
            .min(req.prompt_ids.len() + req.max_new_tokens + 1);
        let req = GenerationRequest {
            max_length,
            ..req.clone()
        };
        let mut blocks = RemoteBlocks {
            model: self,
            runtime,
            max_length: max_length as u32,
            session: None,
            error: None,
        };
        let result = model::generate(
            &self.embedding,
            &self.head,
            &mut blocks,
            &self.tokenizer,
            &req,
            on_text,
        );
        if let Some(session) = blocks.session.take() {
            runtime.block_on(session.close());
        }
        match (result, blocks.error) {
            (Ok(g), _) => Ok(g),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }
}

/// [`BlockRunner`] over an inference session, opened on the first step.
struct RemoteBlocks<'a> {
    model: &'a RemoteModel,
    runtime: &'a Handle,
    max_length: u32,
    session: Option<InferenceSession>,
    /// The typed failure, kept because `BlockRunner` speaks `ModelError`.
    error: Option<ClientError>,
}

impl BlockRunner for RemoteBlocks<'_> {
    fn forward(&mut self, hidden: &Tensor) -> model::Result<Tensor> {
        let result = self.runtime.block_on(async {
            if self.session.is_none() {
                self.session = Some(self.model.open_session(self.max_length).await?);
            }
            match self.session.as_mut() {
                Some(s) => s.step(hidden).await,
                None => unreachable!("opened above"),
            }
        });
        result.map_err(|e| {
            let message = e.to_string();
            self.error = Some(e);
            ModelError::Blocks(message)
        })
    }
}
