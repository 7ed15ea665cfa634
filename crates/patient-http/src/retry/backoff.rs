//! Backoffs with full jitter: exponential ([`ExponentialBackoff`]), linear
//! ([`LinearBackoff`]) and the choice of the two a policy holds ([`Backoff`]).

use std::time::Duration;

/// How long to wait between attempts: exponential growth with full jitter.
///
/// The delay before retry `n` (0 for the first retry) is drawn uniformly from
/// `[0, min(max, base × factorⁿ)]` — the "full jitter" of the AWS
/// architecture blog, which spreads a burst of clients that failed together
/// across the whole window instead of letting them return in lock step.
///
/// The default is a base of 100 ms, a factor of 2 and a cap of 10 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    base: Duration,
    factor: f64,
    max: Duration,
}

impl ExponentialBackoff {
    /// A backoff that starts at `base`, grows by `factor` per retry and never
    /// exceeds `max`.
    ///
    /// # Errors
    ///
    /// [`InvalidBackoff`] naming the first bad parameter: `base` must be
    /// greater than zero, `factor` a finite number of at least 1, and `max`
    /// at least `base`.
    pub fn new(base: Duration, factor: f64, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::Base);
        }
        if !factor.is_finite() || factor < 1.0 {
            return Err(InvalidBackoff::Factor(factor));
        }
        if max < base {
            return Err(InvalidBackoff::Max { base, max });
        }
        Ok(Self { base, factor, max })
    }

    /// The ceiling before the first retry (default 100 ms).
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The growth per retry (default 2).
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The largest delay (default 10 s).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The un-jittered cap for retry `retry` (0 for the first retry):
    /// `min(max, base × factor^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry).unwrap_or(i32::MAX);
        let nanos = self.base.as_nanos() as f64 * self.factor.powi(exponent);
        if !nanos.is_finite() || nanos >= self.max.as_nanos() as f64 {
            return self.max;
        }
        // `as` saturates; the `min` keeps the result at or under the cap.
        Duration::from_nanos(nanos.round() as u64).min(self.max)
    }

    /// The delay before retry `retry` (0 for the first retry): uniform in
    /// `[0, ceiling(retry)]`, drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        jittered(self.ceiling(retry), rng)
    }
}

impl Default for ExponentialBackoff {
    /// Base 100 ms, factor 2, max 10 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(10),
        }
    }
}

/// How long to wait between attempts: linear growth with full jitter.
///
/// The delay before retry `n` (0 for the first retry) is drawn uniformly from
/// `[0, min(max, base × (n + 1))]`, the same full jitter as
/// [`ExponentialBackoff`].
///
/// The default is a base of 100 ms and a cap of 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearBackoff {
    base: Duration,
    max: Duration,
}

impl LinearBackoff {
    /// A backoff that starts at `base`, grows by `base` per retry and never
    /// exceeds `max`.
    ///
    /// # Errors
    ///
    /// [`InvalidBackoff`] naming the first bad parameter: `base` must be
    /// greater than zero and `max` at least `base`.
    pub fn new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::Base);
        }
        if max < base {
            return Err(InvalidBackoff::Max { base, max });
        }
        Ok(Self { base, max })
    }

    /// The ceiling before the first retry and the growth per retry (default
    /// 100 ms).
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay (default 10 s).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The un-jittered cap for retry `retry` (0 for the first retry):
    /// `min(max, base × (retry + 1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.base
            .checked_mul(retry.saturating_add(1))
            .map_or(self.max, |ceiling| ceiling.min(self.max))
    }

    /// The delay before retry `retry` (0 for the first retry): uniform in
    /// `[0, ceiling(retry)]`, drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        jittered(self.ceiling(retry), rng)
    }
}

impl Default for LinearBackoff {
    /// Base 100 ms, max 10 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// The backoff a [`RetryPolicy`](super::RetryPolicy) waits between attempts:
/// exponential (the default, [`ExponentialBackoff::default`]) or linear.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Backoff {
    /// `base × factorⁿ` capped at `max`, full jitter.
    Exponential(ExponentialBackoff),
    /// `base × (n + 1)` capped at `max`, full jitter.
    Linear(LinearBackoff),
}

impl Backoff {
    /// Which of the two this is.
    pub fn kind(&self) -> BackoffKind {
        match self {
            Backoff::Exponential(_) => BackoffKind::Exponential,
            Backoff::Linear(_) => BackoffKind::Linear,
        }
    }

    /// The ceiling before the first retry.
    pub fn base(&self) -> Duration {
        match self {
            Backoff::Exponential(b) => b.base(),
            Backoff::Linear(b) => b.base(),
        }
    }

    /// The growth factor per retry of an exponential backoff; `None` for a
    /// linear one.
    pub fn factor(&self) -> Option<f64> {
        match self {
            Backoff::Exponential(b) => Some(b.factor()),
            Backoff::Linear(_) => None,
        }
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        match self {
            Backoff::Exponential(b) => b.max(),
            Backoff::Linear(b) => b.max(),
        }
    }

    /// The un-jittered cap for retry `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        match self {
            Backoff::Exponential(b) => b.ceiling(retry),
            Backoff::Linear(b) => b.ceiling(retry),
        }
    }

    /// The delay before retry `retry` (0 for the first retry): uniform in
    /// `[0, ceiling(retry)]`, drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        jittered(self.ceiling(retry), rng)
    }
}

impl Default for Backoff {
    /// [`ExponentialBackoff::default`].
    fn default() -> Self {
        Backoff::Exponential(ExponentialBackoff::default())
    }
}

impl From<ExponentialBackoff> for Backoff {
    fn from(backoff: ExponentialBackoff) -> Self {
        Backoff::Exponential(backoff)
    }
}

impl From<LinearBackoff> for Backoff {
    fn from(backoff: LinearBackoff) -> Self {
        Backoff::Linear(backoff)
    }
}

impl PartialEq<ExponentialBackoff> for Backoff {
    fn eq(&self, other: &ExponentialBackoff) -> bool {
        matches!(self, Backoff::Exponential(b) if b == other)
    }
}

impl PartialEq<LinearBackoff> for Backoff {
    fn eq(&self, other: &LinearBackoff) -> bool {
        matches!(self, Backoff::Linear(b) if b == other)
    }
}

/// The shape of a [`Backoff`], chosen with
/// [`RetryPolicyBuilder::backoff_kind`](super::RetryPolicyBuilder::backoff_kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackoffKind {
    /// [`ExponentialBackoff`] (the default).
    #[default]
    Exponential,
    /// [`LinearBackoff`]; the factor is not used.
    Linear,
}

/// Full jitter: uniform in `[0, ceiling]`.
fn jittered(ceiling: Duration, rng: &mut fastrand::Rng) -> Duration {
    let ceiling = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=ceiling))
}

/// The parameters given to [`ExponentialBackoff::new`] or
/// [`LinearBackoff::new`] do not make a backoff.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBackoff {
    /// `base` is zero.
    #[error("invalid backoff base: must be greater than zero")]
    Base,
    /// `factor` is below 1, infinite or NaN.
    #[error("invalid backoff factor {0}: must be a finite number of at least 1")]
    Factor(f64),
    /// `max` is below `base`.
    #[error("invalid backoff max {max:?}: must be at least the base {base:?}")]
    Max {
        /// The base that was given.
        base: Duration,
        /// The max that was given.
        max: Duration,
    },
}

impl InvalidBackoff {
    /// The name of the bad parameter: `"base"`, `"factor"` or `"max"`.
    pub fn parameter(&self) -> &'static str {
        match self {
            InvalidBackoff::Base => "base",
            InvalidBackoff::Factor(_) => "factor",
            InvalidBackoff::Max { .. } => "max",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn default_is_100ms_by_2_up_to_10s() {
        let b = ExponentialBackoff::default();
        assert_eq!(b.base(), ms(100));
        assert_eq!(b.factor(), 2.0);
        assert_eq!(b.max(), Duration::from_secs(10));
        assert_eq!(ExponentialBackoff::new(ms(100), 2.0, ms(10_000)), Ok(b));
    }

    #[test]
    fn ceilings_grow_geometrically_then_cap() {
        let b = ExponentialBackoff::default();
        let ceilings: Vec<u64> = (0..10).map(|r| b.ceiling(r).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn ceiling_survives_huge_retry_numbers() {
        let b = ExponentialBackoff::default();
        assert_eq!(b.ceiling(1_000), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
        let huge = ExponentialBackoff::new(ms(1), 1_000.0, Duration::MAX).unwrap();
        assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
    }

    #[test]
    fn factor_one_is_constant() {
        let b = ExponentialBackoff::new(ms(250), 1.0, ms(250)).unwrap();
        for r in [0, 1, 5, 100] {
            assert_eq!(b.ceiling(r), ms(250));
        }
    }

    #[test]
    fn fractional_factor() {
        let b = ExponentialBackoff::new(ms(100), 1.5, Duration::from_secs(1)).unwrap();
        assert_eq!(b.ceiling(1), ms(150));
        assert_eq!(b.ceiling(2), ms(225));
        assert_eq!(b.ceiling(6), Duration::from_secs(1));
    }

    #[test]
    fn seeded_delays_are_reproducible_and_under_the_ceiling() {
        let b = ExponentialBackoff::default();
        let first: Vec<Duration> = {
            let mut rng = fastrand::Rng::with_seed(7);
            (0..12).map(|r| b.delay(r, &mut rng)).collect()
        };
        let again: Vec<Duration> = {
            let mut rng = fastrand::Rng::with_seed(7);
            (0..12).map(|r| b.delay(r, &mut rng)).collect()
        };
        assert_eq!(first, again);
        for (r, d) in first.iter().enumerate() {
            assert!(*d <= b.ceiling(r as u32), "retry {r}: {d:?}");
        }
        let other: Vec<Duration> = {
            let mut rng = fastrand::Rng::with_seed(8);
            (0..12).map(|r| b.delay(r, &mut rng)).collect()
        };
        assert_ne!(first, other);
    }

    #[test]
    fn full_jitter_covers_the_whole_window() {
        let b = ExponentialBackoff::default();
        let mut rng = fastrand::Rng::with_seed(42);
        let ceiling = b.ceiling(3);
        let samples: Vec<Duration> = (0..10_000).map(|_| b.delay(3, &mut rng)).collect();
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        assert!(samples.iter().all(|d| *d <= ceiling));
        assert!(min < ceiling / 100, "min {min:?}");
        assert!(max > ceiling * 99 / 100, "max {max:?}");
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        assert!(
            mean > ceiling * 45 / 100 && mean < ceiling * 55 / 100,
            "mean {mean:?}"
        );
    }

    #[test]
    fn delays_at_the_cap_stay_under_max() {
        let b = ExponentialBackoff::new(ms(100), 2.0, ms(300)).unwrap();
        let mut rng = fastrand::Rng::with_seed(1);
        for r in 0..50 {
            assert!(b.delay(r, &mut rng) <= ms(300));
        }
    }

    #[test]
    fn zero_base_is_rejected() {
        let err = ExponentialBackoff::new(Duration::ZERO, 2.0, ms(10)).unwrap_err();
        assert_eq!(err, InvalidBackoff::Base);
        assert_eq!(err.parameter(), "base");
        assert!(err.to_string().contains("base"));
    }

    #[test]
    fn bad_factors_are_rejected() {
        for factor in [0.0, 0.99, -2.0, f64::NAN, f64::INFINITY] {
            let err = ExponentialBackoff::new(ms(100), factor, ms(1000)).unwrap_err();
            assert_eq!(err.parameter(), "factor", "{factor}");
            assert!(err.to_string().contains("factor"));
        }
    }

    #[test]
    fn max_below_base_is_rejected() {
        let err = ExponentialBackoff::new(ms(100), 2.0, ms(99)).unwrap_err();
        assert_eq!(
            err,
            InvalidBackoff::Max {
                base: ms(100),
                max: ms(99)
            }
        );
        assert_eq!(err.parameter(), "max");
        assert!(ExponentialBackoff::new(ms(100), 2.0, ms(100)).is_ok());
    }

    #[test]
    fn linear_default_is_100ms_up_to_10s() {
        let b = LinearBackoff::default();
        assert_eq!(b.base(), ms(100));
        assert_eq!(b.max(), Duration::from_secs(10));
        assert_eq!(LinearBackoff::new(ms(100), ms(10_000)), Ok(b));
    }

    #[test]
    fn linear_ceilings_grow_by_the_base_then_cap() {
        let b = LinearBackoff::new(ms(100), ms(450)).unwrap();
        let ceilings: Vec<u64> = (0..7).map(|r| b.ceiling(r).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 300, 400, 450, 450, 450]);
        assert_eq!(b.ceiling(u32::MAX), ms(450));
        let uncapped = LinearBackoff::new(Duration::from_secs(1), Duration::MAX).unwrap();
        assert_eq!(
            uncapped.ceiling(u32::MAX - 1),
            Duration::from_secs(u64::from(u32::MAX))
        );
        let huge = LinearBackoff::new(Duration::MAX, Duration::MAX).unwrap();
        assert_eq!(huge.ceiling(1), Duration::MAX);
    }

    #[test]
    fn linear_seeded_delays_are_reproducible_and_under_the_ceiling() {
        let b = LinearBackoff::default();
        let draw = |seed| -> Vec<Duration> {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..12).map(|r| b.delay(r, &mut rng)).collect()
        };
        let first = draw(7);
        assert_eq!(first, draw(7));
        assert_ne!(first, draw(8));
        for (r, d) in first.iter().enumerate() {
            assert!(*d <= ms(100) * (r as u32 + 1), "retry {r}: {d:?}");
        }
        // The same jitter as the exponential backoff: the same draw for the
        // same ceiling.
        let e = ExponentialBackoff::new(ms(100), 1.0, ms(100)).unwrap();
        let mut a = fastrand::Rng::with_seed(5);
        let mut c = fastrand::Rng::with_seed(5);
        assert_eq!(b.delay(0, &mut a), e.delay(0, &mut c));
    }

    #[test]
    fn linear_full_jitter_covers_the_whole_window() {
        let b = LinearBackoff::default();
        let mut rng = fastrand::Rng::with_seed(42);
        let ceiling = b.ceiling(3);
        assert_eq!(ceiling, ms(400));
        let samples: Vec<Duration> = (0..10_000).map(|_| b.delay(3, &mut rng)).collect();
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        assert!(samples.iter().all(|d| *d <= ceiling));
        assert!(min < ceiling / 100, "min {min:?}");
        assert!(max > ceiling * 99 / 100, "max {max:?}");
    }

    #[test]
    fn linear_bad_parameters_are_rejected() {
        let err = LinearBackoff::new(Duration::ZERO, ms(10)).unwrap_err();
        assert_eq!(err, InvalidBackoff::Base);
        assert_eq!(err.parameter(), "base");
        let err = LinearBackoff::new(ms(100), ms(99)).unwrap_err();
        assert_eq!(
            err,
            InvalidBackoff::Max {
                base: ms(100),
                max: ms(99)
            }
        );
        assert_eq!(err.parameter(), "max");
        assert!(err.to_string().contains("max"));
        assert!(LinearBackoff::new(ms(100), ms(100)).is_ok());
    }

    #[test]
    fn backoff_dispatches_to_its_kind() {
        let linear = Backoff::from(LinearBackoff::new(ms(100), ms(1000)).unwrap());
        let exponential = Backoff::from(ExponentialBackoff::default());
        assert_eq!(Backoff::default(), exponential);
        assert_eq!(linear.kind(), BackoffKind::Linear);
        assert_eq!(exponential.kind(), BackoffKind::Exponential);
        assert_eq!(linear.factor(), None);
        assert_eq!(exponential.factor(), Some(2.0));
        assert_eq!(linear.ceiling(2), ms(300));
        assert_eq!(exponential.ceiling(2), ms(400));
        let mut a = fastrand::Rng::with_seed(9);
        let mut c = fastrand::Rng::with_seed(9);
        assert_eq!(
            linear.delay(4, &mut a),
            LinearBackoff::new(ms(100), ms(1000))
                .unwrap()
                .delay(4, &mut c)
        );
    }
}
