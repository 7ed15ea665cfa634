//! `/v1/tasks`: submit (one or a batch), list, show, cancel, redeliver,
//! retry.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    routing::{get, post},
    Router,
};
use futures_util::{stream, StreamExt};
use patient_store::PayloadStores;
use patient_wire::{HeaderValue as WireHeaderValue, Priority, Request as WireRequest};
use serde_json::{json, Map, Value};

use super::{
    body::json_body,
    error::{json_response, ApiError, ApiResult},
};
use crate::{
    app::App,
    db::{DbError, ListQuery, NewTask},
    egress::literal_denied,
    model::{now_ms, parse_rfc3339, Deliver, TaskRecord, TaskState},
};

/// The routes of `/v1/tasks`.
pub(super) fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/batch", post(submit_batch))
        .route("/v1/tasks/{id}", get(show))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/tasks/{id}/redeliver", post(redeliver))
        .route("/v1/tasks/{id}/retry", post(retry))
}

/// The longest `delay` of a submit: 30 days, in seconds.
const MAX_DELAY: f64 = 30.0 * 86_400.0;

/// The longest idempotency key, bytes.
const MAX_IDEMPOTENCY_KEY: usize = 255;

async fn submit(State(app): State<Arc<App>>, request: Request) -> ApiResult {
    let started = Instant::now();
    let body = json_body(&app, request).await?;
    let now = now_ms();
    let task = parse_submit(&app, &body, now)?;
    let plain = task.record.request.clone();
    let mut stored = insert(&app, vec![task]).await?;
    let (mut record, created) = stored
        .pop()
        .ok_or_else(|| ApiError::unavailable(&DbError::Closed))?;
    if created {
        app.metrics.submitted(1, started.elapsed());
        app.runner.wake();
        // As submitted: no need to load it back.
        record.request = plain;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &present(&app, record, now, true).await?,
    ))
}

/// Inserts `tasks` with their requests encoded for storage (encrypted,
/// large ones moved to the payload store). What a task that was not
/// inserted (an idempotency key already used, or a failed insert) had put
/// in the store is deleted again.
async fn insert(app: &App, mut tasks: Vec<NewTask>) -> Result<Vec<(TaskRecord, bool)>, ApiError> {
    let mut refs = Vec::with_capacity(tasks.len());
    for task in &mut tasks {
        match app.payloads.encode(&task.record.request).await {
            Ok(encoded) => {
                refs.push(PayloadStores::is_storage_ref(&encoded).then(|| encoded.clone()));
                task.record.request = encoded;
            }
            Err(e) => {
                for stored in refs.iter().flatten() {
                    app.payloads.delete(stored).await;
                }
                return Err(ApiError::payload(&e));
            }
        }
    }
    match app.db.insert(tasks).await {
        Ok(stored) => {
            for ((_, created), fresh) in stored.iter().zip(&refs) {
                if let (false, Some(fresh)) = (created, fresh) {
                    app.payloads.delete(fresh).await;
                }
            }
            Ok(stored)
        }
        Err(e) => {
            for stored in refs.iter().flatten() {
                app.payloads.delete(stored).await;
            }
            Err(ApiError::from_db(e))
        }
    }
}

/// Header names whose values are credentials: never shown in a task's
/// request (a `{"$secret": NAME}` shows, as it holds only the name).
const CREDENTIAL_HEADERS: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-amz-security-token",
];

/// The task JSON of the API, with its stored request (when `request`) and
/// outcome loaded back from the payload store and decrypted; credential
/// headers of the request are `<redacted>`. A payload that cannot be
/// loaded is a `503 unavailable`.
async fn present(
    app: &App,
    mut record: TaskRecord,
    now: i64,
    request: bool,
) -> Result<Value, ApiError> {
    if request {
        let mut loaded = app
            .payloads
            .decode(&record.request)
            .await
            .map_err(|e| ApiError::payload(&e))?
            .into_owned();
        if let Some(headers) = loaded.get_mut("headers").and_then(Value::as_object_mut) {
            for (name, value) in headers.iter_mut() {
                if value.is_string()
                    && CREDENTIAL_HEADERS.contains(&name.to_ascii_lowercase().as_str())
                {
                    *value = Value::from(patient_http::interceptor::REDACTED);
                }
            }
        }
        record.request = loaded;
    }
    if let Some(outcome) = &record.outcome {
        record.outcome = Some(
            app.payloads
                .decode_outcome(outcome)
                .await
                .map_err(|e| ApiError::payload(&e))?,
        );
    }
    Ok(record.to_json(now, request))
}

/// The task JSON of each record without its request (lists and batches),
/// outcomes loaded back a few at a time.
async fn present_all(
    app: &App,
    records: Vec<TaskRecord>,
    now: i64,
) -> Result<Vec<Value>, ApiError> {
    stream::iter(records)
        .map(|record| present(app, record, now, false))
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn submit_batch(State(app): State<Arc<App>>, request: Request) -> ApiResult {
    let started = Instant::now();
    let body = json_body(&app, request).await?;
    let now = now_ms();
    let Some(object) = body.as_object() else {
        return Err(ApiError::invalid(
            "tasks",
            "the body must be {\"tasks\": [...]}",
        ));
    };
    if let Some(key) = object.keys().find(|k| *k != "tasks") {
        return Err(ApiError::invalid(key.clone(), "is not a field of a batch"));
    }
    let Some(items) = object.get("tasks").and_then(Value::as_array) else {
        return Err(ApiError::invalid(
            "tasks",
            "is required: an array of submit bodies",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("tasks", "is empty"));
    }
    let max = usize::try_from(app.settings.max_batch).unwrap_or(usize::MAX);
    if items.len() > max {
        return Err(ApiError::invalid(
            "tasks",
            format!("has {} tasks; at most {max} (max_batch)", items.len()),
        ));
    }
    let mut tasks = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        tasks.push(parse_submit(&app, item, now).map_err(|e| e.within(&format!("tasks[{i}].")))?);
    }
    let stored = insert(&app, tasks).await?;
    let created = stored.iter().filter(|(_, c)| *c).count();
    if created > 0 {
        app.metrics.submitted(created, started.elapsed());
        app.runner.wake();
    }
    let tasks = present_all(&app, stored.into_iter().map(|(t, _)| t).collect(), now).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "tasks": tasks }),
    ))
}

/// The fields of a submit body.
const SUBMIT_FIELDS: [&str; 8] = [
    "request",
    "callback",
    "callback_args",
    "raise_error_responses",
    "deliver",
    "idempotency_key",
    "delay",
    "not_before",
];

/// Checks a submit body and makes the task it asks for.
pub(super) fn parse_submit(app: &App, body: &Value, now: i64) -> Result<NewTask, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::invalid(
            "request",
            "the body must be a JSON object with a request",
        ));
    };
    if let Some(key) = object.keys().find(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(key.clone(), "is not a field of a submit"));
    }
    let request_json = match object.get("request") {
        None | Some(Value::Null) => return Err(ApiError::invalid("request", "is required")),
        Some(value) => value,
    };
    let request = WireRequest::from_json_with_limits(request_json, &app.limits).map_err(|e| {
        let field = if e.path().is_empty() {
            "request".to_owned()
        } else {
            format!("request.{}", e.path())
        };
        ApiError::invalid(field, e.kind().to_string())
    })?;
    // Written once: checked against the submitted keys, then stored.
    let stored_request = request.to_json();
    check_known_keys(request_json, &stored_request)?;
    if let Some((ip, reason)) = literal_denied(&app.allow, request.url()) {
        return Err(ApiError::egress_denied(
            "request.url",
            format!("{ip} is {reason} address, refused by the egress guard"),
        ));
    }
    if request.url_credentials().is_some() {
        // They would have to be stored in clear: refuse rather than drop them.
        return Err(ApiError::invalid(
            "request.url",
            "credentials in the URL are not accepted; send an authorization header with a {\"$secret\": NAME} configured on the daemon",
        ));
    }
    check_secrets(app, &request)?;

    let callback = match object.get("callback") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.len() <= 256 => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "callback",
                "must be a string of at most 256 bytes",
            ))
        }
    };
    let callback_args = match object.get("callback_args") {
        None | Some(Value::Null) => json!({}),
        Some(value) => {
            patient_wire::CallbackArgs::from_json_with_limits(value, &app.limits).map_err(|e| {
                let field = if e.path().is_empty() {
                    "callback_args".to_owned()
                } else {
                    format!("callback_args.{}", e.path())
                };
                ApiError::invalid(field, e.kind().to_string())
            })?;
            value.clone()
        }
    };
    let raise_error_responses = match object.get("raise_error_responses") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "raise_error_responses",
                "must be true or false",
            ))
        }
    };
    let deliver = Deliver::from_json(object.get("deliver"))
        .map_err(|(field, message)| ApiError::invalid(field, message))?;
    if let Deliver::Webhook { url } = &deliver {
        if let Some((ip, reason)) = url::Url::parse(url)
            .ok()
            .and_then(|u| literal_denied(&app.allow, &u))
        {
            return Err(ApiError::egress_denied(
                "deliver.webhook.url",
                format!("{ip} is {reason} address, refused by the egress guard"),
            ));
        }
    }
    if matches!(
        deliver,
        Deliver::RedisList { .. } | Deliver::RedisStream { .. } | Deliver::Sidekiq { .. }
    ) && app.settings.redis_url.is_none()
    {
        return Err(ApiError::invalid(
            "deliver",
            "Redis and Sidekiq delivery need the daemon's redis_url setting",
        ));
    }
    let idempotency_key = match object.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY => {
            Some(s.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "idempotency_key",
                format!("must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} bytes"),
            ))
        }
    };
    let not_before = match (object.get("delay"), object.get("not_before")) {
        (Some(d), Some(n)) if !d.is_null() && !n.is_null() => {
            return Err(ApiError::invalid(
                "delay",
                "give delay or not_before, not both",
            ))
        }
        (Some(Value::Number(n)), _) => {
            let seconds = n.as_f64().unwrap_or(-1.0);
            if !(0.0..=MAX_DELAY).contains(&seconds) {
                return Err(ApiError::invalid(
                    "delay",
                    format!("must be 0 to {MAX_DELAY} seconds"),
                ));
            }
            now + (seconds * 1000.0).round() as i64
        }
        (Some(Value::Null) | None, Some(Value::String(text))) => {
            let at = parse_rfc3339(text).ok_or_else(|| {
                ApiError::invalid(
                    "not_before",
                    "must be an RFC 3339 time such as 2026-12-01T10:00:00Z",
                )
            })?;
            if at > now + (MAX_DELAY * 1000.0) as i64 {
                return Err(ApiError::invalid(
                    "not_before",
                    "is more than 30 days ahead",
                ));
            }
            at.max(now)
        }
        (Some(Value::Null) | None, Some(Value::Null) | None) => now,
        (Some(_), _) => return Err(ApiError::invalid("delay", "must be a number of seconds")),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "not_before",
                "must be an RFC 3339 string",
            ))
        }
    };
    let options = request.request_options();
    let priority = match options.priority {
        Some(Priority::High) => 0,
        Some(Priority::Low) => 2,
        _ => 1,
    };
    let deadline = options
        .deadline
        .map(|d| now + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
    Ok(NewTask {
        record: TaskRecord {
            id: crate::model::task_id(),
            state: if not_before > now {
                TaskState::Scheduled
            } else {
                TaskState::Queued
            },
            request: stored_request,
            callback,
            callback_args,
            raise_error_responses,
            deliver,
            idempotency_key,
            priority,
            created_at: now,
            not_before,
            deadline,
            finished_at: None,
            next_attempt: 1,
            request_sent: false,
            attempts: Vec::new(),
            outcome: None,
            delivery: None,
        },
    })
}

/// Refuses keys the wire format does not know in `request`,
/// `request.options` and `request.options.retry`: the wire loader skips
/// them (the gem's JSON may grow), but in a submit a misspelt option
/// (`optoins`, `retyr`) would silently do nothing. A key is known when the
/// loaded request writes it back; keys given as `null` are left alone.
pub(super) fn check_known_keys(given: &Value, loaded: &Value) -> Result<(), ApiError> {
    fn walk(given: &Value, loaded: &Value, path: &str, depth: usize) -> Result<(), ApiError> {
        let (Some(given), Some(loaded)) = (given.as_object(), loaded.as_object()) else {
            return Ok(());
        };
        for (key, value) in given {
            if value.is_null() {
                continue;
            }
            let nested = depth < 2 && matches!(key.as_str(), "options" | "retry");
            match loaded.get(key) {
                // A table written back empty is left out: look inside anyway.
                None if nested && value.is_object() => walk(
                    value,
                    &Value::Object(Map::new()),
                    &format!("{path}.{key}"),
                    depth + 1,
                )?,
                None => {
                    return Err(ApiError::invalid(
                        format!("{path}.{key}"),
                        "is not a field of the wire format here",
                    ))
                }
                Some(inner) if nested => walk(value, inner, &format!("{path}.{key}"), depth + 1)?,
                Some(_) => {}
            }
        }
        Ok(())
    }
    walk(given, loaded, "request", 0)
}

/// Every `{"$secret": NAME}` must name a secret configured on the daemon.
pub(super) fn check_secrets(app: &App, request: &WireRequest) -> Result<(), ApiError> {
    let host = request.url().host_str().unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .filter_map(|(name, value)| match value {
            WireHeaderValue::Secret(secret) => Some((format!("request.headers.{name}"), secret)),
            WireHeaderValue::Value(_) => None,
        });
    let params = request
        .secret_params()
        .iter()
        .map(|(param, secret)| (format!("request.params.{param}"), secret));
    for (field, secret) in headers.chain(params) {
        let name = &secret.name;
        match app.secrets.get(name) {
            None => {
                return Err(ApiError::invalid(
                    field,
                    format!("secret {name:?} is not configured on the daemon ([secrets])"),
                ))
            }
            Some(None) => {
                return Err(ApiError::invalid(
                    field,
                    format!("secret {name:?} has no hosts ([secrets.{name}] hosts = [...]), so no submitted task may use it"),
                ))
            }
            Some(Some(hosts)) if !patient_http::host_listed(hosts, host) => {
                return Err(ApiError::invalid(
                    field,
                    format!("secret {name:?} may not be sent to {host:?}: its hosts are {hosts:?}"),
                ))
            }
            Some(Some(_)) => {}
        }
    }
    Ok(())
}

/// The `{id}` of a task route. An id that does not decode (its
/// percent-escapes are not UTF-8) names no task: `404`, in the API's error
/// shape rather than the framework's plain-text rejection.
struct TaskId(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TaskId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| TaskId(id))
            .map_err(|e| ApiError::not_found(format!("no such task: {e}")))
    }
}

async fn show(State(app): State<Arc<App>>, TaskId(id): TaskId) -> ApiResult {
    let task = app
        .db
        .get(&id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    Ok(json_response(
        StatusCode::OK,
        &present(&app, task, now_ms(), true).await?,
    ))
}

async fn list(State(app): State<Arc<App>>, request: Request) -> ApiResult {
    let now = now_ms();
    let mut query = ListQuery {
        limit: 100,
        // Filter by the state each task shows (see `TaskRecord::to_json`).
        at: Some(now),
        ..ListQuery::default()
    };
    for (key, value) in url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
    {
        match key.as_ref() {
            "state" => {
                query.state = Some(value.parse::<TaskState>().ok().ok_or_else(|| {
                    ApiError::invalid(
                        "state",
                        format!("{value:?} is not one of {}", TaskState::NAMES.join(", ")),
                    )
                })?)
            }
            "callback" => query.callback = Some(value.into_owned()),
            "limit" => {
                query.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::invalid("limit", "must be 1 to 1000"))?
            }
            "cursor" => {
                query.cursor = Some(
                    value
                        .split_once('_')
                        .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())))
                        .ok_or_else(|| {
                            ApiError::invalid("cursor", "is not a cursor this API returned")
                        })?,
                )
            }
            other => {
                return Err(ApiError::invalid(
                    other.to_owned(),
                    "is not a filter of the task list",
                ))
            }
        }
    }
    let limit = query.limit as usize;
    let tasks = app
        .db
        .list(&query)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let next_cursor = if tasks.len() == limit {
        tasks
            .last()
            .map(|t| Value::from(format!("{}_{}", t.created_at, t.id)))
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let tasks = present_all(&app, tasks, now).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "tasks": tasks, "next_cursor": next_cursor }),
    ))
}

async fn cancel(State(app): State<Arc<App>>, TaskId(id): TaskId) -> ApiResult {
    let task = app
        .db
        .cancel(&id, now_ms())
        .await
        .map_err(ApiError::from_db)?;
    app.runner.abort(&id);
    Ok(json_response(
        StatusCode::OK,
        &present(&app, task, now_ms(), true).await?,
    ))
}

async fn redeliver(State(app): State<Arc<App>>, TaskId(id): TaskId) -> ApiResult {
    let task = app
        .db
        .redeliver(&id, now_ms())
        .await
        .map_err(ApiError::from_db)?;
    app.deliverer.wake();
    Ok(json_response(
        StatusCode::OK,
        &present(&app, task, now_ms(), true).await?,
    ))
}

async fn retry(State(app): State<Arc<App>>, TaskId(id): TaskId) -> ApiResult {
    // A failed task's outcome does not change until it runs again: what it
    // stored is deleted once the retry has cleared it.
    let previous = app
        .db
        .get(&id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .and_then(|t| t.outcome);
    let task = app
        .db
        .retry(&id, now_ms())
        .await
        .map_err(ApiError::from_db)?;
    if let Some(previous) = previous {
        app.payloads.delete_outcome(&previous).await;
    }
    app.runner.wake();
    Ok(json_response(
        StatusCode::OK,
        &present(&app, task, now_ms(), true).await?,
    ))
}
