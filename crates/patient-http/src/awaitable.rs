//! The awaitable client: the same request path as an `async fn`.

use std::{future::Future, pin::Pin, sync::Arc};

use patient_wire::{Request, Response, TaskError};

use crate::{
    engine::Engine,
    exchange::{Exchange, ExchangeOptions},
    propagation::Admission,
    Builder, Task,
};

/// Runs requests in the caller's own async runtime and returns their outcome,
/// with the same redirects, secrets, preprocessors and error wrapping as the
/// processor. Cheap to clone.
///
/// A request sent while serving one behind
/// [`PropagationLayer`](crate::propagation::PropagationLayer) inherits that
/// request's deadline and priority (see
/// [inherited deadlines](crate::propagation#inherited-deadlines)).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use patient_http::{AwaitableClient, Request};
///
/// let client = AwaitableClient::builder().build_awaitable()?;
/// let response = client.send(Request::get("https://example.com/").build()?).await?;
/// println!("{}", response.status);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AwaitableClient {
    pub(crate) engine: Arc<Engine>,
}

impl AwaitableClient {
    /// A builder for the configuration, secrets, preprocessors and observers.
    pub fn builder() -> Builder {
        Builder::new()
    }

    pub(crate) fn from_engine(engine: Arc<Engine>) -> AwaitableClient {
        AwaitableClient { engine }
    }

    /// Runs a task: a response, or the error the processor would hand to `on_error`.
    pub async fn execute(&self, task: &Task) -> Result<Response, TaskError> {
        self.engine.execute(task, Admission::now()).await
    }

    /// The health of every upstream it keeps state for: breaker state,
    /// concurrency in use, cool-down, the last minute's attempts and
    /// failures.
    pub fn health(&self) -> crate::HealthSummary {
        self.engine.health()
    }

    /// The health of one upstream (its key: `scheme://host[:port]` or an
    /// `upstream_key`), if state is kept for it.
    pub fn upstream_health(&self, key: &str) -> Option<crate::UpstreamHealth> {
        self.engine.upstream_health(key)
    }

    /// Whether the upstream `key` takes attempts now: its breaker is not
    /// open and it is not cooling down (true when no state is kept for
    /// it). What [`UpstreamHealth::is_available`](crate::UpstreamHealth::is_available)
    /// says, cheaper: for a choice made on every request.
    pub fn upstream_available(&self, key: &str) -> bool {
        self.engine.upstream_available(key)
    }

    /// Adds an observer: it sees every request made from now on, by this
    /// client and its clones.
    pub fn add_observer(&self, observer: impl crate::ProcessorObserver) {
        self.engine.observers.add(Arc::new(observer));
    }

    /// The metrics of this client's requests.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.engine.metrics
    }

    /// Runs a task with the same attempts, retries, breaker, limits and
    /// deadlines as [`execute`](Self::execute), and hands back its final
    /// response as an [`Exchange`]: the head as received (repeated fields
    /// apart) and the body read in full under `options.max_body`, or as a
    /// stream. Retries happen before the head is handed back, never after.
    /// Response interceptors of a streamed exchange see an empty body.
    /// A response of any status is an exchange (as if
    /// `raise_error_responses` were off); errors are the task's errors.
    pub async fn exchange(
        &self,
        task: &Task,
        options: ExchangeOptions,
    ) -> Result<Exchange, TaskError> {
        self.run_exchange(task, None, options).await
    }

    /// Runs a task as [`exchange`](Self::exchange) does, sending `headers`
    /// before the task's own header fields on every attempt, as they are:
    /// repeated fields apart, values that are not UTF-8 byte for byte, no
    /// wire-format copy made (what a proxy forwarding a client's head
    /// wants). The engine treats them as it treats the task's: a redirect
    /// drops the body's fields on a 301–303 and the credentials and
    /// sensitive values when it leaves the origin, interceptors and
    /// preprocessors see them, and an idempotency key among them opts a POST
    /// in to retries as the task's own would.
    pub async fn exchange_with_headers(
        &self,
        task: &Task,
        headers: &http::HeaderMap,
        options: ExchangeOptions,
    ) -> Result<Exchange, TaskError> {
        self.run_exchange(task, Some(headers), options).await
    }

    async fn run_exchange(
        &self,
        task: &Task,
        headers: Option<&http::HeaderMap>,
        options: ExchangeOptions,
    ) -> Result<Exchange, TaskError> {
        let task = if task.raise_error_responses == Some(false) {
            std::borrow::Cow::Borrowed(task)
        } else {
            let mut owned = task.clone();
            owned.raise_error_responses = Some(false);
            std::borrow::Cow::Owned(owned)
        };
        self.engine
            .exchange(&task, headers, Admission::now(), options)
            .await
    }

    /// Runs a request as a task with a new id and no callback.
    pub async fn send(&self, request: Request) -> Result<Response, TaskError> {
        self.engine
            .execute(&Task::new(request, ""), Admission::now())
            .await
    }
}

/// The future of an [`AwaitableDispatch`] call.
pub type ResponseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response, TaskError>> + Send + 'a>>;

/// What application code awaiting its requests depends on: implemented by
/// [`AwaitableClient`] and, for tests, by
/// [`FakeClient`](crate::testing::FakeClient).
///
/// Object safe (`&dyn AwaitableDispatch`, `Arc<dyn AwaitableDispatch>`).
pub trait AwaitableDispatch: Send + Sync {
    /// Runs a task: a response, or the error the processor would hand to
    /// `on_error`.
    fn execute<'a>(&'a self, task: &'a Task) -> ResponseFuture<'a>;

    /// Runs a request as a task with a new id and no callback.
    fn send(&self, request: Request) -> ResponseFuture<'_> {
        Box::pin(async move { self.execute(&Task::new(request, "")).await })
    }
}

impl AwaitableDispatch for AwaitableClient {
    fn execute<'a>(&'a self, task: &'a Task) -> ResponseFuture<'a> {
        Box::pin(AwaitableClient::execute(self, task))
    }

    fn send(&self, request: Request) -> ResponseFuture<'_> {
        Box::pin(AwaitableClient::send(self, request))
    }
}
