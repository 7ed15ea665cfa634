//! The server side: a `tower` layer that reads the caller's deadline and
//! priority, refuses or bounds the handler by that deadline, runs it inside
//! the request's context and records server metrics.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header::CONTENT_TYPE, HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{scope, sync_scope, RequestContext, ServerMetrics};
use crate::{interceptor::X_SERVICE_NAME, time::checked_after};

/// The least time a propagated deadline must leave for a request to be
/// handled, by default: 5 ms, about what answering takes on a loaded
/// service; see [`PropagationLayer::min_remaining`].
pub const DEFAULT_MIN_REMAINING: Duration = Duration::from_millis(5);

/// Why [`PropagationLayer`] answered `408 Request Timeout`. The response
/// carries it in its extensions, and its body is
/// `{"error": {"code": …, "message": …}}` with [`code`](Self::code) and
/// [`message`](Self::message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadlineRejection {
    /// The propagated deadline had passed on arrival (`X-Request-Timeout:
    /// 0`); the handler was not called.
    Expired,
    /// The propagated deadline left less than
    /// [`min_remaining`](PropagationLayer::min_remaining) on arrival; the
    /// handler was not called.
    TooShort,
    /// The handler had not answered when the deadline (propagated, or the
    /// [`default_timeout`](PropagationLayer::default_timeout)) came; it was
    /// cancelled (its future dropped).
    Exceeded,
}

impl DeadlineRejection {
    /// The `code` of the response body: `deadline_expired`,
    /// `deadline_too_short` or `deadline_exceeded`.
    pub fn code(self) -> &'static str {
        match self {
            DeadlineRejection::Expired => "deadline_expired",
            DeadlineRejection::TooShort => "deadline_too_short",
            DeadlineRejection::Exceeded => "deadline_exceeded",
        }
    }

    /// The `reason` label of `server_deadline_rejections_total`: `expired`,
    /// `too_short` or `exceeded`.
    pub fn reason(self) -> &'static str {
        match self {
            DeadlineRejection::Expired => "expired",
            DeadlineRejection::TooShort => "too_short",
            DeadlineRejection::Exceeded => "exceeded",
        }
    }

    /// The `message` of the response body.
    pub fn message(self) -> &'static str {
        match self {
            DeadlineRejection::Expired => {
                "the caller's deadline (X-Request-Timeout) had passed when the request arrived"
            }
            DeadlineRejection::TooShort => {
                "the caller's deadline (X-Request-Timeout) left too little time to handle the request"
            }
            DeadlineRejection::Exceeded => {
                "the request was not handled before its deadline; its handler was cancelled"
            }
        }
    }

    /// The `408` response, with the JSON body and this rejection in its
    /// extensions.
    fn response<B: From<Bytes>>(self) -> Response<B> {
        let body = format!(
            r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
            self.code(),
            self.message()
        );
        let mut response = Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response.extensions_mut().insert(self);
        response
    }
}

impl fmt::Display for DeadlineRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Picks the `route` label of a request; see [`PropagationLayer::route_with`].
type RouteFn = dyn Fn(&Request<()>) -> Option<String> + Send + Sync;

/// A `tower` layer for services that are called with a deadline: what
/// aio-request's server middleware does, for axum, hyper or any tower
/// service.
///
/// For every request it:
///
/// 1. reads `X-Request-Timeout` and `X-Request-Priority` into a
///    [`RequestContext`] (without the timeout header, the deadline is
///    [`default_timeout`](Self::default_timeout) after arrival, if set);
/// 2. answers `408 Request Timeout` at once, without calling the inner
///    service, when the propagated deadline has passed
///    ([`DeadlineRejection::Expired`]) or leaves less than
///    [`min_remaining`](Self::min_remaining)
///    ([`DeadlineRejection::TooShort`]);
/// 3. otherwise inserts the context into the request's extensions and calls
///    the inner service inside it (see [`RequestContext::current`]), so the
///    tasks the handler submits inherit the deadline and priority;
/// 4. bounds the handler by the deadline: one that has not answered by then
///    is cancelled (its future dropped) and the caller gets `408`
///    ([`DeadlineRejection::Exceeded`]);
/// 5. records [`ServerMetrics`], when given [`metrics`](Self::metrics).
///
/// Why `408` and not `504` for a handler that ran out of time: `504` says a
/// gateway's upstream did not answer, which the caller cannot tell from a
/// failure further down; `408` says the request's own time ran out, which
/// is what happened: the caller set the deadline, and nothing is left of
/// it. aio-request answers `408` too, so mixed chains read the same.
///
/// A `408` response's body is the JSON of [`DeadlineRejection`], so the
/// layer needs a response body that can be made from [`Bytes`] (axum's
/// `Body`, `http_body_util::Full<Bytes>`, …).
///
/// ```
/// use std::{convert::Infallible, time::Duration};
///
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use patient_http::propagation::{PropagationLayer, RequestContext};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Infallible> {
/// let layer = PropagationLayer::new().default_timeout(Some(Duration::from_secs(30)));
/// let service = layer.layer(service_fn(|_request: Request<()>| async move {
///     // Inside the handler, and in whatever it awaits:
///     let ctx = RequestContext::current().unwrap_or_default();
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(ctx.priority.as_str()))))
/// }));
///
/// let late = Request::builder().header("x-request-timeout", "0").body(()).unwrap();
/// let response = service.oneshot(late).await?;
/// assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
/// # Ok(())
/// # }
/// ```
///
/// With axum, add it with `Router::layer` (so it runs after routing, where
/// axum's `MatchedPath` is known), and take the route label from it:
///
/// ```
/// use axum::{extract::MatchedPath, routing::get, Router};
/// use patient_http::propagation::{PropagationLayer, ServerMetrics};
///
/// async fn user() -> &'static str {
///     "a user"
/// }
///
/// let metrics = ServerMetrics::new();
/// let app: Router = Router::new().route("/users/{id}", get(user)).layer(
///     PropagationLayer::new()
///         .metrics(metrics.clone())
///         .route_with(|req| req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned())),
/// );
/// // Serve `app`, and `metrics.render()` on a `/metrics` endpoint.
/// ```
#[derive(Clone)]
#[must_use]
pub struct PropagationLayer {
    min_remaining: Duration,
    default_timeout: Option<Duration>,
    metrics: Option<ServerMetrics>,
    route: Option<Arc<RouteFn>>,
}

impl fmt::Debug for PropagationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagationLayer")
            .field("min_remaining", &self.min_remaining)
            .field("default_timeout", &self.default_timeout)
            .field("metrics", &self.metrics.is_some())
            .field("route", &self.route.is_some())
            .finish()
    }
}

impl Default for PropagationLayer {
    fn default() -> Self {
        PropagationLayer {
            min_remaining: DEFAULT_MIN_REMAINING,
            default_timeout: None,
            metrics: None,
            route: None,
        }
    }
}

impl PropagationLayer {
    /// The layer with its defaults: [`DEFAULT_MIN_REMAINING`], no default
    /// timeout, no metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The least time a propagated deadline must leave on arrival for the
    /// request to be handled; with less, the layer answers `408` without
    /// calling the inner service. Default [`DEFAULT_MIN_REMAINING`] (5 ms);
    /// zero refuses only deadlines that have passed (`X-Request-Timeout:
    /// 0`). It applies to propagated deadlines only, not to the
    /// [`default_timeout`](Self::default_timeout).
    pub fn min_remaining(mut self, min: Duration) -> Self {
        self.min_remaining = min;
        self
    }

    /// The deadline of a request that came without a (valid)
    /// `X-Request-Timeout`, counted from its arrival: the handler is bounded
    /// by it and the tasks it submits inherit it, as with a propagated one.
    /// Default `None`: such requests are unbounded.
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// Records every request into `metrics` (clones share the values).
    /// Default: no metrics.
    pub fn metrics(mut self, metrics: ServerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How the `route` label of a request is found: `route` sees the
    /// request's method, URI, headers and extensions (the body is left
    /// aside) and returns a route template, or `None` for
    /// [`UNMATCHED_ROUTE`](super::UNMATCHED_ROUTE). Default: every request
    /// is unmatched. Return templates, never raw paths (their number is
    /// capped, see [`ServerMetrics::set_max_route_labels`], but a raw path
    /// wastes the cap).
    ///
    /// With axum (the layer added with `Router::layer`):
    /// `.route_with(|req| req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()))`.
    pub fn route_with(
        mut self,
        route: impl Fn(&Request<()>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.route = Some(Arc::new(route));
        self
    }
}

impl<S> Layer<S> for PropagationLayer {
    type Service = Propagation<S>;

    fn layer(&self, inner: S) -> Propagation<S> {
        Propagation {
            inner,
            settings: self.clone(),
        }
    }
}

/// The service made by [`PropagationLayer`]; see there for what it does.
#[derive(Clone)]
pub struct Propagation<S> {
    inner: S,
    settings: PropagationLayer,
}

impl<S: fmt::Debug> fmt::Debug for Propagation<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Propagation")
            .field("inner", &self.inner)
            .field("settings", &self.settings)
            .finish()
    }
}

impl<S> Propagation<S> {
    /// Wraps `inner` with the layer's defaults ([`PropagationLayer::new`]).
    pub fn new(inner: S) -> Self {
        PropagationLayer::new().layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, to change.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The future of a [`Propagation`] service's response.
pub type ResponseFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for Propagation<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: From<Bytes> + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let mut ctx = RequestContext::from_headers_at(request.headers(), arrived);
        let propagated = ctx.deadline;
        if propagated.is_none() {
            ctx.deadline = self
                .settings
                .default_timeout
                .and_then(|timeout| checked_after(arrived, timeout));
        }
        let (request, served) = match &self.settings.metrics {
            None => (request, None),
            Some(metrics) => {
                let (parts, body) = request.into_parts();
                let view = Request::from_parts(parts, ());
                let route = self.settings.route.as_ref().and_then(|route| route(&view));
                let served = metrics.start(
                    view.headers().get(X_SERVICE_NAME),
                    route.as_deref(),
                    view.method(),
                );
                let (parts, ()) = view.into_parts();
                (Request::from_parts(parts, body), Some(served))
            }
        };

        let refused = propagated.and_then(|deadline| {
            let remaining = deadline.saturating_duration_since(arrived);
            if remaining.is_zero() {
                Some(DeadlineRejection::Expired)
            } else if remaining < self.settings.min_remaining {
                Some(DeadlineRejection::TooShort)
            } else {
                None
            }
        });
        if let Some(rejection) = refused {
            if let Some(served) = served {
                served.finish(StatusCode::REQUEST_TIMEOUT, Some(rejection));
            }
            return Box::pin(async move { Ok(rejection.response()) });
        }

        let mut request = request;
        request.extensions_mut().insert(ctx);
        // The inner service's `call` may do work of its own before it
        // returns the future: in the context too.
        let inner = scope(ctx, sync_scope(ctx, || self.inner.call(request)));
        Box::pin(async move {
            let (result, rejection) = match ctx.deadline {
                None => (inner.await, None),
                Some(deadline) => match tokio::time::timeout_at(deadline, inner).await {
                    Ok(result) => (result, None),
                    Err(_elapsed) => {
                        let rejection = DeadlineRejection::Exceeded;
                        (Ok(rejection.response()), Some(rejection))
                    }
                },
            };
            if let Some(served) = served {
                match &result {
                    Ok(response) => served.finish(response.status(), rejection),
                    // An error is not an answer the layer can see: the
                    // server above turns it into one (or drops the
                    // connection). Count it as a 500.
                    Err(_) => served.finish(StatusCode::INTERNAL_SERVER_ERROR, None),
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use patient_wire::Priority;
    use tower::{service_fn, ServiceExt};

    use super::*;

    /// Answers with the context the request carried, the one current when
    /// the service was called, and the one current while its future ran.
    fn probe() -> impl Service<
        Request<()>,
        Response = Response<Bytes>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Bytes>, Infallible>> + Send,
    > + Clone {
        service_fn(|request: Request<()>| {
            let in_call = RequestContext::current();
            async move {
                tokio::task::yield_now().await;
                let seen = (
                    request.extensions().get::<RequestContext>().copied(),
                    in_call,
                    RequestContext::current(),
                );
                let mut response = Response::new(Bytes::new());
                response.extensions_mut().insert(seen);
                Ok(response)
            }
        })
    }

    type Seen = (
        Option<RequestContext>,
        Option<RequestContext>,
        Option<RequestContext>,
    );

    #[tokio::test(start_paused = true)]
    async fn the_handler_runs_inside_the_context() {
        let svc = PropagationLayer::new().layer(probe());
        let req = Request::builder()
            .header("x-request-timeout", "3")
            .header("x-request-priority", "low")
            .body(())
            .unwrap();
        let response = svc.clone().oneshot(req).await.unwrap();
        let (inserted, in_call, in_future) = *response.extensions().get::<Seen>().unwrap();
        let ctx = inserted.expect("inserted");
        assert_eq!(ctx.remaining(), Some(Duration::from_secs(3)));
        assert_eq!(ctx.priority, Priority::Low);
        assert_eq!(in_call, Some(ctx));
        assert_eq!(in_future, Some(ctx));

        let response = svc.oneshot(Request::new(())).await.unwrap();
        let (inserted, _, in_future) = *response.extensions().get::<Seen>().unwrap();
        assert_eq!(inserted, Some(RequestContext::default()));
        assert_eq!(in_future, Some(RequestContext::default()));
        assert_eq!(RequestContext::current(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_threshold_is_configurable() {
        let with = |timeout: &str| {
            Request::builder()
                .header("x-request-timeout", timeout)
                .body(())
                .unwrap()
        };
        let strict = PropagationLayer::new()
            .min_remaining(Duration::from_millis(500))
            .layer(probe());
        let response = strict.clone().oneshot(with("0.499")).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            response.extensions().get::<DeadlineRejection>(),
            Some(&DeadlineRejection::TooShort)
        );
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["code"], "deadline_too_short");
        assert_eq!(
            body["error"]["message"],
            DeadlineRejection::TooShort.message()
        );
        let response = strict.oneshot(with("0.5")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        // Zero refuses only what has passed.
        let lax = PropagationLayer::new()
            .min_remaining(Duration::ZERO)
            .layer(probe());
        let response = lax.clone().oneshot(with("0.001")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let response = lax.oneshot(with("0")).await.unwrap();
        assert_eq!(
            response.extensions().get::<DeadlineRejection>(),
            Some(&DeadlineRejection::Expired)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_timeout_skips_the_threshold() {
        // A default shorter than the threshold still lets requests in.
        let svc = PropagationLayer::new()
            .default_timeout(Some(Duration::from_millis(1)))
            .layer(probe());
        let response = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (inserted, _, _) = *response.extensions().get::<Seen>().unwrap();
        assert!(inserted.unwrap().deadline.is_some());
    }
}
