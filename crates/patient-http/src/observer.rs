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
