//! A task's final response as an HTTP exchange: its head as received
//! (repeated fields apart) and its body, read in full under a size limit or
//! handed over as a stream. What a reverse proxy needs of the engine: the
//! same attempts, retries, breaker, limits and deadlines as every other
//! face, with the response passed on rather than turned into a wire
//! [`Response`](patient_wire::Response).
//!
//! Retries and failover happen before the response head is handed back;
//! once the caller holds an [`Exchange`], nothing is retried. A streamed
//! body keeps the upstream's concurrency slot until it ends or is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use patient_wire::{HeaderValue, Response};

use crate::{
    client::{ResponseBody, TransportError},
    limit::LimitPermit,
    LimitWait,
};

/// Whether header fields given as they are carry an idempotency key, as
/// [`Request::has_idempotency_key`](patient_wire::Request::has_idempotency_key)
/// reads a request's own: an `Idempotency-Key` or `X-Idempotency-Key` field
/// that is not blank.
pub fn has_idempotency_key(headers: &HeaderMap) -> bool {
    patient_wire::IDEMPOTENCY_KEY_HEADERS.iter().any(|name| {
        headers
            .get(*name)
            .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty())
    })
}

/// How [`AwaitableClient::exchange`](crate::AwaitableClient::exchange) reads
/// the final response's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyMode {
    /// Read in full within the attempt's timeout; a body over the limit
    /// fails the attempt with a request error of class `ResponseTooLarge`.
    Buffered,
    /// Handed over as soon as the head arrives; the request timeout covers
    /// the head only, the idle timeout every gap in the body after it.
    Streaming,
    /// Streamed when the response is an event stream
    /// (`Content-Type: text/event-stream`), read in full otherwise.
    Auto,
}

/// What an exchange asks of the transport besides the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Buffered or streamed body.
    pub mode: BodyMode,
    /// Largest response body in bytes; `None` or `Some(0)`: unlimited.
    pub max_body: Option<usize>,
    /// Longest gap between two frames of the body (and before the first);
    /// `None` uses the client's stall timeout.
    pub idle_timeout: Option<Duration>,
    /// How long an attempt may wait for the upstream's rate and
    /// concurrency limits and a 429 cool-down before the task fails with a
    /// refusal (`CoolingDown`, `RateLimited`, `AtCapacity`).
    pub limit_wait: LimitWait,
}

impl ExchangeOptions {
    /// A body read in full, without a limit of its own.
    pub fn buffered() -> Self {
        ExchangeOptions {
            mode: BodyMode::Buffered,
            max_body: None,
            idle_timeout: None,
            limit_wait: LimitWait::Wait,
        }
    }

    /// A body handed over as a stream, without a limit of its own.
    pub fn streaming() -> Self {
        ExchangeOptions {
            mode: BodyMode::Streaming,
            ..Self::buffered()
        }
    }

    /// The same options with a body limit (`0`: unlimited).
    pub fn max_body(mut self, max: usize) -> Self {
        self.max_body = (max > 0).then_some(max);
        self
    }

    /// The same options waiting at most `wait` for the limits.
    pub fn limit_wait(mut self, wait: LimitWait) -> Self {
        self.limit_wait = wait;
        self
    }

    /// The same options with an idle timeout.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }
}

/// The final response of a task run by
/// [`AwaitableClient::exchange`](crate::AwaitableClient::exchange).
#[derive(Debug)]
pub struct Exchange {
    /// The status code.
    pub status: u16,
    /// The headers as received, repeated fields kept apart (hop-by-hop
    /// fields included: a proxy removes them).
    pub headers: HeaderMap,
    /// The body.
    pub body: ExchangeBody,
    /// How many attempts were made (hedges included).
    pub attempts: u32,
    /// Whether the upstream's fallback answered instead of the upstream.
    pub fallback: bool,
}

impl Exchange {
    /// The exchange of a task's response: its raw head and body when the
    /// upstream answered, the wire response itself when a fallback did.
    pub(crate) fn of(response: Response, raw: Option<RawParts>, attempts: u32) -> Exchange {
        let fallback = response.headers.get_str("x-patient-fallback") == Some("true");
        match raw {
            Some(RawParts {
                headers: Some(headers),
                stream,
                permit,
            }) if !fallback => Exchange {
                status: response.status,
                headers,
                body: match stream {
                    Some(body) => ExchangeBody::Stream(StreamBody::new(body, permit)),
                    None => ExchangeBody::Full(response.body.unwrap_or_default()),
                },
                attempts,
                fallback,
            },
            _ => {
                let mut headers = HeaderMap::with_capacity(response.headers.len());
                for (name, value) in response.headers.iter() {
                    let (Ok(name), HeaderValue::Value(value)) =
                        (http::HeaderName::from_bytes(name.as_bytes()), value)
                    else {
                        continue;
                    };
                    if let Ok(value) = http::HeaderValue::from_str(value) {
                        headers.append(name, value);
                    }
                }
                Exchange {
                    status: response.status,
                    headers,
                    body: ExchangeBody::Full(response.body.unwrap_or_default()),
                    attempts,
                    fallback,
                }
            }
        }
    }
}

/// The body of an [`Exchange`].
#[derive(Debug)]
pub enum ExchangeBody {
    /// Read in full.
    Full(Bytes),
    /// Read as it arrives.
    Stream(StreamBody),
}

/// A response body read as it arrives: the transport's [`ResponseBody`]
/// holding the upstream's concurrency slot until it ends or is dropped.
/// Dropping it before its end closes the upstream connection (HTTP/1.1) or
/// resets the stream (HTTP/2): the upstream request is cancelled.
#[derive(Debug)]
pub struct StreamBody {
    body: ResponseBody,
    permit: Option<LimitPermit>,
}

impl StreamBody {
    pub(crate) fn new(body: ResponseBody, permit: Option<LimitPermit>) -> Self {
        StreamBody { body, permit }
    }

    /// The next frame, `None` at the end.
    pub async fn frame(&mut self) -> Option<Result<Frame<Bytes>, TransportError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = TransportError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TransportError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            // Ended: the slot is free before the caller drops the body.
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What the engine keeps of an attempt's response for an exchange.
#[derive(Debug)]
pub(crate) struct RawParts {
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) stream: Option<ResponseBody>,
    pub(crate) permit: Option<LimitPermit>,
}
