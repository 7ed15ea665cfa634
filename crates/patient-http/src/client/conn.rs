//! Connection handles: an HTTP/1.1 connection owned by one request at a
//! time, a shared HTTP/2 connection, and the stream slots that count the
//! requests in flight on it against the server's limit.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Weak,
};

use hyper::client::conn::{http1, http2};

use super::request::RequestBody;

/// Streams an HTTP/2 connection may carry before the server's SETTINGS
/// arrive, when no earlier connection to the origin told (hyper's default).
pub(crate) const DEFAULT_MAX_STREAMS: usize = 100;

/// An HTTP/1.1 connection, owned by one request at a time.
pub(crate) struct H1Conn {
    pub(crate) sender: http1::SendRequest<RequestBody>,
    /// Requests sent on this connection so far.
    pub(crate) requests: u32,
    /// The origin's connection slot while a request uses it (see
    /// `max_connections_per_host`); released when the connection goes back
    /// to the pool or closes.
    pub(crate) slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A handle to an HTTP/2 connection (clones multiplex on it).
#[derive(Clone)]
pub(crate) struct H2Conn {
    pub(crate) sender: http2::SendRequest<RequestBody>,
    pub(crate) streams: Arc<H2Streams>,
}

impl H2Conn {
    /// Takes a stream slot on this connection (whether or not one is free:
    /// callers check [`H2Streams::has_room`] first).
    pub(crate) fn stream(&self) -> H2Stream {
        self.streams.in_flight.fetch_add(1, Ordering::Relaxed);
        H2Stream {
            sender: self.sender.clone(),
            slot: StreamSlot(Arc::clone(&self.streams)),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.streams.id
    }
}

/// The streams of one HTTP/2 connection: in flight, and how many the server
/// allows at once.
pub(crate) struct H2Streams {
    id: u64,
    in_flight: AtomicUsize,
    limit: Weak<dyn StreamLimit>,
}

/// Where the server's current `SETTINGS_MAX_CONCURRENT_STREAMS` can be read
/// (the connection itself, as it applies the server's SETTINGS).
pub(crate) trait StreamLimit: Send + Sync {
    /// How many streams the server allows at once right now.
    fn max_streams(&self) -> usize;
}

impl H2Streams {
    pub(crate) fn new(id: u64, limit: Weak<dyn StreamLimit>) -> H2Streams {
        H2Streams {
            id,
            in_flight: AtomicUsize::new(0),
            limit,
        }
    }

    /// Whether another request can start a stream now.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.max()
    }

    /// Whether no request is using the connection.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// The server's limit (0 once the connection is gone).
    pub(crate) fn max(&self) -> usize {
        self.limit.upgrade().map_or(0, |limit| limit.max_streams())
    }
}

/// One request's stream on an HTTP/2 connection: the slot is released when
/// this is dropped (the response body ended, failed or was dropped).
pub(crate) struct H2Stream {
    pub(crate) sender: http2::SendRequest<RequestBody>,
    pub(crate) slot: StreamSlot,
}

/// A counted stream of an HTTP/2 connection.
pub(crate) struct StreamSlot(Arc<H2Streams>);

impl StreamSlot {
    /// The id of the connection.
    pub(crate) fn conn_id(&self) -> u64 {
        self.0.id
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A freshly established connection.
pub(crate) enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}
