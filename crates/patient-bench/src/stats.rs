//! Latency percentiles and lock-free per-task latency slots.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

/// Percentiles of a set of latencies, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// How many latencies were summarized.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Summary {
    /// Summarizes `nanos` (nearest-rank percentiles); all zero when empty.
    pub fn from_nanos(mut nanos: Vec<u64>) -> Summary {
        if nanos.is_empty() {
            return Summary::default();
        }
        nanos.sort_unstable();
        Summary {
            count: nanos.len(),
            p50: percentile(&nanos, 0.50),
            p99: percentile(&nanos, 0.99),
            p999: percentile(&nanos, 0.999),
            max: nanos[nanos.len() - 1],
        }
    }

    /// The median in milliseconds.
    pub fn p50_ms(&self) -> f64 {
        self.p50 as f64 / 1e6
    }

    /// The 99th percentile in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        self.p99 as f64 / 1e6
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`; `p` in `0.0..=1.0`.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count);
/// `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Start and end times of numbered tasks, written from any thread without a
/// lock. Slot `seq` holds the enqueue instant until the task ends, then its
/// latency.
#[derive(Debug)]
pub struct LatencyBook {
    origin: Instant,
    started: Box<[AtomicU64]>,
    latency: Box<[AtomicU64]>,
}

impl LatencyBook {
    /// Room for tasks `0..n`.
    pub fn new(n: usize) -> LatencyBook {
        LatencyBook {
            origin: Instant::now(),
            started: (0..n).map(|_| AtomicU64::new(0)).collect(),
            latency: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now(&self) -> u64 {
        // +1 keeps 0 free to mean "unset".
        self.origin.elapsed().as_nanos() as u64 + 1
    }

    /// Task `seq` starts now.
    pub fn start(&self, seq: usize) {
        if let Some(slot) = self.started.get(seq) {
            slot.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Task `seq` did not start after all.
    pub fn forget(&self, seq: usize) {
        if let Some(slot) = self.started.get(seq) {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Task `seq` ends now; its latency is recorded if it had started.
    pub fn end(&self, seq: usize) {
        let (Some(started), Some(latency)) = (self.started.get(seq), self.latency.get(seq)) else {
            return;
        };
        let at = started.load(Ordering::Relaxed);
        if at != 0 {
            latency.store(self.now().saturating_sub(at).max(1), Ordering::Relaxed);
        }
    }

    /// When the book was made: the zero of [`spans`](Self::spans).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// `(start, end)` of every task that ended, in nanoseconds since
    /// [`origin`](Self::origin), in task order.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.started
            .iter()
            .zip(self.latency.iter())
            .filter_map(|(started, latency)| {
                let latency = latency.load(Ordering::Relaxed);
                // `now()` is one more than the nanoseconds since the origin.
                let start = started.load(Ordering::Relaxed).checked_sub(1)?;
                (latency != 0).then_some((start, start + latency))
            })
            .collect()
    }

    /// Latencies of the tasks that ended, in nanoseconds.
    pub fn latencies(&self) -> Vec<u64> {
        self.latency
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&n| n != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::from_nanos((1..=1000).rev().collect());
        assert_eq!(
            (s.count, s.p50, s.p99, s.p999, s.max),
            (1000, 500, 990, 999, 1000)
        );
        assert_eq!(Summary::from_nanos(vec![7]).p999, 7);
        assert_eq!(Summary::from_nanos(Vec::new()), Summary::default());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn book_records_only_started_tasks() {
        let book = LatencyBook::new(3);
        book.start(0);
        book.start(1);
        book.forget(1);
        book.end(0);
        book.end(1);
        book.end(2);
        book.end(99);
        assert_eq!(book.latencies().len(), 1);
        let spans = book.spans();
        assert_eq!(spans.len(), 1);
        assert!(spans[0].0 <= spans[0].1);
    }
}
