//! The HTTP API (`/v1`), the dashboard, health, readiness, metrics and the
//! OpenAPI document, with every error in the contract's shape:
//! `{"error": {"code", "message", "field"}}`, the framework's own
//! rejections (unknown route, wrong method, wrong content type, too large a
//! body) included.
//!
//! One file per resource: [`tasks`] (submit, list, show, cancel, redeliver,
//! retry), [`dashboard`], [`health`] (health, readiness, the OpenAPI
//! document) and [`metrics`]; [`auth`] checks the token, [`body`] reads a
//! JSON body, [`error`] is the error shape every answer shares.

mod auth;
mod body;
mod dashboard;
pub mod error;
mod health;
mod metrics;
mod tasks;

use std::sync::Arc;

use axum::{extract::Request, http::StatusCode, Router};

use self::auth::auth;
pub use self::error::ApiError;
use crate::app::App;

/// The router of the API, health, metrics and OpenAPI routes.
pub fn router(app: Arc<App>) -> Router {
    let auth = || axum::middleware::from_fn_with_state(Arc::clone(&app), auth);
    // Each resource's routes; those behind the token get the check as a
    // route layer (a path no route matches is a 404 either way).
    let protected = Router::new()
        .merge(tasks::router())
        .merge(dashboard::figures_router())
        .merge(metrics::router())
        .route_layer(auth());
    Router::new()
        .merge(dashboard::page_router())
        .merge(health::router())
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        patient_api::code::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}
