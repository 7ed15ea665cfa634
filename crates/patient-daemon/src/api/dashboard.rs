//! `GET /` (the page) and `GET /v1/dashboard` (its figures).

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{header, StatusCode},
    response::Response,
    routing::get,
    Router,
};

use super::error::{json_response, ApiError, ApiResult};
use crate::app::App;

/// `GET /`: the page, which holds no data and needs no token.
pub(super) fn page_router() -> Router<Arc<App>> {
    Router::new().route("/", get(dashboard_page))
}

/// `GET /v1/dashboard`: the figures the page polls.
pub(super) fn figures_router() -> Router<Arc<App>> {
    Router::new().route("/v1/dashboard", get(dashboard_figures))
}

async fn dashboard_page() -> Response {
    let mut response = Response::new(Body::from(crate::dashboard::PAGE));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = header::HeaderValue::from_str(&crate::dashboard::CSP) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

async fn dashboard_figures(State(app): State<Arc<App>>) -> ApiResult {
    let figures = crate::dashboard::figures(&app)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let mut response = json_response(StatusCode::OK, &figures);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}
