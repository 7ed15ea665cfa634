//! The interceptors that ship with the engine, and [`RequestFn`] for
//! closures. None of them awaits anything.

use std::fmt;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Level;

use super::{InterceptContext, Interceptor, ResponseAction, ResponseParts};
use crate::preprocess::PreparedRequest;

/// `X-Request-ID`, set by [`RequestIdInterceptor`].
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `X-Service-Name`, set by [`ServiceNameInterceptor`].
pub const X_SERVICE_NAME: HeaderName = HeaderName::from_static("x-service-name");

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

#[async_trait]
impl Interceptor for RequestIdInterceptor {
    fn wants_request(&self) -> bool {
        false
    }

    async fn on_request(
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

#[async_trait]
impl Interceptor for ServiceNameInterceptor {
    fn wants_request(&self) -> bool {
        false
    }

    async fn on_request(
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

#[async_trait]
impl Interceptor for HeaderRewrite {
    fn wants_request(&self) -> bool {
        false
    }

    async fn on_request(
        &self,
        request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        for op in &self.request {
            op.apply(request.headers_mut());
        }
        Ok(())
    }

    async fn on_response(
        &self,
        response: &mut ResponseParts,
        _ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        for op in &self.response {
            op.apply(&mut response.headers);
        }
        ResponseAction::Continue
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

/// Emits a `tracing` event for each request sent and each response
/// received, with structured fields: `task_id`, `attempt`, `upstream`,
/// `method` and `url` (without user info, query or fragment), and on
/// responses `status`, `duration_ms` (the exchange, from sending the request
/// to the last byte of the body, in milliseconds), `size` (the body's bytes,
/// after decompression) and `replay` (whether it answers a replay). Header
/// values and bodies are never logged.
///
/// Pushed first, it is the outermost hook: it logs a request before the
/// other hooks change it, and a response after they did (its `size` is that
/// of the body they left).
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

#[async_trait]
impl Interceptor for LoggingInterceptor {
    async fn on_request(
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
                    replay = ctx.replay,
                    "sending request"
                )
            );
        }
        Ok(())
    }

    async fn on_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        if at_level!(self.level, enabled!()) {
            let (method, url) = match ctx.request {
                Some(sent) => (sent.method.as_str(), loggable_url(&sent.url)),
                None => ("", String::new()),
            };
            let duration_ms = response.duration.as_secs_f64() * 1000.0;
            at_level!(
                self.level,
                event!(
                    task_id = ctx.task_id,
                    attempt = ctx.attempt,
                    upstream = ctx.upstream,
                    method,
                    url = url.as_str(),
                    status = response.status,
                    duration_ms,
                    size = response.body.len() as u64,
                    replay = ctx.replay,
                    "response received"
                )
            );
        }
        ResponseAction::Continue
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

#[async_trait]
impl<F> Interceptor for RequestFn<F>
where
    F: Fn(&mut PreparedRequest, &InterceptContext<'_>) -> Result<(), String>
        + Send
        + Sync
        + 'static,
{
    fn wants_request(&self) -> bool {
        false
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn on_request(
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
    use crate::interceptor::Interceptors;

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

    #[tokio::test]
    async fn request_id_is_the_task_id_unless_set() {
        let i = RequestIdInterceptor::new();
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()[X_REQUEST_ID], "task-7");

        let mut req = request("https://h/");
        req.set_header("X-Request-ID", "from-caller").unwrap();
        i.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()[X_REQUEST_ID], "from-caller");
        assert_eq!(req.headers().get_all(X_REQUEST_ID).iter().count(), 1);

        let i = RequestIdInterceptor::new().header(HeaderName::from_static("x-correlation-id"));
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()["x-correlation-id"], "task-7");
        assert!(!req.headers().contains_key(X_REQUEST_ID));

        let bad = InterceptContext::new("a\nb", CTX.attempt, CTX.upstream);
        assert!(i
            .on_request(&mut request("https://h/"), &bad)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn service_name_is_sent_unless_set() {
        let i = ServiceNameInterceptor::new("billing");
        let mut req = request("https://h/");
        i.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()[X_SERVICE_NAME], "billing");

        let mut req = request("https://h/");
        req.set_header("x-service-name", "other").unwrap();
        i.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()[X_SERVICE_NAME], "other");

        let bad = ServiceNameInterceptor::new("bad\nname");
        let err = bad
            .on_request(&mut request("https://h/"), &CTX)
            .await
            .unwrap_err();
        assert!(err.contains("not a valid header value"), "{err}");
        assert!(ServiceNameInterceptor::try_new("bad\nname").is_err());
        assert!(ServiceNameInterceptor::try_new("billing").is_ok());
    }

    #[tokio::test]
    async fn header_rewrite_sets_and_removes_in_order() {
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
        rw.on_request(&mut req, &CTX).await.unwrap();
        assert!(!req.headers().contains_key("cookie"));
        assert!(!req.headers().contains_key("x-tmp"));
        assert_eq!(req.headers()["x-api-version"], "2");
        assert_eq!(req.headers().get_all("x-api-version").iter().count(), 1);

        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("cache-control", HeaderValue::from_static("max-age=60"));
        headers.append("etag", HeaderValue::from_static("\"x\""));
        let mut resp = ResponseParts::new(200, headers);
        rw.on_response(&mut resp, &CTX).await;
        assert!(!resp.headers.contains_key("set-cookie"));
        assert_eq!(resp.headers["cache-control"], "no-store");
        assert_eq!(resp.headers["etag"], "\"x\"");
        assert_eq!(resp.status, 200);
    }

    #[tokio::test]
    async fn request_fn_runs_the_closure() {
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
        auth.on_request(&mut req, &CTX).await.unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer t");
        let late = InterceptContext::new(CTX.task_id, 6, CTX.upstream);
        let err = Interceptors::new()
            .with(auth)
            .run_request(&mut request("https://h/"), &late)
            .await
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

    /// Runs `f` to completion on a current-thread runtime with `subscriber`
    /// as the default.
    fn with_subscriber<S, F>(subscriber: S, f: F)
    where
        S: Subscriber + Send + Sync + 'static,
        F: std::future::Future<Output = ()>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || runtime.block_on(f));
    }

    #[test]
    fn logging_emits_structured_fields_and_no_secrets() {
        let capture = Capture::default();
        let chain = Interceptors::new().with(LoggingInterceptor::new().level(Level::INFO));
        with_subscriber(capture.clone(), async {
            let mut req = request("https://user:hunter2@api.example.com/v1/items?token=abc#frag");
            req.set_header("authorization", "Bearer s3cr3t").unwrap();
            chain.run_request(&mut req, &CTX).await.unwrap();
            let sent = crate::interceptor::SentRequest::redacted(
                req.method(),
                req.url(),
                req.headers(),
                http::Extensions::new(),
                &["token"],
            );
            let mut headers = HeaderMap::new();
            headers.insert("set-cookie", HeaderValue::from_static("session=s3cr3t"));
            let mut response = ResponseParts::new(503, headers)
                .with_body("x".repeat(1234))
                .with_duration(std::time::Duration::from_micros(12_500));
            chain
                .run_response(&mut response, &CTX.with_request(&sent))
                .await;
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
        assert_eq!(sent["replay"], "false");
        let received = &events[1];
        assert_eq!(received["message"], "response received");
        assert_eq!(received["status"], "503");
        assert_eq!(received["task_id"], "task-7");
        assert_eq!(received["attempt"], "2");
        assert_eq!(received["method"], "POST");
        assert_eq!(received["url"], "https://api.example.com/v1/items");
        assert_eq!(received["duration_ms"], "12.5");
        assert_eq!(received["size"], "1234");

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
        with_subscriber(InfoOnly(capture.clone()), async {
            let chain = Interceptors::new().with(LoggingInterceptor::new());
            chain
                .run_request(&mut request("https://h/"), &CTX)
                .await
                .unwrap();
            chain
                .run_response(&mut ResponseParts::new(200, HeaderMap::new()), &CTX)
                .await;
        });
        assert!(capture.events.lock().unwrap().is_empty());
    }
}
