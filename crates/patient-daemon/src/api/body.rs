//! Reading a JSON request body: its content type, its size, its time.

use axum::{
    extract::Request,
    http::{header, StatusCode},
};
use bytes::Bytes;
use serde_json::Value;

use super::error::ApiError;
use crate::{access::check_json_content_type, app::App};

/// Reads a JSON body within `max_body`: `413` past it, `415` for another
/// content type, `400` when it does not parse.
pub(super) async fn json_body(app: &App, request: Request) -> Result<Value, ApiError> {
    let max = usize::try_from(app.settings.max_body).unwrap_or(usize::MAX);
    let headers = request.headers();
    check_json_content_type(headers)?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            patient_api::code::PAYLOAD_TOO_LARGE,
            format!("the body is larger than max_body ({max} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.settings.max_body) {
        return Err(too_large());
    }
    let bytes: Bytes = match axum::body::to_bytes(request.into_body(), max).await {
        Ok(bytes) => bytes,
        Err(e) if crate::listener::is_body_timeout(&e) => {
            return Err(ApiError::body_timeout(&e));
        }
        Err(_) => return Err(too_large()),
    };
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            patient_api::code::INVALID_JSON,
            "the body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            patient_api::code::INVALID_JSON,
            format!("the body is not JSON: {e}"),
        )
    })
}
