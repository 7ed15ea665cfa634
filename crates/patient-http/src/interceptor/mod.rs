//! Interceptors: an ordered chain of async request and response hooks.
//!
//! An [`Interceptor`] sees every attempt of every task: [`on_request`] just
//! before the attempt is sent (after secrets are resolved and before the
//! request's preprocessors run, so a signing preprocessor such as SigV4 signs
//! the headers interceptors added) and [`on_response`] when its response has
//! arrived, body included. Hooks of an [`Interceptors`] chain run in the
//! order they were pushed for requests and in the reverse order for
//! responses, like middleware unwinding: the first interceptor is the
//! outermost.
//!
//! Built in: [`RequestIdInterceptor`] (`X-Request-ID` correlation),
//! [`ServiceNameInterceptor`] (`X-Service-Name`), [`HeaderRewrite`] (set or
//! remove headers), [`LoggingInterceptor`] (structured `tracing` events with
//! duration and size) and [`BearerAuth`] (a bearer token from an async
//! source, cached, refreshed once on a `401`); [`RequestFn`] turns a closure
//! into a request hook, for auth injection and the like.
//!
//! # Async hooks
//!
//! Both hooks are `async` (the trait is declared with
//! [`async_trait`](crate::async_trait); implement it the same way): a hook
//! that needs I/O — a vault lookup, an OAuth token exchange — awaits it
//! without blocking a runtime worker. A hook that only changes headers simply
//! never awaits. The time hooks take counts against the attempt's timeout
//! (and so the task's deadline): when it passes while a hook is still
//! running, the hook's future is dropped and the attempt ends in a request
//! error of class `Timeout`, as if the upstream had been slow.
//!
//! A hook should not panic; if one does (in its synchronous part or after
//! an `await`), the engine catches the panic and fails that task with a
//! request error of class `Panic` (the panic's message kept, counted in
//! `panics_total`); the task is not retried and the processor keeps running
//! (the chain itself does not catch panics).
//!
//! # Bodies
//!
//! A response hook gets the whole [`ResponseParts`]: status, headers and
//! body (already bounded by the transport's `max_response_size` and
//! decompressed), and may replace any of them; the task's outcome carries
//! what the hooks left. The body is handed over, never copied: a hook that
//! only looks at the head costs nothing more.
//!
//! # Refresh and replay on a `401`
//!
//! A response hook may return [`ResponseAction::Replay`]: the response is
//! dropped and the same request is sent again, once, within the same
//! attempt. The replay runs everything again — secrets, request hooks,
//! compression, preprocessors — so a refreshed credential is picked up and a
//! signature is computed anew; its [`InterceptContext::replay`] is `true`.
//! It does not use a retry of the retry policy, the breaker and the retry
//! policy see only the replay's outcome, and a replay's response cannot ask
//! for another one: a second `401` is the attempt's outcome. [`BearerAuth`]
//! does this for bearer tokens, with one refresh shared by every task that
//! saw the same stale token.
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderMap, HeaderName, HeaderValue, Method};
//! use patient_http::{
//!     async_trait,
//!     interceptor::{
//!         HeaderRewrite, InterceptContext, Interceptor, Interceptors, LoggingInterceptor,
//!         RequestFn, RequestIdInterceptor, ResponseAction, ResponseParts,
//!         ServiceNameInterceptor,
//!     },
//!     preprocess::PreparedRequest,
//! };
//!
//! /// Unwraps `{"data": …}` envelopes, awaiting nothing.
//! struct Unwrap;
//!
//! #[async_trait]
//! impl Interceptor for Unwrap {
//!     async fn on_response(
//!         &self,
//!         response: &mut ResponseParts,
//!         _ctx: &InterceptContext<'_>,
//!     ) -> ResponseAction {
//!         if let Some(inner) = response.body.strip_prefix(b"{\"data\":") {
//!             response.body = Bytes::copy_from_slice(inner.strip_suffix(b"}").unwrap_or(inner));
//!         }
//!         ResponseAction::Continue
//!     }
//! }
//!
//! let mut chain = Interceptors::new();
//! chain.push(LoggingInterceptor::new());
//! chain.push(RequestIdInterceptor::new());
//! chain.push(ServiceNameInterceptor::new("billing"));
//! chain.push(RequestFn::new("auth", |request: &mut PreparedRequest, _: &InterceptContext<'_>| {
//!     request.set_header("authorization", "Bearer t0ken")
//! }));
//! chain.push(HeaderRewrite::new().remove_response_header(HeaderName::from_static("set-cookie")));
//! chain.push(Unwrap);
//!
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let ctx = InterceptContext::new("task-1", 1, "api.example.com:443");
//! let url = url::Url::parse("https://api.example.com/v1/items")?;
//! let mut request = PreparedRequest::new(Method::GET, url, HeaderMap::new(), Bytes::new());
//! chain.run_request(&mut request, &ctx).await?;
//! assert_eq!(request.headers()["x-request-id"], "task-1");
//! assert_eq!(request.headers()["x-service-name"], "billing");
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("set-cookie", HeaderValue::from_static("a=b"));
//! let mut response = ResponseParts::new(200, headers).with_body(r#"{"data":[1,2]}"#);
//! assert_eq!(chain.run_response(&mut response, &ctx).await, ResponseAction::Continue);
//! assert!(response.headers.get("set-cookie").is_none());
//! assert_eq!(response.body, "[1,2]");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`on_request`]: Interceptor::on_request
//! [`on_response`]: Interceptor::on_response

mod bearer;
mod builtin;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
pub use bearer::{AccessToken, BearerAuth, TokenSource};
pub use builtin::{
    HeaderRewrite, LoggingInterceptor, RequestFn, RequestIdInterceptor, ServiceNameInterceptor,
    X_REQUEST_ID, X_SERVICE_NAME,
};
use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderValue, Method};
use tokio::time::Instant;
use url::Url;

use crate::preprocess::PreparedRequest;

/// What an interceptor knows about the attempt it sees.
///
/// Request hooks run again on every redirect hop and on a replay. On a hop
/// to another origin than the request's ([`cross_origin`](Self::cross_origin)),
/// the engine removes `authorization`, `cookie`, `proxy-authorization` and
/// every header marked sensitive *after* the hooks ran: an interceptor that
/// injects a credential cannot leak it to the other origin, and should not
/// try to re-add it there.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct InterceptContext<'a> {
    /// The task's id.
    pub task_id: &'a str,
    /// The attempt's number; the first attempt is 1.
    pub attempt: u32,
    /// The upstream key (scheme, host and port, or a configured key).
    pub upstream: &'a str,
    /// The redirect hop within the attempt; the first request is hop 1.
    pub hop: u32,
    /// Whether this hop goes to another origin (scheme, host or port) than
    /// the request's URL, after a redirect.
    pub cross_origin: bool,
    /// Whether this is the replay a response hook asked for with
    /// [`ResponseAction::Replay`]; a replay's response cannot ask again.
    pub replay: bool,
    /// In response hooks, the request this response answers, as it was sent
    /// (secret values redacted); `None` in request hooks, which get the
    /// request itself.
    pub request: Option<&'a SentRequest>,
    task_started: Option<Instant>,
    attempt_started: Option<Instant>,
}

impl<'a> InterceptContext<'a> {
    /// The context of hop 1 of an attempt, with no request and no start
    /// times (both elapsed times are zero).
    pub const fn new(task_id: &'a str, attempt: u32, upstream: &'a str) -> Self {
        InterceptContext {
            task_id,
            attempt,
            upstream,
            hop: 1,
            cross_origin: false,
            replay: false,
            request: None,
            task_started: None,
            attempt_started: None,
        }
    }

    /// The same context at redirect hop `hop`.
    #[must_use]
    pub const fn with_hop(mut self, hop: u32, cross_origin: bool) -> Self {
        self.hop = hop;
        self.cross_origin = cross_origin;
        self
    }

    /// The same context, on a replay or not.
    #[must_use]
    pub const fn with_replay(mut self, replay: bool) -> Self {
        self.replay = replay;
        self
    }

    /// The same context, answering `request` (what response hooks see).
    #[must_use]
    pub const fn with_request(mut self, request: &'a SentRequest) -> Self {
        self.request = Some(request);
        self
    }

    /// The same context, for a task that began executing at `task` and an
    /// attempt that began at `attempt`.
    #[must_use]
    pub const fn with_started(mut self, task: Instant, attempt: Instant) -> Self {
        self.task_started = Some(task);
        self.attempt_started = Some(attempt);
        self
    }

    /// How long ago the task began executing (its first attempt's start, not
    /// when it was queued); zero when unknown.
    pub fn task_elapsed(&self) -> Duration {
        self.task_started.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// How long ago this attempt began (before its secrets were resolved);
    /// zero when unknown.
    pub fn attempt_elapsed(&self) -> Duration {
        self.attempt_started.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// What replaces a secret value in a [`SentRequest`].
pub const REDACTED: &str = "<redacted>";

/// A request as it was sent, as response hooks see it in
/// [`InterceptContext::request`].
///
/// Never a secret value: the URL has the values of the request's secret
/// query parameters replaced by [`REDACTED`], and every header value marked
/// sensitive (secrets, URL credentials, signatures, and whatever a hook
/// marked) is [`REDACTED`] too.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SentRequest {
    /// The method sent.
    pub method: Method,
    /// The URL sent to, after every hook and preprocessor.
    pub url: Url,
    /// The headers sent, after every hook and preprocessor.
    pub headers: HeaderMap,
    /// What the request hooks stored with the request
    /// ([`PreparedRequest::extensions_mut`]).
    pub extensions: Extensions,
}

impl SentRequest {
    /// A sent request, as is (for tests of response hooks).
    pub fn new(method: Method, url: Url, headers: HeaderMap) -> Self {
        SentRequest {
            method,
            url,
            headers,
            extensions: Extensions::new(),
        }
    }

    /// The same request, with what request hooks stored.
    #[must_use]
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }

    /// What response hooks see of a request that is sent: secret query
    /// parameters (by name) and sensitive header values redacted.
    pub(crate) fn redacted(
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        extensions: Extensions,
        secret_params: &[&str],
    ) -> Self {
        let mut url = url.clone();
        if !secret_params.is_empty() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if secret_params.contains(&k.as_ref()) {
                        REDACTED.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        let mut headers = headers.clone();
        for value in headers.values_mut() {
            if value.is_sensitive() {
                let mut redacted = HeaderValue::from_static(REDACTED);
                redacted.set_sensitive(true);
                *value = redacted;
            }
        }
        SentRequest {
            method: method.clone(),
            url,
            headers,
            extensions,
        }
    }
}

/// A response, as a response hook sees it: what the hooks leave here is
/// what the task's outcome carries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseParts {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body (empty when there is none), bounded by the transport's
    /// `max_response_size` and decompressed when decompression is on. A hook
    /// that replaces it should keep `content-type` true.
    pub body: Bytes,
    /// How long the exchange took, from handing the request to the
    /// transport to the last byte of the body (the response hooks' own time
    /// not included).
    pub duration: Duration,
}

impl ResponseParts {
    /// A response without a body, received in no time.
    pub fn new(status: u16, headers: HeaderMap) -> Self {
        ResponseParts {
            status,
            headers,
            body: Bytes::new(),
            duration: Duration::ZERO,
        }
    }

    /// The same response with `body`.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The same response, received in `duration`.
    #[must_use]
    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }
}

/// What a response hook wants done with the response it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ResponseAction {
    /// Keep it (as the hooks left it): the default.
    #[default]
    Continue,
    /// Drop it and send the request again, once, within the same attempt —
    /// after refreshing a credential on a `401`, say. Secrets, request hooks
    /// and preprocessors run again. Ignored on the replay itself (see
    /// [`InterceptContext::replay`]): its response is the outcome.
    Replay,
}

/// A request and response hook; both methods default to doing nothing.
///
/// Implement it with [`async_trait`](crate::async_trait):
///
/// ```
/// use patient_http::{
///     async_trait,
///     interceptor::{InterceptContext, Interceptor},
///     preprocess::PreparedRequest,
/// };
///
/// /// Adds a header whose value must be fetched.
/// struct Tenant;
///
/// #[async_trait]
/// impl Interceptor for Tenant {
///     async fn on_request(
///         &self,
///         request: &mut PreparedRequest,
///         _ctx: &InterceptContext<'_>,
///     ) -> Result<(), String> {
///         let tenant = async { "acme" }.await; // e.g. a lookup over the network
///         request.set_header("x-tenant", tenant)
///     }
/// }
/// ```
#[async_trait]
pub trait Interceptor: Send + Sync + 'static {
    /// A short name for errors and logs; defaults to the type's name
    /// without its module path.
    fn name(&self) -> String {
        short_type_name(std::any::type_name::<Self>())
    }

    /// Whether this interceptor's response hook reads
    /// [`InterceptContext::request`] (the request as sent, redacted, with
    /// its extensions). Building that copy costs a URL and header clone per
    /// send, so a chain builds it only when one of its interceptors says
    /// yes. Default `true`; hooks that only change requests, or read only
    /// the response, return `false`.
    fn wants_request(&self) -> bool {
        true
    }

    /// Runs before each send of an attempt (each redirect hop, and a
    /// replay), in chain order, after secrets are resolved and before
    /// preprocessors run. May change the request; an `Err` refuses it:
    /// nothing is sent, the hooks after this one do not run, and the attempt
    /// ends in a request error that carries the reason (error class
    /// `InterceptorError`).
    async fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        let _ = (request, ctx);
        Ok(())
    }

    /// Runs when a response has arrived, body included, in reverse chain
    /// order, before redirects are followed and retry decisions are made.
    /// May change the status, headers and body; returns whether to keep the
    /// response or to [replay](ResponseAction::Replay) the request. Attempts
    /// that end without a response (timeouts, connection errors, refusals)
    /// do not reach it.
    async fn on_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        let _ = (response, ctx);
        ResponseAction::Continue
    }
}

/// A shared interceptor is one: the same instance (and its state, such as
/// [`BearerAuth`]'s token) may sit in several chains.
#[async_trait]
impl<T: Interceptor + ?Sized> Interceptor for Arc<T> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn wants_request(&self) -> bool {
        (**self).wants_request()
    }

    async fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        (**self).on_request(request, ctx).await
    }

    async fn on_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        (**self).on_response(response, ctx).await
    }
}

/// `a::b::C<d::E>` → `C<E>`.
fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment_start = 0;
    for (i, c) in full.char_indices() {
        if matches!(c, '<' | '>' | ',' | ' ' | '(' | ')' | '[' | ']' | '&' | ';') {
            out.push_str(last_path_segment(&full[segment_start..i]));
            out.push(c);
            segment_start = i + c.len_utf8();
        }
    }
    out.push_str(last_path_segment(&full[segment_start..]));
    out
}

fn last_path_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

/// Why the request hooks refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interceptor #{index} ({name}) refused the request: {reason}")]
pub struct InterceptError {
    /// The refusing interceptor's position in the chain, from 0.
    pub index: usize,
    /// Its [`name`](Interceptor::name).
    pub name: String,
    /// The reason it gave.
    pub reason: String,
}

/// An ordered chain of interceptors. Cheap to clone (the interceptors are
/// shared).
#[derive(Clone, Default)]
pub struct Interceptors {
    chain: Vec<Arc<dyn Interceptor>>,
}

impl fmt::Debug for Interceptors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.chain.iter().map(|i| i.name()))
            .finish()
    }
}

impl Interceptors {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an interceptor: its request hook runs after those already in
    /// the chain, its response hook before theirs.
    pub fn push(&mut self, interceptor: impl Interceptor) {
        self.chain.push(Arc::new(interceptor));
    }

    /// Appends an interceptor that is shared with other chains.
    pub fn push_shared(&mut self, interceptor: Arc<dyn Interceptor>) {
        self.chain.push(interceptor);
    }

    /// [`push`](Self::push), by value.
    #[must_use]
    pub fn with(mut self, interceptor: impl Interceptor) -> Self {
        self.push(interceptor);
        self
    }

    /// How many interceptors the chain holds.
    pub fn len(&self) -> usize {
        self.chain.len()
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }

    /// Whether any interceptor of the chain reads the request as sent in
    /// its response hook (see [`Interceptor::wants_request`]).
    pub fn wants_request(&self) -> bool {
        self.chain.iter().any(|i| i.wants_request())
    }

    /// Runs the request hooks in order, awaiting each; stops at the first
    /// refusal.
    pub async fn run_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), InterceptError> {
        for (index, interceptor) in self.chain.iter().enumerate() {
            interceptor
                .on_request(request, ctx)
                .await
                .map_err(|reason| InterceptError {
                    index,
                    name: interceptor.name(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// Runs every response hook in reverse order, awaiting each, and returns
    /// [`ResponseAction::Replay`] when one of them asked for it and `ctx` is
    /// not a replay already. Every hook runs either way, so each sees every
    /// response that arrived.
    pub async fn run_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        let mut action = ResponseAction::Continue;
        for interceptor in self.chain.iter().rev() {
            if interceptor.on_response(response, ctx).await == ResponseAction::Replay && !ctx.replay
            {
                action = ResponseAction::Replay;
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::HeaderName;

    use super::*;

    const CTX: InterceptContext<'static> =
        InterceptContext::new("task-7", 2, "https://api.example.com:443");

    fn request(url: &str) -> PreparedRequest {
        PreparedRequest::new(
            Method::POST,
            url::Url::parse(url).expect("valid url"),
            HeaderMap::new(),
            Bytes::from_static(b"{}"),
        )
    }

    /// Records which hook ran, in order.
    struct Probe {
        id: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        refuse: bool,
        replay: bool,
    }

    #[async_trait]
    impl Interceptor for Probe {
        async fn on_request(
            &self,
            request: &mut PreparedRequest,
            _ctx: &InterceptContext<'_>,
        ) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("req {}", self.id));
            tokio::task::yield_now().await;
            if self.refuse {
                return Err("no".into());
            }
            request.set_header(&format!("x-{}", self.id), "1")
        }

        async fn on_response(
            &self,
            response: &mut ResponseParts,
            _ctx: &InterceptContext<'_>,
        ) -> ResponseAction {
            self.log.lock().unwrap().push(format!("resp {}", self.id));
            response.headers.insert(
                HeaderName::from_bytes(format!("x-{}", self.id).as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
            if self.replay {
                ResponseAction::Replay
            } else {
                ResponseAction::Continue
            }
        }
    }

    fn probe(id: &'static str, log: &Arc<Mutex<Vec<String>>>, refuse: bool) -> Probe {
        Probe {
            id,
            log: log.clone(),
            refuse,
            replay: false,
        }
    }

    #[tokio::test]
    async fn requests_run_in_order_and_responses_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = Interceptors::new()
            .with(probe("a", &log, false))
            .with(probe("b", &log, false))
            .with(probe("c", &log, false));
        assert_eq!(chain.len(), 3);
        let mut req = request("https://h/");
        chain.run_request(&mut req, &CTX).await.unwrap();
        assert!(req.headers().contains_key("x-a") && req.headers().contains_key("x-c"));
        let mut resp = ResponseParts::new(200, HeaderMap::new());
        assert_eq!(
            chain.run_response(&mut resp, &CTX).await,
            ResponseAction::Continue
        );
        assert_eq!(resp.headers.len(), 3);
        assert_eq!(
            *log.lock().unwrap(),
            ["req a", "req b", "req c", "resp c", "resp b", "resp a"]
        );
    }

    #[tokio::test]
    async fn a_refusal_stops_the_chain_and_names_the_interceptor() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut chain = Interceptors::new();
        chain.push(probe("a", &log, false));
        chain.push(probe("b", &log, true));
        chain.push(probe("c", &log, false));
        let mut req = request("https://h/");
        let err = chain.run_request(&mut req, &CTX).await.unwrap_err();
        assert_eq!(
            err,
            InterceptError {
                index: 1,
                name: "Probe".into(),
                reason: "no".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "interceptor #1 (Probe) refused the request: no"
        );
        assert_eq!(*log.lock().unwrap(), ["req a", "req b"]);
    }

    #[tokio::test]
    async fn a_replay_verdict_runs_every_hook_and_is_ignored_on_a_replay() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut asking = probe("b", &log, false);
        asking.replay = true;
        let chain = Interceptors::new()
            .with(probe("a", &log, false))
            .with(asking)
            .with(probe("c", &log, false));
        let mut resp = ResponseParts::new(401, HeaderMap::new());
        assert_eq!(
            chain.run_response(&mut resp, &CTX).await,
            ResponseAction::Replay
        );
        assert_eq!(*log.lock().unwrap(), ["resp c", "resp b", "resp a"]);
        let replay = CTX.with_replay(true);
        assert_eq!(
            chain.run_response(&mut resp, &replay).await,
            ResponseAction::Continue
        );
    }

    #[tokio::test]
    async fn a_shared_interceptor_keeps_its_name_and_hooks() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared: Arc<dyn Interceptor> = Arc::new(probe("a", &log, false));
        let chain = Interceptors::new().with(shared.clone());
        assert_eq!(format!("{chain:?}"), r#"["Probe"]"#);
        let mut req = request("https://h/");
        chain.run_request(&mut req, &CTX).await.unwrap();
        assert!(req.headers().contains_key("x-a"));
    }

    #[tokio::test]
    async fn empty_chain_changes_nothing() {
        let chain = Interceptors::new();
        assert!(chain.is_empty());
        let mut req = request("https://h/");
        chain.run_request(&mut req, &CTX).await.unwrap();
        assert!(req.headers().is_empty());
    }

    #[test]
    fn short_type_names() {
        assert_eq!(short_type_name("a::b::C"), "C");
        assert_eq!(short_type_name("a::B<c::D, e::F>"), "B<D, F>");
        assert_eq!(
            RequestIdInterceptor::new().name(),
            "RequestIdInterceptor".to_owned()
        );
        let f = RequestFn::new(
            "auth",
            |_: &mut PreparedRequest, _: &InterceptContext<'_>| Ok(()),
        );
        assert_eq!(f.name(), "auth");
        let chain = Interceptors::new().with(f).with(LoggingInterceptor::new());
        assert_eq!(format!("{chain:?}"), r#"["auth", "LoggingInterceptor"]"#);
    }

    #[test]
    fn a_sent_request_never_shows_secret_values() {
        let url = Url::parse("https://h/p?key=s3cr3t&page=2&key=again").unwrap();
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_static("Bearer s3cr3t");
        auth.set_sensitive(true);
        headers.insert("authorization", auth);
        headers.insert("accept", HeaderValue::from_static("application/json"));
        let sent = SentRequest::redacted(&Method::GET, &url, &headers, Extensions::new(), &["key"]);
        assert_eq!(
            sent.url.as_str(),
            "https://h/p?key=%3Credacted%3E&page=2&key=%3Credacted%3E"
        );
        assert_eq!(sent.headers["authorization"], REDACTED);
        assert!(sent.headers["authorization"].is_sensitive());
        assert_eq!(sent.headers["accept"], "application/json");

        let plain = SentRequest::redacted(&Method::GET, &url, &headers, Extensions::new(), &[]);
        assert_eq!(plain.url, url);
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_times_are_zero_until_known_and_live_after() {
        assert_eq!(CTX.task_elapsed(), Duration::ZERO);
        assert_eq!(CTX.attempt_elapsed(), Duration::ZERO);
        let task = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let ctx = CTX.with_started(task, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(ctx.task_elapsed(), Duration::from_secs(6));
        assert_eq!(ctx.attempt_elapsed(), Duration::from_secs(1));
    }
}
