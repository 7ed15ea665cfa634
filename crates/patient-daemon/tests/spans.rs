//! What an operator's `tracing` subscriber sees of the daemon, recorded by
//! a test layer: a `task` span per step with the engine's `attempt` spans
//! as its children, a `delivery` span per try with the message id, and a
//! `proxied_request` span that a streamed response keeps open until its
//! end, with no secret value in any field.

mod common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use common::{wait_for, Daemon, Receiver, TempDir, WAIT};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use patient_testkit::{
    spans::{RecordedSpan, SpanRecorder},
    Upstream,
};
use serde_json::json;

const SECRET_VALUE: &str = "sk-span-secret-9191";

/// The spans named `name` once `done` holds for all of them (at least
/// `n`), or a panic after [`WAIT`].
async fn settled(
    recorder: &SpanRecorder,
    name: &str,
    n: usize,
    done: impl Fn(&RecordedSpan) -> bool,
) -> Vec<RecordedSpan> {
    wait_for(&format!("{n} {name} spans"), WAIT, || async {
        let spans = recorder.named(name);
        (spans.len() >= n && spans.iter().all(&done)).then_some(spans)
    })
    .await
}

#[tokio::test]
async fn a_task_step_its_attempts_and_its_deliveries_are_spans_without_secrets() {
    let (recorder, _guard) = SpanRecorder::install();
    let upstream = Upstream::start().await.unwrap();
    // The first webhook try fails: two delivery spans.
    let receiver = Receiver::start(&[500]).await;
    let dir = Arc::new(TempDir::new("spans"));
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{SECRET_VALUE}\n")).unwrap();
    let config = format!(
        "[secrets.key]\nfile = {:?}\nhosts = [\"127.0.0.1\"]\n",
        key_file.display().to_string()
    );
    let daemon = Daemon::start_with_config(&config, &[]).await;

    // 503 then 200: two steps, one attempt each. The daemon takes no
    // credentials in a URL: the credential is a secret header.
    let url = upstream.url("/sequence?key=spans&steps=503,200");
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": url,
                "headers": {"authorization": {"$secret": "key"}},
                "secret_params": {"token": {"$secret": "key"}}},
            "callback": "SpanCallback",
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = daemon.wait_delivery(&id, "delivered").await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(upstream.sequence_count("spans"), 2);
    let got = receiver.wait(2).await;
    let message_id = got[0].header("webhook-id").to_owned();

    // One task span per step, closed, with the state the step left.
    let steps = settled(&recorder, "task", 2, |s| s.closed).await;
    assert_eq!(steps.len(), 2, "{steps:#?}");
    for (i, (step, state)) in steps.iter().zip(["scheduled", "completed"]).enumerate() {
        assert_eq!(step.parent, None, "a task's step is a root span");
        assert_eq!(step.field("task.id"), Some(id.as_str()));
        assert_eq!(step.field("callback"), Some("SpanCallback"));
        assert_eq!(step.field("attempts_so_far"), Some(i.to_string().as_str()));
        assert_eq!(step.field("attempt"), Some((i + 1).to_string().as_str()));
        assert!(
            step.field("owner").is_some_and(|o| !o.is_empty()),
            "{step:#?}"
        );
        assert_eq!(step.field("state"), Some(state), "{step:#?}");
        // The engine's attempt span under it, with the right number and status.
        let attempts = recorder.children_of(step);
        assert_eq!(attempts.len(), 1, "{attempts:#?}");
        let attempt = &attempts[0];
        assert_eq!(attempt.name, "attempt");
        assert!(attempt.closed);
        assert_eq!(attempt.field("attempt"), step.field("attempt"));
        assert_eq!(
            attempt.field("http.response.status_code"),
            Some(["503", "200"][i])
        );
        assert_eq!(
            attempt.field("url.full"),
            Some(
                format!(
                    "http://{}/sequence?key=spans&steps=503,200",
                    upstream.addr()
                )
                .as_str()
            )
        );
    }

    // One delivery span per try, with the message id and the result.
    let tries = settled(&recorder, "delivery", 2, |s| {
        s.closed && s.field("result").is_some()
    })
    .await;
    assert_eq!(tries.len(), 2, "{tries:#?}");
    for (i, (try_span, result)) in tries.iter().zip(["retry", "delivered"]).enumerate() {
        assert_eq!(try_span.field("task.id"), Some(id.as_str()));
        assert_eq!(try_span.field("message.id"), Some(message_id.as_str()));
        assert_eq!(try_span.field("channel"), Some("webhook"));
        assert_eq!(
            try_span.field("delivery.attempt"),
            Some((i + 1).to_string().as_str())
        );
        assert_eq!(try_span.field("result"), Some(result));
    }

    // The secret's value (a header and a query parameter) is nowhere.
    for value in recorder.all_values() {
        assert!(
            !value.contains(SECRET_VALUE),
            "the secret recorded in {value:?}"
        );
    }
    daemon.stop().await.unwrap();
    drop(dir);
}

/// A request whose response body is read as it comes.
async fn open(url: &str, headers: &[(&str, &str)]) -> (http::response::Parts, Incoming) {
    let url = url::Url::parse(url).unwrap();
    let authority = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
    let mut request = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", &authority);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    response.into_parts()
}

/// The next data frame of a body, `None` at its end.
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

#[tokio::test]
async fn a_streamed_proxied_request_keeps_its_span_open_until_the_stream_ends() {
    let (recorder, _guard) = SpanRecorder::install();
    let upstream = Upstream::start().await.unwrap();
    let config = format!(
        "[[routes]]\nname = \"r\"\npath_prefix = \"/up/\"\nstrip_prefix = true\nupstreams = [\"http://{}\"]\n",
        upstream.addr()
    );
    let daemon = Daemon::start_with_config(&config, &[]).await;
    let feed = upstream.feed("s");
    let (parts, mut body) = open(
        &format!(
            "{}/up/feed?key=s&content-type=text/event-stream",
            daemon.url
        ),
        &[("accept", "text/event-stream"), ("x-request-id", "rid-1")],
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(feed.send("data: {\"n\":0}\n\n").await);
    assert_eq!(next_data(&mut body).await.unwrap(), "data: {\"n\":0}\n\n");

    // Mid-stream: the request's span is open, its attempt is its child.
    let request = recorder.one("proxied_request");
    assert!(!request.closed, "open while the stream runs: {request:#?}");
    assert_eq!(request.parent, None);
    assert_eq!(request.field("route"), Some("r"));
    assert_eq!(request.field("http.request.method"), Some("GET"));
    assert_eq!(request.field("url.path"), Some("/up/feed"));
    assert_eq!(request.field("http.response.status_code"), Some("200"));
    assert_eq!(
        request.field("upstream"),
        Some(format!("http://{}", upstream.addr()).as_str())
    );
    let request_id = request.field("request.id").unwrap();
    assert_eq!(request_id.len(), 32, "the gateway's own id: {request_id}");
    let attempts = recorder.children_of(&request);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert_eq!(attempts[0].name, "attempt");
    assert_eq!(attempts[0].field("attempt"), Some("1"));
    assert_eq!(attempts[0].field("http.response.status_code"), Some("200"));

    // The stream ends: the span closes.
    assert!(feed.send("data: [DONE]\n\n").await);
    drop(feed);
    assert_eq!(next_data(&mut body).await.unwrap(), "data: [DONE]\n\n");
    assert_eq!(next_data(&mut body).await, None);
    settled(&recorder, "proxied_request", 1, |s| s.closed).await;
    assert_eq!(
        recorder.named("proxied_request")[0].field("error.type"),
        None
    );
    daemon.stop().await.unwrap();
}
