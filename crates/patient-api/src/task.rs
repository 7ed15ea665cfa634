//! A task as the daemon shows it ([`TaskInfo`]), its attempts, delivery and
//! outcome, and the task list ([`TaskList`], [`ListFilter`]).
//!
//! Each type serializes back to the JSON it was read from: fields the
//! contract names are typed, anything else the daemon sends is kept in an
//! `extra` map, so `serde_json::to_value(&task)` gives the API's JSON.

use std::fmt;

use patient_wire::{CallbackArgs, Request, Response, TaskError, WireError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for its time (a delay, `not_before`, or a retry's backoff).
    Scheduled,
    /// Due, waiting for a worker.
    Queued,
    /// An attempt is running.
    Running,
    /// Finished with a response (any status unless `raise_error_responses`).
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl TaskState {
    /// Every state, as the API names them.
    pub const NAMES: [&'static str; 6] = [
        "scheduled",
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
    ];

    /// The API's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the task has ended: completed, failed or cancelled.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    /// A state from its API name.
    fn from_str(s: &str) -> Result<TaskState, String> {
        Ok(match s {
            "scheduled" => TaskState::Scheduled,
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "completed" => TaskState::Completed,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            other => {
                return Err(format!(
                    "{other:?} is not a task state (one of {})",
                    TaskState::NAMES.join(", ")
                ))
            }
        })
    }
}

/// A task: `GET /v1/tasks/{id}` and what every other task route answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// `tsk_…`.
    pub id: String,
    /// Its state.
    pub state: TaskState,
    /// The callback's name (empty when the submit gave none).
    pub callback: String,
    /// The callback arguments.
    pub callback_args: CallbackArgs,
    /// When it was submitted (RFC 3339).
    pub created_at: String,
    /// Not run before this (RFC 3339).
    pub not_before: String,
    /// When it finished (RFC 3339), once it has.
    pub finished_at: Option<String>,
    /// The attempts so far.
    pub attempts: Vec<AttemptInfo>,
    /// The outcome event, once the task is completed or failed.
    pub outcome: Option<OutcomeEvent>,
    /// The outcome's delivery.
    pub delivery: DeliveryInfo,
    /// Fields beyond the contract's, as sent (this daemon sends
    /// `idempotency_key` and the stored `request`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TaskInfo {
    /// The submit's idempotency key, when the daemon shows it.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.extra.get("idempotency_key").and_then(Value::as_str)
    }

    /// The stored request, when the daemon shows it; the error names the
    /// field that does not load.
    pub fn request(&self) -> Option<Result<Request, WireError>> {
        self.extra.get("request").map(Request::from_json)
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptInfo {
    /// 1 for the first attempt of the current series.
    pub attempt: u32,
    /// The response status, when it produced a response.
    pub status: Option<u16>,
    /// The kind of error (`timeout`, `connection`, …), when it produced none.
    pub error_type: Option<String>,
    /// How long it took, in seconds.
    pub duration: f64,
    /// When it started (RFC 3339).
    pub started_at: Option<String>,
    /// Fields beyond the contract's, as sent (this daemon sends
    /// `class_name` and `hedged`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryChannel {
    /// A webhook.
    Webhook,
    /// A Redis list or stream.
    Redis,
    /// A Sidekiq job.
    Sidekiq,
    /// None: the application polls.
    None,
}

impl DeliveryChannel {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryChannel::Webhook => "webhook",
            DeliveryChannel::Redis => "redis",
            DeliveryChannel::Sidekiq => "sidekiq",
            DeliveryChannel::None => "none",
        }
    }
}

impl fmt::Display for DeliveryChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Not delivered yet (or being retried).
    Pending,
    /// Delivered.
    Delivered,
    /// Every try failed; kept for `redeliver`.
    Failed,
    /// The task has no channel.
    None,
}

impl DeliveryState {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::None => "none",
        }
    }
}

impl std::str::FromStr for DeliveryState {
    type Err = String;

    /// A delivery state from its API name.
    fn from_str(s: &str) -> Result<DeliveryState, String> {
        Ok(match s {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            "none" => DeliveryState::None,
            other => return Err(format!("{other:?} is not a delivery state")),
        })
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task's delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryInfo {
    /// The channel.
    pub channel: DeliveryChannel,
    /// Its state.
    pub state: DeliveryState,
    /// Tries so far.
    pub attempts: u32,
    /// Why the last try failed, if it did.
    pub last_error: Option<String>,
    /// Fields beyond the contract's, as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Which outcome an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutcomeType {
    /// `task.completed`: the request produced a response.
    #[serde(rename = "task.completed")]
    Completed,
    /// `task.failed`: it ended in an error.
    #[serde(rename = "task.failed")]
    Failed,
}

/// The outcome event: what every channel delivers, and a finished task's
/// `outcome`.
///
/// `response` and `error` are kept as the JSON the daemon sent (the wire
/// format the Ruby gem loads); [`response`](Self::response) and
/// [`error`](Self::error) load them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    /// The task's id.
    pub task_id: String,
    /// Completed or failed.
    #[serde(rename = "type")]
    pub kind: OutcomeType,
    /// The callback's name.
    pub callback: String,
    /// The callback arguments.
    pub callback_args: CallbackArgs,
    /// The Response in the wire format, for a completed task.
    pub response: Option<Value>,
    /// The Error in the wire format, for a failed task.
    pub error: Option<Value>,
    /// Fields beyond the contract's, as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl OutcomeEvent {
    /// Whether the request produced a response.
    pub fn is_completed(&self) -> bool {
        self.kind == OutcomeType::Completed
    }

    /// The response, loaded; `Ok(None)` for a failed task.
    pub fn response(&self) -> Result<Option<Response>, WireError> {
        self.response
            .as_ref()
            .filter(|v| !v.is_null())
            .map(Response::from_json)
            .transpose()
    }

    /// The error, loaded; `Ok(None)` for a completed task.
    pub fn error(&self) -> Result<Option<TaskError>, WireError> {
        self.error
            .as_ref()
            .filter(|v| !v.is_null())
            .map(TaskError::load)
            .transpose()
    }
}

/// A page of the task list: `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    /// The tasks, newest first.
    pub tasks: Vec<TaskInfo>,
    /// The cursor of the next page ([`ListFilter::cursor`]); `None` on the
    /// last page.
    pub next_cursor: Option<String>,
}

/// Which tasks `GET /v1/tasks` returns (`patient_client::DaemonClient::list`
/// takes it).
///
/// ```
/// use patient_api::{ListFilter, TaskState};
///
/// let filter = ListFilter::new().state(TaskState::Failed).limit(20);
/// assert_eq!(filter.query(), "state=failed&limit=20");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct ListFilter {
    /// Only tasks in this state (default: any).
    pub state: Option<TaskState>,
    /// Only tasks of this callback (default: any).
    pub callback: Option<String>,
    /// At most this many, 1 to 1,000 (default: the daemon's, 100).
    pub limit: Option<u32>,
    /// The page after the one whose `next_cursor` this is (default: the
    /// first page).
    pub cursor: Option<String>,
}

impl ListFilter {
    /// Every task, the daemon's page size.
    pub fn new() -> ListFilter {
        ListFilter::default()
    }

    /// Only tasks in `state`.
    pub fn state(mut self, state: TaskState) -> ListFilter {
        self.state = Some(state);
        self
    }

    /// Only tasks of `callback`.
    pub fn callback(mut self, callback: impl Into<String>) -> ListFilter {
        self.callback = Some(callback.into());
        self
    }

    /// At most `limit` tasks.
    pub fn limit(mut self, limit: u32) -> ListFilter {
        self.limit = Some(limit);
        self
    }

    /// The page after the one that returned `cursor`.
    pub fn cursor(mut self, cursor: impl Into<String>) -> ListFilter {
        self.cursor = Some(cursor.into());
        self
    }

    /// The query string (without `?`), form-encoded.
    pub fn query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(state) = self.state {
            query.append_pair("state", state.as_str());
        }
        if let Some(callback) = &self.callback {
            query.append_pair("callback", callback);
        }
        if let Some(limit) = self.limit {
            query.append_pair("limit", &limit.to_string());
        }
        if let Some(cursor) = &self.cursor {
            query.append_pair("cursor", cursor);
        }
        query.finish()
    }
}
