//! Which failed attempts are retried, how many times, and after how long.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::HeaderMap;
use patient_wire::{ErrorType, Method, RetryOptions};

use super::{
    after::{retry_after, retry_after_header},
    backoff::{Backoff, BackoffKind, ExponentialBackoff, InvalidBackoff, LinearBackoff},
};

/// The response statuses retried by default: 408, 429, 500, 502, 503, 504.
pub const DEFAULT_RETRY_STATUSES: [u16; 6] = [408, 429, 500, 502, 503, 504];

/// A response header that stops retries whatever its value.
pub const DO_NOT_RETRY_HEADER: &str = "x-do-not-retry";

/// How an attempt ended, as the retry policy sees it.
#[derive(Debug, Clone, Copy)]
pub enum AttemptOutcome<'a> {
    /// The upstream answered (with any status, including errors).
    Response {
        /// The response status code.
        status: u16,
        /// The response headers.
        headers: &'a HeaderMap,
    },
    /// No usable response: the request failed.
    Error {
        /// What kind of failure it was.
        kind: ErrorType,
        /// The error's class name, as reported in the task error.
        class_name: &'a str,
    },
}

impl<'a> AttemptOutcome<'a> {
    /// The status of a response; `None` for an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptOutcome::Response { status, .. } => Some(*status),
            AttemptOutcome::Error { .. } => None,
        }
    }

    /// The headers of a response; `None` for an error.
    pub fn headers(&self) -> Option<&'a HeaderMap> {
        match self {
            AttemptOutcome::Response { headers, .. } => Some(headers),
            AttemptOutcome::Error { .. } => None,
        }
    }

    /// The kind of an error; `None` for a response.
    pub fn error_kind(&self) -> Option<ErrorType> {
        match self {
            AttemptOutcome::Response { .. } => None,
            AttemptOutcome::Error { kind, .. } => Some(*kind),
        }
    }

    /// Whether this is a response carrying the `x-do-not-retry` header.
    pub fn is_do_not_retry(&self) -> bool {
        self.headers()
            .is_some_and(|headers| headers.contains_key(DO_NOT_RETRY_HEADER))
    }
}

/// A predicate deciding that an attempt outcome is worth retrying.
pub type RetryPredicate = dyn Fn(&AttemptOutcome<'_>) -> bool + Send + Sync;

/// One reason to retry; a policy retries when any of its conditions holds.
#[derive(Clone)]
pub enum RetryCondition {
    /// The request timed out ([`ErrorType::Timeout`]).
    Timeouts,
    /// Connecting failed or the connection broke ([`ErrorType::Connection`]).
    ConnectionErrors,
    /// The response has one of these statuses.
    Statuses(Vec<u16>),
    /// A predicate of your own.
    Custom(Arc<RetryPredicate>),
}

impl RetryCondition {
    /// A condition from a predicate.
    pub fn custom(predicate: impl Fn(&AttemptOutcome<'_>) -> bool + Send + Sync + 'static) -> Self {
        RetryCondition::Custom(Arc::new(predicate))
    }

    /// The default conditions: timeouts, connection errors, and the
    /// [`DEFAULT_RETRY_STATUSES`]. TLS failures, oversized responses and
    /// unknown errors are not retried.
    pub fn defaults() -> Vec<RetryCondition> {
        vec![
            RetryCondition::Timeouts,
            RetryCondition::ConnectionErrors,
            RetryCondition::Statuses(DEFAULT_RETRY_STATUSES.to_vec()),
        ]
    }

    /// Whether this condition holds for `outcome`.
    pub fn matches(&self, outcome: &AttemptOutcome<'_>) -> bool {
        match self {
            RetryCondition::Timeouts => outcome.error_kind() == Some(ErrorType::Timeout),
            RetryCondition::ConnectionErrors => outcome.error_kind() == Some(ErrorType::Connection),
            RetryCondition::Statuses(statuses) => outcome
                .status()
                .is_some_and(|status| statuses.contains(&status)),
            RetryCondition::Custom(predicate) => predicate(outcome),
        }
    }
}

impl fmt::Debug for RetryCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryCondition::Timeouts => f.write_str("Timeouts"),
            RetryCondition::ConnectionErrors => f.write_str("ConnectionErrors"),
            RetryCondition::Statuses(statuses) => {
                f.debug_tuple("Statuses").field(statuses).finish()
            }
            RetryCondition::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDelay {
    /// Retry after this long: the backoff, or the delay the server asked for.
    After(Duration),
    /// Do not retry (for [`RetryPolicy::next_delay`]: the server asked for a
    /// longer wait than `max_retry_after`).
    GiveUp,
}

impl RetryDelay {
    /// The delay, unless this is [`RetryDelay::GiveUp`].
    pub fn delay(&self) -> Option<Duration> {
        match self {
            RetryDelay::After(delay) => Some(*delay),
            RetryDelay::GiveUp => None,
        }
    }

    /// Whether this is [`RetryDelay::GiveUp`].
    pub fn is_give_up(&self) -> bool {
        matches!(self, RetryDelay::GiveUp)
    }
}

/// Which failed attempts of a request are retried, how many times, and
/// after how long.
///
/// The default ([`RetryPolicy::default`]) makes up to 3 attempts; retries
/// timeouts, connection errors and the statuses 408, 429, 500, 502, 503 and
/// 504; waits an [`ExponentialBackoff::default`] (100 ms doubling up to
/// 10 s, full jitter; a [`LinearBackoff`] with
/// [`RetryPolicyBuilder::backoff_kind`]) or what the server asked for in `Retry-After` (up to
/// 60 s; a longer wait ends the retries); and retries POST and PATCH only
/// when they carry an idempotency key. A response with the `x-do-not-retry`
/// header is never retried. It is the policy to set where retries are
/// wanted: a processor, inline executor or awaitable client without a retry
/// policy makes one attempt (see
/// [`UpstreamPolicyBuilder::retry`](crate::resilience::UpstreamPolicyBuilder::retry)).
///
/// Build another with [`RetryPolicy::builder`], start from the method's
/// default with [`RetryPolicy::default_for`], and apply a request's own
/// settings with [`RetryPolicy::with_overrides`].
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    conditions: Vec<RetryCondition>,
    respect_retry_after: bool,
    max_retry_after: Duration,
    retry_unsafe: bool,
}

impl Default for RetryPolicy {
    /// See [`RetryPolicy`]: 3 attempts, default backoff and conditions,
    /// `Retry-After` honoured up to 60 s, unsafe methods not retried.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::default(),
            conditions: RetryCondition::defaults(),
            respect_retry_after: true,
            max_retry_after: Duration::from_secs(60),
            retry_unsafe: false,
        }
    }
}

impl RetryPolicy {
    /// A single attempt, no retries (otherwise the defaults).
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::new()
    }

    /// The default policy for a request with `method`: the default policy
    /// for idempotent methods (GET, PUT, DELETE, HEAD, OPTIONS) and
    /// [`RetryPolicy::none`] for POST and PATCH.
    ///
    /// A POST or PATCH that opts in to retries (an idempotency key, or
    /// `retry_unsafe`) should start from [`RetryPolicy::default`] or the
    /// configured policy instead, since this one makes a single attempt.
    pub fn default_for(method: Method) -> Self {
        if method.is_idempotent() {
            Self::default()
        } else {
            Self::none()
        }
    }

    /// A builder holding this policy's settings.
    pub fn to_builder(&self) -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            max_attempts: self.max_attempts,
            backoff_kind: self.backoff.kind(),
            base_delay: self.backoff.base(),
            factor: self.backoff.factor().unwrap_or(DEFAULT_FACTOR),
            max_delay: self.backoff.max(),
            conditions: self.conditions.clone(),
            respect_retry_after: self.respect_retry_after,
            max_retry_after: self.max_retry_after,
            retry_unsafe: self.retry_unsafe,
        }
    }

    /// This policy with a request's own retry settings applied: each field
    /// of `options` that is set replaces the matching setting
    /// (`statuses` replaces the status conditions, keeping the others;
    /// `retry_unsafe` sets `retry_unsafe`).
    ///
    /// # Errors
    ///
    /// [`InvalidRetryPolicy`] when the result is not a valid policy, for
    /// example `max_attempts: 0`, a `base_delay` above the `max_delay`, or a
    /// status outside 100–599.
    pub fn with_overrides(
        &self,
        options: &RetryOptions,
    ) -> Result<RetryPolicy, InvalidRetryPolicy> {
        let mut builder = self.to_builder();
        if let Some(max_attempts) = options.max_attempts {
            builder = builder.max_attempts(max_attempts);
        }
        if let Some(base_delay) = options.base_delay {
            builder = builder.base_delay(base_delay);
        }
        if let Some(factor) = options.factor {
            builder = builder.factor(factor);
        }
        if let Some(max_delay) = options.max_delay {
            builder = builder.max_delay(max_delay);
        }
        if let Some(statuses) = &options.statuses {
            builder = builder.statuses(statuses.iter().copied());
        }
        if let Some(retry_unsafe) = options.retry_unsafe {
            builder = builder.retry_unsafe(retry_unsafe);
        }
        builder.build()
    }

    /// Attempts in all, the first included (default 3; 1 = no retries).
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff between attempts (default [`ExponentialBackoff::default`]).
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The reasons to retry (default [`RetryCondition::defaults`]).
    pub fn conditions(&self) -> &[RetryCondition] {
        &self.conditions
    }

    /// Whether a server-given delay replaces the backoff (default true).
    pub fn respect_retry_after(&self) -> bool {
        self.respect_retry_after
    }

    /// The longest server-given delay waited for (default 60 s).
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// Whether POST and PATCH are retried without an idempotency key
    /// (default false).
    pub fn retry_unsafe(&self) -> bool {
        self.retry_unsafe
    }

    /// Whether `outcome` is worth retrying by the conditions alone: false
    /// for a response with the `x-do-not-retry` header, otherwise whether
    /// any condition holds. Attempts left and the method are not considered
    /// here (see [`RetryPolicy::decide`]).
    pub fn should_retry(&self, outcome: &AttemptOutcome<'_>) -> bool {
        // The conditions first: most outcomes (a 200) match none, and then
        // the header lookup is not needed.
        self.conditions
            .iter()
            .any(|condition| condition.matches(outcome))
            && !outcome.is_do_not_retry()
    }

    /// Whether a request with `method` may be retried at all: idempotent
    /// methods always; POST and PATCH with an idempotency key
    /// (`has_idempotency_key`: the request's
    /// [`has_idempotency_key`](crate::Request::has_idempotency_key),
    /// the option or a caller-set `Idempotency-Key` / `X-Idempotency-Key`
    /// header) or when `retry_unsafe` is set.
    pub fn allows_method(&self, method: Method, has_idempotency_key: bool) -> bool {
        method.is_idempotent() || has_idempotency_key || self.retry_unsafe
    }

    /// How long to wait before retry number `retry` (0 for the first retry,
    /// that is before the second attempt).
    ///
    /// When `respect_retry_after` is set and the outcome is a response, the
    /// server's delay wins over the backoff: the `Retry-After` header on any
    /// response, and for a 429 also the rate-limit reset headers (see
    /// [`retry_after`](super::retry_after)); they are not used on other
    /// statuses, where they describe a quota rather than a wait. A server
    /// delay above `max_retry_after` gives [`RetryDelay::GiveUp`]. Otherwise
    /// the jittered backoff, drawn from `rng`. `now` is the wall-clock time
    /// the response arrived, for HTTP dates.
    pub fn next_delay(
        &self,
        retry: u32,
        outcome: &AttemptOutcome<'_>,
        now: SystemTime,
        rng: &mut fastrand::Rng,
    ) -> RetryDelay {
        if let Some(server) = self.server_delay(outcome, now) {
            return if server > self.max_retry_after {
                RetryDelay::GiveUp
            } else {
                RetryDelay::After(server)
            };
        }
        RetryDelay::After(self.backoff.delay(retry, rng))
    }

    /// The whole decision after attempt number `attempts_made` (1 after the
    /// first attempt) failed with `outcome`: [`RetryDelay::GiveUp`] when no
    /// attempts are left, the method may not be retried
    /// ([`allows_method`](Self::allows_method)), the outcome is not worth
    /// retrying ([`should_retry`](Self::should_retry)) or the server asked
    /// for too long a wait; otherwise the [`next_delay`](Self::next_delay).
    ///
    /// A [`RetryBudget`](super::RetryBudget), when used, is asked after this.
    pub fn decide(
        &self,
        attempts_made: u32,
        method: Method,
        has_idempotency_key: bool,
        outcome: &AttemptOutcome<'_>,
        now: SystemTime,
        rng: &mut fastrand::Rng,
    ) -> RetryDelay {
        if attempts_made >= self.max_attempts
            || !self.allows_method(method, has_idempotency_key)
            || !self.should_retry(outcome)
        {
            return RetryDelay::GiveUp;
        }
        self.next_delay(attempts_made.saturating_sub(1), outcome, now, rng)
    }

    fn server_delay(&self, outcome: &AttemptOutcome<'_>, now: SystemTime) -> Option<Duration> {
        if !self.respect_retry_after {
            return None;
        }
        match outcome {
            AttemptOutcome::Response {
                status: 429,
                headers,
            } => retry_after(headers, now),
            AttemptOutcome::Response { headers, .. } => retry_after_header(headers, now),
            AttemptOutcome::Error { .. } => None,
        }
    }
}

/// The exponential backoff's default factor, kept by a builder made from a
/// linear policy.
const DEFAULT_FACTOR: f64 = 2.0;

/// Builds a [`RetryPolicy`]; every setting starts at its default.
#[must_use]
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    max_attempts: u32,
    backoff_kind: BackoffKind,
    base_delay: Duration,
    factor: f64,
    max_delay: Duration,
    conditions: Vec<RetryCondition>,
    respect_retry_after: bool,
    max_retry_after: Duration,
    retry_unsafe: bool,
}

impl Default for RetryPolicyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicyBuilder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        RetryPolicy::default().to_builder()
    }

    /// Attempts in all, the first included; at least 1 (default 3; 1 = no
    /// retries).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The backoff between attempts, an [`ExponentialBackoff`] or a
    /// [`LinearBackoff`], replacing the kind, `base_delay`, `max_delay` and
    /// (for an exponential one) `factor` (default
    /// [`ExponentialBackoff::default`]).
    pub fn backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        let backoff = backoff.into();
        self.backoff_kind = backoff.kind();
        self.base_delay = backoff.base();
        if let Some(factor) = backoff.factor() {
            self.factor = factor;
        }
        self.max_delay = backoff.max();
        self
    }

    /// The shape of the backoff, keeping `base_delay` and `max_delay`
    /// (default [`BackoffKind::Exponential`]). A linear backoff waits up to
    /// `base_delay × (n + 1)` before retry `n` and ignores `factor`.
    pub fn backoff_kind(mut self, kind: BackoffKind) -> Self {
        self.backoff_kind = kind;
        self
    }

    /// The backoff ceiling before the first retry; above zero (default
    /// 100 ms).
    pub fn base_delay(mut self, base_delay: Duration) -> Self {
        self.base_delay = base_delay;
        self
    }

    /// The exponential backoff's growth per retry; at least 1 (default 2;
    /// not used by a linear backoff).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// The largest backoff; at least `base_delay` (default 10 s).
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Replaces every condition (default [`RetryCondition::defaults`]:
    /// timeouts, connection errors, statuses 408, 429, 500, 502, 503, 504).
    pub fn conditions(mut self, conditions: impl IntoIterator<Item = RetryCondition>) -> Self {
        self.conditions = conditions.into_iter().collect();
        self
    }

    /// Adds a condition to those already set.
    pub fn retry_on(mut self, condition: RetryCondition) -> Self {
        self.conditions.push(condition);
        self
    }

    /// Adds a predicate of your own as a condition.
    pub fn retry_if(
        self,
        predicate: impl Fn(&AttemptOutcome<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_on(RetryCondition::custom(predicate))
    }

    /// Replaces the retried statuses, keeping the other conditions; each in
    /// 100–599, none for no status retries (default 408, 429, 500, 502, 503,
    /// 504).
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.conditions
            .retain(|condition| !matches!(condition, RetryCondition::Statuses(_)));
        let statuses: Vec<u16> = statuses.into_iter().collect();
        if !statuses.is_empty() {
            self.conditions.push(RetryCondition::Statuses(statuses));
        }
        self
    }

    /// Whether a server-given delay (`Retry-After`, or the rate-limit reset
    /// headers of a 429) replaces the backoff (default true).
    pub fn respect_retry_after(mut self, respect: bool) -> Self {
        self.respect_retry_after = respect;
        self
    }

    /// The longest server-given delay waited for; a longer one ends the
    /// retries (default 60 s).
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Whether POST and PATCH are retried without an idempotency key
    /// (default false).
    pub fn retry_unsafe(mut self, retry: bool) -> Self {
        self.retry_unsafe = retry;
        self
    }

    /// The policy.
    ///
    /// # Errors
    ///
    /// [`InvalidRetryPolicy`] naming the first bad setting.
    pub fn build(self) -> Result<RetryPolicy, InvalidRetryPolicy> {
        if self.max_attempts == 0 {
            return Err(InvalidRetryPolicy::MaxAttempts);
        }
        let backoff = match self.backoff_kind {
            BackoffKind::Exponential => {
                ExponentialBackoff::new(self.base_delay, self.factor, self.max_delay)?.into()
            }
            BackoffKind::Linear => LinearBackoff::new(self.base_delay, self.max_delay)?.into(),
        };
        for condition in &self.conditions {
            if let RetryCondition::Statuses(statuses) = condition {
                if let Some(bad) = statuses.iter().find(|s| !(100..=599).contains(*s)) {
                    return Err(InvalidRetryPolicy::Status(*bad));
                }
            }
        }
        Ok(RetryPolicy {
            max_attempts: self.max_attempts,
            backoff,
            conditions: self.conditions,
            respect_retry_after: self.respect_retry_after,
            max_retry_after: self.max_retry_after,
            retry_unsafe: self.retry_unsafe,
        })
    }
}

/// The settings given to [`RetryPolicyBuilder`] (or
/// [`RetryPolicy::with_overrides`]) do not make a policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRetryPolicy {
    /// `max_attempts` is 0.
    #[error("invalid retry policy max_attempts: must be at least 1")]
    MaxAttempts,
    /// A retried status is outside 100–599.
    #[error("invalid retry policy status {0}: must be between 100 and 599")]
    Status(u16),
    /// `base_delay`, `factor` or `max_delay` do not make a backoff.
    #[error("invalid retry policy {}", .0.parameter())]
    Backoff(#[from] InvalidBackoff),
}

impl InvalidRetryPolicy {
    /// The name of the bad setting: `"max_attempts"`, `"statuses"`,
    /// `"base_delay"`, `"factor"` or `"max_delay"` (the names of the
    /// builder's setters and of the request's retry options).
    pub fn parameter(&self) -> &'static str {
        match self {
            InvalidRetryPolicy::MaxAttempts => "max_attempts",
            InvalidRetryPolicy::Status(_) => "statuses",
            InvalidRetryPolicy::Backoff(InvalidBackoff::Base) => "base_delay",
            InvalidRetryPolicy::Backoff(InvalidBackoff::Factor(_)) => "factor",
            InvalidRetryPolicy::Backoff(_) => "max_delay",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{error::Error as _, time::UNIX_EPOCH};

    use http::HeaderValue;

    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_794_744_000)
    }

    fn rng() -> fastrand::Rng {
        fastrand::Rng::with_seed(3)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn response(status: u16, headers: &HeaderMap) -> AttemptOutcome<'_> {
        AttemptOutcome::Response { status, headers }
    }

    fn error(kind: ErrorType) -> AttemptOutcome<'static> {
        AttemptOutcome::Error {
            kind,
            class_name: "Patient::Error",
        }
    }

    static EMPTY: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

    #[test]
    fn defaults() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(*p.backoff(), ExponentialBackoff::default());
        assert!(p.respect_retry_after());
        assert_eq!(p.max_retry_after(), Duration::from_secs(60));
        assert!(!p.retry_unsafe());
        assert_eq!(
            format!("{:?}", p.conditions()),
            "[Timeouts, ConnectionErrors, Statuses([408, 429, 500, 502, 503, 504])]"
        );
        let built = RetryPolicy::builder().build().unwrap();
        assert_eq!(format!("{built:?}"), format!("{p:?}"));
    }

    #[test]
    fn default_statuses_are_retried() {
        let p = RetryPolicy::default();
        for status in DEFAULT_RETRY_STATUSES {
            assert!(p.should_retry(&response(status, &EMPTY)), "{status}");
        }
    }

    #[test]
    fn other_statuses_are_not() {
        let p = RetryPolicy::default();
        for status in [
            200, 201, 204, 301, 304, 400, 401, 403, 404, 409, 422, 501, 505,
        ] {
            assert!(!p.should_retry(&response(status, &EMPTY)), "{status}");
        }
    }

    #[test]
    fn timeouts_and_connection_errors_are_retried() {
        let p = RetryPolicy::default();
        assert!(p.should_retry(&error(ErrorType::Timeout)));
        assert!(p.should_retry(&error(ErrorType::Connection)));
    }

    #[test]
    fn other_errors_are_not() {
        let p = RetryPolicy::default();
        for kind in [
            ErrorType::Ssl,
            ErrorType::ResponseTooLarge,
            ErrorType::Unknown,
        ] {
            assert!(!p.should_retry(&error(kind)), "{kind}");
        }
    }

    #[test]
    fn each_condition_alone() {
        let only = |condition| {
            RetryPolicy::builder()
                .conditions([condition])
                .build()
                .unwrap()
        };
        let timeouts = only(RetryCondition::Timeouts);
        assert!(timeouts.should_retry(&error(ErrorType::Timeout)));
        assert!(!timeouts.should_retry(&error(ErrorType::Connection)));
        assert!(!timeouts.should_retry(&response(503, &EMPTY)));

        let connection = only(RetryCondition::ConnectionErrors);
        assert!(connection.should_retry(&error(ErrorType::Connection)));
        assert!(!connection.should_retry(&error(ErrorType::Timeout)));

        let statuses = only(RetryCondition::Statuses(vec![418]));
        assert!(statuses.should_retry(&response(418, &EMPTY)));
        assert!(!statuses.should_retry(&response(503, &EMPTY)));
        assert!(!statuses.should_retry(&error(ErrorType::Timeout)));

        let nothing = RetryPolicy::builder().conditions([]).build().unwrap();
        assert!(!nothing.should_retry(&error(ErrorType::Timeout)));
        assert!(!nothing.should_retry(&response(503, &EMPTY)));
    }

    #[test]
    fn custom_predicates_add_to_the_defaults() {
        let p = RetryPolicy::builder()
            .retry_if(|outcome| {
                matches!(outcome, AttemptOutcome::Error { class_name, .. } if *class_name == "Flaky")
            })
            .retry_on(RetryCondition::custom(|outcome| {
                outcome
                    .headers()
                    .is_some_and(|h| h.get("x-retry-me").is_some())
            }))
            .build()
            .unwrap();
        let flaky = AttemptOutcome::Error {
            kind: ErrorType::Unknown,
            class_name: "Flaky",
        };
        assert!(p.should_retry(&flaky));
        assert!(!p.should_retry(&error(ErrorType::Unknown)));
        assert!(p.should_retry(&response(200, &headers(&[("x-retry-me", "1")]))));
        assert!(p.should_retry(&response(503, &EMPTY)));
        assert_eq!(format!("{:?}", p.conditions().last()), "Some(Custom(..))");
    }

    #[test]
    fn x_do_not_retry_wins_over_every_condition() {
        let p = RetryPolicy::builder().retry_if(|_| true).build().unwrap();
        for value in ["1", "true", ""] {
            let h = headers(&[("x-do-not-retry", value)]);
            for status in [429, 500, 503] {
                let outcome = response(status, &h);
                assert!(outcome.is_do_not_retry());
                assert!(!p.should_retry(&outcome), "{status} {value:?}");
                assert!(p
                    .decide(1, Method::Get, false, &outcome, now(), &mut rng())
                    .is_give_up());
            }
        }
        let upper = headers(&[("X-Do-Not-Retry", "yes")]);
        assert!(!p.should_retry(&response(503, &upper)));
    }

    #[test]
    fn methods_and_idempotency_keys() {
        let p = RetryPolicy::default();
        for method in [
            Method::Get,
            Method::Put,
            Method::Delete,
            Method::Head,
            Method::Options,
        ] {
            assert!(p.allows_method(method, false), "{method:?}");
            assert!(p.allows_method(method, true), "{method:?}");
        }
        for method in [Method::Post, Method::Patch] {
            assert!(!p.allows_method(method, false), "{method:?}");
            assert!(p.allows_method(method, true), "{method:?}");
        }
        let unsafe_ok = RetryPolicy::builder().retry_unsafe(true).build().unwrap();
        assert!(unsafe_ok.allows_method(Method::Post, false));
        assert!(unsafe_ok.allows_method(Method::Patch, false));
    }

    #[test]
    fn none_is_a_single_attempt() {
        let p = RetryPolicy::none();
        assert_eq!(p.max_attempts(), 1);
        assert!(p
            .decide(
                1,
                Method::Get,
                false,
                &response(503, &EMPTY),
                now(),
                &mut rng()
            )
            .is_give_up());
    }

    #[test]
    fn default_for_methods() {
        for method in Method::ALL {
            let expected = if method.is_idempotent() { 3 } else { 1 };
            assert_eq!(
                RetryPolicy::default_for(method).max_attempts(),
                expected,
                "{method:?}"
            );
        }
    }

    #[test]
    fn next_delay_is_the_backoff_without_server_delay() {
        let p = RetryPolicy::default();
        for retry in 0..6 {
            let mut a = rng();
            let mut b = rng();
            let got = p.next_delay(retry, &response(503, &EMPTY), now(), &mut a);
            let want = p.backoff().delay(retry, &mut b);
            assert_eq!(got, RetryDelay::After(want));
            assert!(want <= p.backoff().ceiling(retry));
        }
        let got = p.next_delay(0, &error(ErrorType::Timeout), now(), &mut rng());
        assert!(got.delay().is_some_and(|d| d <= Duration::from_millis(100)));
    }

    #[test]
    fn retry_after_seconds_and_date_replace_the_backoff() {
        let p = RetryPolicy::default();
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(
            p.next_delay(0, &response(503, &h), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(7))
        );
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        assert_eq!(
            p.next_delay(0, &response(429, &h), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(30));
        let h = headers(&[("retry-after", &past)]);
        assert_eq!(
            p.next_delay(4, &response(503, &h), now(), &mut rng()),
            RetryDelay::After(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_retry_after_falls_back_to_the_backoff() {
        let p = RetryPolicy::default();
        let h = headers(&[("retry-after", "whenever")]);
        let got = p.next_delay(2, &response(503, &h), now(), &mut rng());
        assert_eq!(got, RetryDelay::After(p.backoff().delay(2, &mut rng())));
    }

    #[test]
    fn retry_after_beyond_the_max_gives_up() {
        let p = RetryPolicy::default();
        let at_max = headers(&[("retry-after", "60")]);
        assert_eq!(
            p.next_delay(0, &response(503, &at_max), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(60))
        );
        let beyond = headers(&[("retry-after", "61")]);
        assert_eq!(
            p.next_delay(0, &response(503, &beyond), now(), &mut rng()),
            RetryDelay::GiveUp
        );
        let patient = RetryPolicy::builder()
            .max_retry_after(Duration::from_secs(120))
            .build()
            .unwrap();
        assert_eq!(
            patient.next_delay(0, &response(503, &beyond), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(61))
        );
    }

    #[test]
    fn retry_after_can_be_ignored() {
        let p = RetryPolicy::builder()
            .respect_retry_after(false)
            .build()
            .unwrap();
        let h = headers(&[("retry-after", "3600"), ("x-ratelimit-reset-tokens", "1h")]);
        let got = p.next_delay(1, &response(429, &h), now(), &mut rng());
        assert_eq!(got, RetryDelay::After(p.backoff().delay(1, &mut rng())));
    }

    #[test]
    fn reset_headers_count_on_429_only() {
        let p = RetryPolicy::default();
        let h = headers(&[
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-reset-tokens", "6s"),
        ]);
        assert_eq!(
            p.next_delay(0, &response(429, &h), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(6))
        );
        // A 503 that happens to carry quota headers gets the backoff.
        assert_eq!(
            p.next_delay(0, &response(503, &h), now(), &mut rng()),
            RetryDelay::After(p.backoff().delay(0, &mut rng()))
        );
        let long = headers(&[("x-ratelimit-reset-tokens", "6m0s")]);
        assert_eq!(
            p.next_delay(0, &response(429, &long), now(), &mut rng()),
            RetryDelay::GiveUp
        );
        let epoch = headers(&[("x-ratelimit-reset", "1794744010")]);
        assert_eq!(
            p.next_delay(0, &response(429, &epoch), now(), &mut rng()),
            RetryDelay::After(Duration::from_secs(10))
        );
    }

    #[test]
    fn decide_counts_attempts() {
        let p = RetryPolicy::default();
        let outcome = response(503, &EMPTY);
        let first = p.decide(1, Method::Get, false, &outcome, now(), &mut rng());
        assert_eq!(first, p.next_delay(0, &outcome, now(), &mut rng()));
        let second = p.decide(2, Method::Get, false, &outcome, now(), &mut rng());
        assert_eq!(second, p.next_delay(1, &outcome, now(), &mut rng()));
        assert!(p
            .decide(3, Method::Get, false, &outcome, now(), &mut rng())
            .is_give_up());
    }

    #[test]
    fn decide_checks_method_condition_and_server_delay() {
        let p = RetryPolicy::default();
        let failed = response(503, &EMPTY);
        assert!(p
            .decide(1, Method::Post, false, &failed, now(), &mut rng())
            .is_give_up());
        assert!(!p
            .decide(1, Method::Post, true, &failed, now(), &mut rng())
            .is_give_up());
        assert!(!p
            .decide(1, Method::Patch, true, &failed, now(), &mut rng())
            .is_give_up());
        assert!(p
            .decide(
                1,
                Method::Get,
                false,
                &response(404, &EMPTY),
                now(),
                &mut rng()
            )
            .is_give_up());
        assert!(p
            .decide(
                1,
                Method::Get,
                false,
                &error(ErrorType::Ssl),
                now(),
                &mut rng()
            )
            .is_give_up());
        let long = headers(&[("retry-after", "300")]);
        assert!(p
            .decide(
                1,
                Method::Get,
                false,
                &response(503, &long),
                now(),
                &mut rng()
            )
            .is_give_up());
        let unsafe_ok = RetryPolicy::builder().retry_unsafe(true).build().unwrap();
        assert!(!unsafe_ok
            .decide(1, Method::Post, false, &failed, now(), &mut rng())
            .is_give_up());
    }

    #[test]
    fn builder_setters() {
        let p = RetryPolicy::builder()
            .max_attempts(5)
            .base_delay(Duration::from_millis(50))
            .factor(3.0)
            .max_delay(Duration::from_secs(2))
            .statuses([503])
            .respect_retry_after(false)
            .max_retry_after(Duration::from_secs(5))
            .retry_unsafe(true)
            .build()
            .unwrap();
        assert_eq!(p.max_attempts(), 5);
        assert_eq!(
            *p.backoff(),
            ExponentialBackoff::new(Duration::from_millis(50), 3.0, Duration::from_secs(2))
                .unwrap()
        );
        assert_eq!(
            format!("{:?}", p.conditions()),
            "[Timeouts, ConnectionErrors, Statuses([503])]"
        );
        assert!(!p.respect_retry_after());
        assert_eq!(p.max_retry_after(), Duration::from_secs(5));
        assert!(p.retry_unsafe());

        let backoff =
            ExponentialBackoff::new(Duration::from_secs(1), 1.5, Duration::from_secs(9)).unwrap();
        let p = RetryPolicy::builder().backoff(backoff).build().unwrap();
        assert_eq!(*p.backoff(), backoff);

        let no_statuses = RetryPolicy::builder().statuses([]).build().unwrap();
        assert!(!no_statuses.should_retry(&response(503, &EMPTY)));
        assert!(no_statuses.should_retry(&error(ErrorType::Timeout)));
    }

    #[test]
    fn builder_validation_names_the_setting() {
        let cases = [
            (RetryPolicy::builder().max_attempts(0), "max_attempts"),
            (
                RetryPolicy::builder().base_delay(Duration::ZERO),
                "base_delay",
            ),
            (RetryPolicy::builder().factor(0.5), "factor"),
            (RetryPolicy::builder().factor(f64::NAN), "factor"),
            (
                RetryPolicy::builder().max_delay(Duration::from_millis(1)),
                "max_delay",
            ),
            (RetryPolicy::builder().statuses([503, 99]), "statuses"),
            (RetryPolicy::builder().statuses([600]), "statuses"),
            (
                RetryPolicy::builder().conditions([RetryCondition::Statuses(vec![0])]),
                "statuses",
            ),
        ];
        for (builder, parameter) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.parameter(), parameter, "{err}");
            assert!(err.to_string().contains("invalid retry policy"), "{err}");
        }
        let err = RetryPolicy::builder().factor(0.5).build().unwrap_err();
        assert_eq!(
            err,
            InvalidRetryPolicy::Backoff(InvalidBackoff::Factor(0.5))
        );
        assert!(err.source().is_some());
    }

    #[test]
    fn overrides_replace_only_what_is_set() {
        let base = RetryPolicy::builder().retry_if(|_| false).build().unwrap();
        let same = base.with_overrides(&RetryOptions::default()).unwrap();
        assert_eq!(format!("{same:?}"), format!("{base:?}"));

        let options = RetryOptions {
            max_attempts: Some(6),
            base_delay: Some(Duration::from_millis(20)),
            factor: Some(1.5),
            max_delay: Some(Duration::from_secs(1)),
            statuses: Some(vec![429, 503]),
            retry_unsafe: Some(true),
        };
        let p = base.with_overrides(&options).unwrap();
        assert_eq!(p.max_attempts(), 6);
        assert_eq!(
            *p.backoff(),
            ExponentialBackoff::new(Duration::from_millis(20), 1.5, Duration::from_secs(1))
                .unwrap()
        );
        assert!(p.retry_unsafe());
        assert!(p.should_retry(&response(429, &EMPTY)));
        assert!(!p.should_retry(&response(500, &EMPTY)));
        // The other conditions stay, the custom one included.
        assert!(p.should_retry(&error(ErrorType::Timeout)));
        assert_eq!(
            format!("{:?}", p.conditions()),
            "[Timeouts, ConnectionErrors, Custom(..), Statuses([429, 503])]"
        );
        // The original is untouched.
        assert_eq!(base.max_attempts(), 3);
    }

    #[test]
    fn overrides_open_retries_for_an_opted_in_post() {
        let opt_in = RetryOptions {
            retry_unsafe: Some(true),
            max_attempts: Some(4),
            ..RetryOptions::default()
        };
        let p = RetryPolicy::default_for(Method::Post)
            .with_overrides(&opt_in)
            .unwrap();
        assert!(!p
            .decide(
                3,
                Method::Post,
                false,
                &response(502, &EMPTY),
                now(),
                &mut rng()
            )
            .is_give_up());
    }

    #[test]
    fn invalid_overrides_are_errors() {
        let p = RetryPolicy::default();
        let zero = RetryOptions {
            max_attempts: Some(0),
            ..RetryOptions::default()
        };
        assert_eq!(
            p.with_overrides(&zero).unwrap_err(),
            InvalidRetryPolicy::MaxAttempts
        );
        let base_above_max = RetryOptions {
            base_delay: Some(Duration::from_secs(20)),
            ..RetryOptions::default()
        };
        assert_eq!(
            p.with_overrides(&base_above_max).unwrap_err().parameter(),
            "max_delay"
        );
        let factor = RetryOptions {
            factor: Some(0.0),
            ..RetryOptions::default()
        };
        assert_eq!(p.with_overrides(&factor).unwrap_err().parameter(), "factor");
        let status = RetryOptions {
            statuses: Some(vec![1000]),
            ..RetryOptions::default()
        };
        assert_eq!(
            p.with_overrides(&status).unwrap_err(),
            InvalidRetryPolicy::Status(1000)
        );
    }

    #[test]
    fn retry_delay_helpers() {
        assert_eq!(
            RetryDelay::After(Duration::from_secs(1)).delay(),
            Some(Duration::from_secs(1))
        );
        assert!(!RetryDelay::After(Duration::ZERO).is_give_up());
        assert_eq!(RetryDelay::GiveUp.delay(), None);
        assert!(RetryDelay::GiveUp.is_give_up());
    }

    #[test]
    fn outcome_accessors() {
        let h = headers(&[("retry-after", "1")]);
        let r = response(503, &h);
        assert_eq!(r.status(), Some(503));
        assert!(r.headers().is_some());
        assert_eq!(r.error_kind(), None);
        assert!(!r.is_do_not_retry());
        let e = error(ErrorType::Timeout);
        assert_eq!(e.status(), None);
        assert!(e.headers().is_none());
        assert_eq!(e.error_kind(), Some(ErrorType::Timeout));
        assert!(!e.is_do_not_retry());
    }

    #[test]
    fn a_linear_backoff_is_chosen_by_kind_or_value() {
        let p = RetryPolicy::builder()
            .backoff_kind(BackoffKind::Linear)
            .base_delay(Duration::from_millis(50))
            .max_delay(Duration::from_millis(120))
            .build()
            .unwrap();
        let linear =
            LinearBackoff::new(Duration::from_millis(50), Duration::from_millis(120)).unwrap();
        assert_eq!(*p.backoff(), linear);
        let ceilings: Vec<Duration> = (0..4).map(|r| p.backoff().ceiling(r)).collect();
        assert_eq!(
            ceilings,
            [50, 100, 120, 120].map(Duration::from_millis),
            "linear, capped"
        );
        // The decision draws from the linear backoff.
        let got = p.decide(
            2,
            Method::Get,
            false,
            &response(503, &EMPTY),
            now(),
            &mut rng(),
        );
        let want = linear.delay(1, &mut rng());
        assert_eq!(got, RetryDelay::After(want));

        let by_value = RetryPolicy::builder().backoff(linear).build().unwrap();
        assert_eq!(*by_value.backoff(), linear);
        assert_eq!(by_value.backoff().kind(), BackoffKind::Linear);
        // Back to exponential, keeping base and max and the default factor.
        let back = by_value
            .to_builder()
            .backoff_kind(BackoffKind::Exponential)
            .build()
            .unwrap();
        assert_eq!(
            *back.backoff(),
            ExponentialBackoff::new(Duration::from_millis(50), 2.0, Duration::from_millis(120))
                .unwrap()
        );
    }

    #[test]
    fn a_linear_policy_stays_linear_under_overrides() {
        let base = RetryPolicy::builder()
            .backoff(LinearBackoff::default())
            .build()
            .unwrap();
        let options = RetryOptions {
            base_delay: Some(Duration::from_millis(30)),
            factor: Some(3.0),
            max_delay: Some(Duration::from_millis(200)),
            ..RetryOptions::default()
        };
        let p = base.with_overrides(&options).unwrap();
        assert_eq!(
            *p.backoff(),
            LinearBackoff::new(Duration::from_millis(30), Duration::from_millis(200)).unwrap()
        );
        assert_eq!(p.backoff().ceiling(2), Duration::from_millis(90));
        let same = base.with_overrides(&RetryOptions::default()).unwrap();
        assert_eq!(*same.backoff(), LinearBackoff::default());

        let bad = RetryOptions {
            max_delay: Some(Duration::from_millis(10)),
            ..RetryOptions::default()
        };
        let err = base.with_overrides(&bad).unwrap_err();
        assert_eq!(err.parameter(), "max_delay");
        let err = RetryPolicy::builder()
            .backoff_kind(BackoffKind::Linear)
            .base_delay(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.parameter(), "base_delay");
    }
}
