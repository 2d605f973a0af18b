//! Prometheus metrics of one block server: what it served, how fast, what it
//! refused, and how much KV cache is left.
//!
//! [`Server::metrics`](crate::Server::metrics) gives a [`MetricsHandle`]
//! that renders them in the OpenMetrics text format; `hypertensor serve --metrics-listen` exposes that
//! at `GET /metrics`. Every name starts with `hypertensor_server_`.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wire::{ErrorCode, Span};

use crate::state::Shared;

/// The `Content-Type` of [`ServerMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders a running server's metrics; cheap to clone.
#[derive(Clone)]
pub struct MetricsHandle(pub(crate) Arc<Shared>);

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsHandle")
    }
}

impl MetricsHandle {
    /// The exposition text, in [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let shared = &self.0;
        shared
            .metrics
            .encode(shared.budget.free(), shared.info().span)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

/// Every metric a server keeps.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    registry: Registry,
    sessions_opened: Counter,
    sessions_active: Gauge,
    requests: Family<KindLabels, Counter>,
    tokens: Counter,
    step_duration: Histogram,
    /// Steps per compute pass; the compute worker observes it.
    pub(crate) batch_sizes: Histogram,
    /// How long each step waited for the compute worker; it observes it.
    pub(crate) queue_waits: Histogram,
    errors: Family<CodeLabels, Counter>,
    pushes: Family<OutcomeLabels, Counter>,
    cache_tokens_left: Gauge,
    cache_tokens_total: Gauge,
    span_start: Gauge,
    span_end: Gauge,
}

impl ServerMetrics {
    /// A registry with every metric at zero and the cache gauges at `cache_tokens`.
    pub(crate) fn new(cache_tokens: u64) -> Self {
        let mut registry = Registry::with_prefix("hypertensor_server");
        let m = Self {
            registry: Registry::default(),
            sessions_opened: Counter::default(),
            sessions_active: Gauge::default(),
            requests: Family::default(),
            tokens: Counter::default(),
            // 0.5 ms to ~8 s: one decode step over one block up to a long
            // prompt over many.
            step_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            // 1 to 128 steps a pass.
            batch_sizes: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            // 10 us (an idle worker) to ~5 s (a long queue).
            queue_waits: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            errors: Family::default(),
            pushes: Family::default(),
            cache_tokens_left: Gauge::default(),
            cache_tokens_total: Gauge::default(),
            span_start: Gauge::default(),
            span_end: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "sessions_opened",
            "Inference sessions opened",
            m.sessions_opened.clone(),
        );
        r.register(
            "sessions_active",
            "Inference sessions open now",
            m.sessions_active.clone(),
        );
        r.register(
            "requests",
            "Computations answered, by kind (step, forward, backward)",
            m.requests.clone(),
        );
        r.register(
            "tokens",
            "Positions run through the hosted blocks (batch x tokens)",
            m.tokens.clone(),
        );
        r.register(
            "compute_duration_seconds",
            "Time from a computation's arrival at the compute worker to its \
             result: the queue wait (queue_wait_seconds) and the run through \
             the hosted blocks",
            m.step_duration.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time a session step waited for the compute worker: behind other \
             passes, or held for a batch",
            m.queue_waits.clone(),
        );
        r.register(
            "batch_size",
            "Session steps run in one compute pass",
            m.batch_sizes.clone(),
        );
        r.register(
            "errors",
            "Error frames sent, by wire error code",
            m.errors.clone(),
        );
        r.register(
            "pushes",
            "Step outputs pushed to the next server of a chain (sent, failed, \
             skipped: that server was unreachable lately) or pushed here by \
             the previous one (received)",
            m.pushes.clone(),
        );
        r.register(
            "cache_tokens_left",
            "KV-cache positions not reserved by sessions",
            m.cache_tokens_left.clone(),
        );
        r.register(
            "cache_tokens",
            "KV-cache budget in positions",
            m.cache_tokens_total.clone(),
        );
        r.register("span_start", "First hosted block", m.span_start.clone());
        r.register(
            "span_end",
            "One past the last hosted block",
            m.span_end.clone(),
        );
        m.cache_tokens_total.set(cache_tokens as i64);
        m.cache_tokens_left.set(cache_tokens as i64);
        Self { registry, ..m }
    }

    /// The exposition text, with the gauges read now.
    pub(crate) fn encode(&self, cache_left: u64, span: Span) -> String {
        self.cache_tokens_left.set(cache_left as i64);
        self.span_start.set(i64::from(span.start));
        self.span_end.set(i64::from(span.end));
        let mut out = String::new();
        // Writing into a String cannot fail; a partial page beats none.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// Marks a session open until the guard drops.
    pub(crate) fn session(&self) -> SessionGuard<'_> {
        self.sessions_opened.inc();
        self.sessions_active.inc();
        SessionGuard(self)
    }

    /// Records one computation of `positions` positions that started at `start`.
    pub(crate) fn computed(&self, kind: &'static str, positions: usize, start: Instant) {
        self.requests.get_or_create(&KindLabels { kind }).inc();
        self.tokens.inc_by(positions as u64);
        self.step_duration.observe(start.elapsed().as_secs_f64());
    }

    /// Counts a push: `sent`, `failed`, `skipped` or `received`.
    pub(crate) fn push(&self, outcome: &'static str) {
        self.pushes.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts an error frame.
    pub(crate) fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabels {
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// An open session; see [`ServerMetrics::session`].
pub(crate) struct SessionGuard<'a>(&'a ServerMetrics);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.sessions_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_sessions_computations_errors_and_gauges() {
        let m = ServerMetrics::new(100);
        let guard = m.session();
        m.computed("step", 7, Instant::now());
        m.error(ErrorCode::BadShape);
        m.batch_sizes.observe(3.0);
        m.queue_waits.observe(0.002);
        let text = m.encode(40, Span { start: 3, end: 9 });
        for line in [
            "hypertensor_server_sessions_opened_total 1",
            "hypertensor_server_sessions_active 1",
            r#"hypertensor_server_requests_total{kind="step"} 1"#,
            "hypertensor_server_tokens_total 7",
            "hypertensor_server_compute_duration_seconds_count 1",
            "hypertensor_server_batch_size_sum 3.0",
            "hypertensor_server_queue_wait_seconds_count 1",
            r#"hypertensor_server_errors_total{code="BadShape"} 1"#,
            "hypertensor_server_cache_tokens_left 40",
            "hypertensor_server_cache_tokens 100",
            "hypertensor_server_span_start 3",
            "hypertensor_server_span_end 9",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        drop(guard);
        assert!(
            m.encode(40, Span { start: 3, end: 9 })
                .contains("hypertensor_server_sessions_active 0")
        );
    }
}
