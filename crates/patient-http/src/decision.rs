//! Durable decisions: run a task one step at a time and store what comes
//! next instead of sleeping on it.
//!
//! The processor, the inline executor and [`AwaitableClient::execute`] keep
//! a task in memory from its first attempt to its outcome, sleeping through
//! backoffs. A durable queue cannot: a restart would lose every backoff,
//! `Retry-After` and deadline. [`AwaitableClient::step`] makes the next
//! attempt now (or the task's group of hedged attempts), with the same
//! retry policy, budget, breaker, limits and deadline as the other faces,
//! and returns a [`Decision`]:
//!
//! * [`Decision::Done`]: the task's outcome, ready to deliver;
//! * [`Decision::Retry`]: store the task and step again not before the given
//!   time (the backoff, or what the upstream asked for);
//! * [`Decision::Refused`]: nothing was sent, the breaker or a limit holds
//!   the upstream back until the given time; step again then (or give up
//!   with the error it carries).
//!
//! Everything a later step needs is in the [`TaskProgress`] the caller
//! keeps: the next attempt's number, the records of the attempts so far,
//! whether any request may have reached the upstream, and the wall-clock
//! deadline. Nothing of a task lives in the engine between steps. The retry
//! budget is shared by the engine's tasks: a first attempt deposits into
//! it, and a [`Decision::Retry`] has already withdrawn the retry's token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::SystemTime;
//!
//! use patient_http::{AwaitableClient, Decision, LimitWait, Request, Task};
//!
//! let client = AwaitableClient::builder().build_awaitable()?;
//! let task = Task::new(Request::get("https://example.com/").build()?, "Callback");
//! let mut progress = client.progress(&task, SystemTime::now());
//! loop {
//!     match client.step(&task, &mut progress, LimitWait::UpTo(std::time::Duration::ZERO)).await {
//!         Decision::Done(outcome) => {
//!             println!("{:?}", outcome.map(|r| r.status));
//!             break;
//!         }
//!         // A durable queue stores `progress` and `not_before` here.
//!         Decision::Retry { delay, .. } | Decision::Refused { retry_in: delay, .. } => {
//!             tokio::time::sleep(delay).await
//!         }
//!         _ => break,
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::{
    panic::AssertUnwindSafe,
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use patient_wire::{Attempt, Response, TaskError};
use tokio::time::Instant;

pub use crate::strategy::{LimitWait, Refusal};
use crate::{
    strategy::{Progress, Step},
    AwaitableClient, Task,
};

/// Where a task stands between steps: what a durable queue stores with it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskProgress {
    /// The number of the next attempt; 1 for a task not tried yet.
    pub next_attempt: u32,
    /// The records of the attempts made so far, oldest first (refused
    /// steps send nothing and leave none).
    pub attempts: Vec<Attempt>,
    /// Whether any attempt's request may have reached the upstream (some
    /// byte was written). A task recovered after a crash with this false
    /// was certainly never sent.
    pub request_sent: bool,
    /// When the whole task must be done, if ever.
    pub deadline: Option<SystemTime>,
}

impl TaskProgress {
    /// A task not tried yet, with an absolute deadline (or none).
    pub fn new(deadline: Option<SystemTime>) -> Self {
        TaskProgress {
            next_attempt: 1,
            attempts: Vec::new(),
            request_sent: false,
            deadline,
        }
    }
}

impl Default for TaskProgress {
    /// [`TaskProgress::new`] without a deadline.
    fn default() -> Self {
        TaskProgress::new(None)
    }
}

/// What to do with a task after a step.
#[derive(Debug)]
#[non_exhaustive]
pub enum Decision {
    /// Finished: deliver this outcome (`raise_error_responses` and the
    /// fallback already applied, the attempts' records attached).
    Done(Result<Response, TaskError>),
    /// Make attempt `progress.next_attempt` not before `not_before` (that is
    /// `delay` from when the step returned).
    Retry {
        /// The earliest wall-clock time of the next step.
        not_before: SystemTime,
        /// The same as a delay.
        delay: Duration,
        /// The attempt just made, for logs.
        last: Result<Response, TaskError>,
    },
    /// Nothing was sent: the upstream is held back until `until`.
    Refused {
        /// What held it back.
        refusal: Refusal,
        /// When to step again.
        until: SystemTime,
        /// The same as a delay.
        retry_in: Duration,
        /// The outcome to deliver instead of waiting (a request error with
        /// the refusal's [`class_name`](Refusal::class_name)).
        error: TaskError,
    },
}

impl AwaitableClient {
    /// The progress of a task accepted at `accepted_at`: not tried yet, its
    /// deadline (the request's `options.deadline`, else its upstream's
    /// policy's) counted from then.
    pub fn progress(&self, task: &Task, accepted_at: SystemTime) -> TaskProgress {
        let engine = &*self.engine;
        let key = match &task.request.request_options().upstream_key {
            Some(key) => std::borrow::Cow::Borrowed(key.as_str()),
            None => crate::resilience::upstream_key_ref(task.request.url()),
        };
        let policy = engine.resilience.policy_for(&key);
        let deadline = task
            .request
            .request_options()
            .deadline
            .or(policy.deadline())
            .and_then(|d| accepted_at.checked_add(d));
        TaskProgress::new(deadline)
    }

    /// Makes the next attempt of `task` now (or its group of hedged
    /// attempts), updates `progress`, and says what comes next. `wait` bounds
    /// how long the step may wait for the upstream's limits.
    ///
    /// A panic in engine code ends the task ([`Decision::Done`] with a
    /// request error of class `Panic`).
    pub async fn step(
        &self,
        task: &Task,
        progress: &mut TaskProgress,
        wait: LimitWait,
    ) -> Decision {
        let engine = &*self.engine;
        let started = Instant::now();
        let run = async {
            let plan = match engine.plan(task) {
                Ok(plan) => plan,
                Err(error) => {
                    engine.notify(|o| o.on_request_error(&error));
                    return Decision::Done(Err(error));
                }
            };
            let mut inner = Progress::resume(
                progress.next_attempt,
                std::mem::take(&mut progress.attempts),
                progress.request_sent,
                progress.deadline.map(instant_of),
            );
            let step = engine.step(task, &plan, &mut inner, wait).await;
            progress.next_attempt = inner.next;
            progress.request_sent = inner.sent;
            progress.attempts = inner.records();
            match step {
                Step::Done(result) => Decision::Done(result),
                Step::Retry { delay, last } => Decision::Retry {
                    not_before: after_now(delay),
                    delay,
                    last,
                },
                Step::Refused {
                    refusal,
                    retry_in,
                    error,
                    ..
                } => Decision::Refused {
                    refusal,
                    until: after_now(retry_in),
                    retry_in,
                    error,
                },
            }
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(decision) => decision,
            Err(payload) => {
                let error = engine.panic_error(task, started, &*payload);
                engine.notify(|o| o.on_request_error(&error));
                Decision::Done(Err(error))
            }
        }
    }
}

/// The monotonic instant of a wall-clock time (now, when it has passed).
fn instant_of(at: SystemTime) -> Instant {
    let now = Instant::now();
    match at.duration_since(SystemTime::now()) {
        Ok(ahead) => crate::time::saturating_after(now, ahead),
        Err(_) => now,
    }
}

fn after_now(d: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_add(d).unwrap_or(now)
}
