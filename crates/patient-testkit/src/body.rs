//! The response body type of the upstream server.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

/// A response body: complete, pre-split into chunks, streamed from a task
/// (or a test), or the request body sent back.
#[derive(Debug)]
pub(crate) enum Body {
    /// One buffer with a known length (sent with `Content-Length`).
    Full(Option<Bytes>),
    /// Several frames of unknown total length (sent chunked on HTTP/1.1).
    Chunks(VecDeque<Bytes>),
    /// Frames (data, then possibly trailers) produced by a task or a test;
    /// the body ends when the sender is dropped.
    Channel(mpsc::Receiver<Frame<Bytes>>),
    /// The request body, frame by frame as it arrives; a failed request body
    /// ends it.
    Mirror(Incoming),
}

impl Body {
    /// A complete body.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Body::Full(Some(bytes.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.get_mut() {
            Body::Full(bytes) => bytes.take(),
            Body::Chunks(chunks) => chunks.pop_front(),
            Body::Channel(rx) => return rx.poll_recv(cx).map(|frame| frame.map(Ok)),
            Body::Mirror(incoming) => {
                return Pin::new(incoming)
                    .poll_frame(cx)
                    .map(|frame| frame.and_then(Result::ok).map(Ok))
            }
        };
        Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Chunks(chunks) => chunks.is_empty(),
            Body::Channel(_) => false,
            Body::Mirror(incoming) => http_body::Body::is_end_stream(incoming),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Chunks(_) | Body::Channel(_) | Body::Mirror(_) => SizeHint::default(),
        }
    }
}
