//! The gateway: proxy routes in the daemon's listener (and a library for
//! Rust embedders) that put the engine's resilience in front of upstream
//! APIs, OpenAI-compatible LLM providers first.
//!
//! A request whose path starts with a route's `path_prefix` (and whose
//! host and headers match, when the route asks) is forwarded to one of the
//! route's upstreams; every other request falls through to the API. The
//! request goes through the same engine as the daemon's tasks
//! ([`AwaitableClient::exchange`]): retries for idempotent methods (POST
//! only with an `Idempotency-Key`), `Retry-After`, a 429 cooling the
//! upstream down for every request, the breaker, rate and concurrency
//! limits, deadlines (`X-Request-Timeout` from the client is honoured and
//! passed on). When an upstream cannot be reached or its breaker is open,
//! the next one is tried (failover), before any byte reaches the client.
//!
//! A request takes the streaming path when its JSON body has
//! `"stream": true` or it accepts `text/event-stream` (or the route says
//! so): the response head is sent on as soon as it comes, and the body
//! frame by frame as it arrives, never held back. An event stream is cut
//! into whole events for the hooks and the timers; a stream cut before its
//! end reaches the client as an error event. See [`body`] for the timers,
//! caps and what a client leaving does.
//!
//! A route whose `auth` is `api_token` (the default for a route with a
//! `credential`) first checks that the caller presents the daemon's API
//! token ([`crate::token`]), then removes it: the route's credential goes
//! upstream in its place, and no hook sees the token.
//!
//! Each proxied request runs in a `tracing` span `proxied_request` (level
//! DEBUG, like the engine's `attempt`: the daemon's default `info` filter
//! leaves the gateway's hot path without a span to format) with the fields `route`, `request.id` (the id sent upstream as
//! `X-Request-Id` when the client sent none), `http.request.method`,
//! `url.path` (as the client sent it), `upstream` (the origin that
//! answered), and at its end `http.response.status_code` and, for an
//! answer the gateway gave itself or a stream it cut, `error.type`. The
//! engine's `attempt` spans are its children. A streamed response keeps
//! the span open until its body ends.
//!
//! Errors the gateway answers itself have the shape LLM clients parse:
//! `{"error": {"message": "...", "type": "payload_too_large"}}`.

mod balance;
pub mod body;
pub mod headers;
pub mod hooks;
pub mod metrics;
pub mod path;
pub mod settings;
pub mod sse;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use patient_http::{
    breaker::BreakerPolicy,
    exchange::{BodyMode, ExchangeBody, ExchangeOptions},
    limit::LimitConfig,
    resilience::ResilienceConfig,
    retry::RetryPolicy,
    AwaitableClient, Config, DeadlineMode, ErrorType, LimitWait, Method, Request as WireRequest,
    RequestOptions, Secrets, Task, TaskError,
};
use serde_json::json;
use tracing::Instrument;

use self::{
    balance::Balancer,
    body::{ProxyBody, StreamSetup},
    headers::CompiledRules,
    hooks::{NoHooks, ProxyContext, ProxyHooks, RequestHead, RequestSummary, UpstreamRequest},
    metrics::{GatewayMetrics, RouteMetrics},
    settings::{secs, OnDisconnect, RouteAuth, RouteSettings, StreamEnd, StreamMode},
};
use crate::token::{self, ApiToken, Places};

/// The error types of answers the gateway gives itself.
pub mod error_type {
    /// The request cannot be forwarded as it is: a path that could leave
    /// the route's base path, a method the gateway does not forward (400,
    /// 405).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The caller did not present the daemon's API token on a route whose
    /// `auth` is `api_token` (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The request body is over the route's cap (413).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// The upstream could not be reached, failed, or sent a head over
    /// 64 KiB (502).
    pub const BAD_GATEWAY: &str = "bad_gateway";
    /// The upstream's body passed the route's `max_response_body` (502; a
    /// stream cut there ends with an error event of this type).
    pub const UPSTREAM_BODY_TOO_LARGE: &str = "upstream_body_too_large";
    /// The upstream did not answer in time (504).
    pub const GATEWAY_TIMEOUT: &str = "gateway_timeout";
    /// Every upstream's breaker is open or at its concurrency limit (503).
    pub const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
    /// A 429 cool-down or the rate limit holds the upstream back (429).
    pub const RATE_LIMITED: &str = "rate_limited";
}

/// An answer in the OpenAI error shape.
fn error_response(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind}});
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A route ready to serve: its settings parsed once.
pub(crate) struct Route {
    pub(crate) settings: RouteSettings,
    match_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) upstreams: Vec<Upstream>,
    balancer: Balancer,
    request_rules: CompiledRules,
    response_rules: CompiledRules,
    credential: Option<(HeaderName, HeaderValue)>,
    auth: RouteAuth,
    max_retry_after: Duration,
    timeout: Duration,
    idle_timeout: Duration,
    first_event_timeout: Duration,
    drain_timeout: Duration,
    pub(crate) metrics: RouteMetrics,
}

/// One upstream of a route.
pub(crate) struct Upstream {
    /// The base URL without a trailing `/`.
    base: String,
    /// The origin, for metrics and the hooks.
    pub(crate) origin: String,
    /// The engine's key for its breaker, limits and cool-down.
    key: String,
    /// Requests in flight, for least-in-flight balancing.
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
}

/// The routes and the engine they run on; replaced whole on reload.
struct Table {
    routes: Vec<Arc<Route>>,
    client: AwaitableClient,
}

struct Shared {
    table: RwLock<Arc<Table>>,
    hooks: Arc<dyn ProxyHooks>,
    metrics: GatewayMetrics,
    secrets: BTreeMap<String, String>,
    api_token: Option<ApiToken>,
    /// Set when the daemon stops: every stream still open ends with an
    /// error event.
    closing: tokio::sync::watch::Sender<bool>,
}

/// The gateway: its routes, the engine they share, its hooks and metrics.
/// Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Why routes could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting `{setting}`: {message}")]
pub struct GatewayError {
    /// The setting at fault (`routes[0].upstreams`).
    pub setting: String,
    /// What is wrong with it.
    pub message: String,
}

/// Sets up a [`Gateway`]: its routes, and what they draw on.
#[must_use]
pub struct GatewayBuilder {
    routes: Vec<RouteSettings>,
    secrets: BTreeMap<String, String>,
    hooks: Arc<dyn ProxyHooks>,
    api_token: Option<ApiToken>,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("routes", &self.routes)
            .field("api_token", &self.api_token)
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// The secrets (name → value) the routes' credentials name; default
    /// none.
    pub fn secrets(mut self, secrets: BTreeMap<String, String>) -> Self {
        self.secrets = secrets;
        self
    }

    /// The hooks of an embedder; default [`NoHooks`].
    pub fn hooks(mut self, hooks: Arc<dyn ProxyHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// The API token that callers of a route whose `auth` is `api_token`
    /// present; default none, and then such a route is refused.
    pub fn api_token(mut self, token: Option<&str>) -> Self {
        self.api_token = token.map(ApiToken::new);
        self
    }

    /// The gateway, or what is wrong with its routes.
    pub fn build(self) -> Result<Gateway, GatewayError> {
        let metrics = GatewayMetrics::new();
        let table = build_table(
            &self.routes,
            &self.secrets,
            &metrics,
            self.api_token.is_some(),
        )?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                table: RwLock::new(Arc::new(table)),
                hooks: self.hooks,
                metrics,
                secrets: self.secrets,
                api_token: self.api_token,
                closing: tokio::sync::watch::Sender::new(false),
            }),
        })
    }
}

impl Gateway {
    /// A gateway over `routes`, with `secrets` (name → value) for the
    /// routes' credentials and `hooks` for embedders ([`hooks::NoHooks`]
    /// for none), and no API token (a route whose `auth` is `api_token` is
    /// refused; [`Gateway::builder`] sets one).
    pub fn new(
        routes: &[RouteSettings],
        secrets: BTreeMap<String, String>,
        hooks: Arc<dyn ProxyHooks>,
    ) -> Result<Gateway, GatewayError> {
        Gateway::builder(routes)
            .secrets(secrets)
            .hooks(hooks)
            .build()
    }

    /// A builder of a gateway over `routes`.
    pub fn builder(routes: &[RouteSettings]) -> GatewayBuilder {
        GatewayBuilder {
            routes: routes.to_vec(),
            secrets: BTreeMap::new(),
            hooks: Arc::new(NoHooks),
            api_token: None,
        }
    }

    /// Ends every stream still open with an error event (a cut-off body
    /// for a stream that is not an event stream), and every stream opened
    /// from now on at its first poll: what a stopping daemon does once its
    /// shutdown timeout has run out.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Replaces the routes (on SIGHUP): requests in flight finish on the
    /// routes they started with; connections are not dropped. The new
    /// routes are checked as at start (the API token stays the one the
    /// gateway was built with). On an error the routes stay as they were.
    pub fn reload(&self, routes: &[RouteSettings]) -> Result<(), GatewayError> {
        let table = build_table(
            routes,
            &self.shared.secrets,
            &self.shared.metrics,
            self.shared.api_token.is_some(),
        )?;
        let mut current = self.shared.table.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(table);
        Ok(())
    }

    /// The names of the routes, in matching order.
    pub fn route_names(&self) -> Vec<String> {
        self.table()
            .routes
            .iter()
            .map(|r| r.settings.name.clone())
            .collect()
    }

    /// The metrics.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.shared.metrics
    }

    /// The engine the routes run on (its health and metrics).
    pub fn client(&self) -> AwaitableClient {
        self.table().client.clone()
    }

    fn table(&self) -> Arc<Table> {
        Arc::clone(&self.shared.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Proxies `request` when a route takes it; `None` when none does
    /// (the request is handed back untouched for the API to serve).
    pub async fn handle(&self, request: Request) -> Result<Response, Request> {
        match self.route_for(&request) {
            Some((table, route)) => Ok(self.proxy(&table, route, request).await),
            None => Err(request),
        }
    }

    /// The routes in use and the one that takes `request`, if any does.
    fn route_for(&self, request: &Request) -> Option<(Arc<Table>, Arc<Route>)> {
        let table = self.table();
        let route = table.routes.iter().find(|r| r.matches(request)).cloned()?;
        Some((table, route))
    }

    /// Proxies `request` on `route` in its span `proxied_request` (see the
    /// module's overview); a streamed body holds the span until it ends.
    async fn proxy(&self, table: &Table, route: Arc<Route>, request: Request) -> Response {
        let id = request_id();
        let span = tracing::debug_span!(
            "proxied_request",
            route = route.settings.name.as_str(),
            "request.id" = id.as_str(),
            "http.request.method" = request.method().as_str(),
            "url.path" = request.uri().path(),
            upstream = tracing::field::Empty,
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        let response = self
            .forward(table, route, request, id, &span)
            .instrument(span.clone())
            .await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    }

    async fn forward(
        &self,
        table: &Table,
        route: Arc<Route>,
        request: Request,
        request_id: String,
        span: &tracing::Span,
    ) -> Response {
        let started = Instant::now();
        let hooks = &self.shared.hooks;
        let metrics = &self.shared.metrics;
        let name = route.settings.name.as_str();
        let mut ctx = ProxyContext {
            route: name.to_owned(),
            request_id,
            upstream: None,
            streaming: false,
            started,
            extensions: http::Extensions::new(),
        };
        let fail =
            |ctx: &mut ProxyContext, status: StatusCode, kind: &'static str, message: String| {
                span.record("error.type", kind);
                metrics.error(name, kind);
                route.metrics.request(None, status.as_u16());
                hooks.logging(
                    &RequestSummary {
                        status: status.as_u16(),
                        duration: started.elapsed(),
                        attempts: 0,
                        stream: None,
                        error: Some(kind),
                    },
                    ctx,
                );
                error_response(status, kind, message)
            };

        let client_addr = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let (mut parts, body) = request.into_parts();
        if route.auth == RouteAuth::ApiToken {
            // Before anything else: an anonymous caller gets nothing read,
            // nothing forwarded, and no hook sees the token.
            let admitted = match &self.shared.api_token {
                Some(token) => token.admits(&parts.headers, Places::AuthorizationOrApiKey),
                // Refused when the routes were built; never open by mistake.
                None => Err(token::TokenRefusal::Missing),
            };
            if let Err(refusal) = admitted {
                let mut response = fail(
                    &mut ctx,
                    StatusCode::UNAUTHORIZED,
                    error_type::UNAUTHORIZED,
                    format!(
                        "route {name:?} needs the daemon's API token as Authorization: Bearer TOKEN or x-api-key: TOKEN ({refusal})"
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            parts.headers.remove(header::AUTHORIZATION);
            parts.headers.remove(token::API_KEY);
        }
        if let Err(refusal) = path::check(parts.uri.path()) {
            return fail(
                &mut ctx,
                StatusCode::BAD_REQUEST,
                error_type::INVALID_REQUEST,
                format!("route {name:?} does not forward this path: {refusal}"),
            );
        }
        let Some(method) = wire_method(&parts.method) else {
            return fail(
                &mut ctx,
                StatusCode::METHOD_NOT_ALLOWED,
                error_type::INVALID_REQUEST,
                format!("the gateway does not forward {} requests", parts.method),
            );
        };
        let cap = usize::try_from(route.settings.max_request_body).unwrap_or(usize::MAX);
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if cap > 0 && declared.is_some_and(|n| n > cap as u64) {
            return fail(
                &mut ctx,
                StatusCode::PAYLOAD_TOO_LARGE,
                error_type::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body of {} bytes is over the {cap} bytes route {name:?} accepts (max_request_body)",
                    declared.unwrap_or_default()
                ),
            );
        }
        let body = match read_body(body, cap).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return fail(
                    &mut ctx,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    error_type::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over the {cap} bytes route {name:?} accepts (max_request_body)"
                    ),
                )
            }
            Err(BodyError::TimedOut(e)) => {
                let mut response = fail(
                    &mut ctx,
                    StatusCode::REQUEST_TIMEOUT,
                    error_type::INVALID_REQUEST,
                    format!("cannot read the request body: {e}"),
                );
                // The rest of the body will not be read.
                response
                    .extensions_mut()
                    .insert(crate::listener::CloseConnection);
                return response;
            }
            Err(BodyError::Read(e)) => {
                return fail(
                    &mut ctx,
                    StatusCode::BAD_REQUEST,
                    error_type::INVALID_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            }
        };
        route.metrics.bytes(false, body.len() as u64);

        let mut headers = parts.headers;
        let client_host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        headers::strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        if let Some(answer) = hooks
            .request_filter(
                RequestHead {
                    method: &parts.method,
                    uri: &parts.uri,
                    headers: &mut headers,
                    body: &body,
                },
                &mut ctx,
            )
            .await
        {
            let status = answer.status.as_u16();
            route.metrics.request(None, status);
            hooks.logging(
                &RequestSummary {
                    status,
                    duration: started.elapsed(),
                    attempts: 0,
                    stream: None,
                    error: None,
                },
                &mut ctx,
            );
            let mut response = Response::new(Body::from(answer.body));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            return response;
        }
        let streaming = match route.settings.stream {
            StreamMode::Always => true,
            StreamMode::Never => false,
            StreamMode::Auto => wants_stream(&headers, &body),
        };
        ctx.streaming = streaming;
        headers::add_forwarded(&mut headers, client_addr, client_host.as_deref());
        if let Some((header_name, value)) = &route.credential {
            headers.remove(header::AUTHORIZATION);
            headers.insert(header_name.clone(), value.clone());
        }
        headers::apply_rules(&mut headers, &route.request_rules);
        if !headers.contains_key("x-request-id") {
            if let Ok(id) = HeaderValue::from_str(&ctx.request_id) {
                headers.insert(HeaderName::from_static("x-request-id"), id);
            }
        }
        // The client's deadline, as the propagation headers give it.
        let deadline = headers
            .get("x-request-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(86_400.0)));
        let suffix = forwarded_path(&route, parts.uri.path(), parts.uri.query());

        let options = ExchangeOptions {
            // A request that did not ask for a stream still gets one when
            // the upstream answers with an event stream.
            mode: if streaming {
                BodyMode::Streaming
            } else {
                BodyMode::Auto
            },
            max_body: None,
            idle_timeout: Some(route.idle_timeout),
            // A cool-down or limit longer than a retry would wait for is
            // answered at once.
            limit_wait: LimitWait::UpTo(route.max_retry_after),
        }
        .max_body(usize::try_from(route.settings.max_response_body).unwrap_or(usize::MAX));

        let order = self.candidates(table, &route, &ctx);
        let mut attempts = 0u32;
        let mut last_error: Option<TaskError> = None;
        let mut exchange = None;
        for (tried, index) in order.iter().copied().enumerate() {
            let upstream = &route.upstreams[index];
            ctx.upstream = Some(upstream.origin.clone());
            if tried > 0 {
                route.metrics.failover();
            }
            let mut path = suffix.clone();
            let mut sent_headers = headers.clone();
            hooks
                .upstream_request_filter(
                    UpstreamRequest {
                        upstream: &upstream.origin,
                        path_and_query: &mut path,
                        headers: &mut sent_headers,
                    },
                    &mut ctx,
                )
                .await;
            let task = match wire_task(
                &route,
                upstream,
                method,
                &path,
                &body,
                deadline,
                &ctx.request_id,
            ) {
                Ok(task) => task,
                Err(message) => {
                    return fail(
                        &mut ctx,
                        StatusCode::BAD_REQUEST,
                        error_type::INVALID_REQUEST,
                        message,
                    )
                }
            };
            upstream
                .in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let result = table
                .client
                .exchange_with_headers(&task, &sent_headers, options)
                .await;
            match result {
                Ok(ex) => {
                    span.record("upstream", upstream.origin.as_str());
                    attempts += ex.attempts;
                    exchange = Some((index, ex));
                    break;
                }
                Err(error) => {
                    upstream
                        .in_flight
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    attempts += error_attempts(&error);
                    let next = fails_over(
                        &error,
                        method,
                        patient_http::exchange::has_idempotency_key(&sent_headers),
                    );
                    last_error = Some(error);
                    if !next {
                        break;
                    }
                }
            }
        }
        route.metrics.retries(u64::from(attempts.saturating_sub(1)));
        let Some((index, ex)) = exchange else {
            let (status, kind, message) = match &last_error {
                Some(error) => error_answer(error),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    error_type::UPSTREAM_UNAVAILABLE,
                    format!("route {name:?} has no upstream to try"),
                ),
            };
            let mut response = fail(&mut ctx, status, kind, message);
            if kind == error_type::RATE_LIMITED {
                let wait = retry_after(table, &route, &order);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(wait));
            }
            return response;
        };
        route.metrics.ttfb(started.elapsed());

        let mut status = StatusCode::from_u16(ex.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut response_headers = ex.headers;
        headers::strip_hop_by_hop(&mut response_headers);
        headers::apply_rules(&mut response_headers, &route.response_rules);
        let event_stream = is_event_stream(&response_headers);
        if event_stream {
            response_headers.insert(
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            );
        }
        hooks.response_filter(&mut status, &mut response_headers, &mut ctx);
        let body = match ex.body {
            ExchangeBody::Full(bytes) => {
                route.upstreams[index]
                    .in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                route.metrics.bytes(true, bytes.len() as u64);
                if let Some((prompt, completion)) = usage_of_body(&response_headers, &bytes) {
                    metrics.tokens(name, prompt, completion);
                }
                route.metrics.request(Some(index), status.as_u16());
                route.metrics.duration(started.elapsed());
                hooks.logging(
                    &RequestSummary {
                        status: status.as_u16(),
                        duration: started.elapsed(),
                        attempts,
                        stream: None,
                        error: None,
                    },
                    &mut ctx,
                );
                if method != Method::Head {
                    // Recomputed from the body (a HEAD keeps the upstream's).
                    response_headers.remove(header::CONTENT_LENGTH);
                }
                Body::from(bytes)
            }
            ExchangeBody::Stream(stream) => {
                response_headers.remove(header::CONTENT_LENGTH);
                Body::new(ProxyBody::new(StreamSetup {
                    upstream: stream,
                    event_stream,
                    route: Arc::clone(&route),
                    upstream_index: index,
                    hooks: Arc::clone(hooks),
                    ctx,
                    status: status.as_u16(),
                    attempts,
                    closing: self.shared.closing.subscribe(),
                    span: span.clone(),
                }))
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = response_headers;
        response
    }

    /// The upstreams to try, in order: the balancer's pick first (or the
    /// hook's), those whose breaker is open or that are cooling down
    /// last.
    fn candidates(&self, table: &Table, route: &Route, ctx: &ProxyContext) -> Vec<usize> {
        let mut order = route.balancer.order(&route.upstreams);
        let available = |i: &usize| table.client.upstream_available(&route.upstreams[*i].key);
        let (mut open, closed): (Vec<usize>, Vec<usize>) =
            order.drain(..).partition(|i| !available(i));
        let mut order = closed;
        if !order.is_empty() {
            let names: Vec<&str> = order
                .iter()
                .map(|i| route.upstreams[*i].origin.as_str())
                .collect();
            if let Some(pick) = self.shared.hooks.pick_upstream(&names, ctx) {
                if pick < order.len() {
                    let first = order.remove(pick);
                    order.insert(0, first);
                }
            }
        }
        order.append(&mut open);
        order
    }
}

impl Route {
    fn matches(&self, request: &Request) -> bool {
        if !request.uri().path().starts_with(&self.settings.path_prefix) {
            return false;
        }
        if let Some(host) = &self.settings.host {
            let given = request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| request.uri().host())
                .unwrap_or("");
            let given = given.rsplit_once(':').map_or(given, |(h, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    given
                }
            });
            if !given.eq_ignore_ascii_case(host) {
                return false;
            }
        }
        self.match_headers
            .iter()
            .all(|(name, value)| request.headers().get(name) == Some(value))
    }
}

/// Whole seconds until one of the upstreams `tried` may take a request
/// again, for the `Retry-After` of a `429 rate_limited`: the shortest 429
/// cool-down left, else the time the route's rate limit takes to free a
/// request; at least 1.
fn retry_after(table: &Table, route: &Route, tried: &[usize]) -> u64 {
    let cooling = tried
        .iter()
        .filter_map(|i| table.client.upstream_health(&route.upstreams[*i].key))
        .filter_map(|health| health.cooldown_remaining)
        .min();
    let wait = cooling
        .or_else(|| route.settings.rate_limit.map(|rate| secs(1.0 / rate)))
        .unwrap_or(Duration::from_secs(1));
    // Rounded up: a client that comes back after it finds room.
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.clamp(1, 86_400)
}

/// A new request id: 32 hex digits from the thread's fast generator (no
/// system call per request).
fn request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// The path and query sent upstream.
fn forwarded_path(route: &Route, path: &str, query: Option<&str>) -> String {
    let rest = if route.settings.strip_prefix {
        let rest = &path[route.settings.path_prefix.len()..];
        if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        }
    } else {
        path.to_owned()
    };
    match query {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    }
}

/// The task of one attempt at `upstream`; the client's header fields go
/// beside it, as they are.
fn wire_task(
    route: &Route,
    upstream: &Upstream,
    method: Method,
    path: &str,
    body: &Bytes,
    deadline: Option<Duration>,
    request_id: &str,
) -> Result<Task, String> {
    let mut url = String::with_capacity(upstream.base.len() + path.len());
    url.push_str(&upstream.base);
    url.push_str(path);
    let mut builder = WireRequest::builder(method, &url)
        .timeout(route.timeout)
        .max_redirects(0);
    if !body.is_empty() {
        builder = builder.body(body.clone());
    }
    let mut options = RequestOptions {
        upstream_key: Some(upstream.key.clone()),
        ..RequestOptions::default()
    };
    options.deadline = deadline;
    builder = builder.request_options(options);
    let request = builder
        .build_with_limits(&gateway_limits())
        .map_err(|e| format!("the request cannot be forwarded: {e}"))?;
    // Built whole: `Task::new` would make an id only to replace it.
    Ok(Task {
        id: request_id.to_owned(),
        request,
        callback: String::new(),
        callback_args: Default::default(),
        raise_error_responses: Some(false),
    })
}

/// The bounds of a forwarded request: the route's caps bound the body, so
/// the wire's own body bound is lifted.
fn gateway_limits() -> patient_http::WireLimits {
    let mut limits = patient_http::WireLimits::default();
    limits.max_body_size = usize::MAX;
    limits
}

fn wire_method(method: &http::Method) -> Option<Method> {
    Some(match *method {
        http::Method::GET => Method::Get,
        http::Method::POST => Method::Post,
        http::Method::PUT => Method::Put,
        http::Method::PATCH => Method::Patch,
        http::Method::DELETE => Method::Delete,
        http::Method::HEAD => Method::Head,
        http::Method::OPTIONS => Method::Options,
        _ => return None,
    })
}

enum BodyError {
    TooLarge,
    TimedOut(String),
    Read(String),
}

/// Reads a request body, failing past `cap` bytes (0: no cap).
async fn read_body(body: Body, cap: usize) -> Result<Bytes, BodyError> {
    let limit = if cap == 0 { usize::MAX } else { cap };
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) if crate::listener::is_body_timeout(&*e) => Err(BodyError::TimedOut(e.to_string())),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// Whether a request asks for a stream: `Accept: text/event-stream`, or
/// `"stream": true` at the top of a JSON body.
fn wants_stream(headers: &HeaderMap, body: &Bytes) -> bool {
    let accepts_events = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if accepts_events {
        return true;
    }
    if body.is_empty() || !memchr_stream(body) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        stream: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Flag>(body)
        .ok()
        .and_then(|f| f.stream)
        .is_some_and(|v| v == serde_json::Value::Bool(true))
}

/// Whether the bytes `"stream"` occur: most bodies are not parsed at all.
fn memchr_stream(body: &[u8]) -> bool {
    body.windows(8).any(|w| w == b"\"stream\"")
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// The `usage` of a JSON response body, OpenAI style.
fn usage_of_body(headers: &HeaderMap, body: &[u8]) -> Option<(u64, u64)> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !json || !body.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    let event = sse::SseEvent::new(Bytes::from([b"data: ".as_slice(), body, b"\n\n"].concat()));
    sse::facts(&event).usage
}

fn error_attempts(error: &TaskError) -> u32 {
    match error {
        TaskError::Request(e) if e.attempts.is_empty() => 1,
        TaskError::Request(e) => e.attempts.len() as u32,
        _ => 1,
    }
}

/// Whether a failed request goes on to the next upstream: when nothing
/// reached this one (refused by its breaker or limits, or no connection),
/// or when it may be sent twice.
fn fails_over(error: &TaskError, method: Method, idempotency_key: bool) -> bool {
    let TaskError::Request(e) = error else {
        return false;
    };
    let retryable = method.is_idempotent() || idempotency_key;
    match e.error_type {
        ErrorType::Connection | ErrorType::Ssl => {
            matches!(
                e.class_name.as_str(),
                "CircuitOpen" | "AtCapacity" | "CoolingDown" | "RateLimited"
            ) || retryable
                || matches!(
                    e.class_name.as_str(),
                    "ConnectionRefused" | "ConnectionFailed" | "DnsError" | "ConnectTimeout"
                )
        }
        ErrorType::Timeout => retryable,
        _ => false,
    }
}

/// The status, type and message the client gets for a failed request.
fn error_answer(error: &TaskError) -> (StatusCode, &'static str, String) {
    let TaskError::Request(e) = error else {
        return (
            StatusCode::BAD_GATEWAY,
            error_type::BAD_GATEWAY,
            error.to_string(),
        );
    };
    let message = format!("{}: {}", e.class_name, e.message);
    match (e.error_type, e.class_name.as_str()) {
        (_, "CircuitOpen" | "AtCapacity") => (
            StatusCode::SERVICE_UNAVAILABLE,
            error_type::UPSTREAM_UNAVAILABLE,
            message,
        ),
        (_, "CoolingDown" | "RateLimited") => (
            StatusCode::TOO_MANY_REQUESTS,
            error_type::RATE_LIMITED,
            message,
        ),
        (ErrorType::Timeout, _) => (
            StatusCode::GATEWAY_TIMEOUT,
            error_type::GATEWAY_TIMEOUT,
            message,
        ),
        (ErrorType::ResponseTooLarge, class)
            if class != patient_http::client::RESPONSE_HEAD_TOO_LARGE =>
        {
            (
                StatusCode::BAD_GATEWAY,
                error_type::UPSTREAM_BODY_TOO_LARGE,
                message,
            )
        }
        _ => (StatusCode::BAD_GATEWAY, error_type::BAD_GATEWAY, message),
    }
}

/// Builds the routes and the engine they share.
fn build_table(
    routes: &[RouteSettings],
    secrets: &BTreeMap<String, String>,
    metrics: &GatewayMetrics,
    api_token: bool,
) -> Result<Table, GatewayError> {
    settings::check_routes(routes, &|name| secrets.contains_key(name), api_token)
        .map_err(|(setting, message)| GatewayError { setting, message })?;
    let invalid = |setting: String, message: String| GatewayError { setting, message };
    let mut resilience = ResilienceConfig::builder();
    let mut built = Vec::with_capacity(routes.len());
    for (i, s) in routes.iter().enumerate() {
        let retry = RetryPolicy::builder()
            .max_attempts(s.max_attempts)
            .base_delay(secs(s.retry_base_delay))
            .factor(2.0)
            .max_delay(secs(s.retry_base_delay * 10.0))
            .max_retry_after(secs(s.max_retry_after))
            .build()
            .map_err(|e| invalid(format!("routes[{i}].max_attempts"), e.to_string()))?;
        let breaker = if s.breaker_failures == 0 {
            None
        } else {
            Some(
                BreakerPolicy::builder()
                    .consecutive_failures(Some(s.breaker_failures))
                    .break_duration(secs(s.breaker_duration))
                    .build()
                    .map_err(|e| invalid(format!("routes[{i}].breaker_failures"), e.to_string()))?,
            )
        };
        let mut limits = LimitConfig::builder();
        if let Some(rate) = s.rate_limit {
            limits = limits.rate(rate, s.burst);
        }
        if let Some(n) = s.max_concurrency {
            limits = limits.max_in_flight(usize::try_from(n).unwrap_or(usize::MAX));
        }
        let limits = limits
            .build()
            .map_err(|e| invalid(format!("routes[{i}].rate_limit"), e.to_string()))?;
        let mut upstreams = Vec::with_capacity(s.upstreams.len());
        for u in &s.upstreams {
            let url = url::Url::parse(u.url())
                .map_err(|e| invalid(format!("routes[{i}].upstreams"), e.to_string()))?;
            let origin = patient_http::resilience::upstream_key(&url);
            let key = format!("{}@{origin}", s.name);
            let (retry, breaker, limits) = (retry.clone(), breaker.clone(), limits);
            resilience = resilience.upstream(key.clone(), move |p| {
                p.retry(Some(retry))
                    .breaker(breaker)
                    .limits(limits)
                    .deadline_mode(DeadlineMode::PassThrough)
            });
            upstreams.push(Upstream {
                base: u.url().trim_end_matches('/').to_owned(),
                origin,
                key,
                in_flight: std::sync::atomic::AtomicUsize::new(0),
            });
        }
        let credential = match &s.credential {
            None => None,
            Some(secret) => {
                let name = HeaderName::from_bytes(s.credential_header.as_bytes())
                    .unwrap_or(header::AUTHORIZATION);
                let value = secrets.get(secret).map(String::as_str).unwrap_or_default();
                let text = if name == header::AUTHORIZATION {
                    format!("Bearer {value}")
                } else {
                    value.to_owned()
                };
                let mut value = HeaderValue::from_str(&text).map_err(|_| {
                    invalid(
                        format!("routes[{i}].credential"),
                        format!("the secret {secret:?} is not a valid header value"),
                    )
                })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        let weights: Vec<u32> = s.upstreams.iter().map(|u| u.weight()).collect();
        let origins: Vec<String> = upstreams.iter().map(|u| u.origin.clone()).collect();
        built.push(Arc::new(Route {
            match_headers: s
                .match_headers
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            upstreams,
            balancer: Balancer::new(s.balance, &weights),
            request_rules: CompiledRules::new(&s.request_headers),
            response_rules: CompiledRules::new(&s.response_headers),
            credential,
            auth: s.auth(),
            max_retry_after: secs(s.max_retry_after),
            timeout: secs(s.timeout),
            idle_timeout: secs(s.idle_timeout),
            first_event_timeout: secs(s.first_event_timeout.unwrap_or(s.timeout)),
            drain_timeout: secs(s.drain_timeout),
            metrics: metrics.route_handles(&s.name, &origins),
            settings: s.clone(),
        }));
    }
    let resilience = resilience
        .max_upstreams(usize::MAX)
        .build()
        .map_err(|e| invalid("routes".into(), e.to_string()))?;
    let config = Config::builder()
        .client_with(|c| {
            // A proxy passes bodies through as they are: no decoding, no
            // compressing, no redirects followed.
            c.decompress(false)
                .request_compression(false)
                .pool_max_idle_per_host(1024)
        })
        .max_redirects(0)
        .build()
        .map_err(|e| invalid("routes".into(), e.to_string()))?;
    let mut engine_secrets = Secrets::new();
    for (name, value) in secrets {
        engine_secrets.insert(name.clone(), value.clone());
    }
    let client = AwaitableClient::builder()
        .config(config)
        .resilience(resilience)
        .secrets(engine_secrets)
        .metrics(patient_http::metrics::Metrics::with_prefix(
            "patient_gateway_engine",
        ))
        .build_awaitable()
        .map_err(|e| invalid("routes".into(), e.to_string()))?;
    Ok(Table {
        routes: built,
        client,
    })
}

/// The gateway as axum middleware (`axum::middleware::from_fn_with_state`):
/// proxies what a route takes, hands the rest to `next`. [`Gateway::layer`]
/// does the same with less work per request.
pub async fn middleware(State(gateway): State<Gateway>, request: Request, next: Next) -> Response {
    match gateway.handle(request).await {
        Ok(response) => response,
        Err(request) => next.run(request).await.into_response(),
    }
}

impl Gateway {
    /// The gateway as a tower layer over a router (`Router::layer`), as the
    /// daemon's listener uses it: a request a route takes is proxied, any
    /// other goes to the service inside. Unlike [`middleware`], the routes
    /// are matched before anything is cloned or boxed for the inner service.
    pub fn layer(&self) -> GatewayLayer {
        GatewayLayer {
            gateway: self.clone(),
        }
    }
}

/// The layer of [`Gateway::layer`].
#[derive(Clone, Debug)]
pub struct GatewayLayer {
    gateway: Gateway,
}

impl<S> tower_layer::Layer<S> for GatewayLayer {
    type Service = GatewayService<S>;

    fn layer(&self, inner: S) -> GatewayService<S> {
        GatewayService {
            gateway: self.gateway.clone(),
            inner,
        }
    }
}

/// The service of a [`GatewayLayer`] around `S`.
#[derive(Clone, Debug)]
pub struct GatewayService<S> {
    gateway: Gateway,
    inner: S,
}

impl<S> tower_service::Service<Request> for GatewayService<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The inner service is made ready in the call that uses it.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.gateway.route_for(&request) {
            Some((table, route)) => {
                let gateway = self.gateway.clone();
                Box::pin(async move { Ok(gateway.proxy(&table, route, request).await) })
            }
            None => {
                // The clone that was ready is the one called (tower's rule
                // for a service used from a future).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    inner.call(request).await
                })
            }
        }
    }
}

impl Route {
    pub(crate) fn stream_end(&self) -> StreamEnd {
        self.settings.stream_end
    }
    pub(crate) fn on_disconnect(&self) -> OnDisconnect {
        self.settings.on_disconnect
    }
    pub(crate) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
    pub(crate) fn first_event_timeout(&self) -> Duration {
        self.first_event_timeout
    }
    pub(crate) fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }
    pub(crate) fn max_response_body(&self) -> u64 {
        self.settings.max_response_body
    }
}
