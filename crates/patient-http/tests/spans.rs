//! The engine's `attempt` spans, recorded by a test subscriber: one per
//! attempt, a child of the caller's span, with the OpenTelemetry HTTP
//! client fields, and no secret value or credential in any field.

use std::time::Duration;

use patient_http::{resilience::ResilienceConfig, retry::RetryPolicy, Builder, Request};
use patient_testkit::{spans::SpanRecorder, Upstream};
use tracing::Instrument;

const SECRET_HEADER: &str = "sk-header-4242";
const SECRET_PARAM: &str = "qp-secret-5353";
const PASSWORD: &str = "pw-in-url-6464";

#[tokio::test]
async fn each_attempt_is_a_span_under_the_callers_with_its_number_and_status() {
    let (recorder, _guard) = SpanRecorder::install();
    let upstream = Upstream::start().await.unwrap();
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    let client = Builder::new()
        .resilience(
            ResilienceConfig::builder()
                .defaults(|p| p.retry(Some(retry)))
                .build()
                .unwrap(),
        )
        .secret("header-key", SECRET_HEADER)
        .secret("param-key", SECRET_PARAM)
        .build_awaitable()
        .unwrap();
    let url = format!(
        "http://user:{PASSWORD}@{}/sequence?key=spans&steps=503,200",
        upstream.addr()
    );
    let request = Request::get(&url)
        .secret_header("authorization", "header-key")
        .secret_param("token", "param-key")
        .build()
        .unwrap();

    let response = client
        .send(request)
        .instrument(tracing::info_span!("caller"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(upstream.sequence_count("spans"), 2);

    let caller = recorder.one("caller");
    let attempts = recorder.named("attempt");
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(
        recorder.children_of(&caller).len(),
        2,
        "both under the caller"
    );
    for (i, (attempt, status)) in attempts.iter().zip(["503", "200"]).enumerate() {
        assert_eq!(attempt.parent, Some(caller.seq));
        assert!(attempt.closed, "{attempt:#?}");
        assert_eq!(attempt.field("attempt"), Some((i + 1).to_string().as_str()));
        assert_eq!(attempt.field("http.request.method"), Some("GET"));
        assert_eq!(attempt.field("http.response.status_code"), Some(status));
        assert_eq!(attempt.field("error.type"), None);
        assert_eq!(attempt.field("server.address"), Some("127.0.0.1"));
        assert_eq!(
            attempt.field("server.port"),
            Some(upstream.addr().port().to_string().as_str())
        );
        let full = attempt.field("url.full").unwrap();
        assert_eq!(
            full,
            format!(
                "http://{}/sequence?key=spans&steps=503,200",
                upstream.addr()
            ),
            "no credentials, no secret parameter"
        );
    }
    for value in recorder.all_values() {
        for secret in [SECRET_HEADER, SECRET_PARAM, PASSWORD, "user:"] {
            assert!(!value.contains(secret), "{secret} recorded in {value:?}");
        }
    }
}

#[tokio::test]
async fn an_attempt_that_gets_no_response_records_its_error_type() {
    let (recorder, _guard) = SpanRecorder::install();
    // A port with nobody listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let client = Builder::new().build_awaitable().unwrap();
    let error = client
        .send(Request::get(format!("http://{addr}/x")).build().unwrap())
        .await
        .unwrap_err();
    let patient_http::TaskError::Request(error) = error else {
        panic!("{error:?}");
    };
    let attempt = recorder.one("attempt");
    assert!(attempt.closed);
    assert_eq!(attempt.parent, None, "no caller span: a root");
    assert_eq!(attempt.field("attempt"), Some("1"));
    assert_eq!(attempt.field("error.type"), Some(error.class_name.as_str()));
    assert_eq!(attempt.field("http.response.status_code"), None);
}
