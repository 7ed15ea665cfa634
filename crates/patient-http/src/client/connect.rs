//! Opening connections: TCP, proxy tunnel, TLS, then the hyper HTTP/1.1 or
//! HTTP/2 handshake with its driver task.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{
    config::{ClientConfig, HttpVersionPref},
    conn::{Conn, H1Conn, H2Conn, H2Streams, StreamLimit},
    error::{ClientConfigError, Phase, TransportError, MAX_RESPONSE_HEAD},
    origin::Origin,
    proxy::ProxyEndpoint,
    request::RequestBody,
    stream::Stream,
    tcp::TcpConnector,
    tls::{self, TlsConnectors},
    tunnel,
};

/// Opens connections for one client.
pub(crate) struct Connector {
    tcp: TcpConnector,
    tls: TlsConnectors,
    http_version: HttpVersionPref,
    /// Connections whose driver task runs, shared with the pool's stats.
    open: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl Connector {
    pub(crate) fn new(
        config: &ClientConfig,
        open: Arc<AtomicUsize>,
    ) -> Result<Connector, ClientConfigError> {
        Ok(Connector {
            tcp: TcpConnector::new(config.tcp_keepalive(), config.address_filter().cloned()),
            tls: tls::build(config)?,
            http_version: config.http_version(),
            open,
            next_id: AtomicU64::new(1),
        })
    }

    /// Opens the byte stream to `target`, through `proxy` when given. Returns
    /// the stream and whether it speaks HTTP/2.
    async fn open_stream(
        &self,
        target: &Origin,
        proxy: Option<&ProxyEndpoint>,
    ) -> Result<(Stream, bool), TransportError> {
        let authority = target.authority();
        let stream = match proxy {
            None => Stream::Tcp(self.tcp.connect(&authority).await?),
            Some(proxy) => {
                // The proxy resolves the target: only a literal can be checked.
                self.tcp.check_literal(&authority)?;
                let mut stream = Stream::Tcp(self.tcp.connect_unchecked(&proxy.authority).await?);
                if proxy.https {
                    stream = tls::handshake(&self.tls.proxy, stream, &proxy.host, &proxy.authority)
                        .await?;
                }
                if target.https {
                    stream = tunnel::tunnel(stream, proxy, &authority).await?;
                }
                stream
            }
        };
        if target.https {
            let stream = tls::handshake(&self.tls.target, stream, &target.host, &authority).await?;
            let h2 = match self.http_version {
                HttpVersionPref::Auto => stream.alpn_h2(),
                HttpVersionPref::Http1Only => false,
                HttpVersionPref::Http2Only => true,
            };
            Ok((stream, h2))
        } else {
            // h2c with prior knowledge, never through a proxy (absolute-form
            // HTTP/1.1 there).
            let h2 = proxy.is_none() && self.http_version == HttpVersionPref::Http2Only;
            Ok((stream, h2))
        }
    }

    /// Opens a connection and performs the HTTP handshake; the connection
    /// driver runs on its own task until the connection closes. An HTTP/2
    /// connection counts on `h2_streams` concurrent streams until the
    /// server's SETTINGS say how many it allows.
    pub(crate) async fn connect(
        &self,
        target: &Origin,
        proxy: Option<&ProxyEndpoint>,
        h2_streams: usize,
    ) -> Result<Conn, TransportError> {
        let (stream, h2) = self.open_stream(target, proxy).await?;
        let authority = target.authority();
        let io = TokioIo::new(stream);
        let open = Arc::clone(&self.open);
        let handshake_err = |e| TransportError::from_hyper(e, &authority, Phase::Connect);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_max_send_streams(h2_streams)
                .max_header_list_size(MAX_RESPONSE_HEAD as u32)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let driver = H2Driver(Arc::new(Mutex::new(conn)));
            let limit: Weak<Mutex<H2Connection>> = Arc::downgrade(&driver.0);
            let streams = Arc::new(H2Streams::new(id, limit));
            open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(error = %e, "http2 connection closed with an error");
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
            Ok(Conn::H2(H2Conn { sender, streams }))
        } else {
            let (sender, conn) = http1::Builder::new()
                .max_header_size(MAX_RESPONSE_HEAD)
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http1 connection closed with an error");
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
            Ok(Conn::H1(H1Conn {
                sender,
                requests: 0,
                slot: None,
            }))
        }
    }
}

type H2Connection = http2::Connection<TokioIo<Stream>, RequestBody, TokioExecutor>;

/// Drives an HTTP/2 connection, which the pool also asks for the server's
/// concurrent-stream limit (the connection holds it as the server's
/// SETTINGS are applied); the pool only holds it weakly, so it goes away
/// when the driver ends.
struct H2Driver(Arc<Mutex<H2Connection>>);

impl StreamLimit for Mutex<H2Connection> {
    fn max_streams(&self) -> usize {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .current_max_send_streams()
    }
}

impl Future for H2Driver {
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        let mut conn = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *conn).poll(cx)
    }
}
