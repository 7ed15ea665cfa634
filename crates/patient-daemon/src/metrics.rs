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

use std::{sync::Arc, time::Duration};

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
            }),
        }
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

    /// Counts a finished task.
    pub fn outcome(&self, state: &str) {
        self.inner
            .outcomes
            .get_or_create(&TypeLabel {
                r#type: state.to_owned(),
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
        self.inner.submitted.inc_by(tasks as u64);
        self.inner.submit.observe(took.as_secs_f64());
    }

    /// Observes a task's time from submit to outcome.
    pub fn end_to_end(&self, took: Duration) {
        self.inner.end_to_end.observe(took.as_secs_f64());
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
