//! The gateway's metrics, rendered at `/metrics` with the `patient_gateway_`
//! prefix. Label values are bounded: routes and upstreams come from the
//! settings, statuses are numbers.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `patient_gateway_requests_total` | counter | `route`, `upstream`, `status` |
//! | `patient_gateway_request_duration_seconds` | histogram (to the end of the body) | `route` |
//! | `patient_gateway_time_to_first_byte_seconds` | histogram | `route` |
//! | `patient_gateway_time_to_first_event_seconds` | histogram (first content event) | `route` |
//! | `patient_gateway_event_added_latency_seconds` | histogram (an event's read to its hand-over) | `route` |
//! | `patient_gateway_streams_cut_total` | counter | `route`, `reason` |
//! | `patient_gateway_bytes_total` | counter | `route`, `direction` (`request`, `response`) |
//! | `patient_gateway_retries_total` | counter | `route` |
//! | `patient_gateway_failovers_total` | counter | `route` |
//! | `patient_gateway_errors_total` | counter (answered by the gateway) | `route`, `type` |
//! | `patient_gateway_tokens_total` | counter (from `usage`) | `route`, `kind` (`prompt`, `completion`) |

use std::time::Duration;

use prometheus_client::{
    encoding::{text::encode_registry, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    upstream: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CutLabels {
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    route: String,
    kind: &'static str,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];
const EVENT_BUCKETS: [f64; 8] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
];

fn histogram(buckets: &'static [f64]) -> Histogram {
    Histogram::new(buckets.iter().copied())
}

/// The gateway's metric families. Cheap to clone.
#[derive(Clone)]
pub struct GatewayMetrics {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    ttfb: Family<RouteLabel, Histogram, fn() -> Histogram>,
    first_event: Family<RouteLabel, Histogram, fn() -> Histogram>,
    event_latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    cut: Family<CutLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    retries: Family<RouteLabel, Counter>,
    failovers: Family<RouteLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Empty families, registered under `patient_gateway_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("patient_gateway");
        let latency: fn() -> Histogram = || histogram(&LATENCY_BUCKETS);
        let event: fn() -> Histogram = || histogram(&EVENT_BUCKETS);
        let inner = Inner {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            ttfb: Family::new_with_constructor(latency),
            first_event: Family::new_with_constructor(latency),
            event_latency: Family::new_with_constructor(event),
            cut: Family::default(),
            bytes: Family::default(),
            retries: Family::default(),
            failovers: Family::default(),
            errors: Family::default(),
            tokens: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Proxied requests by route, upstream and status sent",
            inner.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From taking a request to the end of its response",
            inner.duration.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "From taking a request to the upstream's response head",
            inner.ttfb.clone(),
        );
        registry.register(
            "time_to_first_event_seconds",
            "From taking a request to the first content event of its stream",
            inner.first_event.clone(),
        );
        registry.register(
            "event_added_latency_seconds",
            "From reading an event from the upstream to handing it to the client connection",
            inner.event_latency.clone(),
        );
        registry.register(
            "streams_cut",
            "Streams that ended before their end, by reason",
            inner.cut.clone(),
        );
        registry.register("bytes", "Body bytes by direction", inner.bytes.clone());
        registry.register("retries", "Retried attempts", inner.retries.clone());
        registry.register(
            "failovers",
            "Requests sent on to another upstream after one failed",
            inner.failovers.clone(),
        );
        registry.register(
            "errors",
            "Errors the gateway answered itself, by type",
            inner.errors.clone(),
        );
        registry.register(
            "tokens",
            "Tokens of OpenAI-style usage reports",
            inner.tokens.clone(),
        );
        GatewayMetrics {
            inner: std::sync::Arc::new(Inner { registry, ..inner }),
        }
    }

    fn route(route: &str) -> RouteLabel {
        RouteLabel {
            route: route.to_owned(),
        }
    }

    /// A stream cut before its end.
    pub fn cut(&self, route: &str, reason: &str) {
        self.inner
            .cut
            .get_or_create(&CutLabels {
                route: route.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// An error the gateway answered.
    pub fn error(&self, route: &str, kind: &'static str) {
        self.inner
            .errors
            .get_or_create(&ErrorLabels {
                route: route.to_owned(),
                r#type: kind,
            })
            .inc();
    }

    /// Usage of a stream or a response.
    pub fn tokens(&self, route: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.inner
                .tokens
                .get_or_create(&TokenLabels {
                    route: route.to_owned(),
                    kind,
                })
                .inc_by(n);
        }
    }

    /// The families as OpenMetrics text (without `# EOF`).
    pub fn render_into(&self, out: &mut String) {
        let _ = encode_registry(out, &self.inner.registry);
    }
}

/// The handles of one route's families, looked up once when the route is
/// built rather than on every request.
pub(crate) struct RouteMetrics {
    duration: Histogram,
    ttfb: Histogram,
    first_event: Histogram,
    event_latency: Histogram,
    bytes_request: Counter,
    bytes_response: Counter,
    retries: Counter,
    failovers: Counter,
    /// Per upstream (and one more for answers no upstream gave): the
    /// counters by status seen so far.
    requests: Vec<std::sync::Mutex<Vec<(u16, Counter)>>>,
    route: String,
    upstreams: Vec<String>,
    families: GatewayMetrics,
}

impl GatewayMetrics {
    /// The handles of route `route` over `upstreams` (their origins).
    pub(crate) fn route_handles(&self, route: &str, upstreams: &[String]) -> RouteMetrics {
        let label = Self::route(route);
        let i = &self.inner;
        let direction = |direction| DirectionLabels {
            route: route.to_owned(),
            direction,
        };
        // Each handle in its own statement: a family's guard must be gone
        // before the same family is asked again (a new key takes its lock).
        let duration = i.duration.get_or_create(&label).clone();
        let ttfb = i.ttfb.get_or_create(&label).clone();
        let first_event = i.first_event.get_or_create(&label).clone();
        let event_latency = i.event_latency.get_or_create(&label).clone();
        let bytes_request = i.bytes.get_or_create(&direction("request")).clone();
        let bytes_response = i.bytes.get_or_create(&direction("response")).clone();
        let retries = i.retries.get_or_create(&label).clone();
        let failovers = i.failovers.get_or_create(&label).clone();
        RouteMetrics {
            duration,
            ttfb,
            first_event,
            event_latency,
            bytes_request,
            bytes_response,
            retries,
            failovers,
            requests: (0..=upstreams.len())
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
            route: route.to_owned(),
            upstreams: upstreams.to_vec(),
            families: self.clone(),
        }
    }
}

impl RouteMetrics {
    /// A response sent, from upstream `upstream` (`None`: the gateway's own).
    pub(crate) fn request(&self, upstream: Option<usize>, status: u16) {
        let index = upstream
            .filter(|i| *i < self.upstreams.len())
            .unwrap_or(self.upstreams.len());
        let mut seen = self.requests[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = seen.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        let counter = self
            .families
            .inner
            .requests
            .get_or_create(&RequestLabels {
                route: self.route.clone(),
                upstream: self.upstreams.get(index).cloned().unwrap_or_default(),
                status,
            })
            .clone();
        counter.inc();
        seen.push((status, counter));
    }

    pub(crate) fn duration(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    pub(crate) fn ttfb(&self, took: Duration) {
        self.ttfb.observe(took.as_secs_f64());
    }

    pub(crate) fn first_event(&self, took: Duration) {
        self.first_event.observe(took.as_secs_f64());
    }

    pub(crate) fn event_latency(&self) -> &Histogram {
        &self.event_latency
    }

    pub(crate) fn bytes(&self, response: bool, n: u64) {
        match response {
            true => self.bytes_response.inc_by(n),
            false => self.bytes_request.inc_by(n),
        };
    }

    pub(crate) fn retries(&self, n: u64) {
        if n > 0 {
            self.retries.inc_by(n);
        }
    }

    pub(crate) fn failover(&self) {
        self.failovers.inc();
    }

    /// The route's name.
    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    /// The families, for the rarer counters.
    pub(crate) fn families(&self) -> &GatewayMetrics {
        &self.families
    }
}
