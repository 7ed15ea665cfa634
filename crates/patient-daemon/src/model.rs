//! The daemon's records: tasks, their delivery, and the outcome event every
//! channel delivers, with their JSON as the API contract writes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use patient_api::{DeliveryState, TaskState};
use serde_json::{json, Map, Value};

/// The worker a Sidekiq delivery names when the submit does not.
pub const DEFAULT_SIDEKIQ_WORKER: &str = "PatientHttp::Sidekiq::CallbackWorker";

/// Where a task's outcome goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliver {
    /// Nowhere: the application polls.
    None,
    /// A signed webhook POST.
    Webhook {
        /// The URL.
        url: String,
    },
    /// `LPUSH` of the event JSON.
    RedisList {
        /// The list's key.
        key: String,
    },
    /// `XADD KEY * event JSON`.
    RedisStream {
        /// The stream's key.
        key: String,
    },
    /// A Sidekiq job for the PatientHttp callback worker.
    Sidekiq {
        /// The queue (`default`).
        queue: String,
        /// The worker class.
        worker: String,
    },
}

impl Deliver {
    /// The channel's name in the task JSON.
    pub fn channel(&self) -> &'static str {
        match self {
            Deliver::None => "none",
            Deliver::Webhook { .. } => "webhook",
            Deliver::RedisList { .. } | Deliver::RedisStream { .. } => "redis",
            Deliver::Sidekiq { .. } => "sidekiq",
        }
    }

    /// The submit's `deliver` JSON (null for none).
    pub fn to_json(&self) -> Value {
        match self {
            Deliver::None => Value::Null,
            Deliver::Webhook { url } => json!({"webhook": {"url": url}}),
            Deliver::RedisList { key } => json!({"redis": {"list": key}}),
            Deliver::RedisStream { key } => json!({"redis": {"stream": key}}),
            Deliver::Sidekiq { queue, worker } => {
                json!({"sidekiq": {"queue": queue, "worker": worker}})
            }
        }
    }

    /// Reads the submit's `deliver` (absent or null: none); the error is the
    /// field path and what is wrong.
    pub fn from_json(value: Option<&Value>) -> Result<Deliver, (String, String)> {
        let fail = |field: &str, message: &str| Err((field.to_owned(), message.to_owned()));
        let value = match value {
            None | Some(Value::Null) => return Ok(Deliver::None),
            Some(Value::Object(map)) => map,
            Some(_) => return fail("deliver", "must be an object"),
        };
        if value.len() != 1 {
            return fail(
                "deliver",
                "must have exactly one of webhook, redis or sidekiq",
            );
        }
        let (channel, spec) = value.iter().next().expect("one entry");
        let spec = match spec {
            Value::Object(spec) => spec,
            _ => return fail(&format!("deliver.{channel}"), "must be an object"),
        };
        let text = |key: &str, required: bool| -> Result<Option<String>, (String, String)> {
            match spec.get(key) {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => {
                    Err((format!("deliver.{channel}.{key}"), "is required".to_owned()))
                }
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 1024 => Ok(Some(s.clone())),
                Some(_) => Err((
                    format!("deliver.{channel}.{key}"),
                    "must be a non-empty string of at most 1024 bytes".to_owned(),
                )),
            }
        };
        let only = |allowed: &[&str]| -> Result<(), (String, String)> {
            match spec.keys().find(|k| !allowed.contains(&k.as_str())) {
                Some(k) => Err((
                    format!("deliver.{channel}.{k}"),
                    "is not a field of this channel".to_owned(),
                )),
                None => Ok(()),
            }
        };
        match channel.as_str() {
            "webhook" => {
                only(&["url"])?;
                let url = text("url", true)?.unwrap_or_default();
                match url::Url::parse(&url) {
                    Ok(parsed)
                        if matches!(parsed.scheme(), "http" | "https")
                            && parsed.host().is_some() =>
                    {
                        Ok(Deliver::Webhook { url })
                    }
                    Ok(parsed) => fail(
                        "deliver.webhook.url",
                        &format!("scheme {} is not http or https", parsed.scheme()),
                    ),
                    Err(e) => fail("deliver.webhook.url", &format!("not a URL: {e}")),
                }
            }
            "redis" => {
                only(&["list", "stream"])?;
                match (text("list", false)?, text("stream", false)?) {
                    (Some(key), None) => Ok(Deliver::RedisList { key }),
                    (None, Some(key)) => Ok(Deliver::RedisStream { key }),
                    _ => fail("deliver.redis", "must have exactly one of list or stream"),
                }
            }
            "sidekiq" => {
                only(&["queue", "worker"])?;
                Ok(Deliver::Sidekiq {
                    queue: text("queue", false)?.unwrap_or_else(|| "default".to_owned()),
                    worker: text("worker", false)?
                        .unwrap_or_else(|| DEFAULT_SIDEKIQ_WORKER.to_owned()),
                })
            }
            other => fail(
                &format!("deliver.{other}"),
                "is not a channel: use webhook, redis or sidekiq",
            ),
        }
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// `tsk_…`.
    pub id: String,
    /// Its state.
    pub state: TaskState,
    /// The wire Request JSON, as submitted.
    pub request: Value,
    /// The callback name.
    pub callback: String,
    /// The callback arguments (a JSON object).
    pub callback_args: Value,
    /// Non-2xx responses end the task as failed.
    pub raise_error_responses: bool,
    /// Where the outcome goes.
    pub deliver: Deliver,
    /// The submit's idempotency key.
    pub idempotency_key: Option<String>,
    /// Dispatch order: 0 high, 1 normal, 2 low.
    pub priority: i64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Not run before this (ms).
    pub not_before: i64,
    /// The task's deadline (ms), if any.
    pub deadline: Option<i64>,
    /// When it finished (ms).
    pub finished_at: Option<i64>,
    /// The number of the next attempt.
    pub next_attempt: u32,
    /// Whether a request may have reached the upstream.
    pub request_sent: bool,
    /// Attempt records as the API shows them.
    pub attempts: Vec<Value>,
    /// The outcome event once finished.
    pub outcome: Option<Value>,
    /// The delivery once the task finished.
    pub delivery: Option<DeliveryRecord>,
}

/// A task's delivery as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    /// Its state.
    pub state: DeliveryState,
    /// Deliveries tried.
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// The id every delivery of this outcome carries (`webhook-id`, `jid`).
    pub message_id: String,
    /// Not tried again before this (ms).
    pub next_at: Option<i64>,
}

impl TaskRecord {
    /// The task JSON of the API; with `request`, the stored request too
    /// (every answer about one task has it; lists and batches leave it
    /// out, to stay small).
    pub fn to_json(&self, now_ms: i64, request: bool) -> Value {
        // A scheduled task whose time has come is queued, whatever the row says.
        let state = match self.state {
            TaskState::Scheduled if self.not_before <= now_ms => TaskState::Queued,
            TaskState::Queued if self.not_before > now_ms => TaskState::Scheduled,
            s => s,
        };
        let delivery = match &self.delivery {
            Some(d) => json!({
                "channel": self.deliver.channel(),
                "state": d.state.as_str(),
                "attempts": d.attempts,
                "last_error": d.last_error,
            }),
            None => json!({
                "channel": self.deliver.channel(),
                "state": if self.deliver == Deliver::None { "none" } else { "pending" },
                "attempts": 0,
                "last_error": null,
            }),
        };
        let mut map = Map::new();
        map.insert("id".into(), self.id.clone().into());
        map.insert("state".into(), state.as_str().into());
        map.insert("callback".into(), self.callback.clone().into());
        map.insert("callback_args".into(), self.callback_args.clone());
        map.insert("created_at".into(), rfc3339(self.created_at).into());
        map.insert("not_before".into(), rfc3339(self.not_before).into());
        map.insert(
            "finished_at".into(),
            self.finished_at
                .map(rfc3339)
                .map_or(Value::Null, Value::from),
        );
        map.insert("attempts".into(), Value::Array(self.attempts.clone()));
        map.insert(
            "outcome".into(),
            self.outcome.clone().unwrap_or(Value::Null),
        );
        map.insert("delivery".into(), delivery);
        map.insert(
            "idempotency_key".into(),
            self.idempotency_key
                .clone()
                .map_or(Value::Null, Value::from),
        );
        if request {
            map.insert("request".into(), self.request.clone());
        }
        Value::Object(map)
    }
}

/// A new task id: `tsk_` and 32 hexadecimal digits.
pub fn task_id() -> String {
    format!("tsk_{}", uuid::Uuid::new_v4().simple())
}

/// A new delivery message id: `msg_` and 32 hexadecimal digits.
pub fn message_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The time of milliseconds since the Unix epoch.
pub fn system_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// RFC 3339 in UTC (`2026-12-02T01:02:03.456Z`; no fraction on whole seconds).
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Parses an RFC 3339 time (any offset) into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}
