//! The error body of every non-2xx answer of the API.

use serde::{Deserialize, Serialize};

/// The stable codes of [`ErrorDetail::code`], with the status each goes
/// with.
pub mod code {
    /// 401: no token, or a wrong one.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 403: a host, origin or action the daemon refuses.
    pub const FORBIDDEN: &str = "forbidden";
    /// 404: no such task or route.
    pub const NOT_FOUND: &str = "not_found";
    /// 405: a method the route does not take.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 400: the body does not parse as JSON.
    pub const INVALID_JSON: &str = "invalid_json";
    /// 422: it parses but has the wrong shape or values (with `field`).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// 422: a literal address the egress guard refuses (with `field`).
    pub const EGRESS_DENIED: &str = "egress_denied";
    /// 413: the body is over `max_body`.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 415: a body that is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// 409: the task is already finished (or otherwise in the way).
    pub const CONFLICT: &str = "conflict";
    /// 408: the request body stopped coming (`body_timeout`).
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// 503: the store (or a payload store) is unavailable.
    pub const UNAVAILABLE: &str = "unavailable";

    /// Every code, in the order above.
    pub const ALL: [&str; 12] = [
        UNAUTHORIZED,
        FORBIDDEN,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        INVALID_JSON,
        INVALID_REQUEST,
        EGRESS_DENIED,
        PAYLOAD_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        CONFLICT,
        REQUEST_TIMEOUT,
        UNAVAILABLE,
    ];
}

/// `{"error": {...}}`: the body of every non-2xx answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code (see [`code`]).
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The offending field of the request body (`request.url`,
    /// `tasks[3].deliver`), when one is at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    /// A body with `code` and `message`, naming no field.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }

    /// The same body naming `field`.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> ErrorBody {
        self.error.field = Some(field.into());
        self
    }
}
