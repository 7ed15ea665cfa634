//! The errors a task can end with, and their JSON forms.

use std::{fmt, time::Duration};

use serde_json::{Map, Value};

use crate::{
    attempt::{insert_attempts, load_attempts, Attempt},
    callback_args::CallbackArgs,
    fields::{seconds_to_json, serde_via_json, Fields},
    limits::WireLimits,
    method::Method,
    response::Response,
    wire_error::{WireError, WireErrorKind},
};

/// What kind of failure kept a request from producing a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// `"timeout"`: the request took longer than its timeout.
    Timeout,
    /// `"connection"`: connecting failed or the connection broke.
    Connection,
    /// `"ssl"`: the TLS handshake or session failed.
    Ssl,
    /// `"response_too_large"`: the response exceeded the maximum size.
    ResponseTooLarge,
    /// `"unknown"`: anything else.
    Unknown,
}

impl ErrorType {
    pub(crate) const NAMES: &'static [&'static str] = &[
        "timeout",
        "connection",
        "ssl",
        "response_too_large",
        "unknown",
    ];

    /// The wire name, like `"response_too_large"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorType::Timeout => "timeout",
            ErrorType::Connection => "connection",
            ErrorType::Ssl => "ssl",
            ErrorType::ResponseTooLarge => "response_too_large",
            ErrorType::Unknown => "unknown",
        }
    }

    /// The error type with this wire name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "timeout" => Some(ErrorType::Timeout),
            "connection" => Some(ErrorType::Connection),
            "ssl" => Some(ErrorType::Ssl),
            "response_too_large" => Some(ErrorType::ResponseTooLarge),
            "unknown" => Some(ErrorType::Unknown),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ErrorType::from_name(&name)
            .ok_or_else(|| serde::de::Error::unknown_variant(&name, ErrorType::NAMES))
    }
}

/// A request that did not produce a response (timeout, connection or TLS
/// failure, a response over the size limit, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The name of the underlying error type.
    pub class_name: String,
    /// What went wrong.
    pub message: String,
    /// Where it went wrong, if known (usually empty).
    pub backtrace: Vec<String>,
    /// The task's id.
    pub request_id: String,
    /// The kind of failure.
    pub error_type: ErrorType,
    /// How long the request ran before failing.
    pub duration: Duration,
    /// The URL of the request.
    pub url: String,
    /// The method of the request.
    pub method: Method,
    /// The callback arguments of the task.
    pub callback_args: CallbackArgs,
    /// Every attempt when the request was retried or hedged (serialized only
    /// when there was more than one).
    pub attempts: Vec<Attempt>,
}

impl RequestError {
    /// Whether the request timed out.
    pub fn is_timeout(&self) -> bool {
        self.error_type == ErrorType::Timeout
    }

    /// Whether connecting failed or the connection broke.
    pub fn is_connection(&self) -> bool {
        self.error_type == ErrorType::Connection
    }

    /// Whether TLS failed.
    pub fn is_ssl(&self) -> bool {
        self.error_type == ErrorType::Ssl
    }

    /// Whether the response exceeded the maximum size.
    pub fn is_response_too_large(&self) -> bool {
        self.error_type == ErrorType::ResponseTooLarge
    }

    /// The wire format's request error object.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("class_name".into(), self.class_name.clone().into());
        map.insert("message".into(), self.message.clone().into());
        map.insert("backtrace".into(), self.backtrace.clone().into());
        map.insert("request_id".into(), self.request_id.clone().into());
        map.insert("error_type".into(), self.error_type.as_str().into());
        map.insert("duration".into(), seconds_to_json(self.duration));
        map.insert("url".into(), self.url.clone().into());
        map.insert("http_method".into(), self.method.as_lower().into());
        map.insert("callback_args".into(), self.callback_args.to_json());
        insert_attempts(&mut map, &self.attempts);
        Value::Object(map)
    }

    /// Loads a request error object within [`WireLimits::default`]; the
    /// error names the offending field. `backtrace` and `callback_args` may
    /// be absent or `null` (empty).
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads a request error object within `limits` (its callback-args
    /// bounds).
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(value: &Value, path: &str, limits: &WireLimits) -> Result<Self, WireError> {
        let fields = Fields::new(value, path)?;
        let type_name = fields.string("error_type")?;
        let error_type = ErrorType::from_name(type_name).ok_or_else(|| {
            WireError::new(
                fields.path_of("error_type"),
                WireErrorKind::UnknownValue {
                    value: type_name.to_owned(),
                    expected: ErrorType::NAMES,
                },
            )
        })?;
        Ok(Self {
            class_name: fields.string("class_name")?.to_owned(),
            message: fields.string("message")?.to_owned(),
            backtrace: fields.strings("backtrace")?,
            request_id: fields.string("request_id")?.to_owned(),
            error_type,
            duration: fields.seconds("duration")?,
            url: fields.string("url")?.to_owned(),
            method: fields.method("http_method")?,
            callback_args: fields.callback_args("callback_args", limits)?,
            attempts: load_attempts(&fields)?,
        })
    }
}

serde_via_json!(RequestError);

/// A non-2xx response turned into an error (when `raise_error_responses` is
/// on). Its message is `HTTP <status> response from <METHOD> <url>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The response.
    pub response: Response,
}

impl HttpError {
    /// The error for a response.
    pub fn new(response: Response) -> Self {
        Self { response }
    }

    /// `HTTP <status> response from <METHOD> <url>`.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The status of the response.
    pub fn status(&self) -> u16 {
        self.response.status
    }

    /// Whether the status is 4xx.
    pub fn is_client_error(&self) -> bool {
        self.response.is_client_error()
    }

    /// Whether the status is 5xx.
    pub fn is_server_error(&self) -> bool {
        self.response.is_server_error()
    }

    /// `{"response": <Response>}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("response".into(), self.response.to_json());
        Value::Object(map)
    }

    /// Loads `{"response": <Response>}` within [`WireLimits::default`].
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads `{"response": <Response>}` within `limits`, as
    /// [`Response::from_json_with_limits`] does.
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(value: &Value, path: &str, limits: &WireLimits) -> Result<Self, WireError> {
        let fields = Fields::new(value, path)?;
        let response_path = fields.path_of("response");
        let response = fields
            .value("response")
            .ok_or_else(|| WireError::missing(response_path.as_str()))?;
        Ok(Self::new(Response::load(response, &response_path, limits)?))
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HTTP {} response from {} {}",
            self.response.status, self.response.method, self.response.url
        )
    }
}

impl std::error::Error for HttpError {}

serde_via_json!(HttpError);

/// Which redirect failure a [`RedirectError`] is.
///
/// Written under the gem's `PatientHttp::` class names; loaded also under
/// the names of its earlier releases, `AsyncHttpPool::TooManyRedirectsError`
/// and `AsyncHttpPool::RecursiveRedirectError`, so payloads stored by them
/// still load (and are written back under the current names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedirectErrorKind {
    /// More redirects than `max_redirects`:
    /// `"PatientHttp::TooManyRedirectsError"`.
    TooManyRedirects,
    /// A URL visited twice: `"PatientHttp::RecursiveRedirectError"`.
    RecursiveRedirect,
}

impl RedirectErrorKind {
    /// Every `error_class` that loads: the current names first, then the
    /// earlier ones.
    const CLASS_NAMES: &'static [&'static str] = &[
        "PatientHttp::TooManyRedirectsError",
        "PatientHttp::RecursiveRedirectError",
        "AsyncHttpPool::TooManyRedirectsError",
        "AsyncHttpPool::RecursiveRedirectError",
    ];

    /// The `error_class` written to the wire.
    pub fn class_name(&self) -> &'static str {
        match self {
            RedirectErrorKind::TooManyRedirects => "PatientHttp::TooManyRedirectsError",
            RedirectErrorKind::RecursiveRedirect => "PatientHttp::RecursiveRedirectError",
        }
    }

    /// The kind with this `error_class`, under its current `PatientHttp::`
    /// name or its earlier `AsyncHttpPool::` one; `None` for any other name.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "PatientHttp::TooManyRedirectsError" | "AsyncHttpPool::TooManyRedirectsError" => {
                Some(RedirectErrorKind::TooManyRedirects)
            }
            "PatientHttp::RecursiveRedirectError" | "AsyncHttpPool::RecursiveRedirectError" => {
                Some(RedirectErrorKind::RecursiveRedirect)
            }
            _ => None,
        }
    }
}

/// Following redirects failed: too many of them, or a loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectError {
    /// Which failure.
    pub kind: RedirectErrorKind,
    /// The URL that would have been requested next.
    pub url: String,
    /// The method of the request.
    pub method: Method,
    /// How long the redirects took.
    pub duration: Duration,
    /// The task's id.
    pub request_id: String,
    /// The URLs visited, oldest first.
    pub redirects: Vec<String>,
    /// The callback arguments of the task.
    pub callback_args: CallbackArgs,
}

impl RedirectError {
    /// The message, as the gem words it.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Whether there were more redirects than allowed.
    pub fn is_too_many_redirects(&self) -> bool {
        self.kind == RedirectErrorKind::TooManyRedirects
    }

    /// Whether a URL was visited twice.
    pub fn is_recursive_redirect(&self) -> bool {
        self.kind == RedirectErrorKind::RecursiveRedirect
    }

    /// The wire format's redirect error object.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("error_class".into(), self.kind.class_name().into());
        map.insert("url".into(), self.url.clone().into());
        map.insert("http_method".into(), self.method.as_lower().into());
        map.insert("duration".into(), seconds_to_json(self.duration));
        map.insert("request_id".into(), self.request_id.clone().into());
        map.insert("redirects".into(), self.redirects.clone().into());
        map.insert("callback_args".into(), self.callback_args.to_json());
        Value::Object(map)
    }

    /// Loads a redirect error object within [`WireLimits::default`]. An
    /// `error_class` other than the two redirect error classes is rejected.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads a redirect error object within `limits` (its callback-args
    /// bounds).
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(value: &Value, path: &str, limits: &WireLimits) -> Result<Self, WireError> {
        let fields = Fields::new(value, path)?;
        let class_name = fields.string("error_class")?;
        let kind = RedirectErrorKind::from_class_name(class_name).ok_or_else(|| {
            WireError::new(
                fields.path_of("error_class"),
                WireErrorKind::UnknownValue {
                    value: class_name.to_owned(),
                    expected: RedirectErrorKind::CLASS_NAMES,
                },
            )
        })?;
        Ok(Self {
            kind,
            url: fields.string("url")?.to_owned(),
            method: fields.method("http_method")?,
            duration: fields.seconds("duration")?,
            request_id: fields.string("request_id")?.to_owned(),
            redirects: fields.strings("redirects")?,
            callback_args: fields.callback_args("callback_args", limits)?,
        })
    }
}

impl fmt::Display for RedirectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RedirectErrorKind::TooManyRedirects => write!(
                f,
                "Too many redirects ({}) while requesting {} {}",
                self.redirects.len(),
                self.method,
                self.redirects.first().unwrap_or(&self.url)
            ),
            RedirectErrorKind::RecursiveRedirect => write!(
                f,
                "Recursive redirect detected: {} was already visited in redirect chain",
                self.url
            ),
        }
    }
}

impl std::error::Error for RedirectError {}

serde_via_json!(RedirectError);

/// How a task failed: an error response, a request that produced no
/// response, or a redirect failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// A non-2xx response.
    #[error(transparent)]
    Http(HttpError),
    /// No response.
    #[error(transparent)]
    Request(RequestError),
    /// Too many redirects or a redirect loop.
    #[error(transparent)]
    Redirect(RedirectError),
}

impl TaskError {
    /// Loads an error within [`WireLimits::default`], choosing the kind by
    /// its keys as the gem does: an object with `response` is an HTTP error,
    /// one with `redirects` a redirect error, anything else a request error.
    pub fn load(value: &Value) -> Result<Self, WireError> {
        Self::load_with_limits(value, &WireLimits::default())
    }

    /// Loads an error as [`TaskError::load`] does, within `limits`.
    pub fn load_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load_at(value, "", limits)
    }

    /// The same as [`TaskError::load`].
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::load(value)
    }

    /// The same as [`TaskError::load_with_limits`].
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load_with_limits(value, limits)
    }

    pub(crate) fn load_at(
        value: &Value,
        path: &str,
        limits: &WireLimits,
    ) -> Result<Self, WireError> {
        let fields = Fields::new(value, path)?;
        if fields.has("response") {
            HttpError::load(value, path, limits).map(TaskError::Http)
        } else if fields.has("redirects") {
            RedirectError::load(value, path, limits).map(TaskError::Redirect)
        } else {
            RequestError::load(value, path, limits).map(TaskError::Request)
        }
    }

    /// The JSON form of the error of whichever kind.
    pub fn to_json(&self) -> Value {
        match self {
            TaskError::Http(e) => e.to_json(),
            TaskError::Request(e) => e.to_json(),
            TaskError::Redirect(e) => e.to_json(),
        }
    }

    /// The error message.
    pub fn message(&self) -> String {
        match self {
            TaskError::Http(e) => e.message(),
            TaskError::Request(e) => e.message.clone(),
            TaskError::Redirect(e) => e.message(),
        }
    }

    /// The callback arguments of the task.
    pub fn callback_args(&self) -> &CallbackArgs {
        match self {
            TaskError::Http(e) => &e.response.callback_args,
            TaskError::Request(e) => &e.callback_args,
            TaskError::Redirect(e) => &e.callback_args,
        }
    }

    /// The task's id.
    pub fn request_id(&self) -> &str {
        match self {
            TaskError::Http(e) => &e.response.request_id,
            TaskError::Request(e) => &e.request_id,
            TaskError::Redirect(e) => &e.request_id,
        }
    }

    /// The URL of the request (the last one reached).
    pub fn url(&self) -> &str {
        match self {
            TaskError::Http(e) => &e.response.url,
            TaskError::Request(e) => &e.url,
            TaskError::Redirect(e) => &e.url,
        }
    }

    /// The method of the request.
    pub fn method(&self) -> Method {
        match self {
            TaskError::Http(e) => e.response.method,
            TaskError::Request(e) => e.method,
            TaskError::Redirect(e) => e.method,
        }
    }

    /// How long the task ran.
    pub fn duration(&self) -> Duration {
        match self {
            TaskError::Http(e) => e.response.duration,
            TaskError::Request(e) => e.duration,
            TaskError::Redirect(e) => e.duration,
        }
    }

    /// Whether this is an HTTP error response.
    pub fn is_http(&self) -> bool {
        matches!(self, TaskError::Http(_))
    }

    /// Whether this is a request error (no response).
    pub fn is_request(&self) -> bool {
        matches!(self, TaskError::Request(_))
    }

    /// Whether this is a redirect error.
    pub fn is_redirect(&self) -> bool {
        matches!(self, TaskError::Redirect(_))
    }
}

impl From<HttpError> for TaskError {
    fn from(e: HttpError) -> Self {
        TaskError::Http(e)
    }
}

impl From<RequestError> for TaskError {
    fn from(e: RequestError) -> Self {
        TaskError::Request(e)
    }
}

impl From<RedirectError> for TaskError {
    fn from(e: RedirectError) -> Self {
        TaskError::Redirect(e)
    }
}

serde_via_json!(TaskError);
