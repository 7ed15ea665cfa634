//! The standard interface: application code that makes requests depends on
//! [`Dispatch`], not on how requests run.
//!
//! Implemented by the [`Processor`] (hand-off to the in-process runtime) and the
//! [`InlineExecutor`] (run now, on the calling thread: for tests and consoles);
//! a client of the daemon's API implements it too.

use std::time::Duration;

use bytes::Bytes;
use patient_wire::{
    CallbackArgs, Method, Request, RequestBuilder, RequestTemplate, RequestValidationError,
};

use crate::{EnqueueError, InlineExecutor, Processor, Task};

/// Why a request could not be dispatched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The request is not valid.
    #[error(transparent)]
    Invalid(#[from] RequestValidationError),
    /// The processor refused the task (not running, or at capacity); the task
    /// is inside.
    #[error(transparent)]
    Refused(#[from] EnqueueError),
    /// A remote queue (such as the daemon's API) did not take the task: it
    /// refused it or could not be reached. The error is that client's own
    /// (for the daemon's client, a `patient_client::ClientError`).
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
}

/// A request body for [`Dispatch`]'s shortcuts.
#[derive(Debug, Clone, Default)]
pub enum Body {
    /// No body.
    #[default]
    Empty,
    /// Raw bytes (set `content-type` in the options' headers).
    Bytes(Bytes),
    /// A JSON body (`content-type: application/json; charset=utf-8` unless set).
    Json(serde_json::Value),
}

/// Options of a dispatched request besides its method, URL and body.
#[derive(Debug, Clone, Default)]
pub struct DispatchOptions {
    /// Values returned with the outcome.
    pub callback_args: CallbackArgs,
    /// Turns non-2xx responses into HTTP errors; `None` takes the default.
    pub raise_error_responses: Option<bool>,
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// Query parameters appended to the URL.
    pub params: Vec<(String, String)>,
    /// The request's timeout; `None` takes the default.
    pub timeout: Option<Duration>,
}

/// Hands requests to something that runs them and delivers their outcome to a
/// callback: the Rust counterpart of the gem's `RequestHelper`.
pub trait Dispatch {
    /// Hands over a task; returns its id.
    fn dispatch(&self, task: Task) -> Result<String, DispatchError>;

    /// Hands over a request with a callback and options; returns the task id.
    fn request(
        &self,
        request: Request,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        let mut task = Task::new(request, callback).with_callback_args(options.callback_args);
        task.raise_error_responses = options.raise_error_responses;
        self.dispatch(task)
    }

    /// Builds and hands over a request of any method.
    fn send(
        &self,
        method: Method,
        url: &str,
        body: Body,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        let request = apply(Request::builder(method, url), body, &options).build()?;
        self.request(request, callback, options)
    }

    /// A GET request.
    fn get(
        &self,
        url: &str,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.send(Method::Get, url, Body::Empty, callback, options)
    }

    /// A DELETE request.
    fn delete(
        &self,
        url: &str,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.send(Method::Delete, url, Body::Empty, callback, options)
    }

    /// A POST request.
    fn post(
        &self,
        url: &str,
        body: Body,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.send(Method::Post, url, body, callback, options)
    }

    /// A PUT request.
    fn put(
        &self,
        url: &str,
        body: Body,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.send(Method::Put, url, body, callback, options)
    }

    /// A PATCH request.
    fn patch(
        &self,
        url: &str,
        body: Body,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.send(Method::Patch, url, body, callback, options)
    }
}

/// Sets the options' headers (replacing any of the same name), query
/// parameters and timeout, and the body, on a request builder.
fn apply(mut builder: RequestBuilder, body: Body, options: &DispatchOptions) -> RequestBuilder {
    for (name, value) in &options.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    for (name, value) in &options.params {
        builder = builder.param(name.as_str(), value.as_str());
    }
    if let Some(timeout) = options.timeout {
        builder = builder.timeout(timeout);
    }
    match body {
        Body::Empty => builder,
        Body::Bytes(bytes) => builder.body(bytes),
        Body::Json(value) => builder.json(&value),
    }
}

/// A [`Dispatch`] bound to a [`RequestTemplate`]: the URLs given to its
/// shortcuts are paths under the template's base URL, as with the template's
/// own builders: `api.get("/users/1", ..)`.
///
/// Each request is built with [`RequestTemplate::request`] (the path joined
/// under the base URL, or an absolute URL used as is; the template's default
/// headers, query parameters, timeout, preprocessors and URL credentials),
/// then the call's [`DispatchOptions`] apply on top: their headers replace
/// the template's of the same name, their query parameters come after the
/// template's, their timeout replaces the template's. Tasks go to `dispatch`.
///
/// ```
/// use std::sync::mpsc;
///
/// use patient_http::testing::{FakeDispatch, Reply};
/// use patient_http::{Dispatch, DispatchOptions, Method, RequestTemplate, TemplateDispatch};
///
/// let (tx, _rx) = mpsc::channel();
/// let template = RequestTemplate::new("https://api.example.com/v1")?
///     .header("accept", "application/json");
/// let api = TemplateDispatch::new(template, FakeDispatch::new(tx));
/// api.dispatch.stub(Method::Get, "https://api.example.com/v1/users/1", Reply::status(200));
///
/// api.get("/users/1", "UserLoaded", DispatchOptions::default())?;
///
/// let request = &api.dispatch.requests()[0];
/// assert_eq!(request.url().as_str(), "https://api.example.com/v1/users/1");
/// assert_eq!(request.headers().get_str("accept"), Some("application/json"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct TemplateDispatch<D> {
    /// The base URL and defaults of every request.
    pub template: RequestTemplate,
    /// Where the tasks go.
    pub dispatch: D,
}

impl<D: Dispatch> TemplateDispatch<D> {
    /// Binds `template` to `dispatch`.
    pub fn new(template: RequestTemplate, dispatch: D) -> TemplateDispatch<D> {
        TemplateDispatch { template, dispatch }
    }
}

impl<D: Dispatch> Dispatch for TemplateDispatch<D> {
    fn dispatch(&self, task: Task) -> Result<String, DispatchError> {
        self.dispatch.dispatch(task)
    }

    fn request(
        &self,
        request: Request,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        self.dispatch.request(request, callback, options)
    }

    /// Builds a request to `path` under the template's base URL (see the
    /// type's documentation) and hands it over.
    fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        callback: &str,
        options: DispatchOptions,
    ) -> Result<String, DispatchError> {
        let request = apply(self.template.request(method, path), body, &options).build()?;
        self.dispatch.request(request, callback, options)
    }
}

impl Dispatch for Processor {
    fn dispatch(&self, task: Task) -> Result<String, DispatchError> {
        let id = task.id.clone();
        self.enqueue(task)?;
        Ok(id)
    }
}

impl Dispatch for InlineExecutor {
    fn dispatch(&self, task: Task) -> Result<String, DispatchError> {
        let id = task.id.clone();
        self.execute(task);
        Ok(id)
    }
}
