//! Requests as the transport sends them: [`OutgoingRequest`] (a body in one
//! buffer, for [`HttpClient::send`](super::HttpClient::send)) and
//! [`StreamingRequest`] (a [`RequestBody`] that may be a stream, for
//! [`HttpClient::send_streaming`](super::HttpClient::send_streaming)).

use std::{
    error::Error as StdError,
    fmt,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use url::Url;

/// The error type a streamed request body may fail with.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A request as the transport sends it.
#[derive(Clone, Debug)]
pub struct OutgoingRequest {
    /// The method.
    pub method: Method,
    /// The absolute `http` or `https` URL; credentials in it become basic
    /// `Authorization` unless the request has one; the fragment is not sent.
    pub url: Url,
    /// Headers sent as given; `User-Agent` and (for HTTP/1.1) `Host` are added
    /// when missing.
    pub headers: HeaderMap,
    /// The body; empty for none.
    pub body: Bytes,
    /// Timeout of this one exchange, an attempt (connect, send, reading the
    /// whole body); `None` uses the client's `request_timeout`.
    pub timeout: Option<Duration>,
    /// Longest wait for the next piece of the body; `None` uses the client's
    /// `stall_timeout`.
    pub stall_timeout: Option<Duration>,
}

impl OutgoingRequest {
    /// A request without headers, body or timeout of its own.
    pub fn new(method: Method, url: Url) -> Self {
        OutgoingRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: None,
            stall_timeout: None,
        }
    }
}

/// A request whose response is read as it arrives, and whose body may be a
/// stream; sent by [`HttpClient::send_streaming`](super::HttpClient::send_streaming).
#[derive(Debug)]
pub struct StreamingRequest {
    /// The method.
    pub method: Method,
    /// The absolute `http` or `https` URL, as for [`OutgoingRequest::url`].
    pub url: Url,
    /// Headers sent as given; `User-Agent` and (for HTTP/1.1) `Host` are added
    /// when missing.
    pub headers: HeaderMap,
    /// The body: [`RequestBody::empty`] (the default), a buffer, or a stream.
    pub body: RequestBody,
    /// Timeout of getting the response head (connect, send, and wait for the
    /// status and headers); the body is not bounded by it. `None` uses the
    /// client's `request_timeout`.
    pub timeout: Option<Duration>,
    /// Longest wait between two frames of the response body (and for the
    /// first one after the head); `None` uses the client's `stall_timeout`.
    pub stall_timeout: Option<Duration>,
    /// Largest response body accepted, in bytes (after decompression when
    /// decompressing); a longer body fails with a `response_too_large` error
    /// once the limit is passed. `None` (the default) or `Some(0)`: unlimited
    /// (the client's `max_response_size` applies to
    /// [`send`](super::HttpClient::send) only).
    pub max_response_size: Option<usize>,
}

impl StreamingRequest {
    /// A request without headers, body, timeouts or size limit of its own.
    pub fn new(method: Method, url: Url) -> Self {
        StreamingRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: RequestBody::empty(),
            timeout: None,
            stall_timeout: None,
            max_response_size: None,
        }
    }
}

impl From<OutgoingRequest> for StreamingRequest {
    /// The same request with its buffer as the body and no size limit.
    fn from(request: OutgoingRequest) -> Self {
        StreamingRequest {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: RequestBody::full(request.body),
            timeout: request.timeout,
            stall_timeout: request.stall_timeout,
            max_response_size: None,
        }
    }
}

/// The body of a [`StreamingRequest`]: empty, one buffer, or any
/// [`http_body::Body`] of [`Bytes`] (a stream, trailers included).
///
/// A buffer is sent with `Content-Length` and can be sent again when a
/// pooled connection turns out stale; a stream is sent as it is produced
/// (chunked on HTTP/1.1 unless the request has a `Content-Length`) and only
/// once: if it fails midway, the request fails with an error for which
/// [`TransportError::is_request_body`](super::TransportError::is_request_body)
/// is true.
pub struct RequestBody {
    kind: Kind,
}

enum Kind {
    /// Empty once sent, or when there is no body.
    Full(Bytes),
    /// Boxed so a body stays as small as a buffer: requests move through
    /// hyper's channels by value.
    Stream(Box<StreamBody>),
}

struct StreamBody {
    /// In a mutex only so the body is `Sync` (polling goes through
    /// `get_mut`, which never locks).
    body: Mutex<BoxedBody>,
    failure: Arc<BodyFailure>,
}

type BoxedBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// The stream of a body, for the `&self` methods of [`Body`].
fn locked(body: &Mutex<BoxedBody>) -> std::sync::MutexGuard<'_, BoxedBody> {
    body.lock().unwrap_or_else(|e| e.into_inner())
}

impl RequestBody {
    /// No body.
    pub fn empty() -> Self {
        RequestBody {
            kind: Kind::Full(Bytes::new()),
        }
    }

    /// A body in one buffer.
    pub fn full(data: impl Into<Bytes>) -> Self {
        RequestBody {
            kind: Kind::Full(data.into()),
        }
    }

    /// A body sent frame by frame as `body` produces them.
    pub fn stream<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        RequestBody {
            kind: Kind::Stream(Box::new(StreamBody {
                body: Mutex::new(Box::pin(body.map_err(Into::into))),
                failure: Arc::new(BodyFailure::default()),
            })),
        }
    }

    /// A copy to send again, when the body is a buffer.
    pub(crate) fn replay(&self) -> Option<RequestBody> {
        match &self.kind {
            Kind::Full(data) => Some(RequestBody {
                kind: Kind::Full(data.clone()),
            }),
            Kind::Stream(_) => None,
        }
    }

    /// Where a stream records its failure (hyper only sees a stand-in).
    pub(crate) fn failure(&self) -> Option<Arc<BodyFailure>> {
        match &self.kind {
            Kind::Full(_) => None,
            Kind::Stream(stream) => Some(Arc::clone(&stream.failure)),
        }
    }

    /// The buffer of a buffered body, to compress it.
    pub(crate) fn as_full(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Full(data) => Some(data),
            Kind::Stream(_) => None,
        }
    }
}

impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::empty()
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(data) => f
                .debug_tuple("RequestBody::Full")
                .field(&data.len())
                .finish(),
            Kind::Stream(_) => f.write_str("RequestBody::Stream"),
        }
    }
}

impl From<Bytes> for RequestBody {
    fn from(data: Bytes) -> Self {
        RequestBody::full(data)
    }
}

impl From<Vec<u8>> for RequestBody {
    fn from(data: Vec<u8>) -> Self {
        RequestBody::full(data)
    }
}

impl From<String> for RequestBody {
    fn from(data: String) -> Self {
        RequestBody::full(data)
    }
}

impl From<&'static str> for RequestBody {
    fn from(data: &'static str) -> Self {
        RequestBody::full(data)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) if data.is_empty() => Poll::Ready(None),
            Kind::Full(data) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(data))))),
            Kind::Stream(stream) => {
                let StreamBody { body, failure } = &mut **stream;
                let body = body.get_mut().unwrap_or_else(|e| e.into_inner());
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        failure.record(e);
                        Poll::Ready(Some(Err(Box::new(RequestBodyFailed))))
                    }
                    other => other,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_empty(),
            Kind::Stream(stream) => locked(&stream.body).is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.len() as u64),
            Kind::Stream(stream) => locked(&stream.body).size_hint(),
        }
    }
}

/// The error of a streamed body that failed, kept for the request's error.
#[derive(Default)]
pub(crate) struct BodyFailure(Mutex<Option<BoxError>>);

impl BodyFailure {
    fn record(&self, error: BoxError) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(error);
    }

    /// The recorded error, once.
    pub(crate) fn take(&self) -> Option<BoxError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What hyper sees when a streamed body fails (the real error is kept in
/// [`BodyFailure`]).
#[derive(Debug)]
struct RequestBodyFailed;

impl fmt::Display for RequestBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body failed")
    }
}

impl StdError for RequestBodyFailed {}
