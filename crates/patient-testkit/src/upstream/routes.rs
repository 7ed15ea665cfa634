//! Request routing and the route handlers of the upstream server.

use std::{
    collections::{HashMap, VecDeque},
    io::Write,
    str::FromStr,
    sync::Mutex,
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{feed::Feeds, openai, openai::OpenAi};
use crate::body::Body;

/// The text served (before compression) by `/compressed`.
pub const COMPRESSED_TEXT: &str =
    "patient compressed body: the quick brown fox jumps over the lazy dog.\n\
patient compressed body: the quick brown fox jumps over the lazy dog.\n\
patient compressed body: the quick brown fox jumps over the lazy dog.\n\
patient compressed body: the quick brown fox jumps over the lazy dog.\n";

/// [`COMPRESSED_TEXT`] compressed with brotli (quality 11), embedded so the
/// crate needs no brotli encoder.
const COMPRESSED_TEXT_BR: &[u8] = &[
    0x1b, 0x17, 0x01, 0x18, 0x8c, 0xd4, 0x4e, 0xf9, 0xc7, 0x86, 0x08, 0xe4, 0x64, 0xa9, 0x3e, 0x24,
    0xeb, 0x5a, 0x65, 0x14, 0x92, 0x82, 0x7c, 0x0b, 0x53, 0x70, 0x8c, 0x03, 0xf6, 0x6f, 0x3a, 0x9f,
    0x96, 0x91, 0x74, 0x0f, 0xb8, 0x3b, 0x67, 0xb4, 0x3d, 0x25, 0x6c, 0xd1, 0x1e, 0x35, 0xdd, 0x16,
    0x80, 0xf5, 0x94, 0x64, 0x52, 0x0b, 0x8b, 0x9f, 0x41, 0x3b, 0x8c, 0xfa, 0x0f, 0x97, 0x12, 0x01,
];

/// The text served by `/charset` for the Latin charsets and UTF-8.
pub const CHARSET_TEXT: &str = "café";

/// `日本語` in Shift_JIS, served by `/charset?cs=shift_jis`.
const SHIFT_JIS_TEXT: &[u8] = &[0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea];

/// Largest `n` accepted by `/bytes` (256 MiB).
const MAX_BYTES: usize = 256 * 1024 * 1024;

/// The repeated pattern of `/bytes`.
const PATTERN: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// Per-key request counters of `/sequence`, shared by every connection of
/// one upstream.
#[derive(Debug, Default)]
pub(super) struct Sequences {
    counts: Mutex<HashMap<String, usize>>,
}

impl Sequences {
    /// Counts one more request for `key`; returns its index (0 for the first).
    fn next(&self, key: &str) -> usize {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(key) {
            Some(n) => {
                *n += 1;
                *n - 1
            }
            None => {
                counts.insert(key.to_owned(), 1);
                0
            }
        }
    }

    /// Requests counted for `key` so far.
    pub(super) fn count(&self, key: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

/// Request headers that `/sequence` echoes back.
const SEQUENCE_ECHOED: &[&str] = &[
    "x-request-timeout",
    "x-request-priority",
    "idempotency-key",
    "x-request-id",
];

/// Routes one request. Never fails: problems become `4xx` responses.
pub(super) async fn handle(
    request: Request<Incoming>,
    conn: u64,
    sequences: &Sequences,
    feeds: &Feeds,
    openai: &OpenAi,
) -> Response<Body> {
    // The hot benchmark path: no query parsing, no allocation beyond hyper's.
    if request.uri().path() == "/fast" {
        return text(StatusCode::OK, "ok");
    }
    route(request, conn, sequences, feeds, openai)
        .await
        .unwrap_or_else(|message| text(StatusCode::BAD_REQUEST, message))
}

type Outcome = Result<Response<Body>, String>;

async fn route(
    request: Request<Incoming>,
    conn: u64,
    sequences: &Sequences,
    feeds: &Feeds,
    openai: &OpenAi,
) -> Outcome {
    let query = Query::from_uri(request.uri().query());
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/delay" => {
            let ms: u64 = query.value("ms", 0)?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(text(StatusCode::OK, "ok"))
        }
        "/bytes" => bytes(&query),
        "/sse" => sse(&query),
        "/feed" => feed(&query, feeds),
        "/mirror" => Ok(mirror(request)),
        "/redirect-to" => {
            let url = query.get("url").ok_or("missing url parameter")?;
            redirect(&query, url)
        }
        "/redirect-loop" => redirect(&query, "/redirect-loop/b"),
        "/redirect-loop/b" => redirect(&query, "/redirect-loop"),
        "/echo" => echo(request, conn).await,
        "/compressed" => compressed(&query),
        "/charset" => charset(&query),
        "/conn" => Ok(text(StatusCode::OK, conn.to_string())),
        "/json" => Ok(with_type(
            StatusCode::OK,
            "application/json",
            r#"{"ok":true,"name":"patient","items":[1,2,3]}"#,
        )),
        "/html" => Ok(with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!doctype html>\n<html><head><title>patient</title></head><body><p>Hello from the upstream.</p></body></html>\n",
        )),
        "/headers" => many_headers(&query),
        "/set" => set_headers(&query),
        "/sequence" => sequence(request.headers(), &query, sequences).await,
        "/bimodal" => bimodal(&query).await,
        "/v1/chat/completions" => Ok(openai::chat(request, &query, openai).await),
        "/v1/models" => Ok(openai::models(&request)),
        _ => {
            if let Some(code) = path.strip_prefix("/status/") {
                status(code, &query)
            } else if let Some(n) = path.strip_prefix("/redirect/") {
                redirect_chain(n, request, conn, &query).await
            } else {
                Ok(text(StatusCode::NOT_FOUND, "not found"))
            }
        }
    }
}

/// Decoded query parameters, in order.
pub(super) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn from_uri(query: Option<&str>) -> Query {
        let pairs = query
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        Query { pairs }
    }

    /// The last value of `name`.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name` parsed as `T`, or `default` when absent.
    pub(super) fn value<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("invalid value for {name}: {v:?}")),
        }
    }

    /// Whether `name` is `1`, `true` or `yes`.
    pub(super) fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("1" | "true" | "yes"))
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn bytes(query: &Query) -> Outcome {
    let n: usize = query.value("n", 0)?;
    if n > MAX_BYTES {
        return Err(format!("n must be at most {MAX_BYTES}"));
    }
    let data: Bytes = PATTERN
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect::<Vec<u8>>()
        .into();
    let body = if query.flag("chunked") {
        let size = n.div_ceil(8).max(1);
        let chunks: VecDeque<Bytes> = (0..n)
            .step_by(size)
            .map(|start| data.slice(start..(start + size).min(n)))
            .collect();
        Body::Chunks(chunks)
    } else {
        Body::full(data)
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

fn sse(query: &Query) -> Outcome {
    let events: u64 = query.value("events", 3)?;
    let interval = Duration::from_millis(query.value("interval_ms", 10)?);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..events {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            if tx
                .send(Frame::data(Bytes::from(format!("data: event {i}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn feed(query: &Query, feeds: &Feeds) -> Outcome {
    let key = query.get("key").ok_or("missing key parameter")?;
    let Some(rx) = feeds.take(key) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("no feed registered for key {key:?}"),
        ));
    };
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    for (name, value) in query.pairs.iter().filter(|(name, _)| name != "key") {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        headers.append(name, header_value(value)?);
    }
    Ok(response)
}

fn mirror(request: Request<Incoming>) -> Response<Body> {
    let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::new(Body::Mirror(request.into_body()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    response
}

fn status(code: &str, query: &Query) -> Outcome {
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| *c >= 200)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("invalid status code {code:?}"))?;
    let body = query.get("body").unwrap_or("").to_owned();
    let mut response = text(status, body);
    let headers = response.headers_mut();
    for (param, name) in [
        ("retry_after", header::RETRY_AFTER),
        ("location", header::LOCATION),
        ("content_type", header::CONTENT_TYPE),
    ] {
        if let Some(value) = query.get(param) {
            headers.insert(name, header_value(value)?);
        }
    }
    Ok(response)
}

fn redirect_status(query: &Query) -> Result<StatusCode, String> {
    let code: u16 = query.value("status", 302)?;
    match StatusCode::from_u16(code) {
        Ok(status) if status.is_redirection() => Ok(status),
        _ => Err(format!("status must be 3xx, got {code}")),
    }
}

fn redirect(query: &Query, location: &str) -> Outcome {
    let status = redirect_status(query)?;
    let mut response = text(status, format!("redirecting to {location}"));
    response
        .headers_mut()
        .insert(header::LOCATION, header_value(location)?);
    Ok(response)
}

async fn redirect_chain(n: &str, request: Request<Incoming>, conn: u64, query: &Query) -> Outcome {
    let n: u32 = n.parse().map_err(|_| format!("invalid hop count {n:?}"))?;
    match n {
        0 => echo(request, conn).await,
        1 => redirect(query, query.get("to").unwrap_or("/echo")),
        _ => {
            let location = match request.uri().query() {
                Some(q) => format!("/redirect/{}?{q}", n - 1),
                None => format!("/redirect/{}", n - 1),
            };
            redirect(query, &location)
        }
    }
}

async fn echo(request: Request<Incoming>, conn: u64) -> Outcome {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the request body failed: {e}"))?
        .to_bytes();

    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let separator = if name == header::COOKIE { "; " } else { ", " };
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(separator);
        headers.insert(name.as_str().to_owned(), Value::String(joined));
    }
    let args: Map<String, Value> = Query::from_uri(parts.uri.query())
        .pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let text = match std::str::from_utf8(&body) {
        Ok(text) if !text.is_empty() => Value::String(text.to_owned()),
        _ => Value::Null,
    };
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    let value = json!({
        "authority": authority,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "args": args,
        "uri": parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        "version": format!("{:?}", parts.version),
        "connection": conn,
        "headers": headers,
        "body": text,
        "body_base64": base64::engine::general_purpose::STANDARD.encode(&body),
        "body_len": body.len(),
    });
    Ok(with_type(
        StatusCode::OK,
        "application/json",
        value.to_string(),
    ))
}

fn compressed(query: &Query) -> Outcome {
    let encoding = query.get("encoding").unwrap_or("gzip");
    let body: Vec<u8> = match encoding {
        "gzip" => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder
                .write_all(COMPRESSED_TEXT.as_bytes())
                .and_then(|()| encoder.finish())
                .map_err(|e| e.to_string())?
        }
        "deflate" => {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder
                .write_all(COMPRESSED_TEXT.as_bytes())
                .and_then(|()| encoder.finish())
                .map_err(|e| e.to_string())?
        }
        "br" => COMPRESSED_TEXT_BR.to_vec(),
        "identity" => COMPRESSED_TEXT.as_bytes().to_vec(),
        other => return Err(format!("unsupported encoding {other:?}")),
    };
    let mut response = text(StatusCode::OK, body);
    if encoding != "identity" {
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, header_value(encoding)?);
    }
    Ok(response)
}

fn charset(query: &Query) -> Outcome {
    let cs = query.get("cs").unwrap_or("utf-8");
    let body: Vec<u8> = match cs.to_ascii_lowercase().as_str() {
        "utf-8" | "utf8" => CHARSET_TEXT.as_bytes().to_vec(),
        "iso-8859-1" | "latin1" | "latin-1" | "windows-1252" | "cp1252" => {
            CHARSET_TEXT.chars().map(|c| c as u8).collect()
        }
        "shift_jis" | "shift-jis" | "sjis" => SHIFT_JIS_TEXT.to_vec(),
        other => return Err(format!("unsupported charset {other:?}")),
    };
    let mut response = Response::new(Body::full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header_value(&format!("text/plain; charset={cs}"))?,
    );
    Ok(response)
}

fn many_headers(query: &Query) -> Outcome {
    let n: usize = query.value("n", 10)?;
    let size: usize = query.value("size", 16)?;
    if n.saturating_mul(size) > 64 * 1024 * 1024 {
        return Err("n * size must be at most 64 MiB".into());
    }
    let value = header_value(&"v".repeat(size))?;
    let mut response = text(StatusCode::OK, "ok");
    let headers = response.headers_mut();
    for i in 0..n {
        let name = HeaderName::from_bytes(format!("x-header-{i}").as_bytes())
            .map_err(|e| e.to_string())?;
        headers.insert(name, value.clone());
    }
    Ok(response)
}

fn set_headers(query: &Query) -> Outcome {
    let mut response = text(StatusCode::OK, "ok");
    let headers = response.headers_mut();
    for (name, value) in &query.pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        headers.append(name, header_value(value)?);
    }
    Ok(response)
}

/// A comma-separated list of `T`, or `default` when absent; never empty.
fn list<T: FromStr + Clone>(query: &Query, name: &str, default: T) -> Result<Vec<T>, String> {
    let Some(raw) = query.get(name).filter(|v| !v.is_empty()) else {
        return Ok(vec![default]);
    };
    raw.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| format!("invalid value in {name}: {item:?}"))
        })
        .collect()
}

/// The `n`-th item of `items`, the last one repeating.
fn nth<T: Copy>(items: &[T], n: usize) -> T {
    items[n.min(items.len() - 1)]
}

async fn sequence(headers: &http::HeaderMap, query: &Query, sequences: &Sequences) -> Outcome {
    let key = query.get("key").ok_or("missing key parameter")?;
    let steps: Vec<u16> = list(query, "steps", 200)?;
    let delays: Vec<u64> = list(query, "delays", 0)?;
    let retry_after = query.get("retry_after").map(header_value).transpose()?;
    let do_not_retry = query.flag("x_do_not_retry");
    let statuses = steps
        .iter()
        .map(|&code| {
            StatusCode::from_u16(code)
                .ok()
                .filter(|_| code >= 200)
                .ok_or_else(|| format!("invalid status code {code}"))
        })
        .collect::<Result<Vec<StatusCode>, String>>()?;

    let mut echoed = Map::new();
    for name in SEQUENCE_ECHOED {
        if let Some(value) = headers.get(*name) {
            echoed.insert(
                (*name).to_owned(),
                Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            );
        }
    }

    let n = sequences.next(key);
    let status = nth(&statuses, n);
    tokio::time::sleep(Duration::from_millis(nth(&delays, n))).await;
    let body = json!({
        "key": key,
        "n": n,
        "status": status.as_u16(),
        "headers": echoed,
    });
    let mut response = with_type(status, "application/json", body.to_string());
    if !status.is_success() {
        let headers = response.headers_mut();
        if let Some(value) = retry_after {
            headers.insert(header::RETRY_AFTER, value);
        }
        if do_not_retry {
            headers.insert(
                HeaderName::from_static("x-do-not-retry"),
                HeaderValue::from_static("1"),
            );
        }
    }
    Ok(response)
}

async fn bimodal(query: &Query) -> Outcome {
    let slow_pct: f64 = query.value("slow_pct", 5.0)?;
    if !(0.0..=100.0).contains(&slow_pct) {
        return Err(format!("slow_pct must be in 0..=100, got {slow_pct}"));
    }
    let slow_ms: u64 = query.value("slow_ms", 1000)?;
    let fast_ms: u64 = query.value("fast_ms", 5)?;
    let slow = fastrand::f64() * 100.0 < slow_pct;
    let (mode, ms) = if slow {
        ("slow", slow_ms)
    } else {
        ("fast", fast_ms)
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let mut response = text(StatusCode::OK, mode);
    response.headers_mut().insert(
        HeaderName::from_static("x-latency-mode"),
        HeaderValue::from_static(mode),
    );
    Ok(response)
}

fn header_value(value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("invalid header value {value:?}"))
}
