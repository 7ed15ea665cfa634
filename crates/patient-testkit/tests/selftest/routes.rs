//! One quick check per upstream route.

use std::{io::Read, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use patient_testkit::{Upstream, UpstreamOptions, CHARSET_TEXT, COMPRESSED_TEXT};
use tokio::net::TcpStream;

use crate::{fetch, get, h1, h2_over, send_h1, send_h2};

#[tokio::test]
async fn fast_counts_requests_and_connections() {
    let upstream = Upstream::start().await.unwrap();
    let reply = fetch(upstream.addr(), "/fast").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "ok");
    assert_eq!(reply.header("content-length"), Some("2"));
    assert_eq!(upstream.requests(), 1);
    assert_eq!(upstream.requests_to("/fast"), 1);
    assert_eq!(upstream.requests_to("/echo"), 0);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn delay_waits() {
    let upstream = Upstream::start().await.unwrap();
    let started = std::time::Instant::now();
    let reply = fetch(upstream.addr(), "/delay?ms=150").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        fetch(upstream.addr(), "/delay?ms=x").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn bytes_with_length_and_chunked() {
    let upstream = Upstream::start().await.unwrap();
    let reply = fetch(upstream.addr(), "/bytes?n=100000").await;
    assert_eq!(reply.body.len(), 100_000);
    assert_eq!(reply.header("content-length"), Some("100000"));
    assert_eq!(&reply.body[..3], b"abc");

    let mut sender = h1(upstream.addr()).await;
    sender.ready().await.unwrap();
    let response = sender
        .send_request(get(upstream.addr(), "/bytes?n=1000&chunked=1"))
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("transfer-encoding").unwrap(),
        "chunked"
    );
    let mut body = response.into_body();
    let mut frames = 0;
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            total += data.len();
        }
    }
    assert_eq!(total, 1000);
    assert!(frames >= 2, "expected several chunks, got {frames}");
}

#[tokio::test]
async fn sse_streams_events() {
    let upstream = Upstream::start().await.unwrap();
    let started = std::time::Instant::now();
    let reply = fetch(upstream.addr(), "/sse?events=3&interval_ms=50").await;
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        reply.text(),
        "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn status_with_body_and_retry_after() {
    let upstream = Upstream::start().await.unwrap();
    let reply = fetch(upstream.addr(), "/status/503?body=busy&retry_after=7").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "busy");
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(
        fetch(upstream.addr(), "/status/418").await.status.as_u16(),
        418
    );
    assert_eq!(
        fetch(upstream.addr(), "/status/abc").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn redirects() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let reply = fetch(addr, "/redirect/3?status=307").await;
    assert_eq!(reply.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(reply.header("location"), Some("/redirect/2?status=307"));
    let reply = fetch(addr, "/redirect/1").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(reply.header("location"), Some("/echo"));
    let reply = fetch(addr, "/redirect/1?to=/fast").await;
    assert_eq!(reply.header("location"), Some("/fast"));
    assert_eq!(
        fetch(addr, "/redirect/0").await.json()["path"],
        "/redirect/0"
    );

    let reply = fetch(
        addr,
        "/redirect-to?url=http%3A%2F%2F127.0.0.1%3A1%2Fx&status=301",
    )
    .await;
    assert_eq!(reply.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(reply.header("location"), Some("http://127.0.0.1:1/x"));
    assert_eq!(
        fetch(addr, "/redirect-to").await.status,
        StatusCode::BAD_REQUEST
    );

    let reply = fetch(addr, "/redirect-loop").await;
    assert_eq!(reply.header("location"), Some("/redirect-loop/b"));
    let reply = fetch(addr, "/redirect-loop/b").await;
    assert_eq!(reply.header("location"), Some("/redirect-loop"));
}

#[tokio::test]
async fn echo_reports_the_request() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let mut sender = h1(addr).await;
    let request = Request::post("/echo?a=1&b=two%20words")
        .header("host", addr.to_string())
        .header("Authorization", "Bearer t")
        .header("X-Multi", "1")
        .header("X-Multi", "2")
        .body(Full::new(Bytes::from_static(b"{\"k\":1}")))
        .unwrap();
    let echo = send_h1(&mut sender, request).await.unwrap().json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "a=1&b=two%20words");
    assert_eq!(echo["args"]["b"], "two words");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["authorization"], "Bearer t");
    assert_eq!(echo["headers"]["x-multi"], "1, 2");
    assert_eq!(echo["body"], "{\"k\":1}");
    assert_eq!(echo["body_len"], 7);

    // Binary (e.g. gzip) bodies are kept raw.
    let raw: &[u8] = &[0x1f, 0x8b, 0x08, 0x00, 0xff];
    let request = Request::put("/echo")
        .header("host", addr.to_string())
        .header("content-encoding", "gzip")
        .body(Full::new(Bytes::from_static(raw)))
        .unwrap();
    let echo = send_h1(&mut sender, request).await.unwrap().json();
    assert!(echo["body"].is_null());
    assert_eq!(echo["headers"]["content-encoding"], "gzip");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(echo["body_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, raw);

    let echo = fetch(addr, "/echo").await.json();
    assert_eq!(echo["method"], "GET");
    assert!(echo["query"].is_null());
    assert!(echo["body"].is_null());
}

#[tokio::test]
async fn compressed_bodies_decode_to_the_known_text() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();

    let reply = fetch(addr, "/compressed?encoding=gzip").await;
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&reply.body[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, COMPRESSED_TEXT);

    let reply = fetch(addr, "/compressed?encoding=deflate").await;
    assert_eq!(reply.header("content-encoding"), Some("deflate"));
    let mut text = String::new();
    flate2::read::ZlibDecoder::new(&reply.body[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, COMPRESSED_TEXT);

    let reply = fetch(addr, "/compressed?encoding=br").await;
    assert_eq!(reply.header("content-encoding"), Some("br"));
    let mut text = String::new();
    brotli_decompressor::Decompressor::new(&reply.body[..], 4096)
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, COMPRESSED_TEXT);

    assert_eq!(
        fetch(addr, "/compressed?encoding=zstd").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn charset_sends_non_ascii_bytes() {
    let upstream = Upstream::start().await.unwrap();
    let reply = fetch(upstream.addr(), "/charset?cs=iso-8859-1").await;
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=iso-8859-1")
    );
    assert_eq!(&reply.body[..], b"caf\xe9");
    let reply = fetch(upstream.addr(), "/charset").await;
    assert_eq!(reply.text(), CHARSET_TEXT);
    let reply = fetch(upstream.addr(), "/charset?cs=shift_jis").await;
    assert_eq!(&reply.body[..], b"\x93\xfa\x96\x7b\x8c\xea");
}

#[tokio::test]
async fn conn_distinguishes_connections() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let mut first = h1(addr).await;
    let a = send_h1(&mut first, get(addr, "/conn")).await.unwrap();
    let b = send_h1(&mut first, get(addr, "/conn")).await.unwrap();
    assert_eq!(a.text(), b.text());
    let c = fetch(addr, "/conn").await;
    assert_ne!(a.text(), c.text());
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.open_connections(), 2);
    drop(first);
    for _ in 0..100 {
        if upstream.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.open_connections(), 0);
}

#[tokio::test]
async fn json_html_headers_and_set() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let reply = fetch(addr, "/json").await;
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json()["ok"], true);
    let reply = fetch(addr, "/html").await;
    assert_eq!(
        reply.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(reply.text().contains("<html>"));
    let reply = fetch(addr, "/headers?n=50&size=4").await;
    assert_eq!(reply.header("x-header-49"), Some("vvvv"));
    let reply = fetch(addr, "/set?x-one=1&cache-control=no-store").await;
    assert_eq!(reply.header("x-one"), Some("1"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(fetch(addr, "/nowhere").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn http2_prior_knowledge() {
    for upstream in [
        Upstream::start().await.unwrap(),
        Upstream::start_h2c().await.unwrap(),
    ] {
        let stream = TcpStream::connect(upstream.addr()).await.unwrap();
        let mut sender = h2_over(stream).await.unwrap();
        let url = upstream.url("/echo");
        let request = Request::get(url.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = send_h2(&mut sender, request).await.unwrap();
        assert_eq!(reply.version, Version::HTTP_2);
        let echo = reply.json();
        assert_eq!(echo["version"], "HTTP/2.0");
        assert_eq!(echo["authority"], upstream.addr().to_string());
    }
    // The h2c-only upstream refuses HTTP/1.1.
    let upstream = Upstream::start_h2c().await.unwrap();
    let mut sender = h1(upstream.addr()).await;
    assert!(send_h1(&mut sender, get(upstream.addr(), "/fast"))
        .await
        .is_err());
}

#[tokio::test]
async fn http1_only_refuses_http2() {
    let upstream = Upstream::start_with(UpstreamOptions::new().http1_only())
        .await
        .unwrap();
    assert_eq!(fetch(upstream.addr(), "/fast").await.text(), "ok");
    let stream = TcpStream::connect(upstream.addr()).await.unwrap();
    let result = async {
        let mut sender = h2_over(stream).await?;
        let request = Request::get(upstream.url("/fast").as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        send_h2(&mut sender, request)
            .await
            .map_err(std::io::Error::other)
    };
    assert!(result.await.is_err());
}

#[tokio::test]
async fn drop_stops_the_server() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let mut sender = h1(addr).await;
    send_h1(&mut sender, get(addr, "/fast")).await.unwrap();
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(send_h1(&mut sender, get(addr, "/fast")).await.is_err());
}

#[tokio::test]
async fn sequence_walks_its_steps_per_key() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let path = "/sequence?key=a&steps=503,429,200&retry_after=2&x_do_not_retry=1";
    let first = fetch(addr, path).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.header("retry-after"), Some("2"));
    assert_eq!(first.header("x-do-not-retry"), Some("1"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let json = first.json();
    assert_eq!(
        (
            json["key"].as_str(),
            json["n"].as_u64(),
            json["status"].as_u64()
        ),
        (Some("a"), Some(0), Some(503))
    );
    assert_eq!(
        fetch(addr, path).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The last step repeats, and a 2xx carries neither header.
    for n in 2..4 {
        let reply = fetch(addr, path).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["n"], n);
        assert_eq!(reply.header("retry-after"), None);
        assert_eq!(reply.header("x-do-not-retry"), None);
    }
    // Another key has its own counter.
    let other = fetch(addr, "/sequence?key=b&steps=500,200").await;
    assert_eq!(other.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(other.header("retry-after"), None);
    assert_eq!(other.header("x-do-not-retry"), None);
    assert_eq!(upstream.sequence_count("a"), 4);
    assert_eq!(upstream.sequence_count("b"), 1);
    assert_eq!(upstream.sequence_count("c"), 0);
    assert_eq!(upstream.requests_to("/sequence"), 5);
    // Without steps every request succeeds.
    assert_eq!(fetch(addr, "/sequence?key=c").await.status, StatusCode::OK);
    for bad in [
        "/sequence",
        "/sequence?key=d&steps=abc",
        "/sequence?key=d&steps=99",
        "/sequence?key=d&delays=-1",
    ] {
        assert_eq!(
            fetch(addr, bad).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn sequence_delays_and_echoes_propagation_headers() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let path = "/sequence?key=d&steps=200&delays=150,0";
    let request = Request::get(path)
        .header("host", addr.to_string())
        .header("x-request-timeout", "2.5")
        .header("x-request-priority", "high")
        .header("idempotency-key", "k-1")
        .header("x-request-id", "req-1")
        .header("x-other", "not echoed")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut sender = h1(addr).await;
    let started = std::time::Instant::now();
    let reply = send_h1(&mut sender, request).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-request-timeout"], "2.5");
    assert_eq!(headers["x-request-priority"], "high");
    assert_eq!(headers["idempotency-key"], "k-1");
    assert_eq!(headers["x-request-id"], "req-1");
    assert!(headers.get("x-other").is_none());
    // The second request takes the second delay: none.
    let started = std::time::Instant::now();
    let reply = fetch(addr, path).await;
    assert_eq!(reply.json()["n"], 1);
    assert!(started.elapsed() < Duration::from_millis(150));
    assert_eq!(reply.json()["headers"], serde_json::json!({}));
}

#[tokio::test]
async fn bimodal_is_slow_or_fast() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.addr();
    let started = std::time::Instant::now();
    let reply = fetch(addr, "/bimodal?slow_pct=100&slow_ms=120&fast_ms=0").await;
    assert_eq!(reply.text(), "slow");
    assert_eq!(reply.header("x-latency-mode"), Some("slow"));
    assert!(started.elapsed() >= Duration::from_millis(120));
    let started = std::time::Instant::now();
    let reply = fetch(addr, "/bimodal?slow_pct=0&slow_ms=5000&fast_ms=0").await;
    assert_eq!(reply.text(), "fast");
    assert!(started.elapsed() < Duration::from_millis(2000));
    // A mix: with 50 % slow, 40 requests are almost surely not all one kind.
    let mut slow = 0;
    for _ in 0..40 {
        if fetch(addr, "/bimodal?slow_pct=50&slow_ms=0&fast_ms=0")
            .await
            .text()
            == "slow"
        {
            slow += 1;
        }
    }
    assert!((1..40).contains(&slow), "{slow} of 40 slow");
    assert_eq!(
        fetch(addr, "/bimodal?slow_pct=101").await.status,
        StatusCode::BAD_REQUEST
    );
}
