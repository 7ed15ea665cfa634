//! Self-tests of the patient-testkit servers, using bare hyper clients.

mod binary;
mod faults;
mod proxy;
mod routes;
mod tls;

use std::{io, net::SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// A fully read response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }
}

/// An HTTP/1.1 connection to `addr` over any stream.
pub(crate) async fn h1_over<S>(io: S) -> http1::SendRequest<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(connection);
    sender
}

/// An HTTP/1.1 connection to `addr`.
pub(crate) async fn h1(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    h1_over(TcpStream::connect(addr).await.expect("connect")).await
}

/// An HTTP/2 connection (prior knowledge) over any stream.
pub(crate) async fn h2_over<S>(io: S) -> io::Result<http2::SendRequest<Full<Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends `request` on an HTTP/1.1 connection and reads the whole response.
pub(crate) async fn send_h1(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Reply, hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    read(response).await
}

/// Sends `request` on an HTTP/2 connection and reads the whole response.
pub(crate) async fn send_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Reply, hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    read(response).await
}

async fn read(response: http::Response<hyper::body::Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// A GET request for `path` with a Host header.
pub(crate) fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// GET `path` from `addr` over a fresh HTTP/1.1 connection.
pub(crate) async fn fetch(addr: SocketAddr, path: &str) -> Reply {
    let mut sender = h1(addr).await;
    send_h1(&mut sender, get(addr, path))
        .await
        .expect("response")
}
