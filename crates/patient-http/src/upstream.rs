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
    /// The registry's tick when a task last resolved this state, for
    /// least-recently-used eviction.
    last_used: AtomicU64,
}

impl UpstreamState {
    /// Whether an attempt must pass through the limits.
    pub(crate) fn is_limited(&self) -> bool {
        self.limited || self.cooled.load(Ordering::Relaxed)
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
