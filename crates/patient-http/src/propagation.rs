//! Deadline and priority propagation between services.
//!
//! A client sends how long it will still wait as `X-Request-Timeout`
//! (seconds, integer or decimal) and how urgent the request is as
//! `X-Request-Priority` (`high`, `normal` or `low`); the engine adds both to
//! every attempt with [`propagation_headers`]. On the server side,
//! [`PropagationLayer`] (a `tower` layer, so it fits axum, hyper or any tower
//! service) reads them when a request arrives and inserts a
//! [`RequestContext`] into the request's extensions; an axum handler takes it
//! with `axum::Extension<RequestContext>`, and passes the remaining time on
//! to its own upstream calls.
//!
//! Invalid values are ignored rather than rejected: a malformed, negative or
//! non-finite timeout means no deadline, an unknown priority means normal.
//! A service that wants to refuse such requests can check the headers itself.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use http::{Request, Response};
//! use patient_http::{
//!     propagation::{PropagationLayer, RequestContext},
//!     wire::Priority,
//! };
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Infallible> {
//! let service = PropagationLayer::new().layer(service_fn(|request: Request<()>| async move {
//!     let ctx = request.extensions().get::<RequestContext>().copied().unwrap_or_default();
//!     Ok::<_, Infallible>(Response::new(format!("{} {:?}", ctx.priority, ctx.remaining())))
//! }));
//!
//! let request = Request::builder()
//!     .header("x-request-timeout", "2.5")
//!     .header("x-request-priority", "high")
//!     .body(())
//!     .unwrap();
//! let response = service.oneshot(request).await?;
//! assert!(response.body().starts_with("high Some("));
//! # Ok(())
//! # }
//! ```
//!
//! With axum: `Router::new().route("/", get(handler)).layer(PropagationLayer::new())`
//! and `async fn handler(Extension(ctx): Extension<RequestContext>)`.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use patient_wire::Priority;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// `X-Request-Timeout`: the seconds the caller will still wait, integer or
/// decimal (`30`, `2.5`).
pub const X_REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout");

/// `X-Request-Priority`: `high`, `normal` or `low` (any case).
pub const X_REQUEST_PRIORITY: HeaderName = HeaderName::from_static("x-request-priority");

/// The deadline and priority a caller sent, as read by [`PropagationLayer`].
///
/// The default has no deadline and normal priority: what a request without
/// the headers gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestContext {
    /// When the caller stops waiting: arrival plus `X-Request-Timeout`;
    /// `None` when the header is absent or invalid.
    pub deadline: Option<Instant>,
    /// `X-Request-Priority`; normal when absent or invalid.
    pub priority: Priority,
}

impl RequestContext {
    /// Reads the headers of a request arriving now.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::from_headers_at(headers, Instant::now())
    }

    /// Reads the headers of a request that arrived at `now`.
    pub fn from_headers_at(headers: &HeaderMap, now: Instant) -> Self {
        let deadline = headers
            .get(X_REQUEST_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout)
            .and_then(|timeout| now.checked_add(timeout));
        let priority = headers
            .get(X_REQUEST_PRIORITY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_default();
        RequestContext { deadline, priority }
    }

    /// The time left before the deadline (zero once it has passed); `None`
    /// without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed (never, without one).
    pub fn is_expired(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }

    /// The headers that pass this context on to a further upstream: the
    /// remaining time and the same priority.
    pub fn propagation_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        propagation_headers(self.remaining(), self.priority)
    }
}

/// Parses an `X-Request-Timeout` value: non-negative seconds, integer or
/// decimal (exponents accepted, as some clients print small floats that
/// way); anything else, including `inf` and `NaN`, is `None`.
fn parse_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && value.as_bytes()[0] != b'-';
    if !plain {
        return None;
    }
    let seconds: f64 = value.parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// The headers that propagate a deadline and a priority to an upstream:
/// `X-Request-Timeout` when there is a deadline, in seconds rounded down to
/// the millisecond (so the upstream never believes it has more time than it
/// does), and `X-Request-Priority` always.
///
/// ```
/// use std::time::Duration;
///
/// use patient_http::{propagation::propagation_headers, wire::Priority};
///
/// let headers = propagation_headers(Some(Duration::from_millis(2_500)), Priority::High);
/// assert_eq!(headers[0].0, "x-request-timeout");
/// assert_eq!(headers[0].1, "2.5");
/// assert_eq!(headers[1].0, "x-request-priority");
/// assert_eq!(headers[1].1, "high");
/// ```
pub fn propagation_headers(
    remaining: Option<Duration>,
    priority: Priority,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::with_capacity(2);
    if let Some(remaining) = remaining {
        headers.push((X_REQUEST_TIMEOUT, timeout_value(remaining)));
    }
    headers.push((
        X_REQUEST_PRIORITY,
        HeaderValue::from_static(priority.as_str()),
    ));
    headers
}

/// Seconds with up to three decimals, rounded down: `30`, `2.5`, `0.001`.
fn timeout_value(remaining: Duration) -> HeaderValue {
    let millis = remaining.as_millis();
    let (whole, frac) = (millis / 1000, millis % 1000);
    let text = if frac == 0 {
        whole.to_string()
    } else {
        let frac = format!("{frac:03}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    };
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A `tower` layer that reads `X-Request-Timeout` and `X-Request-Priority`
/// and inserts a [`RequestContext`] into every request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagationLayer {
    _private: (),
}

impl PropagationLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for PropagationLayer {
    type Service = Propagation<S>;

    fn layer(&self, inner: S) -> Propagation<S> {
        Propagation::new(inner)
    }
}

/// The service made by [`PropagationLayer`]: inserts a [`RequestContext`]
/// (computed when the request is called, i.e. on arrival) and calls the
/// inner service.
#[derive(Debug, Clone)]
pub struct Propagation<S> {
    inner: S,
}

impl<S> Propagation<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Propagation { inner }
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

impl<S, B> Service<Request<B>> for Propagation<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let ctx = RequestContext::from_headers(request.headers());
        request.extensions_mut().insert(ctx);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{service_fn, ServiceExt};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn timeouts_parse() {
        let ok = [
            ("30", 30_000),
            ("2.5", 2_500),
            (" 0.25 ", 250),
            ("0", 0),
            ("1.", 1_000),
            (".5", 500),
            ("1e-3", 1),
            ("+2", 2_000),
        ];
        for (text, millis) in ok {
            assert_eq!(
                parse_timeout(text),
                Some(Duration::from_millis(millis)),
                "{text}"
            );
        }
        for bad in [
            "", " ", "soon", "-1", "-0.5", "inf", "NaN", "infinity", "1e400", "5s", "1,5", "0x10",
            "1e30",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn context_from_headers() {
        let now = Instant::now();
        let ctx = RequestContext::from_headers_at(
            &headers(&[("x-request-timeout", "1.5"), ("X-Request-Priority", "HIGH")]),
            now,
        );
        assert_eq!(ctx.deadline, Some(now + Duration::from_millis(1_500)));
        assert_eq!(ctx.priority, Priority::High);

        let ctx = RequestContext::from_headers_at(&HeaderMap::new(), now);
        assert_eq!(ctx, RequestContext::default());
        assert_eq!(ctx.deadline, None);
        assert_eq!(ctx.priority, Priority::Normal);
        assert_eq!(ctx.remaining(), None);
        assert!(!ctx.is_expired());

        let ctx = RequestContext::from_headers_at(
            &headers(&[
                ("x-request-timeout", "later"),
                ("x-request-priority", "urgent"),
            ]),
            now,
        );
        assert_eq!(ctx, RequestContext::default());

        // Not visible ASCII: ignored too.
        let mut map = HeaderMap::new();
        map.insert(
            X_REQUEST_TIMEOUT,
            HeaderValue::from_bytes(b"\xff1").unwrap(),
        );
        assert_eq!(RequestContext::from_headers_at(&map, now).deadline, None);
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_down_on_the_paused_clock() {
        let ctx = RequestContext::from_headers(&headers(&[("x-request-timeout", "10")]));
        assert_eq!(ctx.remaining(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_millis(4_250)).await;
        assert_eq!(ctx.remaining(), Some(Duration::from_millis(5_750)));
        assert!(!ctx.is_expired());
        assert_eq!(ctx.propagation_headers()[0].1, "5.75");
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(ctx.remaining(), Some(Duration::ZERO));
        assert!(ctx.is_expired());
        assert_eq!(ctx.propagation_headers()[0].1, "0");
    }

    #[test]
    fn headers_to_propagate() {
        let h = propagation_headers(Some(Duration::from_secs(30)), Priority::Low);
        assert_eq!(
            h,
            [
                (X_REQUEST_TIMEOUT, HeaderValue::from_static("30")),
                (X_REQUEST_PRIORITY, HeaderValue::from_static("low")),
            ]
        );
        let h = propagation_headers(None, Priority::Normal);
        assert_eq!(
            h,
            [(X_REQUEST_PRIORITY, HeaderValue::from_static("normal"))]
        );
        for (d, text) in [
            (Duration::from_micros(1_234_999), "1.234"),
            (Duration::from_millis(1_050), "1.05"),
            (Duration::from_millis(1), "0.001"),
            (Duration::from_micros(999), "0"),
            (Duration::ZERO, "0"),
            (Duration::from_secs(86_400), "86400"),
        ] {
            assert_eq!(timeout_value(d), text, "{d:?}");
        }
        // What we send, we read back (to the millisecond).
        let now = Instant::now();
        let mut map = HeaderMap::new();
        map.extend(propagation_headers(
            Some(Duration::from_millis(12_345)),
            Priority::High,
        ));
        let ctx = RequestContext::from_headers_at(&map, now);
        assert_eq!(ctx.deadline, Some(now + Duration::from_millis(12_345)));
        assert_eq!(ctx.priority, Priority::High);
    }

    #[tokio::test(start_paused = true)]
    async fn layer_inserts_the_context() {
        let svc = PropagationLayer::new().layer(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(req.extensions().get::<RequestContext>().copied())
        }));
        let req = Request::builder()
            .header("x-request-timeout", "3")
            .header("x-request-priority", "low")
            .body(())
            .unwrap();
        let ctx = svc.clone().oneshot(req).await.unwrap().expect("inserted");
        assert_eq!(ctx.remaining(), Some(Duration::from_secs(3)));
        assert_eq!(ctx.priority, Priority::Low);

        let ctx = svc
            .oneshot(Request::new(()))
            .await
            .unwrap()
            .expect("inserted even without headers");
        assert_eq!(ctx, RequestContext::default());
    }
}
