//! The gateway against the test upstream and real clients: header rules,
//! both caps, retries only where allowed, failover, a shared 429 cool-down,
//! streaming event by event, a cut stream, a client leaving, a slow reader,
//! the hooks of an embedder.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{call, Daemon};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use patient_daemon::gateway::{
    hooks::{Action, ProxyContext, ProxyHooks, StreamSummary},
    settings::RouteSettings,
    sse::SseEvent,
    Gateway,
};
use patient_testkit::Upstream;
use serde_json::{json, Value};

/// A route named `r` at `/up/` (prefix stripped) to `upstreams`, with
/// `extra` TOML lines.
fn route(upstreams: &[String], extra: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[routes]]\nname = \"r\"\npath_prefix = \"/up/\"\nstrip_prefix = true\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

async fn daemon(upstreams: &[String], extra: &str) -> Daemon {
    Daemon::start_with_config(&route(upstreams, extra), &[]).await
}

fn base(upstream: &Upstream) -> String {
    format!("http://{}", upstream.addr())
}

/// A request whose response body is read as it comes.
async fn open(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (http::response::Parts, Incoming) {
    let url = url::Url::parse(url).unwrap();
    let authority = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request = request.header("host", &authority);
    }
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts, body)
}

/// The next data frame of a body (empty frames skipped), `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame within 10 s")?
            .expect("the body does not fail");
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Some(data);
            }
        }
    }
}

/// The events of an SSE text, by blank lines.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn hop_by_hop_fields_never_pass_forwarding_headers_are_added_and_route_rules_apply() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(
        &[base(&upstream)],
        "request_headers = { add = { x-route = \"r1\" }, remove = [\"x-drop-me\"] }\nresponse_headers = { add = { x-served-by = \"patient\" }, remove = [\"x-upstream-secret\"] }",
    )
    .await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}]});
    let reply = call(
        "POST",
        &format!("{}/up/v1/chat/completions", d.url),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer client-key"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "listed in connection"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic cHJveHk="),
            ("x-drop-me", "1"),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-kept", "yes"),
        ],
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "echo: hi there"
    );
    assert_eq!(reply.headers["x-served-by"], "patient");
    let seen = upstream.openai_requests();
    let sent = &seen.last().unwrap().headers;
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-drop-me",
    ] {
        assert!(
            !sent.contains_key(gone),
            "{gone} reached the upstream: {sent:?}"
        );
    }
    assert_eq!(sent["x-kept"], "yes");
    assert_eq!(sent["x-route"], "r1");
    assert_eq!(
        sent["authorization"], "Bearer client-key",
        "the client's key is forwarded"
    );
    assert_eq!(sent["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(sent["x-forwarded-proto"], "http");
    assert_eq!(
        sent["x-forwarded-host"],
        d.url.trim_start_matches("http://")
    );
    assert_eq!(
        sent["host"],
        upstream.addr().to_string(),
        "Host is the upstream's"
    );
    assert_eq!(
        sent["content-length"],
        body.to_string().len().to_string().as_str(),
        "Content-Length is recomputed"
    );

    // Response side: hop-by-hop fields and those Connection names stay out;
    // the route removes what it says.
    let reply = call(
        "GET",
        &format!(
            "{}/up/set?x-upstream-secret=s&x-resp-hop=1&connection=x-resp-hop&proxy-authenticate=Basic&x-visible=1",
            d.url
        ),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-visible"], "1");
    for gone in ["x-upstream-secret", "x-resp-hop", "proxy-authenticate"] {
        assert!(
            !reply.headers.contains_key(gone),
            "{gone} reached the client: {:?}",
            reply.headers
        );
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_route_credential_replaces_the_clients_key() {
    let upstream = Upstream::start().await.unwrap();
    let d = guarded(&upstream, "credential = \"openai_key\"").await;
    let reply = call(
        "POST",
        &format!("{}/up/v1/chat/completions", d.url),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ],
        Some(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#.to_vec()),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sent = upstream.openai_requests();
    assert_eq!(
        sent.last().unwrap().headers["authorization"],
        "Bearer sk-upstream"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_over_the_request_cap_is_413_before_any_upstream_call() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "max_request_body = 100").await;
    let before = upstream.requests();
    let reply = call(
        "POST",
        &format!("{}/up/mirror", d.url),
        &[("content-type", "application/octet-stream")],
        Some(vec![b'x'; 101]),
    )
    .await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "payload_too_large");
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_request_body"));
    // Without a Content-Length (chunked): counted as it is read.
    let (parts, body) = open_chunked(&format!("{}/up/mirror", d.url), 150).await;
    assert_eq!(parts.status, 413);
    let text = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("payload_too_large"));
    assert_eq!(upstream.requests(), before, "nothing reached the upstream");
    // At the cap: forwarded, every byte.
    let reply = call(
        "POST",
        &format!("{}/up/mirror", d.url),
        &[("content-type", "application/octet-stream")],
        Some(vec![b'y'; 100]),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 100);
    d.stop().await.unwrap();
}

/// A POST with a chunked body of `n` bytes (no Content-Length).
async fn open_chunked(url: &str, n: usize) -> (http::response::Parts, Incoming) {
    let url = url::Url::parse(url).unwrap();
    let authority = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = (0..n / 50)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'z'; 50]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let request = http::Request::post(url.path())
        .header("host", &authority)
        .body(body)
        .unwrap();
    let (parts, body) = sender.send_request(request).await.unwrap().into_parts();
    (parts, body)
}

#[tokio::test]
async fn an_upstream_body_over_the_response_cap_is_502_and_a_stream_is_cut_there() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "max_response_body = 1000").await;
    let reply = call("GET", &format!("{}/up/bytes?n=5000", d.url), &[], None).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "upstream_body_too_large");
    let ok = call("GET", &format!("{}/up/bytes?n=1000", d.url), &[], None).await;
    assert_eq!((ok.status, ok.body.len()), (200, 1000));

    // A stream passes what fits, then an error event.
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "word ".repeat(200)}]});
    let (parts, body) = open(
        &format!("{}/up/v1/chat/completions", d.url),
        "POST",
        &[("content-type", "application/json")],
        &body.to_string(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let all = events(&text);
    let last = all.last().unwrap();
    assert!(
        last.contains("max_response_body") && last.contains("\"upstream_body_too_large\""),
        "{last}"
    );
    assert!(!text.contains("[DONE]"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn only_idempotent_requests_and_posts_with_an_idempotency_key_are_retried() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(
        &[base(&upstream)],
        "max_attempts = 3\nretry_base_delay = 0.01",
    )
    .await;
    let get = call(
        "GET",
        &format!("{}/up/sequence?key=g&steps=503,200", d.url),
        &[],
        None,
    )
    .await;
    assert_eq!(get.status, 200, "a GET is retried: {}", get.text());
    assert_eq!(upstream.sequence_count("g"), 2);

    let post = call(
        "POST",
        &format!("{}/up/sequence?key=p&steps=503,200", d.url),
        &[],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(post.status, 503, "a POST is not retried");
    assert_eq!(upstream.sequence_count("p"), 1);

    let keyed = call(
        "POST",
        &format!("{}/up/sequence?key=k&steps=503,200", d.url),
        &[("idempotency-key", "abc")],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(keyed.status, 200, "a POST with an Idempotency-Key is");
    assert_eq!(upstream.sequence_count("k"), 2);
    let metrics = call("GET", &format!("{}/metrics", d.url), &[], None)
        .await
        .text();
    assert!(
        metrics.contains("patient_gateway_retries_total{route=\"r\"} 2"),
        "{metrics}"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_upstream_fails_over_to_the_next_and_its_breaker_takes_it_out() {
    let upstream = Upstream::start().await.unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let d = daemon(
        &[dead.clone(), base(&upstream)],
        "breaker_failures = 2\nbreaker_duration = 60",
    )
    .await;
    for _ in 0..6 {
        let post = call(
            "POST",
            &format!("{}/up/v1/chat/completions", d.url),
            &[("content-type", "application/json")],
            Some(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#.to_vec()),
        )
        .await;
        assert_eq!(post.status, 200, "{}", post.text());
    }
    assert_eq!(
        upstream.openai_requests().len(),
        6,
        "every request reached the live one"
    );
    let metrics = call("GET", &format!("{}/metrics", d.url), &[], None)
        .await
        .text();
    // Two failed connections opened the dead one's breaker: after that it
    // is skipped, not tried.
    let failovers: u64 = metrics
        .lines()
        .find(|l| l.starts_with("patient_gateway_failovers_total{route=\"r\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(failovers, 2, "{metrics}");

    // With every upstream down: 502 in the OpenAI shape.
    d.stop().await.unwrap();
    let d = daemon(&[dead], "").await;
    let reply = call("GET", &format!("{}/up/fast", d.url), &[], None).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "bad_gateway");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_429_cools_the_upstream_down_for_every_request() {
    let upstream = Upstream::start().await.unwrap();
    // Retry-After 30 s is over the route's max_retry_after: the 429 goes
    // back to its client, and the cool-down holds the others.
    let d = daemon(&[base(&upstream)], "max_retry_after = 1").await;
    let first = call(
        "GET",
        &format!("{}/up/sequence?key=c&steps=429,200&retry_after=30", d.url),
        &[],
        None,
    )
    .await;
    assert_eq!(first.status, 429);
    assert_eq!(first.headers["retry-after"], "30");
    let url = format!("{}/up/sequence?key=c&steps=429,200", d.url);
    let others = futures_util::future::join_all((0..5).map(|_| call("GET", &url, &[], None))).await;
    for reply in others {
        assert_eq!(reply.status, 429, "{}", reply.text());
        assert_eq!(reply.json()["error"]["type"], "rate_limited");
    }
    assert_eq!(
        upstream.sequence_count("c"),
        1,
        "nothing more reached the upstream"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_a_slow_one_504() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "timeout = 0.2\nmax_attempts = 1").await;
    let slow = call("GET", &format!("{}/up/delay?ms=3000", d.url), &[], None).await;
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert_eq!(slow.json()["error"]["type"], "gateway_timeout");
    // Not a route: the API's 404.
    let other = call("GET", &format!("{}/elsewhere", d.url), &[], None).await;
    other.assert_error(404, "not_found");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_as_the_upstream_writes_them() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let feed = upstream.feed("s");
    let (parts, mut body) = open(
        &format!("{}/up/feed?key=s&content-type=text/event-stream", d.url),
        "GET",
        &[("accept", "text/event-stream")],
        "",
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-accel-buffering"], "no");
    assert!(!parts.headers.contains_key("content-length"));
    // Each event reaches the client before the upstream writes the next:
    // the proxy holds nothing back.
    for i in 0..3 {
        assert!(feed.send(format!("data: {{\"n\":{i}}}\n\n")).await);
        let got = next_data(&mut body).await.unwrap();
        assert_eq!(got, format!("data: {{\"n\":{i}}}\n\n"));
    }
    // An event split across two writes comes out whole.
    assert!(feed.send("data: {\"n\":").await);
    assert!(feed.send("3}\n\ndata: [DONE]\n\n").await);
    let got = next_data(&mut body).await.unwrap();
    assert_eq!(got, "data: {\"n\":3}\n\n");
    assert_eq!(next_data(&mut body).await.unwrap(), "data: [DONE]\n\n");
    drop(feed);
    assert_eq!(next_data(&mut body).await, None, "a clean end after [DONE]");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn openai_streams_keep_their_spacing_and_a_cut_stream_ends_with_an_error_event() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let request = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three"}]});
    // Spacing: 60 ms between events upstream, so between arrivals too.
    let (parts, mut body) = open(
        &format!("{}/up/v1/chat/completions?interval_ms=60", d.url),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(data) = next_data(&mut body).await {
        arrivals.push(std::time::Instant::now());
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    let all = events(&text);
    assert!(all.len() >= 6, "{all:?}");
    assert_eq!(all.last().unwrap(), "data: [DONE]");
    let gaps: Vec<u128> = arrivals
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert!(
        gaps.iter().filter(|g| **g >= 30).count() >= gaps.len() - 1,
        "gaps {gaps:?}"
    );

    // Cut after two content chunks: the client is told, not left thinking
    // the stream is complete.
    let (_, body) = open(
        &format!("{}/up/v1/chat/completions?cut_after=2", d.url),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let all = events(&text);
    let last: Value =
        serde_json::from_str(all.last().unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(last["error"]["type"], "bad_gateway", "{text}");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("[DONE]"));

    // A last event without its blank line still reaches the client whole.
    let (_, body) = open(
        &format!(
            "{}/up/v1/chat/completions?no_trailing_blank=1&split=1",
            d.url
        ),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    let metrics = call("GET", &format!("{}/metrics", d.url), &[], None)
        .await
        .text();
    assert!(
        metrics
            .contains("patient_gateway_streams_cut_total{route=\"r\",reason=\"upstream_cut\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("patient_gateway_tokens_total{route=\"r\",kind=\"completion\"}"),
        "{metrics}"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_upstream_request() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let request = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "a b c d e f g h"}]});
    let (_, mut body) = open(
        &format!("{}/up/v1/chat/completions?interval_ms=200", d.url),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    assert!(next_data(&mut body).await.is_some());
    drop(body);
    common::wait_for(
        "the upstream to see the stream cancelled",
        Duration::from_secs(5),
        || async { (upstream.streams_cancelled() >= 1).then_some(()) },
    )
    .await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_reader_holds_the_upstream_back_instead_of_growing_the_proxy() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "max_response_body = 0").await;
    let feed = upstream.feed("big");
    let (parts, body) = open(
        &format!(
            "{}/up/feed?key=big&content-type=application/octet-stream",
            d.url
        ),
        "GET",
        &[("accept", "text/event-stream")],
        "",
    )
    .await;
    assert_eq!(parts.status, 200);
    // The client reads nothing: the upstream's writes must stall once the
    // socket buffers between them are full.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut sent = 0usize;
    let mut stalled = false;
    for _ in 0..1024 {
        match tokio::time::timeout(Duration::from_millis(500), feed.send(chunk.clone())).await {
            Ok(true) => sent += chunk.len(),
            Ok(false) => panic!("the stream went away"),
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    assert!(
        stalled,
        "64 MiB went through to a client that reads nothing"
    );
    assert!(
        sent < 16 << 20,
        "{sent} bytes were taken before the upstream was held back"
    );
    drop(body);
    d.stop().await.unwrap();
}

/// Hooks that record what they see and rewrite events.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    ends: Mutex<Vec<StreamSummary>>,
}

#[patient_daemon::gateway::hooks::async_trait]
impl ProxyHooks for Recorder {
    fn event_filter(&self, event: &SseEvent, _ctx: &mut ProxyContext) -> Action<Bytes> {
        let text = String::from_utf8_lossy(&event.raw).into_owned();
        self.events.lock().unwrap().push(text.clone());
        if text.contains("drop me") {
            Action::Drop
        } else if text.contains("twice") {
            Action::FanOut(vec![event.raw.clone(), event.raw.clone()])
        } else {
            Action::Pass
        }
    }

    fn end_of_stream(&self, summary: &StreamSummary, _ctx: &mut ProxyContext) {
        self.ends.lock().unwrap().push(*summary);
    }
}

#[tokio::test]
async fn an_embedders_hooks_see_whole_events_and_the_end_of_the_stream() {
    let upstream = Upstream::start().await.unwrap();
    let routes: Vec<RouteSettings> =
        toml::from_str::<BTreeMap<String, Vec<RouteSettings>>>(&route(&[base(&upstream)], ""))
            .unwrap()
            .remove("routes")
            .unwrap();
    let hooks = Arc::new(Recorder::default());
    let gateway = Gateway::new(&routes, BTreeMap::new(), hooks.clone()).unwrap();
    let app = axum::Router::new()
        .fallback(|| async { "the embedder's own" })
        .layer(axum::middleware::from_fn_with_state(
            gateway,
            patient_daemon::gateway::middleware,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let feed = upstream.feed("h");
    let (_, mut body) = open(
        &format!("http://{addr}/up/feed?key=h&content-type=text/event-stream"),
        "GET",
        &[],
        "",
    )
    .await;
    assert!(feed.send("data: one\n\nda").await);
    assert_eq!(next_data(&mut body).await.unwrap(), "data: one\n\n");
    assert!(
        feed.send("ta: drop me\n\ndata: twice\n\n: ping\n\ndata: [DONE]\n")
            .await
    );
    drop(feed);
    let mut rest = String::new();
    while let Some(d) = next_data(&mut body).await {
        rest.push_str(std::str::from_utf8(&d).unwrap());
    }
    assert_eq!(
        rest,
        "data: twice\n\ndata: twice\n\n: ping\n\ndata: [DONE]\n\n"
    );
    let seen = hooks.events.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "data: one\n\n",
            "data: drop me\n\n",
            "data: twice\n\n",
            ": ping\n\n",
            "data: [DONE]\n\n"
        ],
        "the hook sees each event whole, the split one put back together"
    );
    let ends = hooks.ends.lock().unwrap().clone();
    assert_eq!(ends.len(), 1);
    assert!(ends[0].completed && !ends[0].client_gone);
    assert_eq!(ends[0].events, 5);
    // Other paths are the embedder's.
    let other = call("GET", &format!("http://{addr}/elsewhere"), &[], None).await;
    assert_eq!(other.text(), "the embedder's own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_through_the_gateway_unchanged() {
    let Some(python) = patient_testkit::services::test_python("the openai SDK test") else {
        return;
    };
    let upstream = Upstream::start().await.unwrap();
    let config = format!(
        "[[routes]]\nname = \"openai\"\npath_prefix = \"/openai/\"\nstrip_prefix = true\nupstreams = [\"{}\"]\nmax_request_body = 4096\n",
        base(&upstream)
    );
    let d = Daemon::start_with_config(&config, &[]).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/openai_gateway.py");
    let base_url = format!("{}/openai/v1", d.url);
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
        "the SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(report["chunks"].as_u64().unwrap() >= 5, "{report}");
    // The SDK's key went upstream (the route has no credential of its own).
    let sent = upstream.openai_requests();
    assert!(sent
        .iter()
        .all(|r| r.headers["authorization"] == "Bearer sk-client"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_first_event_and_the_gap_between_events_have_their_timers() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(
        &[base(&upstream)],
        "first_event_timeout = 0.3\nidle_timeout = 0.3",
    )
    .await;
    let request =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "a b"}]});
    // Pings keep coming but no content: the first-event timer fires.
    let (_, body) = open(
        &format!(
            "{}/up/v1/chat/completions?first_delay_ms=5000&pings=50",
            d.url
        ),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let last = events(&text).pop().unwrap();
    assert!(
        last.contains("first_event_timeout") && last.contains("gateway_timeout"),
        "{text}"
    );
    assert!(text.contains(": ping"), "the pings went through: {text}");
    // Content, then silence: the gap timer fires.
    let (_, body) = open(
        &format!("{}/up/v1/chat/completions?interval_ms=5000", d.url),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let last = events(&text).pop().unwrap();
    assert!(last.contains("idle_timeout"), "{text}");
    common::wait_for(
        "the upstream to see both streams cancelled",
        Duration::from_secs(5),
        || async { (upstream.streams_cancelled() >= 2).then_some(()) },
    )
    .await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_drained_stream_runs_on_after_its_client_left_and_its_usage_is_counted() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(
        &[base(&upstream)],
        "on_disconnect = \"drain\"\ndrain_timeout = 10",
    )
    .await;
    let request = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "a b c d"}]});
    let (_, mut body) = open(
        &format!("{}/up/v1/chat/completions?interval_ms=50", d.url),
        "POST",
        &[("content-type", "application/json")],
        &request.to_string(),
    )
    .await;
    assert!(next_data(&mut body).await.is_some());
    drop(body);
    let metrics = common::wait_for(
        "the drained stream's usage",
        Duration::from_secs(10),
        || async {
            let text = call("GET", &format!("{}/metrics", d.url), &[], None)
                .await
                .text();
            text.contains("patient_gateway_tokens_total{route=\"r\",kind=\"completion\"} 5")
                .then_some(text)
        },
    )
    .await;
    assert!(metrics.contains("reason=\"client_gone\"} 1"), "{metrics}");
    assert_eq!(
        upstream.streams_cancelled(),
        0,
        "the upstream stream was read to its end"
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_deadline_bounds_the_request_and_goes_upstream() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let reply = call(
        "GET",
        &format!("{}/up/sequence?key=t&steps=200", d.url),
        &[("x-request-timeout", "5")],
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
    let sent: f64 = reply.json()["headers"]["x-request-timeout"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent > 0.0 && sent <= 5.0, "{sent}");
    let started = std::time::Instant::now();
    let slow = call(
        "GET",
        &format!("{}/up/delay?ms=5000", d.url),
        &[("x-request-timeout", "0.3")],
        None,
    )
    .await;
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert!(started.elapsed() < Duration::from_secs(3));
    d.stop().await.unwrap();
}

/// Hooks that answer some requests themselves and steer others.
struct Steering {
    second: String,
}

#[derive(Clone)]
struct WantsSecond;

#[patient_daemon::gateway::hooks::async_trait]
impl ProxyHooks for Steering {
    async fn request_filter(
        &self,
        request: patient_daemon::gateway::hooks::RequestHead<'_>,
        ctx: &mut ProxyContext,
    ) -> Option<patient_daemon::gateway::hooks::HookResponse> {
        if request.uri.path().ends_with("/answer-myself") {
            return Some(patient_daemon::gateway::hooks::HookResponse {
                status: http::StatusCode::IM_A_TEAPOT,
                headers: http::HeaderMap::new(),
                body: Bytes::from_static(b"from the hook"),
            });
        }
        if request.headers.remove("x-pick").is_some() {
            ctx.extensions.insert(WantsSecond);
        }
        None
    }

    fn pick_upstream(&self, candidates: &[&str], ctx: &ProxyContext) -> Option<usize> {
        ctx.extensions
            .get::<WantsSecond>()
            .and_then(|_| candidates.iter().position(|c| *c == self.second))
    }
}

#[tokio::test]
async fn a_request_hook_may_answer_itself_and_a_pick_hook_chooses_the_upstream() {
    let first = Upstream::start().await.unwrap();
    let second = Upstream::start().await.unwrap();
    let text = route(&[base(&first), base(&second)], "");
    let routes = toml::from_str::<BTreeMap<String, Vec<RouteSettings>>>(&text)
        .unwrap()
        .remove("routes")
        .unwrap();
    let hooks = Arc::new(Steering {
        second: base(&second),
    });
    let gateway = Gateway::new(&routes, BTreeMap::new(), hooks).unwrap();
    let app = axum::Router::new().layer(axum::middleware::from_fn_with_state(
        gateway,
        patient_daemon::gateway::middleware,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let answered = call("GET", &format!("http://{addr}/up/answer-myself"), &[], None).await;
    assert_eq!(
        (answered.status, answered.text().as_str()),
        (418, "from the hook")
    );
    assert_eq!(
        first.requests() + second.requests(),
        0,
        "nothing was forwarded"
    );
    for _ in 0..4 {
        let reply = call(
            "GET",
            &format!("http://{addr}/up/fast"),
            &[("x-pick", "1")],
            None,
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        (first.requests_to("/fast"), second.requests_to("/fast")),
        (0, 4)
    );
    // Without the hook's say, round robin shares them out.
    for _ in 0..4 {
        call("GET", &format!("http://{addr}/up/fast"), &[], None).await;
    }
    assert_eq!(
        (first.requests_to("/fast"), second.requests_to("/fast")),
        (2, 6)
    );
}

#[tokio::test]
async fn routes_match_by_host_and_header_before_falling_back_to_a_plain_prefix() {
    let by_host = Upstream::start().await.unwrap();
    let by_header = Upstream::start().await.unwrap();
    let plain = Upstream::start().await.unwrap();
    let config = format!(
        "[[routes]]\nname = \"host\"\npath_prefix = \"/x/\"\nhost = \"api.local\"\nupstreams = [\"{}\"]\n\n\
         [[routes]]\nname = \"header\"\npath_prefix = \"/x/\"\nmatch_headers = {{ x-tenant = \"blue\" }}\nupstreams = [\"{}\"]\n\n\
         [[routes]]\nname = \"plain\"\npath_prefix = \"/x/\"\nupstreams = [{{ url = \"{}/base\", weight = 3 }}]\n",
        base(&by_host),
        base(&by_header),
        base(&plain)
    );
    // The daemon answers any host name, as behind a load balancer.
    let d = Daemon::start_with_config(&config, &[("PATIENT_ALLOWED_HOSTS", "*")]).await;
    let url = format!("{}/x/fast", d.url);
    for headers in [
        [("host", "API.local:8080")],
        [("x-tenant", "blue")],
        [("x-tenant", "red")],
    ] {
        let (parts, body) = open(&url, "GET", &headers, "").await;
        let text = body.collect().await.unwrap().to_bytes();
        assert_eq!(parts.status, 404, "the upstreams have no /x/fast: {text:?}");
    }
    assert_eq!(
        by_host.requests_to("/x/fast"),
        1,
        "the prefix stays without strip_prefix"
    );
    assert_eq!(by_header.requests_to("/x/fast"), 1);
    // The upstream's base path goes before the forwarded path.
    assert_eq!(plain.requests_to("/base/x/fast"), 1);
    d.stop().await.unwrap();
}

/// The API token of the daemons that test route `auth`.
const TOKEN: &str = "t0k-Secret-42";

/// A daemon with the API token [`TOKEN`], the secret `openai_key`
/// (`sk-upstream`) and one route at `/up/` to `upstream` with `extra`.
async fn guarded(upstream: &Upstream, extra: &str) -> Daemon {
    std::env::set_var("PATIENT_GATEWAY_TEST_KEY", "sk-upstream");
    let config = format!(
        "[secrets.openai_key]\nenv = \"PATIENT_GATEWAY_TEST_KEY\"\n\n{}",
        route(&[base(upstream)], extra)
    );
    Daemon::start_with_config(&config, &[("PATIENT_API_TOKEN", TOKEN)]).await
}

/// The headers the upstream's `/echo` saw, by lower-case name (repeated
/// fields joined with `, `).
fn echoed(reply: &common::Reply) -> serde_json::Map<String, Value> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["headers"].as_object().unwrap().clone()
}

#[tokio::test]
async fn a_credential_route_asks_for_the_api_token_and_never_forwards_it() {
    let upstream = Upstream::start().await.unwrap();
    let d = guarded(&upstream, "credential = \"openai_key\"").await;
    let url = format!("{}/up/echo", d.url);
    let bearer = format!("Bearer {TOKEN}");
    let prefix = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let extension = format!("Bearer {TOKEN}x");
    let doubled = format!("Bearer {TOKEN}{TOKEN}");
    let lower = format!("Bearer {}", TOKEN.to_lowercase());
    let before = upstream.requests();
    let refused: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", &prefix)],
        vec![("authorization", &extension)],
        vec![("authorization", &doubled)],
        vec![("authorization", &lower)],
        vec![("authorization", TOKEN)],
        vec![("authorization", "Basic dDBrLVNlY3JldC00Mg==")],
        vec![("authorization", "Bearer")],
        vec![("x-api-key", "wrong")],
        vec![("x-api-key", &TOKEN[1..])],
        vec![("x-api-key", "")],
        // A right token beside a wrong one, in either order or field.
        vec![
            ("authorization", "Bearer wrong"),
            ("authorization", &bearer),
        ],
        vec![
            ("authorization", &bearer),
            ("authorization", "Bearer wrong"),
        ],
        vec![("authorization", &bearer), ("x-api-key", "wrong")],
        vec![("x-api-key", TOKEN), ("authorization", "Bearer wrong")],
        // The token elsewhere does not count.
        vec![("proxy-authorization", &bearer)],
        vec![("api-key", TOKEN)],
    ];
    for headers in &refused {
        for (method, body) in [("GET", None), ("POST", Some(b"{}".to_vec()))] {
            let reply = call(method, &url, headers, body).await;
            assert_eq!(reply.status, 401, "{headers:?}: {}", reply.text());
            assert_eq!(reply.headers["www-authenticate"], "Bearer", "{headers:?}");
            let body = reply.json();
            assert_eq!(body["error"]["type"], "unauthorized", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(!message.is_empty() && !message.contains(TOKEN), "{message}");
        }
    }
    assert_eq!(
        upstream.requests(),
        before,
        "nothing reached the upstream without the token"
    );

    let upper = format!("BEARER {TOKEN}");
    let lower_scheme = format!("bearer  {TOKEN}");
    let admitted: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", &bearer)],
        vec![("authorization", &upper)],
        vec![("authorization", &lower_scheme)],
        vec![("x-api-key", TOKEN)],
        vec![("authorization", &bearer), ("x-api-key", TOKEN)],
    ];
    for headers in &admitted {
        let seen = echoed(&call("GET", &url, headers, None).await);
        assert_eq!(seen["authorization"], "Bearer sk-upstream", "{headers:?}");
        assert!(!seen.contains_key("x-api-key"), "{headers:?}: {seen:?}");
        let all = serde_json::to_string(&seen).unwrap();
        assert!(!all.contains(TOKEN), "the token went upstream: {all}");
    }
    // Streams too: the check comes before anything else.
    let (parts, _) = open(
        &url,
        "POST",
        &[
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
        ],
        r#"{"stream": true}"#,
    )
    .await;
    assert_eq!(parts.status, 401);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_api_token_route_without_a_credential_forwards_no_token_and_a_none_route_the_callers_own(
) {
    let upstream = Upstream::start().await.unwrap();
    let d = guarded(
        &upstream,
        "auth = \"api_token\"\ncredential_header = \"x-api-key\"",
    )
    .await;
    let url = format!("{}/up/echo", d.url);
    let reply = call("GET", &url, &[], None).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    let seen = echoed(
        &call(
            "GET",
            &url,
            &[("x-api-key", TOKEN), ("x-other", "kept")],
            None,
        )
        .await,
    );
    assert!(!seen.contains_key("x-api-key"), "{seen:?}");
    assert!(!seen.contains_key("authorization"), "{seen:?}");
    assert_eq!(seen["x-other"], "kept");
    d.stop().await.unwrap();

    // `auth = "none"` (the default without a credential): the caller's own
    // key goes upstream as it is, even with an API token set.
    let d = guarded(&upstream, "").await;
    let seen = echoed(
        &call(
            "GET",
            &format!("{}/up/echo", d.url),
            &[("authorization", "Bearer sk-callers-own")],
            None,
        )
        .await,
    );
    assert_eq!(seen["authorization"], "Bearer sk-callers-own");
    d.stop().await.unwrap();
}

/// The settings of a daemon whose file is `config`, with `env` on the
/// test variables.
fn load(config: &str, env: &[(&str, &str)]) -> Result<patient_daemon::Settings, String> {
    let dir = common::TempDir::new("settings");
    let path = dir.path().join("patient.toml");
    std::fs::write(&path, config).unwrap();
    let mut vars = common::base_env();
    for (k, v) in env {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    patient_daemon::Settings::load(
        Some(&path),
        vars,
        &patient_daemon::Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().to_owned()),
        },
    )
    .map_err(|e| e.to_string())
}

const SECRET_KEY: &str = "[secrets.k]\nenv = \"PATIENT_GATEWAY_TEST_KEY\"\n\n";

fn one_route(extra: &str) -> String {
    format!(
        "{SECRET_KEY}[[routes]]\nname = \"llm\"\npath_prefix = \"/llm/\"\nupstreams = [\"http://127.0.0.1:9\"]\n{extra}\n"
    )
}

#[tokio::test]
async fn a_route_that_would_lend_its_credential_is_refused_at_start_and_on_reload() {
    std::env::set_var("PATIENT_GATEWAY_TEST_KEY", "sk-upstream");
    let token = [("PATIENT_API_TOKEN", TOKEN)];
    // A credential with auth = "none": anyone reaching the listener would
    // use the key.
    let error = load(&one_route("credential = \"k\"\nauth = \"none\""), &token).unwrap_err();
    assert!(
        error.contains("routes[0].auth") && error.contains("llm") && error.contains("credential"),
        "{error}"
    );
    // A route that asks for the API token while the daemon has none.
    for extra in ["credential = \"k\"", "auth = \"api_token\""] {
        let error = load(&one_route(extra), &[]).unwrap_err();
        assert!(
            error.contains("routes[0].auth")
                && error.contains("llm")
                && error.contains("api_token"),
            "{extra}: {error}"
        );
    }
    let error = load(&one_route("auth = \"maybe\""), &token).unwrap_err();
    assert!(error.contains("routes"), "{error}");
    // What works.
    for (extra, env) in [
        ("credential = \"k\"", &token[..]),
        ("credential = \"k\"\nauth = \"api_token\"", &token[..]),
        ("auth = \"none\"", &[][..]),
        ("", &[][..]),
    ] {
        load(&one_route(extra), env).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }

    // Settings built in code go through the same checks when the daemon
    // starts.
    let mut settings = load(&one_route("credential = \"k\""), &token).unwrap();
    settings.api_token = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        patient_daemon::run_until(settings, listener, std::future::pending()),
    )
    .await
    .expect("the daemon refuses to start");
    let error = served.unwrap_err().to_string();
    assert!(error.contains("routes[0].auth"), "{error}");

    // A reload (SIGHUP) applies them too, and keeps the routes it had.
    let settings = load(&one_route(""), &token).unwrap();
    let gateway = patient_daemon::gateway::Gateway::new(
        &settings.routes,
        BTreeMap::from([("k".to_owned(), "sk-upstream".to_owned())]),
        Arc::new(patient_daemon::gateway::hooks::NoHooks),
    )
    .unwrap();
    for extra in ["credential = \"k\"\nauth = \"none\"", "credential = \"k\""] {
        let routes: Vec<RouteSettings> = toml::from_str::<RoutesFile>(&one_route(extra))
            .unwrap()
            .routes;
        let error = gateway.reload(&routes).unwrap_err().to_string();
        assert!(error.contains("routes[0].auth"), "{extra}: {error}");
        assert_eq!(gateway.route_names(), ["llm"]);
    }
}

/// The routes of a settings file.
#[derive(serde::Deserialize)]
struct RoutesFile {
    routes: Vec<RouteSettings>,
}

#[tokio::test]
async fn a_prefix_may_not_shadow_the_daemons_own_paths() {
    let route = |prefix: &str| {
        format!(
            "[[routes]]\nname = \"greedy\"\npath_prefix = \"{prefix}\"\nupstreams = [\"http://127.0.0.1:9\"]\n"
        )
    };
    for prefix in [
        "/",
        "/v",
        "/v1",
        "/v1/",
        "/v1/tasks",
        "/v1/tasks/",
        "/v1/dashboard",
        "/m",
        "/metrics",
        "/metrics/",
        "/metrics/x",
        "/h",
        "/healthz",
        "/healthz/",
        "/readyz",
        "/readyz/x",
        "/openapi",
        "/openapi.json",
        "/openapi.json/x",
    ] {
        let error = load(&route(prefix), &[]).unwrap_err();
        assert!(
            error.contains("routes[0].path_prefix") && error.contains("greedy"),
            "{prefix}: {error}"
        );
        let routes = toml::from_str::<RoutesFile>(&route(prefix)).unwrap().routes;
        let gateway = patient_daemon::gateway::Gateway::new(
            &[],
            BTreeMap::new(),
            Arc::new(patient_daemon::gateway::hooks::NoHooks),
        )
        .unwrap();
        let error = gateway.reload(&routes).unwrap_err().to_string();
        assert!(error.contains("routes[0].path_prefix"), "{prefix}: {error}");
    }
    for prefix in [
        "/v1x/",
        "/v2/",
        "/vendor/",
        "/metricsx",
        "/healthzz/",
        "/x/v1/",
    ] {
        load(&route(prefix), &[]).unwrap_or_else(|e| panic!("{prefix}: {e}"));
    }
}

/// Sends `request` (written as it is, request line included) on a new
/// connection and returns the status and body of the answer.
async fn raw(addr: &str, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_never_reach_the_upstream() {
    let upstream = Upstream::start().await.unwrap();
    let d = guarded(&upstream, "credential = \"openai_key\"").await;
    let addr = d.url.trim_start_matches("http://").to_owned();
    let before = upstream.requests();
    for path in [
        "/up/../secret",
        "/up/./secret",
        "/up/%2e%2e/secret",
        "/up/%2E%2E/secret",
        "/up/.%2E/secret",
        "/up/%2e./secret",
        "/up/%2e/secret",
        "/up/a/../../secret",
        "/up/a/..",
        "/up/a/.",
        "/up/a/%2e%2E",
        "/up/..?q=1",
        "/up/..;/secret",
        "/up/%2e%2e;x/secret",
        "/up/a%2fb",
        "/up/a%2F..%2Fsecret",
        "/up/%2F",
        "/up/a%5csecret",
        "/up/a%5C..%5Csecret",
        "/up/..\\secret",
        "/up/a\\..\\..\\secret",
        "/up/.%252e/secret",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let (status, body) = raw(&addr, &request).await;
        assert_eq!(status, 400, "{path}: {body}");
        if !body.is_empty() {
            let json: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
            assert_eq!(json["error"]["type"], "invalid_request", "{path}: {json}");
        }
        assert_eq!(upstream.requests(), before, "{path} reached the upstream");
    }
    // Dots inside a name, and encoded separators in the query, are fine.
    for path in ["/up/fast?next=..%2F..%2Fx", "/up/fast?a=.&b=%2e%2e"] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let (status, body) = raw(&addr, &request).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let request = format!(
        "GET /up/echo/a..b/.hidden/...x HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = raw(&addr, &request).await;
    assert!(status != 400, "{body}");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn forwarding_headers_are_the_gateways_and_the_clients_chain_is_kept() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let host = d.url.trim_start_matches("http://").to_owned();
    let reply = call(
        "GET",
        &format!("{}/up/echo", d.url),
        &[
            ("x-forwarded-for", "10.1.2.3"),
            ("x-forwarded-for", "10.4.5.6, 10.7.8.9"),
            ("x-forwarded-host", "evil.example"),
            ("X-Forwarded-Host", "evil2.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
            ("Forwarded", "for=5.6.7.8"),
        ],
        None,
    )
    .await;
    let seen = echoed(&reply);
    assert_eq!(
        seen["x-forwarded-for"], "10.1.2.3, 10.4.5.6, 10.7.8.9, 127.0.0.1",
        "{seen:?}"
    );
    assert_eq!(seen["x-forwarded-host"], host.as_str(), "{seen:?}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen:?}");
    assert!(!seen.contains_key("forwarded"), "{seen:?}");
    // Without a chain of its own: the peer alone.
    let seen = echoed(&call("GET", &format!("{}/up/echo", d.url), &[], None).await);
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_upstream_head_over_64_kib_is_a_502() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "").await;
    let big = format!("{}/up/headers?n=1&size=70000", d.url);
    for accept in ["*/*", "text/event-stream"] {
        let before = upstream.requests_to("/headers");
        let reply = call("GET", &big, &[("accept", accept)], None).await;
        assert_eq!(reply.status, 502, "{accept}: {}", reply.text());
        assert_eq!(reply.json()["error"]["type"], "bad_gateway");
        assert_eq!(
            upstream.requests_to("/headers") - before,
            1,
            "a head too large is not tried again"
        );
    }
    // Many fields that add up past it too.
    let reply = call(
        "GET",
        &format!("{}/up/headers?n=40&size=2000", d.url),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    // Under it: passed on whole.
    let reply = call(
        "GET",
        &format!("{}/up/headers?n=1&size=60000", d.url),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-header-0"].len(), 60000);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_gateways_own_answers_carry_the_contracts_error_types() {
    let upstream = Upstream::start().await.unwrap();
    let d = daemon(&[base(&upstream)], "max_response_body = 1000").await;
    let addr = d.url.trim_start_matches("http://").to_owned();
    // A method the gateway does not forward: 405 invalid_request.
    for method in ["TRACE", "CONNECT", "PROPFIND"] {
        let target = if method == "CONNECT" {
            "/up/x"
        } else {
            "/up/fast"
        };
        let (status, body) = raw(
            &addr,
            &format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        if method == "CONNECT" && status != 405 {
            // hyper answers a CONNECT to a path itself.
            continue;
        }
        assert_eq!(status, 405, "{method}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request", "{method}: {json}");
    }
    // A buffered body over max_response_body: upstream_body_too_large.
    let reply = call("GET", &format!("{}/up/bytes?n=5000", d.url), &[], None).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "upstream_body_too_large");
    d.stop().await.unwrap();

    // The gateway's own 429 says when to come back: the rate limit's
    // interval...
    let d = daemon(
        &[base(&upstream)],
        "rate_limit = 0.5\nburst = 1\nmax_retry_after = 0",
    )
    .await;
    let url = format!("{}/up/fast", d.url);
    assert_eq!(call("GET", &url, &[], None).await.status, 200);
    let reply = call("GET", &url, &[], None).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "rate_limited");
    assert_eq!(reply.headers["retry-after"], "2");
    d.stop().await.unwrap();
    // ... or what is left of a 429 cool-down.
    let d = daemon(&[base(&upstream)], "max_retry_after = 1").await;
    let first = call(
        "GET",
        &format!("{}/up/sequence?key=ra&steps=429,200&retry_after=30", d.url),
        &[],
        None,
    )
    .await;
    assert_eq!(first.status, 429);
    let reply = call("GET", &format!("{}/up/fast", d.url), &[], None).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "rate_limited");
    let wait: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    d.stop().await.unwrap();
}
