//! [`CircuitBreaker`]: the state machine of one upstream, its
//! [`BreakerPermit`]s and the [`BreakerOpen`] error.

use std::{
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::BreakerPolicy;

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls fail fast with [`BreakerOpen`] until the break duration ends.
    Open,
    /// The break duration ended: a few probes go through at a time; their
    /// outcomes close or re-open the breaker.
    HalfOpen,
}

impl BreakerState {
    /// A stable lowercase name: `"closed"`, `"open"` or `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the `breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call refused by an open (or saturated half-open) [`CircuitBreaker`]:
/// it failed fast, nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open; retry in {retry_in:?}")]
pub struct BreakerOpen {
    /// When the breaker may admit a call again. While open, the rest of the
    /// break duration. While half-open with every probe slot taken, an
    /// estimate: the rest of a break duration counted from the latest probe,
    /// at least 1 ms.
    pub retry_in: Duration,
}

impl BreakerOpen {
    /// Always `true`: a call refused by a breaker may be tried again later
    /// (after [`retry_in`](Self::retry_in)).
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// Called with `(from, to)` on every state change.
pub(super) type TransitionFn = Arc<dyn Fn(BreakerState, BreakerState) + Send + Sync>;

/// The circuit breaker of one upstream.
///
/// [`try_acquire`](Self::try_acquire) either returns a [`BreakerPermit`] —
/// the caller sends the request and reports the outcome on the permit — or
/// fails fast with [`BreakerOpen`]. How it opens and recovers is the
/// [`BreakerPolicy`]. All time is [`tokio::time::Instant`], so a paused clock
/// drives it. Methods take `&self`; the state sits behind a short
/// [`std::sync::Mutex`] never held across an `.await` or a callback.
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field("policy", &self.shared.policy)
            .finish()
    }
}

struct Shared {
    policy: BreakerPolicy,
    bucket_nanos: u128,
    origin: Instant,
    inner: Mutex<Inner>,
    on_transition: Option<TransitionFn>,
}

struct Inner {
    state: Phase,
    /// Bumped on every transition; a permit of an older generation no longer
    /// affects the state.
    generation: u64,
    consecutive_failures: u32,
    window: Window,
}

enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        successes: u32,
        last_probe: Instant,
    },
}

impl Phase {
    fn public(&self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// Outcomes of the sampling window in a ring of time buckets.
struct Window {
    buckets: Vec<Bucket>,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// The index of the bucket's time slice since the breaker's origin.
    epoch: u64,
    calls: u32,
    failures: u32,
}

impl Window {
    fn new(buckets: u32) -> Self {
        Window {
            buckets: vec![Bucket::default(); buckets as usize],
        }
    }

    fn record(&mut self, epoch: u64, failed: bool) {
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % len) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        }
    }

    /// `(calls, failures)` in the buckets of the window ending at `epoch`.
    fn totals(&self, epoch: u64) -> (u64, u64) {
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.epoch <= epoch && epoch - b.epoch < len)
            .fold((0, 0), |(calls, failures), b| {
                (calls + u64::from(b.calls), failures + u64::from(b.failures))
            })
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

/// A state change to report once the lock is released.
type Transition = Option<(BreakerState, BreakerState)>;

impl CircuitBreaker {
    /// A closed breaker with the given policy.
    pub fn new(policy: BreakerPolicy) -> Self {
        CircuitBreaker::build(policy, None)
    }

    /// A closed breaker that calls `on_transition(from, to)` on every state
    /// change, outside any lock. A panic in the callback is caught and
    /// logged.
    pub fn with_on_transition(
        policy: BreakerPolicy,
        on_transition: impl Fn(BreakerState, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        CircuitBreaker::build(policy, Some(Arc::new(on_transition)))
    }

    pub(super) fn build(policy: BreakerPolicy, on_transition: Option<TransitionFn>) -> Self {
        let bucket_nanos = policy.bucket_length().as_nanos().max(1);
        let window = Window::new(policy.sampling_buckets());
        CircuitBreaker {
            shared: Arc::new(Shared {
                policy,
                bucket_nanos,
                origin: Instant::now(),
                inner: Mutex::new(Inner {
                    state: Phase::Closed,
                    generation: 0,
                    consecutive_failures: 0,
                    window,
                }),
                on_transition,
            }),
        }
    }

    /// The policy this breaker runs on.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.shared.policy
    }

    /// Asks to send one call. Closed: always a permit. Open: fails fast with
    /// the rest of the break duration. Half-open: a probe permit while fewer
    /// than [`half_open_probes`](BreakerPolicy::half_open_probes) probes are
    /// out, otherwise [`BreakerOpen`].
    ///
    /// Report the outcome with [`BreakerPermit::success`] or
    /// [`BreakerPermit::failure`]; a permit dropped unreported (a cancelled
    /// call) counts as neither.
    pub fn try_acquire(&self) -> Result<BreakerPermit, BreakerOpen> {
        let now = Instant::now();
        let (result, transition) = {
            let mut inner = self.shared.lock();
            let transition = self.shared.expire_open(&mut inner, now);
            let generation = inner.generation;
            let probes = self.shared.policy.half_open_probes();
            let break_duration = self.shared.policy.break_duration();
            let result = match &mut inner.state {
                Phase::Closed => Ok(false),
                Phase::Open { until } => Err(BreakerOpen {
                    retry_in: until.saturating_duration_since(now),
                }),
                Phase::HalfOpen {
                    in_flight,
                    last_probe,
                    ..
                } => {
                    if *in_flight < probes {
                        *in_flight += 1;
                        *last_probe = now;
                        Ok(true)
                    } else {
                        let retry_in = (*last_probe + break_duration)
                            .saturating_duration_since(now)
                            .max(Duration::from_millis(1));
                        Err(BreakerOpen { retry_in })
                    }
                }
            };
            let result = result.map(|probe| BreakerPermit {
                shared: Arc::clone(&self.shared),
                generation,
                probe,
                reported: false,
            });
            (result, transition)
        };
        self.shared.notify(transition);
        result
    }

    /// The current state. An open breaker whose break duration has ended
    /// turns half-open here (and reports the change).
    pub fn state(&self) -> BreakerState {
        let now = Instant::now();
        let (state, transition) = {
            let mut inner = self.shared.lock();
            let transition = self.shared.expire_open(&mut inner, now);
            (inner.state.public(), transition)
        };
        self.shared.notify(transition);
        state
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn epoch(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / self.bucket_nanos).unwrap_or(u64::MAX)
    }

    fn set_state(&self, inner: &mut Inner, to: Phase) -> Transition {
        let from = inner.state.public();
        inner.state = to;
        inner.generation += 1;
        inner.consecutive_failures = 0;
        inner.window.clear();
        Some((from, inner.state.public()))
    }

    fn open(&self, inner: &mut Inner, now: Instant) -> Transition {
        let until = now + self.policy.break_duration();
        self.set_state(inner, Phase::Open { until })
    }

    fn expire_open(&self, inner: &mut Inner, now: Instant) -> Transition {
        match inner.state {
            Phase::Open { until } if now >= until => self.set_state(
                inner,
                Phase::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                    last_probe: now,
                },
            ),
            _ => None,
        }
    }

    /// Applies a reported outcome (`Some(failed)`) or a dropped permit
    /// (`None`).
    fn report(&self, generation: u64, probe: bool, failed: Option<bool>) {
        let now = Instant::now();
        let transition = {
            let mut inner = self.lock();
            if inner.generation != generation {
                // The state changed since the permit was issued: the outcome
                // says nothing about the current state.
                return;
            }
            let policy = &self.policy;
            match (&mut inner.state, failed) {
                (Phase::HalfOpen { in_flight, .. }, None) => {
                    if probe {
                        *in_flight = in_flight.saturating_sub(1);
                    }
                    None
                }
                (
                    Phase::HalfOpen {
                        in_flight,
                        successes,
                        ..
                    },
                    Some(false),
                ) => {
                    if probe {
                        *in_flight = in_flight.saturating_sub(1);
                    }
                    *successes += 1;
                    if *successes >= policy.success_threshold() {
                        self.set_state(&mut inner, Phase::Closed)
                    } else {
                        None
                    }
                }
                (Phase::HalfOpen { .. }, Some(true)) => self.open(&mut inner, now),
                (Phase::Closed, Some(failed)) => {
                    let epoch = self.epoch(now);
                    inner.window.record(epoch, failed);
                    if !failed {
                        inner.consecutive_failures = 0;
                        None
                    } else {
                        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                        let (calls, failures) = inner.window.totals(epoch);
                        let by_count = policy
                            .consecutive_failures()
                            .is_some_and(|n| inner.consecutive_failures >= n);
                        let by_ratio = calls >= u64::from(policy.minimum_throughput())
                            && failures as f64 >= policy.failure_ratio() * calls as f64;
                        if by_count || by_ratio {
                            self.open(&mut inner, now)
                        } else {
                            None
                        }
                    }
                }
                (Phase::Closed, None) | (Phase::Open { .. }, _) => None,
            }
        };
        self.notify(transition);
    }

    fn notify(&self, transition: Transition) {
        let (Some((from, to)), Some(callback)) = (transition, &self.on_transition) else {
            return;
        };
        if catch_unwind(AssertUnwindSafe(|| callback(from, to))).is_err() {
            tracing::error!(
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker transition callback panicked"
            );
        }
    }
}

/// Leave to send one call through a [`CircuitBreaker`].
///
/// Report the outcome with [`success`](Self::success) or
/// [`failure`](Self::failure). Dropped unreported (the call was cancelled),
/// it counts as neither and frees its probe slot.
#[must_use = "report the outcome with success() or failure()"]
pub struct BreakerPermit {
    shared: Arc<Shared>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl BreakerPermit {
    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call succeeded.
    pub fn success(self) {
        self.record(true);
    }

    /// The call failed (a request error, or a status the caller counts as a
    /// failure, such as 5xx or 429).
    pub fn failure(self) {
        self.record(false);
    }

    /// [`success`](Self::success) when `succeeded`, else
    /// [`failure`](Self::failure).
    pub fn record(mut self, succeeded: bool) {
        self.reported = true;
        self.shared
            .report(self.generation, self.probe, Some(!succeeded));
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.reported {
            self.shared.report(self.generation, self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::advance;

    use super::*;

    fn policy() -> crate::breaker::BreakerPolicyBuilder {
        BreakerPolicy::builder()
            .failure_ratio(0.5)
            .sampling_window(Duration::from_secs(10))
            .sampling_buckets(10)
            .minimum_throughput(10)
            .consecutive_failures(None)
            .break_duration(Duration::from_secs(5))
            .half_open_probes(1)
            .success_threshold(2)
    }

    fn fail(b: &CircuitBreaker) {
        b.try_acquire().unwrap().failure();
    }

    fn succeed(b: &CircuitBreaker) {
        b.try_acquire().unwrap().success();
    }

    fn open_breaker(policy: BreakerPolicy) -> CircuitBreaker {
        let b = CircuitBreaker::new(
            BreakerPolicy::builder()
                .consecutive_failures(Some(1))
                .break_duration(policy.break_duration())
                .half_open_probes(policy.half_open_probes())
                .success_threshold(policy.success_threshold())
                .build()
                .unwrap(),
        );
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_ratio_only_after_minimum_throughput() {
        let b = CircuitBreaker::new(policy().build().unwrap());
        // 9 failures: a ratio of 1.0, but below the minimum throughput of 10.
        for _ in 0..9 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The 10th call, a failure: 10 calls at 100 % failures.
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_below_threshold_stays_closed() {
        let b = CircuitBreaker::new(policy().build().unwrap());
        for _ in 0..20 {
            succeed(&b);
            advance(Duration::from_millis(100)).await;
        }
        // 20 successes and 19 failures: 48.7 % < 50 %.
        for _ in 0..19 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The 20th failure reaches 50 %.
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_consecutive_failures() {
        let b = CircuitBreaker::new(
            policy()
                .minimum_throughput(1000)
                .consecutive_failures(Some(3))
                .build()
                .unwrap(),
        );
        fail(&b);
        fail(&b);
        succeed(&b); // resets the run
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn window_expiry_forgets_old_failures() {
        let b = CircuitBreaker::new(policy().build().unwrap());
        for _ in 0..9 {
            fail(&b);
        }
        // The window is 10 s: after it, the 9 failures are gone.
        advance(Duration::from_secs(10)).await;
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..8 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides_bucket_by_bucket() {
        let b = CircuitBreaker::new(policy().build().unwrap());
        // 5 failures at t=0 s, 4 at t=5 s.
        for _ in 0..5 {
            fail(&b);
        }
        advance(Duration::from_secs(5)).await;
        for _ in 0..4 {
            fail(&b);
        }
        // At t=10 s the first bucket has left the window: 4 + 1 calls.
        advance(Duration::from_secs(5)).await;
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        // Still inside the window at t=14.9 s: 4 + 1 + 5 = 10 calls.
        advance(Duration::from_millis(4900)).await;
        for _ in 0..4 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_fast_while_open_with_retry_in() {
        let b = open_breaker(policy().build().unwrap());
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_in, Duration::from_secs(5));
        assert!(err.is_retryable());
        advance(Duration::from_millis(3250)).await;
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_in, Duration::from_millis(1750));
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_millis(1750)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_the_configured_probes() {
        let b = open_breaker(policy().half_open_probes(3).build().unwrap());
        advance(Duration::from_secs(5)).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert!(probes.iter().all(BreakerPermit::is_probe));
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_in, Duration::from_secs(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);

        // A dropped (cancelled) probe frees its slot and counts as nothing.
        let mut probes = probes.into_iter();
        drop(probes.next());
        let again = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        assert_eq!(b.state(), BreakerState::HalfOpen);

        // A success frees a slot too.
        probes.next().unwrap().success();
        let last = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        drop((again, last, probes));
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_success_threshold() {
        let b = open_breaker(policy().success_threshold(3).build().unwrap());
        advance(Duration::from_secs(5)).await;
        succeed(&b);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed again with a fresh count: permits are plain calls.
        let p = b.try_acquire().unwrap();
        assert!(!p.is_probe());
        p.success();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_another_break() {
        let b = open_breaker(policy().build().unwrap());
        advance(Duration::from_secs(5)).await;
        succeed(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.try_acquire().unwrap_err().retry_in,
            Duration::from_secs(5)
        );
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The successes of the previous half-open period do not carry over.
        succeed(&b);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_permits_do_not_move_the_state() {
        let b = CircuitBreaker::new(policy().consecutive_failures(Some(2)).build().unwrap());
        let slow = b.try_acquire().unwrap();
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // A call admitted while closed answers during half-open: ignored.
        slow.failure();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn transition_callback_sees_every_change() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let b = CircuitBreaker::with_on_transition(
            policy().consecutive_failures(Some(1)).build().unwrap(),
            move |from, to| log.lock().unwrap().push((from, to)),
        );
        fail(&b);
        advance(Duration::from_secs(5)).await;
        fail(&b); // the probe fails
        advance(Duration::from_secs(5)).await;
        succeed(&b);
        succeed(&b);
        use BreakerState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn panicking_callback_does_not_break_the_breaker() {
        let b = CircuitBreaker::with_on_transition(
            policy().consecutive_failures(Some(1)).build().unwrap(),
            |_, _| panic!("observer bug"),
        );
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_err());
    }

    #[test]
    fn breaker_and_permit_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<BreakerPermit>();
        assert_send_sync::<BreakerOpen>();
    }
}
