//! The response body type of the upstream server.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// A response body: complete, pre-split into chunks, or streamed from a task.
#[derive(Debug)]
pub(crate) enum Body {
    /// One buffer with a known length (sent with `Content-Length`).
    Full(Option<Bytes>),
    /// Several frames of unknown total length (sent chunked on HTTP/1.1).
    Chunks(VecDeque<Bytes>),
    /// Frames produced by a task; the body ends when the sender is dropped.
    Channel(mpsc::Receiver<Bytes>),
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
            Body::Channel(rx) => return rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        };
        Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Chunks(chunks) => chunks.is_empty(),
            Body::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Chunks(_) | Body::Channel(_) => SizeHint::default(),
        }
    }
}
