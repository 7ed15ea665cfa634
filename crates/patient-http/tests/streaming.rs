//! The streaming call against the testkit upstream: bodies written piece by
//! piece by the test itself (`/feed`), so every "before the stream ends"
//! is a fact the test controls, not a timing.

use std::{
    io::{self, Write},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use patient_http::client::{
    ClientConfig, HttpClient, HttpVersionPref, OutgoingRequest, RequestBody, ResponseBody,
    StreamingRequest, StreamingResponse, TransportError,
};
use patient_testkit::{BodyFeed, Upstream, UpstreamOptions};
use tokio::sync::mpsc;

fn client(config: ClientConfig) -> HttpClient {
    HttpClient::new(config).unwrap()
}

fn h2c() -> ClientConfig {
    ClientConfig::builder()
        .http_version(HttpVersionPref::Http2Only)
        .build()
        .unwrap()
}

fn streaming(method: Method, url: &str) -> StreamingRequest {
    StreamingRequest::new(method, url.parse().unwrap())
}

async fn open(client: &HttpClient, url: &str) -> StreamingResponse {
    client
        .send_streaming(streaming(Method::GET, url))
        .await
        .unwrap()
}

/// The next data frame; panics on trailers or the end.
async fn next_data(body: &mut ResponseBody) -> Bytes {
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a frame within 5 s")
        .expect("a frame, not the end")
        .unwrap();
    frame.into_data().expect("a data frame")
}

/// Waits (at most 5 s) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn conn_id(client: &HttpClient, upstream: &Upstream) -> String {
    let request = OutgoingRequest::new(Method::GET, upstream.url("/conn").parse().unwrap());
    let response = client.send(request).await.unwrap();
    String::from_utf8(response.body.to_vec()).unwrap()
}

/// A request body fed by the test through a channel.
struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut().0.poll_recv(cx)
    }
}

fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, io::Error>>, RequestBody) {
    let (tx, rx) = mpsc::channel(1);
    (tx, RequestBody::stream(ChannelBody(rx)))
}

async fn push(tx: &mpsc::Sender<Result<Frame<Bytes>, io::Error>>, data: &'static str) {
    tx.send(Ok(Frame::data(Bytes::from_static(data.as_bytes()))))
        .await
        .unwrap();
}

// ---------------------------------------------------------------- events

#[tokio::test]
async fn sse_events_arrive_one_by_one_before_the_stream_ends() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let feed = upstream.feed("events");
    let mut response = open(
        &client,
        &upstream.url("/feed?key=events&content-type=text/event-stream"),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.version, Version::HTTP_11);
    assert_eq!(response.headers["content-type"], "text/event-stream");
    for i in 0..3 {
        let event = format!("data: event {i}\n\n");
        assert!(feed.send(event.clone()).await);
        // This event is here while the stream is still open.
        assert_eq!(next_data(&mut response.body).await, event);
        assert!(!response.body.is_end_stream());
    }
    drop(feed);
    assert!(response.body.frame().await.is_none());
    assert!(response.body.is_end_stream());
}

#[tokio::test]
async fn trailers_arrive_after_the_data_on_http1_and_http2() {
    for config in [ClientConfig::default(), h2c()] {
        let upstream = Upstream::start().await.unwrap();
        let client = client(config);
        let feed = upstream.feed("t");
        let mut request = streaming(Method::GET, &upstream.url("/feed?key=t&trailer=x-checksum"));
        request
            .headers
            .insert("te", HeaderValue::from_static("trailers"));
        let mut response = client.send_streaming(request).await.unwrap();
        let version = response.version;
        assert!(feed.send("payload").await);
        assert_eq!(next_data(&mut response.body).await, "payload");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        assert!(feed.send_trailers(trailers).await);
        let frame = response.body.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().expect("trailers after the data");
        assert_eq!(trailers["x-checksum"], "abc123", "{version:?}");
        assert!(response.body.frame().await.is_none());
    }
}

// ---------------------------------------------------------------- connections

#[tokio::test]
async fn a_body_read_to_its_end_returns_the_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let first = conn_id(&client, &upstream).await;
    let feed = upstream.feed("k");
    let mut response = open(&client, &upstream.url("/feed?key=k")).await;
    assert_eq!(client.pool_stats().idle_connections, 0, "in use");
    assert!(feed.send("all of it").await);
    drop(feed);
    assert_eq!(next_data(&mut response.body).await, "all of it");
    assert!(response.body.frame().await.is_none());
    assert_eq!(client.pool_stats().idle_connections, 1);
    assert_eq!(conn_id(&client, &upstream).await, first);
    assert_eq!(upstream.connections(), 1);

    // A body of known length goes back as soon as its last byte is read.
    let mut response = open(&client, &upstream.url("/bytes?n=100000")).await;
    let mut read = 0;
    while read < 100_000 {
        read += next_data(&mut response.body).await.len();
    }
    assert_eq!(client.pool_stats().idle_connections, 1);
    drop(response);
    assert_eq!(conn_id(&client, &upstream).await, first);
}

#[tokio::test]
async fn dropping_the_body_early_closes_the_http1_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let first = conn_id(&client, &upstream).await;
    let feed = upstream.feed("k");
    let mut response = open(&client, &upstream.url("/feed?key=k")).await;
    assert!(feed.send("part").await);
    assert_eq!(next_data(&mut response.body).await, "part");
    drop(response);

    // The upstream sees the connection go away, and the pool has nothing.
    tokio::time::timeout(Duration::from_secs(5), feed.closed())
        .await
        .expect("the upstream notices the closed connection");
    eventually("the connection is closed", || {
        client.pool_stats().open_connections == 0 && upstream.open_connections() == 0
    })
    .await;
    assert_eq!(client.pool_stats().idle_connections, 0);
    assert_ne!(conn_id(&client, &upstream).await, first);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn dropping_the_body_early_resets_only_the_http2_stream() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(h2c());
    let first = conn_id(&client, &upstream).await;
    let feed = upstream.feed("k");
    let mut response = open(&client, &upstream.url("/feed?key=k")).await;
    assert_eq!(response.version, Version::HTTP_2);
    assert!(feed.send("part").await);
    assert_eq!(next_data(&mut response.body).await, "part");
    drop(response);

    tokio::time::timeout(Duration::from_secs(5), feed.closed())
        .await
        .expect("the stream is reset");
    // The connection stays and carries the next request.
    assert_eq!(conn_id(&client, &upstream).await, first);
    assert_eq!(upstream.connections(), 1);
    assert_eq!(client.pool_stats().open_connections, 1);
}

#[tokio::test]
async fn http2_opens_another_connection_at_the_stream_limit() {
    let upstream = Upstream::start_with(UpstreamOptions::new().http2_max_concurrent_streams(2))
        .await
        .unwrap();
    let client = client(h2c());
    // The first connection, and the server's SETTINGS with it.
    conn_id(&client, &upstream).await;

    let feeds: Vec<BodyFeed> = (0..6).map(|i| upstream.feed(&format!("s{i}"))).collect();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        let url = upstream.url(&format!("/feed?key=s{i}"));
        tasks.push(tokio::spawn(async move {
            let response = client
                .send_streaming(streaming(Method::GET, &url))
                .await
                .unwrap();
            response.body.bytes().await.unwrap()
        }));
    }
    // All six are in flight at once: none waits for another to finish.
    eventually("six requests reach the upstream", || {
        upstream.requests_to("/feed") == 6
    })
    .await;
    assert_eq!(upstream.connections(), 3);
    for (i, feed) in feeds.into_iter().enumerate() {
        assert!(feed.send(format!("body {i}")).await);
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), format!("body {i}"));
    }

    // Buffered requests spread the same way.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = upstream.url("/delay?ms=50");
        tasks.push(tokio::spawn(async move {
            let request = OutgoingRequest::new(Method::GET, url.parse().unwrap());
            client.send(request).await.map(|r| r.version)
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Version::HTTP_2);
    }
    assert!(upstream.connections() <= 3, "{}", upstream.connections());
}

// ---------------------------------------------------------------- headers

#[tokio::test]
async fn repeated_set_cookie_headers_stay_apart() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let url = upstream.url("/set?set-cookie=a%3D1&set-cookie=b%3D2%3B%20Path%3D%2F");
    let response = open(&client, &url).await;
    let cookies: Vec<_> = response.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2; Path=/"]);

    let buffered = client
        .send(OutgoingRequest::new(Method::GET, url.parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(buffered.headers.get_all("set-cookie").iter().count(), 2);
}

// ---------------------------------------------------------------- decompression

/// A megabyte of text that compresses to about a third of it.
fn text_body() -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let mut out = Vec::with_capacity(1 << 20);
    while out.len() < 1 << 20 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let _ = writeln!(out, "line {} {:08x}", out.len(), state);
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Sends `data` through `feed` in pieces of `size` bytes, then ends it.
fn feed_all(feed: BodyFeed, data: Vec<u8>, size: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for piece in data.chunks(size) {
            if !feed.send(Bytes::copy_from_slice(piece)).await {
                return;
            }
        }
    })
}

#[tokio::test]
async fn a_large_gzip_body_is_decompressed_chunk_by_chunk() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().decompress(true).build().unwrap());
    let plain = text_body();
    let compressed = gzip(&plain);
    assert!(compressed.len() < plain.len() / 2);

    let feed = upstream.feed("gz");
    let mut response = open(&client, &upstream.url("/feed?key=gz&content-encoding=gzip")).await;
    assert!(response.headers.get("content-encoding").is_none());
    // The first 16 KiB of compressed data come out decoded on their own.
    assert!(
        feed.send(Bytes::copy_from_slice(&compressed[..16 * 1024]))
            .await
    );
    let first = next_data(&mut response.body).await;
    assert!(!first.is_empty() && first.len() < plain.len());
    assert_eq!(&plain[..first.len()], &first[..]);

    let sender = feed_all(feed, compressed[16 * 1024..].to_vec(), 16 * 1024);
    let mut decoded = first.to_vec();
    let mut frames = 1;
    while let Some(frame) = response.body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        decoded.extend_from_slice(&data);
        frames += 1;
    }
    sender.await.unwrap();
    assert_eq!(decoded.len(), plain.len());
    assert!(decoded == plain);
    assert!(frames > 10, "{frames} frames");
}

#[tokio::test]
async fn the_size_limit_cuts_a_decompressed_stream() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().decompress(true).build().unwrap());
    let plain = text_body();
    let compressed = gzip(&plain);

    // Under the limit: the whole body.
    let feed = upstream.feed("ok");
    let mut request = streaming(
        Method::GET,
        &upstream.url("/feed?key=ok&content-encoding=gzip"),
    );
    request.max_response_size = Some(plain.len());
    let response = client.send_streaming(request).await.unwrap();
    let sender = feed_all(feed, compressed.clone(), 16 * 1024);
    assert_eq!(response.body.bytes().await.unwrap().len(), plain.len());
    sender.await.unwrap();

    // Above it: the decoded bytes are cut, though the compressed ones fit.
    let feed = upstream.feed("big");
    let mut request = streaming(
        Method::GET,
        &upstream.url("/feed?key=big&content-encoding=gzip"),
    );
    request.max_response_size = Some(plain.len() / 2);
    let mut response = client.send_streaming(request).await.unwrap();
    let sender = feed_all(feed, compressed, 16 * 1024);
    let mut decoded = 0;
    let err = loop {
        match response.body.frame().await {
            Some(Ok(frame)) => decoded += frame.into_data().unwrap().len(),
            Some(Err(err)) => break err,
            None => panic!("the body ended without the limit"),
        }
    };
    assert!(decoded > 0 && decoded <= plain.len() / 2);
    assert!(err.is_too_large(), "{err}");
    assert!(err.request_sent());
    assert!(err.message().contains("after decompression"), "{err}");
    assert!(
        response.body.frame().await.is_none(),
        "nothing after the error"
    );
    sender.await.unwrap();
}

#[tokio::test]
async fn every_coding_decodes_in_small_pieces() {
    let upstream = Upstream::start().await.unwrap();
    let raw = client(ClientConfig::default());
    let decoding = client(ClientConfig::builder().decompress(true).build().unwrap());
    for encoding in ["gzip", "deflate", "br"] {
        let url = upstream.url(&format!("/compressed?encoding={encoding}"));
        let compressed = raw
            .send(OutgoingRequest::new(Method::GET, url.parse().unwrap()))
            .await
            .unwrap()
            .body;
        let key = format!("c-{encoding}");
        let feed = upstream.feed(&key);
        let response = open(
            &decoding,
            &upstream.url(&format!("/feed?key={key}&content-encoding={encoding}")),
        )
        .await;
        let sender = feed_all(feed, compressed.to_vec(), 7);
        let body = response.body.bytes().await.unwrap();
        assert_eq!(body, patient_testkit::COMPRESSED_TEXT, "{encoding}");
        sender.await.unwrap();
    }
}

#[tokio::test]
async fn the_size_limit_cuts_a_raw_stream() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let feed = upstream.feed("k");
    let mut request = streaming(Method::GET, &upstream.url("/feed?key=k"));
    request.max_response_size = Some(1000);
    let mut response = client.send_streaming(request).await.unwrap();
    assert!(feed.send(vec![b'a'; 600]).await);
    assert_eq!(next_data(&mut response.body).await.len(), 600);
    assert!(feed.send(vec![b'b'; 600]).await);
    let err = response.body.frame().await.unwrap().unwrap_err();
    assert!(err.is_too_large(), "{err}");
    assert!(err.message().contains("1200 bytes read"), "{err}");
    // The connection was not kept.
    tokio::time::timeout(Duration::from_secs(5), feed.closed())
        .await
        .expect("the connection is closed");
}

// ---------------------------------------------------------------- request bodies

#[tokio::test]
async fn a_streamed_request_body_is_sent_as_it_is_produced() {
    for config in [ClientConfig::default(), h2c()] {
        let upstream = Upstream::start().await.unwrap();
        let client = client(config);
        let (tx, body) = channel_body();
        let mut request = streaming(Method::POST, &upstream.url("/mirror"));
        request.body = body;
        push(&tx, "first ").await;
        let mut response = client.send_streaming(request).await.unwrap();
        let version = response.version;
        // The upstream answers with what it has received so far, while the
        // request body is still open.
        assert_eq!(next_data(&mut response.body).await, "first ", "{version:?}");
        push(&tx, "second").await;
        assert_eq!(next_data(&mut response.body).await, "second", "{version:?}");
        drop(tx);
        assert!(response.body.frame().await.is_none(), "{version:?}");
    }
}

#[tokio::test]
async fn a_streamed_request_body_is_received_whole() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let (tx, body) = channel_body();
    let mut request = streaming(Method::PUT, &upstream.url("/echo"));
    request.body = body;
    let sender = tokio::spawn(async move {
        for piece in ["a", "b", "c"] {
            push(&tx, piece).await;
        }
    });
    let response = client.send_streaming(request).await.unwrap();
    let echo: serde_json::Value =
        serde_json::from_slice(&response.body.bytes().await.unwrap()).unwrap();
    sender.await.unwrap();
    assert_eq!(echo["body"], "abc");
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn a_request_body_failing_midway_fails_the_request() {
    for config in [ClientConfig::default(), h2c()] {
        let upstream = Upstream::start().await.unwrap();
        let client = client(config.clone());
        let (tx, body) = channel_body();
        let mut request = streaming(Method::POST, &upstream.url("/echo"));
        request.body = body;
        let sender = tokio::spawn(async move {
            push(&tx, "partial").await;
            let _ = tx.send(Err(io::Error::other("source went away"))).await;
        });
        let err: TransportError = client.send_streaming(request).await.unwrap_err();
        sender.await.unwrap();
        assert!(
            err.is_request_body(),
            "{:?}: {err:?}",
            config.http_version()
        );
        assert_eq!(err.class_name(), "RequestBodyError");
        assert!(err.request_sent());
        assert!(err.message().contains("source went away"), "{err}");
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "source went away");
    }
}

// ---------------------------------------------------------------- timeouts

#[tokio::test(start_paused = true)]
async fn the_request_timeout_bounds_only_the_head() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(
        ClientConfig::builder()
            .request_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let feed = upstream.feed("k");
    let mut response = open(&client, &upstream.url("/feed?key=k")).await;
    // Long after the request timeout, the body goes on.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(feed.send("late").await);
    assert_eq!(next_data(&mut response.body).await, "late");
    drop(feed);
    assert!(response.body.frame().await.is_none());

    // The head itself is bounded.
    let mut slow = streaming(Method::GET, &upstream.url("/delay?ms=5000"));
    slow.timeout = Some(Duration::from_millis(100));
    let err = client.send_streaming(slow).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.class_name(), "Timeout");
    assert!(err.request_sent());
}

#[tokio::test(start_paused = true)]
async fn the_stall_timeout_ends_a_stream_that_goes_quiet() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::default());
    let feed = upstream.feed("k");
    let mut request = streaming(Method::GET, &upstream.url("/feed?key=k"));
    request.stall_timeout = Some(Duration::from_secs(1));
    let mut response = client.send_streaming(request).await.unwrap();
    assert!(feed.send("one").await);
    assert_eq!(next_data(&mut response.body).await, "one");
    let err = response.body.frame().await.unwrap().unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.class_name(), "StallTimeout");
    assert!(response.body.frame().await.is_none());
}
