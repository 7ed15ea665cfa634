//! The forward proxy: absolute-form requests, CONNECT tunnels and auth.

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use patient_testkit::{ForwardProxy, Upstream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{get, h1, h1_over, send_h1, Reply};

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

async fn absolute(proxy: &ForwardProxy, url: &str, auth: Option<&str>) -> Reply {
    let mut sender = h1(proxy.addr()).await;
    let mut request = Request::get(url);
    if let Some(auth) = auth {
        request = request.header("proxy-authorization", auth);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    send_h1(&mut sender, request).await.unwrap()
}

/// Sends `CONNECT target` and returns the status and the open stream.
async fn connect(proxy: &ForwardProxy, target: &str, auth: Option<&str>) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = auth {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "proxy closed");
        response.push(byte[0]);
    }
    let text = String::from_utf8(response).unwrap();
    (text[9..12].parse().unwrap(), stream)
}

#[tokio::test]
async fn forwards_absolute_form_requests() {
    let upstream = Upstream::start().await.unwrap();
    let proxy = ForwardProxy::start(None).await.unwrap();
    assert!(proxy.url().starts_with("http://127.0.0.1:"));
    let reply = absolute(&proxy, &upstream.url("/echo?x=1"), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(proxy.requests(), 1);
    assert_eq!(proxy.connects(), 0);
    assert_eq!(upstream.requests(), 1);

    let reply = absolute(&proxy, "http://example.com/", None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn tunnels_connect() {
    let upstream = Upstream::start().await.unwrap();
    let proxy = ForwardProxy::start(None).await.unwrap();
    let (status, stream) = connect(&proxy, &upstream.addr().to_string(), None).await;
    assert_eq!(status, 200);
    let mut sender = h1_over(stream).await;
    let reply = send_h1(&mut sender, get(upstream.addr(), "/fast"))
        .await
        .unwrap();
    assert_eq!(reply.text(), "ok");
    assert_eq!(proxy.connects(), 1);
    assert_eq!(proxy.requests(), 0);

    let (status, _) = connect(&proxy, "example.com:443", None).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn requires_credentials_when_configured() {
    let upstream = Upstream::start().await.unwrap();
    let proxy = ForwardProxy::start(Some(("user", "secret"))).await.unwrap();
    let url = upstream.url("/echo");

    let reply = absolute(&proxy, &url, None).await;
    assert_eq!(reply.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert!(reply
        .header("proxy-authenticate")
        .unwrap()
        .starts_with("Basic"));
    let reply = absolute(&proxy, &url, Some(&basic("user", "wrong"))).await;
    assert_eq!(reply.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    let reply = absolute(&proxy, &url, Some(&basic("user", "secret"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    // The credentials are not passed on to the target.
    assert!(reply.json()["headers"].get("proxy-authorization").is_none());

    let target = upstream.addr().to_string();
    assert_eq!(connect(&proxy, &target, None).await.0, 407);
    assert_eq!(
        connect(&proxy, &target, Some(&basic("user", "secret")))
            .await
            .0,
        200
    );
    assert_eq!(proxy.rejected(), 3);
    assert_eq!(upstream.requests(), 1);
}
