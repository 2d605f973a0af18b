//! The HTTP face of Hypertensor: an OpenAI-compatible API, a web chat page, a
//! swarm monitor page and Prometheus metrics.
//!
//! Neighbours: below this crate sits whatever runs the model, reached only
//! through the [`Backend`] trait — a whole model in this process
//! ([`LocalBackend`], over the `model` crate) or the swarm `client`
//! ([`SwarmBackend`]).
//! Above it is the `hypertensor api` command, which builds a backend and calls
//! [`serve`].
//!
//! Routes:
//! - `POST /v1/chat/completions`, `POST /v1/completions` (both stream as SSE
//!   with `"stream": true`), `GET /v1/models`, `GET /v1/models/{id}`;
//! - `GET /` the web chat, `GET /monitor` the swarm monitor and
//!   `GET /api/v1/state` the JSON it polls;
//! - `GET /metrics` in the Prometheus (OpenMetrics) text format.
//!
//! Every error is an OpenAI-shaped body, `{"error": {"message", "type",
//! "param", "code"}}`, so OpenAI client libraries raise their usual
//! exceptions.

#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod local;
pub mod metrics;
pub mod monitor;
pub mod openai;
pub mod routes;
mod sse;
pub mod swarm;
mod worker;

use std::future::Future;
use std::io;
use std::sync::Arc;

pub use backend::{Backend, BackendError};
pub use error::ApiError;
pub use local::LocalBackend;
pub use metrics::Metrics;
pub use monitor::{ModelState, PeerState, ServerEntry, SwarmState};
pub use routes::router;
pub use swarm::SwarmBackend;

/// Serves the API on `listener` until `shutdown` completes.
///
/// When `shutdown` fires, the listener stops accepting, generations still
/// running are cancelled (their streams end early, so slow answers cannot hold
/// the process up), and the call returns once every connection is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let stopping = worker::Stopping::default();
    let app = routes::router_with(backend, Arc::new(Metrics::new()), stopping.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("api: shutting down");
            stopping.stop();
        })
        .await
}
