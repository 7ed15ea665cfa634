//! The context of the request being served: what the caller sent, kept in a
//! task-local while the handler runs, and what a task submitted meanwhile
//! inherits from it.

use std::{future::Future, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};
use patient_wire::Priority;
use tokio::time::Instant;

use super::{parse_timeout, propagation_headers, X_REQUEST_PRIORITY, X_REQUEST_TIMEOUT};
use crate::time::checked_after;

tokio::task_local! {
    /// The context of the request whose handler is running in this task.
    static CURRENT: RequestContext;
}

/// The deadline and priority a caller sent, as read by
/// [`PropagationLayer`](super::PropagationLayer).
///
/// The default has no deadline and normal priority: what a request without
/// the headers gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestContext {
    /// When the caller stops waiting: arrival plus `X-Request-Timeout`
    /// (or plus the layer's
    /// [`default_timeout`](super::PropagationLayer::default_timeout) when
    /// the header is absent or invalid); `None` without either.
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
            .and_then(|timeout| checked_after(now, timeout));
        let priority = headers
            .get(X_REQUEST_PRIORITY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_default();
        RequestContext { deadline, priority }
    }

    /// The context of the request being served by the current task: set by
    /// [`PropagationLayer`](super::PropagationLayer) around the handler, or
    /// by [`scope`]; `None` outside both.
    ///
    /// A tokio task-local, so it does not cross `tokio::spawn` or
    /// `spawn_blocking`: read it before spawning and set it again inside
    /// with [`scope`] (or [`sync_scope`] on a blocking thread).
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(|ctx| *ctx).ok()
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

/// Runs `future` with `ctx` as the [current](RequestContext::current)
/// context, so the tasks it submits inherit its deadline and priority.
///
/// [`PropagationLayer`](super::PropagationLayer) does this around every
/// handler; call it yourself for work spawned off the handler's task:
///
/// ```
/// use patient_http::propagation::{self, RequestContext};
///
/// # async fn handler() {
/// let ctx = RequestContext::current().unwrap_or_default();
/// tokio::spawn(propagation::scope(ctx, async move {
///     // Tasks submitted here inherit the request's deadline and priority.
///     assert_eq!(RequestContext::current(), Some(ctx));
/// }));
/// # }
/// ```
pub fn scope<F: Future>(ctx: RequestContext, future: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(ctx, future)
}

/// Runs `f` with `ctx` as the [current](RequestContext::current) context:
/// the blocking form of [`scope`], for a thread started with
/// `spawn_blocking` or `std::thread::spawn` that submits tasks.
pub fn sync_scope<R>(ctx: RequestContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(ctx, f)
}

/// When a task was submitted, and the context of the request being served
/// at that moment: what its deadline and priority are made of.
///
/// Every face takes one when a task is handed to it ([`Admission::now`]);
/// the engine applies it once, when it plans the task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admission {
    /// When the task was accepted: a request's own `options.deadline`
    /// counts from here.
    pub(crate) at: Instant,
    /// The context of the request being served when it was submitted.
    pub(crate) inherited: Option<RequestContext>,
}

impl Admission {
    /// A task submitted now, in the current context.
    pub(crate) fn now() -> Admission {
        Admission {
            at: Instant::now(),
            inherited: RequestContext::current(),
        }
    }

    /// The deadline of a task whose own deadline (the request's, else its
    /// upstream policy's) is `own` after submission: the earlier of that and
    /// the inherited one.
    pub(crate) fn deadline(&self, own: Option<Duration>) -> Option<Instant> {
        let own = own.and_then(|after| checked_after(self.at, after));
        let inherited = self.inherited.and_then(|ctx| ctx.deadline);
        match (own, inherited) {
            (Some(own), Some(inherited)) => Some(own.min(inherited)),
            (own, inherited) => own.or(inherited),
        }
    }

    /// The priority of a task whose request sets `own`: its own, else the
    /// inherited one.
    pub(crate) fn priority(&self, own: Option<Priority>) -> Option<Priority> {
        own.or(self.inherited.map(|ctx| ctx.priority))
    }
}

#[cfg(test)]
mod tests {
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

    #[tokio::test(start_paused = true)]
    async fn current_is_set_inside_a_scope_only() {
        assert_eq!(RequestContext::current(), None);
        let ctx = RequestContext {
            deadline: Some(Instant::now() + Duration::from_secs(2)),
            priority: Priority::Low,
        };
        let seen = scope(ctx, async {
            tokio::task::yield_now().await;
            RequestContext::current()
        })
        .await;
        assert_eq!(seen, Some(ctx));
        assert_eq!(RequestContext::current(), None);
        assert_eq!(sync_scope(ctx, RequestContext::current), Some(ctx));
        // A spawned task does not inherit it.
        let spawned = scope(ctx, async {
            tokio::spawn(async { RequestContext::current() }).await
        })
        .await
        .unwrap();
        assert_eq!(spawned, None);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_takes_the_earlier_deadline_and_the_own_priority() {
        let none = Admission::now();
        assert_eq!(none.inherited, None);
        assert_eq!(none.deadline(None), None);
        assert_eq!(
            none.deadline(Some(Duration::from_secs(3))),
            Some(none.at + Duration::from_secs(3))
        );
        assert_eq!(none.priority(None), None);

        let ctx = RequestContext {
            deadline: Some(Instant::now() + Duration::from_secs(2)),
            priority: Priority::High,
        };
        let inherited = sync_scope(ctx, Admission::now);
        assert_eq!(inherited.inherited, Some(ctx));
        // The inherited deadline caps a longer one of the request's own...
        assert_eq!(
            inherited.deadline(Some(Duration::from_secs(5))),
            ctx.deadline
        );
        assert_eq!(inherited.deadline(None), ctx.deadline);
        // ...and a shorter one of its own wins.
        assert_eq!(
            inherited.deadline(Some(Duration::from_secs(1))),
            Some(inherited.at + Duration::from_secs(1))
        );
        // A request's own priority wins over the inherited one.
        assert_eq!(inherited.priority(None), Some(Priority::High));
        assert_eq!(inherited.priority(Some(Priority::Low)), Some(Priority::Low));
        // A huge own deadline means none of its own.
        assert_eq!(inherited.deadline(Some(Duration::MAX)), ctx.deadline);
    }
}
