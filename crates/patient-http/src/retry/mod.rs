//! Retries: which failed attempts to repeat, when, and how many in all.
//!
//! * [`RetryPolicy`] decides whether an attempt outcome is worth retrying
//!   (its [`RetryCondition`]s: timeouts, connection errors, statuses 408,
//!   429, 500, 502, 503, 504 and predicates of your own), whether the
//!   request's method may be retried (POST and PATCH only with an
//!   idempotency key or an explicit opt-in), and how long to wait.
//! * [`ExponentialBackoff`] is the wait: base × factorⁿ capped at a maximum,
//!   with full jitter; [`LinearBackoff`] grows by the base instead
//!   (base × (n + 1)), and [`Backoff`] is the one a policy holds.
//! * [`retry_after`] reads the wait the server asked for: `Retry-After`
//!   (seconds or an HTTP date) and the rate-limit reset headers.
//! * [`RetryBudget`] caps retries at a share of first attempts over a
//!   sliding window, so an outage cannot multiply the load on an upstream.
//!
//! A response with the `x-do-not-retry` header is never retried. All time
//! is [`tokio::time::Instant`], so `tokio::time::pause()` drives the budget;
//! HTTP dates are read against a [`SystemTime`](std::time::SystemTime)
//! argument.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//!
//! use http::HeaderMap;
//! use patient_http::{
//!     retry::{AttemptOutcome, RetryBudget, RetryDelay, RetryPolicy},
//!     ErrorType, Method,
//! };
//!
//! let policy = RetryPolicy::builder()
//!     .max_attempts(4)
//!     .statuses([429, 503])
//!     .build()?;
//! let budget = RetryBudget::default();
//! let mut rng = fastrand::Rng::new();
//!
//! // The first attempt timed out.
//! budget.deposit();
//! let timeout = AttemptOutcome::Error { kind: ErrorType::Timeout, class_name: "Timeout" };
//! match policy.decide(1, Method::Get, false, &timeout, SystemTime::now(), &mut rng) {
//!     RetryDelay::After(delay) if budget.withdraw() => {
//!         assert!(delay <= Duration::from_millis(100));
//!         // sleep `delay`, then send attempt 2
//!     }
//!     _ => { /* report the failure */ }
//! }
//!
//! // The second got a 429 asking for 2 s.
//! let mut headers = HeaderMap::new();
//! headers.insert("retry-after", "2".parse()?);
//! let limited = AttemptOutcome::Response { status: 429, headers: &headers };
//! assert_eq!(
//!     policy.decide(2, Method::Get, false, &limited, SystemTime::now(), &mut rng),
//!     RetryDelay::After(Duration::from_secs(2)),
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod after;
mod backoff;
mod budget;
mod policy;

pub use after::{rate_limit_reset, retry_after, retry_after_header};
pub use backoff::{Backoff, BackoffKind, ExponentialBackoff, InvalidBackoff, LinearBackoff};
pub use budget::{InvalidBudget, RetryBudget};
pub use policy::{
    AttemptOutcome, InvalidRetryPolicy, RetryCondition, RetryDelay, RetryPolicy,
    RetryPolicyBuilder, RetryPredicate, DEFAULT_RETRY_STATUSES, DO_NOT_RETRY_HEADER,
};
