//! Server metrics: the requests a service answers, by caller, route and
//! method, recorded by [`PropagationLayer`](super::PropagationLayer).

use std::{
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use http::{HeaderValue, Method, StatusCode};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rustc_hash::FxHashSet;
use tokio::time::Instant;

use super::DeadlineRejection;
use crate::metrics::{label_value, LATENCY_BUCKETS};

/// Distinct `caller` label values kept by default; see
/// [`ServerMetrics::set_max_caller_labels`].
pub const DEFAULT_MAX_CALLER_LABELS: usize = 64;

/// Distinct `route` label values kept by default; see
/// [`ServerMetrics::set_max_route_labels`].
pub const DEFAULT_MAX_ROUTE_LABELS: usize = 256;

/// The longest `X-Service-Name` kept as a `caller` label, in bytes; a longer
/// one counts under [`OTHER_LABEL`].
pub const MAX_CALLER_LEN: usize = 64;

/// The `caller` of callers past the label limit or with an unusable
/// `X-Service-Name`, the `route` of routes past theirs, and the `method` of
/// methods other than the nine of RFC 9110 and RFC 5789.
pub const OTHER_LABEL: &str = "other";

/// The `caller` of a request without `X-Service-Name`.
pub const UNKNOWN_CALLER: &str = "unknown";

/// The `route` of a request the route extractor gave none for (with axum's
/// `MatchedPath`: a path no route matched). Never the raw path: that would
/// make one series per URL.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    caller: String,
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    caller: String,
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    caller: String,
    route: String,
    method: String,
    reason: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// The metric families; clones are live handles over the same values.
#[derive(Clone)]
struct Families {
    requests: Family<StatusLabels, Counter>,
    duration: HistogramFamily,
    in_flight: Family<RouteLabels, Gauge>,
    rejections: Family<RejectionLabels, Counter>,
}

impl Families {
    fn new() -> Self {
        Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            rejections: Family::default(),
        }
    }

    /// Registers a clone of every family (counters without `_total`: the
    /// encoder adds it).
    fn register(&self, registry: &mut Registry) {
        let f = self.clone();
        registry.register(
            "server_requests",
            "Requests answered, by caller (X-Service-Name), route, method and status code (or cancelled)",
            f.requests,
        );
        registry.register(
            "server_request_duration_seconds",
            "Time from a request's arrival to its response's head, by caller, route and method",
            f.duration,
        );
        registry.register(
            "server_in_flight",
            "Requests being handled now, by caller, route and method",
            f.in_flight,
        );
        registry.register(
            "server_deadline_rejections",
            "Requests answered 408 because of the caller's deadline: expired or too_short on arrival, exceeded while handled",
            f.rejections,
        );
    }
}

/// A bounded set of label values: the first `max` distinct values keep
/// their own label, later ones share [`OTHER_LABEL`].
struct BoundedLabels {
    seen: RwLock<FxHashSet<String>>,
    max: AtomicUsize,
}

impl BoundedLabels {
    fn new(max: usize) -> Self {
        BoundedLabels {
            seen: RwLock::new(FxHashSet::default()),
            max: AtomicUsize::new(max),
        }
    }

    fn label(&self, value: &str) -> String {
        if value == OTHER_LABEL || read(&self.seen).contains(value) || self.admit(value) {
            return label_value(value);
        }
        OTHER_LABEL.to_owned()
    }

    /// Takes `value` in if there is room (or it is in already).
    fn admit(&self, value: &str) -> bool {
        let mut seen = write(&self.seen);
        if seen.contains(value) {
            return true;
        }
        if seen.len() >= self.max.load(Ordering::Relaxed) {
            return false;
        }
        seen.insert(value.to_owned());
        true
    }
}

struct Inner {
    registry: Registry,
    families: Families,
    callers: BoundedLabels,
    routes: BoundedLabels,
}

/// The Prometheus metrics of the requests a service answers, with their own
/// registry; recorded by a [`PropagationLayer`](super::PropagationLayer)
/// given them with [`metrics`](super::PropagationLayer::metrics).
///
/// | family | type | labels |
/// |---|---|---|
/// | `server_requests_total` | counter | `caller`, `route`, `method`, `status` (a status code, or `cancelled`) |
/// | `server_request_duration_seconds` | histogram ([`LATENCY_BUCKETS`]) | `caller`, `route`, `method` |
/// | `server_in_flight` | gauge | `caller`, `route`, `method` |
/// | `server_deadline_rejections_total` | counter | `caller`, `route`, `method`, `reason` ([`DeadlineRejection::reason`]) |
///
/// Every label is bounded, whatever callers send:
///
/// * `caller` is the `X-Service-Name` header ([`UNKNOWN_CALLER`] without
///   one); a value longer than [`MAX_CALLER_LEN`] or with characters other
///   than ASCII letters, digits, `-`, `_` and `.`, and every caller past
///   [`set_max_caller_labels`](Self::set_max_caller_labels) distinct ones,
///   counts as [`OTHER_LABEL`];
/// * `route` is what the layer's
///   [`route_with`](super::PropagationLayer::route_with) extractor returns
///   (with axum, the `MatchedPath` template such as `/users/{id}`), or
///   [`UNMATCHED_ROUTE`]; routes past
///   [`set_max_route_labels`](Self::set_max_route_labels) count as
///   [`OTHER_LABEL`];
/// * `method` is one of the nine standard methods or [`OTHER_LABEL`].
///
/// The duration runs from the request's arrival to its response's head (a
/// streamed body's transfer is not included). A request whose future is
/// dropped before it answers (the client went away) counts with
/// `status="cancelled"`.
///
/// The names start with `server_`, so these families and the client's
/// [`Metrics`](crate::metrics::Metrics) can share one registry: register
/// both with their `register` methods. Cheap to clone: clones share the
/// registry and the values.
///
/// ```
/// use patient_http::propagation::ServerMetrics;
/// use prometheus_client::registry::Registry;
///
/// let server = ServerMetrics::new();
/// let mut app = Registry::default();
/// server.register(&mut app);
/// patient_http::metrics::Metrics::new().register(&mut app);
/// ```
#[derive(Clone)]
pub struct ServerMetrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerMetrics").finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Metrics in a new registry, names without a prefix
    /// (`server_requests_total`).
    pub fn new() -> Self {
        Self::in_registry(Registry::default())
    }

    /// Metrics in a new registry whose names start with `prefix` and an
    /// underscore (`billing` gives `billing_server_requests_total`).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self::in_registry(Registry::with_prefix(prefix))
    }

    fn in_registry(mut registry: Registry) -> Self {
        let families = Families::new();
        families.register(&mut registry);
        ServerMetrics {
            inner: Arc::new(Inner {
                registry,
                families,
                callers: BoundedLabels::new(DEFAULT_MAX_CALLER_LABELS),
                routes: BoundedLabels::new(DEFAULT_MAX_ROUTE_LABELS),
            }),
        }
    }

    /// The registry these metrics live in.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Registers the same families (live handles, not copies of the values)
    /// into another registry, for an application that exposes one registry
    /// of its own. These metrics keep reporting through
    /// [`render`](Self::render) too.
    pub fn register(&self, registry: &mut Registry) {
        self.inner.families.register(registry);
    }

    /// Sets how many distinct `caller` label values are kept (default
    /// [`DEFAULT_MAX_CALLER_LABELS`]; zero folds every caller into
    /// [`OTHER_LABEL`]); callers first seen after that many count as
    /// [`OTHER_LABEL`]. Values already in use keep their label.
    pub fn set_max_caller_labels(&self, max: usize) {
        self.inner.callers.max.store(max, Ordering::Relaxed);
    }

    /// Sets how many distinct `route` label values are kept (default
    /// [`DEFAULT_MAX_ROUTE_LABELS`]); routes first seen after that many
    /// count as [`OTHER_LABEL`]. Values already in use keep their label.
    pub fn set_max_route_labels(&self, max: usize) {
        self.inner.routes.max.store(max, Ordering::Relaxed);
    }

    /// Every metric in the OpenMetrics text format (ends with `# EOF`), for
    /// a `/metrics` endpoint served with
    /// [`CONTENT_TYPE`](crate::metrics::CONTENT_TYPE).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        // Writing into a String cannot fail and the label sets always
        // encode: an error could only leave the output partial.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// Starts counting a request that arrived now: in flight until the
    /// returned record is finished or dropped.
    pub(crate) fn start(
        &self,
        caller: Option<&HeaderValue>,
        route: Option<&str>,
        method: &Method,
    ) -> ServedRequest {
        let caller = match caller {
            None => UNKNOWN_CALLER.to_owned(),
            Some(value) => match caller_name(value) {
                Some(name) => self.inner.callers.label(name),
                None => OTHER_LABEL.to_owned(),
            },
        };
        let route = match route {
            Some(route) => self.inner.routes.label(route),
            None => UNMATCHED_ROUTE.to_owned(),
        };
        let labels = RouteLabels {
            caller,
            route,
            method: method_label(method).to_owned(),
        };
        let in_flight = self.inner.families.in_flight.get_or_create(&labels).clone();
        in_flight.inc();
        ServedRequest {
            families: self.inner.families.clone(),
            labels,
            arrived: Instant::now(),
            in_flight,
            finished: false,
        }
    }
}

/// The `X-Service-Name` of a request, if usable as a label as it is.
fn caller_name(value: &HeaderValue) -> Option<&str> {
    let name = value.to_str().ok()?.trim();
    let usable = !name.is_empty()
        && name.len() <= MAX_CALLER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    usable.then_some(name)
}

/// The `method` label: a standard method's name, else [`OTHER_LABEL`]
/// (extension methods are unbounded).
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    const NAMES: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    STANDARD
        .iter()
        .position(|m| m == method)
        .map_or(OTHER_LABEL, |i| NAMES[i])
}

/// One request being served, counted in `server_in_flight` until finished
/// or dropped; dropped unfinished, it counts as `cancelled`.
pub(crate) struct ServedRequest {
    families: Families,
    labels: RouteLabels,
    arrived: Instant,
    in_flight: Gauge,
    finished: bool,
}

impl ServedRequest {
    /// Records the answer: its status, the time since arrival, and the
    /// deadline rejection it was, if any.
    pub(crate) fn finish(mut self, status: StatusCode, rejection: Option<DeadlineRejection>) {
        self.finished = true;
        if let Some(rejection) = rejection {
            self.families
                .rejections
                .get_or_create(&RejectionLabels {
                    caller: self.labels.caller.clone(),
                    route: self.labels.route.clone(),
                    method: self.labels.method.clone(),
                    reason: rejection.reason().to_owned(),
                })
                .inc();
        }
        self.record(status.as_str());
    }

    fn record(&self, status: &str) {
        self.families
            .requests
            .get_or_create(&StatusLabels {
                caller: self.labels.caller.clone(),
                route: self.labels.route.clone(),
                method: self.labels.method.clone(),
                status: status.to_owned(),
            })
            .inc();
        self.families
            .duration
            .get_or_create(&self.labels)
            .observe(self.arrived.elapsed().as_secs_f64());
    }
}

impl Drop for ServedRequest {
    fn drop(&mut self) {
        if !self.finished {
            self.record("cancelled");
        }
        self.in_flight.dec();
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_names_are_validated() {
        for ok in ["billing", "api-gw", "svc_2.eu"] {
            assert_eq!(caller_name(&HeaderValue::from_static(ok)), Some(ok));
        }
        assert_eq!(
            caller_name(&HeaderValue::from_static(" billing ")),
            Some("billing")
        );
        let long = "x".repeat(MAX_CALLER_LEN + 1);
        for bad in ["", "a b", "a\"b", "x/y", long.as_str()] {
            assert_eq!(
                caller_name(&HeaderValue::from_str(bad).unwrap()),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            caller_name(&HeaderValue::from_bytes(b"\xffsvc").unwrap()),
            None
        );
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(
            method_label(&Method::from_bytes(b"PURGE").unwrap()),
            OTHER_LABEL
        );
    }

    #[test]
    fn bounded_labels_fold_into_other() {
        let labels = BoundedLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_LABEL);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label(OTHER_LABEL), OTHER_LABEL);
        assert_eq!(labels.label("q\"uote"), OTHER_LABEL);
        let none = BoundedLabels::new(0);
        assert_eq!(none.label("a"), OTHER_LABEL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_counts_as_cancelled() {
        let m = ServerMetrics::new();
        let served = m.start(None, None, &Method::GET);
        assert!(m
            .render()
            .contains(r#"server_in_flight{caller="unknown",route="unmatched",method="GET"} 1"#));
        tokio::time::advance(std::time::Duration::from_millis(30)).await;
        drop(served);
        let text = m.render();
        assert!(
            text.contains(r#"server_in_flight{caller="unknown",route="unmatched",method="GET"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"server_requests_total{caller="unknown",route="unmatched",method="GET",status="cancelled"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"server_request_duration_seconds_bucket{le="0.05",caller="unknown",route="unmatched",method="GET"} 1"#),
            "{text}"
        );
    }
}
