//! Interceptors: an ordered chain of request and response hooks.
//!
//! An [`Interceptor`] sees every attempt of every task: [`on_request`] just
//! before the attempt is sent (after secrets are resolved and before the
//! request's preprocessors run, so a signing preprocessor such as SigV4 signs
//! the headers interceptors added) and [`on_response`] when its response head
//! arrives. Hooks of an
//! [`Interceptors`] chain run in the order they were pushed for requests and
//! in the reverse order for responses, like middleware unwinding: the first
//! interceptor is the outermost.
//!
//! Built in: [`RequestIdInterceptor`] (`X-Request-ID` correlation),
//! [`ServiceNameInterceptor`] (`X-Service-Name`), [`HeaderRewrite`] (set or
//! remove headers) and [`LoggingInterceptor`] (structured `tracing` events);
//! [`RequestFn`] turns a closure into a request hook, for auth injection and
//! the like.
//!
//! Hooks are synchronous and should be quick: they run on the processor's
//! runtime threads. A hook should not panic; if one does, the engine catches
//! the panic and fails that task with a request error of class `Panic` (the
//! panic's message kept, counted in `panics_total`); the task is not retried
//! and the processor keeps running (the chain itself does not catch panics).
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderMap, HeaderName, HeaderValue, Method};
//! use patient_http::{
//!     interceptor::{
//!         HeaderRewrite, InterceptContext, Interceptors, LoggingInterceptor,
//!         RequestFn, RequestIdInterceptor, ResponseParts, ServiceNameInterceptor,
//!     },
//!     preprocess::PreparedRequest,
//! };
//!
//! let mut chain = Interceptors::new();
//! chain.push(LoggingInterceptor::new());
//! chain.push(RequestIdInterceptor::new());
//! chain.push(ServiceNameInterceptor::new("billing"));
//! chain.push(RequestFn::new("auth", |request: &mut PreparedRequest, _: &InterceptContext<'_>| {
//!     request.set_header("authorization", "Bearer t0ken")
//! }));
//! chain.push(HeaderRewrite::new().remove_response_header(HeaderName::from_static("set-cookie")));
//!
//! let ctx = InterceptContext::new("task-1", 1, "api.example.com:443");
//! let url = url::Url::parse("https://api.example.com/v1/items")?;
//! let mut request = PreparedRequest::new(Method::GET, url, HeaderMap::new(), Bytes::new());
//! chain.run_request(&mut request, &ctx)?;
//! assert_eq!(request.headers()["x-request-id"], "task-1");
//! assert_eq!(request.headers()["x-service-name"], "billing");
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("set-cookie", HeaderValue::from_static("a=b"));
//! let mut response = ResponseParts::new(200, headers);
//! chain.run_response(&mut response, &ctx);
//! assert!(response.headers.get("set-cookie").is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`on_request`]: Interceptor::on_request
//! [`on_response`]: Interceptor::on_response

use std::{fmt, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Level;

use crate::preprocess::PreparedRequest;

/// `X-Request-ID`, set by [`RequestIdInterceptor`].
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `X-Service-Name`, set by [`ServiceNameInterceptor`].
pub const X_SERVICE_NAME: HeaderName = HeaderName::from_static("x-service-name");

/// What an interceptor knows about the attempt it sees.
///
/// Request hooks run again on every redirect hop. On a hop to another origin
/// than the request's ([`cross_origin`](Self::cross_origin)), the engine
/// removes `authorization`, `cookie`, `proxy-authorization` and every header
/// marked sensitive *after* the hooks ran: an interceptor that injects a
/// credential cannot leak it to the other origin, and should not try to
/// re-add it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl<'a> InterceptContext<'a> {
    /// The context of hop 1 of an attempt.
    pub const fn new(task_id: &'a str, attempt: u32, upstream: &'a str) -> Self {
        InterceptContext {
            task_id,
            attempt,
            upstream,
            hop: 1,
            cross_origin: false,
        }
    }

    /// The same context at redirect hop `hop`.
    #[must_use]
    pub const fn with_hop(mut self, hop: u32, cross_origin: bool) -> Self {
        self.hop = hop;
        self.cross_origin = cross_origin;
        self
    }
}

/// The head of a response, as a response hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseParts {
    /// The status code.
    pub status: u16,
    /// The headers; changes are what the task's outcome carries.
    pub headers: HeaderMap,
}

impl ResponseParts {
    /// A response head.
    pub fn new(status: u16, headers: HeaderMap) -> Self {
        ResponseParts { status, headers }
    }
}

/// A request and response hook; both methods default to doing nothing.
pub trait Interceptor: Send + Sync + 'static {
    /// A short name for errors and logs; defaults to the type's name
    /// without its module path.
    fn name(&self) -> String {
        short_type_name(std::any::type_name::<Self>())
    }

    /// Runs before each attempt is sent, in chain order. May change the
    /// request; an `Err` refuses it: nothing is sent, the hooks after this
    /// one do not run, and the attempt ends in a request error that carries
    /// the reason (error class `InterceptorError`).
    fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        let _ = (request, ctx);
        Ok(())
    }

    /// Runs when an attempt's response head has arrived, in reverse chain
    /// order, before retry decisions are made. May change the headers.
    /// Attempts that end without a response (timeouts, connection errors,
    /// refusals) do not reach it.
    fn on_response(&self, response: &mut ResponseParts, ctx: &InterceptContext<'_>) {
        let _ = (response, ctx);
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

    /// Runs the request hooks in order; stops at the first refusal.
    pub fn run_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), InterceptError> {
        for (index, interceptor) in self.chain.iter().enumerate() {
            interceptor
                .on_request(request, ctx)
                .map_err(|reason| InterceptError {
                    index,
                    name: interceptor.name(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// Runs the response hooks in reverse order.
    pub fn run_response(&self, response: &mut ResponseParts, ctx: &InterceptContext<'_>) {
        for interceptor in self.chain.iter().rev() {
            interceptor.on_response(response, ctx);
        }
    }
}

/// Sets `X-Request-ID` (or another header) to the task id, unless the
/// request already has one: every attempt of a task carries the same id, so
/// the upstream's logs correlate with ours.
///
/// A task id that is not a valid header value refuses the request.
#[derive(Debug, Clone)]
pub struct RequestIdInterceptor {
    header: HeaderName,
}

impl Default for RequestIdInterceptor {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIdInterceptor {
    /// Sets [`X_REQUEST_ID`].
    pub fn new() -> Self {
        RequestIdInterceptor {
            header: X_REQUEST_ID,
        }
    }

    /// The header to set (default [`X_REQUEST_ID`]), e.g. `x-correlation-id`.
    #[must_use]
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }
}

impl Interceptor for RequestIdInterceptor {
    fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        if request.headers().contains_key(&self.header) {
            return Ok(());
        }
        let value = HeaderValue::from_str(ctx.task_id)
            .map_err(|_| format!("task id is not a valid value for {}", self.header))?;
        request.headers_mut().insert(self.header.clone(), value);
        Ok(())
    }
}

/// Sets `X-Service-Name` to this service's name, unless the request already
/// has one, so the upstream knows who calls it.
#[derive(Debug, Clone)]
pub struct ServiceNameInterceptor {
    value: Result<HeaderValue, String>,
}

impl ServiceNameInterceptor {
    /// Sends `name`. A name that is not a valid header value makes every
    /// request refused with the reason; [`try_new`](Self::try_new) checks it
    /// up front instead.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        ServiceNameInterceptor {
            value: HeaderValue::try_from(name.as_str())
                .map_err(|_| format!("service name {name:?} is not a valid header value")),
        }
    }

    /// Sends `name`, checked now.
    pub fn try_new(name: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        Ok(ServiceNameInterceptor {
            value: Ok(HeaderValue::try_from(name)?),
        })
    }
}

impl Interceptor for ServiceNameInterceptor {
    fn on_request(
        &self,
        request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        let value = self.value.as_ref().map_err(Clone::clone)?;
        if !request.headers().contains_key(X_SERVICE_NAME) {
            request.headers_mut().insert(X_SERVICE_NAME, value.clone());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum HeaderOp {
    Set(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl HeaderOp {
    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            HeaderOp::Set(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            HeaderOp::Remove(name) => {
                headers.remove(name);
            }
        }
    }
}

/// Sets and removes headers of requests and of responses, in the order the
/// rewrites were added. Starts empty (changes nothing).
///
/// ```
/// use http::{HeaderName, HeaderValue};
/// use patient_http::interceptor::HeaderRewrite;
///
/// let rewrite = HeaderRewrite::new()
///     .set_request_header(HeaderName::from_static("x-api-version"), HeaderValue::from_static("2"))
///     .remove_request_header(HeaderName::from_static("cookie"))
///     .remove_response_header(HeaderName::from_static("set-cookie"));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct HeaderRewrite {
    request: Vec<HeaderOp>,
    response: Vec<HeaderOp>,
}

impl HeaderRewrite {
    /// No rewrites.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a request header, replacing every value it had.
    pub fn set_request_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.request.push(HeaderOp::Set(name, value));
        self
    }

    /// Removes every value of a request header.
    pub fn remove_request_header(mut self, name: HeaderName) -> Self {
        self.request.push(HeaderOp::Remove(name));
        self
    }

    /// Sets a response header, replacing every value it had.
    pub fn set_response_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.response.push(HeaderOp::Set(name, value));
        self
    }

    /// Removes every value of a response header.
    pub fn remove_response_header(mut self, name: HeaderName) -> Self {
        self.response.push(HeaderOp::Remove(name));
        self
    }
}

impl Interceptor for HeaderRewrite {
    fn on_request(
        &self,
        request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        for op in &self.request {
            op.apply(request.headers_mut());
        }
        Ok(())
    }

    fn on_response(&self, response: &mut ResponseParts, _ctx: &InterceptContext<'_>) {
        for op in &self.response {
            op.apply(&mut response.headers);
        }
    }
}

macro_rules! at_level {
    ($level:expr, $mac:ident!($($args:tt)*)) => {
        if $level == Level::ERROR {
            tracing::$mac!(Level::ERROR, $($args)*)
        } else if $level == Level::WARN {
            tracing::$mac!(Level::WARN, $($args)*)
        } else if $level == Level::INFO {
            tracing::$mac!(Level::INFO, $($args)*)
        } else if $level == Level::DEBUG {
            tracing::$mac!(Level::DEBUG, $($args)*)
        } else {
            tracing::$mac!(Level::TRACE, $($args)*)
        }
    };
}

/// Emits a `tracing` event for each attempt sent and each response head
/// received, with structured fields: `task_id`, `attempt`, `upstream`, and
/// `method` and `url` (without user info, query or fragment) on requests,
/// `status` on responses. Header values and bodies are never logged.
#[derive(Debug, Clone)]
pub struct LoggingInterceptor {
    level: Level,
}

impl Default for LoggingInterceptor {
    fn default() -> Self {
        Self::new()
    }
}

impl LoggingInterceptor {
    /// Logs at [`Level::DEBUG`].
    pub fn new() -> Self {
        LoggingInterceptor {
            level: Level::DEBUG,
        }
    }

    /// The level of the events (default [`Level::DEBUG`]).
    #[must_use]
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

/// The URL without what may carry credentials: user info, query, fragment.
fn loggable_url(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    // Only fails for URLs that cannot have user info, which then have none.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.into()
}

impl Interceptor for LoggingInterceptor {
    fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        if at_level!(self.level, enabled!()) {
            let url = loggable_url(request.url());
            at_level!(
                self.level,
                event!(
                    task_id = ctx.task_id,
                    attempt = ctx.attempt,
                    upstream = ctx.upstream,
                    method = request.method().as_str(),
                    url = url.as_str(),
                    "sending request"
                )
            );
        }
        Ok(())
    }

    fn on_response(&self, response: &mut ResponseParts, ctx: &InterceptContext<'_>) {
        at_level!(
            self.level,
            event!(
                task_id = ctx.task_id,
                attempt = ctx.attempt,
                upstream = ctx.upstream,
                status = response.status,
                "response received"
            )
        );
    }
}

/// A closure as a request hook, named for errors and logs.
///
/// ```
/// use patient_http::{interceptor::{InterceptContext, RequestFn}, preprocess::PreparedRequest};
///
/// let auth = RequestFn::new("auth", |request: &mut PreparedRequest, _: &InterceptContext<'_>| {
///     request.set_header("authorization", "Bearer t0ken")
/// });
/// ```
pub struct RequestFn<F> {
    name: String,
    f: F,
}

impl<F> fmt::Debug for RequestFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestFn")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> RequestFn<F>
where
    F: Fn(&mut PreparedRequest, &InterceptContext<'_>) -> Result<(), String>
        + Send
        + Sync
        + 'static,
{
    /// Runs `f` as the request hook; `name` identifies it in errors.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        RequestFn {
            name: name.into(),
            f,
        }
    }
}

impl<F> Interceptor for RequestFn<F>
where
    F: Fn(&mut PreparedRequest, &InterceptContext<'_>) -> Result<(), String>
        + Send
        + Sync
        + 'static,
{
    fn name(&self) -> String {
        self.name.clone()
    }

    fn on_request(
        &self,
        request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        (self.f)(request, ctx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use bytes::Bytes;
    use http::Method;
    use tracing::{
        field::{Field, Visit},
        span, Event, Metadata, Subscriber,
    };

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
    }

    impl Interceptor for Probe {
        fn on_request(
            &self,
            request: &mut PreparedRequest,
            _ctx: &InterceptContext<'_>,
        ) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("req {}", self.id));
            if self.refuse {
                return Err("no".into());
            }
            request.set_header(&format!("x-{}", self.id), "1")
        }

        fn on_response(&self, response: &mut ResponseParts, _ctx: &InterceptContext<'_>) {
            self.log.lock().unwrap().push(format!("resp {}", self.id));
            response.headers.insert(
                HeaderName::from_bytes(format!("x-{}", self.id).as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
    }

    fn probe(id: &'static str, log: &Arc<Mutex<Vec<String>>>, refuse: bool) -> Probe {
        Probe {
            id,
            log: log.clone(),
            refuse,
        }
    }

    #[test]
    fn requests_run_in_order_and_responses_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = Interceptors::new()
            .with(probe("a", &log, false))
            .with(probe("b", &log, false))
            .with(probe("c", &log, false));
        assert_eq!(chain.len(), 3);
        let mut req = request("https://h/");
        chain.run_request(&mut req, &CTX).unwrap();
        assert!(req.headers().contains_key("x-a") && req.headers().contains_key("x-c"));
        let mut resp = ResponseParts::new(200, HeaderMap::new());
        chain.run_response(&mut resp, &CTX);
        assert_eq!(resp.headers.len(), 3);
        assert_eq!(
            *log.lock().unwrap(),
            ["req a", "req b", "req c", "resp c", "resp b", "resp a"]
        );
    }

    #[test]
    fn a_refusal_stops_the_chain_and_names_the_interceptor() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut chain = Interceptors::new();
        chain.push(probe("a", &log, false));
        chain.push(probe("b", &log, true));
        chain.push(probe("c", &log, false));
        let mut req = request("https://h/");
        let err = chain.run_request(&mut req, &CTX).unwrap_err();
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

    #[test]
    fn empty_chain_changes_nothing() {
        let chain = Interceptors::new();
        assert!(chain.is_empty());
        let mut req = request("https://h/");
        chain.run_request(&mut req, &CTX).unwrap();
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
    fn request_id_is_the_task_id_unless_set() {
        let i = RequestIdInterceptor::new();
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()[X_REQUEST_ID], "task-7");

        let mut req = request("https://h/");
        req.set_header("X-Request-ID", "from-caller").unwrap();
        i.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()[X_REQUEST_ID], "from-caller");
        assert_eq!(req.headers().get_all(X_REQUEST_ID).iter().count(), 1);

        let i = RequestIdInterceptor::new().header(HeaderName::from_static("x-correlation-id"));
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()["x-correlation-id"], "task-7");
        assert!(!req.headers().contains_key(X_REQUEST_ID));

        let bad = InterceptContext::new("a\nb", CTX.attempt, CTX.upstream);
        assert!(i.on_request(&mut request("https://h/"), &bad).is_err());
    }

    #[test]
    fn service_name_is_sent_unless_set() {
        let i = ServiceNameInterceptor::new("billing");
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()[X_SERVICE_NAME], "billing");

        let mut req = request("https://h/");
        req.set_header("x-service-name", "other").unwrap();
        i.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()[X_SERVICE_NAME], "other");

        let bad = ServiceNameInterceptor::new("bad\nname");
        let err = bad
            .on_request(&mut request("https://h/"), &CTX)
            .unwrap_err();
        assert!(err.contains("not a valid header value"), "{err}");
        assert!(ServiceNameInterceptor::try_new("bad\nname").is_err());
        assert!(ServiceNameInterceptor::try_new("billing").is_ok());
    }

    #[test]
    fn header_rewrite_sets_and_removes_in_order() {
        let rw = HeaderRewrite::new()
            .remove_request_header(HeaderName::from_static("cookie"))
            .set_request_header(
                HeaderName::from_static("x-api-version"),
                HeaderValue::from_static("2"),
            )
            .set_request_header(
                HeaderName::from_static("x-tmp"),
                HeaderValue::from_static("1"),
            )
            .remove_request_header(HeaderName::from_static("x-tmp"))
            .set_response_header(
                HeaderName::from_static("cache-control"),
                HeaderValue::from_static("no-store"),
            )
            .remove_response_header(HeaderName::from_static("set-cookie"));

        let mut req = request("https://h/");
        req.headers_mut()
            .append("cookie", HeaderValue::from_static("a=1"));
        req.headers_mut()
            .append("cookie", HeaderValue::from_static("b=2"));
        req.headers_mut()
            .insert("x-api-version", HeaderValue::from_static("1"));
        rw.on_request(&mut req, &CTX).unwrap();
        assert!(!req.headers().contains_key("cookie"));
        assert!(!req.headers().contains_key("x-tmp"));
        assert_eq!(req.headers()["x-api-version"], "2");
        assert_eq!(req.headers().get_all("x-api-version").iter().count(), 1);

        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("cache-control", HeaderValue::from_static("max-age=60"));
        headers.append("etag", HeaderValue::from_static("\"x\""));
        let mut resp = ResponseParts::new(200, headers);
        rw.on_response(&mut resp, &CTX);
        assert!(!resp.headers.contains_key("set-cookie"));
        assert_eq!(resp.headers["cache-control"], "no-store");
        assert_eq!(resp.headers["etag"], "\"x\"");
        assert_eq!(resp.status, 200);
    }

    #[test]
    fn request_fn_runs_the_closure() {
        let auth = RequestFn::new(
            "auth",
            |req: &mut PreparedRequest, ctx: &InterceptContext<'_>| {
                if ctx.attempt > 5 {
                    return Err("too many".into());
                }
                req.set_header("authorization", "Bearer t")
            },
        );
        let mut req = request("https://h/");
        auth.on_request(&mut req, &CTX).unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer t");
        let late = InterceptContext::new(CTX.task_id, 6, CTX.upstream);
        let err = Interceptors::new()
            .with(auth)
            .run_request(&mut request("https://h/"), &late)
            .unwrap_err();
        assert_eq!((err.index, err.name.as_str()), (0, "auth"));
    }

    /// A subscriber that keeps every event's fields as text.
    #[derive(Clone, Default)]
    struct Capture {
        events: Arc<Mutex<Vec<HashMap<String, String>>>>,
    }

    struct Fields(HashMap<String, String>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.insert(field.name().into(), format!("{value:?}"));
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().into(), value.into());
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut fields = Fields(HashMap::new());
            event.record(&mut fields);
            fields
                .0
                .insert("level".into(), event.metadata().level().to_string());
            self.events.lock().unwrap().push(fields.0);
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    #[test]
    fn logging_emits_structured_fields_and_no_secrets() {
        let capture = Capture::default();
        let chain = Interceptors::new().with(LoggingInterceptor::new().level(Level::INFO));
        tracing::subscriber::with_default(capture.clone(), || {
            let mut req = request("https://user:hunter2@api.example.com/v1/items?token=abc#frag");
            req.set_header("authorization", "Bearer s3cr3t").unwrap();
            chain.run_request(&mut req, &CTX).unwrap();
            let mut headers = HeaderMap::new();
            headers.insert("set-cookie", HeaderValue::from_static("session=s3cr3t"));
            chain.run_response(&mut ResponseParts::new(503, headers), &CTX);
        });

        let events = capture.events.lock().unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        let sent = &events[0];
        assert_eq!(sent["message"], "sending request");
        assert_eq!(sent["level"], "INFO");
        assert_eq!(sent["task_id"], "task-7");
        assert_eq!(sent["attempt"], "2");
        assert_eq!(sent["upstream"], "https://api.example.com:443");
        assert_eq!(sent["method"], "POST");
        assert_eq!(sent["url"], "https://api.example.com/v1/items");
        let received = &events[1];
        assert_eq!(received["message"], "response received");
        assert_eq!(received["status"], "503");
        assert_eq!(received["task_id"], "task-7");
        assert_eq!(received["attempt"], "2");

        for event in events.iter() {
            for value in event.values() {
                for secret in ["s3cr3t", "hunter2", "token", "abc", "frag", "user"] {
                    assert!(!value.contains(secret), "{secret} leaked: {event:?}");
                }
            }
        }
    }

    #[test]
    fn logging_below_the_subscriber_level_is_skipped() {
        /// Accepts INFO and above only.
        struct InfoOnly(Capture);
        impl Subscriber for InfoOnly {
            fn enabled(&self, m: &Metadata<'_>) -> bool {
                *m.level() <= Level::INFO
            }
            fn new_span(&self, a: &span::Attributes<'_>) -> span::Id {
                self.0.new_span(a)
            }
            fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
            fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
            fn event(&self, e: &Event<'_>) {
                self.0.event(e)
            }
            fn enter(&self, _: &span::Id) {}
            fn exit(&self, _: &span::Id) {}
        }
        let capture = Capture::default();
        tracing::subscriber::with_default(InfoOnly(capture.clone()), || {
            let chain = Interceptors::new().with(LoggingInterceptor::new());
            chain.run_request(&mut request("https://h/"), &CTX).unwrap();
            chain.run_response(&mut ResponseParts::new(200, HeaderMap::new()), &CTX);
        });
        assert!(capture.events.lock().unwrap().is_empty());
    }
}
