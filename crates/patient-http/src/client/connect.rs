//! Opening connections: TCP, proxy tunnel, TLS, then the hyper HTTP/1.1 or
//! HTTP/2 handshake with its driver task.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{
    config::HttpVersionPref,
    error::{ErrorType, Phase, TransportError},
    pool::{Conn, H1Conn, H2Conn},
    proxy::{self, ProxyEndpoint},
    Inner, Target,
};

/// A connection's byte stream: TCP, or TLS over another stream (TLS to a
/// target inside a TLS connection to an `https://` proxy nests).
pub(crate) enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<Stream>>),
}

impl Stream {
    /// Whether ALPN chose `h2`.
    fn alpn_h2(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            Stream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resolves `host` and connects to the first address that accepts.
async fn tcp(host: &str, port: u16, authority: &str) -> Result<TcpStream, TransportError> {
    let stream = if let Ok(ip) = host.parse::<IpAddr>() {
        TcpStream::connect(SocketAddr::new(ip, port))
            .await
            .map_err(|e| TransportError::from_io(e, authority, Phase::Connect))?
    } else {
        let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| {
            TransportError::new(
                ErrorType::Connection,
                "DnsError",
                format!("failed to resolve {host}: {e}"),
            )
            .with_source(e)
        })?;
        let mut last = None;
        let mut connected = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        match (connected, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(TransportError::from_io(e, authority, Phase::Connect)),
            (None, None) => {
                return Err(TransportError::new(
                    ErrorType::Connection,
                    "DnsError",
                    format!("{host} resolved to no address"),
                ))
            }
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tls(
    connector: &TlsConnector,
    stream: Stream,
    host: &str,
    authority: &str,
) -> Result<Stream, TransportError> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        TransportError::new(
            ErrorType::Ssl,
            "TlsError",
            format!("invalid TLS server name {host}: {e}"),
        )
        .with_source(e)
    })?;
    let tls = connector.connect(name, stream).await.map_err(|e| {
        let mut err = TransportError::from_io(e, authority, Phase::Connect);
        if err.class_name() != "TlsError" && !err.is_timeout() {
            // A connection lost mid-handshake is still a connection error,
            // but say where it happened.
            err = TransportError::new(
                err.kind(),
                err_class(&err),
                format!("TLS handshake failed: {}", err.message()),
            )
            .with_source(err);
        }
        err
    })?;
    Ok(Stream::Tls(Box::new(tls)))
}

fn err_class(err: &TransportError) -> &'static str {
    match err.class_name() {
        "ConnectionReset" => "ConnectionReset",
        "ConnectionRefused" => "ConnectionRefused",
        "ConnectionAborted" => "ConnectionAborted",
        _ => "ConnectionClosed",
    }
}

/// Opens the byte stream to `target`, through `proxy` when given. Returns the
/// stream and whether it speaks HTTP/2.
async fn open_stream(
    inner: &Inner,
    target: &Target,
    proxy: Option<&ProxyEndpoint>,
) -> Result<(Stream, bool), TransportError> {
    let authority = target.authority();
    let stream = match proxy {
        None => Stream::Tcp(tcp(&target.host, target.port, &authority).await?),
        Some(proxy) => {
            let mut stream = Stream::Tcp(tcp(&proxy.host, proxy.port, &proxy.authority).await?);
            if proxy.https {
                stream = tls(&inner.tls.proxy, stream, &proxy.host, &proxy.authority).await?;
            }
            if target.https {
                stream = proxy::tunnel(stream, proxy, &authority).await?;
            }
            stream
        }
    };
    if target.https {
        let stream = tls(&inner.tls.target, stream, &target.host, &authority).await?;
        let h2 = match inner.config.http_version {
            HttpVersionPref::Auto => stream.alpn_h2(),
            HttpVersionPref::Http1Only => false,
            HttpVersionPref::Http2Only => true,
        };
        Ok((stream, h2))
    } else {
        // h2c with prior knowledge, never through a proxy (absolute-form HTTP/1.1 there).
        let h2 = proxy.is_none() && inner.config.http_version == HttpVersionPref::Http2Only;
        Ok((stream, h2))
    }
}

/// Opens a connection and performs the HTTP handshake; the connection driver
/// runs on its own task until the connection closes.
pub(crate) async fn establish(
    inner: &Inner,
    target: &Target,
    proxy: Option<&ProxyEndpoint>,
) -> Result<Conn, TransportError> {
    let (stream, h2) = open_stream(inner, target, proxy).await?;
    let authority = target.authority();
    let io = TokioIo::new(stream);
    let open = Arc::clone(&inner.pool.open);
    let handshake_err = |e| TransportError::from_hyper(e, &authority, Phase::Connect);
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(handshake_err)?;
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http2 connection closed with an error");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Conn::H2(H2Conn {
            sender,
            id: inner.pool.next_id(),
        }))
    } else {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
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
        }))
    }
}
