//! The one seam between the HTTP layer and whatever runs the model.

use futures::future::BoxFuture;
use model::{ChatMessage, Generation, GenerationRequest, ModelError};

use crate::monitor::SwarmState;

/// What the HTTP layer needs from whatever runs the model.
///
/// Implementations: [`LocalBackend`](crate::LocalBackend) (a whole model in
/// this process) and [`SwarmBackend`](crate::SwarmBackend) (the swarm client).
///
/// [`models`](Backend::models) is called on async threads and must answer at
/// once (from a cache, say); [`swarm_state`](Backend::swarm_state) is async;
/// the other methods may block, and the HTTP layer calls them on tokio's
/// blocking pool only.
pub trait Backend: Send + Sync + 'static {
    /// Ids of the models that can be served now.
    fn models(&self) -> Vec<String>;

    /// Renders a conversation with the model's chat template (generation
    /// prompt added) and tokenizes it.
    fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<Vec<u32>, BackendError>;

    /// Tokenizes raw text (for `/v1/completions`).
    fn encode(&self, model: &str, text: &str) -> Result<Vec<u32>, BackendError>;

    /// Longest sequence (prompt plus generated tokens) the model allows.
    fn max_length(&self, model: &str) -> Result<usize, BackendError>;

    /// Runs one generation; blocking.
    ///
    /// `on_text` gets each new piece of text; when it returns `false` (the
    /// client went away, or the server is stopping) the backend should stop
    /// soon and return what it has, with
    /// [`FinishReason::Cancelled`](model::FinishReason::Cancelled).
    fn generate(
        &self,
        model: &str,
        req: &GenerationRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, BackendError>;

    /// A snapshot of the swarm for the monitor.
    ///
    /// A boxed future keeps the trait dyn-compatible; the swarm client needs
    /// to await the DHT here.
    fn swarm_state(&self) -> BoxFuture<'_, SwarmState>;
}

/// Why a backend could not do what was asked; each variant maps to one HTTP
/// status and OpenAI error code (see [`ApiError`](crate::ApiError)).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// No such model is served (404, `model_not_found`).
    #[error("the model `{0}` does not exist or is not served here")]
    UnknownModel(String),
    /// The request cannot be served as asked, e.g. a role the chat template
    /// refuses (400).
    #[error("{0}")]
    BadRequest(String),
    /// Prompt plus completion would not fit the model's context (400,
    /// `context_length_exceeded`).
    #[error(
        "this model's maximum context length is {limit} tokens, but {requested} were requested"
    )]
    ContextTooLong {
        /// Tokens the request needs.
        requested: usize,
        /// The model's limit.
        limit: usize,
    },
    /// The model cannot run right now, e.g. no servers cover some blocks (503).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; a bug or a broken model (500).
    #[error("{0}")]
    Internal(String),
}

impl From<ModelError> for BackendError {
    /// Sorts model errors by who must act: the caller (bad input) or the
    /// operator (everything else).
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::ContextTooLong { requested, limit } => {
                Self::ContextTooLong { requested, limit }
            }
            ModelError::ChatTemplate(_)
            | ModelError::Sampling(_)
            | ModelError::InputShape(_)
            | ModelError::TokenOutOfRange { .. } => Self::BadRequest(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}
