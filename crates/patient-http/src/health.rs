//! Upstream health on demand: breaker state, limit use, cool-down and the
//! recent error rate of each upstream the engine keeps state for, and a
//! summary over all of them.

use std::time::Duration;

use crate::breaker::BreakerState;

/// One upstream's state now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UpstreamHealth {
    /// The upstream key (`scheme://host[:port]`, or a request's `upstream_key`).
    pub key: String,
    /// The circuit breaker's state, when the upstream's policy has one.
    pub breaker: Option<BreakerState>,
    /// Requests in flight, when the upstream has a concurrency limit.
    pub in_flight: Option<usize>,
    /// That limit.
    pub max_in_flight: Option<usize>,
    /// The rest of a 429 cool-down, while one holds the upstream back.
    pub cooldown_remaining: Option<Duration>,
    /// Attempts sent in the last minute.
    pub recent_attempts: u64,
    /// Those of them that failed as the breaker counts failures (timeouts,
    /// connection and TLS errors, the failure statuses: 429 and 5xx by
    /// default), whether or not the upstream has a breaker.
    pub recent_failures: u64,
}

impl UpstreamHealth {
    /// Failures per attempt in the last minute (0 with no attempts).
    pub fn error_rate(&self) -> f64 {
        if self.recent_attempts == 0 {
            0.0
        } else {
            self.recent_failures as f64 / self.recent_attempts as f64
        }
    }

    /// Whether requests go through now: no open breaker, no cool-down.
    pub fn is_available(&self) -> bool {
        available(self.breaker, self.cooldown_remaining)
    }
}

/// Every upstream's health at once.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HealthSummary {
    /// Each upstream kept, ordered by key.
    pub upstreams: Vec<UpstreamHealth>,
}

impl HealthSummary {
    /// Upstreams whose breaker is open.
    pub fn open_breakers(&self) -> usize {
        self.upstreams
            .iter()
            .filter(|u| u.breaker == Some(BreakerState::Open))
            .count()
    }

    /// Upstreams cooling down after a 429.
    pub fn cooling_down(&self) -> usize {
        self.upstreams
            .iter()
            .filter(|u| u.cooldown_remaining.is_some())
            .count()
    }

    /// Whether every upstream takes requests now.
    pub fn is_healthy(&self) -> bool {
        self.upstreams.iter().all(UpstreamHealth::is_available)
    }
}

/// Whether an upstream takes attempts: its breaker (if any) is not open and
/// it is not cooling down.
pub(crate) fn available(breaker: Option<BreakerState>, cooldown: Option<Duration>) -> bool {
    breaker != Some(BreakerState::Open) && cooldown.is_none()
}
