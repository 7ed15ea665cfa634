//! The error shape of every answer of the API:
//! `{"error": {"code", "message", "field"}}`.

use axum::{
    body::Body,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use patient_api::{code, ErrorBody};
use patient_store::StoreError;
use serde_json::Value;

use crate::db::DbError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// `422 invalid_request` naming `field`.
    pub(crate) fn invalid(field: impl Into<String>, message: impl AsRef<str>) -> Self {
        let field = field.into();
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: code::INVALID_REQUEST,
            message: format!("{field}: {}", message.as_ref()),
            field: Some(field),
        }
    }

    /// `403 forbidden`.
    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, message)
    }

    /// `408 request_timeout`: the request body stopped coming.
    pub(crate) fn body_timeout(e: &dyn std::error::Error) -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            code::REQUEST_TIMEOUT,
            e.to_string(),
        )
    }

    /// `422 egress_denied` naming `field`: a literal address the egress
    /// guard refuses.
    pub(crate) fn egress_denied(field: impl Into<String>, message: impl AsRef<str>) -> Self {
        ApiError {
            code: code::EGRESS_DENIED,
            ..ApiError::invalid(field, message)
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code::NOT_FOUND, what)
    }

    pub(crate) fn unavailable(e: &DbError) -> Self {
        tracing::error!(error = %e, "the store failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::UNAVAILABLE,
            "the task store is unavailable; nothing was changed",
        )
    }

    /// `503 unavailable`: a stored payload cannot be stored, fetched or
    /// decrypted.
    pub(crate) fn payload(e: &StoreError) -> Self {
        tracing::error!(error = %e, "the payload store failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::UNAVAILABLE,
            format!("a payload of the task cannot be stored or loaded: {e}"),
        )
    }

    pub(crate) fn from_db(e: DbError) -> Self {
        match e {
            DbError::NotFound(id) => ApiError::not_found(format!("no task {id}")),
            DbError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, code::CONFLICT, message)
            }
            other => ApiError::unavailable(&other),
        }
    }

    /// Prefixes the field (and message) with `prefix` (`tasks[3].`).
    pub(crate) fn within(mut self, prefix: &str) -> Self {
        if let Some(field) = &self.field {
            let full = format!("{prefix}{field}");
            self.message = self.message.replacen(field.as_str(), &full, 1);
            self.field = Some(full);
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.field = self.field;
        let mut response = match serde_json::to_vec(&body) {
            Ok(bytes) => Response::new(Body::from(bytes)),
            Err(_) => Response::new(Body::empty()),
        };
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body will not be read.
            response
                .extensions_mut()
                .insert(crate::listener::CloseConnection);
        }
        response
    }
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) type ApiResult = Result<Response, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_name_the_item() {
        let e = ApiError::invalid("request.url", "bad").within("tasks[3].");
        assert_eq!(e.field.as_deref(), Some("tasks[3].request.url"));
        assert_eq!(e.message, "tasks[3].request.url: bad");
    }
}
