//! Prometheus metrics of the resilience pipeline.
//!
//! A [`Metrics`] owns its own [`Registry`]: there is no global state, so
//! several processors (or several tests) in one process never share or clash
//! over counters. The engine calls the cheap `record_*` / `set_*` methods; an
//! application exposes [`Metrics::render`] (the OpenMetrics text format, which
//! Prometheus scrapes) on an endpoint of its choice, with
//! [`CONTENT_TYPE`] as the `Content-Type`.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `requests_total` | counter | `upstream`, `endpoint`, `method`, `status` (a status code, or an error type) |
//! | `request_duration_seconds` | histogram ([`LATENCY_BUCKETS`]) | `upstream`, `endpoint` |
//! | `attempts_total` | counter | `upstream` |
//! | `retries_total` | counter | `upstream` |
//! | `hedges_total` | counter | `upstream` |
//! | `breaker_state` | gauge (0 closed, 1 open, 2 half-open) | `upstream` |
//! | `rate_limit_waits_total` | counter | `upstream` |
//! | `rate_limit_wait_seconds` | histogram ([`WAIT_BUCKETS`]) | `upstream` |
//! | `in_flight` | gauge | — |
//! | `queue_depth` | gauge | — |
//! | `panics_total` | counter | — |
//!
//! Names carry no prefix unless one is given with [`Metrics::with_prefix`]
//! (`patient` gives `patient_requests_total`, …).
//!
//! Upstream keys come from input (URLs), so the `upstream` label is bounded:
//! past [`Metrics::set_max_upstream_labels`] distinct values (default
//! [`DEFAULT_MAX_UPSTREAM_LABELS`]) further upstreams are counted under
//! `upstream="other"` ([`OTHER_UPSTREAM`]).
//!
//! The `endpoint` label is the task's method and its URL's path reduced to a
//! template (`GET /users/{id}`): a registered template
//! ([`Metrics::set_endpoint_templates`]) when one matches, otherwise the path
//! with identifier-like segments replaced by `{id}` (see [`endpoint`]). It is
//! bounded too: past [`Metrics::set_max_endpoint_labels`] distinct values
//! (default [`DEFAULT_MAX_ENDPOINT_LABELS`]) further endpoints are counted
//! under `endpoint="other"` ([`OTHER_ENDPOINT`]). Redirect hops count under
//! the endpoint of the task's own URL.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_http::metrics::{Metrics, BREAKER_OPEN};
//!
//! let metrics = Metrics::new();
//! metrics.record_attempt("api.example.com:443");
//! metrics.record_request("api.example.com:443", "GET /v1/items", "GET", "200", Duration::from_millis(42));
//! metrics.set_breaker_state("api.example.com:443", BREAKER_OPEN);
//!
//! let text = metrics.render();
//! assert!(text.contains(
//!     r#"requests_total{upstream="api.example.com:443",endpoint="GET /v1/items",method="GET",status="200"} 1"#
//! ));
//! ```

pub mod endpoint;

use rustc_hash::FxHashMap;
use std::{
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock, RwLock,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// The `Content-Type` of [`Metrics::render`]'s output (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket upper bounds, in seconds, of `request_duration_seconds`: 5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket upper bounds, in seconds, of `rate_limit_wait_seconds`: 1 ms to 60 s.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Distinct `upstream` label values kept by default; see
/// [`Metrics::set_max_upstream_labels`].
pub const DEFAULT_MAX_UPSTREAM_LABELS: usize = 256;

/// The `upstream` label of every upstream past the label limit.
pub const OTHER_UPSTREAM: &str = "other";

/// Distinct `endpoint` label values kept by default (over all upstreams);
/// see [`Metrics::set_max_endpoint_labels`].
pub const DEFAULT_MAX_ENDPOINT_LABELS: usize = 512;

/// The `endpoint` label of every endpoint past the label limit.
pub const OTHER_ENDPOINT: &str = "other";

/// The endpoint handles of paths as sent, by path.
type PathHandles = FxHashMap<Box<str>, Arc<EndpointMetrics>>;

/// Paths remembered per upstream with their endpoint's handles.
const RAW_PATHS: usize = 256;

pub use endpoint::InvalidEndpointTemplate;
use endpoint::{endpoint_label, PathTemplate};

/// The value of the `breaker_state` gauge: one of [`BREAKER_CLOSED`],
/// [`BREAKER_OPEN`], [`BREAKER_HALF_OPEN`].
pub type BreakerStateCode = u8;

/// `breaker_state` of a closed breaker (requests flow).
pub const BREAKER_CLOSED: BreakerStateCode = 0;
/// `breaker_state` of an open breaker (requests fail fast).
pub const BREAKER_OPEN: BreakerStateCode = 1;
/// `breaker_state` of a half-open breaker (probes go through).
pub const BREAKER_HALF_OPEN: BreakerStateCode = 2;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    endpoint: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

impl UpstreamLabels {
    fn new(upstream: &str) -> Self {
        UpstreamLabels {
            upstream: label_value(upstream),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

type HistogramFamily = Family<UpstreamLabels, Histogram, fn() -> Histogram>;
type EndpointHistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS.iter().copied())
}

/// Escapes a label value for the text format (the encoder writes values
/// verbatim): backslash, double quote and line feed.
pub(crate) fn label_value(s: &str) -> String {
    if !s.contains(['\\', '"', '\n']) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The metric families; each is a cheap handle over shared values, so clones
/// registered elsewhere report the same numbers.
#[derive(Clone)]
struct Families {
    requests: Family<RequestLabels, Counter>,
    request_duration: EndpointHistogramFamily,
    attempts: Family<UpstreamLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    hedges: Family<UpstreamLabels, Counter>,
    breaker_state: Family<UpstreamLabels, Gauge>,
    rate_limit_waits: Family<UpstreamLabels, Counter>,
    rate_limit_wait: HistogramFamily,
    in_flight: Gauge,
    queue_depth: Gauge,
    panics: Counter,
}

impl Families {
    fn new() -> Self {
        Families {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            breaker_state: Family::default(),
            rate_limit_waits: Family::default(),
            rate_limit_wait: Family::new_with_constructor(wait_histogram),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            panics: Counter::default(),
        }
    }

    /// Registers a clone of every family. Counter names go without `_total`:
    /// the encoder adds it.
    fn register(&self, registry: &mut Registry) {
        let f = self.clone();
        registry.register(
            "requests",
            "Requests sent upstream (every attempt and redirect hop) by upstream, endpoint, method and status code or error type",
            f.requests,
        );
        registry.register(
            "request_duration_seconds",
            "Latency of each request sent upstream, from sending to the end of its body",
            f.request_duration,
        );
        registry.register(
            "attempts",
            "Attempts sent, first attempts, retries and hedges included",
            f.attempts,
        );
        registry.register("retries", "Attempts made after a failed one", f.retries);
        registry.register(
            "hedges",
            "Hedged attempts started while an earlier one was still running",
            f.hedges,
        );
        registry.register(
            "breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open",
            f.breaker_state,
        );
        registry.register(
            "rate_limit_waits",
            "Requests that waited for a rate or concurrency limit",
            f.rate_limit_waits,
        );
        registry.register(
            "rate_limit_wait_seconds",
            "Time spent waiting for a rate or concurrency limit",
            f.rate_limit_wait,
        );
        registry.register("in_flight", "Requests being sent now", f.in_flight);
        registry.register(
            "queue_depth",
            "Tasks waiting for dispatch in the processor's queue",
            f.queue_depth,
        );
        registry.register(
            "panics",
            "Panics caught in engine code (interceptors, preprocessors, secrets, retry predicates), handlers and observers",
            f.panics,
        );
    }
}

struct Inner {
    registry: Registry,
    families: Families,
    upstreams: RwLock<FxHashMap<String, Arc<UpstreamMetrics>>>,
    max_upstreams: AtomicUsize,
    endpoints: Arc<EndpointLimits>,
}

/// What every upstream shares about endpoint labels: the registered
/// templates and the label budget.
struct EndpointLimits {
    templates: RwLock<Arc<[PathTemplate]>>,
    used: AtomicUsize,
    max: AtomicUsize,
}

impl EndpointLimits {
    /// Takes one label from the budget; false when it is spent.
    fn take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// The metrics of one upstream, with its counters looked up once: the
/// engine fetches this per task and records each attempt without building
/// label sets.
pub struct UpstreamMetrics {
    upstream: String,
    families: Families,
    attempts: Counter,
    retries: Counter,
    hedges: Counter,
    /// Made on first use: upstreams without a breaker or limits show none.
    breaker_state: OnceLock<Gauge>,
    rate_limit_waits: OnceLock<(Counter, Histogram)>,
    endpoint_limits: Arc<EndpointLimits>,
    endpoints: RwLock<FxHashMap<String, Arc<EndpointMetrics>>>,
    /// The handles of paths seen as sent (by method), so a repeated path
    /// is not templated again; bounded by [`RAW_PATHS`].
    raw: RwLock<FxHashMap<&'static str, PathHandles>>,
}

/// A status code or an error type, as a `status` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StatusKey {
    Code(u16),
    Error(&'static str),
}

impl fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamMetrics")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl UpstreamMetrics {
    fn new(upstream: &str, families: &Families, endpoint_limits: &Arc<EndpointLimits>) -> Self {
        let labels = UpstreamLabels::new(upstream);
        UpstreamMetrics {
            upstream: upstream.to_owned(),
            attempts: families.attempts.get_or_create(&labels).clone(),
            retries: families.retries.get_or_create(&labels).clone(),
            hedges: families.hedges.get_or_create(&labels).clone(),
            breaker_state: OnceLock::new(),
            rate_limit_waits: OnceLock::new(),
            families: families.clone(),
            endpoint_limits: Arc::clone(endpoint_limits),
            endpoints: RwLock::new(FxHashMap::default()),
            raw: RwLock::new(FxHashMap::default()),
        }
    }

    /// The handles of the endpoint `method` + `path` of this upstream (made
    /// the first time): `path` is reduced to its template (see
    /// [`endpoint`](self::endpoint)); past the endpoint label limit a new
    /// endpoint gets the handles of [`OTHER_ENDPOINT`].
    pub fn endpoint(&self, method: &'static str, path: &str) -> Arc<EndpointMetrics> {
        // A hash lookup of the borrowed pair: no label is built for a path
        // seen before.
        if let Some(found) = read(&self.raw)
            .get(method)
            .and_then(|paths| paths.get(path))
        {
            return Arc::clone(found);
        }
        let templates = Arc::clone(&read(&self.endpoint_limits.templates));
        let handles = self.endpoint_labelled(endpoint_label(method, path, &templates));
        let mut raw = write(&self.raw);
        let paths = raw.entry(method).or_default();
        if paths.len() < RAW_PATHS {
            paths.insert(path.into(), Arc::clone(&handles));
        }
        handles
    }

    fn endpoint_labelled(&self, label: String) -> Arc<EndpointMetrics> {
        if let Some(m) = read(&self.endpoints).get(&label) {
            return Arc::clone(m);
        }
        let mut map = write(&self.endpoints);
        if let Some(m) = map.get(&label) {
            return Arc::clone(m);
        }
        let label = if label == OTHER_ENDPOINT || self.endpoint_limits.take() {
            label
        } else {
            if let Some(m) = map.get(OTHER_ENDPOINT) {
                return Arc::clone(m);
            }
            OTHER_ENDPOINT.to_owned()
        };
        let m = Arc::new(EndpointMetrics::new(&self.upstream, &label, &self.families));
        map.insert(label, Arc::clone(&m));
        m
    }

    /// Counts one attempt.
    pub fn record_attempt(&self) {
        self.attempts.inc();
    }

    /// Counts one retry.
    pub fn record_retry(&self) {
        self.retries.inc();
    }

    /// Counts one hedged attempt.
    pub fn record_hedge(&self) {
        self.hedges.inc();
    }

    /// Sets the breaker state: [`BREAKER_CLOSED`], [`BREAKER_OPEN`] or
    /// [`BREAKER_HALF_OPEN`] (as `i64`, see
    /// [`BreakerState::as_gauge`](crate::breaker::BreakerState::as_gauge)).
    pub fn set_breaker_state(&self, state: i64) {
        self.breaker_state
            .get_or_init(|| {
                self.families
                    .breaker_state
                    .get_or_create(&UpstreamLabels::new(&self.upstream))
                    .clone()
            })
            .set(state);
    }

    /// Counts one wait for a rate or concurrency limit and observes how long
    /// it lasted. Call it only when the task did wait.
    pub fn record_rate_limit_wait(&self, waited: Duration) {
        let (count, histogram) = self.rate_limit_waits.get_or_init(|| {
            let labels = UpstreamLabels::new(&self.upstream);
            (
                self.families
                    .rate_limit_waits
                    .get_or_create(&labels)
                    .clone(),
                self.families.rate_limit_wait.get_or_create(&labels).clone(),
            )
        });
        count.inc();
        histogram.observe(waited.as_secs_f64());
    }

    /// The `upstream` label these handles record under (the key, or
    /// [`OTHER_UPSTREAM`] past the label limit).
    pub fn label(&self) -> &str {
        &self.upstream
    }
}

/// The metrics of one endpoint (method and path template) of one upstream,
/// looked up once per task: each request sent records with no label set
/// built.
pub struct EndpointMetrics {
    upstream: String,
    endpoint: String,
    families: Families,
    duration: Histogram,
    requests: RwLock<FxHashMap<(&'static str, StatusKey), Counter>>,
}

impl fmt::Debug for EndpointMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointMetrics")
            .field("upstream", &self.upstream)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl EndpointMetrics {
    fn new(upstream: &str, endpoint: &str, families: &Families) -> Self {
        EndpointMetrics {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            duration: families
                .request_duration
                .get_or_create(&EndpointLabels {
                    upstream: label_value(upstream),
                    endpoint: label_value(endpoint),
                })
                .clone(),
            families: families.clone(),
            requests: RwLock::new(FxHashMap::default()),
        }
    }

    fn counter(&self, method: &'static str, status: StatusKey) -> Counter {
        let key = (method, status);
        if let Some(c) = read(&self.requests).get(&key) {
            return c.clone();
        }
        let status_label = match status {
            StatusKey::Code(code) => code.to_string(),
            StatusKey::Error(kind) => kind.to_owned(),
        };
        let counter = self
            .families
            .requests
            .get_or_create(&RequestLabels {
                upstream: label_value(&self.upstream),
                endpoint: label_value(&self.endpoint),
                method: label_value(method),
                status: label_value(&status_label),
            })
            .clone();
        write(&self.requests).insert(key, counter.clone());
        counter
    }

    /// Counts one request sent upstream that got `status`, and its latency.
    pub fn record_response(&self, method: &'static str, status: u16, duration: Duration) {
        self.counter(method, StatusKey::Code(status)).inc();
        self.duration.observe(duration.as_secs_f64());
    }

    /// Counts one request sent upstream that ended in an error of type
    /// `error_type` (`"timeout"`, …), and its latency.
    pub fn record_error(&self, method: &'static str, error_type: &'static str, duration: Duration) {
        self.counter(method, StatusKey::Error(error_type)).inc();
        self.duration.observe(duration.as_secs_f64());
    }

    /// The `endpoint` label these handles record under (the template, or
    /// [`OTHER_ENDPOINT`] past the label limit).
    pub fn label(&self) -> &str {
        &self.endpoint
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The pipeline's Prometheus metrics, with their own registry.
///
/// Cheap to clone: clones share the registry and the values. Recording
/// methods take `&self` and never block for long (a read lock on the family's
/// map, a write lock the first time a label set is seen).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics in a new registry, names without a prefix (`requests_total`).
    pub fn new() -> Self {
        Self::in_registry(Registry::default())
    }

    /// Metrics in a new registry whose names start with `prefix` and an
    /// underscore (`patient` gives `patient_requests_total`).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self::in_registry(Registry::with_prefix(prefix))
    }

    fn in_registry(mut registry: Registry) -> Self {
        let families = Families::new();
        families.register(&mut registry);
        Metrics {
            inner: Arc::new(Inner {
                registry,
                families,
                upstreams: RwLock::new(FxHashMap::default()),
                max_upstreams: AtomicUsize::new(DEFAULT_MAX_UPSTREAM_LABELS),
                endpoints: Arc::new(EndpointLimits {
                    templates: RwLock::new(Arc::from(Vec::new())),
                    used: AtomicUsize::new(0),
                    max: AtomicUsize::new(DEFAULT_MAX_ENDPOINT_LABELS),
                }),
            }),
        }
    }

    /// The registry these metrics live in, for encoding together with other
    /// registries (`prometheus_client::encoding::text::encode_registry` for
    /// each, then `encode_eof` once).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Registers the same metric families (live handles, not copies of the
    /// values) into another registry, for an application that exposes one
    /// registry of its own; use `Registry::sub_registry_with_prefix` first for
    /// a prefix. These metrics keep reporting through [`Metrics::render`] too.
    pub fn register(&self, registry: &mut Registry) {
        self.inner.families.register(registry);
    }

    /// Counts one request sent upstream (every attempt and redirect hop) and
    /// observes its latency.
    ///
    /// `endpoint` is the label as the engine writes it (`"GET /users/{id}"`,
    /// see [`endpoint_label`](Self::endpoint_label)); `status` is the status
    /// code it got (`"200"`) or, when it ended without a response, its error
    /// type (`"timeout"`); `duration` runs from sending to the end of the
    /// body. Both labels are bounded like the engine's.
    pub fn record_request(
        &self,
        upstream: &str,
        endpoint: &str,
        method: &str,
        status: &str,
        duration: Duration,
    ) {
        let handles = self
            .upstream(upstream)
            .endpoint_labelled(endpoint.to_owned());
        let f = &self.inner.families;
        f.requests
            .get_or_create(&RequestLabels {
                upstream: label_value(&handles.upstream),
                endpoint: label_value(&handles.endpoint),
                method: label_value(method),
                status: label_value(status),
            })
            .inc();
        handles.duration.observe(duration.as_secs_f64());
    }

    /// The `endpoint` label the engine gives a request of `method` to a URL
    /// with `path`, with the templates registered now.
    pub fn endpoint_label(&self, method: &str, path: &str) -> String {
        let templates = Arc::clone(&read(&self.inner.endpoints.templates));
        endpoint_label(method, path, &templates)
    }

    /// Sets the path templates endpoints are labelled with, replacing any set
    /// before: `/repos/{owner}/{repo}` (one segment per `{name}`), `/files/*`
    /// (any rest). The first that matches a path names its endpoint; paths
    /// matching none are normalised automatically. Endpoints already seen
    /// keep their label.
    pub fn set_endpoint_templates<I, S>(&self, templates: I) -> Result<(), InvalidEndpointTemplate>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let parsed = templates
            .into_iter()
            .map(|t| PathTemplate::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        *write(&self.inner.endpoints.templates) = Arc::from(parsed);
        Ok(())
    }

    /// Sets how many distinct `endpoint` label values are kept over all
    /// upstreams (default [`DEFAULT_MAX_ENDPOINT_LABELS`], at least 1);
    /// endpoints seen after that many are counted under [`OTHER_ENDPOINT`].
    pub fn set_max_endpoint_labels(&self, max: usize) {
        self.inner
            .endpoints
            .max
            .store(max.max(1), Ordering::Relaxed);
    }

    /// Counts one attempt sent to `upstream` (first attempts, retries and
    /// hedges alike).
    pub fn record_attempt(&self, upstream: &str) {
        self.upstream(upstream).record_attempt();
    }

    /// The handles of one upstream's metrics (made the first time). Past the
    /// label limit ([`set_max_upstream_labels`](Self::set_max_upstream_labels)), a new
    /// upstream gets the shared handles of [`OTHER_UPSTREAM`].
    pub fn upstream(&self, upstream: &str) -> Arc<UpstreamMetrics> {
        if let Some(m) = read(&self.inner.upstreams).get(upstream) {
            return Arc::clone(m);
        }
        let mut map = write(&self.inner.upstreams);
        if let Some(m) = map.get(upstream) {
            return Arc::clone(m);
        }
        let max = self.inner.max_upstreams.load(Ordering::Relaxed);
        let label = if map.len() >= max && upstream != OTHER_UPSTREAM {
            OTHER_UPSTREAM
        } else {
            upstream
        };
        if label == OTHER_UPSTREAM {
            if let Some(m) = map.get(OTHER_UPSTREAM) {
                return Arc::clone(m);
            }
        }
        let m = Arc::new(UpstreamMetrics::new(
            label,
            &self.inner.families,
            &self.inner.endpoints,
        ));
        map.insert(label.to_owned(), Arc::clone(&m));
        m
    }

    /// Sets how many distinct `upstream` label values are kept (default
    /// [`DEFAULT_MAX_UPSTREAM_LABELS`], at least 1); upstreams seen after that
    /// many are counted under [`OTHER_UPSTREAM`]. Values already in use keep
    /// their label.
    pub fn set_max_upstream_labels(&self, max: usize) {
        self.inner
            .max_upstreams
            .store(max.max(1), Ordering::Relaxed);
    }

    /// Counts one retry to `upstream`.
    pub fn record_retry(&self, upstream: &str) {
        self.upstream(upstream).record_retry();
    }

    /// Counts one hedged attempt to `upstream`.
    pub fn record_hedge(&self, upstream: &str) {
        self.upstream(upstream).record_hedge();
    }

    /// Counts one panic caught in engine code, a handler or an observer.
    pub fn record_panic(&self) {
        self.inner.families.panics.inc();
    }

    /// Sets the breaker state of `upstream`: [`BREAKER_CLOSED`],
    /// [`BREAKER_OPEN`] or [`BREAKER_HALF_OPEN`].
    pub fn set_breaker_state(&self, upstream: &str, state: BreakerStateCode) {
        self.upstream(upstream).set_breaker_state(i64::from(state));
    }

    /// Counts one wait for a rate or concurrency limit of `upstream` and
    /// observes how long it lasted. Call it only when the task did wait.
    pub fn record_rate_limit_wait(&self, upstream: &str, waited: Duration) {
        self.upstream(upstream).record_rate_limit_wait(waited);
    }

    /// One more request in flight.
    pub fn in_flight_inc(&self) {
        self.inner.families.in_flight.inc();
    }

    /// One request fewer in flight.
    pub fn in_flight_dec(&self) {
        self.inner.families.in_flight.dec();
    }

    /// Counts a request in flight until the guard is dropped, so a cancelled
    /// future cannot leave the gauge high.
    #[must_use = "the request stops counting as in flight when the guard is dropped"]
    pub fn track_in_flight(&self) -> InFlightGuard {
        let gauge = self.inner.families.in_flight.clone();
        gauge.inc();
        InFlightGuard { gauge }
    }

    /// Sets the number of tasks waiting in the processor's queue.
    pub fn set_queue_depth(&self, depth: usize) {
        let depth = i64::try_from(depth).unwrap_or(i64::MAX);
        self.inner.families.queue_depth.set(depth);
    }

    /// Every metric in the OpenMetrics text format (ends with `# EOF`), for a
    /// `/metrics` endpoint served with [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail and the label sets always encode,
        // so an error here could only leave the output partial: keep it.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }
}

/// Keeps one request counted in the `in_flight` gauge; see
/// [`Metrics::track_in_flight`].
#[derive(Debug)]
pub struct InFlightGuard {
    gauge: Gauge,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Sample lines (`name{labels} value`) of a rendering, by series.
    fn samples(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line has a value");
                (series.to_owned(), value.to_owned())
            })
            .collect()
    }

    #[test]
    fn records_and_renders_exact_lines() {
        let m = Metrics::new();
        let up = "api.example.com:443";
        m.record_attempt(up);
        m.record_attempt(up);
        m.record_attempt(up);
        m.record_retry(up);
        m.record_hedge(up);
        m.record_request(up, "/items", "GET", "200", Duration::from_millis(42));
        m.record_request(up, "/items", "GET", "200", Duration::from_millis(3));
        m.record_request(up, "/items", "POST", "timeout", Duration::from_secs(61));
        m.set_breaker_state(up, BREAKER_HALF_OPEN);
        m.record_rate_limit_wait(up, Duration::from_millis(300));
        m.in_flight_inc();
        m.in_flight_inc();
        m.in_flight_dec();
        m.set_queue_depth(7);

        let text = m.render();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE requests counter\n"), "{text}");
        assert!(
            text.contains("# TYPE request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE breaker_state gauge\n"), "{text}");
        let s = samples(&text);
        let get = |k: &str| s.get(k).map(String::as_str);
        let u = r#"upstream="api.example.com:443",endpoint="/items""#;
        let up_only = r#"upstream="api.example.com:443""#;

        assert_eq!(
            get(&format!(
                r#"requests_total{{{u},method="GET",status="200"}}"#
            )),
            Some("2")
        );
        assert_eq!(
            get(&format!(
                r#"requests_total{{{u},method="POST",status="timeout"}}"#
            )),
            Some("1")
        );
        assert_eq!(get(&format!("attempts_total{{{up_only}}}")), Some("3"));
        assert_eq!(get(&format!("retries_total{{{up_only}}}")), Some("1"));
        assert_eq!(get(&format!("hedges_total{{{up_only}}}")), Some("1"));
        assert_eq!(get(&format!("breaker_state{{{up_only}}}")), Some("2"));
        assert_eq!(
            get(&format!("rate_limit_waits_total{{{up_only}}}")),
            Some("1")
        );
        assert_eq!(get("in_flight"), Some("1"));
        assert_eq!(get("queue_depth"), Some("7"));

        // Latency: 3 ms, 42 ms and 61 s; buckets are cumulative.
        let bucket = |le: &str| {
            get(&format!(
                r#"request_duration_seconds_bucket{{le="{le}",{u}}}"#
            ))
        };
        assert_eq!(bucket("0.005"), Some("1"));
        assert_eq!(bucket("0.025"), Some("1"));
        assert_eq!(bucket("0.05"), Some("2"));
        assert_eq!(bucket("60.0"), Some("2"));
        assert_eq!(bucket("+Inf"), Some("3"));
        assert_eq!(
            get(&format!("request_duration_seconds_count{{{u}}}")),
            Some("3")
        );
        let sum: f64 = get(&format!("request_duration_seconds_sum{{{u}}}"))
            .expect("sum")
            .parse()
            .expect("a number");
        assert!((sum - 61.045).abs() < 1e-9, "{sum}");

        let wait = |le: &str| {
            get(&format!(
                r#"rate_limit_wait_seconds_bucket{{le="{le}",{up_only}}}"#
            ))
        };
        assert_eq!(wait("0.25"), Some("0"));
        assert_eq!(wait("0.5"), Some("1"));
        assert_eq!(
            get(&format!("rate_limit_wait_seconds_count{{{up_only}}}")),
            Some("1")
        );
    }

    #[test]
    fn untouched_families_render_without_samples() {
        let text = Metrics::new().render();
        let s = samples(&text);
        assert_eq!(s.len(), 3, "only the label-less families: {text}");
        assert_eq!(s.get("panics_total").map(String::as_str), Some("0"));
        assert_eq!(s.get("in_flight").map(String::as_str), Some("0"));
        assert_eq!(s.get("queue_depth").map(String::as_str), Some("0"));
    }

    #[test]
    fn instances_do_not_share_values() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.record_attempt("x");
        a.record_attempt("x");
        b.record_attempt("x");
        assert_eq!(
            samples(&a.render()).get(r#"attempts_total{upstream="x"}"#),
            Some(&"2".to_owned())
        );
        assert_eq!(
            samples(&b.render()).get(r#"attempts_total{upstream="x"}"#),
            Some(&"1".to_owned())
        );
        // Clones share.
        let a2 = a.clone();
        a2.record_attempt("x");
        assert_eq!(
            samples(&a.render()).get(r#"attempts_total{upstream="x"}"#),
            Some(&"3".to_owned())
        );
    }

    #[test]
    fn prefix_and_embedding() {
        let m = Metrics::with_prefix("patient");
        m.record_retry("x");
        assert!(m
            .render()
            .contains("\npatient_retries_total{upstream=\"x\"} 1\n"));

        let mut app = Registry::default();
        let m = Metrics::new();
        m.register(app.sub_registry_with_prefix("outbound"));
        m.record_hedge("y");
        let mut text = String::new();
        encode(&mut text, &app).expect("encodes");
        assert!(
            text.contains("\noutbound_hedges_total{upstream=\"y\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn in_flight_guard_decrements_on_drop() {
        let m = Metrics::new();
        let g1 = m.track_in_flight();
        let g2 = m.track_in_flight();
        assert_eq!(samples(&m.render()).get("in_flight"), Some(&"2".into()));
        drop(g1);
        drop(g2);
        assert_eq!(samples(&m.render()).get("in_flight"), Some(&"0".into()));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.record_request("a\"b\\c\nd", "GET /", "GET", "200", Duration::ZERO);
        let text = m.render();
        assert!(
            text.contains(r#"requests_total{upstream="a\"b\\c\nd",endpoint="GET /",method="GET",status="200"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn upstream_labels_are_capped_with_an_other_bucket() {
        let m = Metrics::new();
        m.set_max_upstream_labels(3);
        for i in 0..1000 {
            m.record_attempt(&format!("http://host-{i}"));
        }
        let s = samples(&m.render());
        let series = s.keys().filter(|k| k.starts_with("attempts_total")).count();
        assert_eq!(series, 4, "{s:?}");
        assert_eq!(
            s.get(r#"attempts_total{upstream="other"}"#),
            Some(&"997".into())
        );
        assert_eq!(
            s.get(r#"attempts_total{upstream="http://host-0"}"#),
            Some(&"1".into())
        );
        // A label already in use keeps its own series.
        m.record_attempt("http://host-1");
        let s = samples(&m.render());
        assert_eq!(
            s.get(r#"attempts_total{upstream="http://host-1"}"#),
            Some(&"2".into())
        );
    }

    #[test]
    fn endpoints_are_templated_and_capped_with_an_other_bucket() {
        let m = Metrics::new();
        m.set_endpoint_templates(["/repos/{owner}/{repo}"])
            .expect("a valid template");
        let up = m.upstream("api");
        for i in 0..50 {
            up.endpoint("GET", &format!("/users/{i}"))
                .record_response("GET", 200, Duration::ZERO);
            up.endpoint("GET", &format!("/repos/o{i}/r{i}"))
                .record_response("GET", 200, Duration::ZERO);
        }
        let s = samples(&m.render());
        let count = |endpoint: &str| {
            s.get(&format!(
                r#"requests_total{{upstream="api",endpoint="{endpoint}",method="GET",status="200"}}"#
            ))
            .cloned()
        };
        assert_eq!(count("GET /users/{id}"), Some("50".into()));
        assert_eq!(count("GET /repos/{owner}/{repo}"), Some("50".into()));

        m.set_max_endpoint_labels(3);
        for i in 0..100 {
            up.endpoint("GET", &format!("/page-{i}")).record_error(
                "GET",
                "timeout",
                Duration::ZERO,
            );
        }
        let s = samples(&m.render());
        let series = s.keys().filter(|k| k.starts_with("requests_total")).count();
        assert_eq!(series, 4, "{s:?}");
        assert_eq!(
            s.get(
                r#"requests_total{upstream="api",endpoint="other",method="GET",status="timeout"}"#
            ),
            Some(&"99".into())
        );
        assert_eq!(
            s.get(r#"requests_total{upstream="api",endpoint="GET /page-0",method="GET",status="timeout"}"#),
            Some(&"1".into())
        );
    }

    #[test]
    fn breaker_state_follows_the_last_value() {
        let m = Metrics::new();
        m.set_breaker_state("x", BREAKER_OPEN);
        m.set_breaker_state("x", BREAKER_CLOSED);
        m.set_breaker_state("y", BREAKER_OPEN);
        let s = samples(&m.render());
        assert_eq!(s.get(r#"breaker_state{upstream="x"}"#), Some(&"0".into()));
        assert_eq!(s.get(r#"breaker_state{upstream="y"}"#), Some(&"1".into()));
    }
}
