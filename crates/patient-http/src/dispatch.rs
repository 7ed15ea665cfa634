//! The standard interface: application code that makes requests depends on
//! [`Dispatch`], not on how requests run.
//!
//! Implemented by the [`Processor`] (hand-off to the in-process runtime) and the
//! [`InlineExecutor`] (run now, on the calling thread: for tests and consoles);
//! a client of the daemon's API implements it too.

use std::time::Duration;

use bytes::Bytes;
use patient_wire::{CallbackArgs, Method, Request, RequestValidationError};

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
        let mut builder = Request::builder(method, url);
        for (name, value) in &options.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        for (name, value) in &options.params {
            builder = builder.param(name.as_str(), value.as_str());
        }
        if let Some(timeout) = options.timeout {
            builder = builder.timeout(timeout);
        }
        builder = match body {
            Body::Empty => builder,
            Body::Bytes(bytes) => builder.body(bytes),
            Body::Json(value) => builder.json(&value),
        };
        let request = builder.build()?;
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
