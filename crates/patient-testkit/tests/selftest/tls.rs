//! HTTPS upstream with ALPN, trusted and untrusted clients.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::Full;
use patient_testkit::{TestCert, Upstream};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{get, h1_over, h2_over, send_h1, send_h2};

async fn connect(
    upstream: &Upstream,
    trusted: &TestCert,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = trusted.client_config()?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let stream = TcpStream::connect(upstream.addr()).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
}

#[tokio::test]
async fn serves_http1_and_h2_over_tls() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    assert!(cert.ca_pem.contains("BEGIN CERTIFICATE"));
    assert!(cert.key_pem.contains("PRIVATE KEY"));
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    assert!(upstream.url("/fast").starts_with("https://127.0.0.1:"));

    let stream = connect(&upstream, &cert, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = h2_over(stream).await.unwrap();
    let request = Request::get(upstream.url("/echo").as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send_h2(&mut sender, request).await.unwrap();
    assert_eq!(reply.version, Version::HTTP_2);

    let stream = connect(&upstream, &cert, &[b"http/1.1"]).await.unwrap();
    let mut sender = h1_over(stream).await;
    let reply = send_h1(&mut sender, get(upstream.addr(), "/echo"))
        .await
        .unwrap();
    assert_eq!(reply.json()["version"], "HTTP/1.1");

    // No ALPN at all: HTTP/1.1 still works.
    let stream = connect(&upstream, &cert, &[]).await.unwrap();
    let mut sender = h1_over(stream).await;
    let reply = send_h1(&mut sender, get(upstream.addr(), "/fast"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "ok");
}

#[tokio::test]
async fn untrusted_ca_fails_the_handshake() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let other = TestCert::generate(&["localhost"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let error = connect(&upstream, &other, &[b"http/1.1"])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
}
