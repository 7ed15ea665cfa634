//! [`ClientError`]: why a call to the daemon failed.

use std::{error::Error as StdError, fmt, time::Duration};

use patient_http::client::TransportError;

use patient_api::TaskState;

/// Why a call to the daemon failed: the daemon's error answer (with the
/// contract's `code`, `message`, `field` and the HTTP status), a transport
/// error (the daemon could not be reached), an answer that is not the
/// contract's, a [`wait`](crate::DaemonClient::wait) that ran out of time,
/// or a bad client setting.
///
/// ```
/// use patient_client::DaemonClient;
///
/// let error = DaemonClient::new("ftp://127.0.0.1:8750", None).unwrap_err();
/// assert!(error.is_config());
/// assert_eq!(error.field(), Some("base_url"));
/// ```
#[derive(Debug)]
pub struct ClientError {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The daemon answered with the contract's error body.
    Api {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    /// An answer that is not the contract's (a proxy's page, a body that
    /// does not parse).
    Unexpected { status: u16, message: String },
    /// The daemon could not be reached, or the exchange failed.
    Transport {
        url: String,
        error: Box<TransportError>,
    },
    /// `wait` ran out of time before the task finished.
    WaitTimeout {
        id: String,
        state: TaskState,
        waited: Duration,
    },
    /// A client setting that cannot work.
    Config {
        setting: &'static str,
        message: String,
    },
    /// A blocking call that cannot run here, or a dispatch thread that
    /// could not start or stopped.
    Blocking { message: String },
}

impl ClientError {
    pub(crate) fn api(status: u16, code: String, message: String, field: Option<String>) -> Self {
        ClientError {
            kind: Kind::Api {
                status,
                code,
                message,
                field,
            },
        }
    }

    pub(crate) fn unexpected(status: u16, message: impl Into<String>) -> Self {
        ClientError {
            kind: Kind::Unexpected {
                status,
                message: message.into(),
            },
        }
    }

    pub(crate) fn transport(url: &url::Url, error: TransportError) -> Self {
        ClientError {
            kind: Kind::Transport {
                url: url.to_string(),
                error: Box::new(error),
            },
        }
    }

    pub(crate) fn wait_timeout(id: &str, state: TaskState, waited: Duration) -> Self {
        ClientError {
            kind: Kind::WaitTimeout {
                id: id.to_owned(),
                state,
                waited,
            },
        }
    }

    pub(crate) fn config(setting: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            kind: Kind::Config {
                setting,
                message: message.into(),
            },
        }
    }

    pub(crate) fn blocking(message: impl Into<String>) -> Self {
        ClientError {
            kind: Kind::Blocking {
                message: message.into(),
            },
        }
    }

    /// The HTTP status of the daemon's answer, when it answered.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            Kind::Api { status, .. } | Kind::Unexpected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The contract's error code (`invalid_request`, `not_found`,
    /// `conflict`, `unauthorized`, `unavailable`, …), when the daemon
    /// answered with one.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            Kind::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// What went wrong: the daemon's message for an API error (which names
    /// the field), what is wrong with the setting [`field`](Self::field)
    /// names for a configuration error, otherwise this error's own
    /// description.
    pub fn message(&self) -> String {
        match &self.kind {
            Kind::Api { message, .. } | Kind::Config { message, .. } => message.clone(),
            _ => self.to_string(),
        }
    }

    /// The offending field: the API's `field` (`request.url`,
    /// `tasks[3].deliver`), or the client setting for a configuration
    /// error (`base_url`, `token`).
    pub fn field(&self) -> Option<&str> {
        match &self.kind {
            Kind::Api { field, .. } => field.as_deref(),
            Kind::Config { setting, .. } => Some(setting),
            _ => None,
        }
    }

    /// The transport error, when the daemon could not be reached or the
    /// exchange broke off.
    pub fn transport_error(&self) -> Option<&TransportError> {
        match &self.kind {
            Kind::Transport { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether the daemon answered with the contract's error body.
    pub fn is_api(&self) -> bool {
        matches!(self.kind, Kind::Api { .. })
    }

    /// Whether the daemon answered 4xx: the call was refused as it is (bad
    /// input, a missing or wrong token, an unknown task, a conflict with
    /// the task's state), so sending it again unchanged would not help.
    pub fn is_input(&self) -> bool {
        self.status().is_some_and(|s| (400..500).contains(&s))
    }

    /// Whether the daemon answered `401 unauthorized`.
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }

    /// Whether the daemon answered `404 not_found`.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether the daemon answered `409 conflict` (the task's state does
    /// not allow the call).
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// Whether the daemon answered `503 unavailable` (its store failed;
    /// nothing was changed).
    pub fn is_unavailable(&self) -> bool {
        self.status() == Some(503)
    }

    /// Whether the daemon could not be reached or the exchange failed.
    pub fn is_transport(&self) -> bool {
        matches!(self.kind, Kind::Transport { .. })
    }

    /// Whether connecting to the daemon failed (nothing was sent).
    pub fn is_connect(&self) -> bool {
        self.transport_error()
            .is_some_and(TransportError::is_connect)
    }

    /// Whether the exchange with the daemon timed out.
    pub fn is_timeout(&self) -> bool {
        self.transport_error()
            .is_some_and(TransportError::is_timeout)
    }

    /// Whether [`wait`](crate::DaemonClient::wait) ran out of time before
    /// the task finished (the task goes on).
    pub fn is_wait_timeout(&self) -> bool {
        matches!(self.kind, Kind::WaitTimeout { .. })
    }

    /// Whether a client setting is wrong ([`field`](Self::field) names it).
    pub fn is_config(&self) -> bool {
        matches!(self.kind, Kind::Config { .. })
    }

    /// Whether a blocking call could not run: called on a current-thread
    /// tokio runtime, or the client's dispatch thread could not start.
    pub fn is_blocking(&self) -> bool {
        matches!(self.kind, Kind::Blocking { .. })
    }

    /// Whether the same call may succeed later: the daemon was unreachable,
    /// timed out, or answered 5xx. With an idempotency key a submit is safe
    /// to send again.
    pub fn is_retryable(&self) -> bool {
        self.is_transport() || self.status().is_some_and(|s| s >= 500)
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Api { code, message, .. } => write!(f, "{code}: {message}"),
            Kind::Unexpected { status, message } => {
                write!(
                    f,
                    "unexpected answer from the daemon (HTTP {status}): {message}"
                )
            }
            Kind::Transport { url, error } => {
                write!(f, "cannot reach the daemon at {url}: {error}")
            }
            Kind::WaitTimeout { id, state, waited } => write!(
                f,
                "task {id} is still {state} after waiting {:.1} s",
                waited.as_secs_f64()
            ),
            Kind::Config { setting, message } => write!(f, "{setting}: {message}"),
            Kind::Blocking { message } => f.write_str(message),
        }
    }
}

impl StdError for ClientError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            Kind::Transport { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }
}
