//! Shared pieces of the resilience benchmarks (`overhead`, `hedging`,
//! `outage`, `rate_limit`): named variants of one processor configuration,
//! the attempts a processor sent (read from its metrics), an open-loop pacer
//! and the breaker transitions an observer saw.
//!
//! Every variant runs as `--side patient --variant NAME` in a child process
//! of its own; the parent reads the upstream child's own request count before
//! and after each one ([`Harness::upstream_requests`]), so each variant's
//! upstream load is counted on both ends of the wire.
//!
//! ```
//! use patient_bench::resilience::{metric_sum, Sent};
//!
//! let text = "# TYPE attempts counter\n\
//!             attempts_total{upstream=\"http://127.0.0.1:80\"} 12\n\
//!             retries_total{upstream=\"http://127.0.0.1:80\"} 2\n\
//!             # EOF\n";
//! assert_eq!(metric_sum(text, "attempts_total"), 12.0);
//! assert_eq!(Sent::from_metrics_text(text).retries, 2);
//! ```

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use patient_http::{breaker::BreakerState, metrics::Metrics, ProcessorObserver};

use crate::{
    args::Args,
    harness::{BoxError, Harness, Side},
    report::{Line, Record},
};

/// The flag that names the variant a side child runs.
pub const VARIANT_FLAG: &str = "--variant";

/// The flag that picks which variants the parent runs (comma-separated).
pub const VARIANTS_FLAG: &str = "--variants";

/// The variant a side child is to run: the value of [`VARIANT_FLAG`], which
/// must be one of `known`.
pub fn variant_of(args: &Args, known: &[&'static str]) -> Result<&'static str, BoxError> {
    let given = args
        .value(VARIANT_FLAG)
        .ok_or_else(|| format!("{VARIANT_FLAG} is required (one of {})", known.join(",")))?;
    known
        .iter()
        .copied()
        .find(|name| *name == given)
        .ok_or_else(|| format!("unknown variant {given:?} (one of {})", known.join(",")).into())
}

/// The variants the parent runs: those of [`VARIANTS_FLAG`] (each one of
/// `known`), or all of `known`.
pub fn variants_wanted(args: &Args, known: &[&'static str]) -> Result<Vec<&'static str>, BoxError> {
    let Some(raw) = args.value(VARIANTS_FLAG) else {
        return Ok(known.to_vec());
    };
    raw.split(',')
        .map(|given| {
            known
                .iter()
                .copied()
                .find(|name| *name == given.trim())
                .ok_or_else(|| {
                    format!("unknown variant {given:?} (one of {})", known.join(",")).into()
                })
        })
        .collect()
}

/// One variant's run as the parent saw it: the child's line, and the
/// requests the upstream child received meanwhile (`None` with `--url`).
#[derive(Debug, Clone)]
pub struct VariantRun {
    /// The variant's name.
    pub variant: &'static str,
    /// The child's `bench=…` line, read back.
    pub record: Record,
    /// Requests the upstream child received while the variant ran.
    pub server_requests: Option<u64>,
}

/// Runs `variant` in a child process with `flags` (and `--variant`), counting
/// the requests the upstream child received meanwhile.
pub fn run_variant(
    harness: &mut Harness,
    variant: &'static str,
    flags: &[(&str, String)],
) -> VariantRun {
    let mut all: Vec<(&str, String)> = flags.to_vec();
    all.push((VARIANT_FLAG, variant.to_owned()));
    let before = harness.upstream_requests();
    let record = harness.run(Side::Patient, &all);
    let after = harness.upstream_requests();
    VariantRun {
        variant,
        record,
        server_requests: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
    }
}

/// Appends `server_requests=N` (or `na`).
pub fn push_count(line: Line, key: &str, value: Option<u64>) -> Line {
    match value {
        Some(v) => line.text(key, v),
        None => line.text(key, "na"),
    }
}

/// The sum over every label set of the samples of `name` (e.g.
/// `attempts_total`) in a Prometheus / OpenMetrics text; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, rest) = match line.find("} ") {
                Some(close) => (&line[..=close], &line[close + 2..]),
                None => line.split_once(' ')?,
            };
            let metric = series.split('{').next()?;
            if metric != name {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// What a processor sent upstream, from its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sent {
    /// `attempts_total`: every attempt sent (first attempts, retries and
    /// hedges; not the tasks a circuit breaker failed fast).
    pub attempts: u64,
    /// `retries_total`.
    pub retries: u64,
    /// `hedges_total`.
    pub hedges: u64,
    /// `rate_limit_waits_total`: attempts that waited for a limit.
    pub limit_waits: u64,
}

impl Sent {
    /// Reads the counters of `metrics`.
    pub fn from_metrics(metrics: &Metrics) -> Sent {
        Sent::from_metrics_text(&metrics.render())
    }

    /// Reads the counters of a rendered metrics text.
    pub fn from_metrics_text(text: &str) -> Sent {
        let count = |name| metric_sum(text, name) as u64;
        Sent {
            attempts: count("attempts_total"),
            retries: count("retries_total"),
            hedges: count("hedges_total"),
            limit_waits: count("rate_limit_waits_total"),
        }
    }

    /// Appends `attempts`, `retries`, `hedges` and `limit_waits`.
    pub fn push(&self, line: Line) -> Line {
        line.text("attempts", self.attempts)
            .text("retries", self.retries)
            .text("hedges", self.hedges)
            .text("limit_waits", self.limit_waits)
    }
}

/// What an open-loop run offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paced {
    /// Tasks issued.
    pub offered: u64,
    /// The nominal length of the offering window: the tasks planned ÷ rate.
    pub window: Duration,
    /// From the first issue to the return of the last.
    pub elapsed: Duration,
    /// How late the latest issue was against its schedule.
    pub max_lag: Duration,
}

/// Calls `issue` `rate` times a second for `duration` from the calling
/// thread, on an absolute schedule (issue `i` is due at `i / rate`), so a
/// late issue does not push the later ones back. Stops early at `deadline`
/// or when `issue` returns false.
pub fn pace(
    rate: f64,
    duration: Duration,
    deadline: Instant,
    mut issue: impl FnMut() -> bool,
) -> Paced {
    let planned = (rate * duration.as_secs_f64()).round().max(0.0) as u64;
    let start = Instant::now();
    let mut offered = 0;
    let mut max_lag = Duration::ZERO;
    for i in 0..planned {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        } else {
            max_lag = max_lag.max(now - due);
        }
        if !issue() {
            break;
        }
        offered += 1;
    }
    Paced {
        offered,
        window: Duration::from_secs_f64(planned as f64 / rate),
        elapsed: start.elapsed(),
        max_lag,
    }
}

/// Counts circuit breaker transitions.
#[derive(Debug, Default)]
pub struct BreakerCounter {
    opened: AtomicU64,
    half_opened: AtomicU64,
    closed: AtomicU64,
}

impl BreakerCounter {
    /// A shared counter, to register with `Builder::observer_arc`.
    pub fn new() -> Arc<BreakerCounter> {
        Arc::new(BreakerCounter::default())
    }

    /// Appends `breaker_opened`, `breaker_half_opened` and `breaker_closed`:
    /// how many times the breaker went to each state.
    pub fn push(&self, line: Line) -> Line {
        line.text("breaker_opened", self.opened.load(Ordering::Relaxed))
            .text(
                "breaker_half_opened",
                self.half_opened.load(Ordering::Relaxed),
            )
            .text("breaker_closed", self.closed.load(Ordering::Relaxed))
    }
}

impl ProcessorObserver for BreakerCounter {
    fn on_breaker_state_change(&self, _upstream: &str, _from: BreakerState, to: BreakerState) {
        let counter = match to {
            BreakerState::Open => &self.opened,
            BreakerState::HalfOpen => &self.half_opened,
            BreakerState::Closed => &self.closed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// `kind:count` pairs joined by commas (`status_503:812,CircuitOpen:1188`),
/// or `none`.
pub fn outcome_list<'a>(counts: impl IntoIterator<Item = (&'a String, &'a u64)>) -> String {
    let list: Vec<String> = counts
        .into_iter()
        .map(|(kind, count)| format!("{kind}:{count}"))
        .collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_across_label_sets() {
        let text = "# HELP attempts x\n\
                    attempts_total{upstream=\"a b\"} 3\n\
                    attempts_total{upstream=\"c\"} 4\n\
                    attempts_created{upstream=\"c\"} 1.5\n\
                    in_flight 2\n";
        assert_eq!(metric_sum(text, "attempts_total"), 7.0);
        assert_eq!(metric_sum(text, "in_flight"), 2.0);
        assert_eq!(metric_sum(text, "hedges_total"), 0.0);
    }

    #[test]
    fn variants_are_checked() {
        let known = ["bare", "layers"];
        let args = Args::parse(
            ["--variant", "layers", "--variants", "layers,bare"].map(String::from),
            &[VARIANT_FLAG, VARIANTS_FLAG],
            &[],
        )
        .unwrap();
        assert_eq!(variant_of(&args, &known).unwrap(), "layers");
        assert_eq!(
            variants_wanted(&args, &known).unwrap(),
            vec!["layers", "bare"]
        );
        let bad = Args::parse(
            ["--variant", "x"].map(String::from),
            &[VARIANT_FLAG, VARIANTS_FLAG],
            &[],
        )
        .unwrap();
        assert!(variant_of(&bad, &known).is_err());
    }

    #[test]
    fn paces_on_schedule() {
        let mut n = 0;
        let paced = pace(
            1000.0,
            Duration::from_millis(20),
            Instant::now() + Duration::from_secs(5),
            || {
                n += 1;
                true
            },
        );
        assert_eq!((paced.offered, n), (20, 20));
        assert!(paced.elapsed >= Duration::from_millis(19));
    }

    #[test]
    fn lists_outcomes() {
        let mut counts = std::collections::BTreeMap::new();
        assert_eq!(outcome_list(&counts), "none");
        counts.insert("status_503".to_owned(), 3u64);
        counts.insert("CircuitOpen".to_owned(), 2u64);
        assert_eq!(outcome_list(&counts), "CircuitOpen:2,status_503:3");
    }
}
