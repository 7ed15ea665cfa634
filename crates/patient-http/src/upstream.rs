//! The live state of each upstream: its circuit breaker, rate and
//! concurrency limits, cool-down, recent latencies and metric handles, kept
//! together as one [`UpstreamState`] and resolved once per task.
//!
//! Upstream keys come from input (a request's URL or its `upstream_key`), so
//! the set of states is bounded: past `max_upstreams` states ([`ResilienceConfig::max_upstreams`](crate::ResilienceConfig::max_upstreams)), those no
//! task is using are evicted, least recently used first. An evicted
//! upstream starts afresh (closed breaker, full bucket) the next time it is
//! used.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use rustc_hash::FxHashMap;

use crate::{
    breaker::{BreakerState, CircuitBreaker},
    limit::KeyLimits,
    metrics::{Metrics, UpstreamMetrics},
    observer::Observers,
    resilience::{HedgeDelay, UpstreamPolicy},
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

    pub(crate) fn record(&mut self, d: Duration) {
        if self.samples.len() == Self::CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(d);
    }

    /// The `p`th percentile, once enough samples are in.
    pub(crate) fn percentile(&self, p: f64) -> Option<Duration> {
        if self.samples.len() < Self::MIN_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted.get(rank.min(sorted.len() - 1)).copied()
    }
}

/// Attempts and failures of an upstream over the last
/// [`RecentOutcomes::WINDOW_SECS`] seconds, in one-second buckets of atomics
/// (no lock on the request path).
pub(crate) struct RecentOutcomes {
    /// Per bucket: the second it counts (since the registry's origin), then
    /// attempts and failures in it.
    buckets: [(AtomicU64, AtomicU64, AtomicU64); RecentOutcomes::WINDOW_SECS as usize],
    origin: tokio::time::Instant,
}

impl RecentOutcomes {
    /// The window the error rate is taken over.
    pub(crate) const WINDOW_SECS: u64 = 60;

    fn new() -> Self {
        RecentOutcomes {
            buckets: std::array::from_fn(|_| {
                (
                    AtomicU64::new(u64::MAX),
                    AtomicU64::new(0),
                    AtomicU64::new(0),
                )
            }),
            origin: tokio::time::Instant::now(),
        }
    }

    fn second(&self, at: tokio::time::Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs()
    }

    /// Counts one attempt that ended at `at`; `failed` as the breaker would
    /// count it.
    pub(crate) fn record(&self, at: tokio::time::Instant, failed: bool) {
        let second = self.second(at);
        let (epoch, attempts, failures) = &self.buckets[(second % Self::WINDOW_SECS) as usize];
        if epoch.load(Ordering::Acquire) != second {
            // A new second for this bucket: the first to see it resets it.
            // (A racing increment may land in the old count; the rate is an
            // estimate, never a decision.)
            if epoch.swap(second, Ordering::AcqRel) != second {
                attempts.store(0, Ordering::Release);
                failures.store(0, Ordering::Release);
            }
        }
        attempts.fetch_add(1, Ordering::Relaxed);
        if failed {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Attempts and failures within the window ending now.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let now = self.second(tokio::time::Instant::now());
        let mut totals = (0, 0);
        for (epoch, attempts, failures) in &self.buckets {
            let second = epoch.load(Ordering::Acquire);
            if second != u64::MAX && second <= now && now - second < Self::WINDOW_SECS {
                totals.0 += attempts.load(Ordering::Relaxed);
                totals.1 += failures.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

/// One upstream's breaker, limits, latency window and metric handles.
pub(crate) struct UpstreamState {
    /// The circuit breaker, when the upstream's policy has one.
    pub(crate) breaker: Option<CircuitBreaker>,
    /// Rate and concurrency limits and the 429 cool-down.
    pub(crate) limits: KeyLimits,
    /// Whether the policy sets a rate or concurrency limit.
    limited: bool,
    /// Whether a 429 ever cooled this upstream down (until then an unlimited
    /// upstream skips the limits entirely).
    cooled: AtomicBool,
    /// Recent latencies, for adaptive hedging only.
    pub(crate) latencies: Option<Mutex<LatencyWindow>>,
    /// The upstream's metric handles.
    pub(crate) metrics: Arc<UpstreamMetrics>,
    /// Recent attempts and failures, for health queries.
    pub(crate) recent: RecentOutcomes,
    /// The registry's tick when a task last resolved this state, for
    /// least-recently-used eviction.
    last_used: AtomicU64,
}

impl UpstreamState {
    /// Whether an attempt must pass through the limits.
    pub(crate) fn is_limited(&self) -> bool {
        self.limited || self.cooled.load(Ordering::Relaxed)
    }

    /// Its state now, for health queries.
    pub(crate) fn health(&self, key: &str) -> crate::UpstreamHealth {
        let (attempts, failures) = self.recent.totals();
        crate::UpstreamHealth {
            key: key.to_owned(),
            breaker: self.breaker.as_ref().map(CircuitBreaker::state),
            in_flight: self.limits.concurrency().map(|c| c.in_flight()),
            max_in_flight: self.limits.concurrency().map(|c| c.max_in_flight()),
            cooldown_remaining: self.limits.cooldown_remaining(),
            recent_attempts: attempts,
            recent_failures: failures,
        }
    }

    /// Holds every attempt to this upstream back for `wait` (a 429's
    /// `Retry-After`).
    pub(crate) fn cool_down(&self, wait: Duration) {
        self.cooled.store(true, Ordering::Relaxed);
        self.limits.cool_down(wait);
    }
}

/// The [`UpstreamState`] of every upstream key in use, bounded.
pub(crate) struct Upstreams {
    states: RwLock<FxHashMap<Box<str>, Arc<UpstreamState>>>,
    max: usize,
    /// A logical clock that ticks on every new state: a state resolved since
    /// the last tick is more recently used than one that was not. (Cheaper
    /// than reading the clock on every task, and all LRU needs.)
    tick: AtomicU64,
}

impl Upstreams {
    /// A registry keeping at most about `max` states.
    pub(crate) fn new(max: usize) -> Self {
        Upstreams {
            states: RwLock::new(FxHashMap::default()),
            max: max.max(1),
            tick: AtomicU64::new(0),
        }
    }

    /// How many states are kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        read(&self.states).len()
    }

    /// The health of every upstream kept now, by key.
    pub(crate) fn health(&self) -> Vec<crate::UpstreamHealth> {
        let states: Vec<(Box<str>, Arc<UpstreamState>)> = read(&self.states)
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(s)))
            .collect();
        // Breaker queries may call observers: outside the registry's lock.
        let mut health: Vec<_> = states.iter().map(|(k, s)| s.health(k)).collect();
        health.sort_by(|a, b| a.key.cmp(&b.key));
        health
    }

    /// The health of one upstream, if it is kept.
    pub(crate) fn health_of(&self, key: &str) -> Option<crate::UpstreamHealth> {
        let state = read(&self.states).get(key).map(Arc::clone)?;
        Some(state.health(key))
    }

    /// Whether `key` takes attempts now (no state kept: it does): its
    /// breaker is not open and it is not cooling down, as
    /// [`UpstreamHealth::is_available`](crate::UpstreamHealth::is_available)
    /// says, without counting the last minute's attempts.
    pub(crate) fn is_available(&self, key: &str) -> bool {
        let Some(state) = read(&self.states).get(key).map(Arc::clone) else {
            return true;
        };
        crate::health::available(
            state.breaker.as_ref().map(CircuitBreaker::state),
            state.limits.cooldown_remaining(),
        )
    }

    /// The state of `key`, made from `policy` on first use.
    pub(crate) fn resolve(
        &self,
        key: &str,
        policy: &UpstreamPolicy,
        metrics: &Metrics,
        observers: &Arc<Observers>,
    ) -> Arc<UpstreamState> {
        let now = self.tick.load(Ordering::Relaxed);
        if let Some(state) = read(&self.states).get(key) {
            // Written only when it changes: tasks of a busy upstream share
            // the line without bouncing it between cores.
            if state.last_used.load(Ordering::Relaxed) != now {
                state.last_used.store(now, Ordering::Relaxed);
            }
            return Arc::clone(state);
        }
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let state = Arc::new(new_state(key, policy, metrics, observers, now));
        let mut states = write(&self.states);
        if let Some(existing) = states.get(key) {
            existing.last_used.store(now, Ordering::Relaxed);
            return Arc::clone(existing);
        }
        if states.len() >= self.max {
            // Room for this one, and for a few more before the next scan.
            evict(&mut states, (self.max - self.max / 8).saturating_sub(1));
        }
        states.insert(key.into(), Arc::clone(&state));
        state
    }
}

/// Removes unused states, least recently used first, until `target` remain
/// (or none is unused).
fn evict(states: &mut FxHashMap<Box<str>, Arc<UpstreamState>>, target: usize) {
    let mut unused: Vec<(u64, Box<str>)> = states
        .iter()
        .filter(|(_, s)| Arc::strong_count(s) == 1)
        .map(|(k, s)| (s.last_used.load(Ordering::Relaxed), k.clone()))
        .collect();
    unused.sort_unstable_by_key(|(used, _)| *used);
    let excess = states.len().saturating_sub(target);
    for (_, key) in unused.into_iter().take(excess) {
        states.remove(&key);
    }
}

fn new_state(
    key: &str,
    policy: &UpstreamPolicy,
    metrics: &Metrics,
    observers: &Arc<Observers>,
    now: u64,
) -> UpstreamState {
    let upstream_metrics = metrics.upstream(key);
    let breaker = policy.breaker().map(|breaker_policy| {
        let gauge = Arc::clone(&upstream_metrics);
        let observers = Arc::clone(observers);
        let key_owned = key.to_owned();
        gauge.set_breaker_state(BreakerState::Closed.as_gauge());
        CircuitBreaker::with_on_transition(breaker_policy.clone(), move |from, to| {
            gauge.set_breaker_state(to.as_gauge());
            tracing::warn!(upstream = %key_owned, from = from.as_str(), to = to.as_str(), "circuit breaker state changed");
            for o in observers.snapshot().iter().flat_map(|list| list.iter()) {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    o.on_breaker_state_change(&key_owned, from, to)
                }));
            }
        })
    });
    let limits = policy.limits();
    UpstreamState {
        breaker,
        limits: KeyLimits::new(limits),
        limited: limits.rate().is_some() || limits.max_in_flight().is_some(),
        cooled: AtomicBool::new(false),
        latencies: matches!(policy.hedge_delays(), HedgeDelay::Adaptive { .. })
            .then(|| Mutex::new(LatencyWindow::default())),
        metrics: upstream_metrics,
        recent: RecentOutcomes::new(),
        last_used: AtomicU64::new(now),
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Arc<Observers> {
        Arc::new(Observers::default())
    }

    #[test]
    fn unused_states_are_evicted_past_the_bound() {
        let upstreams = Upstreams::new(64);
        let metrics = Metrics::new();
        let policy = UpstreamPolicy::default();
        let held = upstreams.resolve("http://held", &policy, &metrics, &none());
        for i in 0..10_000 {
            let _ = upstreams.resolve(&format!("http://host-{i}"), &policy, &metrics, &none());
            assert!(
                upstreams.len() <= 64,
                "{} states after {i}",
                upstreams.len()
            );
        }
        // The state a task still holds was never evicted.
        let again = upstreams.resolve("http://held", &policy, &metrics, &none());
        assert!(Arc::ptr_eq(&held, &again));
    }

    #[test]
    fn states_in_use_are_kept_beyond_the_bound() {
        let upstreams = Upstreams::new(4);
        let metrics = Metrics::new();
        let policy = UpstreamPolicy::default();
        let held: Vec<_> = (0..8)
            .map(|i| upstreams.resolve(&format!("http://h{i}"), &policy, &metrics, &none()))
            .collect();
        assert_eq!(upstreams.len(), 8);
        drop(held);
        let _ = upstreams.resolve("http://next", &policy, &metrics, &none());
        assert!(upstreams.len() <= 4);
    }
}
