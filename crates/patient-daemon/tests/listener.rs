//! The listener against clients that push on it: a request head or body
//! sent halfway, a flood of connections, a stop while clients hold
//! connections open, and the time to the first event of a stream over a
//! kept-alive connection.

mod common;

use std::time::{Duration, Instant};

use common::{get_request, Daemon};
use patient_testkit::Upstream;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A raw connection to the daemon with `bytes` written.
async fn send_raw(daemon: &Daemon, bytes: &[u8]) -> TcpStream {
    let addr = daemon.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads until the daemon closes the connection, within `within`; the
/// bytes read, or `None` when it was still open then.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut read = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(read),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_request_head_sent_halfway_is_closed_after_header_timeout() {
    let daemon = Daemon::start(&[("PATIENT_HEADER_TIMEOUT", "0.5")]).await;
    let mut half = send_raw(
        &daemon,
        b"GET /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow:",
    )
    .await;
    let started = Instant::now();
    assert!(
        read_to_close(&mut half, Duration::from_secs(5))
            .await
            .is_some(),
        "a half-sent head is still open after 5 s with header_timeout 0.5 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));

    // A kept-alive connection left idle after a response goes the same way.
    let mut idle = send_raw(&daemon, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let read = read_to_close(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection is closed within 5 s");
    assert!(
        read.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&read)
    );
}

/// Posts to `path` a JSON body that declares 1 MB and stops after a few
/// bytes; the answer, which must be a `408` that closes the connection
/// (with `body_timeout` 0.5 s, within 5 s).
async fn stall_body(daemon: &Daemon, path: &str) -> String {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"a\": "
    );
    let mut stalled = send_raw(daemon, head.as_bytes()).await;
    let read = read_to_close(&mut stalled, Duration::from_secs(5))
        .await
        .expect("a stalled body ends within 5 s with body_timeout 0.5 s");
    let text = String::from_utf8_lossy(&read).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    text
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408_and_its_connection_closed() {
    let daemon = Daemon::start(&[("PATIENT_BODY_TIMEOUT", "0.5")]).await;
    let text = stall_body(&daemon, "/v1/tasks").await;
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    // Nothing was stored.
    let list = daemon.get("/v1/tasks").await.json();
    assert_eq!(list["tasks"], json!([]));
}

#[tokio::test]
async fn a_flood_of_half_sent_requests_does_not_lock_out_real_clients() {
    let daemon = Daemon::start(&[
        ("PATIENT_MAX_CONNECTIONS", "20"),
        ("PATIENT_HEADER_TIMEOUT", "60"),
    ])
    .await;
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(send_raw(&daemon, b"GET /v1/tasks HTTP/1.1\r\nHost: 1").await);
    }
    // Each real request finds room: the oldest half-sent connection goes.
    for _ in 0..5 {
        let reply = tokio::time::timeout(Duration::from_secs(5), daemon.get("/healthz"))
            .await
            .expect("/healthz answers while 60 half-sent requests are held");
        assert_eq!(reply.status, 200);
    }
    let mut closed = 0;
    for stream in &mut flood {
        if read_to_close(stream, Duration::from_millis(50))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    // 60 half-sent connections under a cap of 20: at least 40 were closed,
    // and the newest were kept.
    assert!(
        closed >= 40,
        "only {closed} of 60 half-sent connections were closed"
    );
    assert!(
        read_to_close(flood.last_mut().unwrap(), Duration::from_millis(50))
            .await
            .is_none(),
        "the newest half-sent connection is kept"
    );
}

#[tokio::test]
async fn a_stop_ends_within_shutdown_timeout_whatever_clients_hold_open() {
    let daemon = Daemon::start(&[
        ("PATIENT_SHUTDOWN_TIMEOUT", "1"),
        ("PATIENT_HEADER_TIMEOUT", "600"),
        ("PATIENT_BODY_TIMEOUT", "600"),
    ])
    .await;
    let mut held = vec![
        send_raw(&daemon, b"GET /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half:").await,
        send_raw(
            &daemon,
            b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    daemon.stop().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the stop took {took:?} with shutdown_timeout 1 s"
    );
    for stream in &mut held {
        assert!(read_to_close(stream, Duration::from_secs(1))
            .await
            .is_some());
    }
}

#[tokio::test]
async fn no_task_is_claimed_after_the_stop_signal() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start_with_config(
        &route_config(&upstream),
        &[("PATIENT_SHUTDOWN_TIMEOUT", "5")],
    )
    .await;
    // A task that becomes due while the stop waits for...
    let mut later = get_request(&upstream.url("/echo?later"));
    later["delay"] = json!(0.6);
    let later = daemon.submit(&later).await;
    // ...a proxied request in progress, which holds the stop for 1.5 s.
    let slow = format!("{}/up/delay?ms=1500", daemon.url);
    let proxied = tokio::spawn(async move { common::call("GET", &slow, &[], None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dir = daemon.dir();
    let started = Instant::now();
    daemon.stop().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the request in progress was waited for"
    );
    assert_eq!(proxied.await.unwrap().status, 200);
    assert_eq!(
        upstream.requests_to("/echo"),
        0,
        "a task that became due after the signal was sent"
    );
    // It runs at the next start.
    let daemon = Daemon::start_in(dir, &[]).await;
    let done = daemon.wait_finished(later["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "completed");
    assert_eq!(upstream.requests_to("/echo"), 1);
}

/// The time to the first event of 30 streamed chat completions sent one
/// after another over one kept-alive connection, as SDKs send them: the
/// head goes out first, the first event 5 ms later.
#[tokio::test]
async fn streamed_responses_start_at_once_on_a_kept_alive_connection() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start_with_config(&route_config(&upstream), &[]).await;
    let (addr, mut sender) = kept_alive(&daemon).await;
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let mut first_bytes = Vec::new();
    for _ in 0..30 {
        let request = http::Request::post("/up/v1/chat/completions?first_delay_ms=5")
            .header("host", &addr)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        use http_body_util::BodyExt;
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            if frame.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                first = Some(started.elapsed());
            }
        }
        first_bytes.push(first.expect("a streamed body"));
        sender.ready().await.unwrap();
    }
    first_bytes.sort();
    let median = first_bytes[first_bytes.len() / 2];
    // A first event held back for the client's delayed ACK waits 40 ms.
    assert!(
        median < Duration::from_millis(25),
        "median time to the first byte {median:?} over a kept-alive connection: {first_bytes:?}"
    );
}

/// One kept-alive HTTP/1.1 connection to the daemon: its address (for
/// `Host`) and the sender of requests over it.
async fn kept_alive(
    daemon: &Daemon,
) -> (
    String,
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) {
    let addr = daemon.url.trim_start_matches("http://").to_owned();
    let stream = TcpStream::connect(&addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    (addr, sender)
}

/// A route to `upstream` at `/up/`.
fn route_config(upstream: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"up\"\npath_prefix = \"/up/\"\nstrip_prefix = true\nupstreams = [\"http://{}\"]\n",
        upstream.addr()
    )
}

#[tokio::test]
async fn a_proxied_request_body_that_stalls_gets_408_before_any_upstream_call() {
    let upstream = Upstream::start().await.unwrap();
    let daemon =
        Daemon::start_with_config(&route_config(&upstream), &[("PATIENT_BODY_TIMEOUT", "0.5")])
            .await;
    let text = stall_body(&daemon, "/up/echo").await;
    assert!(text.contains("\"type\":\"invalid_request\""), "{text}");
    assert_eq!(upstream.requests_to("/echo"), 0);
}

#[tokio::test]
async fn a_stream_still_open_when_the_shutdown_timeout_ends_gets_an_error_event() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start_with_config(
        &route_config(&upstream),
        &[("PATIENT_SHUTDOWN_TIMEOUT", "1")],
    )
    .await;
    let (addr, mut sender) = kept_alive(&daemon).await;
    let body = json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "one two three four five six seven eight"}]})
    .to_string();
    let request = http::Request::post("/up/v1/chat/completions?interval_ms=700")
        .header("host", &addr)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let reading = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = response.into_body();
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        text.push_str(&String::from_utf8_lossy(data));
                    }
                }
                Err(e) => {
                    text.push_str(&format!("\n<cut: {e}>"));
                    break;
                }
            }
        }
        text
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    daemon.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stop took {:?} with shutdown_timeout 1 s",
        started.elapsed()
    );
    let text = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .expect("the stream ends")
        .unwrap();
    let last = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .last()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.starts_with("data: {\"error\"") && last.contains("stopping"),
        "the stream ends with an error event: {text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_client_that_asks_and_never_reads_is_closed_after_send_timeout() {
    let upstream = Upstream::start().await.unwrap();
    let config = format!("{}max_response_body = 0\n", route_config(&upstream));
    let daemon = Daemon::start_with_config(&config, &[("PATIENT_SEND_TIMEOUT", "0.5")]).await;
    const SIZE: usize = 32 * 1024 * 1024;
    let request = format!("GET /up/bytes?n={SIZE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut reader = send_raw(&daemon, request.as_bytes()).await;
    // Read nothing while the daemon fills the socket, well past the timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let read = read_to_close(&mut reader, Duration::from_secs(10))
        .await
        .expect("the connection is closed");
    assert!(
        read.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&read[..read.len().min(200)])
    );
    assert!(
        read.len() < SIZE,
        "the whole body came ({} bytes): the daemon waited for a client that did not read",
        read.len()
    );
}
