//! [`ConcurrencyLimit`]: at most N calls in flight, waiters served in order.

use std::{fmt, sync::Arc};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::InvalidLimit;

/// At most [`max_in_flight`](Self::max_in_flight) calls at once.
///
/// A [`tokio::sync::Semaphore`] (fair: waiters are served in the order they
/// asked) handing out owned [`ConcurrencyPermit`]s; a slot is free again when
/// its permit drops.
pub struct ConcurrencyLimit {
    semaphore: Arc<Semaphore>,
    max_in_flight: usize,
}

impl fmt::Debug for ConcurrencyLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("max_in_flight", &self.max_in_flight)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl ConcurrencyLimit {
    /// The largest accepted `max_in_flight`.
    pub const MAX: usize = Semaphore::MAX_PERMITS;

    /// At most `max_in_flight` (1 to [`MAX`](Self::MAX)) calls at once.
    /// There is no default: a key without a concurrency limit has none.
    pub fn new(max_in_flight: usize) -> Result<Self, InvalidLimit> {
        check_max_in_flight(max_in_flight)?;
        Ok(ConcurrencyLimit {
            semaphore: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        })
    }

    /// The limit.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// How many permits are out now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.semaphore.available_permits())
    }

    /// Waits for a free slot, in turn. Cancel-safe.
    pub async fn acquire(&self) -> ConcurrencyPermit {
        // The semaphore is never closed, so this cannot fail; if it could, an
        // unlimited permit is the harmless answer.
        ConcurrencyPermit {
            _permit: Arc::clone(&self.semaphore).acquire_owned().await.ok(),
        }
    }

    /// A slot if one is free now and nobody waits for one.
    pub fn try_acquire(&self) -> Option<ConcurrencyPermit> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .ok()
            .map(|permit| ConcurrencyPermit {
                _permit: Some(permit),
            })
    }
}

pub(super) fn check_max_in_flight(max_in_flight: usize) -> Result<(), InvalidLimit> {
    if max_in_flight == 0 || max_in_flight > ConcurrencyLimit::MAX {
        return Err(InvalidLimit::new(
            "max_in_flight",
            format!(
                "must be 1 to {}, got {max_in_flight}",
                ConcurrencyLimit::MAX
            ),
        ));
    }
    Ok(())
}

/// One slot of a [`ConcurrencyLimit`], held while the call is in flight;
/// dropping it frees the slot. Owned: `'static`, `Send`.
pub struct ConcurrencyPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for ConcurrencyPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyPermit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use tokio::time::sleep;

    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            ConcurrencyLimit::new(0).unwrap_err().field(),
            "max_in_flight"
        );
        assert_eq!(
            ConcurrencyLimit::new(usize::MAX).unwrap_err().field(),
            "max_in_flight"
        );
        assert_eq!(ConcurrencyLimit::new(3).unwrap().max_in_flight(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn caps_in_flight() {
        let limit = Arc::new(ConcurrencyLimit::new(3).unwrap());
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (limit, now, peak) = (Arc::clone(&limit), Arc::clone(&now), Arc::clone(&peak));
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                sleep(Duration::from_millis(100)).await;
                now.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        let start = tokio::time::Instant::now();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // 20 calls of 100 ms, 3 at a time: 7 rounds.
        assert_eq!(start.elapsed(), Duration::from_millis(700));
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn try_acquire_when_full() {
        let limit = ConcurrencyLimit::new(1).unwrap();
        let held = limit.try_acquire().unwrap();
        assert_eq!(limit.in_flight(), 1);
        assert!(limit.try_acquire().is_none());
        drop(held);
        assert!(limit.try_acquire().is_some());
    }
}
