//! Response bodies a test writes itself: [`BodyFeed`], served by `/feed`.

use std::{collections::HashMap, sync::Mutex};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use tokio::sync::mpsc;

/// Feeds registered by [`Upstream::feed`](super::Upstream::feed) and not yet
/// requested.
#[derive(Debug, Default)]
pub(super) struct Feeds {
    waiting: Mutex<HashMap<String, mpsc::Receiver<Frame<Bytes>>>>,
}

impl Feeds {
    /// Registers `key`, replacing an earlier feed of the same key that was
    /// never requested.
    pub(super) fn register(&self, key: &str) -> BodyFeed {
        let (tx, rx) = mpsc::channel(1);
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.insert(key.to_owned(), rx);
        BodyFeed { tx }
    }

    /// The body of the feed registered as `key`, once.
    pub(super) fn take(&self, key: &str) -> Option<mpsc::Receiver<Frame<Bytes>>> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.remove(key)
    }
}

/// The writing end of the body of a `/feed?key=K` response: the test sends
/// each piece of the body when it chooses, so it can check what the client
/// sees before the body goes on or ends (no timing involved).
///
/// The response head goes out as soon as the request arrives; the body ends
/// when the feed is dropped or its trailers are sent.
#[derive(Debug)]
pub struct BodyFeed {
    tx: mpsc::Sender<Frame<Bytes>>,
}

impl BodyFeed {
    /// Sends one data frame; waits while the previous one has not been taken
    /// by the server. `false` when the response body is gone (the client
    /// closed the connection or reset the stream).
    pub async fn send(&self, data: impl Into<Bytes>) -> bool {
        self.tx.send(Frame::data(data.into())).await.is_ok()
    }

    /// Sends the trailers and ends the body. On HTTP/1.1, hyper sends only
    /// the trailer fields the response declared in a `trailer` header (a
    /// `trailer=name` query parameter) and only to a client that sent
    /// `te: trailers`. `false` when the response body is gone.
    pub async fn send_trailers(self, trailers: HeaderMap) -> bool {
        self.tx.send(Frame::trailers(trailers)).await.is_ok()
    }

    /// Waits until the response body is gone: the client closed the
    /// connection or reset the stream, or the server dropped the body.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Whether the response body is gone (see [`closed`](Self::closed)).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
