//! The attempts of a task: strategy (single, sequential, hedged), retries
//! with backoff and `Retry-After`, the retry budget, the deadline and its
//! split, the circuit breaker, rate and concurrency limits, fallbacks,
//! metrics. One attempt itself is `Engine::run_attempt`.

use std::{
    borrow::Cow,
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{stream::FuturesUnordered, StreamExt};
use http::HeaderMap;
use patient_wire::{
    Attempt, DeadlineMode, ErrorType, Headers, HttpError, Response, Strategy, TaskError,
};
use tokio::time::Instant;

use crate::{
    breaker::{BreakerPermit, BreakerState, CircuitBreaker},
    engine::{AttemptPlan, AttemptResult, Engine},
    limit::KeyLimits,
    resilience::{upstream_key_ref, Fallback, HedgeDelay, UpstreamPolicy},
    retry::{AttemptOutcome, RetryDelay, RetryPolicy},
    Task,
};

/// The last latencies of an upstream's successful attempts, for adaptive
/// hedging.
#[derive(Debug, Default)]
pub(crate) struct LatencyWindow {
    samples: VecDeque<Duration>,
}

impl LatencyWindow {
    const CAPACITY: usize = 512;
    const MIN_SAMPLES: usize = 20;

    fn record(&mut self, d: Duration) {
        if self.samples.len() == Self::CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(d);
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.samples.len() < Self::MIN_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted.get(rank.min(sorted.len() - 1)).copied()
    }
}

/// What the task runs with, resolved from the three levels.
struct Plan<'a> {
    key: Cow<'a, str>,
    metrics: Arc<crate::metrics::UpstreamMetrics>,
    /// Delays before each hedged attempt (hedged strategy only).
    hedge_delays: Vec<Duration>,
    policy: &'a UpstreamPolicy,
    retry: Cow<'a, RetryPolicy>,
    strategy: Strategy,
    max_attempts: u32,
    deadline: Option<Instant>,
    mode: DeadlineMode,
    started: Instant,
    timeout: Duration,
}

impl Engine {
    /// Runs a task to its outcome: a response, or a wire-format error.
    /// `queued_at` is when the task was accepted: a deadline counts from it.
    pub(crate) async fn execute(
        &self,
        task: &Task,
        queued_at: Instant,
    ) -> Result<Response, TaskError> {
        let plan = match self.plan(task, queued_at) {
            Ok(plan) => plan,
            Err(error) => {
                self.notify(|o| o.on_request_error(&error));
                return Err(error);
            }
        };
        let (result, mut attempts) = match plan.strategy {
            Strategy::Hedged => self.hedged(task, &plan).await,
            Strategy::Single | Strategy::Sequential => self.sequential(task, &plan).await,
        };
        if attempts.len() == 1 && !attempts[0].hedged {
            attempts.clear();
        }
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
                if plan.policy.fallback.is_some()
                    && plan
                        .policy
                        .breaker_failure_statuses
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

    fn plan<'a>(&'a self, task: &'a Task, queued_at: Instant) -> Result<Plan<'a>, TaskError> {
        let request = &task.request;
        let options = request.request_options();
        let key = match &options.upstream_key {
            Some(key) => Cow::Borrowed(key.as_str()),
            None => upstream_key_ref(request.url()),
        };
        let policy = self.resilience.policy_for(&key);
        // The default policy retries idempotent methods only, unless the
        // request carries an idempotency key or opts in.
        let base = policy.retry.as_ref().unwrap_or(&self.default_retry);
        let retry = match &options.retry {
            None => Cow::Borrowed(base),
            Some(overrides) => Cow::Owned(base.with_overrides(overrides).map_err(|e| {
                self.request_error(
                    task,
                    request.url(),
                    request.method(),
                    Instant::now(),
                    ErrorType::Unknown,
                    "InvalidRetryOptions",
                    format!("options.retry: {e}"),
                )
            })?),
        };
        let strategy = options
            .strategy
            .or(policy.strategy)
            .unwrap_or(Strategy::Sequential);
        let may_retry = retry.allows_method(request.method(), options.idempotency_key.is_some());
        let hedge_delays = if strategy == Strategy::Hedged && may_retry {
            self.hedge_delays(task, policy, &key)
        } else {
            Vec::new()
        };
        let max_attempts = match strategy {
            Strategy::Single => 1,
            _ if !may_retry => 1,
            Strategy::Sequential => retry.max_attempts(),
            Strategy::Hedged => 1 + hedge_delays.len() as u32,
        };
        Ok(Plan {
            hedge_delays,
            metrics: self.metrics.upstream(&key),
            policy,
            retry,
            strategy: if max_attempts == 1 {
                Strategy::Single
            } else {
                strategy
            },
            max_attempts,
            deadline: options.deadline.or(policy.deadline).map(|d| queued_at + d),
            mode: options.deadline_mode.unwrap_or(policy.deadline_mode),
            started: Instant::now(),
            timeout: request
                .timeout()
                .unwrap_or(self.config.client.request_timeout),
            key,
        })
    }

    /// The delays before each hedged attempt.
    fn hedge_delays(&self, task: &Task, policy: &UpstreamPolicy, key: &str) -> Vec<Duration> {
        let own = &task.request.request_options().hedge_delays;
        if !own.is_empty() {
            return own.clone();
        }
        match &policy.hedge {
            HedgeDelay::Fixed(delays) => delays.clone(),
            HedgeDelay::Adaptive {
                percentile,
                min,
                max,
                max_hedges,
            } => {
                let observed = lock(&self.latencies)
                    .get(key)
                    .and_then(|w| w.percentile(*percentile));
                let delay = observed.map_or(*max, |d| d.clamp(*min, *max));
                vec![delay; *max_hedges as usize]
            }
        }
    }

    /// The attempt plan for attempt `number`, or the error when the deadline
    /// leaves too little time to send anything.
    fn attempt_plan<'p>(
        &self,
        task: &Task,
        plan: &'p Plan<'_>,
        number: u32,
    ) -> Result<AttemptPlan<'p>, TaskError> {
        let mut timeout = plan.timeout;
        if let Some(deadline) = plan.deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < plan.policy.min_attempt_time {
                return Err(self.request_error(
                    task,
                    task.request.url(),
                    task.request.method(),
                    plan.started,
                    ErrorType::Timeout,
                    "DeadlineExceeded",
                    format!(
                        "the task's deadline leaves {:.3}s, less than the {:.3}s an attempt needs; nothing was sent",
                        remaining.as_secs_f64(),
                        plan.policy.min_attempt_time.as_secs_f64()
                    ),
                ));
            }
            let share = match plan.mode {
                DeadlineMode::PassThrough => remaining,
                DeadlineMode::Split => {
                    let left = plan.max_attempts.saturating_sub(number - 1).max(1);
                    if plan.strategy == Strategy::Hedged {
                        remaining
                    } else {
                        remaining / left
                    }
                }
            };
            timeout = timeout.min(share.max(plan.policy.min_attempt_time));
        }
        let options = task.request.request_options();
        let propagate =
            plan.policy.propagate && (plan.deadline.is_some() || options.priority.is_some());
        Ok(AttemptPlan {
            number,
            timeout,
            deadline: plan.deadline,
            propagate_priority: propagate.then(|| options.priority.unwrap_or_default()),
            upstream: &plan.key,
            metrics: &plan.metrics,
            started: plan.started,
        })
    }

    fn breaker(&self, key: &str, policy: &UpstreamPolicy) -> Option<Arc<CircuitBreaker>> {
        let breaker_policy = policy.breaker.as_ref()?;
        let mut map = lock(&self.breakers);
        if let Some(b) = map.get(key) {
            return Some(Arc::clone(b));
        }
        let metrics = self.metrics.clone();
        let observers = self.observers.clone();
        let key_owned = key.to_owned();
        let breaker = Arc::new(CircuitBreaker::with_on_transition(
            breaker_policy.clone(),
            move |from, to| {
                metrics.set_breaker_state(&key_owned, breaker_code(to));
                tracing::warn!(upstream = %key_owned, from = from.as_str(), to = to.as_str(), "circuit breaker state changed");
                for o in &observers {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        o.on_breaker_state_change(&key_owned, from, to)
                    }));
                }
            },
        ));
        self.metrics
            .set_breaker_state(key, breaker_code(BreakerState::Closed));
        map.insert(key.to_owned(), Arc::clone(&breaker));
        Some(breaker)
    }

    fn limits(&self, key: &str, policy: &UpstreamPolicy) -> Arc<KeyLimits> {
        let mut map = lock(&self.limits);
        if let Some(limits) = map.get(key) {
            return Arc::clone(limits);
        }
        let limits = Arc::new(KeyLimits::new(&policy.limits));
        map.insert(key.to_owned(), Arc::clone(&limits));
        limits
    }

    /// One attempt with the breaker and the limits around it.
    async fn guarded_attempt(
        &self,
        task: &Task,
        plan: &Plan<'_>,
        number: u32,
        hedged: bool,
    ) -> (AttemptResult, Attempt) {
        let began = Instant::now();
        let record = |result: &Result<Response, TaskError>| -> Attempt {
            let (status, error_type, error_class) = match result {
                Ok(r) => (Some(r.status), None, None),
                Err(TaskError::Request(e)) => {
                    (None, Some(e.error_type), Some(e.class_name.clone()))
                }
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
        };
        // An attempt that ends before anything is sent.
        let refused = |error: TaskError| {
            let result = Err(error);
            let attempt = record(&result);
            (
                AttemptResult {
                    result,
                    headers: None,
                    refused: true,
                },
                attempt,
            )
        };
        let unsent = |error_type: ErrorType, class: &str, message: String| {
            self.request_error(
                task,
                task.request.url(),
                task.request.method(),
                plan.started,
                error_type,
                class,
                message,
            )
        };
        let attempt_plan = match self.attempt_plan(task, plan, number) {
            Ok(p) => p,
            Err(e) => return refused(e),
        };
        let permit: Option<BreakerPermit> = match self.breaker(&plan.key, plan.policy) {
            None => None,
            Some(breaker) => match breaker.try_acquire() {
                Ok(permit) => Some(permit),
                Err(open) => {
                    return refused(unsent(
                        ErrorType::Connection,
                        "CircuitOpen",
                        format!(
                            "the circuit breaker of {} is open; nothing was sent (retry in {:.3}s)",
                            plan.key,
                            open.retry_in.as_secs_f64()
                        ),
                    ))
                }
            },
        };
        // Unlimited upstreams skip the limits until some 429 cooled one down.
        let limited = plan.policy.limits.rate().is_some()
            || plan.policy.limits.max_in_flight().is_some()
            || self.cooled_down.load(std::sync::atomic::Ordering::Relaxed);
        let limits = limited.then(|| self.limits(&plan.key, plan.policy));
        let acquired = match &limits {
            None => Some(None),
            Some(limits) => {
                let acquire = limits.acquire();
                match plan.deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                        .await
                        .ok()
                        .map(Some),
                    None => Some(Some(acquire.await)),
                }
            }
        };
        let Some(limit_permit) = acquired else {
            return refused(unsent(
                ErrorType::Timeout,
                "DeadlineExceeded",
                format!(
                    "the task's deadline passed while waiting for the rate limit of {}",
                    plan.key
                ),
            ));
        };
        let waited = limit_permit.as_ref().map_or(Duration::ZERO, |p| p.waited());
        if !waited.is_zero() {
            self.metrics.record_rate_limit_wait(&plan.key, waited);
        }
        plan.metrics.record_attempt();
        if number > 1 && !hedged {
            // Counted here, when it is really sent (not refused by the breaker).
            plan.metrics.record_retry();
        }
        let result = self.run_attempt(task, &attempt_plan).await;
        if let Some(permit) = permit {
            match breaker_verdict(&result, plan.policy) {
                Some(true) => permit.success(),
                Some(false) => permit.failure(),
                None => drop(permit),
            }
        }
        if let (Ok(response), Some(headers)) = (&result.result, &result.headers) {
            if response.status == 429 {
                if let Some(wait) = crate::retry::retry_after(headers, SystemTime::now()) {
                    self.cooled_down
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.limits(&plan.key, plan.policy).cool_down(wait);
                }
            } else if response.status < 500
                && matches!(plan.policy.hedge, HedgeDelay::Adaptive { .. })
            {
                lock(&self.latencies)
                    .entry(plan.key.to_string())
                    .or_default()
                    .record(began.elapsed());
            }
        }
        let attempt = record(&result.result);
        (result, attempt)
    }

    async fn sequential(
        &self,
        task: &Task,
        plan: &Plan<'_>,
    ) -> (Result<Response, TaskError>, Vec<Attempt>) {
        let mut attempts = Vec::new();
        let mut rng = fastrand::Rng::new();
        let has_key = task.request.request_options().idempotency_key.is_some();
        if let Some(budget) = &self.resilience.retry_budget {
            budget.deposit();
        }
        let mut number = 1;
        // The first attempt's record is kept aside: a task that needs only
        // one attempt allocates no list.
        let mut first: Option<Attempt> = None;
        loop {
            let (result, attempt) = self.guarded_attempt(task, plan, number, false).await;
            if number == 1 {
                first = Some(attempt);
            } else {
                if let Some(first) = first.take() {
                    attempts.push(first);
                }
                attempts.push(attempt);
            }
            if number >= plan.max_attempts {
                return (result.result, attempts);
            }
            let decision = {
                let outcome = outcome_of(&result);
                match outcome {
                    None => RetryDelay::GiveUp,
                    Some(outcome) => plan.retry.decide(
                        number,
                        task.request.method(),
                        has_key,
                        &outcome,
                        SystemTime::now(),
                        &mut rng,
                    ),
                }
            };
            let delay = match decision {
                RetryDelay::GiveUp => return (result.result, attempts),
                RetryDelay::After(delay) => delay,
            };
            if let Some(deadline) = plan.deadline {
                let after = Instant::now() + delay + plan.policy.min_attempt_time;
                if after > deadline {
                    return (result.result, attempts);
                }
            }
            if let Some(budget) = &self.resilience.retry_budget {
                if !budget.withdraw() {
                    tracing::debug!(task_id = %task.id, upstream = %plan.key, "retry budget exhausted");
                    return (result.result, attempts);
                }
            }
            self.notify(|o| o.on_retry(&task.id, number + 1, delay));
            tokio::time::sleep(delay).await;
            number += 1;
        }
    }

    async fn hedged(
        &self,
        task: &Task,
        plan: &Plan<'_>,
    ) -> (Result<Response, TaskError>, Vec<Attempt>) {
        let delays = &plan.hedge_delays;
        let mut attempts = Vec::new();
        if let Some(budget) = &self.resilience.retry_budget {
            budget.deposit();
        }
        let mut running = FuturesUnordered::new();
        let mut launched: Vec<(u32, Instant)> = vec![(1, Instant::now())];
        running.push(self.guarded_attempt(task, plan, 1, false));
        let mut started = 1usize;
        let mut next_at = delays.first().map(|d| Instant::now() + *d);
        let mut last: Option<Result<Response, TaskError>> = None;
        loop {
            tokio::select! {
                finished = running.next(), if !running.is_empty() => {
                    let Some((result, attempt)) = finished else { continue };
                    attempts.push(attempt);
                    let acceptable = match outcome_of(&result) {
                        None => true,
                        Some(outcome) => !plan.retry.should_retry(&outcome),
                    };
                    if acceptable {
                        // The others are cancelled by dropping them: their
                        // connections are closed, never reused.
                        drop(running);
                        for (number, began) in launched.iter().copied() {
                            if !attempts.iter().any(|a| a.number == number) {
                                attempts.push(Attempt {
                                    number,
                                    status: None,
                                    error_type: None,
                                    error_class: Some("Cancelled".to_owned()),
                                    duration: began.elapsed(),
                                    hedged: number > 1,
                                });
                            }
                        }
                        attempts.sort_by_key(|a| a.number);
                        return (result.result, attempts);
                    }
                    last = Some(result.result);
                    if running.is_empty() {
                        if started <= delays.len() {
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
                        .retry_budget
                        .as_ref()
                        .is_none_or(|b| b.withdraw());
                    if allowed {
                        started += 1;
                        launched.push((started as u32, Instant::now()));
                        plan.metrics.record_hedge();
                        running.push(self.guarded_attempt(task, plan, started as u32, true));
                        next_at = delays
                            .get(started - 1)
                            .map(|d| Instant::now() + *d);
                    } else {
                        next_at = None;
                        if running.is_empty() {
                            break;
                        }
                    }
                }
            }
        }
        match last {
            Some(result) => (result, attempts),
            None => unreachable_outcome(self, task, plan, attempts),
        }
    }

    /// Applies the upstream's fallback to a failed task.
    fn fallback(
        &self,
        task: &Task,
        policy: &UpstreamPolicy,
        error: TaskError,
    ) -> Result<Response, TaskError> {
        let Some(fallback) = &policy.fallback else {
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

/// Whether the breaker should count an attempt as a success (`Some(true)`),
/// a failure (`Some(false)`) or neither.
fn breaker_verdict(result: &AttemptResult, policy: &UpstreamPolicy) -> Option<bool> {
    match &result.result {
        Ok(r) => Some(!policy.breaker_failure_statuses.contains(&r.status)),
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

/// No attempt finished: only possible if none could start.
fn unreachable_outcome(
    engine: &Engine,
    task: &Task,
    plan: &Plan<'_>,
    attempts: Vec<Attempt>,
) -> (Result<Response, TaskError>, Vec<Attempt>) {
    (
        Err(engine.request_error(
            task,
            task.request.url(),
            task.request.method(),
            plan.started,
            ErrorType::Unknown,
            "NoAttempt",
            "no attempt could be made".to_owned(),
        )),
        attempts,
    )
}

fn breaker_code(state: BreakerState) -> crate::metrics::BreakerStateCode {
    state.as_gauge() as crate::metrics::BreakerStateCode
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
