//! Runs one job on a blocking thread and hands its pieces of text to the
//! async side over a channel.
//!
//! The channel is the cancellation path too: when the HTTP response (or the
//! handler awaiting it) is dropped because the client went away, the receiver
//! goes with it, the next send fails, and `on_text` tells the backend to
//! stop. The backend's blocking work never holds an async worker thread.
//!
//! The channel is unbounded on purpose: a client that reads slowly (or not
//! at all) must not stall the model, which serves one generation at a time
//! locally and holds remote sessions in the swarm. What it buffers is bounded
//! anyway: one generation's text, at most the model's context.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use model::{FinishReason, Generation};
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError};
use crate::error::ApiError;
use crate::openai::{Input, Job};

/// What the blocking side reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// New text of the answer.
    Text(String),
    /// The end: the whole generation, or why there is none.
    Done(Result<Generation, ApiError>),
}

/// Set once the server is shutting down; running generations then stop at
/// their next piece, so streams end instead of holding shutdown up.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stopping(Arc<AtomicBool>);

impl Stopping {
    /// Asks every running generation to stop.
    pub(crate) fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts `job` on the blocking pool; the receiver yields its text, then
/// exactly one `Done` (or closes early if the backend panicked).
pub(crate) fn start(
    backend: Arc<dyn Backend>,
    job: Arc<Job>,
    stopping: Stopping,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        let result = run(&*backend, &job, &tx, &stopping);
        if let Ok(g) = &result {
            tracing::info!(
                model = %job.model,
                prompt_tokens = g.prompt_tokens,
                generated = g.token_ids.len(),
                finish = ?g.finish_reason,
                "api: generation done"
            );
        }
        // The client may be gone; nobody is left to tell then.
        let _ = tx.send(Event::Done(result));
    });
    rx
}

fn run(
    backend: &dyn Backend,
    job: &Job,
    tx: &mpsc::UnboundedSender<Event>,
    stopping: &Stopping,
) -> Result<Generation, ApiError> {
    let param = job.input.param();
    let blame = |e: BackendError| match e {
        BackendError::ContextTooLong { requested, limit } => {
            ApiError::context_too_long(requested, limit, param)
        }
        other => ApiError::from(other),
    };
    let prompt_ids = match &job.input {
        Input::Chat(messages) => backend.chat_prompt(&job.model, messages),
        Input::Text(text) => backend.encode(&job.model, text),
    }
    .map_err(blame)?;
    let limit = backend.max_length(&job.model).map_err(blame)?;
    let req = job.request(prompt_ids, limit)?;
    let mut on_text =
        |piece: &str| !stopping.is_stopped() && tx.send(Event::Text(piece.to_owned())).is_ok();
    let generation = backend
        .generate(&job.model, &req, &mut on_text)
        .map_err(blame)?;
    if generation.finish_reason == FinishReason::Cancelled && stopping.is_stopped() {
        return Err(ApiError::from(BackendError::Unavailable(
            "the server is shutting down".into(),
        )));
    }
    Ok(generation)
}
