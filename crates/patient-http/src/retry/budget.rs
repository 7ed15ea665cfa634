//! A retry budget: retries as a share of first attempts over a sliding window.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// The window is kept as this many slots; a deposit or withdrawal counts
/// for between `(SLOTS - 1) / SLOTS × ttl` and `ttl`.
const SLOTS: usize = 10;
/// Balances are kept in thousandths of a retry so that any ratio with three
/// decimals is exact.
const SCALE: i64 = 1_000;
/// Shortest window accepted.
const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest window accepted.
const MAX_TTL: Duration = Duration::from_secs(60);
/// Largest ratio accepted.
const MAX_RATIO: f32 = 1_000.0;

/// Caps retries at a share of first attempts, so that an outage cannot
/// multiply the load on an upstream.
///
/// Every first attempt [`deposit`](Self::deposit)s `retry_ratio` of a retry;
/// every retry must [`withdraw`](Self::withdraw) one whole retry first.
/// Deposits and withdrawals expire after `ttl`, and on top of them a reserve
/// of `min_per_sec × ttl` retries is always available, so a client that
/// sends few requests can still retry some of them. Over any window of `ttl`
/// the retries allowed are therefore at most
/// `retry_ratio × first attempts + min_per_sec × ttl`.
///
/// This is the budget of Finagle and of tower's `TpsBudget`, on
/// [`tokio::time::Instant`] so that `tokio::time::pause()` drives it, with a
/// fixed-point balance (a ratio of 0.3 means 3 retries per 10 attempts, not
/// 1 per 3) and one lock around the check and the withdrawal, so concurrent
/// callers cannot overdraw it.
///
/// Defaults: `ttl` 10 s, `min_per_sec` 10, `retry_ratio` 0.2. Cheap to share
/// behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct RetryBudget {
    ttl: Duration,
    min_per_sec: u32,
    retry_ratio: f32,
    /// Added by each deposit, in thousandths of a retry.
    deposit_amount: i64,
    /// Always available, in thousandths of a retry.
    reserve: i64,
    slot_length: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When slot 0 began.
    start: Instant,
    /// The absolute number of the slot written last.
    head: u64,
    /// Net deposits per slot, in thousandths of a retry; slot `n` lives at
    /// `n % SLOTS`.
    slots: [i64; SLOTS],
}

impl RetryBudget {
    /// A budget whose deposits last `ttl` (1 to 60 s), with a reserve of
    /// `min_per_sec` retries per second of `ttl`, and `retry_ratio` retries
    /// allowed per first attempt (0 to 1000; 0.2 = one retry per five
    /// requests).
    ///
    /// # Errors
    ///
    /// [`InvalidBudget`] naming the bad parameter.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Result<Self, InvalidBudget> {
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(InvalidBudget::Ttl(ttl));
        }
        if !(0.0..=MAX_RATIO).contains(&retry_ratio) {
            return Err(InvalidBudget::RetryRatio(retry_ratio));
        }
        Ok(Self::unchecked(ttl, min_per_sec, retry_ratio))
    }

    /// A budget from parameters already checked.
    fn unchecked(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        // Both products are far below i64::MAX: at most 1000 × 1000 and
        // u32::MAX × 60 × 1000.
        let deposit_amount = (f64::from(retry_ratio) * SCALE as f64).round() as i64;
        let reserve_retries = (f64::from(min_per_sec) * ttl.as_secs_f64()).floor() as i64;
        Self {
            ttl,
            min_per_sec,
            retry_ratio,
            deposit_amount,
            reserve: reserve_retries.saturating_mul(SCALE),
            slot_length: ttl / SLOTS as u32,
            window: Mutex::new(Window {
                start: Instant::now(),
                head: 0,
                slots: [0; SLOTS],
            }),
        }
    }

    /// How long a deposit or withdrawal counts (default 10 s).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Retries per second of `ttl` always allowed (default 10).
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// Retries allowed per first attempt (default 0.2).
    pub fn retry_ratio(&self) -> f32 {
        self.retry_ratio
    }

    /// Records a first attempt, earning `retry_ratio` of a retry.
    pub fn deposit(&self) {
        self.update(|window, _| {
            window.current(self.deposit_amount);
        });
    }

    /// Asks whether a retry may go; if so, takes one retry from the budget.
    pub fn withdraw(&self) -> bool {
        self.update(|window, balance| {
            if balance >= SCALE {
                window.current(-SCALE);
                true
            } else {
                false
            }
        })
    }

    /// Whole retries that [`withdraw`](Self::withdraw) would allow right now.
    pub fn available(&self) -> u64 {
        self.update(|_, balance| u64::try_from(balance / SCALE).unwrap_or(0))
    }

    /// Expires old slots, then runs `f` on the window and the balance, all
    /// under the lock.
    fn update<T>(&self, f: impl FnOnce(&mut Window, i64) -> T) -> T {
        // Nothing below can panic, so a poisoned lock still holds a
        // consistent window.
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.expire(Instant::now(), self.slot_length);
        let balance = window
            .slots
            .iter()
            .fold(self.reserve, |sum, slot| sum.saturating_add(*slot));
        f(&mut window, balance)
    }
}

impl Window {
    /// Moves the head to the slot of `now`, clearing the slots it passes.
    fn expire(&mut self, now: Instant, slot_length: Duration) {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let slot = u64::try_from(elapsed / slot_length.as_nanos().max(1)).unwrap_or(u64::MAX);
        if slot <= self.head {
            return;
        }
        let passed = (slot - self.head).min(SLOTS as u64);
        for step in 1..=passed {
            let index = self.head.wrapping_add(step) % SLOTS as u64;
            self.slots[index as usize] = 0;
        }
        self.head = slot;
    }

    /// Adds `amount` to the head slot.
    fn current(&mut self, amount: i64) {
        let index = (self.head % SLOTS as u64) as usize;
        self.slots[index] = self.slots[index].saturating_add(amount);
    }
}

impl Default for RetryBudget {
    /// `ttl` 10 s, `min_per_sec` 10, `retry_ratio` 0.2.
    fn default() -> Self {
        Self::unchecked(Duration::from_secs(10), 10, 0.2)
    }
}

/// The parameters given to [`RetryBudget::new`] do not make a budget.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBudget {
    /// `ttl` is outside 1 to 60 seconds.
    #[error("invalid retry budget ttl {0:?}: must be between 1 and 60 seconds")]
    Ttl(Duration),
    /// `retry_ratio` is outside 0 to 1000, or NaN.
    #[error("invalid retry budget retry_ratio {0}: must be between 0 and 1000")]
    RetryRatio(f32),
}

impl InvalidBudget {
    /// The name of the bad parameter: `"ttl"` or `"retry_ratio"`.
    pub fn parameter(&self) -> &'static str {
        match self {
            InvalidBudget::Ttl(_) => "ttl",
            InvalidBudget::RetryRatio(_) => "retry_ratio",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::advance;

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn withdraw_all(budget: &RetryBudget) -> u64 {
        let mut n = 0;
        while budget.withdraw() {
            n += 1;
            assert!(n < 1_000_000, "budget never runs out");
        }
        n
    }

    #[test]
    fn default_is_10s_10_per_sec_one_in_five() {
        let budget = RetryBudget::default();
        assert_eq!(budget.ttl(), secs(10));
        assert_eq!(budget.min_per_sec(), 10);
        assert_eq!(budget.retry_ratio(), 0.2);
        assert_eq!(budget.deposit_amount, 200);
        assert_eq!(budget.reserve, 100 * SCALE);
        assert_eq!(budget.slot_length, Duration::from_secs(1));
    }

    #[test]
    fn validation_names_the_parameter() {
        for ttl in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_secs(61),
        ] {
            let err = RetryBudget::new(ttl, 10, 0.2).unwrap_err();
            assert_eq!(err, InvalidBudget::Ttl(ttl));
            assert_eq!(err.parameter(), "ttl");
        }
        for ratio in [-0.1, 1000.5, f32::NAN, f32::INFINITY] {
            let err = RetryBudget::new(secs(10), 10, ratio).unwrap_err();
            assert_eq!(err.parameter(), "retry_ratio");
            assert!(err.to_string().contains("retry_ratio"));
        }
        assert!(RetryBudget::new(secs(1), 0, 0.0).is_ok());
        assert!(RetryBudget::new(secs(60), u32::MAX, 1000.0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn empty_budget_refuses() {
        let budget = RetryBudget::new(secs(1), 0, 1.0).unwrap();
        assert!(!budget.withdraw());
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_is_min_per_sec_times_ttl() {
        let budget = RetryBudget::new(secs(2), 5, 0.0).unwrap();
        assert_eq!(budget.available(), 10);
        assert_eq!(withdraw_all(&budget), 10);
        // Deposits earn nothing at ratio 0.
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact() {
        // 0.3 is three retries per ten attempts (tower's integer division
        // would round it to one per three).
        let budget = RetryBudget::new(secs(1), 0, 0.3).unwrap();
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 3);
        // Ratios above 1: every attempt earns several retries.
        let generous = RetryBudget::new(secs(1), 0, 2.5).unwrap();
        generous.deposit();
        generous.deposit();
        assert_eq!(withdraw_all(&generous), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_allows_ratio_times_deposits_plus_reserve_then_recovers() {
        let budget = RetryBudget::default();
        // An outage: 500 first attempts over 5 s, every one of them failing
        // and asking for retries.
        let mut retries = 0;
        for _ in 0..50 {
            for _ in 0..10 {
                budget.deposit();
                for _ in 0..3 {
                    if budget.withdraw() {
                        retries += 1;
                    }
                }
            }
            advance(Duration::from_millis(100)).await;
        }
        // 0.2 × 500 earned + 10/s × 10 s reserve.
        assert_eq!(retries, 100 + 100);
        assert!(!budget.withdraw());

        // Once the window has passed, the full reserve is back.
        advance(secs(10)).await;
        assert_eq!(budget.available(), 100);
        assert_eq!(withdraw_all(&budget), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let budget = RetryBudget::new(secs(1), 0, 1.0).unwrap();
        budget.deposit();
        advance(secs(3)).await;
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_count_within_the_ttl() {
        let budget = RetryBudget::new(secs(1), 0, 0.5).unwrap();
        budget.deposit();
        budget.deposit();
        advance(Duration::from_millis(850)).await;
        assert!(budget.withdraw());

        advance(Duration::from_millis(2_001)).await;
        budget.deposit();
        advance(Duration::from_millis(301)).await;
        budget.deposit();
        advance(Duration::from_millis(801)).await;
        // The first of these two has expired, the second not yet: half a
        // retry is not enough.
        assert!(!budget.withdraw());
        budget.deposit();
        assert!(budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawals_expire_too() {
        let budget = RetryBudget::new(secs(1), 3, 0.0).unwrap();
        assert_eq!(withdraw_all(&budget), 3);
        advance(Duration::from_millis(500)).await;
        assert!(!budget.withdraw());
        advance(Duration::from_millis(600)).await;
        assert_eq!(withdraw_all(&budget), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_idle_period_clears_everything() {
        let budget = RetryBudget::new(secs(10), 1, 1.0).unwrap();
        for _ in 0..50 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 60);
        advance(Duration::from_secs(3_600 * 24 * 365)).await;
        assert_eq!(budget.available(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_withdrawals_never_overdraw() {
        let budget = Arc::new(RetryBudget::new(secs(10), 0, 1.0).unwrap());
        for _ in 0..1_000 {
            budget.deposit();
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = Arc::clone(&budget);
                std::thread::spawn(move || (0..1_000).filter(|_| budget.withdraw()).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 1_000);
    }
}
