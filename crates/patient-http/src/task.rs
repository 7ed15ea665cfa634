//! A task: one request with the callback that receives its outcome.

use patient_wire::{CallbackArgs, Request};

/// One request handed to a processor, with the name of the callback that gets
/// its outcome and the arguments that travel with it.
///
/// A task comes back to [`TaskHandler::retry`](crate::TaskHandler::retry)
/// unchanged when it could not be finished, so it can be enqueued again.
#[derive(Debug, Clone)]
pub struct Task {
    /// The task's id (a UUID unless set); responses and errors carry it as `request_id`.
    pub id: String,
    /// The request to run.
    pub request: Request,
    /// The name of the callback that receives the outcome.
    pub callback: String,
    /// JSON-native values returned with the outcome.
    pub callback_args: CallbackArgs,
    /// Turns non-2xx responses into HTTP errors; `None` takes the processor's default.
    pub raise_error_responses: Option<bool>,
}

/// A random (version 4) UUID. Task ids need to be unique, not secret, so a
/// fast thread-local generator serves instead of a system call per task.
fn new_id() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .to_string()
}

impl Task {
    /// A task with a new UUID id, no callback arguments and the processor's
    /// default for `raise_error_responses`.
    pub fn new(request: Request, callback: impl Into<String>) -> Task {
        Task {
            id: new_id(),
            request,
            callback: callback.into(),
            callback_args: CallbackArgs::new(),
            raise_error_responses: None,
        }
    }

    /// Sets the callback arguments.
    #[must_use]
    pub fn with_callback_args(mut self, args: CallbackArgs) -> Task {
        self.callback_args = args;
        self
    }

    /// Sets whether non-2xx responses become HTTP errors for this task.
    #[must_use]
    pub fn with_raise_error_responses(mut self, raise: bool) -> Task {
        self.raise_error_responses = Some(raise);
        self
    }

    /// Sets the task id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Task {
        self.id = id.into();
        self
    }
}
