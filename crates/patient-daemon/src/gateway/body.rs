//! The body of a streamed response as it passes through: each piece is
//! handed to the client as soon as the client's connection takes it, and
//! the next is read from the upstream only then (back-pressure: a slow
//! client slows the upstream read; nothing piles up in between but the
//! event at hand).
//!
//! An event stream (`text/event-stream`) is cut into whole events: an event
//! split across reads is put back together before a hook sees it, and a
//! last event without its blank line is completed. Two timers run on it
//! besides the transport's idle timer: the first content event must come
//! within the route's `first_event_timeout` (comments and pings do not
//! count), and no gap between two events may pass `idle_timeout`. A stream
//! the upstream ends before its end (no `[DONE]`, no `finish_reason`),
//! breaks, or that passes `max_response_body`, reaches the client as an
//! error event in the OpenAI error shape, never as a clean end; any other
//! body is cut off (the client sees an incomplete response).
//!
//! A client that goes away cancels the upstream request (its connection is
//! closed), or, with `on_disconnect = "drain"`, lets it run on for up to
//! `drain_timeout` so its usage is still counted.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use patient_http::{client::ErrorType, exchange::StreamBody};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::json;
use tokio::time::Sleep;
use tracing::Instrument;

use super::{
    error_type,
    hooks::{Action, ProxyContext, ProxyHooks, RequestSummary, StreamSummary},
    settings::{OnDisconnect, StreamEnd},
    sse::{facts, EventSplitter, SseEvent},
    Route,
};

/// Why a streamed body that is not an event stream ended early.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamCut(String);

/// What a streamed response starts with.
pub(crate) struct StreamSetup {
    pub(crate) upstream: StreamBody,
    pub(crate) event_stream: bool,
    pub(crate) route: Arc<Route>,
    pub(crate) upstream_index: usize,
    pub(crate) hooks: Arc<dyn ProxyHooks>,
    pub(crate) ctx: ProxyContext,
    pub(crate) status: u16,
    pub(crate) attempts: u32,
    /// Turns true when the daemon stops: the stream ends at once.
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
    /// The request's span, held open until the stream ends.
    pub(crate) span: tracing::Span,
}

/// A future that completes once the daemon stops.
type Closing = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// The response body of a streamed request.
pub struct ProxyBody {
    state: Option<Box<State>>,
    /// The request's `proxied_request` span: entered while the body is
    /// polled, closed when the body ends (or, after a client left with
    /// `on_disconnect = "drain"`, when the drain ends).
    span: tracing::Span,
}

struct State {
    route: Arc<Route>,
    upstream_index: usize,
    hooks: Arc<dyn ProxyHooks>,
    ctx: ProxyContext,
    status: u16,
    attempts: u32,
    upstream: Option<StreamBody>,
    splitter: Option<EventSplitter>,
    /// Pieces ready for the client, with when each event was read.
    out: VecDeque<(Bytes, Option<Instant>)>,
    trailers: Option<HeaderMap>,
    /// The error a body that is not an event stream ends with.
    fatal: Option<StreamCut>,
    first_timer: Option<Pin<Box<Sleep>>>,
    gap_timer: Option<Pin<Box<Sleep>>>,
    seen_content: bool,
    completed: bool,
    cut: bool,
    usage: Option<(u64, u64)>,
    bytes: u64,
    events: u64,
    event_latency: Histogram,
    scratch: Vec<SseEvent>,
    closing: Option<Closing>,
}

impl ProxyBody {
    pub(crate) fn new(setup: StreamSetup) -> Self {
        let StreamSetup {
            upstream,
            event_stream,
            route,
            upstream_index,
            hooks,
            ctx,
            status,
            attempts,
            mut closing,
            span,
        } = setup;
        let closing: Closing = Box::pin(async move {
            let _ = closing.wait_for(|closed| *closed).await;
        });
        let event_latency = route.metrics.event_latency().clone();
        let (splitter, first_timer, gap_timer) = if event_stream {
            (
                Some(EventSplitter::new()),
                Some(Box::pin(tokio::time::sleep(route.first_event_timeout()))),
                Some(Box::pin(tokio::time::sleep(route.idle_timeout()))),
            )
        } else {
            (None, None, None)
        };
        ProxyBody {
            state: Some(Box::new(State {
                route,
                upstream_index,
                hooks,
                ctx,
                status,
                attempts,
                upstream: Some(upstream),
                splitter,
                out: VecDeque::new(),
                trailers: None,
                fatal: None,
                first_timer,
                gap_timer,
                seen_content: false,
                completed: false,
                cut: false,
                usage: None,
                bytes: 0,
                events: 0,
                event_latency,
                scratch: Vec::new(),
                closing: Some(closing),
            })),
            span,
        }
    }
}

impl State {
    /// Ends the stream early: the upstream request is cancelled, and the
    /// client gets an error event (event streams) or a cut-off body.
    fn cut(&mut self, reason: &str, kind: &'static str, message: String) {
        self.upstream = None;
        self.first_timer = None;
        self.gap_timer = None;
        self.cut = true;
        // Polled or drained within the request's span.
        tracing::Span::current().record("error.type", kind);
        self.route
            .metrics
            .families()
            .cut(&self.route.settings.name, reason);
        tracing::warn!(route = %self.route.settings.name, reason, %message, "stream cut");
        if self.splitter.is_some() {
            let event = json!({"error": {"message": message, "type": kind}});
            self.out
                .push_back((Bytes::from(format!("data: {event}\n\n")), None));
        } else {
            self.fatal = Some(StreamCut(message));
        }
    }

    fn on_data(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let Some(splitter) = &mut self.splitter else {
            match self.hooks.chunk_filter(&data, &mut self.ctx) {
                Action::Pass => self.out.push_back((data, None)),
                Action::Drop => {}
                Action::Replace(b) => self.out.push_back((b, None)),
                Action::FanOut(v) => self.out.extend(v.into_iter().map(|b| (b, None))),
            }
            return;
        };
        let mut events = std::mem::take(&mut self.scratch);
        let pushed = splitter.push(data, &mut events);
        for event in events.drain(..) {
            self.on_event(event);
        }
        self.scratch = events;
        if pushed.is_err() {
            self.cut(
                "event_too_large",
                error_type::BAD_GATEWAY,
                format!(
                    "the upstream sent more than {} bytes without ending an event",
                    super::sse::MAX_EVENT
                ),
            );
        }
    }

    fn on_event(&mut self, event: SseEvent) {
        let now = Instant::now();
        if let Some(timer) = &mut self.gap_timer {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.route.idle_timeout());
        }
        if !event.is_comment() {
            if !self.seen_content {
                self.seen_content = true;
                self.first_timer = None;
                self.route.metrics.first_event(self.ctx.started.elapsed());
            }
            let f = facts(&event);
            self.completed |= f.ends;
            if f.usage.is_some() {
                self.usage = f.usage;
            }
        }
        let before = self.out.len();
        match self.hooks.event_filter(&event, &mut self.ctx) {
            Action::Pass => self.out.push_back((event.raw, Some(now))),
            Action::Drop => {}
            Action::Replace(b) => self.out.push_back((b, Some(now))),
            Action::FanOut(v) => self.out.extend(v.into_iter().map(|b| (b, Some(now)))),
        }
        self.events += (self.out.len() - before) as u64;
    }

    fn on_end(&mut self) {
        if let Some(last) = self.splitter.as_mut().and_then(EventSplitter::finish) {
            self.on_event(last);
        }
        self.upstream = None;
        self.first_timer = None;
        self.gap_timer = None;
        let needs_marker = self.splitter.is_some() && self.route.stream_end() == StreamEnd::Openai;
        if needs_marker && !self.completed {
            self.cut(
                "upstream_cut",
                error_type::BAD_GATEWAY,
                "the upstream ended the stream before its end (no [DONE] and no finish_reason)"
                    .to_owned(),
            );
        } else {
            self.completed = true;
        }
    }

    fn on_error(&mut self, error: &patient_http::client::TransportError) {
        let (reason, kind) = match error.kind() {
            ErrorType::Timeout => ("idle_timeout", error_type::GATEWAY_TIMEOUT),
            ErrorType::ResponseTooLarge => {
                ("response_too_large", error_type::UPSTREAM_BODY_TOO_LARGE)
            }
            _ => ("upstream_error", error_type::BAD_GATEWAY),
        };
        let message = match error.kind() {
            ErrorType::ResponseTooLarge => format!(
                "the upstream's response is over the {} bytes route {:?} accepts (max_response_body)",
                self.route.max_response_body(),
                self.route.settings.name
            ),
            _ => format!("the upstream stream broke: {error}"),
        };
        self.cut(reason, kind, message);
    }

    /// Records how the stream ended: hooks, metrics, the upstream's load.
    fn finish(mut self: Box<Self>, client_gone: bool) {
        let summary = StreamSummary {
            bytes: self.bytes,
            events: self.events,
            completed: self.completed && !self.cut && !client_gone,
            client_gone,
            usage: self.usage,
        };
        let metrics = &self.route.metrics;
        if client_gone {
            metrics.families().cut(metrics.route(), "client_gone");
        }
        if let Some((prompt, completion)) = self.usage {
            metrics
                .families()
                .tokens(metrics.route(), prompt, completion);
        }
        metrics.bytes(true, self.bytes);
        let upstream = &self.route.upstreams[self.upstream_index];
        upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        metrics.request(Some(self.upstream_index), self.status);
        let duration = self.ctx.started.elapsed();
        metrics.duration(duration);
        let hooks = Arc::clone(&self.hooks);
        hooks.end_of_stream(&summary, &mut self.ctx);
        hooks.logging(
            &RequestSummary {
                status: self.status,
                duration,
                attempts: self.attempts,
                stream: Some(summary),
                error: None,
            },
            &mut self.ctx,
        );
    }

    /// After the client left: reads on for `drain_timeout` (and the
    /// route's body cap) to count usage, then finishes.
    async fn drain(mut self: Box<Self>) {
        let limit = self.route.max_response_body();
        let budget = self.route.drain_timeout();
        let mut read: u64 = 0;
        let mut splitter = self.splitter.take().unwrap_or_default();
        let mut events = Vec::new();
        let drained = tokio::time::timeout(budget, async {
            while let Some(upstream) = self.upstream.as_mut() {
                match upstream.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            read += data.len() as u64;
                            if limit > 0 && read > limit {
                                break;
                            }
                            if splitter.push(data, &mut events).is_err() {
                                break;
                            }
                            for event in events.drain(..) {
                                let f = facts(&event);
                                self.completed |= f.ends;
                                if f.usage.is_some() {
                                    self.usage = f.usage;
                                }
                            }
                        }
                    }
                    Some(Err(_)) => break,
                    None => return true,
                }
            }
            false
        })
        .await;
        self.upstream = None;
        tracing::debug!(route = %self.route.settings.name, read, ended = matches!(drained, Ok(true)), "drained a stream its client left");
        self.finish(true);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamCut>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        let Some(s) = this.state.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            if let Some((bytes, read_at)) = s.out.pop_front() {
                if let Some(at) = read_at {
                    s.event_latency.observe(at.elapsed().as_secs_f64());
                }
                s.bytes += bytes.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if s.upstream.is_none() {
                if let Some(trailers) = s.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                let fatal = s.fatal.take();
                if let Some(state) = this.state.take() {
                    state.finish(false);
                }
                return Poll::Ready(fatal.map(Err));
            }
            if let Some(closing) = &mut s.closing {
                if closing.as_mut().poll(cx).is_ready() {
                    s.closing = None;
                    s.cut(
                        "shutdown",
                        error_type::UPSTREAM_UNAVAILABLE,
                        "the gateway is stopping; the stream was ended before the upstream finished it"
                            .to_owned(),
                    );
                    continue;
                }
            }
            if let Some(timer) = &mut s.first_timer {
                if timer.as_mut().poll(cx).is_ready() {
                    let after = s.route.first_event_timeout();
                    s.cut(
                        "first_event_timeout",
                        error_type::GATEWAY_TIMEOUT,
                        format!(
                            "no content event from the upstream within {:.3}s (first_event_timeout)",
                            after.as_secs_f64()
                        ),
                    );
                    continue;
                }
            }
            if let Some(timer) = &mut s.gap_timer {
                if timer.as_mut().poll(cx).is_ready() {
                    let after = s.route.idle_timeout();
                    s.cut(
                        "idle_timeout",
                        error_type::GATEWAY_TIMEOUT,
                        format!(
                            "no event from the upstream for {:.3}s (idle_timeout)",
                            after.as_secs_f64()
                        ),
                    );
                    continue;
                }
            }
            let Some(upstream) = s.upstream.as_mut() else {
                continue;
            };
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => s.on_end(),
                Poll::Ready(Some(Err(e))) => s.on_error(&e),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => s.on_data(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            s.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let _entered = self.span.enter();
        if state.upstream.is_none() {
            // Ended, but the client left before taking the last pieces.
            let gone = !state.out.is_empty();
            state.finish(gone);
            return;
        }
        let drain = state.route.on_disconnect() == OnDisconnect::Drain;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if drain => {
                handle.spawn(state.drain().instrument(self.span.clone()));
            }
            _ => {
                // Dropping the upstream body closes its connection: the
                // upstream request is cancelled.
                let mut state = state;
                state.upstream = None;
                state.finish(true);
            }
        }
    }
}
