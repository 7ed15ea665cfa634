//! `GET /healthz`, `GET /readyz` and `GET /openapi.json`: what needs no
//! token.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{header, StatusCode},
    response::Response,
    routing::get,
    Router,
};
use serde_json::json;

use super::error::{json_response, ApiError, ApiResult};
use crate::app::App;

/// The routes that need no token.
pub(super) fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> ApiResult {
    app.db.ping().await.map_err(|e| ApiError::unavailable(&e))?;
    Ok(json_response(StatusCode::OK, &json!({"status": "ready"})))
}

async fn openapi() -> Response {
    let mut response = Response::new(Body::from(crate::OPENAPI));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
