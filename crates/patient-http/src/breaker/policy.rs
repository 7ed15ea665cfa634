//! [`BreakerPolicy`]: when a circuit breaker opens, how long it stays open and
//! how it closes again; built and validated by [`BreakerPolicyBuilder`].

use std::time::Duration;

/// A rejected [`BreakerPolicy`] setting; [`field`](Self::field) names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid breaker policy `{field}`: {reason}")]
pub struct InvalidBreakerPolicy {
    field: &'static str,
    reason: String,
}

impl InvalidBreakerPolicy {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidBreakerPolicy {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the invalid setting, as in [`BreakerPolicyBuilder`], e.g.
    /// `"failure_ratio"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with its value.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// When a [`CircuitBreaker`](super::CircuitBreaker) opens and how it recovers.
///
/// A closed breaker opens when, over the last
/// [`sampling_window`](Self::sampling_window), at least
/// [`minimum_throughput`](Self::minimum_throughput) calls were reported and
/// the share of failures among them reached
/// [`failure_ratio`](Self::failure_ratio); or when
/// [`consecutive_failures`](Self::consecutive_failures) calls failed in a row.
/// It stays open for [`break_duration`](Self::break_duration), then lets
/// [`half_open_probes`](Self::half_open_probes) probe(s) through at a time
/// and closes after [`success_threshold`](Self::success_threshold) probe
/// successes; a failed probe opens it again for another `break_duration`.
///
/// Build one with [`BreakerPolicy::builder`]; every default is stated on its
/// setter. A `BreakerPolicy` is always valid.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    failure_ratio: f64,
    sampling_window: Duration,
    sampling_buckets: u32,
    minimum_throughput: u32,
    consecutive_failures: Option<u32>,
    break_duration: Duration,
    half_open_probes: u32,
    success_threshold: u32,
}

impl Default for BreakerPolicy {
    /// Ratio 0.5 over 30 s (10 buckets) once 20 calls were seen, or 5
    /// consecutive failures; open for 30 s; 1 probe at a time; closes after 2
    /// successes.
    fn default() -> Self {
        BreakerPolicy {
            failure_ratio: 0.5,
            sampling_window: Duration::from_secs(30),
            sampling_buckets: 10,
            minimum_throughput: 20,
            consecutive_failures: Some(5),
            break_duration: Duration::from_secs(30),
            half_open_probes: 1,
            success_threshold: 2,
        }
    }
}

impl BreakerPolicy {
    /// Starts from the defaults ([`BreakerPolicy::default`]).
    pub fn builder() -> BreakerPolicyBuilder {
        BreakerPolicyBuilder {
            policy: BreakerPolicy::default(),
        }
    }

    /// The share of failed calls in the sampling window that opens the
    /// breaker, in `(0, 1]`. Default 0.5.
    pub fn failure_ratio(&self) -> f64 {
        self.failure_ratio
    }

    /// How far back the failure ratio looks. Default 30 s.
    pub fn sampling_window(&self) -> Duration {
        self.sampling_window
    }

    /// How many time buckets the sampling window is made of; outcomes leave
    /// the window one bucket at a time. Default 10.
    pub fn sampling_buckets(&self) -> u32 {
        self.sampling_buckets
    }

    /// The number of calls the window must hold before the failure ratio
    /// counts. Default 20.
    pub fn minimum_throughput(&self) -> u32 {
        self.minimum_throughput
    }

    /// This many failures in a row open the breaker whatever the ratio;
    /// `None` turns the rule off. Default `Some(5)`.
    pub fn consecutive_failures(&self) -> Option<u32> {
        self.consecutive_failures
    }

    /// How long the breaker stays open before it lets probes through.
    /// Default 30 s.
    pub fn break_duration(&self) -> Duration {
        self.break_duration
    }

    /// How many probes a half-open breaker lets through at a time. Default 1.
    pub fn half_open_probes(&self) -> u32 {
        self.half_open_probes
    }

    /// How many probe successes close a half-open breaker. Default 2.
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold
    }

    /// The length of one bucket of the sampling window.
    pub(crate) fn bucket_length(&self) -> Duration {
        self.sampling_window / self.sampling_buckets
    }
}

/// Builds a [`BreakerPolicy`]; [`build`](Self::build) checks every field.
#[derive(Debug, Clone)]
#[must_use]
pub struct BreakerPolicyBuilder {
    policy: BreakerPolicy,
}

impl BreakerPolicyBuilder {
    /// The share of failed calls in the sampling window that opens the
    /// breaker; must be in `(0, 1]`. Default 0.5.
    pub fn failure_ratio(mut self, ratio: f64) -> Self {
        self.policy.failure_ratio = ratio;
        self
    }

    /// How far back the failure ratio looks; must be at least 1 ms per
    /// bucket. Default 30 s.
    pub fn sampling_window(mut self, window: Duration) -> Self {
        self.policy.sampling_window = window;
        self
    }

    /// How many time buckets make up the sampling window, 1 to 1000; old
    /// outcomes leave the window one bucket at a time. Default 10.
    pub fn sampling_buckets(mut self, buckets: u32) -> Self {
        self.policy.sampling_buckets = buckets;
        self
    }

    /// The number of calls the window must hold before the failure ratio
    /// counts; at least 1. Default 20.
    pub fn minimum_throughput(mut self, calls: u32) -> Self {
        self.policy.minimum_throughput = calls;
        self
    }

    /// This many failures in a row open the breaker whatever the ratio; at
    /// least 1, or `None` to turn the rule off. Default `Some(5)`.
    pub fn consecutive_failures(mut self, failures: Option<u32>) -> Self {
        self.policy.consecutive_failures = failures;
        self
    }

    /// How long the breaker stays open before it lets probes through; more
    /// than zero. Default 30 s.
    pub fn break_duration(mut self, duration: Duration) -> Self {
        self.policy.break_duration = duration;
        self
    }

    /// How many probes a half-open breaker lets through at a time; at least
    /// 1. Default 1.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.policy.half_open_probes = probes;
        self
    }

    /// How many probe successes close a half-open breaker; at least 1.
    /// Default 2.
    pub fn success_threshold(mut self, successes: u32) -> Self {
        self.policy.success_threshold = successes;
        self
    }

    /// Checks every setting and returns the policy, or names the first
    /// invalid field.
    pub fn build(self) -> Result<BreakerPolicy, InvalidBreakerPolicy> {
        let p = self.policy;
        if !(p.failure_ratio > 0.0 && p.failure_ratio <= 1.0) {
            return Err(InvalidBreakerPolicy::new(
                "failure_ratio",
                format!("must be in (0, 1], got {}", p.failure_ratio),
            ));
        }
        if p.sampling_buckets == 0 || p.sampling_buckets > 1000 {
            return Err(InvalidBreakerPolicy::new(
                "sampling_buckets",
                format!("must be 1 to 1000, got {}", p.sampling_buckets),
            ));
        }
        if p.sampling_window < Duration::from_millis(1) * p.sampling_buckets {
            return Err(InvalidBreakerPolicy::new(
                "sampling_window",
                format!(
                    "must be at least 1 ms per bucket ({} buckets), got {:?}",
                    p.sampling_buckets, p.sampling_window
                ),
            ));
        }
        if p.minimum_throughput == 0 {
            return Err(InvalidBreakerPolicy::new(
                "minimum_throughput",
                "must be at least 1",
            ));
        }
        if p.consecutive_failures == Some(0) {
            return Err(InvalidBreakerPolicy::new(
                "consecutive_failures",
                "must be at least 1 (or None to turn the rule off)",
            ));
        }
        if p.break_duration.is_zero() {
            return Err(InvalidBreakerPolicy::new(
                "break_duration",
                "must be more than zero",
            ));
        }
        if p.half_open_probes == 0 {
            return Err(InvalidBreakerPolicy::new(
                "half_open_probes",
                "must be at least 1",
            ));
        }
        if p.success_threshold == 0 {
            return Err(InvalidBreakerPolicy::new(
                "success_threshold",
                "must be at least 1",
            ));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let p = BreakerPolicy::builder().build().unwrap();
        assert_eq!(p, BreakerPolicy::default());
        assert_eq!(p.failure_ratio(), 0.5);
        assert_eq!(p.sampling_window(), Duration::from_secs(30));
        assert_eq!(p.sampling_buckets(), 10);
        assert_eq!(p.bucket_length(), Duration::from_secs(3));
        assert_eq!(p.minimum_throughput(), 20);
        assert_eq!(p.consecutive_failures(), Some(5));
        assert_eq!(p.break_duration(), Duration::from_secs(30));
        assert_eq!(p.half_open_probes(), 1);
        assert_eq!(p.success_threshold(), 2);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: Vec<(BreakerPolicyBuilder, &str)> = vec![
            (BreakerPolicy::builder().failure_ratio(0.0), "failure_ratio"),
            (BreakerPolicy::builder().failure_ratio(1.5), "failure_ratio"),
            (
                BreakerPolicy::builder().failure_ratio(f64::NAN),
                "failure_ratio",
            ),
            (
                BreakerPolicy::builder().sampling_window(Duration::ZERO),
                "sampling_window",
            ),
            (
                BreakerPolicy::builder().sampling_buckets(0),
                "sampling_buckets",
            ),
            (
                BreakerPolicy::builder().minimum_throughput(0),
                "minimum_throughput",
            ),
            (
                BreakerPolicy::builder().consecutive_failures(Some(0)),
                "consecutive_failures",
            ),
            (
                BreakerPolicy::builder().break_duration(Duration::ZERO),
                "break_duration",
            ),
            (
                BreakerPolicy::builder().half_open_probes(0),
                "half_open_probes",
            ),
            (
                BreakerPolicy::builder().success_threshold(0),
                "success_threshold",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), field);
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn accepts_edge_values() {
        let p = BreakerPolicy::builder()
            .failure_ratio(1.0)
            .sampling_window(Duration::from_millis(1))
            .sampling_buckets(1)
            .minimum_throughput(1)
            .consecutive_failures(None)
            .break_duration(Duration::from_millis(1))
            .half_open_probes(1)
            .success_threshold(1)
            .build()
            .unwrap();
        assert_eq!(p.consecutive_failures(), None);
    }
}
