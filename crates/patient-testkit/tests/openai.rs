//! The OpenAI-compatible routes of the upstream, through bare hyper clients:
//! `/v1/chat/completions` (JSON and streamed) and `/v1/models`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use patient_testkit::{Upstream, UpstreamOptions};
use serde_json::{json, Value};
use tokio::{net::TcpStream, task::JoinHandle};

/// The request body of most tests: 2 + 3 prompt words, a reply of 4 words
/// (`echo: hello there world`).
fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "patient-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
    });
    if stream {
        body["stream"] = Value::Bool(true);
    }
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn post(upstream: &Upstream, path_and_query: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path_and_query)
        .header("host", upstream.addr().to_string())
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .header("x-test-header", "present")
        .body(Full::new(body.into()))
        .expect("request")
}

/// An HTTP/1.1 connection and the task driving it.
async fn h1(upstream: &Upstream) -> (http1::SendRequest<Full<Bytes>>, JoinHandle<()>) {
    let stream = TcpStream::connect(upstream.addr()).await.expect("connect");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// Sends `request` on a fresh HTTP/1.1 connection; the response head.
async fn send(upstream: &Upstream, request: Request<Full<Bytes>>) -> http::Response<Incoming> {
    let (mut sender, _task) = h1(upstream).await;
    sender.ready().await.expect("ready");
    sender.send_request(request).await.expect("response")
}

/// Status, headers and the whole body.
async fn call(
    upstream: &Upstream,
    request: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let response = send(upstream, request).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

/// Every non-empty data frame of a body (HTTP/2 may end with an empty
/// one), each with the time it arrived.
async fn frames(body: &mut Incoming) -> Vec<(Bytes, Instant)> {
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            if !data.is_empty() {
                frames.push((data, Instant::now()));
            }
        }
    }
    frames
}

/// The JSON of a `data: {...}\n\n` event.
fn chunk(event: &[u8]) -> Value {
    let text = std::str::from_utf8(event).expect("UTF-8 event");
    let json = text
        .strip_prefix("data: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not a data event: {text:?}"));
    serde_json::from_str(json).expect("JSON chunk")
}

#[tokio::test]
async fn completion_has_the_openai_shape_and_word_usage() {
    let upstream = Upstream::start().await.unwrap();
    let body = chat_body(false, false).to_string();
    let (status, headers, reply) = call(
        &upstream,
        post(&upstream, "/v1/chat/completions", body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["id"], "chatcmpl-1");
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(reply["model"], "patient-test");
    assert_eq!(
        reply["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello there world"},
            "finish_reason": "stop",
        }])
    );
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );

    // Content parts count too; ids go on.
    let parts = json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}]}],
    });
    let (_, _, reply) = call(
        &upstream,
        post(&upstream, "/v1/chat/completions", parts.to_string()),
    )
    .await;
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["id"], "chatcmpl-2");
    assert_eq!(reply["model"], "m");
    assert_eq!(reply["choices"][0]["message"]["content"], "echo: one two");
    assert_eq!(reply["usage"]["prompt_tokens"], 2);
    assert_eq!(reply["usage"]["completion_tokens"], 3);

    // What the endpoint received, as it arrived.
    assert_eq!(upstream.requests_to("/v1/chat/completions"), 2);
    let recorded = upstream.openai_requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].method, http::Method::POST);
    assert_eq!(recorded[0].uri.path(), "/v1/chat/completions");
    assert_eq!(recorded[0].header("authorization"), Some("Bearer sk-test"));
    assert_eq!(recorded[0].header("X-Test-Header"), Some("present"));
    assert_eq!(recorded[0].body, body.as_bytes());
    assert_eq!(recorded[0].json(), Some(chat_body(false, false)));
    assert_eq!(recorded[1].json(), Some(parts));
}

#[tokio::test]
async fn invalid_requests_get_openai_errors() {
    let upstream = Upstream::start().await.unwrap();
    for body in [
        "{not json",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"m","messages":[]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#,
    ] {
        let (status, headers, reply) =
            call(&upstream, post(&upstream, "/v1/chat/completions", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{body}");
        assert!(reply["error"]["message"].as_str().unwrap().len() > 5);
    }
    let (status, _, reply) = call(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?interval_ms=soon",
            chat_body(true, false).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("interval_ms"));
    // Invalid requests are recorded too.
    assert_eq!(upstream.openai_requests().len(), 5);
    assert_eq!(upstream.openai_requests()[0].body, "{not json");
}

#[tokio::test]
async fn models_lists_the_test_model() {
    let upstream = Upstream::start().await.unwrap();
    let request = Request::get("/v1/models")
        .header("host", upstream.addr().to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = call(&upstream, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"object": "list", "data": [
            {"id": "patient-test", "object": "model", "created": 0, "owned_by": "patient"}
        ]})
    );
}

#[tokio::test]
async fn stream_sends_role_words_finish_usage_and_done_one_frame_each() {
    let upstream = Upstream::start().await.unwrap();
    let started = Instant::now();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?interval_ms=40",
            chat_body(true, true).to_string(),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let frames = frames(&mut response.into_body()).await;
    // role, 4 words, finish, usage, [DONE]
    assert_eq!(frames.len(), 8, "{frames:?}");
    assert_eq!(&frames[7].0[..], b"data: [DONE]\n\n");

    let chunks: Vec<Value> = frames[..7].iter().map(|(f, _)| chunk(f)).collect();
    for chunk in &chunks {
        assert_eq!(chunk["id"], "chatcmpl-1");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "patient-test");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let words: Vec<&str> = chunks[1..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(words, ["echo: ", "hello ", "there ", "world"]);
    for chunk in &chunks[..5] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunk["usage"], Value::Null);
    }
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[6]["choices"], json!([]));
    assert_eq!(
        chunks[6]["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );

    // Events arrive one by one, interval_ms apart: event i not before
    // i * 40 ms, and the first well before the last.
    for (i, (_, at)) in frames.iter().enumerate() {
        let after = *at - started;
        assert!(
            after >= Duration::from_millis(40 * i as u64),
            "event {i} after {after:?}"
        );
    }
    let spread = frames[7].1 - frames[0].1;
    assert!(spread >= Duration::from_millis(140), "spread {spread:?}");
    assert_eq!(upstream.streams_cancelled(), 0);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let upstream = Upstream::start().await.unwrap();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions",
            chat_body(true, false).to_string(),
        ),
    )
    .await;
    let frames = frames(&mut response.into_body()).await;
    assert_eq!(frames.len(), 7, "{frames:?}");
    assert_eq!(&frames[6].0[..], b"data: [DONE]\n\n");
    for (frame, _) in &frames[..6] {
        assert!(chunk(frame).get("usage").is_none());
    }
    assert_eq!(chunk(&frames[5].0)["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_over_http2() {
    let upstream = Upstream::start_with(UpstreamOptions::new().http2_only())
        .await
        .unwrap();
    let stream = TcpStream::connect(upstream.addr()).await.unwrap();
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(post(
            &upstream,
            "/v1/chat/completions",
            chat_body(true, true).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let frames = frames(&mut response.into_body()).await;
    assert_eq!(frames.len(), 8);
    assert_eq!(&frames[7].0[..], b"data: [DONE]\n\n");
}

#[tokio::test]
async fn pings_come_before_the_first_delayed_event() {
    let upstream = Upstream::start().await.unwrap();
    let started = Instant::now();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?pings=2&first_delay_ms=150",
            chat_body(true, false).to_string(),
        ),
    )
    .await;
    let head = started.elapsed();
    assert!(head < Duration::from_millis(100), "head after {head:?}");
    let frames = frames(&mut response.into_body()).await;
    assert_eq!(&frames[0].0[..], b": ping\n\n");
    assert_eq!(&frames[1].0[..], b": ping\n\n");
    // The wait is cut in three: pings at ~50 and ~100 ms, the first event at ~150.
    assert!(frames[0].1 - started >= Duration::from_millis(40));
    assert!(frames[2].1 - started >= Duration::from_millis(150));
    assert_eq!(
        chunk(&frames[2].0)["choices"][0]["delta"]["role"],
        "assistant"
    );
    assert_eq!(frames.len(), 9);
}

#[tokio::test]
async fn split_writes_each_event_as_two_frames() {
    let upstream = Upstream::start().await.unwrap();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?split=1&pings=1",
            chat_body(true, true).to_string(),
        ),
    )
    .await;
    let frames: Vec<Bytes> = frames(&mut response.into_body())
        .await
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    // ping, role, 4 words, finish, usage, [DONE]: each in two halves.
    assert_eq!(frames.len(), 18, "{frames:?}");
    for pair in frames.chunks(2) {
        assert!(!pair[0].ends_with(b"\n\n"), "{pair:?}");
        assert!(pair[1].ends_with(b"\n\n"), "{pair:?}");
        assert!(pair[0].len().abs_diff(pair[1].len()) <= 1, "{pair:?}");
    }
    let events: Vec<Vec<u8>> = frames.chunks(2).map(|pair| pair.concat()).collect();
    assert_eq!(events[0], b": ping\n\n");
    assert_eq!(
        chunk(&events[1])["choices"][0]["delta"]["role"],
        "assistant"
    );
    assert_eq!(
        chunk(&events[2])["choices"][0]["delta"]["content"],
        "echo: "
    );
    assert_eq!(chunk(&events[6])["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunk(&events[7])["usage"]["total_tokens"], 9);
    assert_eq!(events[8], b"data: [DONE]\n\n");
}

#[tokio::test]
async fn cut_after_ends_the_body_cleanly_mid_stream() {
    let upstream = Upstream::start().await.unwrap();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?cut_after=2",
            chat_body(true, true).to_string(),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    // `frames` panics on a body error: the end is clean.
    let frames = frames(&mut response.into_body()).await;
    assert_eq!(frames.len(), 3, "{frames:?}");
    let chunks: Vec<Value> = frames.iter().map(|(f, _)| chunk(f)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "echo: ");
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "hello ");
    for chunk in &chunks {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    // A cut is not a cancellation.
    assert_eq!(upstream.streams_cancelled(), 0);
}

#[tokio::test]
async fn no_trailing_blank_leaves_the_done_event_open() {
    let upstream = Upstream::start().await.unwrap();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?no_trailing_blank=1",
            chat_body(true, false).to_string(),
        ),
    )
    .await;
    let frames = frames(&mut response.into_body()).await;
    assert_eq!(frames.len(), 7);
    assert_eq!(&frames[6].0[..], b"data: [DONE]\n");
    assert!(frames[5].0.ends_with(b"\n\n"));
}

#[tokio::test]
async fn status_answers_an_openai_error_with_retry_after() {
    let upstream = Upstream::start().await.unwrap();
    for stream in [false, true] {
        let (status, headers, body) = call(
            &upstream,
            post(
                &upstream,
                "/v1/chat/completions?status=429&retry_after=2",
                chat_body(stream, false).to_string(),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "2");
        assert_eq!(headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
    let (status, headers, body) = call(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?status=500",
            chat_body(false, false).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(headers.get("retry-after").is_none());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    let (status, _, _) = call(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?status=200",
            chat_body(false, false).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn head_delay_holds_the_response_head() {
    let upstream = Upstream::start().await.unwrap();
    let started = Instant::now();
    let response = send(
        &upstream,
        post(
            &upstream,
            "/v1/chat/completions?head_delay_ms=120",
            chat_body(true, false).to_string(),
        ),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(120));
    assert_eq!(response.status(), StatusCode::OK);
}

/// Waits up to 5 s for `streams_cancelled` to reach `n`.
async fn wait_cancelled(upstream: &Upstream, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.streams_cancelled() < n {
        assert!(Instant::now() < deadline, "stream not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.streams_cancelled(), n);
}

#[tokio::test]
async fn closing_the_connection_cancels_the_stream() {
    let upstream = Upstream::start().await.unwrap();
    let long = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "a b c d e f g h i j k l m n o p q r s t"}],
        "stream": true,
    });
    // A long gap: the server must notice during the wait, not at the next write.
    let (mut sender, connection) = h1(&upstream).await;
    sender.ready().await.unwrap();
    let response = sender
        .send_request(post(
            &upstream,
            "/v1/chat/completions?interval_ms=10000",
            long.to_string(),
        ))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(upstream.streams_cancelled(), 0);
    let started = Instant::now();
    drop(body);
    drop(sender);
    connection.abort();
    wait_cancelled(&upstream, 1).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn resetting_an_http2_stream_cancels_it() {
    let upstream = Upstream::start().await.unwrap();
    let stream = TcpStream::connect(upstream.addr()).await.unwrap();
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(post(
            &upstream,
            "/v1/chat/completions?interval_ms=10000",
            chat_body(true, false).to_string(),
        ))
        .await
        .unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    // Dropping the body resets the stream; the connection stays open.
    drop(body);
    wait_cancelled(&upstream, 1).await;
    // The connection still serves.
    let response = sender
        .send_request(post(
            &upstream,
            "/v1/chat/completions",
            chat_body(false, false).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_completes_and_streams() {
    let Some(python) = patient_testkit::services::test_python("the openai SDK test") else {
        return;
    };
    let upstream = Upstream::start().await.unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let base_url = upstream.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(base_url)
            .output()
    })
    .await
    .unwrap()
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK script failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["completion"], "chatcmpl-1", "{line}");
    assert_eq!(line["chunks"], 5, "{line}");
    let recorded = upstream.openai_requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].header("authorization"), Some("Bearer k"));
    assert_eq!(recorded[1].json().unwrap()["stream"], true);
    assert_eq!(upstream.streams_cancelled(), 0);
}
