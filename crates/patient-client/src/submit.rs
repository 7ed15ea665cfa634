//! What a submit asks for: [`Submit`] (the body of `POST /v1/tasks`) and
//! [`Deliver`], where the daemon sends the outcome.

use std::time::Duration;

use patient_wire::{CallbackArgs, Request};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// The worker class a Sidekiq delivery names unless told otherwise (the
/// daemon's default).
pub const DEFAULT_SIDEKIQ_WORKER: &str = "PatientHttp::Sidekiq::CallbackWorker";

/// Where the daemon delivers a task's outcome; without one (`None` in
/// [`Submit::deliver`]) the application polls
/// ([`DaemonClient::get`](crate::DaemonClient::get),
/// [`DaemonClient::wait`](crate::DaemonClient::wait)).
///
/// Serializes to the contract's `deliver` object:
///
/// ```
/// use patient_client::Deliver;
///
/// let deliver = Deliver::webhook("https://app.example.com/hooks/patient");
/// assert_eq!(
///     serde_json::to_value(&deliver)?,
///     serde_json::json!({"webhook": {"url": "https://app.example.com/hooks/patient"}})
/// );
/// let sidekiq: Deliver = serde_json::from_value(serde_json::json!({"sidekiq": {"queue": "llm"}}))?;
/// assert_eq!(sidekiq, Deliver::sidekiq("llm"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deliver {
    /// A signed (Standard Webhooks) `POST` of the outcome event to `url`.
    Webhook {
        /// The receiver's `http` or `https` URL.
        url: String,
    },
    /// `LPUSH key <event JSON>` in the daemon's Redis.
    RedisList {
        /// The list's key.
        key: String,
    },
    /// `XADD key * event <event JSON>` in the daemon's Redis.
    RedisStream {
        /// The stream's key.
        key: String,
    },
    /// A job for the PatientHttp Sidekiq integration's callback worker.
    Sidekiq {
        /// The queue; `None` is the daemon's default, `default`.
        queue: Option<String>,
        /// The worker class; `None` is the daemon's default,
        /// [`DEFAULT_SIDEKIQ_WORKER`].
        worker: Option<String>,
    },
}

impl Deliver {
    /// A webhook to `url`.
    pub fn webhook(url: impl Into<String>) -> Deliver {
        Deliver::Webhook { url: url.into() }
    }

    /// A Redis list.
    pub fn redis_list(key: impl Into<String>) -> Deliver {
        Deliver::RedisList { key: key.into() }
    }

    /// A Redis stream.
    pub fn redis_stream(key: impl Into<String>) -> Deliver {
        Deliver::RedisStream { key: key.into() }
    }

    /// A Sidekiq job on `queue` for the default worker class.
    pub fn sidekiq(queue: impl Into<String>) -> Deliver {
        Deliver::Sidekiq {
            queue: Some(queue.into()),
            worker: None,
        }
    }

    /// A Sidekiq job on `queue` for the worker class `worker`.
    pub fn sidekiq_worker(queue: impl Into<String>, worker: impl Into<String>) -> Deliver {
        Deliver::Sidekiq {
            queue: Some(queue.into()),
            worker: Some(worker.into()),
        }
    }

    /// The contract's `deliver` object.
    pub fn to_json(&self) -> Value {
        match self {
            Deliver::Webhook { url } => json!({"webhook": {"url": url}}),
            Deliver::RedisList { key } => json!({"redis": {"list": key}}),
            Deliver::RedisStream { key } => json!({"redis": {"stream": key}}),
            Deliver::Sidekiq { queue, worker } => {
                let mut spec = Map::new();
                if let Some(queue) = queue {
                    spec.insert("queue".into(), queue.clone().into());
                }
                if let Some(worker) = worker {
                    spec.insert("worker".into(), worker.clone().into());
                }
                json!({ "sidekiq": Value::Object(spec) })
            }
        }
    }

    /// Reads a `deliver` object; the error names what is wrong.
    pub fn from_json(value: &Value) -> Result<Deliver, String> {
        let Some(object) = value.as_object().filter(|o| o.len() == 1) else {
            return Err("deliver must be an object with one of webhook, redis or sidekiq".into());
        };
        let Some((channel, spec)) = object.iter().next() else {
            return Err("deliver is empty".into());
        };
        let text = |key: &str| -> Result<Option<String>, String> {
            match spec.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("deliver.{channel}.{key} must be a string")),
            }
        };
        let required = |key: &str| -> Result<String, String> {
            text(key)?.ok_or_else(|| format!("deliver.{channel}.{key} is required"))
        };
        if !spec.is_object() {
            return Err(format!("deliver.{channel} must be an object"));
        }
        match channel.as_str() {
            "webhook" => Ok(Deliver::Webhook {
                url: required("url")?,
            }),
            "redis" => match (text("list")?, text("stream")?) {
                (Some(key), None) => Ok(Deliver::RedisList { key }),
                (None, Some(key)) => Ok(Deliver::RedisStream { key }),
                _ => Err("deliver.redis must have exactly one of list or stream".into()),
            },
            "sidekiq" => Ok(Deliver::Sidekiq {
                queue: text("queue")?,
                worker: text("worker")?,
            }),
            other => Err(format!(
                "deliver.{other} is not a channel: use webhook, redis or sidekiq"
            )),
        }
    }
}

impl Serialize for Deliver {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Deliver {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Deliver::from_json(&value).map_err(de::Error::custom)
    }
}

/// A task to submit: the body of `POST /v1/tasks`. Only the request is
/// required; every other field left `None` (or empty) is left out of the
/// JSON and takes the daemon's default.
///
/// ```
/// use std::time::Duration;
///
/// use patient_client::{Deliver, Submit};
/// use patient_wire::{CallbackArgs, Request};
///
/// let mut args = CallbackArgs::new();
/// args.insert("document_id", 7);
/// let submit = Submit::new(Request::get("https://api.example.com/v1/documents/7").build()?)
///     .with_callback("SummarizeCallback")
///     .with_callback_args(args)
///     .with_deliver(Deliver::webhook("https://app.example.com/hooks/patient"))
///     .with_idempotency_key("doc-7-summary")
///     .with_delay(Duration::from_secs(5));
/// let body = serde_json::to_value(&submit)?;
/// assert_eq!(body["callback_args"]["document_id"], 7);
/// assert_eq!(body["delay"], 5.0);
/// assert!(body.get("not_before").is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    /// The request, in the wire format (its `options` included).
    pub request: Request,
    /// The callback's name, returned with the outcome (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
    /// Values returned with the outcome (default: none).
    #[serde(default, skip_serializing_if = "CallbackArgs::is_empty")]
    pub callback_args: CallbackArgs,
    /// Turns non-2xx responses into a failed task (the daemon's default:
    /// false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raise_error_responses: Option<bool>,
    /// Where the outcome goes (default: nowhere; the application polls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<Deliver>,
    /// A key the daemon remembers: a second submit with it returns the first
    /// task, unchanged (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Runs the task this long after it is submitted (default: at once);
    /// sent as seconds. Not together with `not_before`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_seconds"
    )]
    pub delay: Option<Duration>,
    /// Runs the task at this RFC 3339 time (`2026-12-01T10:00:00Z`) or later
    /// (default: at once). Not together with `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
}

impl Submit {
    /// A submit of `request` with the daemon's defaults for everything else.
    pub fn new(request: Request) -> Submit {
        Submit {
            request,
            callback: None,
            callback_args: CallbackArgs::new(),
            raise_error_responses: None,
            deliver: None,
            idempotency_key: None,
            delay: None,
            not_before: None,
        }
    }

    /// Sets the callback's name.
    #[must_use]
    pub fn with_callback(mut self, callback: impl Into<String>) -> Submit {
        self.callback = Some(callback.into());
        self
    }

    /// Sets the callback arguments.
    #[must_use]
    pub fn with_callback_args(mut self, args: CallbackArgs) -> Submit {
        self.callback_args = args;
        self
    }

    /// Sets whether non-2xx responses end the task as failed.
    #[must_use]
    pub fn with_raise_error_responses(mut self, raise: bool) -> Submit {
        self.raise_error_responses = Some(raise);
        self
    }

    /// Sets where the outcome goes.
    #[must_use]
    pub fn with_deliver(mut self, deliver: Deliver) -> Submit {
        self.deliver = Some(deliver);
        self
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Submit {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Delays the task (and clears `not_before`).
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Submit {
        self.delay = Some(delay);
        self.not_before = None;
        self
    }

    /// Schedules the task at an RFC 3339 time (and clears `delay`).
    #[must_use]
    pub fn with_not_before(mut self, at: impl Into<String>) -> Submit {
        self.not_before = Some(at.into());
        self.delay = None;
        self
    }
}

/// `Option<Duration>` as a number of seconds.
mod optional_seconds {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_f64(d.as_secs_f64()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<f64>::deserialize(deserializer)? {
            None => Ok(None),
            Some(seconds) => Duration::try_from_secs_f64(seconds)
                .map(Some)
                .map_err(|_| de::Error::custom(format!("{seconds} is not a number of seconds"))),
        }
    }
}
