//! Where outcomes go: the [`TaskHandler`] and the [`Outcome`] value.

use std::sync::mpsc;

use patient_wire::{Response, TaskError};

use crate::Task;

/// Receives the outcome of every task: exactly one call per task.
///
/// Calls come from the processor's runtime threads; a slow handler holds one of
/// them, so hand long work to a queue of your own. A handler that panics is
/// reported through `tracing` and the processor's panic count, and does not
/// stop the processor or affect other tasks.
pub trait TaskHandler: Send + Sync + 'static {
    /// The request produced a response (any status, unless the task raises
    /// error responses).
    fn on_complete(&self, response: Response, callback: &str);

    /// The request ended in an error: an HTTP error (when raising error
    /// responses), a request error (timeout, connection, ssl, too large) or a
    /// redirect error.
    fn on_error(&self, error: TaskError, callback: &str);

    /// The task was not finished (the processor stopped first); enqueue it again.
    fn retry(&self, task: Task);
}

/// The outcome of one task, as a value.
#[derive(Debug)]
pub enum Outcome {
    /// The request produced a response.
    Completed {
        /// The response.
        response: Response,
        /// The task's callback name.
        callback: String,
    },
    /// The request ended in an error.
    Failed {
        /// The error.
        error: TaskError,
        /// The task's callback name.
        callback: String,
    },
    /// The task was not finished and should be enqueued again.
    Retry(Task),
}

impl Outcome {
    /// Whether this is a response.
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed { .. })
    }

    /// Whether this is an error.
    pub fn is_failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }

    /// Whether the task came back for a retry.
    pub fn is_retry(&self) -> bool {
        matches!(self, Outcome::Retry(_))
    }

    /// The id of the task this outcome belongs to.
    pub fn task_id(&self) -> &str {
        match self {
            Outcome::Completed { response, .. } => &response.request_id,
            Outcome::Failed { error, .. } => error.request_id(),
            Outcome::Retry(task) => &task.id,
        }
    }

    /// The outcome in wire format: the Response or error JSON; a retry gives
    /// the request's JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Outcome::Completed { response, .. } => response.to_json(),
            Outcome::Failed { error, .. } => error.to_json(),
            Outcome::Retry(task) => task.request.to_json(),
        }
    }

    /// Hands this outcome to a handler.
    pub fn deliver(self, handler: &dyn TaskHandler) {
        match self {
            Outcome::Completed { response, callback } => handler.on_complete(response, &callback),
            Outcome::Failed { error, callback } => handler.on_error(error, &callback),
            Outcome::Retry(task) => handler.retry(task),
        }
    }
}

/// A channel sender is a handler: every outcome arrives as an [`Outcome`].
impl TaskHandler for mpsc::Sender<Outcome> {
    fn on_complete(&self, response: Response, callback: &str) {
        let _ = self.send(Outcome::Completed {
            response,
            callback: callback.to_owned(),
        });
    }

    fn on_error(&self, error: TaskError, callback: &str) {
        let _ = self.send(Outcome::Failed {
            error,
            callback: callback.to_owned(),
        });
    }

    fn retry(&self, task: Task) {
        let _ = self.send(Outcome::Retry(task));
    }
}
