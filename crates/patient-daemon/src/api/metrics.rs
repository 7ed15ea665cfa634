//! `GET /metrics`: the daemon's, the engine's and the gateway's families
//! in the Prometheus text format.

use std::sync::Arc;

use axum::{body::Body, extract::State, http::header, response::Response, routing::get, Router};

use crate::{app::App, model::now_ms};

/// `GET /metrics`.
pub(super) fn router() -> Router<Arc<App>> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Ok(counts) = app.db.counts(now_ms()).await {
        app.metrics.set_tasks(&counts);
    }
    app.metrics.set_in_flight(app.runner.in_flight());
    let mut text = app.metrics.render(app.client.metrics());
    // The gateway's families go before the closing `# EOF`.
    if let Some(body) = text.strip_suffix("# EOF\n").map(str::to_owned) {
        text = body;
        app.gateway.metrics().render_into(&mut text);
        let _ = prometheus_client::encoding::text::encode_registry(
            &mut text,
            app.gateway.client().metrics().registry(),
        );
        text.push_str("# EOF\n");
    }
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(patient_http::metrics::CONTENT_TYPE),
    );
    response
}
