//! Test doubles for application code that makes requests through
//! [`Dispatch`] or [`AwaitableDispatch`].
//!
//! [`FakeDispatch`] runs nothing: it records every task it is handed and
//! answers it at once, on the calling thread, from canned [`Reply`]s, handing
//! the outcome to a [`TaskHandler`]. A test sees `on_complete`/`on_error`
//! as soon as the dispatching call has returned.
//!
//! [`FakeClient`] is the same for code written against the awaitable client
//! (through [`AwaitableDispatch`], which [`AwaitableClient`](crate::AwaitableClient)
//! implements): `send`/`execute` return the canned reply as the response or
//! the error, and every request is recorded.
//!
//! ```
//! use patient_http::testing::{FakeClient, Reply};
//! use patient_http::{AwaitableDispatch, Method, Request};
//!
//! async fn user_name(api: &dyn AwaitableDispatch, id: u32) -> Option<String> {
//!     let request = Request::get(format!("https://api.example.com/users/{id}")).build().ok()?;
//!     let response = api.send(request).await.ok()?;
//!     let user: serde_json::Value = serde_json::from_slice(response.body.as_deref()?).ok()?;
//!     user["name"].as_str().map(str::to_owned)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let fake = FakeClient::new();
//! fake.stub(
//!     Method::Get,
//!     "https://api.example.com/users/7",
//!     Reply::json(200, &serde_json::json!({ "name": "ada" })),
//! );
//! assert_eq!(user_name(&fake, 7).await.as_deref(), Some("ada"));
//! assert_eq!(user_name(&fake, 8).await, None); // no canned reply: an error
//! assert_eq!(fake.requests().len(), 2);
//! # }
//! ```
//!
//! ```
//! use std::sync::mpsc;
//!
//! use patient_http::testing::{FakeDispatch, Reply};
//! use patient_http::{Body, Dispatch, DispatchError, DispatchOptions, Method, Outcome};
//!
//! // Application code depends on the interface only.
//! fn create_user(api: &dyn Dispatch, name: &str) -> Result<String, DispatchError> {
//!     api.post(
//!         "https://api.example.com/users",
//!         Body::Json(serde_json::json!({ "name": name })),
//!         "UserCreated",
//!         DispatchOptions::default(),
//!     )
//! }
//!
//! let (tx, rx) = mpsc::channel::<Outcome>();
//! let fake = FakeDispatch::new(tx);
//! fake.stub(
//!     Method::Post,
//!     "https://api.example.com/users",
//!     Reply::json(201, &serde_json::json!({ "id": 7 })),
//! );
//!
//! let id = create_user(&fake, "ada")?;
//!
//! let requests = fake.requests();
//! assert_eq!(requests.len(), 1);
//! assert_eq!(requests[0].body().map(|b| &b[..]), Some(&br#"{"name":"ada"}"#[..]));
//! match rx.try_recv()? {
//!     Outcome::Completed { response, callback } => {
//!         assert_eq!(response.status, 201);
//!         assert_eq!(response.request_id, id);
//!         assert_eq!(callback, "UserCreated");
//!     }
//!     other => panic!("unexpected outcome {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use patient_wire::{
    ErrorType, Headers, HttpError, Method, Request, RequestError, Response, TaskError,
};

use crate::{
    AwaitableDispatch, Dispatch, DispatchError, Outcome, ResponseFuture, Task, TaskHandler,
};

/// The `class_name` of the error a [`FakeDispatch`] answers a task with when
/// no canned reply matches it.
pub const NO_CANNED_RESPONSE: &str = "NoCannedResponse";

/// A canned answer of a [`FakeDispatch`]: a response (status, headers, body)
/// or a request error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    kind: ReplyKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReplyKind {
    Response {
        status: u16,
        headers: Headers,
        body: Option<Bytes>,
    },
    Error {
        error_type: ErrorType,
        class_name: String,
        message: String,
    },
}

impl Reply {
    /// A response with this status, no headers and no body.
    pub fn status(status: u16) -> Reply {
        Reply {
            kind: ReplyKind::Response {
                status,
                headers: Headers::new(),
                body: None,
            },
        }
    }

    /// A response with this status and a JSON body
    /// (`content-type: application/json; charset=utf-8`).
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::status(status)
            .header("content-type", "application/json; charset=utf-8")
            .body(value.to_string())
    }

    /// A request error (no response) of this kind, with the class name and
    /// message the error carries, like `Reply::error(ErrorType::Timeout,
    /// "ReadTimeout", "read timed out")`.
    pub fn error(
        error_type: ErrorType,
        class_name: impl Into<String>,
        message: impl Into<String>,
    ) -> Reply {
        Reply {
            kind: ReplyKind::Error {
                error_type,
                class_name: class_name.into(),
                message: message.into(),
            },
        }
    }

    /// Adds a response header (replacing one of the same name); no effect on
    /// an error.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        if let ReplyKind::Response { headers, .. } = &mut self.kind {
            headers.insert(name, value.into());
        }
        self
    }

    /// Sets the response body; no effect on an error.
    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        if let ReplyKind::Response { body: slot, .. } = &mut self.kind {
            *slot = Some(body.into());
        }
        self
    }

    /// The outcome of `task` with this reply; a non-2xx response becomes an
    /// HTTP error when `raise` is set.
    fn outcome(&self, task: &Task, raise: bool) -> Outcome {
        let callback = task.callback.clone();
        match &self.kind {
            ReplyKind::Response {
                status,
                headers,
                body,
            } => {
                let response = Response {
                    status: *status,
                    headers: headers.clone(),
                    body: body.clone(),
                    duration: Duration::ZERO,
                    request_id: task.id.clone(),
                    url: task.request.url().to_string(),
                    method: task.request.method(),
                    callback_args: task.callback_args.clone(),
                    redirects: Vec::new(),
                    attempts: Vec::new(),
                };
                if raise && !response.is_success() {
                    Outcome::Failed {
                        error: TaskError::Http(HttpError::new(response)),
                        callback,
                    }
                } else {
                    Outcome::Completed { response, callback }
                }
            }
            ReplyKind::Error {
                error_type,
                class_name,
                message,
            } => Outcome::Failed {
                error: TaskError::Request(request_error(
                    task,
                    *error_type,
                    class_name.clone(),
                    message.clone(),
                )),
                callback,
            },
        }
    }
}

fn request_error(
    task: &Task,
    error_type: ErrorType,
    class_name: String,
    message: String,
) -> RequestError {
    RequestError {
        class_name,
        message,
        backtrace: Vec::new(),
        request_id: task.id.clone(),
        error_type,
        duration: Duration::ZERO,
        url: task.request.url().to_string(),
        method: task.request.method(),
        callback_args: task.callback_args.clone(),
        attempts: Vec::new(),
    }
}

type Responder = Arc<dyn Fn(&Task) -> Option<Reply> + Send + Sync>;

/// An in-memory [`Dispatch`] for tests: records every task and answers it
/// synchronously from canned replies.
///
/// Replies are matched by method and URL ([`stub`](FakeDispatch::stub)) or
/// chosen by a closure ([`respond_with`](FakeDispatch::respond_with)); the
/// most recently added one that matches wins, so a test may override a
/// general answer with a specific one. A task that nothing matches gets an
/// error outcome (a request error of type `unknown` with class
/// [`NO_CANNED_RESPONSE`]) rather than a panic.
///
/// The outcome goes to the handler before [`dispatch`](Dispatch::dispatch)
/// returns, on the calling thread, and no lock is held meanwhile: a handler
/// may dispatch again. As with the processor, non-2xx responses become HTTP
/// errors when the task (or else the fake's default, off unless set with
/// [`raise_error_responses`](FakeDispatch::raise_error_responses)) says so.
pub struct FakeDispatch {
    handler: Arc<dyn TaskHandler>,
    canned: Canned,
}

/// The canned replies and the recorded tasks of a fake.
#[derive(Default)]
struct Canned {
    raise_error_responses: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    tasks: Vec<Task>,
    responders: Vec<Responder>,
}

impl Canned {
    fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct(name)
            .field("raise_error_responses", &self.raise_error_responses)
            .field("tasks", &state.tasks.len())
            .field("responders", &state.responders.len())
            .finish()
    }

    fn stub(&self, method: Method, url: &str, reply: Reply) {
        let url = url::Url::parse(url).ok();
        self.respond_with(move |task| {
            let matches =
                task.request.method() == method && url.as_ref() == Some(task.request.url());
            matches.then(|| reply.clone())
        });
    }

    fn respond_with(&self, responder: impl Fn(&Task) -> Option<Reply> + Send + Sync + 'static) {
        self.lock().responders.push(Arc::new(responder));
    }

    fn tasks(&self) -> Vec<Task> {
        self.lock().tasks.clone()
    }

    fn requests(&self) -> Vec<Request> {
        self.lock()
            .tasks
            .iter()
            .map(|task| task.request.clone())
            .collect()
    }

    fn clear(&self) {
        self.lock().tasks.clear();
    }

    /// Records `task` and returns its outcome.
    fn answer_and_record(&self, task: &Task) -> Outcome {
        let outcome = self.answer(task);
        self.lock().tasks.push(task.clone());
        outcome
    }

    /// The outcome of a task, without recording or delivering it.
    fn answer(&self, task: &Task) -> Outcome {
        let raise = task
            .raise_error_responses
            .unwrap_or(self.raise_error_responses);
        // Responders run without the lock, so one may use the fake itself.
        let responders = self.lock().responders.clone();
        let reply = responders
            .iter()
            .rev()
            .find_map(|responder| responder(task));
        match reply {
            Some(reply) => reply.outcome(task, raise),
            None => Outcome::Failed {
                error: TaskError::Request(request_error(
                    task,
                    ErrorType::Unknown,
                    NO_CANNED_RESPONSE.to_owned(),
                    format!(
                        "no canned response for {} {}",
                        task.request.method().as_str(),
                        task.request.url()
                    ),
                )),
                callback: task.callback.clone(),
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking responder leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for FakeDispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.canned.debug("FakeDispatch", f)
    }
}

impl FakeDispatch {
    /// A fake with no canned replies, delivering outcomes to `handler`.
    pub fn new(handler: impl TaskHandler) -> FakeDispatch {
        FakeDispatch {
            handler: Arc::new(handler),
            canned: Canned::default(),
        }
    }

    /// Sets the default of `raise_error_responses` for tasks that leave it
    /// unset. Default: `false`, as the processor's.
    #[must_use]
    pub fn raise_error_responses(mut self, raise: bool) -> FakeDispatch {
        self.canned.raise_error_responses = raise;
        self
    }

    /// Answers requests with this method to this URL with `reply`. The URL is
    /// compared in full, query included, after parsing (so
    /// `https://API.example.com` matches `https://api.example.com/`); a URL
    /// that does not parse matches nothing.
    pub fn stub(&self, method: Method, url: &str, reply: Reply) -> &FakeDispatch {
        self.canned.stub(method, url, reply);
        self
    }

    /// Answers the tasks for which `responder` returns a reply; `None` passes
    /// the task on to the replies added before.
    pub fn respond_with(
        &self,
        responder: impl Fn(&Task) -> Option<Reply> + Send + Sync + 'static,
    ) -> &FakeDispatch {
        self.canned.respond_with(responder);
        self
    }

    /// Every task dispatched so far, oldest first.
    pub fn tasks(&self) -> Vec<Task> {
        self.canned.tasks()
    }

    /// The requests of every task dispatched so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.canned.requests()
    }

    /// Forgets the recorded tasks (the canned replies stay).
    pub fn clear(&self) {
        self.canned.clear();
    }
}

impl Dispatch for FakeDispatch {
    fn dispatch(&self, task: Task) -> Result<String, DispatchError> {
        let outcome = self.canned.answer_and_record(&task);
        outcome.deliver(self.handler.as_ref());
        Ok(task.id)
    }
}

/// An in-memory [`AwaitableDispatch`] for tests: records every request and
/// answers it from canned replies, as the response or the error the
/// awaitable client would return.
///
/// Replies are matched as [`FakeDispatch`]'s are (the most recently added
/// match wins; no match is a request error of class
/// [`NO_CANNED_RESPONSE`]), and non-2xx responses become HTTP errors when the
/// task (or else the fake's default) sets `raise_error_responses`. Cheap to
/// share: clone the `Arc` it is usually kept in.
#[derive(Default)]
pub struct FakeClient {
    canned: Canned,
}

impl fmt::Debug for FakeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.canned.debug("FakeClient", f)
    }
}

impl FakeClient {
    /// A fake with no canned replies.
    pub fn new() -> FakeClient {
        FakeClient::default()
    }

    /// Sets the default of `raise_error_responses` for tasks that leave it
    /// unset. Default: `false`, as the awaitable client's.
    #[must_use]
    pub fn raise_error_responses(mut self, raise: bool) -> FakeClient {
        self.canned.raise_error_responses = raise;
        self
    }

    /// Answers requests with this method to this URL with `reply` (the URL
    /// compared in full after parsing, as [`FakeDispatch::stub`] does).
    pub fn stub(&self, method: Method, url: &str, reply: Reply) -> &FakeClient {
        self.canned.stub(method, url, reply);
        self
    }

    /// Answers the tasks for which `responder` returns a reply; `None` passes
    /// the task on to the replies added before.
    pub fn respond_with(
        &self,
        responder: impl Fn(&Task) -> Option<Reply> + Send + Sync + 'static,
    ) -> &FakeClient {
        self.canned.respond_with(responder);
        self
    }

    /// Every task run so far (a `send` is a task with a new id and no
    /// callback), oldest first.
    pub fn tasks(&self) -> Vec<Task> {
        self.canned.tasks()
    }

    /// The requests of every task run so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.canned.requests()
    }

    /// Forgets the recorded tasks (the canned replies stay).
    pub fn clear(&self) {
        self.canned.clear();
    }
}

impl AwaitableDispatch for FakeClient {
    fn execute<'a>(&'a self, task: &'a Task) -> ResponseFuture<'a> {
        let result = match self.canned.answer_and_record(task) {
            Outcome::Completed { response, .. } => Ok(response),
            Outcome::Failed { error, .. } => Err(error),
            Outcome::Retry(_) => unreachable_retry(task),
        };
        Box::pin(std::future::ready(result))
    }
}

/// Canned replies never ask for a retry; should one ever, it is an error
/// rather than a panic in the test's code path.
fn unreachable_retry(task: &Task) -> Result<Response, TaskError> {
    Err(TaskError::Request(request_error(
        task,
        ErrorType::Unknown,
        NO_CANNED_RESPONSE.to_owned(),
        "a canned reply asked for a retry".to_owned(),
    )))
}
