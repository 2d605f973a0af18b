//! Streamed answers: a generation's events as OpenAI's server-sent events.
//!
//! Chat streams send a first chunk with the role, one chunk per piece of
//! text, a chunk carrying `finish_reason`, a usage chunk when asked, then
//! `data: [DONE]`. A failure after the stream started is sent as an OpenAI
//! error object (the status line is gone by then) and the stream ends without
//! `[DONE]`, which OpenAI's client libraries raise as an error.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use model::Generation;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{
    ChatCompletionChunk, ChunkChoice, ChunkUsage, Delta, TextChoice, TextCompletion, Usage,
    finish_reason,
};
use crate::worker::Event;

/// Which endpoint's chunk shape to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Text,
}

/// The fields every chunk of one answer shares, and how to build each chunk.
#[derive(Debug, Clone)]
pub(crate) struct Chunker {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl Chunker {
    fn usage_field(&self) -> ChunkUsage {
        if self.include_usage {
            ChunkUsage::Null
        } else {
            ChunkUsage::Absent
        }
    }

    fn chat(&self, choices: Vec<ChunkChoice>, usage: ChunkUsage) -> String {
        json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn text(&self, choices: Vec<TextChoice>, usage: ChunkUsage) -> String {
        json(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    /// The chunk that opens a chat answer; completions have none.
    fn opening(&self) -> Option<String> {
        (self.kind == Kind::Chat).then(|| {
            self.chat(
                vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                self.usage_field(),
            )
        })
    }

    fn piece(&self, text: String, finish: Option<&str>) -> String {
        let finish_reason = finish.map(String::from);
        match self.kind {
            Kind::Chat => self.chat(
                vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: finish.is_none().then_some(text),
                    },
                    logprobs: None,
                    finish_reason,
                }],
                self.usage_field(),
            ),
            Kind::Text => self.text(
                vec![TextChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason,
                }],
                self.usage_field(),
            ),
        }
    }

    fn usage(&self, usage: Usage) -> String {
        match self.kind {
            Kind::Chat => self.chat(vec![], ChunkUsage::Some(usage)),
            Kind::Text => self.text(vec![], ChunkUsage::Some(usage)),
        }
    }

    /// The data lines that end an answer.
    fn ending(&self, g: &Generation) -> Vec<String> {
        let mut out = vec![self.piece(String::new(), Some(finish_reason(g.finish_reason)))];
        if self.include_usage {
            out.push(self.usage(Usage::new(g.prompt_tokens, g.token_ids.len())));
        }
        out.push("[DONE]".into());
        out
    }
}

fn json(v: &impl Serialize) -> String {
    // These types have string keys and no maps of their own: serializing
    // them cannot fail.
    serde_json::to_string(v).unwrap_or_else(|e| {
        tracing::error!("serializing a chunk: {e}");
        String::from("{}")
    })
}

/// What the stream does next.
struct State {
    rx: mpsc::UnboundedReceiver<Event>,
    chunker: Chunker,
    metrics: Arc<Metrics>,
    queue: VecDeque<String>,
    finished: bool,
}

impl State {
    /// Queues the data lines of one event.
    fn push(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Text(t)) => self.queue.push_back(self.chunker.piece(t, None)),
            Some(Event::Done(Ok(g))) => {
                self.metrics
                    .count_tokens(g.prompt_tokens, g.token_ids.len());
                let ending = self.chunker.ending(&g);
                self.queue.extend(ending);
                self.finished = true;
            }
            Some(Event::Done(Err(e))) => self.fail(e),
            None => self.fail(ApiError::internal("the generation ended unexpectedly")),
        }
    }

    fn fail(&mut self, e: ApiError) {
        tracing::warn!("api: stream failed: {}", e.body.message);
        self.queue.push_back(json(&e.envelope()));
        self.finished = true;
    }
}

/// The SSE response for a generation whose first event was `first`.
///
/// The caller awaits that first event before answering so that a failure
/// before any text (no servers, context too long) gets a real HTTP status.
pub(crate) fn response(
    chunker: Chunker,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    metrics: Arc<Metrics>,
) -> Response {
    let mut state = State {
        rx,
        queue: chunker.opening().into_iter().collect(),
        chunker,
        metrics,
        finished: false,
    };
    state.push(Some(first));
    // Comments keep proxies from timing out while a slow swarm computes.
    Sse::new(events(state))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn events(state: State) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            if s.finished {
                return None;
            }
            let event = s.rx.recv().await;
            s.push(event);
        }
    })
}
