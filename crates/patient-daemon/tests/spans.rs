//! What an operator's `tracing` subscriber sees of the daemon, recorded by
//! a test layer: a `task` span per step with the engine's `attempt` spans
//! as its children and a `delivery` span per try with the message id, with
//! no secret value in any field.

mod common;

use std::sync::Arc;

use common::{wait_for, Daemon, Receiver, TempDir, WAIT};
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
