//! Per-key limits: [`LimitConfig`] (what a key allows), [`KeyLimits`] (the
//! live bucket, slots and cooldown of one key) and its [`LimitPermit`].

use std::{
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::{sleep_until, Instant};

use super::{
    concurrency::check_max_in_flight, ConcurrencyLimit, ConcurrencyPermit, InvalidLimit, RateLimit,
    TokenBucket,
};

/// The limits of one key: an optional rate and an optional maximum of calls
/// in flight. The default ([`LimitConfig::unlimited`]) has neither.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitConfig {
    rate: Option<RateLimit>,
    max_in_flight: Option<usize>,
}

impl LimitConfig {
    /// No rate limit, no concurrency limit (a key can still be cooled down).
    pub fn unlimited() -> Self {
        LimitConfig::default()
    }

    /// Starts from [`unlimited`](Self::unlimited).
    pub fn builder() -> LimitConfigBuilder {
        LimitConfigBuilder {
            rate: None,
            max_in_flight: None,
        }
    }

    /// The rate limit, if any. Default none.
    pub fn rate(&self) -> Option<RateLimit> {
        self.rate
    }

    /// The maximum of calls in flight, if any. Default none.
    pub fn max_in_flight(&self) -> Option<usize> {
        self.max_in_flight
    }
}

/// Builds a [`LimitConfig`]; [`build`](Self::build) checks every field.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct LimitConfigBuilder {
    rate: Option<(f64, u32)>,
    max_in_flight: Option<usize>,
}

impl LimitConfigBuilder {
    /// At most `per_second` calls per second on average, in bursts of up to
    /// `burst` (see [`RateLimit::new`]). Default: no rate limit.
    pub fn rate(mut self, per_second: f64, burst: u32) -> Self {
        self.rate = Some((per_second, burst));
        self
    }

    /// At most `max_in_flight` calls at once (1 to [`ConcurrencyLimit::MAX`]).
    /// Default: no limit.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = Some(max_in_flight);
        self
    }

    /// Checks every setting and returns the config, or names the first
    /// invalid field (`per_second`, `burst` or `max_in_flight`).
    pub fn build(self) -> Result<LimitConfig, InvalidLimit> {
        let rate = self
            .rate
            .map(|(per_second, burst)| RateLimit::new(per_second, burst))
            .transpose()?;
        if let Some(max) = self.max_in_flight {
            check_max_in_flight(max)?;
        }
        Ok(LimitConfig {
            rate,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// Why [`KeyLimits::try_acquire`] could not admit a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitBusy {
    /// The key is cooling down (a 429 with `Retry-After`, for example).
    #[error("the key is cooling down for another {retry_in:?}")]
    CoolingDown {
        /// The rest of the cooldown.
        retry_in: Duration,
    },
    /// Every concurrency slot is taken; when one frees up is unknown.
    #[error("the key has its maximum of calls in flight")]
    AtCapacity,
    /// No token is free (or others wait for one).
    #[error("the key's rate limit allows the next call in {retry_in:?}")]
    RateLimited {
        /// An estimate of when a token is free for this caller.
        retry_in: Duration,
    },
}

impl LimitBusy {
    /// When to try again, if known (`None` for [`AtCapacity`](Self::AtCapacity)).
    pub fn retry_in(&self) -> Option<Duration> {
        match self {
            LimitBusy::CoolingDown { retry_in } | LimitBusy::RateLimited { retry_in } => {
                Some(*retry_in)
            }
            LimitBusy::AtCapacity => None,
        }
    }
}

/// Leave to send one call for a key: holds its concurrency slot (if the key
/// has a concurrency limit) until dropped, and records how long
/// [`KeyLimits::acquire`] waited.
#[must_use = "the concurrency slot is freed when the permit drops"]
pub struct LimitPermit {
    _slot: Option<ConcurrencyPermit>,
    waited: Duration,
}

impl fmt::Debug for LimitPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitPermit")
            .field("waited", &self.waited)
            .finish_non_exhaustive()
    }
}

impl LimitPermit {
    /// How long the acquire waited in all: cooldown, concurrency slot and
    /// token together. Zero when nothing held it back.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

/// The live limits of one key: an optional [`TokenBucket`], an optional
/// [`ConcurrencyLimit`] and a cooldown.
///
/// [`acquire`](Self::acquire) waits until the key is not cooling down, for a
/// concurrency slot, then for a token — it never fails. A call over the limit
/// waits its turn. [`cool_down`](Self::cool_down) holds back every acquire
/// of the key, including those already waiting, until the cooldown ends:
/// this is how a 429 with `Retry-After` cools the whole key.
pub struct KeyLimits {
    bucket: Option<TokenBucket>,
    concurrency: Option<ConcurrencyLimit>,
    cooldown_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for KeyLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLimits")
            .field("bucket", &self.bucket)
            .field("concurrency", &self.concurrency)
            .field("cooldown_remaining", &self.cooldown_remaining())
            .finish()
    }
}

impl Default for KeyLimits {
    /// [`KeyLimits::unlimited`].
    fn default() -> Self {
        KeyLimits::unlimited()
    }
}

/// The longest cooldown; longer requests are cut to it.
const MAX_COOLDOWN: Duration = Duration::from_secs(365 * 24 * 3600);

impl KeyLimits {
    /// Limits as `config` says, not cooling down.
    pub fn new(config: &LimitConfig) -> Self {
        KeyLimits {
            bucket: config.rate.map(TokenBucket::new),
            // Validated by `LimitConfigBuilder::build`.
            concurrency: config
                .max_in_flight
                .and_then(|max| ConcurrencyLimit::new(max).ok()),
            cooldown_until: Mutex::new(None),
        }
    }

    /// No rate or concurrency limit; only cooldowns apply.
    pub fn unlimited() -> Self {
        KeyLimits::new(&LimitConfig::unlimited())
    }

    /// The token bucket, if the key has a rate limit.
    pub fn bucket(&self) -> Option<&TokenBucket> {
        self.bucket.as_ref()
    }

    /// The concurrency limit, if the key has one.
    pub fn concurrency(&self) -> Option<&ConcurrencyLimit> {
        self.concurrency.as_ref()
    }

    /// Waits until the key is not cooling down, for a concurrency slot, and
    /// for a token, in that order, and returns the permit with the total
    /// wait. Never fails. Cancel-safe: dropped early, it holds nothing.
    pub async fn acquire(&self) -> LimitPermit {
        // The common case takes no wait at all: report exactly zero, so that
        // callers count only real waits.
        if let Ok(permit) = self.try_acquire() {
            return permit;
        }
        let start = Instant::now();
        self.wait_cool_down().await;
        let slot = match &self.concurrency {
            Some(limit) => Some(limit.acquire().await),
            None => None,
        };
        loop {
            self.wait_cool_down().await;
            let Some(bucket) = &self.bucket else { break };
            bucket.acquire().await;
            // A cooldown that began while this call waited for its token
            // holds it back too; it queues for a fresh token afterwards so
            // the calls released by the cooldown keep to the rate.
            if self.cooling_until(Instant::now()).is_none() {
                break;
            }
        }
        LimitPermit {
            _slot: slot,
            waited: start.elapsed(),
        }
    }

    /// A permit now, or why not: the key is cooling down, every slot is
    /// taken, or no token is free. Never waits; does not jump the queue of
    /// callers waiting in [`acquire`](Self::acquire).
    pub fn try_acquire(&self) -> Result<LimitPermit, LimitBusy> {
        let now = Instant::now();
        if let Some(until) = self.cooling_until(now) {
            return Err(LimitBusy::CoolingDown {
                retry_in: until - now,
            });
        }
        let slot = match &self.concurrency {
            Some(limit) => Some(limit.try_acquire().ok_or(LimitBusy::AtCapacity)?),
            None => None,
        };
        if let Some(bucket) = &self.bucket {
            bucket
                .try_acquire()
                .map_err(|retry_in| LimitBusy::RateLimited { retry_in })?;
        }
        Ok(LimitPermit {
            _slot: slot,
            waited: Duration::ZERO,
        })
    }

    /// Holds back every acquire of this key for `duration` from now
    /// (at most a year). Extends a running cooldown, never shortens it.
    pub fn cool_down(&self, duration: Duration) {
        let now = Instant::now();
        let until = now.checked_add(duration.min(MAX_COOLDOWN)).unwrap_or(now);
        self.cool_down_until(until);
    }

    /// Holds back every acquire of this key until `until`. Extends a running
    /// cooldown, never shortens it.
    pub fn cool_down_until(&self, until: Instant) {
        let mut current = self.lock_cooldown();
        if current.is_none_or(|current| current < until) {
            *current = Some(until);
        }
    }

    /// The rest of the cooldown, or `None` when the key is not cooling down.
    pub fn cooldown_remaining(&self) -> Option<Duration> {
        let now = Instant::now();
        self.cooling_until(now).map(|until| until - now)
    }

    fn lock_cooldown(&self) -> MutexGuard<'_, Option<Instant>> {
        self.cooldown_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cooling_until(&self, now: Instant) -> Option<Instant> {
        self.lock_cooldown().filter(|until| *until > now)
    }

    async fn wait_cool_down(&self) {
        while let Some(until) = self.cooling_until(Instant::now()) {
            sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use tokio::time::{advance, sleep};

    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let cases = [
            (LimitConfig::builder().rate(0.0, 1), "per_second"),
            (LimitConfig::builder().rate(1.0, 0), "burst"),
            (LimitConfig::builder().max_in_flight(0), "max_in_flight"),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), field);
            assert!(err.to_string().contains(field), "{err}");
        }
        let config = LimitConfig::builder()
            .rate(10.0, 5)
            .max_in_flight(4)
            .build()
            .unwrap();
        assert_eq!(config.rate(), Some(RateLimit::new(10.0, 5).unwrap()));
        assert_eq!(config.max_in_flight(), Some(4));
        assert_eq!(
            LimitConfig::builder().build().unwrap(),
            LimitConfig::default()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_delays_every_acquire_of_the_key_only() {
        let a = Arc::new(KeyLimits::unlimited());
        let b = KeyLimits::unlimited();
        assert_eq!(a.acquire().await.waited(), Duration::ZERO);
        a.cool_down(Duration::from_secs(2));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let a = Arc::clone(&a);
            tasks.push(tokio::spawn(async move {
                let permit = a.acquire().await;
                (permit.waited(), Instant::now())
            }));
        }
        // Another key is not held back.
        assert_eq!(b.acquire().await.waited(), Duration::ZERO);
        assert!(matches!(
            a.try_acquire(),
            Err(LimitBusy::CoolingDown { retry_in }) if retry_in == Duration::from_secs(2)
        ));
        for task in tasks {
            let (waited, at) = task.await.unwrap();
            assert_eq!(waited, Duration::from_secs(2));
            assert_eq!(at - start, Duration::from_secs(2));
        }
        assert_eq!(a.cooldown_remaining(), None);
        assert_eq!(a.acquire().await.waited(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_set_while_waiting_extends_the_wait() {
        let limits = Arc::new(KeyLimits::unlimited());
        limits.cool_down(Duration::from_secs(1));
        let waiter = tokio::spawn({
            let limits = Arc::clone(&limits);
            async move { limits.acquire().await.waited() }
        });
        tokio::task::yield_now().await;
        advance(Duration::from_millis(500)).await;
        // A second 429 arrives: 3 s more from now.
        limits.cool_down(Duration::from_secs(3));
        // A shorter one does not shorten it.
        limits.cool_down(Duration::from_millis(10));
        assert_eq!(waiter.await.unwrap(), Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_then_rate_resumes_at_the_limit() {
        let limits = Arc::new(KeyLimits::new(
            &LimitConfig::builder().rate(10.0, 1).build().unwrap(),
        ));
        limits.cool_down(Duration::from_secs(1));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let limits = Arc::clone(&limits);
            tasks.push(tokio::spawn(async move {
                let _permit = limits.acquire().await;
                Instant::now() - start
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times.sort();
        let expected: Vec<_> = (0..5)
            .map(|i| Duration::from_millis(1000 + 100 * i))
            .collect();
        assert_eq!(times, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_caps_in_flight_per_key() {
        let key = Arc::new(KeyLimits::new(
            &LimitConfig::builder().max_in_flight(2).build().unwrap(),
        ));
        let other = KeyLimits::unlimited();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (key, in_flight, peak) =
                (Arc::clone(&key), Arc::clone(&in_flight), Arc::clone(&peak));
            tasks.push(tokio::spawn(async move {
                let permit = key.acquire().await;
                let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                sleep(Duration::from_millis(50)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            }));
        }
        // An unlimited key has no concurrency limit.
        let held: Vec<_> = (0..10).map(|_| other.try_acquire().unwrap()).collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        drop(held);
        assert_eq!(key.concurrency().map(ConcurrencyLimit::in_flight), Some(0));
        let first = key.try_acquire().unwrap();
        let _second = key.try_acquire().unwrap();
        assert_eq!(key.try_acquire().unwrap_err(), LimitBusy::AtCapacity);
        drop(first);
        assert!(key.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_and_concurrency_together_report_the_wait() {
        let limits = KeyLimits::new(
            &LimitConfig::builder()
                .rate(10.0, 2)
                .max_in_flight(1)
                .build()
                .unwrap(),
        );
        let first = limits.acquire().await;
        assert_eq!(first.waited(), Duration::ZERO);
        drop(first);
        assert_eq!(limits.acquire().await.waited(), Duration::ZERO);
        // The burst of 2 is spent: the next waits one interval.
        assert_eq!(limits.acquire().await.waited(), Duration::from_millis(100));
        assert_eq!(
            limits.try_acquire().unwrap_err().retry_in(),
            Some(Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn huge_cooldown_does_not_overflow() {
        let limits = KeyLimits::unlimited();
        limits.cool_down(Duration::MAX);
        assert_eq!(limits.cooldown_remaining(), Some(MAX_COOLDOWN));
    }

    #[test]
    fn types_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<KeyLimits>();
        assert_send_sync::<LimitPermit>();
    }

    #[test]
    fn acquire_futures_are_send() {
        fn assert_send<T: Send>(_: T) {}
        let limits = KeyLimits::unlimited();
        assert_send(limits.acquire());
    }
}
