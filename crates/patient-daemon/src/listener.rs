//! The listener: accepts client connections and serves HTTP/1.1 on them
//! with the bounds a daemon reachable by anyone on its address needs.
//!
//! * `TCP_NODELAY` on every accepted socket: a response written in pieces
//!   (a head, then the first event of a stream) is never held back waiting
//!   for the client's delayed ACK.
//! * `header_timeout`: a request head not complete within it closes the
//!   connection. hyper starts the same timer when a kept-alive connection
//!   goes idle after a response, so it is the keep-alive idle limit too.
//! * `body_timeout`: the longest wait between two reads of a request body;
//!   past it the body fails with [`BodyTimedOut`], which the API and the
//!   gateway answer with `408` and `Connection: close`.
//! * `send_timeout`: a client that takes nothing of a response for that
//!   long (a full socket buffer that does not drain) has its connection
//!   closed, so a client that asks and never reads cannot hold a place.
//! * `max_connections`: at the cap, the connection that has waited longest
//!   for a request head is closed to make room, so a flood of half-sent
//!   requests cannot lock real clients out; when every connection is busy
//!   with a request, the new one is closed instead.
//! * Stopping: [`Listener::serve`] stops accepting as soon as its shutdown
//!   future completes, lets connections finish the request in progress
//!   (idle ones close at once), and closes what is left when the grace
//!   period ends, whatever the clients do.

use std::{
    collections::HashMap,
    convert::Infallible,
    error::Error as StdError,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{body::Body, extract::ConnectInfo, Router};
use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Notify, time::Sleep};
use tower_service::Service;

/// The connections a daemon serves at most when the open-files limit
/// leaves room for them.
pub const MAX_CONNECTIONS: u64 = 10_000;

/// How long connections get, once the shutdown timeout has run out and
/// the streams still open were ended, to send their last bytes.
const LAST_BYTES: Duration = Duration::from_millis(500);

/// The bounds of the listener (the settings `header_timeout`,
/// `body_timeout` and `max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request head not complete within it closes the connection; also
    /// how long a kept-alive connection may stay idle.
    pub header_timeout: Duration,
    /// The longest wait between two reads of a request body.
    pub body_timeout: Duration,
    /// The longest a response may wait for the client to take more of it.
    pub send_timeout: Duration,
    /// Open client connections at most.
    pub max_connections: usize,
}

/// The default of `max_connections`: [`MAX_CONNECTIONS`], or half the
/// process's open-files limit when that is less, leaving the other half
/// for the store, upstream connections and the rest.
pub fn default_max_connections() -> u64 {
    match open_files_limit() {
        Some(limit) => MAX_CONNECTIONS.min((limit / 2).max(1)),
        None => MAX_CONNECTIONS,
    }
}

/// The soft open-files limit of this process, where it can be read.
///
/// Read from `/proc/self/limits` rather than through `getrlimit`: the
/// workspace forbids `unsafe` code, and one number does not justify a
/// dependency on a system-call crate.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

/// A request body that waited longer than `body_timeout` for its next
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimedOut(pub Duration);

impl fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request body sent nothing for {:.3}s (body_timeout)",
            self.0.as_secs_f64()
        )
    }
}

impl StdError for BodyTimedOut {}

/// Whether `error` (or an error in its `source()` chain) is a
/// [`BodyTimedOut`].
pub fn is_body_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The listener of the daemon: the router served on accepted connections
/// within [`Limits`].
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    limits: Limits,
}

impl Listener {
    /// Serves on `listener` within `limits`.
    pub fn new(listener: TcpListener, limits: Limits) -> Listener {
        Listener { listener, limits }
    }

    /// Serves `router` until `shutdown` completes, then stops accepting,
    /// lets each connection finish the request in progress for up to
    /// `grace`, calls `at_deadline` (which ends what streams are still
    /// open) and gives the connections a moment to send their last bytes,
    /// then closes the rest. Returns when every connection is closed.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send,
        grace: impl Fn() -> Duration,
        at_deadline: impl FnOnce(),
    ) {
        let registry = Arc::new(Registry::new());
        let stopping = Arc::new(Notify::new());
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    if is_out_of_descriptors(&error) {
                        // Make room, then try again shortly.
                        registry.evict_longest_waiting();
                        tracing::warn!(%error, "out of file descriptors; closed the connection that waited longest for a request head");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        tracing::debug!(%error, "accept failed");
                    }
                    continue;
                }
            };
            if registry.len() >= self.limits.max_connections && !registry.evict_longest_waiting() {
                tracing::warn!(
                    %peer,
                    max_connections = self.limits.max_connections,
                    "at max_connections with every connection busy; closed a new one"
                );
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let conn = registry.insert();
            tokio::spawn(serve_connection(
                stream,
                peer,
                router.clone(),
                self.limits,
                conn,
                Arc::clone(&registry),
                Arc::clone(&stopping),
            ));
        }
        drop(self.listener);
        registry.set_stopping();
        stopping.notify_waiters();
        let drained = tokio::time::timeout(grace(), registry.emptied()).await;
        if drained.is_err() {
            at_deadline();
            let _ = tokio::time::timeout(LAST_BYTES, registry.emptied()).await;
        }
        if !registry.is_empty() {
            let open = registry.close_all();
            tracing::warn!(
                open,
                "closed the connections still open when the shutdown timeout ended"
            );
            // Each closes at its next poll; this does not wait on clients.
            let _ = tokio::time::timeout(Duration::from_secs(1), registry.emptied()).await;
        }
    }
}

fn is_out_of_descriptors(error: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(error.raw_os_error(), Some(23 | 24))
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    conn: Arc<ConnState>,
    registry: Arc<Registry>,
    stopping: Arc<Notify>,
) {
    let state = Arc::clone(&conn);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        state.busy();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(ConnectInfo(peer));
        let request =
            Request::from_parts(parts, Body::new(TimedBody::new(body, limits.body_timeout)));
        let mut router = router.clone();
        let state = Arc::clone(&state);
        async move {
            let response = match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            // hyper takes any body: no second box around the router's.
            let mut response = response.map(|body| IdleWhenDone {
                body,
                conn: Some(state),
            });
            if response.extensions().get::<CloseConnection>().is_some() {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(
            TokioIo::new(SendTimed::new(stream, limits.send_timeout)),
            service,
        );
    tokio::pin!(connection);
    // Registered before the flag is read, so a shutdown between the two is
    // not missed.
    let stop = stopping.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut graceful = registry.is_stopping();
    if graceful {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            () = conn.close.notified() => break,
            () = &mut stop, if !graceful => {
                graceful = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    registry.remove(conn.id);
}

/// A response extension asking the listener to close the connection after
/// this response (a request body that timed out cannot be read further).
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// One connection's place in the registry.
#[derive(Debug)]
struct ConnState {
    id: u64,
    /// Milliseconds since the registry's epoch, plus one, since the
    /// connection began waiting for a request head; 0 while a request is
    /// in progress.
    waiting_since: AtomicU64,
    close: Notify,
    epoch: Instant,
}

impl ConnState {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn busy(&self) {
        self.waiting_since.store(0, Ordering::Release);
    }

    fn idle(&self) {
        self.waiting_since.store(self.now(), Ordering::Release);
    }
}

/// The open connections.
#[derive(Debug)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next: AtomicU64,
    epoch: Instant,
    emptied: Notify,
    stopping: std::sync::atomic::AtomicBool,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            emptied: Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn insert(&self) -> Arc<ConnState> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState {
            id,
            waiting_since: AtomicU64::new(0),
            close: Notify::new(),
            epoch: self.epoch,
        });
        conn.idle();
        self.lock().insert(id, Arc::clone(&conn));
        conn
    }

    fn remove(&self, id: u64) {
        let mut conns = self.lock();
        conns.remove(&id);
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Closes the connection that has waited longest for a request head;
    /// false when every connection has a request in progress.
    fn evict_longest_waiting(&self) -> bool {
        let mut conns = self.lock();
        let oldest = conns
            .values()
            .filter_map(|c| {
                let since = c.waiting_since.load(Ordering::Acquire);
                (since > 0).then_some((since, c.id))
            })
            .min();
        match oldest.and_then(|(_, id)| conns.remove(&id)) {
            Some(conn) => {
                conn.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Closes every connection; returns how many were open.
    fn close_all(&self) -> usize {
        let conns = self.lock();
        for conn in conns.values() {
            conn.close.notify_one();
        }
        conns.len()
    }

    /// Completes once no connection is open.
    async fn emptied(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// A request body that fails with [`BodyTimedOut`] when it waits longer
/// than its timeout between two frames.
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> TimedBody {
        TimedBody {
            inner,
            timeout,
            timer: None,
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // The clock restarts at each read.
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that marks its connection as waiting for the next
/// request head once it has been sent (or dropped).
struct IdleWhenDone {
    body: Body,
    conn: Option<Arc<ConnState>>,
}

impl IdleWhenDone {
    fn done(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.idle();
        }
    }
}

impl Drop for IdleWhenDone {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for IdleWhenDone {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.done();
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

/// A client socket whose writes fail with `TimedOut` once one has waited
/// `timeout` for the client to take anything (its receive window stays
/// full): hyper then closes the connection.
struct SendTimed {
    stream: tokio::net::TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl SendTimed {
    fn new(stream: tokio::net::TcpStream, timeout: Duration) -> SendTimed {
        SendTimed {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// A write that could not go on: arms the clock, or fails when it ran
    /// out.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing of the response for {:.3}s (send_timeout)",
                    timeout.as_secs_f64()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for SendTimed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SendTimed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
