//! Deadlines from durations that may come from input: `now + d` must never
//! panic, however large `d` is.

use std::time::Duration;

use tokio::time::Instant;

/// `base + d`, or `None` when that is beyond what the clock can represent.
pub(crate) fn checked_after(base: Instant, d: Duration) -> Option<Instant> {
    base.checked_add(d)
}

/// `base + d`, saturating at a point far enough away to mean "never".
pub(crate) fn saturating_after(base: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    base.checked_add(d.min(FAR))
        .or_else(|| base.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn huge_durations_saturate() {
        let now = Instant::now();
        assert!(saturating_after(now, Duration::MAX) > now);
        assert_eq!(checked_after(now, Duration::MAX), None);
        assert_eq!(
            saturating_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
