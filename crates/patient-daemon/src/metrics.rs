//! The daemon's own metrics, rendered at `/metrics` together with the
//! engine's (requests, attempts, breakers, limits), all with the `patient_`
//! prefix.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `patient_tasks` | gauge (read at each scrape) | `state` |
//! | `patient_tasks_in_flight` | gauge | — |
//! | `patient_outcomes_total` | counter | `type` (`completed`, `failed`) |
//! | `patient_task_retries_total` | counter | — |
//! | `patient_deliveries_total` | counter | `channel`, `result` (`delivered`, `retry`, `failed`) |
//! | `patient_submit_duration_seconds` | histogram | — |
//! | `patient_end_to_end_seconds` | histogram (submit to outcome) | — |
//! | `patient_submitted_total` | counter | — |
//! | `patient_task_errors_total` | counter (failed tasks) | `error_type` (`timeout`, `connection`, `ssl`, `response_too_large`, `unknown`, `http_error`, `redirect`) |
//!
//! Beside the registry it keeps the last minute for the dashboard
//! ([`DaemonMetrics::recent`]): tasks finished per second and the submit
//! and end-to-end latencies' percentiles.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode_registry, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    channel: String,
    result: String,
}

/// Bucket upper bounds of the submit histogram, seconds.
const SUBMIT_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Bucket upper bounds of the end-to-end histogram, seconds.
const END_TO_END_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

struct Inner {
    registry: Registry,
    tasks: Family<StateLabel, Gauge>,
    in_flight: Gauge,
    outcomes: Family<TypeLabel, Counter>,
    retries: Counter,
    deliveries: Family<DeliveryLabels, Counter>,
    submit: Histogram,
    end_to_end: Histogram,
    submitted: Counter,
    errors: Family<ErrorLabel, Counter>,
    recent: Mutex<Window>,
}

/// The error types a failed task is counted under, in the order the
/// dashboard shows them.
pub const ERROR_TYPES: [&str; 7] = [
    "timeout",
    "connection",
    "ssl",
    "response_too_large",
    "unknown",
    "http_error",
    "redirect",
];

/// The length of the dashboard's window, seconds.
pub const WINDOW_SECONDS: u64 = 60;

/// The most latency samples the window keeps per kind; past it the oldest
/// go first.
const WINDOW_SAMPLES: usize = 4096;

/// The last minute: finishes per second, latency samples with their time.
#[derive(Debug)]
struct Window {
    /// `(second, finished in it)`, one slot per second of the window.
    finished: [(u64, u64); WINDOW_SECONDS as usize],
    /// `(ms, seconds)` of accepted submits.
    submit: VecDeque<(i64, f64)>,
    /// `(ms, seconds)` from submit to outcome.
    end_to_end: VecDeque<(i64, f64)>,
}

impl Window {
    fn new() -> Window {
        Window {
            finished: [(0, 0); WINDOW_SECONDS as usize],
            submit: VecDeque::new(),
            end_to_end: VecDeque::new(),
        }
    }

    fn finish(&mut self, now_ms: i64) {
        let second = u64::try_from(now_ms / 1000).unwrap_or(0);
        let slot = &mut self.finished[(second % WINDOW_SECONDS) as usize];
        if slot.0 == second {
            slot.1 += 1;
        } else {
            *slot = (second, 1);
        }
    }

    fn sample(samples: &mut VecDeque<(i64, f64)>, now_ms: i64, seconds: f64) {
        if samples.len() == WINDOW_SAMPLES {
            samples.pop_front();
        }
        samples.push_back((now_ms, seconds));
    }

    fn snapshot(&self, now_ms: i64) -> Recent {
        let second = u64::try_from(now_ms / 1000).unwrap_or(0);
        // The window's seconds: the current one and the 59 before it.
        let from = second.saturating_sub(WINDOW_SECONDS - 1);
        let finished: u64 = self
            .finished
            .iter()
            .filter(|(s, _)| (from..=second).contains(s))
            .map(|(_, n)| n)
            .sum();
        let since = now_ms - i64::try_from(WINDOW_SECONDS * 1000).unwrap_or(i64::MAX);
        Recent {
            finished,
            per_second: finished as f64 / WINDOW_SECONDS as f64,
            submit: Percentiles::of(&self.submit, since),
            end_to_end: Percentiles::of(&self.end_to_end, since),
        }
    }
}

/// Percentiles of a latency over the window, seconds (`None` without
/// samples).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Percentiles {
    /// Samples in the window.
    pub count: usize,
    /// The median.
    pub p50: Option<f64>,
    /// The 90th percentile.
    pub p90: Option<f64>,
    /// The 99th percentile.
    pub p99: Option<f64>,
}

impl Percentiles {
    /// Nearest-rank percentiles of the samples taken after `since` (ms).
    fn of(samples: &VecDeque<(i64, f64)>, since: i64) -> Percentiles {
        let mut values: Vec<f64> = samples
            .iter()
            .filter(|(at, _)| *at > since)
            .map(|(_, v)| *v)
            .collect();
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| -> Option<f64> {
            if values.is_empty() {
                return None;
            }
            let n = values.len() as f64;
            let index = ((p * n).ceil() as usize).clamp(1, values.len()) - 1;
            Some(values[index])
        };
        Percentiles {
            count: values.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
        }
    }
}

/// The last minute as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recent {
    /// Tasks this node finished in the window.
    pub finished: u64,
    /// The same, per second.
    pub per_second: f64,
    /// Time to accept a submit.
    pub submit: Percentiles,
    /// Time from submit to the stored outcome.
    pub end_to_end: Percentiles,
}

/// Totals since the daemon started, as the dashboard shows them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Totals {
    /// Tasks accepted.
    pub submitted: u64,
    /// Tasks finished by outcome: `completed`, `failed`.
    pub outcomes: Vec<(String, u64)>,
    /// Failed tasks by error type ([`ERROR_TYPES`]).
    pub errors: Vec<(String, u64)>,
    /// Stored retries.
    pub retries: u64,
    /// Delivery tries by result: `delivered`, `retry`, `failed` (all
    /// channels).
    pub deliveries: Vec<(String, u64)>,
}

/// The daemon's metrics. Cheap to clone.
#[derive(Clone)]
pub struct DaemonMetrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DaemonMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonMetrics").finish_non_exhaustive()
    }
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonMetrics {
    /// New metrics in their own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("patient");
        let tasks = Family::<StateLabel, Gauge>::default();
        let in_flight = Gauge::default();
        let outcomes = Family::<TypeLabel, Counter>::default();
        let retries = Counter::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        let submit = Histogram::new(SUBMIT_BUCKETS.iter().copied());
        let end_to_end = Histogram::new(END_TO_END_BUCKETS.iter().copied());
        let submitted = Counter::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register("tasks", "Tasks in the queue by state", tasks.clone());
        registry.register(
            "tasks_in_flight",
            "Tasks with an attempt running on this node",
            in_flight.clone(),
        );
        registry.register(
            "outcomes",
            "Tasks finished, by outcome type",
            outcomes.clone(),
        );
        registry.register(
            "task_retries",
            "Steps that ended in a stored retry",
            retries.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery tries by channel and result",
            deliveries.clone(),
        );
        registry.register(
            "submit_duration_seconds",
            "Time to accept a submit (validation and the durable write)",
            submit.clone(),
        );
        registry.register(
            "end_to_end_seconds",
            "Time from submit to the stored outcome",
            end_to_end.clone(),
        );
        registry.register("submitted", "Tasks accepted", submitted.clone());
        registry.register("task_errors", "Failed tasks by error type", errors.clone());
        DaemonMetrics {
            inner: Arc::new(Inner {
                registry,
                tasks,
                in_flight,
                outcomes,
                retries,
                deliveries,
                submit,
                end_to_end,
                submitted,
                errors,
                recent: Mutex::new(Window::new()),
            }),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.inner
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the queue's counts by state.
    pub fn set_tasks(&self, counts: &[(String, i64)]) {
        for state in crate::model::TaskState::NAMES {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            self.inner
                .tasks
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(n);
        }
    }

    /// Sets the tasks in flight on this node.
    pub fn set_in_flight(&self, n: usize) {
        self.inner
            .in_flight
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a finished task (`completed`, `failed`).
    pub fn outcome(&self, state: &str) {
        self.outcome_at(state, crate::model::now_ms());
    }

    fn outcome_at(&self, state: &str, now_ms: i64) {
        self.inner
            .outcomes
            .get_or_create(&TypeLabel {
                r#type: state.to_owned(),
            })
            .inc();
        self.window().finish(now_ms);
    }

    /// Counts a failed task under its error type (one of [`ERROR_TYPES`]).
    pub fn error(&self, error_type: &str) {
        self.inner
            .errors
            .get_or_create(&ErrorLabel {
                error_type: error_type.to_owned(),
            })
            .inc();
    }

    /// Counts a stored retry.
    pub fn retry(&self) {
        self.inner.retries.inc();
    }

    /// Counts a delivery try.
    pub fn delivery(&self, channel: &str, result: &str) {
        self.inner
            .deliveries
            .get_or_create(&DeliveryLabels {
                channel: channel.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Observes an accepted submit of `tasks` tasks.
    pub fn submitted(&self, tasks: usize, took: Duration) {
        self.submitted_at(tasks, took, crate::model::now_ms());
    }

    fn submitted_at(&self, tasks: usize, took: Duration, now_ms: i64) {
        self.inner.submitted.inc_by(tasks as u64);
        self.inner.submit.observe(took.as_secs_f64());
        Window::sample(&mut self.window().submit, now_ms, took.as_secs_f64());
    }

    /// Observes a task's time from submit to outcome.
    pub fn end_to_end(&self, took: Duration) {
        self.end_to_end_at(took, crate::model::now_ms());
    }

    fn end_to_end_at(&self, took: Duration, now_ms: i64) {
        self.inner.end_to_end.observe(took.as_secs_f64());
        Window::sample(&mut self.window().end_to_end, now_ms, took.as_secs_f64());
    }

    /// The last minute up to `now_ms`: finishes per second and latency
    /// percentiles.
    pub fn recent(&self, now_ms: i64) -> Recent {
        self.window().snapshot(now_ms)
    }

    /// The counters since the start.
    pub fn totals(&self) -> Totals {
        let i = &self.inner;
        let typed = |name: &str| {
            i.outcomes
                .get(&TypeLabel {
                    r#type: name.to_owned(),
                })
                .map_or(0, |c| c.get())
        };
        let errors = ERROR_TYPES
            .iter()
            .map(|t| {
                let n = i
                    .errors
                    .get(&ErrorLabel {
                        error_type: (*t).to_owned(),
                    })
                    .map_or(0, |c| c.get());
                ((*t).to_owned(), n)
            })
            .collect();
        let deliveries = ["delivered", "retry", "failed"]
            .iter()
            .map(|result| {
                let n: u64 = ["webhook", "redis", "sidekiq"]
                    .iter()
                    .filter_map(|channel| {
                        i.deliveries
                            .get(&DeliveryLabels {
                                channel: (*channel).to_owned(),
                                result: (*result).to_owned(),
                            })
                            .map(|c| c.get())
                    })
                    .sum();
                ((*result).to_owned(), n)
            })
            .collect();
        Totals {
            submitted: i.submitted.get(),
            outcomes: vec![
                ("completed".to_owned(), typed("completed")),
                ("failed".to_owned(), typed("failed")),
            ],
            errors,
            retries: i.retries.get(),
            deliveries,
        }
    }

    /// The daemon's families and `engine`'s (registered with a `patient_`
    /// prefix) as one OpenMetrics text.
    pub fn render(&self, engine: &patient_http::metrics::Metrics) -> String {
        let mut out = String::with_capacity(8192);
        let _ = encode_registry(&mut out, &self.inner.registry);
        let _ = encode_registry(&mut out, engine.registry());
        out.push_str("# EOF\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_the_last_minute_only() {
        let m = DaemonMetrics::new();
        let t0 = 1_800_000_000_000_i64;
        for i in 0..30 {
            m.outcome_at("completed", t0 + i * 1000);
        }
        m.outcome_at("failed", t0 + 29_500);
        let now = t0 + 29_900;
        let recent = m.recent(now);
        assert_eq!(recent.finished, 31);
        assert!((recent.per_second - 31.0 / 60.0).abs() < 1e-9);
        // 45 s on, the first 15 seconds have left the window.
        let later = m.recent(t0 + 74_000);
        assert_eq!(later.finished, 16);
        // A slot reused a minute later starts again from one.
        m.outcome_at("completed", t0 + 60_000);
        assert_eq!(m.recent(t0 + 60_000).finished, 31);
        assert_eq!(m.recent(t0 + 200_000).finished, 0);
        let totals = m.totals();
        assert_eq!(
            totals.outcomes,
            vec![("completed".into(), 31), ("failed".into(), 1)]
        );
    }

    #[test]
    fn percentiles_are_nearest_rank_over_the_window() {
        let m = DaemonMetrics::new();
        let t0 = 1_800_000_000_000_i64;
        // An old sample, out of the window by the time of the snapshot.
        m.end_to_end_at(Duration::from_secs(100), t0);
        for ms in 1..=100u64 {
            m.end_to_end_at(Duration::from_millis(ms), t0 + 61_000);
        }
        let p = m.recent(t0 + 61_500).end_to_end;
        assert_eq!(p.count, 100);
        assert_eq!(p.p50, Some(0.050));
        assert_eq!(p.p90, Some(0.090));
        assert_eq!(p.p99, Some(0.099));
        let none = m.recent(t0 + 61_500).submit;
        assert_eq!(none, Percentiles::default());
        m.submitted_at(3, Duration::from_millis(2), t0 + 61_000);
        let one = m.recent(t0 + 61_500).submit;
        assert_eq!((one.count, one.p50, one.p99), (1, Some(0.002), Some(0.002)));
        assert_eq!(m.totals().submitted, 3);
    }

    #[test]
    fn the_window_keeps_a_bounded_number_of_samples() {
        let m = DaemonMetrics::new();
        let t0 = 1_800_000_000_000_i64;
        for i in 0..(WINDOW_SAMPLES + 10) {
            m.submitted_at(1, Duration::from_millis(i as u64), t0);
        }
        assert_eq!(m.recent(t0).submit.count, WINDOW_SAMPLES);
    }

    #[test]
    fn errors_and_deliveries_add_up_by_type() {
        let m = DaemonMetrics::new();
        m.error("timeout");
        m.error("timeout");
        m.error("http_error");
        m.delivery("webhook", "failed");
        m.delivery("redis", "failed");
        m.delivery("webhook", "delivered");
        let t = m.totals();
        let get = |list: &[(String, u64)], k: &str| list.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get(&t.errors, "timeout"), 2);
        assert_eq!(get(&t.errors, "http_error"), 1);
        assert_eq!(get(&t.errors, "ssl"), 0);
        assert_eq!(get(&t.deliveries, "failed"), 2);
        assert_eq!(get(&t.deliveries, "delivered"), 1);
        let text = m.render(&patient_http::metrics::Metrics::with_prefix("patient"));
        assert!(
            text.contains("patient_task_errors_total{error_type=\"timeout\"} 2"),
            "{text}"
        );
    }
}
