//! Resilience around any async function: [`CallPolicy`] runs a closure with
//! retries, a circuit breaker, a per-attempt timeout and a deadline, for
//! calls that are not HTTP (a database, a gRPC stub, a queue, a cache).
//!
//! It is built from the pieces the HTTP engine uses: the retry policy's
//! attempts and backoff ([`RetryPolicy`], exponential or linear), the same
//! [`CircuitBreaker`] (share one `Arc` between a policy and anything else
//! guarding the same dependency), the same [`RetryBudget`], on tokio's
//! clock. What it cannot know by itself is which errors are worth another
//! try: [`CallPolicy::run`] retries every error, [`CallPolicy::run_if`] asks
//! a predicate.
//!
//! A run made while serving a request (inside the scope of
//! [`PropagationLayer`](crate::propagation::PropagationLayer), or of
//! [`propagation::scope`](crate::propagation::scope)) also ends at that
//! request's deadline, as the HTTP faces' calls do: the earlier of the two
//! wins.
//!
//! Each run:
//!
//! 1. asks the breaker (when there is one) for a permit; an open breaker
//!    ends the run with [`CallError::BreakerOpen`] without calling the
//!    closure;
//! 2. calls the closure with the attempt's number (1 for the first), bounded
//!    by the attempt timeout and by what is left of the deadline, whichever
//!    is shorter;
//! 3. on success reports it to the breaker and returns the value. On an
//!    error the predicate accepts (or a timeout) reports a failure to the
//!    breaker and, while attempts, the retry budget and the deadline allow,
//!    sleeps the backoff and goes to 1. An error the predicate refuses is
//!    returned at once and counts as a success for the breaker: the
//!    dependency answered, the request was wrong.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_http::{
//!     call::{CallError, CallPolicy},
//!     retry::{LinearBackoff, RetryPolicy},
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let policy = CallPolicy::builder()
//!     .retry(
//!         RetryPolicy::builder()
//!             .max_attempts(3)
//!             .backoff(LinearBackoff::new(Duration::from_millis(1), Duration::from_millis(5)).unwrap())
//!             .build()
//!             .unwrap(),
//!     )
//!     .attempt_timeout(Duration::from_secs(2))
//!     .deadline(Duration::from_secs(5))
//!     .build();
//!
//! let value = policy
//!     .run(|attempt| async move {
//!         if attempt < 3 { Err("busy") } else { Ok(attempt * 10) }
//!     })
//!     .await;
//! assert_eq!(value, Ok(30));
//!
//! let refused: Result<(), _> = policy
//!     .run_if(|_| async { Err("no such row") }, |e: &&str| *e != "no such row")
//!     .await;
//! assert!(matches!(refused, Err(CallError::Failed { attempts: 1, .. })));
//! # }
//! ```

use std::{fmt, future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    breaker::{BreakerOpen, CircuitBreaker},
    retry::{RetryBudget, RetryPolicy},
    time::checked_after,
};

/// Why a [`CallPolicy`] run ended without a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The closure's last error: not worth retrying, or no attempt (or
    /// retry budget) left.
    #[error("failed after {attempts} attempt(s): {error}")]
    Failed {
        /// The closure's error.
        error: E,
        /// Attempts made.
        attempts: u32,
    },
    /// The last attempt ran past its timeout (it was cancelled).
    #[error("attempt {attempts} timed out after {timeout:?}")]
    Timeout {
        /// Attempts made, the timed-out one included.
        attempts: u32,
        /// The limit it ran into: the attempt timeout, or what was left of
        /// the deadline.
        timeout: Duration,
    },
    /// The circuit breaker is open: the closure was not called this time.
    #[error("circuit breaker is open after {attempts} attempt(s); retry in {:?}", open.retry_in)]
    BreakerOpen {
        /// When the breaker may admit a call again.
        open: BreakerOpen,
        /// Attempts made before the breaker refused.
        attempts: u32,
        /// The error of the attempt before, if one failed.
        last: Option<E>,
    },
    /// The deadline leaves no time for the next attempt (or its backoff).
    #[error("deadline exceeded after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// Attempts made.
        attempts: u32,
        /// The error of the last attempt, if one failed with an error.
        last: Option<E>,
    },
}

impl<E> CallError<E> {
    /// Attempts made before the run ended.
    pub fn attempts(&self) -> u32 {
        match self {
            CallError::Failed { attempts, .. }
            | CallError::Timeout { attempts, .. }
            | CallError::BreakerOpen { attempts, .. }
            | CallError::DeadlineExceeded { attempts, .. } => *attempts,
        }
    }

    /// The closure's last error, when the run ended after one.
    pub fn last_error(&self) -> Option<&E> {
        match self {
            CallError::Failed { error, .. } => Some(error),
            CallError::BreakerOpen { last, .. } | CallError::DeadlineExceeded { last, .. } => {
                last.as_ref()
            }
            CallError::Timeout { .. } => None,
        }
    }
}

/// Retries, a circuit breaker, an attempt timeout and a deadline around any
/// async function; see the [module docs](self).
///
/// Cheap to clone (the breaker and budget are shared).
#[derive(Clone)]
pub struct CallPolicy {
    retry: RetryPolicy,
    breaker: Option<Arc<CircuitBreaker>>,
    budget: Option<Arc<RetryBudget>>,
    attempt_timeout: Option<Duration>,
    deadline: Option<Duration>,
}

impl fmt::Debug for CallPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallPolicy")
            .field("max_attempts", &self.retry.max_attempts())
            .field("backoff", self.retry.backoff())
            .field("breaker", &self.breaker.is_some())
            .field("budget", &self.budget.is_some())
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Default for CallPolicy {
    fn default() -> Self {
        CallPolicy::builder().build()
    }
}

/// How the last attempt ended, for the error the run returns.
enum Last<E> {
    None,
    Error(E),
    Timeout(Duration),
}

impl<E> Last<E> {
    fn into_error(self) -> Option<E> {
        match self {
            Last::Error(e) => Some(e),
            _ => None,
        }
    }
}

impl CallPolicy {
    /// A builder: three attempts with the default exponential backoff, no
    /// breaker, no budget, no timeout, no deadline.
    pub fn builder() -> CallPolicyBuilder {
        CallPolicyBuilder {
            policy: CallPolicy {
                retry: RetryPolicy::default(),
                breaker: None,
                budget: None,
                attempt_timeout: None,
                deadline: None,
            },
        }
    }

    /// The retry policy: its attempts and backoff are used (its status and
    /// error-type conditions are for HTTP and are not).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The circuit breaker, if any.
    pub fn breaker(&self) -> Option<&Arc<CircuitBreaker>> {
        self.breaker.as_ref()
    }

    /// Runs `op` (called with the attempt's number, from 1), retrying every
    /// error.
    ///
    /// # Errors
    ///
    /// [`CallError`]: why no attempt produced a value.
    pub async fn run<T, E, F, Fut>(&self, op: F) -> Result<T, CallError<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_if(op, |_| true).await
    }

    /// Runs `op` (called with the attempt's number, from 1), retrying the
    /// errors `retryable` accepts; any other error ends the run at once.
    ///
    /// # Errors
    ///
    /// [`CallError`]: why no attempt produced a value.
    pub async fn run_if<T, E, F, Fut, P>(&self, mut op: F, retryable: P) -> Result<T, CallError<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: Fn(&E) -> bool,
    {
        let now = Instant::now();
        let own = self.deadline.and_then(|d| checked_after(now, d));
        // Inside a served request, its remaining deadline caps the run's.
        let inherited = crate::propagation::RequestContext::current()
            .and_then(|ctx| ctx.remaining())
            .and_then(|d| checked_after(now, d));
        let deadline = match (own, inherited) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut rng = fastrand::Rng::new();
        let mut last = Last::None;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let made = attempt - 1;
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                return Err(CallError::DeadlineExceeded {
                    attempts: made,
                    last: last.into_error(),
                });
            }
            let permit = match &self.breaker {
                None => None,
                Some(breaker) => match breaker.try_acquire() {
                    Ok(permit) => Some(permit),
                    Err(open) => {
                        return Err(CallError::BreakerOpen {
                            open,
                            attempts: made,
                            last: last.into_error(),
                        })
                    }
                },
            };
            if attempt == 1 {
                if let Some(budget) = &self.budget {
                    budget.deposit();
                }
            }
            let limit = match (self.attempt_timeout, remaining) {
                (Some(t), Some(r)) => Some(t.min(r)),
                (t, r) => t.or(r),
            };
            let result = match limit {
                None => Some(op(attempt).await),
                Some(limit) => tokio::time::timeout(limit, op(attempt)).await.ok(),
            };
            match result {
                Some(Ok(value)) => {
                    if let Some(permit) = permit {
                        permit.success();
                    }
                    return Ok(value);
                }
                Some(Err(error)) => {
                    let worth = retryable(&error);
                    if let Some(permit) = permit {
                        permit.record(!worth);
                    }
                    if !worth {
                        return Err(CallError::Failed {
                            error,
                            attempts: attempt,
                        });
                    }
                    last = Last::Error(error);
                }
                None => {
                    if let Some(permit) = permit {
                        permit.failure();
                    }
                    last = Last::Timeout(limit.unwrap_or_default());
                }
            }
            let exhausted = attempt >= self.retry.max_attempts()
                || self.budget.as_ref().is_some_and(|b| !b.withdraw());
            if exhausted {
                return Err(match last {
                    Last::Error(error) => CallError::Failed {
                        error,
                        attempts: attempt,
                    },
                    Last::Timeout(timeout) => CallError::Timeout {
                        attempts: attempt,
                        timeout,
                    },
                    Last::None => CallError::DeadlineExceeded {
                        attempts: attempt,
                        last: None,
                    },
                });
            }
            let delay = self.retry.backoff().delay(attempt - 1, &mut rng);
            if let Some(deadline) = deadline {
                if checked_after(Instant::now(), delay).is_none_or(|wake| wake >= deadline) {
                    return Err(CallError::DeadlineExceeded {
                        attempts: attempt,
                        last: last.into_error(),
                    });
                }
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// Builds a [`CallPolicy`].
#[derive(Debug, Clone)]
#[must_use]
pub struct CallPolicyBuilder {
    policy: CallPolicy,
}

impl CallPolicyBuilder {
    /// Attempts and backoff (exponential or linear) from a retry policy;
    /// [`RetryPolicy::none`] makes one attempt.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.policy.retry = retry;
        self
    }

    /// A circuit breaker the runs ask first and report to.
    pub fn breaker(mut self, breaker: Arc<CircuitBreaker>) -> Self {
        self.policy.breaker = Some(breaker);
        self
    }

    /// A retry budget: every run deposits, every retry withdraws, and a run
    /// whose retry is refused ends with its last error.
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.policy.budget = Some(budget);
        self
    }

    /// The time limit of each attempt (none by default); a timed-out attempt
    /// is cancelled (its future dropped) and retried like an error.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.policy.attempt_timeout = Some(timeout);
        self
    }

    /// The time limit of a whole run, backoffs included (none by default):
    /// no attempt starts, and no backoff is slept, past it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.policy.deadline = Some(deadline);
        self
    }

    /// The policy.
    pub fn build(self) -> CallPolicy {
        self.policy
    }
}
