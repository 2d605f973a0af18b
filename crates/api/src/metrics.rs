//! Prometheus metrics of the API, in their own registry so the block server
//! can expose the same format later without this crate's routes.
//!
//! Exposed at `GET /metrics` in the OpenMetrics text format, which Prometheus
//! scrapes natively. Every name starts with `hypertensor_api_`.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

/// Labels of the duration histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 ms to ~80 s: covers a cached `/v1/models` as well as a long answer from
/// a slow swarm.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every metric the API keeps, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    time_to_first_token: Histogram,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hypertensor_api");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = HistogramFamily::<RouteLabels>::new_with_constructor(latency_histogram);
        let time_to_first_token = latency_histogram();
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let in_flight = Gauge::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending the last byte of its response (streams included)",
            duration.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from receiving a completion request to its first generated text",
            time_to_first_token.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests received whose response is not fully sent yet",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            time_to_first_token,
            prompt_tokens,
            generated_tokens,
            in_flight,
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error would be a bug in the
        // encoder, and a partial page is still better than none.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// Marks a request as started; the returned guard records its duration
    /// and ends it when dropped, so a stream counts until its last byte.
    pub fn start_request(self: &Arc<Self>, route: &str) -> RequestGuard {
        self.in_flight.inc();
        RequestGuard {
            metrics: self.clone(),
            route: route.to_string(),
            start: Instant::now(),
        }
    }

    /// Counts an answered request.
    pub fn count_response(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// Records the delay before a generation's first text.
    pub fn observe_time_to_first_token(&self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
    }

    /// Counts the tokens of one finished generation.
    pub fn count_tokens(&self, prompt: usize, generated: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.generated_tokens.inc_by(generated as u64);
    }
}

/// A request in flight; see [`Metrics::start_request`].
#[derive(Debug)]
pub struct RequestGuard {
    metrics: Arc<Metrics>,
    route: String,
    start: Instant,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .duration
            .get_or_create(&RouteLabels {
                route: std::mem::take(&mut self.route),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_the_in_flight_gauge() {
        let m = Arc::new(Metrics::new());
        let guard = m.start_request("/v1/models");
        m.count_response("/v1/models", 200);
        m.count_tokens(7, 3);
        m.observe_time_to_first_token(0.02);
        let text = m.encode();
        assert!(
            text.contains("hypertensor_api_requests_in_flight 1"),
            "{text}"
        );
        drop(guard);
        let text = m.encode();
        assert!(
            text.contains(r#"hypertensor_api_requests_total{route="/v1/models",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("hypertensor_api_prompt_tokens_total 7"));
        assert!(text.contains("hypertensor_api_generated_tokens_total 3"));
        assert!(text.contains("hypertensor_api_time_to_first_token_seconds_count 1"));
        assert!(
            text.contains(
                r#"hypertensor_api_request_duration_seconds_count{route="/v1/models"} 1"#
            )
        );
        assert!(text.contains("hypertensor_api_requests_in_flight 0"));
        assert!(text.ends_with("# EOF\n"));
    }
}
