//! Resilience settings at three levels: the processor's defaults, one
//! [`UpstreamPolicy`] per upstream, and the options a request carries
//! ([`RequestOptions`](patient_wire::RequestOptions)).
//!
//! An upstream is named by its key: the request's `upstream_key` option when
//! it has one, otherwise the origin of its URL (`scheme://host`, with `:port`
//! when not the scheme's default; see [`upstream_key`]).
//!
//! Both levels of settings are built and checked by builders
//! ([`ResilienceConfig::builder`], [`UpstreamPolicy::builder`]); every
//! setting's default is stated on its setter, and a built value is always
//! valid.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_http::{breaker::BreakerPolicy, HedgeDelay, ResilienceConfig, Strategy};
//!
//! let breaker = BreakerPolicy::builder().consecutive_failures(Some(3)).build()?;
//! let resilience = ResilienceConfig::builder()
//!     .defaults(|p| p.deadline(Some(Duration::from_secs(30))))
//!     .upstream("https://api.example.com", |p| {
//!         p.strategy(Some(Strategy::Hedged))
//!             .hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(200)]))
//!             .breaker(Some(breaker))
//!     })
//!     .build()?;
//! let policy = resilience.policy_for("https://api.example.com");
//! assert_eq!(policy.deadline(), Some(Duration::from_secs(30)));
//! assert_eq!(policy.strategy(), Some(Strategy::Hedged));
//!
//! // A percentile must be in (0, 100): the error names the setting.
//! let error = ResilienceConfig::builder()
//!     .upstream("https://api.example.com", |p| {
//!         p.hedge_delays(HedgeDelay::Adaptive {
//!             percentile: 150.0,
//!             min: Duration::from_millis(10),
//!             max: Duration::from_millis(500),
//!             max_hedges: 1,
//!         })
//!     })
//!     .build()
//!     .unwrap_err();
//! assert_eq!(error.field(), "hedge_delays.percentile");
//! assert_eq!(error.upstream(), Some("https://api.example.com"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use patient_wire::{DeadlineMode, Response, Strategy, TaskError, WireLimits};
use url::Url;

use crate::{
    breaker::BreakerPolicy,
    limit::LimitConfig,
    retry::{RetryBudget, RetryPolicy},
    Task,
};

/// The longest accepted [`UpstreamPolicyBuilder::min_attempt_time`].
pub const MAX_MIN_ATTEMPT_TIME: Duration = Duration::from_secs(60);

/// A rejected resilience setting: [`field`](Self::field) names it and
/// [`upstream`](Self::upstream) says whose policy holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidResilience {
    field: &'static str,
    reason: String,
    upstream: Option<String>,
}

impl InvalidResilience {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidResilience {
            field,
            reason: reason.into(),
            upstream: None,
        }
    }

    fn of_upstream(mut self, key: &str) -> Self {
        self.upstream = Some(key.to_owned());
        self
    }

    /// The name of the invalid setting, as in [`UpstreamPolicyBuilder`] and
    /// [`ResilienceConfigBuilder`] (`"min_attempt_time"`, `"max_upstreams"`,
    /// …). Inside a hedge delay or a fallback it names the part:
    /// `"hedge_delays"` for a [`HedgeDelay::Fixed`] list;
    /// `"hedge_delays.percentile"`, `"hedge_delays.min"`,
    /// `"hedge_delays.max"` or `"hedge_delays.max_hedges"` for a
    /// [`HedgeDelay::Adaptive`] one; `"fallback.status"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with its value.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The key of the upstream whose policy holds the setting; `None` for
    /// the defaults and for the settings of the whole configuration.
    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref()
    }
}

impl fmt::Display for InvalidResilience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid resilience setting `{}`", self.field)?;
        if let Some(key) = &self.upstream {
            write!(f, " of upstream `{key}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for InvalidResilience {}

/// How long to wait before each hedged attempt.
///
/// Checked by [`UpstreamPolicyBuilder::build`], within the bounds stated on
/// [`UpstreamPolicyBuilder::hedge_delays`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HedgeDelay {
    /// Attempt i + 1 starts `delays[i]` after attempt i unless a result came.
    Fixed(Vec<Duration>),
    /// The delay follows the observed latency of the upstream: the given
    /// percentile of its recent successful attempts, clamped to `[min, max]`;
    /// `max_hedges` extra attempts at most. Until 20 samples are seen, `max`.
    Adaptive {
        /// The percentile, in (0, 100).
        percentile: f64,
        /// The shortest delay; at most `max`.
        min: Duration,
        /// The longest delay (used until enough samples are seen).
        max: Duration,
        /// Extra attempts at most.
        max_hedges: u32,
    },
}

impl Default for HedgeDelay {
    /// The default of [`UpstreamPolicyBuilder::hedge_delays`].
    fn default() -> Self {
        HedgeDelay::Fixed(vec![Duration::from_millis(100)])
    }
}

impl HedgeDelay {
    fn validate(&self, wire: &WireLimits) -> Result<(), InvalidResilience> {
        let check_delay = |field: &'static str, what: &str, delay: Duration| {
            if delay > wire.max_delay {
                return Err(InvalidResilience::new(
                    field,
                    format!("{what} must be at most {:?}, got {delay:?}", wire.max_delay),
                ));
            }
            Ok(())
        };
        match self {
            HedgeDelay::Fixed(delays) => {
                if delays.is_empty() || delays.len() > wire.max_hedge_delays {
                    return Err(InvalidResilience::new(
                        "hedge_delays",
                        format!(
                            "a fixed hedge delay needs 1 to {} delays, got {}",
                            wire.max_hedge_delays,
                            delays.len()
                        ),
                    ));
                }
                for (i, delay) in delays.iter().enumerate() {
                    check_delay("hedge_delays", &format!("delay {i}"), *delay)?;
                }
            }
            HedgeDelay::Adaptive {
                percentile,
                min,
                max,
                max_hedges,
            } => {
                if !(*percentile > 0.0 && *percentile < 100.0) {
                    return Err(InvalidResilience::new(
                        "hedge_delays.percentile",
                        format!("must be in (0, 100), got {percentile}"),
                    ));
                }
                check_delay("hedge_delays.max", "the longest delay", *max)?;
                if min > max {
                    return Err(InvalidResilience::new(
                        "hedge_delays.min",
                        format!("must be at most max ({max:?}), got {min:?}"),
                    ));
                }
                let most = u32::try_from(wire.max_hedge_delays).unwrap_or(u32::MAX);
                if *max_hedges == 0 || *max_hedges > most {
                    return Err(InvalidResilience::new(
                        "hedge_delays.max_hedges",
                        format!("must be 1 to {most}, got {max_hedges}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A hook that gives a fallback response for a failed task.
pub type FallbackHook = Arc<dyn Fn(&Task, &TaskError) -> Option<Response> + Send + Sync>;

/// What to answer when the breaker is open or every attempt failed.
///
/// A fallback response carries the header `x-patient-fallback: true`, so the
/// outcome says it is one.
#[derive(Clone)]
#[non_exhaustive]
pub enum Fallback {
    /// A fixed response.
    Response {
        /// Its status, 100 to 599.
        status: u16,
        /// Its headers.
        headers: Vec<(String, String)>,
        /// Its body.
        body: Bytes,
    },
    /// A hook; `None` keeps the error.
    Hook(FallbackHook),
}

impl Fallback {
    /// A fallback from a hook; the hook's `None` keeps the error.
    pub fn hook(
        hook: impl Fn(&Task, &TaskError) -> Option<Response> + Send + Sync + 'static,
    ) -> Self {
        Fallback::Hook(Arc::new(hook))
    }

    fn validate(&self) -> Result<(), InvalidResilience> {
        match self {
            Fallback::Response { status, .. } => check_status("fallback.status", *status),
            Fallback::Hook(_) => Ok(()),
        }
    }
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

fn check_status(field: &'static str, status: u16) -> Result<(), InvalidResilience> {
    if !(100..=599).contains(&status) {
        return Err(InvalidResilience::new(
            field,
            format!("a status must be 100 to 599, got {status}"),
        ));
    }
    Ok(())
}

/// The resilience settings of one upstream (or the defaults of all).
///
/// Build one with [`UpstreamPolicy::builder`] (or, inside a
/// [`ResilienceConfig`], with [`ResilienceConfigBuilder::defaults`] and
/// [`ResilienceConfigBuilder::upstream`]); every setting's default is stated
/// on its [`UpstreamPolicyBuilder`] setter. An `UpstreamPolicy` is always
/// valid.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    retry: Option<RetryPolicy>,
    strategy: Option<Strategy>,
    hedge_delays: HedgeDelay,
    breaker: Option<BreakerPolicy>,
    breaker_failure_statuses: Vec<u16>,
    limits: LimitConfig,
    deadline: Option<Duration>,
    deadline_mode: DeadlineMode,
    min_attempt_time: Duration,
    propagate: bool,
    fallback: Option<Fallback>,
}

impl Default for UpstreamPolicy {
    /// The defaults stated on each [`UpstreamPolicyBuilder`] setter.
    fn default() -> Self {
        UpstreamPolicy {
            retry: None,
            strategy: None,
            hedge_delays: HedgeDelay::default(),
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

impl UpstreamPolicy {
    /// Starts from the defaults ([`UpstreamPolicy::default`]).
    pub fn builder() -> UpstreamPolicyBuilder {
        UpstreamPolicyBuilder {
            policy: UpstreamPolicy::default(),
        }
    }

    /// A builder holding this policy's settings.
    pub fn to_builder(&self) -> UpstreamPolicyBuilder {
        UpstreamPolicyBuilder {
            policy: self.clone(),
        }
    }

    /// The retry policy, if one is set; see [`UpstreamPolicyBuilder::retry`].
    pub fn retry(&self) -> Option<&RetryPolicy> {
        self.retry.as_ref()
    }

    /// How attempts are made, if set; see [`UpstreamPolicyBuilder::strategy`].
    pub fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    /// The delays of hedged attempts; see [`UpstreamPolicyBuilder::hedge_delays`].
    pub fn hedge_delays(&self) -> &HedgeDelay {
        &self.hedge_delays
    }

    /// The circuit breaker, if any; see [`UpstreamPolicyBuilder::breaker`].
    pub fn breaker(&self) -> Option<&BreakerPolicy> {
        self.breaker.as_ref()
    }

    /// The statuses the breaker counts as failures, in ascending order; see
    /// [`UpstreamPolicyBuilder::breaker_failure_statuses`].
    pub fn breaker_failure_statuses(&self) -> &[u16] {
        &self.breaker_failure_statuses
    }

    /// The rate and concurrency limits; see [`UpstreamPolicyBuilder::limits`].
    pub fn limits(&self) -> &LimitConfig {
        &self.limits
    }

    /// The deadline of tasks that do not set one, if any; see
    /// [`UpstreamPolicyBuilder::deadline`].
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// How a deadline is shared between attempts; see
    /// [`UpstreamPolicyBuilder::deadline_mode`].
    pub fn deadline_mode(&self) -> DeadlineMode {
        self.deadline_mode
    }

    /// The least time left of a deadline for which an attempt is sent; see
    /// [`UpstreamPolicyBuilder::min_attempt_time`].
    pub fn min_attempt_time(&self) -> Duration {
        self.min_attempt_time
    }

    /// Whether the deadline and the priority are sent upstream; see
    /// [`UpstreamPolicyBuilder::propagate`].
    pub fn propagate(&self) -> bool {
        self.propagate
    }

    /// The fallback, if any; see [`UpstreamPolicyBuilder::fallback`].
    pub fn fallback(&self) -> Option<&Fallback> {
        self.fallback.as_ref()
    }
}

/// Builds an [`UpstreamPolicy`]; [`build`](Self::build) checks every field.
#[derive(Debug, Clone)]
#[must_use]
pub struct UpstreamPolicyBuilder {
    policy: UpstreamPolicy,
}

impl UpstreamPolicyBuilder {
    /// The retry policy. Default `None`: one attempt ([`RetryPolicy::none`]),
    /// as the PatientHttp gem does, so a request's `timeout` is also the
    /// longest wait for its outcome. Retries are one setting away: set a
    /// policy here (on the defaults or on one upstream), for example
    /// [`RetryPolicy::default`] (up to 3 attempts on timeouts, connection
    /// errors and 408/429/5xx), or give a request its own `options.retry`
    /// (applied over this policy, so it needs `max_attempts` to retry when
    /// none is set here). Any policy retries idempotent methods and leaves
    /// POST and PATCH to one attempt unless they carry an idempotency key
    /// (`options.idempotency_key` or an `Idempotency-Key` /
    /// `X-Idempotency-Key` header) or opt in with `retry_unsafe`. The
    /// connection-level retry of a stale pooled connection
    /// ([`ClientConfigBuilder::retries`](crate::client::ClientConfigBuilder::retries)) is separate
    /// and stays on.
    pub fn retry(mut self, retry: Option<RetryPolicy>) -> Self {
        self.policy.retry = retry;
        self
    }

    /// How attempts are made when a request does not say. Default `None`:
    /// sequential, as far as the retry policy allows.
    pub fn strategy(mut self, strategy: Option<Strategy>) -> Self {
        self.policy.strategy = strategy;
        self
    }

    /// The delays of hedged attempts, for requests without their own (the
    /// request option of the same name). A fixed list holds 1 to 10 delays of at most 1 day
    /// each; an adaptive delay needs a percentile in (0, 100),
    /// `min <= max <= 1 day` and `max_hedges` of 1 to 10 — the bounds of a
    /// request's own `hedge_delays` ([`WireLimits::max_hedge_delays`] and
    /// [`WireLimits::max_delay`] of [`WireLimits::default`]). Default: one
    /// hedge after 100 ms (`HedgeDelay::Fixed(vec![100 ms])`).
    pub fn hedge_delays(mut self, delays: HedgeDelay) -> Self {
        self.policy.hedge_delays = delays;
        self
    }

    /// The circuit breaker. Default `None`: no breaker.
    pub fn breaker(mut self, breaker: Option<BreakerPolicy>) -> Self {
        self.policy.breaker = breaker;
        self
    }

    /// The response statuses the breaker counts as failures; a response
    /// with one of them at the end of the attempts is also answered by the
    /// fallback. Each must be 100 to 599; an empty list counts only errors
    /// (timeouts, connection and TLS failures). Default: 429 and 500 to 599.
    pub fn breaker_failure_statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.policy.breaker_failure_statuses = statuses.into_iter().collect();
        self
    }

    /// Rate (token bucket with burst) and concurrency limits of the upstream;
    /// a request over a limit waits its turn. A 429 with `Retry-After` (or
    /// rate-limit reset headers) cools the whole upstream down whatever the
    /// limits. Default: [`LimitConfig::unlimited`].
    pub fn limits(mut self, limits: LimitConfig) -> Self {
        self.policy.limits = limits;
        self
    }

    /// A deadline for tasks that do not set one, covering queue wait and
    /// every attempt. At least `min_attempt_time` (a shorter one could never
    /// send anything) and at most [`WireLimits::max_deadline`] (30 days), the
    /// bound of a request's own deadline. Default `None`: no deadline.
    pub fn deadline(mut self, deadline: Option<Duration>) -> Self {
        self.policy.deadline = deadline;
        self
    }

    /// How a deadline is shared between attempts when a request does not
    /// say. Default [`DeadlineMode::Split`].
    pub fn deadline_mode(mut self, mode: DeadlineMode) -> Self {
        self.policy.deadline_mode = mode;
        self
    }

    /// Nothing is sent when less than this remains of the deadline: a
    /// timeout error instead. It is also the shortest timeout an attempt
    /// under a deadline gets. More than zero and at most
    /// [`MAX_MIN_ATTEMPT_TIME`] (1 minute). Default 10 ms.
    pub fn min_attempt_time(mut self, time: Duration) -> Self {
        self.policy.min_attempt_time = time;
        self
    }

    /// Whether the remaining deadline and the priority are sent upstream as
    /// `X-Request-Timeout` and `X-Request-Priority` (only when the task has a
    /// deadline or a priority). Default true.
    pub fn propagate(mut self, propagate: bool) -> Self {
        self.policy.propagate = propagate;
        self
    }

    /// What to answer when the breaker is open or every attempt failed; a
    /// fixed response's status must be 100 to 599. Default `None`: the
    /// error stands.
    pub fn fallback(mut self, fallback: Option<Fallback>) -> Self {
        self.policy.fallback = fallback;
        self
    }

    /// Checks every setting and returns the policy, or names the first
    /// invalid field.
    pub fn build(self) -> Result<UpstreamPolicy, InvalidResilience> {
        let mut p = self.policy;
        let wire = WireLimits::default();
        p.hedge_delays.validate(&wire)?;
        for status in &p.breaker_failure_statuses {
            check_status("breaker_failure_statuses", *status)?;
        }
        p.breaker_failure_statuses.sort_unstable();
        p.breaker_failure_statuses.dedup();
        if p.min_attempt_time.is_zero() || p.min_attempt_time > MAX_MIN_ATTEMPT_TIME {
            return Err(InvalidResilience::new(
                "min_attempt_time",
                format!(
                    "must be more than zero and at most {MAX_MIN_ATTEMPT_TIME:?}, got {:?}",
                    p.min_attempt_time
                ),
            ));
        }
        if let Some(deadline) = p.deadline {
            if deadline > wire.max_deadline {
                return Err(InvalidResilience::new(
                    "deadline",
                    format!("must be at most {:?}, got {deadline:?}", wire.max_deadline),
                ));
            }
            if deadline < p.min_attempt_time {
                return Err(InvalidResilience::new(
                    "deadline",
                    format!(
                        "must be at least min_attempt_time ({:?}), or no attempt is ever sent; got {deadline:?}",
                        p.min_attempt_time
                    ),
                ));
            }
        }
        if let Some(fallback) = &p.fallback {
            fallback.validate()?;
        }
        Ok(p)
    }
}

/// The resilience settings of a processor: defaults, per-upstream policies and
/// the retry budget shared by every upstream.
///
/// Build one with [`ResilienceConfig::builder`]; every setting's default is
/// stated on its setter. A `ResilienceConfig` is always valid.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    defaults: UpstreamPolicy,
    upstreams: HashMap<String, UpstreamPolicy>,
    retry_budget: Option<Arc<RetryBudget>>,
    max_upstreams: usize,
}

impl Default for ResilienceConfig {
    /// The defaults stated on each [`ResilienceConfigBuilder`] setter.
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
    /// Starts from the defaults ([`ResilienceConfig::default`]).
    pub fn builder() -> ResilienceConfigBuilder {
        ResilienceConfig::default().to_builder()
    }

    /// A builder holding this configuration's settings.
    pub fn to_builder(&self) -> ResilienceConfigBuilder {
        ResilienceConfigBuilder {
            defaults: self.defaults.to_builder(),
            upstreams: self
                .upstreams
                .iter()
                .map(|(key, policy)| (key.clone(), policy.to_builder()))
                .collect(),
            retry_budget: self.retry_budget.clone(),
            max_upstreams: self.max_upstreams,
        }
    }

    /// The policy of upstreams without their own; see
    /// [`ResilienceConfigBuilder::defaults`].
    pub fn defaults(&self) -> &UpstreamPolicy {
        &self.defaults
    }

    /// The upstreams with a policy of their own, by key; see
    /// [`ResilienceConfigBuilder::upstream`].
    pub fn upstreams(&self) -> impl ExactSizeIterator<Item = (&str, &UpstreamPolicy)> + '_ {
        self.upstreams
            .iter()
            .map(|(key, policy)| (key.as_str(), policy))
    }

    /// The policy of an upstream key: its own, or the defaults.
    pub fn policy_for(&self, key: &str) -> &UpstreamPolicy {
        self.upstreams.get(key).unwrap_or(&self.defaults)
    }

    /// The retry budget shared by every upstream, if any; see
    /// [`ResilienceConfigBuilder::retry_budget`].
    pub fn retry_budget(&self) -> Option<&Arc<RetryBudget>> {
        self.retry_budget.as_ref()
    }

    /// How many upstreams' live state is kept; see
    /// [`ResilienceConfigBuilder::max_upstreams`].
    pub fn max_upstreams(&self) -> usize {
        self.max_upstreams
    }
}

/// Builds a [`ResilienceConfig`]; [`build`](Self::build) checks every field,
/// the defaults and each upstream's policy included.
#[derive(Debug, Clone)]
#[must_use]
pub struct ResilienceConfigBuilder {
    defaults: UpstreamPolicyBuilder,
    /// In the order they were set, so that the first invalid one is reported.
    upstreams: Vec<(String, UpstreamPolicyBuilder)>,
    retry_budget: Option<Arc<RetryBudget>>,
    max_upstreams: usize,
}

impl ResilienceConfigBuilder {
    /// Edits the policy of upstreams without their own. Default
    /// [`UpstreamPolicy::default`] (each setting's default is stated on its
    /// [`UpstreamPolicyBuilder`] setter). Called again, it edits the result
    /// of the earlier calls.
    pub fn defaults(
        mut self,
        edit: impl FnOnce(UpstreamPolicyBuilder) -> UpstreamPolicyBuilder,
    ) -> Self {
        self.defaults = edit(self.defaults);
        self
    }

    /// Sets the policy of one upstream, by its key (the URL's origin, see
    /// [`upstream_key`], or a request's `upstream_key`): `edit` starts from a
    /// copy of the defaults as set so far, so set the defaults first. The
    /// policy replaces the defaults whole for that upstream, and replaces an
    /// earlier policy of the same key. Default: no upstream has its own.
    pub fn upstream(
        mut self,
        key: impl Into<String>,
        edit: impl FnOnce(UpstreamPolicyBuilder) -> UpstreamPolicyBuilder,
    ) -> Self {
        let key = key.into();
        let policy = edit(self.defaults.clone());
        match self.upstreams.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) => *existing = policy,
            None => self.upstreams.push((key, policy)),
        }
        self
    }

    /// A budget, shared by every upstream, that bounds retries and hedges to
    /// a ratio of first attempts. Default `None`: unbounded (each task still
    /// stops at its max attempts).
    pub fn retry_budget(mut self, budget: Option<Arc<RetryBudget>>) -> Self {
        self.retry_budget = budget;
        self
    }

    /// How many upstreams' live state (breaker, limits, latencies) is kept;
    /// at least 1. Keys come from input, so past this many the states no
    /// task is using are evicted, least recently used first; an evicted
    /// upstream starts afresh on its next request. Default 1024.
    pub fn max_upstreams(mut self, n: usize) -> Self {
        self.max_upstreams = n;
        self
    }

    /// Checks every setting and returns the configuration, or names the
    /// first invalid field (and the upstream whose policy holds it).
    pub fn build(self) -> Result<ResilienceConfig, InvalidResilience> {
        if self.max_upstreams == 0 {
            return Err(InvalidResilience::new(
                "max_upstreams",
                "must be at least 1",
            ));
        }
        let defaults = self.defaults.build()?;
        let mut upstreams = HashMap::with_capacity(self.upstreams.len());
        for (key, policy) in self.upstreams {
            let policy = policy.build().map_err(|e| e.of_upstream(&key))?;
            upstreams.insert(key, policy);
        }
        Ok(ResilienceConfig {
            defaults,
            upstreams,
            retry_budget: self.retry_budget,
            max_upstreams: self.max_upstreams,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn adaptive(percentile: f64, min: Duration, max: Duration, max_hedges: u32) -> HedgeDelay {
        HedgeDelay::Adaptive {
            percentile,
            min,
            max,
            max_hedges,
        }
    }

    fn field_of(builder: UpstreamPolicyBuilder) -> &'static str {
        let error = builder.build().unwrap_err();
        assert!(
            error.to_string().contains(error.field()),
            "the message names the field: {error}"
        );
        assert_eq!(error.upstream(), None);
        error.field()
    }

    #[test]
    fn the_defaults_build_and_match_the_documented_values() {
        let p = UpstreamPolicy::builder().build().unwrap();
        assert!(p.retry().is_none());
        assert_eq!(p.strategy(), None);
        assert_eq!(p.hedge_delays(), &HedgeDelay::Fixed(vec![ms(100)]));
        assert_eq!(p.hedge_delays(), &HedgeDelay::default());
        assert!(p.breaker().is_none());
        let statuses: Vec<u16> = std::iter::once(429).chain(500..=599).collect();
        assert_eq!(p.breaker_failure_statuses(), statuses.as_slice());
        assert_eq!(p.limits(), &LimitConfig::unlimited());
        assert_eq!(p.deadline(), None);
        assert_eq!(p.deadline_mode(), DeadlineMode::Split);
        assert_eq!(p.min_attempt_time(), ms(10));
        assert!(p.propagate());
        assert!(p.fallback().is_none());

        let d = UpstreamPolicy::default();
        assert_eq!(d.breaker_failure_statuses(), p.breaker_failure_statuses());
        assert_eq!(d.min_attempt_time(), p.min_attempt_time());
        // The default is valid as it stands.
        assert!(d.to_builder().build().is_ok());

        let c = ResilienceConfig::builder().build().unwrap();
        assert_eq!(c.max_upstreams(), 1024);
        assert_eq!(c.upstreams().len(), 0);
        assert!(c.retry_budget().is_none());
        assert_eq!(c.defaults().min_attempt_time(), ms(10));
        assert!(ResilienceConfig::default().to_builder().build().is_ok());
    }

    #[test]
    fn fixed_hedge_delays_are_bounded_like_a_requests_own() {
        let wire = WireLimits::default();
        let b = UpstreamPolicy::builder;
        assert_eq!(
            field_of(b().hedge_delays(HedgeDelay::Fixed(vec![]))),
            "hedge_delays"
        );
        let too_many = vec![ms(1); wire.max_hedge_delays + 1];
        assert_eq!(
            field_of(b().hedge_delays(HedgeDelay::Fixed(too_many))),
            "hedge_delays"
        );
        let too_long = vec![ms(1), wire.max_delay + ms(1)];
        assert_eq!(
            field_of(b().hedge_delays(HedgeDelay::Fixed(too_long))),
            "hedge_delays"
        );
        assert_eq!(
            field_of(b().hedge_delays(HedgeDelay::Fixed(vec![Duration::MAX]))),
            "hedge_delays"
        );
        // The edges are accepted: 10 delays, zero and exactly one day.
        let edges = vec![Duration::ZERO, DAY]
            .into_iter()
            .chain(std::iter::repeat_n(ms(5), 8))
            .collect::<Vec<_>>();
        assert_eq!(edges.len(), 10);
        let p = b()
            .hedge_delays(HedgeDelay::Fixed(edges.clone()))
            .build()
            .unwrap();
        assert_eq!(p.hedge_delays(), &HedgeDelay::Fixed(edges));
    }

    #[test]
    fn adaptive_hedge_delays_are_checked_field_by_field() {
        let b = |hedge| UpstreamPolicy::builder().hedge_delays(hedge);
        for percentile in [0.0, 100.0, 150.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                field_of(b(adaptive(percentile, ms(10), ms(500), 1))),
                "hedge_delays.percentile",
                "{percentile}"
            );
        }
        assert_eq!(
            field_of(b(adaptive(95.0, ms(501), ms(500), 1))),
            "hedge_delays.min"
        );
        assert_eq!(
            field_of(b(adaptive(95.0, ms(10), DAY + ms(1), 1))),
            "hedge_delays.max"
        );
        assert_eq!(
            field_of(b(adaptive(95.0, Duration::MAX, Duration::MAX, 1))),
            "hedge_delays.max"
        );
        // The engine makes `max_hedges` delays per task: u32::MAX would be
        // an allocation of 64 GiB.
        for max_hedges in [0, 11, u32::MAX] {
            assert_eq!(
                field_of(b(adaptive(95.0, ms(10), ms(500), max_hedges))),
                "hedge_delays.max_hedges",
                "{max_hedges}"
            );
        }
        for ok in [
            adaptive(0.1, ms(10), ms(500), 1),
            adaptive(99.9, ms(10), ms(500), 10),
            adaptive(50.0, ms(20), ms(20), 3),
            adaptive(50.0, Duration::ZERO, DAY, 3),
        ] {
            assert!(b(ok.clone()).build().is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn breaker_failure_statuses_are_http_statuses() {
        let b = |statuses: &[u16]| {
            UpstreamPolicy::builder().breaker_failure_statuses(statuses.iter().copied())
        };
        for bad in [&[0][..], &[99], &[600], &[1000], &[500, 503, 1000]] {
            assert_eq!(field_of(b(bad)), "breaker_failure_statuses", "{bad:?}");
        }
        let p = b(&[599, 100, 503, 503, 429]).build().unwrap();
        assert_eq!(p.breaker_failure_statuses(), &[100, 429, 503, 599]);
        // None at all: only errors count.
        let p = b(&[]).build().unwrap();
        assert!(p.breaker_failure_statuses().is_empty());
    }

    #[test]
    fn min_attempt_time_is_positive_and_at_most_a_minute() {
        let b = |t| UpstreamPolicy::builder().min_attempt_time(t);
        assert_eq!(field_of(b(Duration::ZERO)), "min_attempt_time");
        assert_eq!(
            field_of(b(MAX_MIN_ATTEMPT_TIME + Duration::from_nanos(1))),
            "min_attempt_time"
        );
        assert_eq!(field_of(b(Duration::MAX)), "min_attempt_time");
        assert_eq!(MAX_MIN_ATTEMPT_TIME, Duration::from_secs(60));
        for ok in [Duration::from_nanos(1), ms(50), MAX_MIN_ATTEMPT_TIME] {
            assert_eq!(b(ok).build().unwrap().min_attempt_time(), ok);
        }
    }

    #[test]
    fn the_deadline_is_bounded_by_the_wire_and_min_attempt_time() {
        let max = WireLimits::default().max_deadline;
        let b = |d| UpstreamPolicy::builder().deadline(Some(d));
        assert_eq!(field_of(b(max + Duration::from_secs(1))), "deadline");
        assert_eq!(field_of(b(Duration::MAX)), "deadline");
        // Shorter than min_attempt_time: no attempt could ever be sent.
        assert_eq!(field_of(b(Duration::ZERO)), "deadline");
        assert_eq!(field_of(b(ms(9))), "deadline");
        assert_eq!(field_of(b(ms(40)).min_attempt_time(ms(50))), "deadline");
        for ok in [ms(10), Duration::from_secs(30), max] {
            assert_eq!(b(ok).build().unwrap().deadline(), Some(ok));
        }
        let none = UpstreamPolicy::builder().deadline(None).build().unwrap();
        assert_eq!(none.deadline(), None);
    }

    #[test]
    fn a_fixed_fallback_has_an_http_status() {
        let response = |status| Fallback::Response {
            status,
            headers: vec![],
            body: Bytes::from_static(b"busy"),
        };
        let b = |f| UpstreamPolicy::builder().fallback(Some(f));
        for bad in [0, 99, 600, u16::MAX] {
            assert_eq!(field_of(b(response(bad))), "fallback.status", "{bad}");
        }
        assert!(b(response(503)).build().is_ok());
        let hooked = b(Fallback::hook(|_, _| None)).build().unwrap();
        assert!(matches!(hooked.fallback(), Some(Fallback::Hook(_))));
    }

    #[test]
    fn max_upstreams_is_at_least_one() {
        let error = ResilienceConfig::builder()
            .max_upstreams(0)
            .build()
            .unwrap_err();
        assert_eq!(error.field(), "max_upstreams");
        assert_eq!(error.upstream(), None);
        assert!(error.to_string().contains("max_upstreams"), "{error}");
        let c = ResilienceConfig::builder()
            .max_upstreams(1)
            .build()
            .unwrap();
        assert_eq!(c.max_upstreams(), 1);
    }

    #[test]
    fn every_policy_of_a_config_is_checked_and_the_error_names_its_upstream() {
        let error = ResilienceConfig::builder()
            .upstream("https://good.example", |p| p.min_attempt_time(ms(5)))
            .upstream("https://bad.example", |p| {
                p.hedge_delays(adaptive(95.0, ms(10), ms(500), u32::MAX))
            })
            .build()
            .unwrap_err();
        assert_eq!(error.field(), "hedge_delays.max_hedges");
        assert_eq!(error.upstream(), Some("https://bad.example"));
        let message = error.to_string();
        assert!(message.contains("hedge_delays.max_hedges"), "{message}");
        assert!(message.contains("https://bad.example"), "{message}");

        // The defaults are checked too, and belong to no upstream.
        let error = ResilienceConfig::builder()
            .defaults(|p| p.breaker_failure_statuses([1000]))
            .build()
            .unwrap_err();
        assert_eq!(error.field(), "breaker_failure_statuses");
        assert_eq!(error.upstream(), None);
    }

    #[test]
    fn an_upstream_starts_from_the_defaults_and_replaces_them_whole() {
        let config = ResilienceConfig::builder()
            .defaults(|p| p.deadline(Some(Duration::from_secs(30))))
            .defaults(|p| p.propagate(false))
            .upstream("https://a.example", |p| p.strategy(Some(Strategy::Hedged)))
            .upstream("https://b.example", |p| p.min_attempt_time(ms(99)))
            // Set again: the later policy wins, again from the defaults.
            .upstream("https://b.example", |p| p.min_attempt_time(ms(20)))
            .build()
            .unwrap();
        let a = config.policy_for("https://a.example");
        assert_eq!(a.strategy(), Some(Strategy::Hedged));
        assert_eq!(a.deadline(), Some(Duration::from_secs(30)));
        assert!(!a.propagate());
        let b = config.policy_for("https://b.example");
        assert_eq!(b.min_attempt_time(), ms(20));
        assert_eq!(b.strategy(), None);
        let other = config.policy_for("https://other.example");
        assert_eq!(other.strategy(), None);
        assert_eq!(other.deadline(), Some(Duration::from_secs(30)));
        let mut keys: Vec<&str> = config.upstreams().map(|(key, _)| key).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["https://a.example", "https://b.example"]);

        // A configuration goes back to a builder unchanged.
        let again = config.to_builder().build().unwrap();
        assert_eq!(
            again.policy_for("https://b.example").min_attempt_time(),
            ms(20)
        );
        assert_eq!(again.upstreams().len(), 2);
    }
}
