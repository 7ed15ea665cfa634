//! Circuit breakers: stop sending to an upstream that keeps failing, probe it
//! after a pause, and resume when it answers again.
//!
//! * [`BreakerPolicy`] — when to open (a failure ratio over a sampling window
//!   once a minimum throughput is reached, or N consecutive failures), how
//!   long to stay open, how many half-open probes, how many successes close.
//!   Built by a validated builder; defaults on each setter.
//! * [`CircuitBreaker`] — the state machine of one upstream
//!   ([`BreakerState`]: closed → open → half-open → closed or open again).
//!   [`try_acquire`](CircuitBreaker::try_acquire) gives a [`BreakerPermit`]
//!   on which the caller reports `success()` or `failure()`, or fails fast
//!   with [`BreakerOpen`] and the time until it may admit a call.
//!
//! The engine keeps one breaker per upstream, beside its limits, and bounds
//! how many it keeps (see
//! [`ResilienceConfig::max_upstreams`](crate::ResilienceConfig::max_upstreams)).
//! The caller decides what a failure is (in the pipeline: a request error,
//! or a 5xx or 429 status). All time is [`tokio::time`], so tests drive it
//! with a paused clock.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_http::breaker::{BreakerPolicy, BreakerState, CircuitBreaker};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build()?.block_on(async {
//! let policy = BreakerPolicy::builder()
//!     .consecutive_failures(Some(3))
//!     .break_duration(Duration::from_secs(10))
//!     .build()?;
//! let breaker = CircuitBreaker::with_on_transition(policy, |from, to| println!("{from} -> {to}"));
//!
//! for _ in 0..3 {
//!     match breaker.try_acquire() {
//!         // ... send the request, then report what happened:
//!         Ok(permit) => permit.failure(),
//!         Err(open) => println!("not sent; retry in {:?}", open.retry_in),
//!     }
//! }
//! let refused = breaker.try_acquire().unwrap_err();
//! assert!(refused.retry_in <= Duration::from_secs(10));
//! assert_eq!(breaker.state(), BreakerState::Open);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[allow(clippy::module_inception)]
mod breaker;
mod policy;

pub use breaker::{BreakerOpen, BreakerPermit, BreakerState, CircuitBreaker};
pub use policy::{BreakerPolicy, BreakerPolicyBuilder, InvalidBreakerPolicy};
