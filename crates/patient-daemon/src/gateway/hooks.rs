//! Hooks for embedders: one trait whose methods all have defaults, called at
//! fixed points of every proxied request with a per-request context (the
//! shape of pingora's `ProxyHttp`).
//!
//! Order for one request: [`request_filter`](ProxyHooks::request_filter)
//! → [`pick_upstream`](ProxyHooks::pick_upstream) →
//! [`upstream_request_filter`](ProxyHooks::upstream_request_filter) (again
//! for each upstream tried) → [`response_filter`](ProxyHooks::response_filter)
//! → [`chunk_filter`](ProxyHooks::chunk_filter) or
//! [`event_filter`](ProxyHooks::event_filter) per piece of a streamed body →
//! [`end_of_stream`](ProxyHooks::end_of_stream) → [`logging`](ProxyHooks::logging).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::sse::SseEvent;

/// The attribute for implementing [`ProxyHooks`] with `async fn`s.
pub use patient_http::async_trait;

/// What the hooks of one request share: set by the gateway, with room for
/// the embedder's own values in [`extensions`](Self::extensions).
#[derive(Debug)]
pub struct ProxyContext {
    /// The route's name.
    pub route: String,
    /// A new id per request (also sent upstream as `X-Request-ID` when the
    /// client sent none).
    pub request_id: String,
    /// The upstream the request went to (its origin), once picked.
    pub upstream: Option<String>,
    /// Whether the request takes the streaming path.
    pub streaming: bool,
    /// When the gateway took the request.
    pub started: Instant,
    /// The embedder's values.
    pub extensions: http::Extensions,
}

/// The client's request as the hooks see it before it is forwarded.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI as the client sent it.
    pub uri: &'a Uri,
    /// The headers (hop-by-hop fields already removed); a hook may change
    /// them.
    pub headers: &'a mut HeaderMap,
    /// The whole body (it has been read, under the route's cap).
    pub body: &'a Bytes,
}

/// A request about to be sent to one upstream.
#[derive(Debug)]
pub struct UpstreamRequest<'a> {
    /// The upstream's origin.
    pub upstream: &'a str,
    /// The path and query sent.
    pub path_and_query: &'a mut String,
    /// The headers sent (forwarding headers and the credential set).
    pub headers: &'a mut HeaderMap,
}

/// An answer a hook gives itself instead of forwarding.
#[derive(Debug, Clone)]
pub struct HookResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// What to do with one event (or chunk) of a streamed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<T> {
    /// Send it on as it is.
    Pass,
    /// Leave it out.
    Drop,
    /// Send this instead.
    Replace(T),
    /// Send these instead, in order.
    FanOut(Vec<T>),
}

/// How a streamed body ended, for [`ProxyHooks::end_of_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// Bytes sent to the client.
    pub bytes: u64,
    /// Events sent to the client (event streams only).
    pub events: u64,
    /// Whether the stream reached its end (for an OpenAI-style stream:
    /// `[DONE]` or a `finish_reason`); false when the upstream cut it, a
    /// timer or a cap ended it, or the client left.
    pub completed: bool,
    /// Whether the client left before the end.
    pub client_gone: bool,
    /// Prompt and completion tokens of a final `usage` event, when one came.
    pub usage: Option<(u64, u64)>,
}

/// What [`ProxyHooks::logging`] gets once a request is over.
#[derive(Debug, Clone)]
pub struct RequestSummary {
    /// The status sent to the client.
    pub status: u16,
    /// From taking the request to the end of its response.
    pub duration: Duration,
    /// Attempts made upstream.
    pub attempts: u32,
    /// The stream's summary, for a streamed response.
    pub stream: Option<StreamSummary>,
    /// The gateway's error type when the gateway answered an error itself.
    pub error: Option<&'static str>,
}

/// The embedder's hooks; every method has a default that changes nothing.
/// Synchronous hooks run on the response path of a stream and must not
/// block.
#[patient_http::async_trait]
pub trait ProxyHooks: Send + Sync + 'static {
    /// Runs first, once the request's route is known and its body read:
    /// may change the request's headers, or answer it itself (nothing is
    /// forwarded then).
    async fn request_filter(
        &self,
        request: RequestHead<'_>,
        ctx: &mut ProxyContext,
    ) -> Option<HookResponse> {
        let _ = (request, ctx);
        None
    }

    /// Runs before each upstream is chosen, with the route's upstreams in
    /// the order the balancer would try them (open breakers left out):
    /// return the index of the one to try first, or `None` to keep the
    /// balancer's order.
    fn pick_upstream(&self, candidates: &[&str], ctx: &ProxyContext) -> Option<usize> {
        let _ = (candidates, ctx);
        None
    }

    /// Runs before the request goes to an upstream (each one tried on
    /// failover): may change the path and the headers sent.
    async fn upstream_request_filter(&self, request: UpstreamRequest<'_>, ctx: &mut ProxyContext) {
        let _ = (request, ctx);
    }

    /// Runs when the upstream's response head is in (after retries and
    /// failover), before it goes to the client: may change the status and
    /// headers (hop-by-hop fields already removed).
    fn response_filter(
        &self,
        status: &mut StatusCode,
        headers: &mut HeaderMap,
        ctx: &mut ProxyContext,
    ) {
        let _ = (status, headers, ctx);
    }

    /// Runs for each chunk of a streamed body that is not an event stream,
    /// as it arrives.
    fn chunk_filter(&self, chunk: &Bytes, ctx: &mut ProxyContext) -> Action<Bytes> {
        let _ = (chunk, ctx);
        Action::Pass
    }

    /// Runs for each whole event of an event stream (events split across
    /// reads are put back together first), comments included.
    fn event_filter(&self, event: &SseEvent, ctx: &mut ProxyContext) -> Action<Bytes> {
        let _ = (event, ctx);
        Action::Pass
    }

    /// Runs once when a streamed body ends, however it ended.
    fn end_of_stream(&self, summary: &StreamSummary, ctx: &mut ProxyContext) {
        let _ = (summary, ctx);
    }

    /// Runs last, once per request, whatever happened.
    fn logging(&self, summary: &RequestSummary, ctx: &mut ProxyContext) {
        let _ = (summary, ctx);
    }
}

/// Hooks that change nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl ProxyHooks for NoHooks {}
