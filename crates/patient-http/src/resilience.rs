//! Resilience settings at three levels: the processor's defaults, one
//! [`UpstreamPolicy`] per upstream, and the options a request carries
//! ([`RequestOptions`](patient_wire::RequestOptions)).
//!
//! An upstream is named by its key: the request's `upstream_key` option when
//! it has one, otherwise the origin of its URL (`scheme://host`, with `:port`
//! when not the scheme's default; see [`upstream_key`]).

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use patient_wire::{DeadlineMode, Response, Strategy, TaskError};
use url::Url;

use crate::{
    breaker::BreakerPolicy,
    limit::LimitConfig,
    retry::{RetryBudget, RetryPolicy},
    Task,
};

/// How long to wait before each hedged attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum HedgeDelay {
    /// Attempt i + 1 starts `delays[i]` after attempt i unless a result came.
    Fixed(Vec<Duration>),
    /// The delay follows the observed latency of the upstream: the given
    /// percentile of its recent successful attempts, clamped to `[min, max]`;
    /// `max_hedges` extra attempts at most. Until 20 samples are seen, `max`.
    Adaptive {
        /// The percentile, in (0, 100).
        percentile: f64,
        /// The shortest delay.
        min: Duration,
        /// The longest delay (used until enough samples are seen).
        max: Duration,
        /// Extra attempts at most.
        max_hedges: u32,
    },
}

impl Default for HedgeDelay {
    /// One hedge after 100 ms.
    fn default() -> Self {
        HedgeDelay::Fixed(vec![Duration::from_millis(100)])
    }
}

/// A hook that gives a fallback response for a failed task.
pub type FallbackHook = Arc<dyn Fn(&Task, &TaskError) -> Option<Response> + Send + Sync>;

/// What to answer when the breaker is open or every attempt failed.
///
/// A fallback response carries the header `x-patient-fallback: true`, so the
/// outcome says it is one.
#[derive(Clone)]
pub enum Fallback {
    /// A fixed response.
    Response {
        /// Its status.
        status: u16,
        /// Its headers.
        headers: Vec<(String, String)>,
        /// Its body.
        body: Bytes,
    },
    /// A hook; `None` keeps the error.
    Hook(FallbackHook),
}

impl fmt::Debug for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Response { status, .. } => f
                .debug_struct("Fallback::Response")
                .field("status", status)
                .finish(),
            Fallback::Hook(_) => f.write_str("Fallback::Hook(<fn>)"),
        }
    }
}

/// The resilience settings of one upstream (or the defaults of all).
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// The retry policy. Default `None`: [`RetryPolicy::default`], which
    /// retries idempotent methods and leaves POST and PATCH to one attempt
    /// unless they carry an idempotency key or opt in.
    pub retry: Option<RetryPolicy>,
    /// How attempts are made. Default `None`: sequential, as far as the retry
    /// policy allows.
    pub strategy: Option<Strategy>,
    /// Delays of hedged attempts (default one hedge after 100 ms).
    pub hedge: HedgeDelay,
    /// The circuit breaker. Default `None`: no breaker.
    pub breaker: Option<BreakerPolicy>,
    /// Statuses counted as failures by the breaker (default 429 and 500–599).
    pub breaker_failure_statuses: Vec<u16>,
    /// Rate (token bucket with burst) and concurrency limits of the upstream;
    /// a request over a limit waits its turn. Default: unlimited. A 429 with
    /// `Retry-After` (or rate-limit reset headers) cools the whole upstream
    /// down whatever the limits.
    pub limits: LimitConfig,
    /// A deadline for tasks that do not set one, covering queue wait and every
    /// attempt. Default `None`.
    pub deadline: Option<Duration>,
    /// How a deadline is shared between attempts (default `Split`).
    pub deadline_mode: DeadlineMode,
    /// Nothing is sent when less than this remains of the deadline: a timeout
    /// error instead (default 10 ms).
    pub min_attempt_time: Duration,
    /// Whether the remaining deadline and the priority are sent upstream as
    /// `X-Request-Timeout` and `X-Request-Priority` (default true; only sent
    /// when the task has a deadline or a priority).
    pub propagate: bool,
    /// The fallback (default none).
    pub fallback: Option<Fallback>,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        UpstreamPolicy {
            retry: None,
            strategy: None,
            hedge: HedgeDelay::default(),
            breaker: None,
            breaker_failure_statuses: std::iter::once(429).chain(500..=599).collect(),
            limits: LimitConfig::unlimited(),
            deadline: None,
            deadline_mode: DeadlineMode::Split,
            min_attempt_time: Duration::from_millis(10),
            propagate: true,
            fallback: None,
        }
    }
}

/// The resilience settings of a processor: defaults, per-upstream policies and
/// the retry budget shared by every upstream.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    /// The policy of upstreams without their own.
    pub defaults: UpstreamPolicy,
    /// Policies by upstream key (the URL's origin, see [`upstream_key`], or a
    /// request's `upstream_key`). Each replaces the defaults whole for its upstream.
    pub upstreams: HashMap<String, UpstreamPolicy>,
    /// A budget that bounds retries and hedges to a ratio of first attempts.
    /// Default `None`: unbounded (each task still stops at its max attempts).
    pub retry_budget: Option<Arc<RetryBudget>>,
    /// How many upstreams' live state (breaker, limits, latencies) is kept
    /// (default 1024). Keys come from input, so past this many the states no
    /// task is using are evicted, least recently used first; an evicted
    /// upstream starts afresh on its next request.
    pub max_upstreams: usize,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            defaults: UpstreamPolicy::default(),
            upstreams: HashMap::new(),
            retry_budget: None,
            max_upstreams: 1024,
        }
    }
}

impl ResilienceConfig {
    /// The policy of an upstream key.
    pub fn policy_for(&self, key: &str) -> &UpstreamPolicy {
        self.upstreams.get(key).unwrap_or(&self.defaults)
    }

    /// Sets the policy of one upstream, starting from a copy of the defaults.
    #[must_use]
    pub fn upstream(
        mut self,
        key: impl Into<String>,
        edit: impl FnOnce(&mut UpstreamPolicy),
    ) -> ResilienceConfig {
        let mut policy = self.defaults.clone();
        edit(&mut policy);
        self.upstreams.insert(key.into(), policy);
        self
    }
}

/// The key of a URL's upstream: its origin, `scheme://host` with `:port`
/// when the port is not the scheme's default (`https://api.openai.com`,
/// `http://127.0.0.1:8080`). Credentials in the URL are never part of it.
pub fn upstream_key(url: &Url) -> String {
    upstream_key_ref(url).into_owned()
}

/// [`upstream_key`] without an allocation in the common case.
pub(crate) fn upstream_key_ref(url: &Url) -> std::borrow::Cow<'_, str> {
    if url.username().is_empty() && url.password().is_none() {
        std::borrow::Cow::Borrowed(&url[..url::Position::BeforePath])
    } else {
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        std::borrow::Cow::Owned(format!(
            "{}://{}{port}",
            url.scheme(),
            url.host_str().unwrap_or_default()
        ))
    }
}
