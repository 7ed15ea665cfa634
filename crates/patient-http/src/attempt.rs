//! One attempt of a task: secrets, interceptors, request compression,
//! preprocessors, the transport, response interceptors, a replay they ask
//! for and redirects, every failure wrapped into a wire-format error. Which
//! attempts to make, and when, is `strategy.rs`.
//!
//! Hooks are async and run within the attempt's timeout: preparing a send
//! (secrets, request hooks, preprocessors) and the response hooks are each
//! bounded by what the attempt has left, and the transport gets what is left
//! after the hooks ran.
//!
//! Each attempt runs in a `tracing` span `attempt` (level DEBUG), a child of
//! the span current where the task runs (a daemon's task, a gateway's
//! proxied request, an embedder's own). Its fields follow OpenTelemetry's
//! HTTP client conventions: `attempt` (its number), `hedged`,
//! `http.request.method`, `url.full` (the task's URL: no secret query
//! parameter and no credentials, which are added only when it is sent),
//! `server.address`, `server.port`, and when it ends
//! `http.response.status_code` or `error.type` (the error's class, such as
//! `ConnectionRefused`, `Timeout` or `CircuitOpen`).

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue as HttpHeaderValue};
use patient_wire::{
    ErrorType, HeaderValue, Headers, Method, Priority, RedirectError, RedirectErrorKind, Response,
    TaskError,
};
use tokio::time::Instant;
use url::Url;

use crate::{
    client::{OutgoingRequest, RawResponse, ResponseBody, StreamingRequest, TransportError},
    engine::Engine,
    exchange::{BodyMode, ExchangeOptions, RawParts},
    interceptor::{InterceptContext, ResponseAction, ResponseParts, SentRequest},
    limit::LimitPermit,
    metrics::EndpointMetrics,
    observer::{RequestEnd, RequestStart},
    preprocess::PreparedRequest,
    propagation::propagation_headers,
    time::saturating_after,
    Task,
};

/// What one attempt produced.
pub(crate) struct AttemptResult {
    /// A response of any status, or a request or redirect error (never an
    /// HTTP error: `raise_error_responses` applies to the final outcome).
    pub(crate) result: Result<Response, TaskError>,
    /// The final response's headers, for retry decisions.
    pub(crate) headers: Option<HeaderMap>,
    /// Ended before reaching the transport (a secret, header, interceptor or
    /// preprocessor refused it, or the strategy did): never retried.
    pub(crate) refused: bool,
    /// Whether any byte of the request may have reached the upstream.
    pub(crate) sent: bool,
    /// The body of a streamed exchange, unread.
    pub(crate) stream: Option<ResponseBody>,
    /// The concurrency slot a streamed body holds until it ends.
    pub(crate) permit: Option<LimitPermit>,
}

impl AttemptResult {
    /// An attempt that ended before anything was sent.
    pub(crate) fn unsent(error: TaskError) -> Self {
        AttemptResult {
            result: Err(error),
            headers: None,
            refused: true,
            sent: false,
            stream: None,
            permit: None,
        }
    }

    /// What an exchange keeps of the attempt's response.
    pub(crate) fn take_raw(&mut self) -> RawParts {
        RawParts {
            headers: self.headers.take(),
            stream: self.stream.take(),
            permit: self.permit.take(),
        }
    }
}

/// How one attempt is made.
pub(crate) struct AttemptPlan<'a> {
    pub(crate) number: u32,
    /// The attempt's own time limit.
    pub(crate) timeout: Duration,
    /// The task's deadline, for `X-Request-Timeout`.
    pub(crate) deadline: Option<Instant>,
    /// Priority to send upstream, when propagation is on.
    pub(crate) propagate_priority: Option<Priority>,
    pub(crate) upstream: &'a str,
    /// The metric handles of the task's upstream and endpoint.
    pub(crate) metrics: &'a EndpointMetrics,
    /// When the task began executing: durations count from here.
    pub(crate) started: Instant,
    /// How the response is read when the task runs as an exchange.
    pub(crate) exchange: Option<ExchangeOptions>,
    /// Header fields an exchange sends as they are, before the task's own.
    pub(crate) raw_headers: Option<&'a HeaderMap>,
}

/// Headers never sent to an origin other than the request's own, whoever
/// set them (the request, an interceptor or a redirect).
const CROSS_ORIGIN_STRIPPED: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// The span of attempt `number` of `task`; see the module's overview.
/// Nothing is computed when no subscriber wants it.
pub(crate) fn attempt_span(task: &Task, number: u32, hedged: bool) -> tracing::Span {
    let url = task.request.url();
    tracing::debug_span!(
        "attempt",
        attempt = number,
        hedged,
        "http.request.method" = task.request.method().as_str(),
        "url.full" = url.as_str(),
        "server.address" = url.host_str().unwrap_or_default(),
        "server.port" = url.port_or_known_default(),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    )
}

/// Records how an attempt ended on its span: the status of a response, the
/// class of an error.
pub(crate) fn record_attempt_end(span: &tracing::Span, result: Result<&Response, &TaskError>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(response) => {
            span.record("http.response.status_code", response.status);
        }
        Err(TaskError::Request(e)) => {
            span.record("error.type", e.class_name.as_str());
        }
        Err(TaskError::Redirect(e)) => {
            span.record("error.type", e.kind.class_name());
        }
        Err(TaskError::Http(e)) => {
            span.record("http.response.status_code", e.response.status);
        }
    }
}

/// One send of a hop: its number, whether it is the replay, and the
/// attempt's times.
struct HopSend {
    /// The redirect hop; the first request is hop 1.
    number: u32,
    replay: bool,
    attempt_started: Instant,
    attempt_deadline: Instant,
}

/// One hop of an attempt: what is sent next.
struct Hop<'a> {
    method: Method,
    /// The URL as the task knows it (no secret values, no credentials).
    url: Url,
    /// Header fields of an exchange given as they are: sent before
    /// `headers`, with the same fields dropped on a redirect.
    raw: Option<Cow<'a, HeaderMap>>,
    headers: Headers,
    body: Option<Bytes>,
    /// Whether this hop goes to another origin than the request's URL (once
    /// a redirect left the origin, every later hop counts as crossed).
    cross_origin: bool,
    /// Secret query parameters go to the first URL only.
    secret_params: bool,
}

impl Engine {
    /// Makes one attempt of a task, following redirects, and replaying a
    /// send once when a response hook asks for it.
    pub(crate) async fn run_attempt(&self, task: &Task, plan: &AttemptPlan<'_>) -> AttemptResult {
        let request = &task.request;
        let attempt_started = Instant::now();
        let attempt_deadline = saturating_after(attempt_started, plan.timeout);
        let max_redirects = request.max_redirects().unwrap_or(self.config.max_redirects);

        let mut hop = Hop {
            method: request.method(),
            url: request.url().clone(),
            raw: plan.raw_headers.map(Cow::Borrowed),
            headers: request.headers().clone(),
            body: request.body().cloned(),
            cross_origin: false,
            secret_params: true,
        };
        let mut redirects: Vec<String> = Vec::new();
        let mut hop_number = 1u32;
        let mut sent = false;
        // A response hook may have the request sent again once per attempt.
        let mut replay = false;

        loop {
            let hop_id: Cow<'_, str> = if hop_number == 1 {
                Cow::Borrowed(&task.id)
            } else {
                Cow::Owned(format!("{}/{hop_number}", task.id))
            };
            let now = Instant::now();
            if now >= attempt_deadline {
                return self.hop_error(
                    task,
                    &hop,
                    plan.started,
                    ErrorType::Timeout,
                    "Timeout",
                    format!("request timed out after {:.3}s", plan.timeout.as_secs_f64()),
                    false,
                    sent,
                );
            }
            let send = HopSend {
                number: hop_number,
                replay,
                attempt_started,
                attempt_deadline,
            };
            let prepared =
                tokio::time::timeout_at(attempt_deadline, self.prepare(task, &hop, &send, plan))
                    .await;
            let (mut outgoing, sent_request) = match prepared {
                Ok(Ok(prepared)) => prepared,
                Err(_) => {
                    return self.hop_error(
                        task,
                        &hop,
                        plan.started,
                        ErrorType::Timeout,
                        "Timeout",
                        format!(
                            "request timed out after {:.3}s while its secrets, interceptors or preprocessors ran; it was not sent",
                            plan.timeout.as_secs_f64()
                        ),
                        false,
                        sent,
                    )
                }
                Ok(Err((class, message))) => {
                    return self.hop_error(
                        task,
                        &hop,
                        plan.started,
                        ErrorType::Unknown,
                        class,
                        message,
                        true,
                        sent,
                    )
                }
            };
            // The transport gets what the attempt has left after the hooks.
            outgoing.timeout = Some(attempt_deadline.saturating_duration_since(Instant::now()));
            let url_str = hop.url.as_str();
            self.notify(|o| {
                o.on_request_start(&RequestStart {
                    hop_id: &hop_id,
                    method: hop.method,
                    url: url_str,
                })
            });
            let sent_at = Instant::now();
            let sending = match plan.exchange {
                None => self.client.send(outgoing).await.map(|raw| (raw, None)),
                Some(options) => {
                    self.send_exchange(outgoing, options, attempt_deadline)
                        .await
                }
            };
            let (raw, stream) = match sending {
                Ok(sent) => sent,
                Err(e) => {
                    plan.metrics.record_error(
                        hop.method.as_str(),
                        e.kind().as_str(),
                        sent_at.elapsed(),
                    );
                    return self.hop_error(
                        task,
                        &hop,
                        plan.started,
                        e.kind(),
                        e.class_name(),
                        e.to_string(),
                        false,
                        sent || e.request_sent(),
                    );
                }
            };
            sent = true;
            let elapsed = sent_at.elapsed();
            plan.metrics
                .record_response(hop.method.as_str(), raw.status, elapsed);
            self.notify(|o| {
                o.on_request_end(&RequestEnd {
                    hop_id: &hop_id,
                    method: hop.method,
                    url: url_str,
                    status: raw.status,
                    duration: elapsed,
                })
            });
            let mut parts = ResponseParts {
                status: raw.status,
                headers: raw.headers,
                body: raw.body,
                duration: elapsed,
            };
            if let Some(sent_request) = &sent_request {
                let ctx = InterceptContext::new(&task.id, plan.number, plan.upstream)
                    .with_hop(hop_number, hop.cross_origin)
                    .with_replay(replay)
                    .with_request(sent_request)
                    .with_started(plan.started, attempt_started);
                let hooks = self.interceptors.run_response(&mut parts, &ctx);
                let action = match tokio::time::timeout_at(attempt_deadline, hooks).await {
                    Ok(action) => action,
                    Err(_) => {
                        return self.hop_error(
                            task,
                            &hop,
                            plan.started,
                            ErrorType::Timeout,
                            "Timeout",
                            format!(
                                "request timed out after {:.3}s while response interceptors ran",
                                plan.timeout.as_secs_f64()
                            ),
                            false,
                            sent,
                        )
                    }
                };
                if action == ResponseAction::Replay && !replay {
                    // Within the attempt: the retry policy and the breaker
                    // see only the replay's outcome.
                    replay = true;
                    continue;
                }
            }

            // Redirects.
            if matches!(parts.status, 301 | 302 | 303 | 307 | 308) && max_redirects > 0 {
                if let Some(location) = parts
                    .headers
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                {
                    let next = match hop.url.join(location) {
                        Ok(next) if matches!(next.scheme(), "http" | "https") => Ok(next),
                        Ok(next) => Err(format!(
                            "redirect to an unsupported scheme {:?}",
                            next.scheme()
                        )),
                        Err(e) => Err(format!("redirect to an invalid location: {e}")),
                    };
                    let mut next = match next {
                        Ok(next) => next,
                        Err(message) => {
                            return self.hop_error(
                                task,
                                &hop,
                                plan.started,
                                ErrorType::Unknown,
                                "InvalidRedirectLocation",
                                message,
                                false,
                                sent,
                            )
                        }
                    };
                    // Credentials in a Location are neither sent nor written out.
                    let _ = next.set_username("");
                    let _ = next.set_password(None);
                    let too_many = redirects.len() >= max_redirects as usize;
                    let next_str = next.as_str();
                    let recursive =
                        next_str == hop.url.as_str() || redirects.iter().any(|u| u == next_str);
                    if too_many || recursive {
                        let mut chain = redirects;
                        chain.push(hop.url.to_string());
                        return AttemptResult {
                            result: Err(TaskError::Redirect(RedirectError {
                                kind: if too_many {
                                    RedirectErrorKind::TooManyRedirects
                                } else {
                                    RedirectErrorKind::RecursiveRedirect
                                },
                                url: next.to_string(),
                                method: hop.method,
                                duration: plan.started.elapsed(),
                                request_id: task.id.clone(),
                                redirects: chain,
                                callback_args: task.callback_args.clone(),
                            })),
                            headers: None,
                            refused: false,
                            sent,
                            stream: None,
                            permit: None,
                        };
                    }
                    redirects.push(hop.url.to_string());
                    hop = redirect_hop(hop, request.url(), parts.status, next);
                    hop_number += 1;
                    continue;
                }
            }

            let response = Response {
                status: parts.status,
                // An exchange hands on the raw head: no wire copy of it.
                headers: if plan.exchange.is_some() {
                    Headers::new()
                } else {
                    wire_headers(&parts.headers)
                },
                body: if parts.body.is_empty() {
                    None
                } else {
                    Some(parts.body)
                },
                duration: plan.started.elapsed(),
                request_id: task.id.clone(),
                url: hop.url.into(),
                method: hop.method,
                callback_args: task.callback_args.clone(),
                redirects,
                attempts: Vec::new(),
            };
            return AttemptResult {
                result: Ok(response),
                headers: Some(parts.headers),
                refused: false,
                sent,
                stream,
                permit: None,
            };
        }
    }

    /// Resolves secrets, builds the outgoing request, runs interceptors,
    /// compresses the body and runs preprocessors, in that order, so a
    /// signing preprocessor signs exactly what is sent. With interceptors,
    /// also what their response hooks see of the request.
    async fn prepare(
        &self,
        task: &Task,
        hop: &Hop<'_>,
        send: &HopSend,
        plan: &AttemptPlan<'_>,
    ) -> Result<(OutgoingRequest, Option<SentRequest>), (&'static str, String)> {
        let mut url = hop.url.clone();
        if hop.secret_params && !task.request.secret_params().is_empty() {
            let mut values = Vec::with_capacity(task.request.secret_params().len());
            let host = url.host_str().unwrap_or_default().to_owned();
            for (name, secret) in task.request.secret_params() {
                let value = self
                    .secrets
                    .resolve_for_host(&secret.name, &host)
                    .await
                    .map_err(|e| ("SecretError", e.to_string()))?;
                values.push((name, value));
            }
            url.query_pairs_mut().extend_pairs(values);
        }
        let mut headers = match &hop.raw {
            Some(raw) => HeaderMap::clone(raw),
            None => HeaderMap::with_capacity(hop.headers.len() + 4),
        };
        for (name, value) in hop.headers.iter() {
            let header_name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ("InvalidHeader", format!("invalid header name {name:?}")))?;
            let value = match value {
                HeaderValue::Value(v) => HttpHeaderValue::from_str(v),
                HeaderValue::Secret(secret) => {
                    let v = self
                        .secrets
                        .resolve_for_host(&secret.name, hop.url.host_str().unwrap_or_default())
                        .await
                        .map_err(|e| ("SecretError", e.to_string()))?;
                    let mut v = HttpHeaderValue::from_str(&v);
                    if let Ok(v) = &mut v {
                        v.set_sensitive(true);
                    }
                    v
                }
            }
            .map_err(|_| ("InvalidHeader", format!("invalid value for header {name}")))?;
            headers.append(header_name, value);
        }
        // Credentials of the URL go to its own origin only, as basic auth
        // (the header lookup only for the rare request that has them).
        if let Some(credentials) = task.request.url_credentials() {
            if !hop.cross_origin && !headers.contains_key(header::AUTHORIZATION) {
                headers.insert(header::AUTHORIZATION, basic_auth(credentials)?);
            }
        }
        let options = task.request.request_options();
        if let Some(key) = &options.idempotency_key {
            if !headers.contains_key("idempotency-key") {
                let value = HttpHeaderValue::from_str(key)
                    .map_err(|_| ("InvalidHeader", "invalid idempotency key".to_owned()))?;
                headers.insert(HeaderName::from_static("idempotency-key"), value);
            }
        }
        if let Some(priority) = plan.propagate_priority {
            // The upstream gets what this attempt has left: the attempt's own
            // share of the deadline, not the whole task's.
            let now = Instant::now();
            let remaining = send.attempt_deadline.saturating_duration_since(now);
            let remaining = plan
                .deadline
                .map(|d| d.saturating_duration_since(now).min(remaining));
            for (name, value) in propagation_headers(remaining, priority) {
                headers.insert(name, value);
            }
        }
        let method = http_method(hop.method);
        let body = hop.body.clone().unwrap_or_default();
        let mut prepared = PreparedRequest::new(method, url, headers, body);
        if !self.interceptors.is_empty() {
            let ctx = InterceptContext::new(&task.id, plan.number, plan.upstream)
                .with_hop(send.number, hop.cross_origin)
                .with_replay(send.replay)
                .with_started(plan.started, send.attempt_started);
            self.interceptors
                .run_request(&mut prepared, &ctx)
                .await
                .map_err(|e| ("InterceptorError", e.to_string()))?;
        }
        if hop.cross_origin {
            // After the interceptors: whatever they added, credentials never
            // follow a redirect to another origin.
            strip_credentials(prepared.headers_mut());
        }
        if self.config.client.request_compression() {
            prepared.compress_body(self.config.client.request_compression_min_size());
        }
        let names = task.request.preprocessors();
        if !hop.cross_origin && !names.is_empty() {
            self.preprocessors
                .run(names, &mut prepared)
                .await
                .map_err(|e| ("PreprocessError", e.to_string()))?;
        }
        let (method, url, headers, body, extensions) = prepared.into_parts();
        let sent = self.interceptors.wants_request().then(|| {
            let secret_params: Vec<&str> = if hop.secret_params {
                task.request
                    .secret_params()
                    .keys()
                    .map(String::as_str)
                    .collect()
            } else {
                Vec::new()
            };
            SentRequest::redacted(&method, &url, &headers, extensions, &secret_params)
        });
        let outgoing = OutgoingRequest {
            method,
            url,
            headers,
            body,
            // Set again when it is sent, after the hooks.
            timeout: None,
            stall_timeout: None,
        };
        Ok((outgoing, sent))
    }

    /// An attempt that ended without a response at `hop`.
    #[allow(clippy::too_many_arguments)]
    fn hop_error(
        &self,
        task: &Task,
        hop: &Hop<'_>,
        started: Instant,
        error_type: ErrorType,
        class_name: &str,
        message: String,
        refused: bool,
        sent: bool,
    ) -> AttemptResult {
        AttemptResult {
            result: Err(self.request_error(
                task, &hop.url, hop.method, started, error_type, class_name, message,
            )),
            headers: None,
            refused,
            sent,
            stream: None,
            permit: None,
        }
    }

    /// Sends an exchange's request: the head back with the body read in
    /// full (within the attempt) or left unread as a stream.
    async fn send_exchange(
        &self,
        outgoing: OutgoingRequest,
        options: ExchangeOptions,
        attempt_deadline: Instant,
    ) -> Result<(RawResponse, Option<ResponseBody>), TransportError> {
        let mut request = StreamingRequest::from(outgoing);
        request.max_response_size = options.max_body;
        request.stall_timeout = options.idle_timeout.or(request.stall_timeout);
        let timeout = request.timeout;
        let response = self.client.send_streaming(request).await?;
        let mut raw = RawResponse {
            status: response.status.as_u16(),
            headers: response.headers,
            body: Bytes::new(),
            version: response.version,
        };
        let event_stream = || {
            raw.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
        };
        let stream = match options.mode {
            BodyMode::Streaming => true,
            BodyMode::Auto => event_stream(),
            BodyMode::Buffered => false,
        };
        match stream {
            true => Ok((raw, Some(response.body))),
            false => {
                match tokio::time::timeout_at(attempt_deadline, response.body.bytes()).await {
                    Ok(body) => raw.body = body?,
                    Err(_) => {
                        return Err(TransportError::new(
                            ErrorType::Timeout,
                            "Timeout",
                            format!(
                                "request timed out after {:.3}s while reading the response body",
                                timeout.unwrap_or_default().as_secs_f64()
                            ),
                        )
                        .sent(true))
                    }
                }
                Ok((raw, None))
            }
        }
    }
}

/// The next hop after a redirect response.
fn redirect_hop<'a>(mut hop: Hop<'a>, origin: &Url, status: u16, next: Url) -> Hop<'a> {
    let cross_origin = hop.cross_origin
        || next.scheme() != origin.scheme()
        || next.host_str() != origin.host_str()
        || next.port_or_known_default() != origin.port_or_known_default();
    if matches!(status, 301..=303) {
        if hop.method != Method::Head {
            hop.method = Method::Get;
        }
        hop.body = None;
        hop.headers.remove("content-type");
        hop.headers.remove("content-length");
        hop.headers.remove("content-encoding");
        if let Some(raw) = &mut hop.raw {
            let raw = raw.to_mut();
            for name in [
                header::CONTENT_TYPE,
                header::CONTENT_LENGTH,
                header::CONTENT_ENCODING,
            ] {
                raw.remove(name);
            }
        }
    }
    if cross_origin {
        for name in &CROSS_ORIGIN_STRIPPED {
            hop.headers.remove(name.as_str());
        }
        // A secret never follows a redirect to another origin.
        let secret_names: Vec<String> = hop
            .headers
            .iter()
            .filter(|(_, v)| matches!(v, HeaderValue::Secret(_)))
            .map(|(k, _)| k.to_owned())
            .collect();
        for name in secret_names {
            hop.headers.remove(&name);
        }
        if let Some(raw) = &mut hop.raw {
            strip_credentials(raw.to_mut());
        }
    }
    hop.cross_origin = cross_origin;
    hop.secret_params = false;
    hop.url = next;
    hop
}

/// Removes what never goes to another origin: the credential fields and
/// every value marked sensitive (a resolved secret).
fn strip_credentials(headers: &mut HeaderMap) {
    for name in &CROSS_ORIGIN_STRIPPED {
        headers.remove(name);
    }
    let sensitive: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, v)| v.is_sensitive())
        .map(|(k, _)| k.clone())
        .collect();
    for name in sensitive {
        headers.remove(name);
    }
}

/// `Basic base64(user:password)`, marked sensitive.
fn basic_auth(
    credentials: &patient_wire::UrlCredentials,
) -> Result<HttpHeaderValue, (&'static str, String)> {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        credentials.username(),
        credentials.password().unwrap_or_default()
    ));
    let mut value = HttpHeaderValue::from_str(&format!("Basic {token}"))
        .map_err(|_| ("InvalidHeader", "invalid URL credentials".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn http_method(method: Method) -> http::Method {
    match method {
        Method::Get => http::Method::GET,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Patch => http::Method::PATCH,
        Method::Delete => http::Method::DELETE,
        Method::Head => http::Method::HEAD,
        Method::Options => http::Method::OPTIONS,
    }
}

/// Response headers in wire form: lower-cased names, repeated headers joined
/// with `, `. A value that is not UTF-8 is read as Latin-1, so no byte is lost.
pub(crate) fn wire_headers(map: &HeaderMap) -> Headers {
    fn push_value(joined: &mut String, value: &HttpHeaderValue) {
        match std::str::from_utf8(value.as_bytes()) {
            Ok(s) => joined.push_str(s),
            Err(_) => joined.extend(value.as_bytes().iter().map(|&b| b as char)),
        }
    }
    let mut headers = Headers::new();
    // `iter` yields every value, those of one name one after the other: no
    // second lookup per name.
    let mut current: Option<(&HeaderName, String)> = None;
    for (name, value) in map.iter() {
        match &mut current {
            Some((last, joined)) if *last == name => {
                joined.push_str(", ");
                push_value(joined, value);
            }
            _ => {
                if let Some((last, joined)) = current.take() {
                    headers.insert(last.as_str(), joined);
                }
                let mut joined = String::with_capacity(value.len());
                push_value(&mut joined, value);
                current = Some((name, joined));
            }
        }
    }
    if let Some((last, joined)) = current {
        headers.insert(last.as_str(), joined);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_headers_join_repeated_values_and_keep_latin1_bytes() {
        let mut map = HeaderMap::new();
        map.append("x-a", HttpHeaderValue::from_static("1"));
        map.append("content-type", HttpHeaderValue::from_static("text/plain"));
        map.append("x-a", HttpHeaderValue::from_static("2"));
        map.append("x-b", HttpHeaderValue::from_bytes(b"caf\xe9").unwrap());
        let headers = wire_headers(&map);
        assert_eq!(headers.get_str("x-a"), Some("1, 2"));
        assert_eq!(headers.get_str("content-type"), Some("text/plain"));
        assert_eq!(headers.get_str("x-b"), Some("caf\u{e9}"));
        assert_eq!(headers.len(), 3);
    }
}
