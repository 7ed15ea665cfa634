//! Responses: [`RawResponse`] (read in full, from
//! [`HttpClient::send`](super::HttpClient::send)) and [`StreamingResponse`]
//! whose [`ResponseBody`] yields frames as they arrive (from
//! [`HttpClient::send_streaming`](super::HttpClient::send_streaming)).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::{
    conn::{H1Conn, StreamSlot},
    decode::{DecodeError, Decoder},
    error::{ErrorType, Phase, TransportError},
    origin::Origin,
    pool::Pool,
    request::BodyFailure,
};

/// A response read in full.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The headers (without `content-encoding` and `content-length` when the
    /// body was decompressed).
    pub headers: HeaderMap,
    /// The whole body (decompressed when decompression is on).
    pub body: Bytes,
    /// The HTTP version spoken.
    pub version: Version,
}

/// A response whose head has arrived and whose body is read as it comes.
///
/// Headers keep repeated fields apart (every `set-cookie` is its own
/// value). Without `content-encoding` and `content-length` when the body is
/// decompressed.
#[derive(Debug)]
pub struct StreamingResponse {
    /// The status code.
    pub status: StatusCode,
    /// The headers, repeated fields kept apart.
    pub headers: HeaderMap,
    /// The HTTP version spoken.
    pub version: Version,
    /// The body, frame by frame.
    pub body: ResponseBody,
}

impl StreamingResponse {
    /// The same response as an [`http::Response`].
    pub fn into_http(self) -> http::Response<ResponseBody> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        *response.version_mut() = self.version;
        response
    }
}

/// What the body holds of its connection until it ends.
pub(crate) enum Held {
    /// Nothing (the response had no body, or it has ended).
    Nothing,
    /// An HTTP/1.1 connection, returned to the pool when the body has been
    /// read to its end and closed if the body is dropped before that.
    H1(H1Conn),
    /// A stream of an HTTP/2 connection, released when the body ends; the
    /// stream is reset if the body is dropped before its end.
    H2(StreamSlot),
}

/// The body of a [`StreamingResponse`]: an [`http_body::Body`] yielding
/// data frames as they arrive (decompressed when decompression is on) and
/// the trailers, if any, last.
///
/// Nothing is buffered beyond the frame at hand. Reading the body to its end
/// returns an HTTP/1.1 connection to the pool; dropping it earlier closes
/// the connection (HTTP/1.1) or resets the stream (HTTP/2). A stall
/// timeout, the size limit, a broken connection or an invalid compressed
/// body end the body with a [`TransportError`] (after which it yields
/// nothing).
pub struct ResponseBody {
    /// `None` once the body has ended or failed.
    incoming: Option<Incoming>,
    held: Held,
    pool: Arc<Pool>,
    origin: Origin,
    /// Largest body accepted (raw and decoded), `usize::MAX` for no limit.
    limit: usize,
    received: usize,
    /// The announced `content-length`, to size the buffer when reading in
    /// full.
    length_hint: Option<u64>,
    /// Decoding, stall timer, streamed request body: see [`Extras`].
    extras: Option<Box<Extras>>,
}

/// What only some bodies need (decoding, a stall timer, a streamed request
/// body), apart so a plain body stays small: it is moved through every
/// layer above.
#[derive(Default)]
pub(crate) struct Extras {
    decoder: Option<Decoder>,
    stall: Option<Stall>,
    /// A frame held back while the decoder's last bytes go out first.
    pending: Option<Frame<Bytes>>,
    /// Where a streamed request body records its failure.
    request_failure: Option<Arc<BodyFailure>>,
}

impl Extras {
    /// The extras a body needs, if any.
    pub(crate) fn new(
        decoder: Option<Decoder>,
        stall: Option<Duration>,
        request_failure: Option<Arc<BodyFailure>>,
    ) -> Option<Box<Extras>> {
        if decoder.is_none() && stall.is_none() && request_failure.is_none() {
            return None;
        }
        Some(Box::new(Extras {
            decoder,
            stall: stall.map(|after| Stall {
                after,
                timer: Box::pin(tokio::time::sleep(after)),
            }),
            pending: None,
            request_failure,
        }))
    }
}

struct Stall {
    after: Duration,
    timer: Pin<Box<Sleep>>,
}

impl ResponseBody {
    /// The body of a response whose head just arrived; `incoming` is `None`
    /// when the response has no body (HEAD, 204, 304). `limit` bounds the
    /// raw and the decoded body; `length_hint` is the announced length.
    pub(crate) fn new(
        incoming: Option<Incoming>,
        held: Held,
        pool: Arc<Pool>,
        origin: Origin,
        limit: Option<usize>,
        length_hint: Option<u64>,
        extras: Option<Box<Extras>>,
    ) -> ResponseBody {
        let ended = incoming.as_ref().is_none_or(Body::is_end_stream);
        let mut body = ResponseBody {
            incoming,
            held,
            pool,
            origin,
            limit: limit.unwrap_or(usize::MAX),
            received: 0,
            length_hint,
            extras,
        };
        if ended {
            // Nothing to read: the connection is free now.
            body.incoming = None;
            body.extras = None;
            body.release();
        }
        body
    }

    /// Reads the rest of the body into one buffer (trailers are dropped).
    /// A body of one frame is returned without copying.
    pub async fn bytes(mut self) -> Result<Bytes, TransportError> {
        self.read_all().await
    }

    /// [`bytes`](Self::bytes) in place.
    pub(crate) async fn read_all(&mut self) -> Result<Bytes, TransportError> {
        let mut first: Option<Bytes> = None;
        let mut rest: Option<BytesMut> = None;
        while let Some(frame) = self.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue; // trailers
            };
            if data.is_empty() {
                continue;
            }
            match (&mut first, &mut rest) {
                (None, None) => first = Some(data),
                (Some(head), None) => {
                    let hint = self
                        .length_hint
                        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
                        .min(self.limit)
                        .max(head.len() + data.len());
                    let mut buf = BytesMut::with_capacity(hint);
                    buf.extend_from_slice(head);
                    buf.extend_from_slice(&data);
                    first = None;
                    rest = Some(buf);
                }
                (_, Some(buf)) => buf.extend_from_slice(&data),
            }
        }
        Ok(match (first, rest) {
            (_, Some(buf)) => buf.freeze(),
            (Some(data), None) => data,
            (None, None) => Bytes::new(),
        })
    }

    fn decoder(&mut self) -> Option<&mut Decoder> {
        self.extras.as_mut()?.decoder.as_mut()
    }

    fn has_pending(&self) -> bool {
        self.extras.as_ref().is_some_and(|e| e.pending.is_some())
    }

    /// Holds `frame` back for the next poll (only while decoding, which has
    /// extras).
    fn hold(&mut self, frame: Frame<Bytes>) {
        self.extras.get_or_insert_with(Box::default).pending = Some(frame);
    }

    /// Hands the connection back: an HTTP/1.1 connection to the pool, an
    /// HTTP/2 stream slot to its connection.
    fn release(&mut self) {
        if let Held::H1(conn) = std::mem::replace(&mut self.held, Held::Nothing) {
            self.pool.checkin(&self.origin, conn);
        }
    }

    /// Ends the body with `error`: the connection is dropped (an HTTP/1.1
    /// connection closes, an HTTP/2 one is no longer shared when `retire`).
    fn fail(&mut self, error: TransportError, retire: bool) -> TransportError {
        self.incoming = None;
        self.extras = None;
        if let Held::H2(slot) = std::mem::replace(&mut self.held, Held::Nothing) {
            if retire {
                self.pool.retire_h2(&self.origin, slot.conn_id());
            }
        }
        error
    }

    fn fail_hyper(&mut self, error: hyper::Error) -> TransportError {
        let authority = self.origin.authority();
        let failed_body = self
            .extras
            .as_ref()
            .and_then(|e| e.request_failure.as_ref())
            .and_then(|f| f.take());
        let error = match failed_body {
            Some(source) => TransportError::request_body(source, &authority),
            None => TransportError::from_hyper(error, &authority, Phase::Body),
        };
        self.fail(error, true)
    }

    fn fail_decode(&mut self, error: DecodeError) -> TransportError {
        let authority = self.origin.authority();
        let error = match error {
            DecodeError::TooLarge => {
                TransportError::too_large(&authority, self.limit, "after decompression")
            }
            DecodeError::Invalid(e) => TransportError::new(
                ErrorType::Connection,
                "DecompressionError",
                format!("invalid compressed response body from {authority}: {e}"),
            )
            .sent(true)
            .with_source(e),
        };
        self.fail(error, false)
    }

    /// The body's end: the decoder's last bytes, and the connection handed
    /// back.
    fn end(&mut self) -> Result<Bytes, TransportError> {
        self.incoming = None;
        let tail = match self.extras.as_mut().and_then(|e| e.decoder.take()) {
            Some(mut decoder) => match decoder.finish() {
                Ok(tail) => tail,
                Err(e) => return Err(self.fail_decode(e)),
            },
            None => Bytes::new(),
        };
        if let Some(extras) = &mut self.extras {
            extras.stall = None;
        }
        self.release();
        Ok(tail)
    }

    /// Whether the stall timer has run out while the body waits.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let stall = self.extras.as_mut()?.stall.as_mut()?;
        stall
            .timer
            .as_mut()
            .poll(cx)
            .is_ready()
            .then_some(stall.after)
    }

    /// A frame arrived: the stall timer starts again.
    fn rearm_stall(&mut self) {
        if let Some(stall) = self.extras.as_mut().and_then(|e| e.stall.as_mut()) {
            stall
                .timer
                .as_mut()
                .reset(crate::time::saturating_after(Instant::now(), stall.after));
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = TransportError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TransportError>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.extras.as_mut().and_then(|e| e.pending.take()) {
                return Poll::Ready(Some(Ok(frame)));
            }
            let Some(incoming) = this.incoming.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match Pin::new(incoming).poll_frame(cx) {
                Poll::Pending => {
                    if let Some(after) = this.stalled(cx) {
                        let error = TransportError::timeout(
                            "StallTimeout",
                            &this.origin.authority(),
                            Phase::Body,
                            after,
                        );
                        return Poll::Ready(Some(Err(this.fail(error, true))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    return match this.end() {
                        Ok(tail) if tail.is_empty() => Poll::Ready(None),
                        Ok(tail) => Poll::Ready(Some(Ok(Frame::data(tail)))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(this.fail_hyper(e)))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            this.rearm_stall();
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue; // a frame kind this body does not know
                    };
                    return match this.end() {
                        Ok(tail) if tail.is_empty() => {
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Ok(tail) => {
                            this.hold(Frame::trailers(trailers));
                            Poll::Ready(Some(Ok(Frame::data(tail))))
                        }
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
            };
            this.received = this.received.saturating_add(data.len());
            if this.received > this.limit {
                let read = this.received;
                let error = TransportError::too_large(
                    &this.origin.authority(),
                    this.limit,
                    &format!("{read} bytes read"),
                );
                return Poll::Ready(Some(Err(this.fail(error, false))));
            }
            let mut out = match this.decoder() {
                None => data,
                Some(decoder) => match decoder.push(&data) {
                    Ok(out) => out,
                    Err(e) => return Poll::Ready(Some(Err(this.fail_decode(e)))),
                },
            };
            if this.incoming.as_ref().is_some_and(Body::is_end_stream) {
                match this.end() {
                    Ok(tail) if out.is_empty() => out = tail,
                    Ok(tail) if !tail.is_empty() => this.hold(Frame::data(tail)),
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            if out.is_empty() {
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_none() && !self.has_pending()
    }

    fn size_hint(&self) -> SizeHint {
        let decoding = self.extras.as_ref().is_some_and(|e| e.decoder.is_some());
        match &self.incoming {
            None if !self.has_pending() => SizeHint::with_exact(0),
            Some(incoming) if !decoding => incoming.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("origin", &self.origin.authority())
            .field("received", &self.received)
            .field("ended", &self.is_end_stream())
            .field(
                "decoding",
                &self.extras.as_ref().is_some_and(|e| e.decoder.is_some()),
            )
            .finish_non_exhaustive()
    }
}
