//! A task's response as an exchange: the head as received, the body read in
//! full under a limit or streamed, with the same retries and limits as every
//! other call, and a streamed body holding its concurrency slot to its end.

use std::time::Duration;

use http_body_util::BodyExt;
use patient_http::{
    exchange::{BodyMode, ExchangeBody, ExchangeOptions},
    limit::LimitConfig,
    resilience::ResilienceConfig,
    retry::RetryPolicy,
    AwaitableClient, LimitWait, Request, Task, TaskError,
};
use patient_testkit::Upstream;

fn client(resilience: ResilienceConfig) -> AwaitableClient {
    AwaitableClient::builder()
        .resilience(resilience)
        .build_awaitable()
        .unwrap()
}

/// A client retrying up to three attempts, 1 ms apart.
fn retrying_client() -> AwaitableClient {
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    client(
        ResilienceConfig::builder()
            .defaults(|p| p.retry(Some(retry)))
            .build()
            .unwrap(),
    )
}

fn get(url: String) -> Task {
    Task::new(Request::get(url).build().unwrap(), "").with_raise_error_responses(false)
}

#[tokio::test]
async fn a_buffered_exchange_keeps_repeated_headers_apart_and_its_body_within_the_limit() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let ex = client
        .exchange(
            &get(upstream.url("/set?set-cookie=a%3D1&set-cookie=b%3D2")),
            ExchangeOptions::buffered(),
        )
        .await
        .unwrap();
    assert_eq!(ex.status, 200);
    let cookies: Vec<_> = ex.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(matches!(ex.body, ExchangeBody::Full(ref b) if b.as_ref() == b"ok"));

    let too_large = client
        .exchange(
            &get(upstream.url("/bytes?n=2000")),
            ExchangeOptions::buffered().max_body(1000),
        )
        .await
        .unwrap_err();
    match too_large {
        TaskError::Request(e) => assert_eq!(e.class_name, "ResponseTooLarge", "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Any status is an exchange, not an error.
    let ex = client
        .exchange(
            &get(upstream.url("/status/503")),
            ExchangeOptions::buffered(),
        )
        .await
        .unwrap();
    assert_eq!(ex.status, 503);
}

#[tokio::test]
async fn retries_happen_before_the_head_and_a_stream_is_handed_over_as_it_comes() {
    let upstream = Upstream::start().await.unwrap();
    let client = retrying_client();
    let ex = client
        .exchange(
            &get(upstream.url("/sequence?key=s&steps=503,200")),
            ExchangeOptions::streaming(),
        )
        .await
        .unwrap();
    assert_eq!((ex.status, ex.attempts), (200, 2));
    assert_eq!(upstream.sequence_count("s"), 2);

    let feed = upstream.feed("f");
    let ex = client
        .exchange(
            &get(upstream.url("/feed?key=f")),
            ExchangeOptions::streaming(),
        )
        .await
        .unwrap();
    let ExchangeBody::Stream(mut body) = ex.body else {
        panic!("a stream");
    };
    assert!(feed.send("first").await);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(
        frame.into_data().unwrap(),
        "first",
        "before the upstream wrote more"
    );
    drop(feed);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn auto_streams_event_streams_only() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let auto = ExchangeOptions {
        mode: BodyMode::Auto,
        ..ExchangeOptions::buffered()
    };
    let sse = client
        .exchange(&get(upstream.url("/sse?events=2")), auto)
        .await
        .unwrap();
    let ExchangeBody::Stream(body) = sse.body else {
        panic!("an event stream is streamed");
    };
    let text = body.collect().await.unwrap().to_bytes();
    assert_eq!(text, "data: event 0\n\ndata: event 1\n\n");
    let plain = client
        .exchange(&get(upstream.url("/fast")), auto)
        .await
        .unwrap();
    assert!(matches!(plain.body, ExchangeBody::Full(_)));
}

#[tokio::test]
async fn a_stream_holds_its_concurrency_slot_until_it_ends() {
    let upstream = Upstream::start().await.unwrap();
    let key = patient_http::resilience::upstream_key(&upstream.url("/").parse().unwrap());
    let limits = LimitConfig::builder().max_in_flight(1).build().unwrap();
    let client = client(
        ResilienceConfig::builder()
            .upstream(key, move |p| p.limits(limits))
            .build()
            .unwrap(),
    );
    let no_wait = ExchangeOptions::streaming().limit_wait(LimitWait::UpTo(Duration::ZERO));
    let feed = upstream.feed("held");
    let held = client
        .exchange(&get(upstream.url("/feed?key=held")), no_wait)
        .await
        .unwrap();
    let refused = client
        .exchange(&get(upstream.url("/fast")), no_wait)
        .await
        .unwrap_err();
    match refused {
        TaskError::Request(e) => assert_eq!(e.class_name, "AtCapacity", "{e:?}"),
        other => panic!("{other:?}"),
    }
    let ExchangeBody::Stream(body) = held.body else {
        panic!("a stream");
    };
    drop(feed);
    let _ = body.collect().await.unwrap();
    let ex = client
        .exchange(&get(upstream.url("/fast")), no_wait)
        .await
        .unwrap();
    assert_eq!(ex.status, 200, "the slot is free once the stream ended");
}

#[tokio::test]
async fn header_fields_given_as_they_are_go_apart_byte_for_byte_and_drop_credentials_off_origin() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let mut raw = http::HeaderMap::new();
    raw.append("x-multi", http::HeaderValue::from_static("a"));
    raw.append("x-multi", http::HeaderValue::from_static("b"));
    raw.insert(
        "x-latin1",
        http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
    );
    raw.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer client-key"),
    );
    raw.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let post = |url: String| {
        Task::new(
            Request::post(url)
                .header("x-task", "own")
                .body(body)
                .build()
                .unwrap(),
            "",
        )
    };
    let ex = client
        .exchange_with_headers(
            &post(upstream.url("/v1/chat/completions")),
            &raw,
            ExchangeOptions::buffered(),
        )
        .await
        .unwrap();
    assert_eq!(ex.status, 200);
    let seen = upstream.openai_requests();
    let sent = &seen.last().unwrap().headers;
    let multi: Vec<_> = sent.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"], "repeated fields go apart");
    assert_eq!(sent.get("x-latin1").unwrap().as_bytes(), b"caf\xe9");
    assert_eq!(
        sent.get("x-task").unwrap(),
        "own",
        "the task's own fields go too"
    );
    assert_eq!(sent.get("authorization").unwrap(), "Bearer client-key");

    // A 307 to another origin (same port, another host name) keeps the
    // method, the body and the plain fields, and drops the credentials.
    let elsewhere = format!(
        "http://localhost:{}/v1/chat/completions",
        upstream.addr().port()
    );
    let redirect = upstream.url(&format!(
        "/redirect-to?status=307&url={}",
        url_encode(&elsewhere)
    ));
    let mut task = post(redirect);
    task.request = task.request.to_builder().max_redirects(1).build().unwrap();
    let ex = client
        .exchange_with_headers(&task, &raw, ExchangeOptions::buffered())
        .await
        .unwrap();
    assert_eq!(ex.status, 200);
    let seen = upstream.openai_requests();
    let sent = &seen.last().unwrap();
    assert_eq!(
        sent.header("host"),
        Some(&*format!("localhost:{}", upstream.addr().port()))
    );
    assert_eq!(sent.headers.get_all("x-multi").iter().count(), 2);
    assert!(
        sent.headers.get("authorization").is_none(),
        "{:?}",
        sent.headers
    );
    assert_eq!(sent.body.as_ref(), body.as_bytes());
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn an_idempotency_key_among_the_given_fields_opts_a_post_in_to_retries() {
    let upstream = Upstream::start().await.unwrap();
    let client = retrying_client();
    let post = Task::new(
        Request::post(upstream.url("/status/503"))
            .body("x")
            .build()
            .unwrap(),
        "",
    );
    // (given fields, attempts, requests the upstream has seen in all)
    for (fields, attempts, seen) in [
        (vec![], 1, 1),
        (vec![("idempotency-key", "k-1")], 3, 4),
        (vec![("x-idempotency-key", "  ")], 1, 5),
    ] {
        let mut given = http::HeaderMap::new();
        for (name, value) in fields.iter().copied() {
            given.insert(name, http::HeaderValue::from_static(value));
        }
        let ex = client
            .exchange_with_headers(&post, &given, ExchangeOptions::buffered())
            .await
            .unwrap();
        assert_eq!((ex.status, ex.attempts), (503, attempts), "{fields:?}");
        assert_eq!(upstream.requests_to("/status/503"), seen, "{fields:?}");
    }
}
