//! Deadline and priority propagation between services: the client half and
//! the server half.
//!
//! A client sends how long it will still wait as `X-Request-Timeout`
//! (seconds, integer or decimal) and how urgent the request is as
//! `X-Request-Priority` (`high`, `normal` or `low`); the engine adds both to
//! every attempt with [`propagation_headers`] (see
//! [`UpstreamPolicyBuilder::propagate`](crate::resilience::UpstreamPolicyBuilder::propagate)).
//!
//! # The server half
//!
//! [`PropagationLayer`] (a `tower` layer, so it fits axum, hyper or any
//! tower service) does what aio-request's server middleware does. When a
//! request arrives it reads the headers into a [`RequestContext`], answers
//! `408` without calling the service when the deadline has passed or leaves
//! less than [`min_remaining`](PropagationLayer::min_remaining), bounds the
//! handler by the deadline (or by a
//! [`default_timeout`](PropagationLayer::default_timeout) when none came),
//! and records [`ServerMetrics`] by caller (`X-Service-Name`), route and
//! method. An axum handler takes the context with
//! `axum::Extension<RequestContext>`, or anywhere with
//! [`RequestContext::current`].
//!
//! Invalid values are ignored rather than rejected: a malformed, negative or
//! non-finite timeout means no deadline, an unknown priority means normal.
//! A service that wants to refuse such requests can check the headers itself.
//!
//! # Inherited deadlines
//!
//! The layer runs the handler inside a task-local scope holding its
//! context. A task submitted from there (to a [`Processor`](crate::Processor),
//! an [`InlineExecutor`](crate::InlineExecutor), an
//! [`AwaitableClient`](crate::AwaitableClient) or through
//! [`Dispatch`](crate::Dispatch)) inherits it, without passing anything by
//! hand:
//!
//! * its deadline is the earlier of its own (the request's
//!   `options.deadline`, else its upstream policy's, counted from
//!   submission) and the served request's: a shorter one of its own wins,
//!   the inherited one caps a longer one;
//! * its priority is its request's own `options.priority`, else the served
//!   request's; it orders the processor's dispatch and travels upstream;
//! * so the next service gets `X-Request-Timeout` with what is left, and
//!   deadlines propagate through a chain of services.
//!
//! The context is read when the task is submitted, so a task submitted
//! while serving a request keeps its deadline even if it runs later, and a
//! task submitted anywhere else inherits nothing. The step API
//! ([`AwaitableClient::progress`](crate::AwaitableClient::progress) and
//! `step`) inherits nothing either: its tasks live in a durable queue,
//! beyond the request that made them.
//!
//! Tokio task-locals do not cross `tokio::spawn` or `spawn_blocking`: work
//! spawned by a handler starts outside the context. Take it with
//! [`RequestContext::current`] before spawning and set it again inside with
//! [`scope`] (or [`sync_scope`] on a blocking thread).
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
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
//!     // The same context, as tasks submitted here see it:
//!     assert_eq!(RequestContext::current(), Some(ctx));
//!     let text = format!("{} {:?}", ctx.priority, ctx.remaining());
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
//! }));
//!
//! let request = Request::builder()
//!     .header("x-request-timeout", "2.5")
//!     .header("x-request-priority", "high")
//!     .body(())
//!     .unwrap();
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! With axum: `Router::new().route("/", get(handler)).layer(PropagationLayer::new())`
//! and `async fn handler(Extension(ctx): Extension<RequestContext>)`; see
//! [`PropagationLayer`] for the route label of the metrics.

mod context;
mod layer;
mod metrics;

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use patient_wire::Priority;

pub(crate) use self::context::Admission;
pub use self::{
    context::{scope, sync_scope, RequestContext},
    layer::{
        DeadlineRejection, Propagation, PropagationLayer, ResponseFuture, DEFAULT_MIN_REMAINING,
    },
    metrics::{
        ServerMetrics, DEFAULT_MAX_CALLER_LABELS, DEFAULT_MAX_ROUTE_LABELS, MAX_CALLER_LEN,
        OTHER_LABEL, UNKNOWN_CALLER, UNMATCHED_ROUTE,
    },
};

/// `X-Request-Timeout`: the seconds the caller will still wait, integer or
/// decimal (`30`, `2.5`).
pub const X_REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout");

/// `X-Request-Priority`: `high`, `normal` or `low` (any case).
pub const X_REQUEST_PRIORITY: HeaderName = HeaderName::from_static("x-request-priority");

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

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use tokio::time::Instant;

    use super::*;

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
}
