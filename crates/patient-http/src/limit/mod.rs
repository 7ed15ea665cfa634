//! Rate and concurrency limits per upstream or per key: a call over a limit
//! waits its turn instead of failing.
//!
//! * [`RateLimit`] / [`TokenBucket`] — a sustained rate with a burst, as a
//!   fair (first come, first served) token bucket on tokio time.
//! * [`ConcurrencyLimit`] — at most N calls in flight, as a fair semaphore
//!   with owned permits.
//! * [`KeyLimits`] — one key's optional bucket, optional concurrency limit
//!   and cooldown; [`acquire`](KeyLimits::acquire) returns a [`LimitPermit`]
//!   that holds the concurrency slot and records the wait.
//!   [`cool_down`](KeyLimits::cool_down) holds back every call of the key —
//!   how a 429 with `Retry-After` cools the whole key, not one request.
//!
//! The engine keeps one [`KeyLimits`] per upstream, beside its breaker, and
//! bounds how many it keeps (see
//! [`ResilienceConfig::max_upstreams`](crate::ResilienceConfig::max_upstreams)).
//!
//! All time is [`tokio::time`], so tests drive it with a paused clock.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_http::limit::{KeyLimits, LimitConfig};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build()?.block_on(async {
//! let limits = KeyLimits::new(&LimitConfig::builder().rate(50.0, 10).max_in_flight(8).build()?);
//!
//! let permit = limits.acquire().await; // waits for a token and a slot
//! println!("waited {:?}", permit.waited());
//! // ... send the request while holding `permit`; on a 429 with Retry-After:
//! limits.cool_down(Duration::from_millis(10));
//! drop(permit);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod concurrency;
mod key;
mod rate;

pub use concurrency::{ConcurrencyLimit, ConcurrencyPermit};
pub use key::{KeyLimits, LimitBusy, LimitConfig, LimitConfigBuilder, LimitPermit};
pub use rate::{RateLimit, TokenBucket};

/// A rejected limit setting; [`field`](Self::field) names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid limit `{field}`: {reason}")]
pub struct InvalidLimit {
    field: &'static str,
    reason: String,
}

impl InvalidLimit {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidLimit {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the invalid setting: `"per_second"`, `"burst"` or
    /// `"max_in_flight"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with its value.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
