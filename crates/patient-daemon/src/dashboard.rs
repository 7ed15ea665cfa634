//! The dashboard: one self-contained page at `GET /` (inline CSS and
//! JavaScript, nothing loaded from elsewhere) and the JSON it polls every
//! two seconds at `GET /v1/dashboard`.
//!
//! The page holds no data and opens without a token. When the daemon has
//! one, the page asks for it in a form and keeps it in the tab's session
//! storage (never in the address, where histories, logs and referrers would
//! keep it); its script sends it as `Authorization: Bearer` to the JSON
//! routes it calls (the figures, and a failure's retry or redelivery). The
//! page answers with a Content-Security-Policy that allows only its own
//! inline script and style (by hash) and calls to the daemon itself, and
//! with `Referrer-Policy: no-referrer`.

use std::sync::LazyLock;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde_json::{json, Map, Value};

use crate::{
    app::App,
    db::DbError,
    metrics::{Percentiles, WINDOW_SECONDS},
    model::{now_ms, rfc3339, DeliveryState, TaskRecord, TaskState},
};

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// How many recent failures the dashboard lists.
pub const RECENT_FAILURES: u32 = 20;

/// The longest error text a listed failure carries, characters.
const MAX_ERROR_TEXT: usize = 300;

/// The text between the first `<tag>` and its closing tag.
fn inline(tag: &str) -> &'static str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = PAGE.find(&open).map_or(0, |i| i + open.len());
    let end = PAGE[start..].find(&close).map_or(start, |i| start + i);
    &PAGE[start..end]
}

fn sha256_source(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!("'sha256-{}'", STANDARD.encode(digest.as_ref()))
}

/// The page's Content-Security-Policy: its inline script and style by
/// hash, requests to the daemon only, nothing else.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_source(inline("script")),
        sha256_source(inline("style")),
    )
});

fn percentiles(p: &Percentiles) -> Value {
    json!({"count": p.count, "p50": p.p50, "p90": p.p90, "p99": p.p99})
}

fn pairs(list: &[(String, u64)]) -> Value {
    Value::Object(
        list.iter()
            .map(|(k, n)| (k.clone(), Value::from(*n)))
            .collect::<Map<String, Value>>(),
    )
}

/// A short text for a failure: the error's class and message, the status
/// of an error response, or the delivery's last error.
fn failure_text(task: &TaskRecord) -> Option<String> {
    let error = task.outcome.as_ref().map(|o| &o["error"]);
    let text = match error {
        Some(e) if e.get("class_name").is_some() => Some(format!(
            "{}: {}",
            e["class_name"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        )),
        Some(e) if e.get("response").is_some() => Some(format!(
            "HTTP {} from {}",
            e["response"]["status"],
            e["response"]["url"].as_str().unwrap_or("")
        )),
        Some(e) if e.get("error_class").is_some() => Some(format!(
            "{}: {}",
            e["error_class"].as_str().unwrap_or(""),
            e["url"].as_str().unwrap_or("")
        )),
        _ => None,
    };
    let delivery = task
        .delivery
        .as_ref()
        .filter(|d| d.state == DeliveryState::Failed)
        .map(|d| {
            format!(
                "delivery failed: {}",
                d.last_error.as_deref().unwrap_or("no answer")
            )
        });
    let text = match (text, delivery) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }?;
    Some(if text.chars().count() > MAX_ERROR_TEXT {
        let mut short: String = text.chars().take(MAX_ERROR_TEXT).collect();
        short.push('…');
        short
    } else {
        text
    })
}

/// One listed failure.
fn failure(task: &TaskRecord) -> Value {
    let delivery = task.delivery.as_ref();
    json!({
        "id": task.id,
        "state": task.state.as_str(),
        "callback": task.callback,
        "finished_at": task.finished_at.map(rfc3339),
        "error": failure_text(task),
        "delivery": {
            "channel": task.deliver.channel(),
            "state": delivery.map_or("none", |d| d.state.as_str()),
            "attempts": delivery.map_or(0, |d| d.attempts),
            "last_error": delivery.and_then(|d| d.last_error.clone()),
        },
        "can_retry": task.state == TaskState::Failed,
        "can_redeliver": delivery.is_some_and(|d| d.state == DeliveryState::Failed),
    })
}

/// The figures the dashboard shows, from the queue, the daemon's metrics
/// and the engine's upstream state.
pub async fn figures(app: &App) -> Result<Value, DbError> {
    let now = now_ms();
    let counts = app.db.counts(now).await?;
    app.metrics.set_tasks(&counts);
    let tasks: Map<String, Value> = TaskState::NAMES
        .iter()
        .map(|state| {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            ((*state).to_owned(), Value::from(n))
        })
        .collect();
    let in_flight = app.runner.in_flight();
    app.metrics.set_in_flight(in_flight);
    let recent = app.metrics.recent(now);
    let totals = app.metrics.totals();
    let upstreams: Vec<Value> = app
        .client
        .health()
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "key": u.key,
                "breaker": u.breaker.map(|b| b.as_str()),
                "in_flight": u.in_flight,
                "max_in_flight": u.max_in_flight,
                "cooldown_remaining": u.cooldown_remaining.map(|d| d.as_secs_f64()),
                "available": u.is_available(),
                "recent_attempts": u.recent_attempts,
                "recent_failures": u.recent_failures,
                "error_rate": u.error_rate(),
            })
        })
        .collect();
    let failures: Vec<Value> = app
        .db
        .recent_failures(RECENT_FAILURES)
        .await?
        .iter()
        .map(failure)
        .collect();
    Ok(json!({
        "at": rfc3339(now),
        "tasks": tasks,
        "in_flight": in_flight,
        "throughput": {
            "window": WINDOW_SECONDS,
            "finished": recent.finished,
            "per_second": recent.per_second,
        },
        "latency": {
            "submit": percentiles(&recent.submit),
            "end_to_end": percentiles(&recent.end_to_end),
        },
        "submitted": totals.submitted,
        "retries": totals.retries,
        "outcomes": pairs(&totals.outcomes),
        "errors": pairs(&totals.errors),
        "deliveries": pairs(&totals.deliveries),
        "upstreams": upstreams,
        "recent_failures": failures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_the_pages_own_script_and_style() {
        let script = inline("script");
        let style = inline("style");
        assert!(script.contains("fetch("), "the script is found");
        assert!(style.contains('{'), "the style is found");
        assert!(CSP.contains(&sha256_source(script)));
        assert!(CSP.contains(&sha256_source(style)));
        assert!(!CSP.contains("unsafe-inline"));
        // Nothing from elsewhere: no address in the page but its own.
        for needle in ["http://", "https://", "src=", "href=\"http"] {
            assert!(!PAGE.contains(needle), "the page loads nothing: {needle}");
        }
        // One script and one style, so the hashes cover all of them.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE.contains(" style=\""), "no style attributes");
    }
}
