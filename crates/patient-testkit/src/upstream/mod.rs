//! The upstream test server: real HTTP/1.1 and HTTP/2 on a loopback port.
//!
//! See [`Upstream`] for the routes and [`UpstreamOptions`] for the knobs.

mod feed;
mod openai;
mod routes;

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

pub use self::{
    feed::BodyFeed,
    openai::RecordedRequest,
    routes::{CHARSET_TEXT, COMPRESSED_TEXT},
};
use crate::{fault, listener, Fault, TestCert};

/// Which HTTP versions the main listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocols {
    Auto,
    Http1Only,
    Http2Only,
}

/// How to start an [`Upstream`]; the defaults match [`Upstream::start`].
#[derive(Debug, Clone)]
#[must_use]
pub struct UpstreamOptions {
    listen: SocketAddr,
    fault_listen: SocketAddr,
    tls: Option<TestCert>,
    protocols: Protocols,
    http2_max_concurrent_streams: u32,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            listen: listener::loopback(),
            fault_listen: listener::loopback(),
            tls: None,
            protocols: Protocols::Auto,
            http2_max_concurrent_streams: 10_000,
        }
    }
}

impl UpstreamOptions {
    /// Options with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Address of the main listener. Default `127.0.0.1:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Address of the raw-TCP fault listener. Default `127.0.0.1:0`.
    pub fn fault_listen(mut self, addr: SocketAddr) -> Self {
        self.fault_listen = addr;
        self
    }

    /// Serve HTTPS with `cert`. Default: plain HTTP.
    pub fn tls(mut self, cert: &TestCert) -> Self {
        self.tls = Some(cert.clone());
        self
    }

    /// Accept only HTTP/1.x (TLS offers only `http/1.1` in ALPN). Default:
    /// HTTP/1.1 and HTTP/2 (prior knowledge on plain TCP, ALPN on TLS).
    pub fn http1_only(mut self) -> Self {
        self.protocols = Protocols::Http1Only;
        self
    }

    /// Accept only HTTP/2 (h2c prior knowledge on plain TCP, ALPN `h2` on
    /// TLS). Default: HTTP/1.1 and HTTP/2.
    pub fn http2_only(mut self) -> Self {
        self.protocols = Protocols::Http2Only;
        self
    }

    /// The `SETTINGS_MAX_CONCURRENT_STREAMS` announced on HTTP/2
    /// connections: streams beyond it wait in the client (or are refused).
    /// Default 10 000.
    pub fn http2_max_concurrent_streams(mut self, max: u32) -> Self {
        self.http2_max_concurrent_streams = max;
        self
    }
}

/// Counters shared between the accept loop, the connections and the handle.
#[derive(Debug, Default)]
struct Stats {
    connections: AtomicU64,
    open_connections: AtomicU64,
    requests: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    /// Per-key request counters of `/sequence`.
    sequences: routes::Sequences,
    /// Bodies of `/feed` registered by the test.
    feeds: feed::Feeds,
    /// Recorded requests and counters of the OpenAI routes.
    openai: openai::OpenAi,
}

impl Stats {
    fn record_request(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut by_path = self.by_path.lock().unwrap_or_else(|e| e.into_inner());
        match by_path.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                by_path.insert(path.to_owned(), 1);
            }
        }
    }
}

/// Decrements the open-connection gauge when a connection ends.
struct OpenGuard(Arc<Stats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A real HTTP server on a loopback port, for tests and benchmarks.
///
/// It serves HTTP/1.1 and HTTP/2 (h2c prior knowledge on plain TCP, ALPN on
/// TLS) and stops, closing every connection, when dropped. A second,
/// raw-TCP listener serves the [`Fault`]s.
///
/// Routes (query parameters drive behaviour; bad parameters get `400`):
///
/// | route | response |
/// |---|---|
/// | `/fast` | `200 ok` |
/// | `/delay?ms=N` | waits N ms (default 0), then `200 ok` |
/// | `/bytes?n=N&chunked=1` | N bytes (default 0) of `abc…z` repeated, `application/octet-stream`; with `chunked=1` sent in up to 8 frames without `Content-Length` |
/// | `/sse?events=N&interval_ms=M` | `text/event-stream`, `data: event i\n\n` for i in `0..N` (default 3), M ms apart (default 10) |
/// | `/status/{code}?body=&retry_after=&location=&content_type=` | that status (200–999) with the given body (default empty) and headers |
/// | `/redirect/{n}?status=&to=` | `Location: /redirect/{n-1}` (query kept); `/redirect/1` points to `to` (default `/echo`); `/redirect/0` answers like `/echo`; status default 302 |
/// | `/redirect-to?url=&status=` | one redirect to `url` (required), status default 302 |
/// | `/redirect-loop?status=` | `/redirect-loop` → `/redirect-loop/b` → `/redirect-loop` … |
/// | `/echo` | JSON describing the request (below) |
/// | `/compressed?encoding=gzip\|deflate\|br\|identity` | [`COMPRESSED_TEXT`] with that `Content-Encoding` (`deflate` is zlib) |
/// | `/charset?cs=` | `text/plain; charset={cs}`: [`CHARSET_TEXT`] (`café`) in `iso-8859-1`, `latin1`, `windows-1252` or `utf-8` (default); `日本語` in `shift_jis` |
/// | `/conn` | the id of the TCP connection (1, 2, … in accept order) as text |
/// | `/json` | `{"ok":true,"name":"patient","items":[1,2,3]}` |
/// | `/html` | a small `text/html; charset=utf-8` page |
/// | `/headers?n=N&size=S` | N response headers `x-header-{i}` (i in `0..N`) with S-byte values (default 16) |
/// | `/set?name=value&…` | `200 ok` with every query pair as a response header |
/// | `/sequence?key=K&steps=503,503,200&delays=0,0,5&retry_after=S&x_do_not_retry=1` | the n-th request (from 0) for key K answers `steps[n]` after `delays[n]` ms (the last step and the last delay repeat; steps default `200`, delays `0`); non-2xx steps carry `Retry-After: S` when given and `X-Do-Not-Retry: 1` with `x_do_not_retry=1`; body `{"key","n","status","headers"}`, where `headers` echoes `x-request-timeout`, `x-request-priority`, `idempotency-key` and `x-request-id` when sent |
/// | `/feed?key=K&name=value&…` | `200` with every pair but `key` as a header; the body is written by the test through the [`BodyFeed`] that [`Upstream::feed`] registered for K (data frames, then optionally trailers); `404` for an unregistered key |
/// | `/mirror` | the request body sent back frame by frame as it arrives (trailers included), with the request's `content-type` (default `application/octet-stream`) |
/// | `/bimodal?slow_pct=5&slow_ms=1000&fast_ms=5` | each request is slow with probability `slow_pct` % (waits `slow_ms` ms), otherwise fast (`fast_ms` ms); body and header `x-latency-mode` are `slow` or `fast` |
/// | `POST /v1/chat/completions?…` | an OpenAI-compatible chat completion, JSON or (`"stream": true`) server-sent events, shaped by the query parameters below |
/// | `GET /v1/models` | `{"object":"list","data":[{"id":"patient-test","object":"model","created":0,"owned_by":"patient"}]}` |
///
/// `/echo` answers with any method:
/// `{"method","path","query" (raw, null if none),"args" {name: value},
/// "uri","authority" (HTTP/2 `:authority` or absolute-form host, else the
/// `Host` header),"version" ("HTTP/1.1", "HTTP/2.0"),"connection" (id),
/// "headers" {lower-cased name: value, repeated ones joined by ", " or "; " for cookie},
/// "body" (UTF-8 text, null if empty or not UTF-8),"body_base64","body_len"}`.
/// Request bodies are never decoded, so a gzip body stays raw in
/// `body_base64`.
///
/// `/v1/chat/completions` takes an OpenAI chat request body (`model`,
/// `messages`, optional `stream` and `stream_options.include_usage`). The
/// reply is `echo: ` followed by the last message's content (a string, or
/// the `text` of its parts), in words; `usage` counts words:
/// `completion_tokens` those of the reply, `prompt_tokens` those of every
/// message. Without `stream` the answer is a `chat.completion` object. With
/// `"stream": true` it is `text/event-stream` (`cache-control: no-cache`),
/// each event its own body frame: `data: <chat.completion.chunk>` with
/// `delta` `{"role":"assistant","content":""}`, then one chunk per reply
/// word (followed by a space but the last), then `delta` `{}` with
/// `finish_reason` `"stop"`, then with `include_usage` a chunk with
/// `"choices":[]` and `usage` (and `"usage":null` in the others), then
/// `data: [DONE]`. A body that is not such JSON gets `400` with
/// `{"error":{"message","type":"invalid_request_error","param","code"}}`.
/// The query parameters (all optional, defaults 0 / off) shape the answer:
///
/// | parameter | effect |
/// |---|---|
/// | `head_delay_ms=N` | waits N ms before the response head (both modes) |
/// | `status=N&retry_after=S` | answers status N (400–599) with an OpenAI error body (`type` `rate_limit_error` for 429, `server_error` for 5xx, …) and `Retry-After: S` when given, whatever the body |
/// | `first_delay_ms=N` | waits N ms before the first data event |
/// | `pings=N` | N comments `: ping\n\n` before the first data event, spread evenly over `first_delay_ms` (the wait is cut into N + 1 equal parts) |
/// | `interval_ms=N` | N ms between consecutive data events |
/// | `split=1` | every event (pings too) written as two body frames cut at its middle byte |
/// | `cut_after=N` | the body ends cleanly after the role chunk and N word chunks: no finish chunk, no usage, no `[DONE]` |
/// | `no_trailing_blank=1` | the last event is `data: [DONE]\n`, without its blank line |
///
/// A stream's task stops as soon as its client goes away (connection
/// closed or stream reset), even during a delay, and counts in
/// [`streams_cancelled`](Self::streams_cancelled). Every request to
/// `/v1/chat/completions` is kept, headers and body as received, for
/// [`openai_requests`](Self::openai_requests).
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    fault_addr: SocketAddr,
    tls: bool,
    stats: Arc<Stats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Upstream {
    /// Starts a plain-HTTP upstream on `127.0.0.1:0` (HTTP/1.1 and h2c).
    pub async fn start() -> io::Result<Upstream> {
        Self::start_with(UpstreamOptions::new()).await
    }

    /// Starts an HTTPS upstream presenting `cert`, offering ALPN `h2` and
    /// `http/1.1`. The fault listener stays plain TCP.
    pub async fn start_tls(cert: &TestCert) -> io::Result<Upstream> {
        Self::start_with(UpstreamOptions::new().tls(cert)).await
    }

    /// Starts a plain-TCP upstream that accepts only HTTP/2 with prior
    /// knowledge (h2c), so a client that falls back to HTTP/1.1 fails.
    /// [`start`](Self::start) accepts h2c too, next to HTTP/1.1.
    pub async fn start_h2c() -> io::Result<Upstream> {
        Self::start_with(UpstreamOptions::new().http2_only()).await
    }

    /// Starts an upstream with `options`.
    pub async fn start_with(options: UpstreamOptions) -> io::Result<Upstream> {
        let main = listener::bind(options.listen)?;
        let faults = listener::bind(options.fault_listen)?;
        let addr = main.local_addr()?;
        let fault_addr = faults.local_addr()?;

        let mut builder = auto::Builder::new(TokioExecutor::new());
        let alpn: &[&[u8]] = match options.protocols {
            Protocols::Auto => &[b"h2", b"http/1.1"],
            Protocols::Http1Only => {
                builder = builder.http1_only();
                &[b"http/1.1"]
            }
            Protocols::Http2Only => {
                builder = builder.http2_only();
                &[b"h2"]
            }
        };
        builder
            .http2()
            .max_concurrent_streams(Some(options.http2_max_concurrent_streams));
        let tls = match &options.tls {
            Some(cert) => Some(TlsAcceptor::from(Arc::new(cert.server_config(alpn)?))),
            None => None,
        };
        let builder = Arc::new(builder);
        let stats = Arc::new(Stats::default());

        let main_task = {
            let stats = stats.clone();
            tokio::spawn(listener::accept_loop(main, move |stream, _| {
                serve_connection(stream, tls.clone(), builder.clone(), stats.clone())
            }))
        };
        let fault_task = tokio::spawn(listener::accept_loop(faults, |stream, _| {
            fault::serve(stream)
        }));

        Ok(Upstream {
            addr,
            fault_addr,
            tls: options.tls.is_some(),
            stats,
            tasks: vec![main_task, fault_task],
        })
    }

    /// The address of the main listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the raw-TCP fault listener.
    pub fn fault_addr(&self) -> SocketAddr {
        self.fault_addr
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS) followed by
    /// `path_and_query`, which should start with `/`. With TLS the
    /// certificate must name `127.0.0.1` (as `TestCert::generate(&["localhost",
    /// "127.0.0.1"])` does); for a `localhost` URL use [`addr`](Self::addr).
    pub fn url(&self, path_and_query: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path_and_query}", self.addr)
    }

    /// `http://` URL on the fault listener that triggers `fault`.
    pub fn fault_url(&self, fault: Fault) -> String {
        format!("http://{}{}", self.fault_addr, fault.path())
    }

    /// TCP connections accepted on the main listener so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// TCP connections on the main listener that are open right now.
    pub fn open_connections(&self) -> u64 {
        self.stats.open_connections.load(Ordering::Relaxed)
    }

    /// Requests received on the main listener so far (all routes).
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Requests received for exactly `path` (no query), e.g. `"/fast"`.
    pub fn requests_to(&self, path: &str) -> u64 {
        let by_path = self.stats.by_path.lock().unwrap_or_else(|e| e.into_inner());
        by_path.get(path).copied().unwrap_or(0)
    }

    /// Registers the body of the next `/feed?key={key}` request: the
    /// response head goes out at once (status 200, every query parameter but
    /// `key` as a response header, e.g. `content-type=text/event-stream`),
    /// the body is what the returned [`BodyFeed`] sends. A `/feed` request
    /// for a key that is not registered gets `404`.
    pub fn feed(&self, key: &str) -> BodyFeed {
        self.stats.feeds.register(key)
    }

    /// Requests `/sequence` has received for `key` so far.
    pub fn sequence_count(&self, key: &str) -> usize {
        self.stats.sequences.count(key)
    }

    /// The requests `/v1/chat/completions` received, oldest first, with
    /// their headers and body as they arrived (invalid ones included). Only
    /// the last 1024 are kept; [`requests_to`](Self::requests_to) counts
    /// them all.
    pub fn openai_requests(&self) -> Vec<RecordedRequest> {
        self.stats.openai.requests()
    }

    /// Streams of `/v1/chat/completions` that stopped before their last
    /// event because the client went away (closed the connection or reset
    /// the stream).
    pub fn streams_cancelled(&self) -> u64 {
        self.stats.openai.streams_cancelled()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves one accepted connection on the main listener.
async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stats: Arc<Stats>,
) {
    let id = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    stats.open_connections.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(stats.clone());
    let service = service_fn(move |request| {
        let stats = stats.clone();
        async move {
            stats.record_request(request.uri().path());
            Ok::<_, Infallible>(
                routes::handle(request, id, &stats.sequences, &stats.feeds, &stats.openai).await,
            )
        }
    });
    match tls {
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    }
}
