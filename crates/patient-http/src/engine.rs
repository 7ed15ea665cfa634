//! The engine every face shares: the configuration, transport, secrets,
//! hooks, resilience settings and live upstream state, and the helpers that
//! turn failures into wire-format errors.
//!
//! What runs on it is elsewhere: one attempt (secrets, interceptors,
//! preprocessors, transport, redirects) in `attempt.rs`; the strategy over
//! attempts (retries, hedging, deadlines, breakers, limits, fallback) in
//! `strategy.rs`; the public step-by-step form of that loop in `decision.rs`.

use std::{
    any::Any,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use patient_wire::{ErrorType, Method, RequestError, TaskError};
use tokio::time::Instant;
use url::Url;

use crate::{
    client::HttpClient, interceptor::Interceptors, metrics::Metrics, observer::Observers,
    preprocess::Preprocessors, resilience::ResilienceConfig, retry::RetryPolicy, secret::Secrets,
    upstream::Upstreams, Config, ProcessorObserver, Task,
};

/// Everything needed to run a task, shared by every face.
pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) client: HttpClient,
    pub(crate) secrets: Secrets,
    pub(crate) preprocessors: Preprocessors,
    pub(crate) interceptors: Interceptors,
    pub(crate) observers: Arc<Observers>,
    pub(crate) resilience: ResilienceConfig,
    /// The retry policy of upstreams without their own: one attempt (see
    /// [`UpstreamPolicyBuilder::retry`](crate::resilience::UpstreamPolicyBuilder::retry)).
    pub(crate) default_retry: RetryPolicy,
    pub(crate) metrics: Metrics,
    /// Breaker, limits, latencies and metric handles by upstream key.
    pub(crate) upstreams: Upstreams,
    /// Panics caught in engine code, handlers and observers.
    pub(crate) panics: AtomicU64,
}

/// The error class of a task that ended because engine code (an
/// interceptor, a preprocessor, a computed secret, a retry predicate, a
/// fallback hook) panicked.
pub(crate) const PANIC_CLASS: &str = "Panic";

impl Engine {
    /// Calls `f` on every observer, catching and reporting panics.
    pub(crate) fn notify(&self, f: impl Fn(&dyn ProcessorObserver)) {
        let Some(observers) = self.observers.snapshot() else {
            return;
        };
        for observer in observers.iter() {
            if catch_unwind(AssertUnwindSafe(|| f(observer.as_ref()))).is_err() {
                self.count_panic();
                tracing::error!("a processor observer panicked; the panic was contained");
            }
        }
    }

    /// Every upstream's health now.
    pub(crate) fn health(&self) -> crate::HealthSummary {
        crate::HealthSummary {
            upstreams: self.upstreams.health(),
        }
    }

    /// One upstream's health, if the engine keeps state for it.
    pub(crate) fn upstream_health(&self, key: &str) -> Option<crate::UpstreamHealth> {
        self.upstreams.health_of(key)
    }

    pub(crate) fn upstream_available(&self, key: &str) -> bool {
        self.upstreams.is_available(key)
    }

    /// Counts one caught panic.
    pub(crate) fn count_panic(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
        self.metrics.record_panic();
    }

    /// The request error of a task whose engine code panicked: class
    /// [`PANIC_CLASS`], the panic's message kept. Counted.
    pub(crate) fn panic_error(
        &self,
        task: &Task,
        started: Instant,
        payload: &(dyn Any + Send),
    ) -> TaskError {
        self.count_panic();
        let message = panic_message(payload);
        tracing::error!(task_id = %task.id, panic = %message, "engine code panicked while running a task; the task failed");
        self.request_error(
            task,
            task.request.url(),
            task.request.method(),
            started,
            ErrorType::Unknown,
            PANIC_CLASS,
            format!("panicked while running the task: {message}"),
        )
    }

    /// A request error of `task` at `url`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn request_error(
        &self,
        task: &Task,
        url: &Url,
        method: Method,
        started: Instant,
        error_type: ErrorType,
        class_name: &str,
        message: String,
    ) -> TaskError {
        TaskError::Request(RequestError {
            class_name: class_name.to_owned(),
            message,
            backtrace: Vec::new(),
            request_id: task.id.clone(),
            error_type,
            duration: started.elapsed(),
            url: url.to_string(),
            method,
            callback_args: task.callback_args.clone(),
            attempts: Vec::new(),
        })
    }

    /// A request error of `task` at its own URL.
    pub(crate) fn task_error(
        &self,
        task: &Task,
        started: Instant,
        error_type: ErrorType,
        class_name: &str,
        message: String,
    ) -> TaskError {
        self.request_error(
            task,
            task.request.url(),
            task.request.method(),
            started,
            error_type,
            class_name,
            message,
        )
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
