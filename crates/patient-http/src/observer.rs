//! Observers: hooks that watch a processor work.

use std::time::Duration;

use patient_wire::{Method, TaskError};

use crate::{breaker::BreakerState, Task};

/// A request about to be sent: one per hop of a task (redirects included).
#[derive(Debug, Clone)]
pub struct RequestStart<'a> {
    /// The task's id; a redirect hop's is `<id>/<hop>` from 2.
    pub hop_id: &'a str,
    /// The method sent.
    pub method: Method,
    /// The URL sent to, without secret values.
    pub url: &'a str,
}

/// A request that produced a response.
#[derive(Debug, Clone)]
pub struct RequestEnd<'a> {
    /// The task's id; a redirect hop's is `<id>/<hop>` from 2.
    pub hop_id: &'a str,
    /// The method sent.
    pub method: Method,
    /// The URL sent to, without secret values.
    pub url: &'a str,
    /// The response status.
    pub status: u16,
    /// Time from sending to the whole body read.
    pub duration: Duration,
}

/// Watches a processor. Every method has an empty default.
///
/// Observers are called without any lock of the processor held, so one may
/// call back into the processor (enqueue, counts, even `stop`) without
/// deadlock. A panicking observer is reported and ignored.
pub trait ProcessorObserver: Send + Sync + 'static {
    /// The processor is running.
    fn on_start(&self) {}

    /// The processor has stopped; every task has had its outcome.
    fn on_stop(&self) {}

    /// A request is about to be sent.
    fn on_request_start(&self, _event: &RequestStart<'_>) {}

    /// A request produced a response.
    fn on_request_end(&self, _event: &RequestEnd<'_>) {}

    /// A task ended in an error.
    fn on_request_error(&self, _error: &TaskError) {}

    /// A task was refused because the processor was at capacity.
    fn on_capacity_exceeded(&self, _task: &Task) {}

    /// A task is about to be retried: attempt `attempt` starts after `delay`.
    fn on_retry(&self, _task_id: &str, _attempt: u32, _delay: Duration) {}

    /// The circuit breaker of an upstream changed state.
    fn on_breaker_state_change(&self, _upstream: &str, _from: BreakerState, _to: BreakerState) {}
}

/// The observers of an engine. More can be added while it runs; every call
/// goes to a snapshot of the list, taken without holding any lock while an
/// observer runs.
#[derive(Default)]
pub(crate) struct Observers {
    list: std::sync::RwLock<std::sync::Arc<[std::sync::Arc<dyn ProcessorObserver>]>>,
    /// Whether the list is non-empty: the common case of no observers takes
    /// no lock at all.
    any: std::sync::atomic::AtomicBool,
}

impl Observers {
    /// The observers given at build time.
    pub(crate) fn new(list: Vec<std::sync::Arc<dyn ProcessorObserver>>) -> Self {
        Observers {
            any: std::sync::atomic::AtomicBool::new(!list.is_empty()),
            list: std::sync::RwLock::new(list.into()),
        }
    }

    /// Adds one; it sees every event from now on.
    pub(crate) fn add(&self, observer: std::sync::Arc<dyn ProcessorObserver>) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<_> = list.iter().cloned().collect();
        next.push(observer);
        *list = next.into();
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The observers now, or `None` when there are none.
    pub(crate) fn snapshot(
        &self,
    ) -> Option<std::sync::Arc<[std::sync::Arc<dyn ProcessorObserver>]>> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        Some(std::sync::Arc::clone(
            &self.list.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}
