//! The axum router: OpenAI endpoints, the two pages, the monitor's JSON and
//! the metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::backend::Backend;
use crate::error::ApiError;
use crate::metrics::{self, Metrics, RequestGuard};
use crate::monitor::StateResponse;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChunkUsage,
    CompletionRequest, Job, ModelCard, ModelList, TextChoice, TextCompletion, Usage, finish_reason,
};
use crate::sse::{self, Chunker, Kind};
use crate::worker::{self, Event, Stopping};

/// Largest request body accepted (413 above): far more than any prompt a
/// model here can take, small enough that a flood of bodies cannot exhaust
/// memory.
pub const BODY_LIMIT: usize = 1 << 20;

/// How much of an oversize body is read and thrown away before answering
/// 413: closing a socket with unread data resets it, and clients would see
/// "connection reset" instead of the error. Past this, the reset it is.
const DRAIN_LIMIT: usize = 16 << 20;

const CHAT_PAGE: &str = include_str!("../static/chat.html");
const MONITOR_PAGE: &str = include_str!("../static/monitor.html");

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    stopping: Stopping,
    /// Unix seconds when this router was built; the models' `created`.
    started: u64,
}

/// The whole API as a router, with its own fresh [`Metrics`].
///
/// [`serve`](crate::serve) adds graceful shutdown; use this to mount the API
/// inside another axum app or to drive it in tests.
pub fn router(backend: Arc<dyn Backend>) -> Router {
    router_with(backend, Arc::new(Metrics::new()), Stopping::default())
}

pub(crate) fn router_with(
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    stopping: Stopping,
) -> Router {
    let state = AppState {
        backend,
        metrics: metrics.clone(),
        stopping,
        started: unix_seconds(),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        // A wildcard: Hugging Face style ids contain slashes.
        .route("/v1/models/{*id}", get(get_model))
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route("/monitor", get(|| async { Html(MONITOR_PAGE) }))
        .route("/api/v1/state", get(swarm_state))
        .route("/metrics", get(metrics_text))
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
        // Router::layer runs after routing, so the middleware sees MatchedPath.
        .layer(middleware::from_fn_with_state(metrics, track))
        .with_state(state)
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts each request by route (the pattern, never the raw path, so label
/// values stay few) and status, and times it until its body is fully sent.
async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let guard = metrics.start_request(&route);
    let response = next.run(req).await;
    metrics.count_response(&route, response.status().as_u16());
    response.map(|inner| {
        Body::new(TrackedBody {
            inner,
            _guard: guard,
        })
    })
}

/// A response body that ends its request's metrics when dropped: after the
/// last byte, or when the client goes away mid-stream.
struct TrackedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A JSON body whose every failure is an OpenAI error: axum's own `Json`
/// answers in plain text, which OpenAI clients cannot parse.
struct OpenAiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = read_body(req).await?;
        serde_json::from_slice(&body)
            .map(OpenAiJson)
            .map_err(|e| ApiError::malformed(format!("invalid request body: {e}")))
    }
}

/// The body, at most [`BODY_LIMIT`] bytes.
async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        // A client waiting for "100 Continue" has sent nothing yet: answer
        // at once (hyper then skips the 100). Others are mid-send: drain.
        if !expects_continue(&parts.headers) && declared.is_some_and(|n| n <= DRAIN_LIMIT as u64) {
            drain(&mut stream, DRAIN_LIMIT).await;
        }
        return Err(ApiError::too_large(BODY_LIMIT));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::malformed(format!("failed to read the request body: {e}")))?;
        if buf.len() + chunk.len() > BODY_LIMIT {
            drain(&mut stream, DRAIN_LIMIT - BODY_LIMIT).await;
            return Err(ApiError::too_large(BODY_LIMIT));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

async fn drain(stream: &mut axum::body::BodyDataStream, mut budget: usize) {
    while let Some(Ok(chunk)) = stream.next().await {
        if chunk.len() >= budget {
            return;
        }
        budget -= chunk.len();
    }
}

async fn chat_completions(
    State(s): State<AppState>,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    run(s, req.into_job()?, Kind::Chat).await
}

async fn completions(
    State(s): State<AppState>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    run(s, req.into_job()?, Kind::Text).await
}

/// Runs a validated job and answers in the endpoint's shape.
async fn run(s: AppState, job: Job, kind: Kind) -> Result<Response, ApiError> {
    let start = Instant::now();
    // Checked here, before a blocking hop, because it is the commonest
    // mistake and `models` is cheap.
    if !s.backend.models().contains(&job.model) {
        return Err(ApiError::model_not_found(&job.model));
    }
    let chunker = Chunker {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{:032x}", rand::random::<u128>()),
            Kind::Text => format!("cmpl-{:032x}", rand::random::<u128>()),
        },
        created: unix_seconds(),
        model: job.model.clone(),
        include_usage: job.include_usage,
    };
    let stream = job.stream;
    let mut rx = worker::start(s.backend.clone(), Arc::new(job), s.stopping.clone());
    let first = match rx.recv().await {
        None => return Err(ApiError::internal("the generation ended unexpectedly")),
        Some(Event::Done(Err(e))) => return Err(e),
        Some(first) => first,
    };
    s.metrics
        .observe_time_to_first_token(start.elapsed().as_secs_f64());
    if stream {
        return Ok(sse::response(chunker, first, rx, s.metrics.clone()));
    }
    let mut event = first;
    let g = loop {
        match event {
            Event::Text(_) => {}
            Event::Done(result) => break result?,
        }
        event = rx
            .recv()
            .await
            .ok_or_else(|| ApiError::internal("the generation ended unexpectedly"))?;
    };
    let usage = Usage::new(g.prompt_tokens, g.token_ids.len());
    s.metrics
        .count_tokens(usage.prompt_tokens, usage.completion_tokens);
    let finish = finish_reason(g.finish_reason).to_string();
    Ok(match kind {
        Kind::Chat => axum::Json(ChatCompletion {
            id: chunker.id,
            object: "chat.completion".into(),
            created: chunker.created,
            model: chunker.model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: g.text,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        })
        .into_response(),
        Kind::Text => axum::Json(TextCompletion {
            id: chunker.id,
            object: "text_completion".into(),
            created: chunker.created,
            model: chunker.model,
            choices: vec![TextChoice {
                text: g.text,
                index: 0,
                logprobs: None,
                finish_reason: Some(finish),
            }],
            usage: ChunkUsage::Some(usage),
        })
        .into_response(),
    })
}

fn card(id: String, created: u64) -> ModelCard {
    ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by: "hypertensor".into(),
    }
}

async fn list_models(State(s): State<AppState>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list".into(),
        data: s
            .backend
            .models()
            .into_iter()
            .map(|id| card(id, s.started))
            .collect(),
    })
}

async fn get_model(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text(), Some("model")))?;
    if s.backend.models().contains(&id) {
        Ok(axum::Json(card(id, s.started)))
    } else {
        Err(ApiError::model_not_found(&id))
    }
}

async fn swarm_state(State(s): State<AppState>) -> axum::Json<StateResponse> {
    let state = s.backend.swarm_state().await;
    let generated_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    axum::Json(StateResponse {
        generated_at_ms,
        state,
    })
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        s.metrics.encode(),
    )
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::wrong_method(method.as_str(), uri.path())
}
