//! [`RateLimit`] and the [`TokenBucket`] that enforces it on tokio time.

use std::{
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::{sleep_until, Instant};

use super::InvalidLimit;

/// A sustained rate with a burst: `per_second` calls per second on average,
/// up to `burst` at once after a quiet period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
}

impl RateLimit {
    /// `per_second` (0.000001 to 1000000) calls per second with bursts of up
    /// to `burst` (at least 1) calls. There is no default: a key without a
    /// `RateLimit` is not rate limited.
    pub fn new(per_second: f64, burst: u32) -> Result<Self, InvalidLimit> {
        if !(per_second.is_finite() && (1e-6..=1e6).contains(&per_second)) {
            return Err(InvalidLimit::new(
                "per_second",
                format!("must be 0.000001 to 1000000, got {per_second}"),
            ));
        }
        if burst == 0 {
            return Err(InvalidLimit::new("burst", "must be at least 1"));
        }
        Ok(RateLimit { per_second, burst })
    }

    /// The sustained rate, in calls per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// How many calls may go at once after a quiet period.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time between two calls at the sustained rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1))
    }
}

/// How late a waiter may wake (one tick of tokio's timer) and still keep the
/// schedule it waited for, so timer rounding does not lower the rate.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// A token bucket of one [`RateLimit`], on [`tokio::time`] (a paused clock
/// drives it).
///
/// It holds up to `burst` tokens and gains one every
/// [`interval`](RateLimit::interval); each call takes one. Implemented as
/// GCRA: a "theoretical arrival time" instead of a token count, so the
/// arithmetic is exact integer time.
///
/// [`acquire`](Self::acquire) waits for a token — it never fails — and
/// callers are served in the order they called (a fair queue), so no waiter
/// starves; a cancelled `acquire` takes no token.
/// [`try_acquire`](Self::try_acquire) never waits and never jumps the queue.
pub struct TokenBucket {
    limit: RateLimit,
    interval: Duration,
    /// `(burst - 1) * interval`: how far ahead of now the schedule may run.
    tolerance: Duration,
    state: Mutex<State>,
    /// Held by the waiter at the head of the queue; tokio's mutex is FIFO.
    queue: tokio::sync::Mutex<()>,
}

struct State {
    /// When the bucket will be empty at the sustained rate, if no more
    /// tokens are taken; `None` when full.
    tat: Option<Instant>,
    /// Callers inside `acquire`, queued or at the head.
    waiters: u32,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("limit", &self.limit)
            .field("waiters", &self.lock().waiters)
            .finish_non_exhaustive()
    }
}

impl TokenBucket {
    /// A full bucket (`burst` tokens) for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        let interval = limit.interval();
        TokenBucket {
            limit,
            interval,
            tolerance: interval
                .checked_mul(limit.burst - 1)
                .unwrap_or(Duration::MAX),
            state: Mutex::new(State {
                tat: None,
                waiters: 0,
            }),
            queue: tokio::sync::Mutex::new(()),
        }
    }

    /// The limit this bucket enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// How many callers are waiting in [`acquire`](Self::acquire).
    pub fn waiters(&self) -> u32 {
        self.lock().waiters
    }

    /// Takes a token, waiting for it in turn (first come, first served), and
    /// returns how long it waited. Never fails. Cancel-safe: dropped before
    /// it returns, it takes no token and leaves the queue.
    pub async fn acquire(&self) -> Duration {
        let start = Instant::now();
        self.lock().waiters += 1;
        let _leave = LeaveQueue(self);
        let _turn = self.queue.lock().await;
        loop {
            let now = Instant::now();
            let taken = self.take(&mut self.lock(), now);
            match taken {
                Ok(()) => return now.saturating_duration_since(start),
                Err(ready_at) => sleep_until(ready_at).await,
            }
        }
    }

    /// Takes a token if one is free and nobody is queued, without waiting;
    /// otherwise returns an estimate of the wait (behind the current queue).
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(_turn) = self.queue.try_lock() else {
            let state = self.lock();
            return Err(self.estimate(&state, now, state.waiters));
        };
        let mut state = self.lock();
        match self.take(&mut state, now) {
            Ok(()) => Ok(()),
            Err(ready_at) => Err(ready_at.saturating_duration_since(now)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// GCRA: a call conforms when `tat - tolerance <= now`; it then moves
    /// `tat` one interval on. Otherwise returns when it will conform.
    fn take(&self, state: &mut State, now: Instant) -> Result<(), Instant> {
        let tat = match state.tat {
            // A schedule that ended long enough ago: the bucket is full again.
            Some(tat) if tat + TIMER_SLACK >= now => tat,
            _ => now,
        };
        let ready_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        if ready_at > now {
            return Err(ready_at);
        }
        state.tat = Some(tat + self.interval);
        Ok(())
    }

    /// The wait of a caller behind `queued` others, if none of them cancels.
    fn estimate(&self, state: &State, now: Instant, queued: u32) -> Duration {
        let tat = state.tat.filter(|tat| *tat >= now).unwrap_or(now);
        let ready_at = tat + self.interval * queued;
        ready_at
            .checked_sub(self.tolerance)
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }
}

/// Leaves the waiter count when `acquire` returns or is cancelled.
struct LeaveQueue<'a>(&'a TokenBucket);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiters = state.waiters.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::{advance, sleep};

    use super::*;

    fn bucket(per_second: f64, burst: u32) -> TokenBucket {
        TokenBucket::new(RateLimit::new(per_second, burst).unwrap())
    }

    #[test]
    fn validation_errors_name_the_field() {
        for bad in [0.0, 1e-7, -1.0, f64::NAN, f64::INFINITY, 2e6] {
            assert_eq!(RateLimit::new(bad, 1).unwrap_err().field(), "per_second");
        }
        let err = RateLimit::new(1.0, 0).unwrap_err();
        assert_eq!(err.field(), "burst");
        assert!(err.to_string().contains("burst"), "{err}");
        let ok = RateLimit::new(10.0, 5).unwrap();
        assert_eq!(
            (ok.per_second(), ok.burst(), ok.interval()),
            (10.0, 5, Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let b = bucket(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.acquire().await, Duration::ZERO);
        }
        for i in 1..=10u32 {
            let waited = b.acquire().await;
            assert_eq!(waited, Duration::from_millis(100));
            assert_eq!(start.elapsed(), Duration::from_millis(100) * i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn try_acquire_reports_the_wait() {
        let b = bucket(10.0, 2);
        assert_eq!(b.try_acquire(), Ok(()));
        assert_eq!(b.try_acquire(), Ok(()));
        assert_eq!(b.try_acquire(), Err(Duration::from_millis(100)));
        advance(Duration::from_millis(40)).await;
        assert_eq!(b.try_acquire(), Err(Duration::from_millis(60)));
        advance(Duration::from_millis(60)).await;
        assert_eq!(b.try_acquire(), Ok(()));
        // A quiet period refills the burst, never more.
        advance(Duration::from_secs(10)).await;
        assert_eq!(b.try_acquire(), Ok(()));
        assert_eq!(b.try_acquire(), Ok(()));
        assert!(b.try_acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn try_acquire_does_not_jump_the_queue() {
        let b = Arc::new(bucket(10.0, 1));
        b.acquire().await;
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.acquire().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.waiters(), 1);
        // The waiter is due in 100 ms; a new caller would be served 100 ms
        // after it.
        assert_eq!(b.try_acquire(), Err(Duration::from_millis(200)));
        assert_eq!(waiter.await.unwrap(), Duration::from_millis(100));
        assert_eq!(b.waiters(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_acquire_takes_no_token() {
        let b = bucket(1.0, 1);
        b.acquire().await;
        // Give up after 500 ms of a 1 s wait.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), b.acquire())
                .await
                .is_err()
        );
        assert_eq!(b.waiters(), 0);
        // The token due at 1 s is still there for the next caller.
        assert_eq!(b.acquire().await, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order() {
        let b = Arc::new(bucket(10.0, 1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (b, order) = (Arc::clone(&b), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                b.acquire().await;
                order.lock().unwrap().push(i);
            }));
            // Arrive in a known order.
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    /// 100 tasks offer twice the limit for 20 s: every call is served, none
    /// fails, the achieved rate is the limit, and nobody waits much longer
    /// than the queue ahead of it.
    #[tokio::test(start_paused = true)]
    async fn hundred_waiters_at_twice_the_rate() {
        const LIMIT: f64 = 50.0;
        let b = Arc::new(bucket(LIMIT, 10));
        let start = Instant::now();
        let grants = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (b, grants) = (Arc::clone(&b), Arc::clone(&grants));
            tasks.push(tokio::spawn(async move {
                let mut max_wait = Duration::ZERO;
                // Each task offers one call per second: 100/s in all.
                for _ in 0..20 {
                    let waited = b.acquire().await;
                    max_wait = max_wait.max(waited);
                    grants.lock().unwrap().push(Instant::now());
                    sleep(Duration::from_secs(1).saturating_sub(waited)).await;
                }
                max_wait
            }));
        }
        let mut max_wait = Duration::ZERO;
        for task in tasks {
            max_wait = max_wait.max(task.await.unwrap());
        }
        let grants = grants.lock().unwrap();
        assert_eq!(grants.len(), 2000);
        // After the burst, the calls go at the limit.
        let last = grants.iter().max().unwrap().duration_since(start);
        let achieved = (grants.len() - 10) as f64 / last.as_secs_f64();
        assert!(
            (achieved - LIMIT).abs() / LIMIT < 0.02,
            "achieved {achieved:.2}/s over {last:?}"
        );
        // In any one second, at most the limit plus the burst.
        for window_start in 0..40 {
            let from = start + Duration::from_secs(window_start);
            let to = from + Duration::from_secs(1);
            let n = grants.iter().filter(|t| **t >= from && **t < to).count();
            assert!(n <= 60, "{n} calls in second {window_start}");
        }
        // FIFO: a call waits for the queue ahead of it (at most 99 others,
        // about 2 s at 50/s), never starves.
        assert!(max_wait <= Duration::from_millis(2100), "{max_wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn uneven_interval_keeps_the_rate() {
        // 3/s: 333.33 ms apart, not a whole number of timer ticks.
        let b = bucket(3.0, 1);
        let start = Instant::now();
        for _ in 0..301 {
            b.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(99_999) && elapsed <= Duration::from_millis(100_010),
            "{elapsed:?}"
        );
    }

    #[test]
    fn bucket_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TokenBucket>();
    }
}
