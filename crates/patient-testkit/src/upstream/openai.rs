//! An OpenAI-compatible chat endpoint: `POST /v1/chat/completions` (JSON or
//! a server-sent event stream, shaped by query parameters) and
//! `GET /v1/models`, enough for the official OpenAI SDKs to talk to the
//! upstream and for a gateway's tests to control every event.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::routes::Query;
use crate::body::Body;

/// How many requests [`OpenAi`] keeps for
/// [`Upstream::openai_requests`](super::Upstream::openai_requests); older
/// ones are forgotten so a load test does not grow the server without bound.
const RECORDED_MAX: usize = 1024;

/// The one model `GET /v1/models` lists.
const MODEL_ID: &str = "patient-test";

/// The SSE comment sent by `pings=N`.
const PING: &[u8] = b": ping\n\n";

/// A request the OpenAI routes received, as it arrived (headers and body
/// untouched), for a test to check what a client or a gateway sent.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// The request target (path and query; absolute-form or `:authority`
    /// when the client sent one).
    pub uri: Uri,
    /// The HTTP version of the request.
    pub version: Version,
    /// Every request header, repeated ones kept apart.
    pub headers: HeaderMap,
    /// The whole request body, not decoded.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive), when present and
    /// visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON; `None` when it is not JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// State of the OpenAI routes shared by every connection of one upstream.
#[derive(Debug, Default)]
pub(super) struct OpenAi {
    /// Numbers the `chatcmpl-<n>` ids: 1, 2, …
    completions: AtomicU64,
    /// Streams whose client went away before the last event was sent.
    cancelled: Arc<AtomicU64>,
    /// The last [`RECORDED_MAX`] requests, oldest first.
    recorded: Mutex<VecDeque<RecordedRequest>>,
}

impl OpenAi {
    fn record(&self, request: RecordedRequest) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if recorded.len() == RECORDED_MAX {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }

    /// The recorded requests, oldest first.
    pub(super) fn requests(&self) -> Vec<RecordedRequest> {
        let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        recorded.iter().cloned().collect()
    }

    /// Streams cancelled by their client so far.
    pub(super) fn streams_cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// An OpenAI-shaped error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let (kind, code) = match status.as_u16() {
        401 => ("authentication_error", Value::from("invalid_api_key")),
        403 => ("permission_error", Value::Null),
        404 => ("not_found_error", Value::Null),
        429 => ("rate_limit_error", Value::from("rate_limit_exceeded")),
        500..=599 => ("server_error", Value::Null),
        _ => ("invalid_request_error", Value::Null),
    };
    let body = json!({
        "error": {
            "message": message.into(),
            "type": kind,
            "param": Value::Null,
            "code": code,
        }
    });
    json_response(status, body.to_string())
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /v1/models`.
pub(super) fn models(request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on /v1/models", request.method()),
        );
    }
    let body = json!({
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "patient"}],
    });
    json_response(StatusCode::OK, body.to_string())
}

/// How a response is shaped, from the query parameters.
struct Shape {
    head_delay: Duration,
    interval: Duration,
    first_delay: Duration,
    pings: u32,
    split: bool,
    cut_after: Option<usize>,
    no_trailing_blank: bool,
    status: Option<StatusCode>,
    retry_after: Option<HeaderValue>,
}

impl Shape {
    fn from_query(query: &Query) -> Result<Shape, String> {
        let ms = |name: &str| query.value(name, 0u64).map(Duration::from_millis);
        let status = match query.get("status") {
            None => None,
            Some(raw) => Some(
                raw.parse::<u16>()
                    .ok()
                    .filter(|code| (400..=599).contains(code))
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| format!("status must be 400 to 599, got {raw:?}"))?,
            ),
        };
        let retry_after = query
            .get("retry_after")
            .map(|raw| {
                HeaderValue::from_str(raw).map_err(|_| format!("invalid retry_after {raw:?}"))
            })
            .transpose()?;
        Ok(Shape {
            head_delay: ms("head_delay_ms")?,
            interval: ms("interval_ms")?,
            first_delay: ms("first_delay_ms")?,
            pings: query.value("pings", 0)?,
            split: query.flag("split"),
            cut_after: query
                .get("cut_after")
                .map(|_| query.value("cut_after", 0))
                .transpose()?,
            no_trailing_blank: query.flag("no_trailing_blank"),
            status,
            retry_after,
        })
    }
}

/// What the chat request asked for.
struct Chat {
    model: Value,
    stream: bool,
    include_usage: bool,
    /// The words of the reply: `echo:` then those of the last message.
    reply: Vec<String>,
    /// Words in every message.
    prompt_tokens: usize,
}

impl Chat {
    fn parse(body: &[u8]) -> Result<Chat, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        let model = match value.get("model") {
            Some(model @ Value::String(_)) => model.clone(),
            _ => return Err("'model' is required and must be a string".into()),
        };
        let messages = match value.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => messages,
            _ => return Err("'messages' is required and must be a non-empty array".into()),
        };
        let stream = match value.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err("'stream' must be a boolean".into()),
        };
        let include_usage = value
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let contents: Vec<String> = messages.iter().map(message_text).collect();
        let prompt_tokens = contents
            .iter()
            .map(|text| text.split_whitespace().count())
            .sum();
        let last = contents.last().map_or("", String::as_str);
        let reply = std::iter::once("echo:")
            .chain(last.split_whitespace())
            .map(str::to_owned)
            .collect();
        Ok(Chat {
            model,
            stream,
            include_usage,
            reply,
            prompt_tokens,
        })
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.reply.len(),
            "total_tokens": self.prompt_tokens + self.reply.len(),
        })
    }
}

/// The text of one message: its `content` string, or the `text` of its
/// content parts joined by spaces; empty for anything else.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(
    request: Request<Incoming>,
    query: &Query,
    state: &OpenAi,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body failed: {e}"),
            )
        }
    };
    state.record(RecordedRequest {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers,
        body: body.clone(),
    });
    if parts.method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on /v1/chat/completions", parts.method),
        );
    }
    let shape = match Shape::from_query(query) {
        Ok(shape) => shape,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if !shape.head_delay.is_zero() {
        tokio::time::sleep(shape.head_delay).await;
    }
    if let Some(status) = shape.status {
        let mut response = error(
            status,
            format!("the test upstream was asked to answer {}", status.as_u16()),
        );
        if let Some(value) = shape.retry_after.clone() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let chat = match Chat::parse(&body) {
        Ok(chat) => chat,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let n = state.completions.fetch_add(1, Ordering::Relaxed) + 1;
    let id = format!("chatcmpl-{n}");
    let created = unix_now();
    if !chat.stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": chat.reply.join(" ")},
                "finish_reason": "stop",
            }],
            "usage": chat.usage(),
        });
        return json_response(StatusCode::OK, body.to_string());
    }

    let events = stream_events(&chat, &id, created, &shape);
    let (tx, rx) = mpsc::channel(1);
    let cancelled = state.cancelled.clone();
    tokio::spawn(async move {
        if send_stream(&tx, &shape, events).await.is_err() {
            cancelled.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The data events of a stream, in order, each with its blank line.
fn stream_events(chat: &Chat, id: &str, created: u64, shape: &Shape) -> Vec<Bytes> {
    let chunk = |delta: Value, finish_reason: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": Value::Null,
                "finish_reason": finish_reason,
            }],
        });
        if chat.include_usage {
            chunk["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let last = chat.reply.len().saturating_sub(1);
    let words = chat.reply.iter().enumerate().map(|(i, word)| {
        let content = if i == last {
            word.clone()
        } else {
            format!("{word} ")
        };
        chunk(json!({ "content": content }), Value::Null)
    });
    match shape.cut_after {
        Some(n) => {
            events.extend(words.take(n));
            return events;
        }
        None => events.extend(words),
    }
    events.push(chunk(json!({}), Value::from("stop")));
    if chat.include_usage {
        let usage = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [],
            "usage": chat.usage(),
        });
        events.push(Bytes::from(format!("data: {usage}\n\n")));
    }
    events.push(if shape.no_trailing_blank {
        Bytes::from_static(b"data: [DONE]\n")
    } else {
        Bytes::from_static(b"data: [DONE]\n\n")
    });
    events
}

/// The response body is gone: the client closed the connection or reset the
/// stream.
struct Gone;

/// Writes the pings, then `events` with their delays; `Err` as soon as the
/// client is gone, even in the middle of a delay.
async fn send_stream(
    tx: &mpsc::Sender<Frame<Bytes>>,
    shape: &Shape,
    events: Vec<Bytes>,
) -> Result<(), Gone> {
    let part = shape.first_delay / shape.pings.saturating_add(1);
    for _ in 0..shape.pings {
        wait(tx, part).await?;
        emit(tx, Bytes::from_static(PING), shape.split).await?;
    }
    wait(tx, shape.first_delay.saturating_sub(part * shape.pings)).await?;
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            wait(tx, shape.interval).await?;
        }
        emit(tx, event, shape.split).await?;
    }
    Ok(())
}

/// Sleeps `delay`, or stops early when the client goes away.
async fn wait(tx: &mpsc::Sender<Frame<Bytes>>, delay: Duration) -> Result<(), Gone> {
    if delay.is_zero() {
        return if tx.is_closed() { Err(Gone) } else { Ok(()) };
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        () = tx.closed() => Err(Gone),
    }
}

/// Sends one event as one frame, or as two cut at its middle byte.
async fn emit(tx: &mpsc::Sender<Frame<Bytes>>, event: Bytes, split: bool) -> Result<(), Gone> {
    if split && event.len() >= 2 {
        let mut first = event;
        let second = first.split_off(first.len() / 2);
        send(tx, first).await?;
        send(tx, second).await
    } else {
        send(tx, event).await
    }
}

async fn send(tx: &mpsc::Sender<Frame<Bytes>>, data: Bytes) -> Result<(), Gone> {
    tx.send(Frame::data(data)).await.map_err(|_| Gone)
}
