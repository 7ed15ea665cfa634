//! The API token: `Authorization: Bearer TOKEN` on every route that needs
//! one.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};

use super::error::ApiError;
use crate::{
    app::App,
    token::{ApiToken, Places},
};

/// `401 unauthorized` unless `request` presents the daemon's token (or it
/// has none) as `Authorization: Bearer TOKEN` (the scheme in any case; see
/// [`crate::token`]).
pub(super) fn check_token(app: &App, request: &Request, hint: &str) -> Result<(), Response> {
    let Some(token) = app.settings.api_token.as_deref() else {
        return Ok(());
    };
    let token = ApiToken::new(token);
    let admitted = token
        .admits(request.headers(), Places::Authorization)
        .is_ok();
    if admitted {
        return Ok(());
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        patient_api::code::UNAUTHORIZED,
        hint,
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Err(response)
}

pub(super) async fn auth(
    State(app): State<Arc<App>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Err(refused) = check_token(
        &app,
        &request,
        "a valid bearer token is required: Authorization: Bearer TOKEN",
    ) {
        return refused;
    }
    next.run(request).await
}
