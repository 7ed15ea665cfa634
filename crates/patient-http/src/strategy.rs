//! The attempts of a task: which to make and when. Strategy (single,
//! sequential, hedged), retries with backoff and `Retry-After`, the retry
//! budget, the deadline and its split, the circuit breaker, rate and
//! concurrency limits, fallbacks, metrics.
//!
//! The unit of work is a *step*: one attempt (or one group of hedged
//! attempts) made now, ending in a decision: done, retry after a delay, or
//! refused (breaker open, limit busy) for a while. The processor, the inline
//! executor and the awaitable client loop over steps in memory
//! ([`Engine::execute`]); a durable queue stores the decision between steps
//! (`decision.rs`). One attempt itself is `attempt.rs`.

use std::{
    borrow::Cow,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{stream::FuturesUnordered, FutureExt, StreamExt};
use http::HeaderMap;
use patient_wire::{
    Attempt, DeadlineMode, ErrorType, Headers, HttpError, Priority, Response, Strategy, TaskError,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    attempt::{attempt_span, record_attempt_end, AttemptPlan, AttemptResult},
    breaker::BreakerPermit,
    engine::Engine,
    exchange::{Exchange, ExchangeOptions, RawParts},
    limit::{LimitBusy, LimitPermit},
    metrics::EndpointMetrics,
    propagation::Admission,
    resilience::{upstream_key_ref, Fallback, HedgeDelay, UpstreamPolicy},
    retry::{AttemptOutcome, RetryDelay, RetryPolicy},
    time::checked_after,
    upstream::UpstreamState,
    Task,
};

/// What a task runs with, resolved once from the three levels of settings.
pub(crate) struct Plan<'a> {
    pub(crate) key: Cow<'a, str>,
    pub(crate) upstream: Arc<UpstreamState>,
    /// The metric handles of the task's endpoint.
    endpoint: Arc<EndpointMetrics>,
    /// Delays before each hedged attempt (hedged strategy only).
    hedge_delays: Vec<Duration>,
    pub(crate) policy: &'a UpstreamPolicy,
    retry: Cow<'a, RetryPolicy>,
    strategy: Strategy,
    max_attempts: u32,
    mode: DeadlineMode,
    started: Instant,
    timeout: Duration,
    /// The priority sent upstream: the request's own, else (once admitted)
    /// the one inherited from the request being served.
    priority: Option<Priority>,
    /// How the response is read when the task runs as an exchange.
    pub(crate) exchange: Option<ExchangeOptions>,
    /// Header fields an exchange sends as they are, before the task's own.
    pub(crate) raw_headers: Option<&'a http::HeaderMap>,
    /// Whether the request carries an idempotency key (its own, or a field
    /// among `raw_headers`): a POST may then be retried.
    idempotency_key: bool,
}

/// Where a task stands between steps.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// The number of the next attempt; 1 before the first.
    pub(crate) next: u32,
    /// The first attempt's record, kept aside so that a task of one attempt
    /// allocates no list.
    first: Option<Attempt>,
    /// Every attempt's record once there are two.
    attempts: Vec<Attempt>,
    /// Whether any attempt's request may have reached the upstream.
    pub(crate) sent: bool,
    /// The task's deadline.
    pub(crate) deadline: Option<Instant>,
    /// For an exchange: the raw head (and unread body) of the attempt whose
    /// result is the outcome.
    pub(crate) raw: Option<RawParts>,
}

impl Progress {
    pub(crate) fn new(deadline: Option<Instant>) -> Self {
        Progress {
            next: 1,
            deadline,
            ..Progress::default()
        }
    }

    /// Progress carried over from earlier steps.
    pub(crate) fn resume(
        next: u32,
        mut attempts: Vec<Attempt>,
        sent: bool,
        deadline: Option<Instant>,
    ) -> Self {
        let first = (attempts.len() == 1).then(|| attempts.remove(0));
        Progress {
            next: next.max(1),
            first,
            attempts,
            sent,
            deadline,
            raw: None,
        }
    }

    fn push(&mut self, attempt: Attempt) {
        if self.first.is_none() && self.attempts.is_empty() {
            self.first = Some(attempt);
        } else {
            if let Some(first) = self.first.take() {
                self.attempts.push(first);
            }
            self.attempts.push(attempt);
        }
    }

    /// Every attempt's record, oldest first.
    pub(crate) fn records(&self) -> Vec<Attempt> {
        match &self.first {
            Some(first) => vec![first.clone()],
            None => self.attempts.clone(),
        }
    }

    /// The records an outcome carries: none for a single plain attempt.
    fn for_outcome(&self) -> Vec<Attempt> {
        match &self.first {
            Some(first) if first.hedged => vec![first.clone()],
            Some(_) => Vec::new(),
            None => self.attempts.clone(),
        }
    }
}

/// How long a step may wait for the upstream's rate and concurrency limits
/// (and a 429 cool-down) before it gives up with [`Decision::Refused`](crate::Decision::Refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitWait {
    /// As long as it takes, within the task's deadline (what the in-memory
    /// faces do).
    Wait,
    /// At most this long (zero: not at all); a longer wait is a refusal with
    /// its estimate of when to come back.
    UpTo(Duration),
}

/// Why a step sent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The upstream's circuit breaker is open (or half-open with its probes
    /// out).
    CircuitOpen,
    /// A 429 with `Retry-After` cooled the upstream down.
    CoolingDown,
    /// The upstream's rate limit has no token free.
    RateLimited,
    /// The upstream has its maximum of requests in flight.
    AtCapacity,
}

impl Refusal {
    /// The `class_name` of the request error a refusal becomes.
    pub fn class_name(self) -> &'static str {
        match self {
            Refusal::CircuitOpen => "CircuitOpen",
            Refusal::CoolingDown => "CoolingDown",
            Refusal::RateLimited => "RateLimited",
            Refusal::AtCapacity => "AtCapacity",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Refusal::CircuitOpen => "the circuit breaker is open",
            Refusal::CoolingDown => "a 429 cool-down holds back the upstream",
            Refusal::RateLimited => "the rate limit has no token free",
            Refusal::AtCapacity => "the concurrency limit is reached",
        }
    }
}

/// How a step ended.
pub(crate) enum Step {
    /// The task's outcome (raise_error_responses and fallback applied).
    Done(Result<Response, TaskError>),
    /// Make attempt `progress.next` after `delay`; `last` is the attempt
    /// just made.
    Retry {
        delay: Duration,
        last: Result<Response, TaskError>,
    },
    /// Nothing was sent: `refusal` holds the upstream back for `retry_in`.
    /// `error` is the outcome if the caller does not wait, `attempt` the
    /// refused attempt's record.
    Refused {
        refusal: Refusal,
        retry_in: Duration,
        error: TaskError,
        attempt: Attempt,
    },
}

/// One guarded attempt: made, or refused before sending by the breaker or
/// a limit.
enum Guarded {
    Ran(AttemptResult),
    Refused {
        refusal: Refusal,
        retry_in: Duration,
        error: TaskError,
    },
}

/// A task run to its outcome in memory: the outcome, and for an exchange
/// the raw parts of the attempt it came from.
struct Ran {
    result: Result<Response, TaskError>,
    raw: Option<RawParts>,
    attempts: u32,
}

/// How long to come back after a concurrency limit refused, when no better
/// estimate exists.
const AT_CAPACITY_RETRY: Duration = Duration::from_millis(100);

impl Engine {
    /// Runs a task to its outcome: a response, or a wire-format error.
    /// `admitted` is when the task was accepted (a deadline counts from it)
    /// and the context it inherits.
    /// A panic in engine code (an interceptor, preprocessor, computed
    /// secret, retry predicate) ends the task in a request error of class
    /// `Panic`; it is never handed back for a retry.
    pub(crate) async fn execute(
        &self,
        task: &Task,
        admitted: Admission,
    ) -> Result<Response, TaskError> {
        self.run_guarded(task, admitted, None, None).await.result
    }

    /// Runs a task as [`execute`](Self::execute) does, handing back the
    /// final response's raw head and its body as `options` say.
    /// `headers`, when given, go before the task's own header fields, as
    /// they are (repeated fields apart, values that are not UTF-8 kept).
    pub(crate) async fn exchange(
        &self,
        task: &Task,
        headers: Option<&http::HeaderMap>,
        admitted: Admission,
        options: ExchangeOptions,
    ) -> Result<Exchange, TaskError> {
        let Ran {
            result,
            raw,
            attempts,
        } = self
            .run_guarded(task, admitted, Some(options), headers)
            .await;
        Ok(Exchange::of(result?, raw, attempts))
    }

    /// Runs a task to its outcome under the panic guard.
    async fn run_guarded(
        &self,
        task: &Task,
        admitted: Admission,
        exchange: Option<ExchangeOptions>,
        raw_headers: Option<&http::HeaderMap>,
    ) -> Ran {
        let started = Instant::now();
        match AssertUnwindSafe(self.run_to_outcome(task, admitted, exchange, raw_headers))
            .catch_unwind()
            .await
        {
            Ok(ran) => ran,
            Err(payload) => {
                let error = self.panic_error(task, started, &*payload);
                self.notify(|o| o.on_request_error(&error));
                Ran {
                    result: Err(error),
                    raw: None,
                    attempts: 0,
                }
            }
        }
    }

    async fn run_to_outcome(
        &self,
        task: &Task,
        admitted: Admission,
        exchange: Option<ExchangeOptions>,
        raw_headers: Option<&http::HeaderMap>,
    ) -> Ran {
        let mut plan = match self.plan_with(task, raw_headers) {
            Ok(plan) => plan,
            Err(error) => {
                self.notify(|o| o.on_request_error(&error));
                return Ran {
                    result: Err(error),
                    raw: None,
                    attempts: 0,
                };
            }
        };
        plan.exchange = exchange;
        let mut progress = Progress::new(self.admit(task, &mut plan, admitted));
        let result = loop {
            let wait = exchange.map_or(LimitWait::Wait, |o| o.limit_wait);
            match self.step(task, &plan, &mut progress, wait).await {
                Step::Done(result) => break result,
                Step::Retry { delay, .. } => {
                    self.notify(|o| o.on_retry(&task.id, progress.next, delay));
                    tokio::time::sleep(delay).await;
                }
                Step::Refused { error, attempt, .. } => {
                    // In memory, a refusal fails fast (the fallback may answer).
                    progress.push(attempt);
                    progress.raw = None;
                    break self.finish(task, &plan, &progress, Err(error));
                }
            }
        };
        Ran {
            result,
            raw: progress.raw.take(),
            attempts: progress.next.saturating_sub(1),
        }
    }

    /// Applies what a task was submitted with to its plan, and returns its
    /// deadline: its own (the request's, else its upstream policy's,
    /// counted from submission; past what the clock can hold, none) capped
    /// by the one inherited from the request being served, and the
    /// inherited priority where the request sets none. The one place a
    /// task inherits the served request's context; see
    /// [`propagation`](crate::propagation#inherited-deadlines).
    fn admit(&self, task: &Task, plan: &mut Plan<'_>, admitted: Admission) -> Option<Instant> {
        plan.priority = admitted.priority(plan.priority);
        let own = task
            .request
            .request_options()
            .deadline
            .or(plan.policy.deadline());
        admitted.deadline(own)
    }

    /// Resolves what a task runs with, or the error when its options are
    /// invalid.
    pub(crate) fn plan<'a>(&'a self, task: &'a Task) -> Result<Plan<'a>, TaskError> {
        self.plan_with(task, None)
    }

    /// The plan of a task whose exchange sends `raw_headers` before its
    /// own fields.
    fn plan_with<'a>(
        &'a self,
        task: &'a Task,
        raw_headers: Option<&'a http::HeaderMap>,
    ) -> Result<Plan<'a>, TaskError> {
        let request = &task.request;
        let idempotency_key = request.has_idempotency_key()
            || raw_headers.is_some_and(crate::exchange::has_idempotency_key);
        let options = request.request_options();
        let key = match &options.upstream_key {
            Some(key) => Cow::Borrowed(key.as_str()),
            None => upstream_key_ref(request.url()),
        };
        let policy = self.resilience.policy_for(&key);
        // The default policy retries idempotent methods only, unless the
        // request carries an idempotency key or opts in.
        let base = policy.retry().unwrap_or(&self.default_retry);
        let retry = match &options.retry {
            None => Cow::Borrowed(base),
            Some(overrides) => Cow::Owned(base.with_overrides(overrides).map_err(|e| {
                self.task_error(
                    task,
                    Instant::now(),
                    ErrorType::Unknown,
                    "InvalidRetryOptions",
                    format!("options.retry: {e}"),
                )
            })?),
        };
        let strategy = options
            .strategy
            .or(policy.strategy())
            .unwrap_or(Strategy::Sequential);
        let upstream = self
            .upstreams
            .resolve(&key, policy, &self.metrics, &self.observers);
        let may_retry = retry.allows_method(request.method(), idempotency_key);
        let hedge_delays = if strategy == Strategy::Hedged && may_retry {
            hedge_delays(task, policy, &upstream)
        } else {
            Vec::new()
        };
        let max_attempts = match strategy {
            Strategy::Single => 1,
            _ if !may_retry => 1,
            Strategy::Sequential => retry.max_attempts(),
            Strategy::Hedged => 1 + hedge_delays.len() as u32,
        };
        let endpoint = upstream
            .metrics
            .endpoint(request.method().as_str(), request.url().path());
        Ok(Plan {
            hedge_delays,
            endpoint,
            upstream,
            policy,
            retry,
            strategy: if max_attempts == 1 {
                Strategy::Single
            } else {
                strategy
            },
            max_attempts,
            mode: options.deadline_mode.unwrap_or(policy.deadline_mode()),
            started: Instant::now(),
            timeout: request
                .timeout()
                .unwrap_or(self.config.client.request_timeout()),
            priority: options.priority,
            key,
            exchange: None,
            raw_headers,
            idempotency_key,
        })
    }

    /// Makes the next attempt of a task (or its group of hedged attempts)
    /// and decides what follows.
    pub(crate) async fn step(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        progress: &mut Progress,
        wait: LimitWait,
    ) -> Step {
        if progress.next <= 1 {
            if let Some(budget) = self.resilience.retry_budget() {
                budget.deposit();
            }
        }
        if plan.strategy == Strategy::Hedged {
            return self.hedge_group(task, plan, progress, wait).await;
        }
        let number = progress.next;
        let (guarded, attempt) = self
            .guarded_attempt(task, plan, progress.deadline, number, false, wait)
            .await;
        let mut result = match guarded {
            Guarded::Ran(result) => result,
            Guarded::Refused {
                refusal,
                retry_in,
                error,
            } => {
                return Step::Refused {
                    refusal,
                    retry_in,
                    error,
                    attempt,
                }
            }
        };
        if plan.exchange.is_some() {
            // The headers stay for the retry decision below; a retry drops
            // the body (closing its connection).
            progress.raw = Some(RawParts {
                headers: result.headers.clone(),
                stream: result.stream.take(),
                permit: result.permit.take(),
            });
        }
        progress.push(attempt);
        progress.next = number.saturating_add(1);
        progress.sent |= result.sent;
        if number >= plan.max_attempts {
            return Step::Done(self.finish(task, plan, progress, result.result));
        }
        let decision = match outcome_of(&result) {
            None => RetryDelay::GiveUp,
            Some(outcome) => plan.retry.decide(
                number,
                task.request.method(),
                plan.idempotency_key,
                &outcome,
                SystemTime::now(),
                &mut fastrand::Rng::new(),
            ),
        };
        let delay = match decision {
            RetryDelay::GiveUp => {
                return Step::Done(self.finish(task, plan, progress, result.result))
            }
            RetryDelay::After(delay) => delay,
        };
        if let Some(deadline) = progress.deadline {
            let next_possible = delay
                .checked_add(plan.policy.min_attempt_time())
                .and_then(|d| checked_after(Instant::now(), d));
            if next_possible.is_none_or(|at| at > deadline) {
                return Step::Done(self.finish(task, plan, progress, result.result));
            }
        }
        if let Some(budget) = self.resilience.retry_budget() {
            if !budget.withdraw() {
                tracing::debug!(task_id = %task.id, upstream = %plan.key, "retry budget exhausted");
                return Step::Done(self.finish(task, plan, progress, result.result));
            }
        }
        Step::Retry {
            delay,
            last: result.result,
        }
    }

    /// The outcome of a finished task: the attempts' records attached,
    /// `raise_error_responses` and the fallback applied, observers told of
    /// an error.
    pub(crate) fn finish(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        progress: &Progress,
        result: Result<Response, TaskError>,
    ) -> Result<Response, TaskError> {
        let attempts = progress.for_outcome();
        let raise = task
            .raise_error_responses
            .unwrap_or(self.config.raise_error_responses);
        let result = match result {
            Ok(mut response) => {
                response.attempts = attempts;
                if raise && !response.is_success() {
                    Err(TaskError::Http(HttpError { response }))
                } else {
                    Ok(response)
                }
            }
            Err(mut error) => {
                if let TaskError::Request(e) = &mut error {
                    e.attempts = attempts;
                }
                Err(error)
            }
        };
        let result = match result {
            Err(error) => self.fallback(task, plan.policy, error),
            // Attempts exhausted on a failing status: the fallback answers too.
            Ok(response)
                if plan.policy.fallback().is_some()
                    && plan
                        .policy
                        .breaker_failure_statuses()
                        .contains(&response.status) =>
            {
                self.fallback(task, plan.policy, TaskError::Http(HttpError { response }))
                    .or_else(|error| match error {
                        TaskError::Http(HttpError { response }) if !raise => Ok(response),
                        other => Err(other),
                    })
            }
            ok => ok,
        };
        if let Err(error) = &result {
            self.notify(|o| o.on_request_error(error));
        }
        result
    }

    /// The attempt plan for attempt `number`, or the error when the deadline
    /// leaves too little time to send anything.
    fn attempt_plan<'p>(
        &self,
        task: &Task,
        plan: &'p Plan<'_>,
        deadline: Option<Instant>,
        number: u32,
    ) -> Result<AttemptPlan<'p>, TaskError> {
        let mut timeout = plan.timeout;
        if let Some(deadline) = deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < plan.policy.min_attempt_time() {
                return Err(self.task_error(
                    task,
                    plan.started,
                    ErrorType::Timeout,
                    "DeadlineExceeded",
                    format!(
                        "the task's deadline leaves {:.3}s, less than the {:.3}s an attempt needs; nothing was sent",
                        remaining.as_secs_f64(),
                        plan.policy.min_attempt_time().as_secs_f64()
                    ),
                ));
            }
            let share = match plan.mode {
                DeadlineMode::PassThrough => remaining,
                DeadlineMode::Split => {
                    let left = plan
                        .max_attempts
                        .saturating_sub(number.saturating_sub(1))
                        .max(1);
                    if plan.strategy == Strategy::Hedged {
                        remaining
                    } else {
                        remaining / left
                    }
                }
            };
            timeout = timeout.min(share.max(plan.policy.min_attempt_time()));
        }
        let propagate = plan.policy.propagate() && (deadline.is_some() || plan.priority.is_some());
        Ok(AttemptPlan {
            number,
            timeout,
            deadline,
            propagate_priority: propagate.then(|| plan.priority.unwrap_or_default()),
            upstream: &plan.key,
            metrics: &plan.endpoint,
            started: plan.started,
            exchange: plan.exchange,
            raw_headers: plan.raw_headers,
        })
    }

    /// Waits for (or tries) the upstream's limits as `wait` says.
    async fn limit_permit(
        &self,
        upstream: &UpstreamState,
        deadline: Option<Instant>,
        wait: LimitWait,
    ) -> Result<Option<LimitPermit>, LimitRefusal> {
        if !upstream.is_limited() {
            return Ok(None);
        }
        let limits = &upstream.limits;
        match wait {
            LimitWait::Wait => {
                let acquire = limits.acquire();
                match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                        .await
                        .map(Some)
                        .map_err(|_| LimitRefusal::Deadline),
                    None => Ok(Some(acquire.await)),
                }
            }
            LimitWait::UpTo(max) => {
                let busy = match limits.try_acquire() {
                    Ok(permit) => return Ok(Some(permit)),
                    Err(busy) => busy,
                };
                let max = match deadline {
                    Some(deadline) => max.min(deadline.saturating_duration_since(Instant::now())),
                    None => max,
                };
                if busy.retry_in().is_some_and(|r| r > max) || max.is_zero() {
                    return Err(LimitRefusal::Busy(busy));
                }
                match tokio::time::timeout(max, limits.acquire()).await {
                    Ok(permit) => Ok(Some(permit)),
                    Err(_) => Err(LimitRefusal::Busy(
                        limits.try_acquire().err().unwrap_or(busy),
                    )),
                }
            }
        }
    }

    /// One attempt with the limits and the breaker around it, in its span
    /// `attempt` (see `attempt.rs`).
    async fn guarded_attempt(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        deadline: Option<Instant>,
        number: u32,
        hedged: bool,
        wait: LimitWait,
    ) -> (Guarded, Attempt) {
        let span = attempt_span(task, number, hedged);
        let (guarded, attempt) = self
            .limited_attempt(task, plan, deadline, number, hedged, wait)
            .instrument(span.clone())
            .await;
        match &guarded {
            Guarded::Ran(result) => record_attempt_end(&span, result.result.as_ref()),
            Guarded::Refused { error, .. } => record_attempt_end(&span, Err(error)),
        }
        (guarded, attempt)
    }

    /// One attempt with the limits and the breaker around it.
    async fn limited_attempt(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        deadline: Option<Instant>,
        number: u32,
        hedged: bool,
        wait: LimitWait,
    ) -> (Guarded, Attempt) {
        let began = Instant::now();
        let record =
            |result: &Result<Response, TaskError>| attempt_record(number, hedged, began, result);
        let unsent = |result: AttemptResult| {
            let attempt = record(&result.result);
            (Guarded::Ran(result), attempt)
        };
        let attempt_plan = match self.attempt_plan(task, plan, deadline, number) {
            Ok(p) => p,
            Err(e) => return unsent(AttemptResult::unsent(e)),
        };
        let upstream = &*plan.upstream;
        let limit_permit = match self.limit_permit(upstream, deadline, wait).await {
            Ok(permit) => permit,
            Err(LimitRefusal::Deadline) => {
                return unsent(AttemptResult::unsent(self.task_error(
                    task,
                    plan.started,
                    ErrorType::Timeout,
                    "DeadlineExceeded",
                    format!(
                        "the task's deadline passed while waiting for the rate limit of {}",
                        plan.key
                    ),
                )))
            }
            Err(LimitRefusal::Busy(busy)) => {
                let (refusal, retry_in) = match busy {
                    LimitBusy::CoolingDown { retry_in } => (Refusal::CoolingDown, retry_in),
                    LimitBusy::RateLimited { retry_in } => (Refusal::RateLimited, retry_in),
                    LimitBusy::AtCapacity => (Refusal::AtCapacity, AT_CAPACITY_RETRY),
                };
                let error = self.task_error(
                    task,
                    plan.started,
                    ErrorType::Connection,
                    refusal.class_name(),
                    format!(
                        "{} of {}; nothing was sent (retry in {:.3}s)",
                        refusal.describe(),
                        plan.key,
                        retry_in.as_secs_f64()
                    ),
                );
                let attempt = record(&Err(error.clone()));
                return (
                    Guarded::Refused {
                        refusal,
                        retry_in,
                        error,
                    },
                    attempt,
                );
            }
        };
        let waited = limit_permit.as_ref().map_or(Duration::ZERO, |p| p.waited());
        if !waited.is_zero() {
            upstream.metrics.record_rate_limit_wait(waited);
        }
        // The breaker is asked after the limits: a permit (a half-open probe
        // above all) is never held while waiting for a token.
        let permit: Option<BreakerPermit> = match &upstream.breaker {
            None => None,
            Some(breaker) => match breaker.try_acquire() {
                Ok(permit) => Some(permit),
                Err(open) => {
                    let error = self.task_error(
                        task,
                        plan.started,
                        ErrorType::Connection,
                        Refusal::CircuitOpen.class_name(),
                        format!(
                            "the circuit breaker of {} is open; nothing was sent (retry in {:.3}s)",
                            plan.key,
                            open.retry_in.as_secs_f64()
                        ),
                    );
                    let attempt = record(&Err(error.clone()));
                    return (
                        Guarded::Refused {
                            refusal: Refusal::CircuitOpen,
                            retry_in: open.retry_in,
                            error,
                        },
                        attempt,
                    );
                }
            },
        };
        upstream.metrics.record_attempt();
        if number > 1 && !hedged {
            // Counted here, when it is really sent (not refused by the breaker).
            upstream.metrics.record_retry();
        }
        let mut result = self.run_attempt(task, &attempt_plan).await;
        if result.stream.is_some() {
            // A streamed body holds the concurrency slot until it ends.
            result.permit = limit_permit;
        } else {
            drop(limit_permit);
        }
        let verdict = breaker_verdict(&result, plan.policy);
        upstream.recent.record(began, verdict == Some(false));
        if let Some(permit) = permit {
            match verdict {
                Some(true) => permit.success(),
                Some(false) => permit.failure(),
                None => drop(permit),
            }
        }
        if let (Ok(response), Some(headers)) = (&result.result, &result.headers) {
            if response.status == 429 {
                if let Some(wait) = crate::retry::retry_after(headers, SystemTime::now()) {
                    upstream.cool_down(wait);
                }
            } else if response.status < 500 {
                if let Some(window) = &upstream.latencies {
                    lock(window).record(began.elapsed());
                }
            }
        }
        let attempt = record(&result.result);
        (Guarded::Ran(result), attempt)
    }

    /// The attempts of a hedged task: the first now, each hedge after its
    /// delay while no acceptable result came, the first acceptable result
    /// winning. A hedge the breaker, a limit or the deadline refuses does
    /// not start (and ends the hedging); it never wins over an attempt in
    /// flight.
    async fn hedge_group(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        progress: &mut Progress,
        wait: LimitWait,
    ) -> Step {
        let delays = &plan.hedge_delays;
        let deadline = progress.deadline;
        let mut records: Vec<Attempt> = Vec::new();
        let mut running = FuturesUnordered::new();
        let attempt_future = |number: u32, hedged: bool| async move {
            let (guarded, attempt) = self
                .guarded_attempt(task, plan, deadline, number, hedged, wait)
                .await;
            (number, guarded, attempt)
        };
        let mut launched: Vec<(u32, Instant)> = vec![(1, Instant::now())];
        running.push(attempt_future(1, false));
        let mut started = 1usize;
        let mut next_at = delays
            .first()
            .and_then(|d| checked_after(Instant::now(), *d));
        let mut last: Option<Result<Response, TaskError>> = None;
        let mut sent = false;
        let mut winner: Option<Result<Response, TaskError>> = None;
        loop {
            tokio::select! {
                finished = running.next(), if !running.is_empty() => {
                    let Some((number, guarded, attempt)) = finished else { continue };
                    let result = match guarded {
                        Guarded::Refused { refusal, retry_in, error } => {
                            if number == 1 && running.is_empty() && last.is_none() {
                                return Step::Refused { refusal, retry_in, error, attempt };
                            }
                            // Refused before sending: it never started.
                            launched.retain(|(n, _)| *n != number);
                            next_at = None;
                            if running.is_empty() {
                                break;
                            }
                            continue;
                        }
                        Guarded::Ran(result) if result.refused && number > 1 => {
                            launched.retain(|(n, _)| *n != number);
                            next_at = None;
                            if running.is_empty() {
                                break;
                            }
                            continue;
                        }
                        Guarded::Ran(result) => result,
                    };
                    sent |= result.sent;
                    records.push(attempt);
                    let acceptable = match outcome_of(&result) {
                        None => true,
                        Some(outcome) => !plan.retry.should_retry(&outcome),
                    };
                    if acceptable {
                        let mut result = result;
                        if plan.exchange.is_some() {
                            progress.raw = Some(result.take_raw());
                        }
                        winner = Some(result.result);
                        break;
                    }
                    last = Some(result.result);
                    if running.is_empty() {
                        if started <= delays.len() && next_at.is_some() {
                            // Failed before the next hedge was due: start it now.
                            next_at = Some(Instant::now());
                        } else {
                            break;
                        }
                    }
                }
                _ = sleep_until_opt(next_at), if next_at.is_some() => {
                    let allowed = self
                        .resilience
                        .retry_budget()
                        .is_none_or(|b| b.withdraw());
                    if allowed {
                        started += 1;
                        let number = started as u32;
                        launched.push((number, Instant::now()));
                        plan.upstream.metrics.record_hedge();
                        running.push(attempt_future(number, true));
                        next_at = delays
                            .get(started - 1)
                            .and_then(|d| checked_after(Instant::now(), *d));
                    } else {
                        next_at = None;
                        if running.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
        // The others are cancelled by dropping them: their connections are
        // closed, never reused.
        drop(running);
        if winner.is_some() {
            for (number, began) in launched.iter().copied() {
                if !records.iter().any(|a| a.number == number) {
                    records.push(Attempt {
                        number,
                        status: None,
                        error_type: None,
                        error_class: Some("Cancelled".to_owned()),
                        duration: began.elapsed(),
                        hedged: number > 1,
                    });
                }
            }
        }
        records.sort_by_key(|a| a.number);
        progress.next = progress.next.saturating_add(started as u32);
        progress.sent |= sent;
        for record in records {
            progress.push(record);
        }
        let result = match winner.or(last) {
            Some(result) => result,
            None => Err(self.task_error(
                task,
                plan.started,
                ErrorType::Unknown,
                "NoAttempt",
                "no attempt could be made".to_owned(),
            )),
        };
        Step::Done(self.finish(task, plan, progress, result))
    }

    /// Applies the upstream's fallback to a failed task.
    fn fallback(
        &self,
        task: &Task,
        policy: &UpstreamPolicy,
        error: TaskError,
    ) -> Result<Response, TaskError> {
        let Some(fallback) = policy.fallback() else {
            return Err(error);
        };
        let response = match fallback {
            Fallback::Response {
                status,
                headers,
                body,
            } => {
                let mut h = Headers::new();
                for (name, value) in headers {
                    h.insert(name.to_ascii_lowercase(), value.clone());
                }
                Some(Response {
                    status: *status,
                    headers: h,
                    body: (!body.is_empty()).then(|| body.clone()),
                    duration: error.duration(),
                    request_id: task.id.clone(),
                    url: task.request.url().to_string(),
                    method: task.request.method(),
                    callback_args: task.callback_args.clone(),
                    redirects: Vec::new(),
                    attempts: Vec::new(),
                })
            }
            Fallback::Hook(hook) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(task, &error)))
                {
                    Ok(r) => r,
                    Err(_) => {
                        self.count_panic();
                        tracing::error!(task_id = %task.id, "a fallback hook panicked; the error stands");
                        None
                    }
                }
            }
        };
        match response {
            Some(mut response) => {
                response.headers.insert("x-patient-fallback", "true");
                Ok(response)
            }
            None => Err(error),
        }
    }
}

/// Why the limits gave no permit.
enum LimitRefusal {
    /// The task's deadline passed while waiting.
    Deadline,
    /// Busy, and the caller would not wait that long.
    Busy(LimitBusy),
}

/// The delays before each hedged attempt.
fn hedge_delays(task: &Task, policy: &UpstreamPolicy, upstream: &UpstreamState) -> Vec<Duration> {
    let own = &task.request.request_options().hedge_delays;
    if !own.is_empty() {
        return own.clone();
    }
    match policy.hedge_delays() {
        HedgeDelay::Fixed(delays) => delays.clone(),
        HedgeDelay::Adaptive {
            percentile,
            min,
            max,
            max_hedges,
        } => {
            let observed = upstream
                .latencies
                .as_ref()
                .and_then(|w| lock(w).percentile(*percentile));
            let delay = observed.map_or(*max, |d| d.clamp(*min, *max));
            vec![delay; *max_hedges as usize]
        }
    }
}

/// The record of attempt `number` that ended with `result`.
fn attempt_record(
    number: u32,
    hedged: bool,
    began: Instant,
    result: &Result<Response, TaskError>,
) -> Attempt {
    let (status, error_type, error_class) = match result {
        Ok(r) => (Some(r.status), None, None),
        Err(TaskError::Request(e)) => (None, Some(e.error_type), Some(e.class_name.clone())),
        Err(TaskError::Http(h)) => (Some(h.response.status), None, None),
        Err(TaskError::Redirect(e)) => (None, None, Some(e.kind.class_name().to_owned())),
    };
    Attempt {
        number,
        status,
        error_type,
        error_class,
        duration: began.elapsed(),
        hedged,
    }
}

/// Whether the breaker should count an attempt as a success (`Some(true)`),
/// a failure (`Some(false)`) or neither.
fn breaker_verdict(result: &AttemptResult, policy: &UpstreamPolicy) -> Option<bool> {
    match &result.result {
        Ok(r) => Some(!policy.breaker_failure_statuses().contains(&r.status)),
        Err(TaskError::Request(e)) => match e.error_type {
            ErrorType::Timeout | ErrorType::Connection | ErrorType::Ssl => Some(false),
            _ => None,
        },
        Err(_) => None,
    }
}

/// How the retry policy sees an attempt; `None` when it is never retried
/// (a redirect error, or a refusal before sending).
fn outcome_of(result: &AttemptResult) -> Option<AttemptOutcome<'_>> {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    match &result.result {
        Ok(r) => Some(AttemptOutcome::Response {
            status: r.status,
            headers: result
                .headers
                .as_ref()
                .unwrap_or_else(|| EMPTY.get_or_init(HeaderMap::new)),
        }),
        Err(TaskError::Request(_)) if result.refused => None,
        Err(TaskError::Request(e)) => Some(AttemptOutcome::Error {
            kind: e.error_type,
            class_name: &e.class_name,
        }),
        Err(_) => None,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
