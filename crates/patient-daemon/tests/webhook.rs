//! Webhook delivery end to end: submit, run against the test upstream, and
//! receive the outcome at a real receiver that checks the Standard Webhooks
//! signature itself (with `ring`, not the daemon's signing code).

mod common;

use std::collections::BTreeSet;

use common::{verify_webhook, Daemon, Received, Receiver, SECRET};
use patient_testkit::Upstream;
use serde_json::{json, Value};

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// Checks a delivered message against the contract: signed, the body
/// `{"type","timestamp","data"}` with `data` the task's outcome event.
fn check_message(message: &Received, task: &Value) {
    verify_webhook(SECRET, message).unwrap_or_else(|e| panic!("signature: {e}"));
    assert!(
        message
            .header("content-type")
            .starts_with("application/json"),
        "{:?}",
        message.headers
    );
    let body = message.json();
    assert_eq!(keys(&body), BTreeSet::from(["type", "timestamp", "data"]));
    let timestamp = body["timestamp"].as_str().unwrap();
    time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {timestamp:?} is not RFC 3339: {e}"));
    let event = &body["data"];
    assert_eq!(
        keys(event),
        BTreeSet::from([
            "task_id",
            "type",
            "callback",
            "callback_args",
            "response",
            "error"
        ])
    );
    assert_eq!(body["type"], event["type"]);
    assert_eq!(event["task_id"], task["id"]);
    assert_eq!(
        event, &task["outcome"],
        "the webhook carries the stored outcome"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_task_reaches_the_webhook_signed_and_is_retried_then_redelivered() {
    let upstream = Upstream::start().await.unwrap();
    // The receiver fails the first delivery: the daemon stores a retry.
    let receiver = Receiver::start(&[500]).await;
    let daemon = Daemon::start(&[]).await;

    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/json")},
            "callback": "SummarizeCallback",
            "callback_args": {"document_id": 7},
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("tsk_"), "{id}");
    assert_eq!(task["delivery"]["channel"], "webhook");

    let task = daemon.wait_delivery(&id, "delivered").await;
    assert_eq!(task["state"], "completed");
    assert_eq!(
        task["delivery"]["attempts"], 2,
        "one failed try, one stored retry: {task}"
    );
    assert!(
        task["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "the failed try is recorded: {task}"
    );

    let event = &task["outcome"];
    assert_eq!(event["type"], "task.completed");
    assert_eq!(event["callback"], "SummarizeCallback");
    assert_eq!(event["callback_args"], json!({"document_id": 7}));
    assert_eq!(event["error"], Value::Null);
    let response = &event["response"];
    assert_eq!(response["status"], 200);
    assert_eq!(response["http_method"], "get");
    assert_eq!(response["url"], upstream.url("/json"));
    assert_eq!(response["body"]["encoding"], "text");
    assert_eq!(
        response["body"]["value"],
        r#"{"ok":true,"name":"patient","items":[1,2,3]}"#
    );
    assert_eq!(upstream.requests_to("/json"), 1);

    let got = receiver.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].answered, got[1].answered), (500, 200));
    for message in &got {
        check_message(message, &task);
    }
    let webhook_id = got[0].header("webhook-id").to_owned();
    assert!(!webhook_id.is_empty());
    assert_eq!(
        got[1].header("webhook-id"),
        webhook_id,
        "a retry carries the same webhook-id"
    );

    // A redelivery on request carries the same id again.
    let reply = daemon
        .post(&format!("/v1/tasks/{id}/redeliver"), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receiver.wait(3).await;
    check_message(&got[2], &task);
    assert_eq!(got[2].header("webhook-id"), webhook_id);
    let task = daemon.wait_delivery(&id, "delivered").await;
    assert_eq!(task["delivery"]["attempts"], 1, "a fresh count of tries");

    // The verifier is not a formality: a changed body, id or secret fails.
    let mut tampered = got[2].clone();
    let mut body = tampered.body.to_vec();
    let at = body.iter().position(|&b| b == b'7').unwrap();
    body[at] = b'8';
    tampered.body = body.into();
    assert!(verify_webhook(SECRET, &tampered).is_err());
    let mut renamed = got[2].clone();
    renamed
        .headers
        .insert("webhook-id", "msg_other".parse().unwrap());
    assert!(verify_webhook(SECRET, &renamed).is_err());
    assert!(verify_webhook(
        "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        &got[2]
    )
    .is_err());

    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_delivered_as_task_failed_and_a_failed_delivery_waits_for_redeliver() {
    let upstream = Upstream::start().await.unwrap();
    // Two tries in all, both refused: the delivery ends `failed`.
    let receiver = Receiver::start(&[503, 500]).await;
    let daemon = Daemon::start(&[("PATIENT_DELIVERY__MAX_ATTEMPTS", "2")]).await;

    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/status/404?body=gone")},
            "callback": "Cb",
            "raise_error_responses": true,
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let task = daemon.wait_delivery(&id, "failed").await;
    assert_eq!(task["state"], "failed");
    assert_eq!(task["delivery"]["attempts"], 2, "{task}");
    assert!(
        task["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{task}"
    );
    let event = &task["outcome"];
    assert_eq!(event["type"], "task.failed");
    assert_eq!(event["response"], Value::Null);
    assert_eq!(event["error"]["response"]["status"], 404, "an HTTP error");
    assert_eq!(event["error"]["response"]["body"]["value"], "gone");
    assert_eq!(event["callback_args"], json!({}));

    // Kept: nothing more is sent until a redeliver.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(receiver.received().len(), 2);
    let reply = daemon
        .post(&format!("/v1/tasks/{id}/redeliver"), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["delivery"]["state"], "pending");
    let task = daemon.wait_delivery(&id, "delivered").await;
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    for message in &got {
        check_message(message, &task);
        assert_eq!(message.json()["type"], "task.failed");
    }
    let ids: BTreeSet<&str> = got.iter().map(|m| m.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "one outcome, one webhook-id: {ids:?}");

    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_secret_is_kept_in_the_store_across_restarts() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = Receiver::start(&[]).await;
    let no_secret = [("PATIENT_WEBHOOK_SECRET", "")];
    let daemon = Daemon::start(&no_secret).await;
    assert_eq!(daemon.settings.webhook_secret, None);
    let body = json!({
        "request": {"http_method": "get", "url": upstream.url("/fast")},
        "deliver": {"webhook": {"url": receiver.url}},
    });
    let first = daemon.submit(&body).await;
    daemon
        .wait_delivery(first["id"].as_str().unwrap(), "delivered")
        .await;
    let dir = daemon.dir();
    daemon.stop().await.unwrap();

    let daemon = Daemon::start_in(dir, &no_secret).await;
    let second = daemon.submit(&body).await;
    daemon
        .wait_delivery(second["id"].as_str().unwrap(), "delivered")
        .await;
    let dir = daemon.dir();
    daemon.stop().await.unwrap();

    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert!(
        verify_webhook(SECRET, &got[0]).is_err(),
        "not the test secret"
    );
    // The secret generated at the first start, as stored: both runs signed
    // with it.
    let db = patient_daemon::db::Db::open(&format!(
        "sqlite://{}",
        dir.path().join("patient.db").display()
    ))
    .await
    .unwrap();
    let stored = db
        .meta_or_insert("webhook_secret", "whsec_unused".into())
        .await
        .unwrap();
    assert!(stored.starts_with("whsec_"), "{stored}");
    for message in &got {
        verify_webhook(&stored, message).unwrap();
    }
}

/// A message a [`HoldingReceiver`] got: its `webhook-id`, its event type and
/// the status it was answered (0 while held).
#[derive(Debug, Clone)]
struct Arrival {
    id: String,
    kind: String,
    answered: u16,
}

/// A webhook receiver that holds the first message it gets until
/// [`release`](Self::release) and answers it `200`; holds the second until
/// half a second after that answer (so that the daemon has recorded it)
/// and answers it `500`; answers every later one `200`.
struct HoldingReceiver {
    url: String,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>,
    release: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

/// What the handler of a [`HoldingReceiver`] shares.
#[derive(Clone)]
struct Holding {
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>,
    released: tokio::sync::watch::Receiver<bool>,
}

async fn hold(
    axum::extract::State(mut state): axum::extract::State<Holding>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let event: Value = serde_json::from_slice(&body).unwrap();
    let place = {
        let mut arrivals = state.arrivals.lock().unwrap();
        arrivals.push(Arrival {
            id: headers["webhook-id"].to_str().unwrap().to_owned(),
            kind: event["type"].as_str().unwrap().to_owned(),
            answered: 0,
        });
        arrivals.len() - 1
    };
    let status = match place {
        0 => {
            let _ = state.released.wait_for(|open| *open).await;
            200
        }
        1 => {
            let _ = state.released.wait_for(|open| *open).await;
            while state.arrivals.lock().unwrap()[0].answered == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            500
        }
        _ => 200,
    };
    state.arrivals.lock().unwrap()[place].answered = status;
    axum::http::StatusCode::from_u16(status).unwrap()
}

impl HoldingReceiver {
    async fn start() -> HoldingReceiver {
        let (release, released) = tokio::sync::watch::channel(false);
        let state = Holding {
            arrivals: std::sync::Arc::default(),
            released,
        };
        let arrivals = std::sync::Arc::clone(&state.arrivals);
        let app = axum::Router::new().fallback(hold).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HoldingReceiver {
            url: format!("http://{addr}/hook"),
            arrivals,
            release,
            server,
        }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Waits until `check` holds for the arrivals, and returns them.
    async fn wait(&self, what: &str, check: impl Fn(&[Arrival]) -> bool) -> Vec<Arrival> {
        common::wait_for(what, common::WAIT, || async {
            let got = self.arrivals();
            check(&got).then_some(got)
        })
        .await
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for HoldingReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_to_an_earlier_outcomes_delivery_does_not_settle_the_new_one_after_a_retry() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = HoldingReceiver::start().await;
    // A retried delivery waits a second: the old message's answer comes
    // while the new one waits for its second try.
    let daemon = Daemon::start(&[
        ("PATIENT_DELIVERY__BASE_DELAY", "1"),
        ("PATIENT_DELIVERY__MAX_DELAY", "1"),
    ])
    .await;
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/sequence?key=again&steps=404,200")},
            "raise_error_responses": true,
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let failed = daemon.wait_finished(&id).await;
    assert_eq!(failed["state"], "failed", "{failed:#}");

    // The failed outcome's message is held by the receiver; meanwhile the
    // task is retried and its new outcome is sent as a new message, also
    // held.
    receiver.wait("the first message", |a| a.len() == 1).await;
    let reply = daemon
        .post(&format!("/v1/tasks/{id}/retry"), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = receiver
        .wait("the new outcome's message", |a| a.len() == 2)
        .await;
    let (old, new) = (got[0].id.clone(), got[1].id.clone());
    assert_ne!(old, new, "a new outcome is a new message: {got:?}");
    assert_eq!(
        (got[0].kind.as_str(), got[1].kind.as_str()),
        ("task.failed", "task.completed")
    );

    // The old message is answered 200 while the new one is in flight, then
    // the new one gets a 500: the old answer says nothing about the new
    // message, which stays pending and is tried again.
    receiver.release();
    receiver
        .wait("both answered", |a| {
            a[0].answered == 200 && a[1].answered == 500
        })
        .await;
    let tried = daemon
        .wait_task(&id, "one delivery try recorded", |t| {
            t["delivery"]["attempts"] == 1
        })
        .await;
    assert_eq!(
        tried["delivery"]["state"], "pending",
        "the new message's 500 stands, not the old message's 200: {tried:#}"
    );
    let got = receiver
        .wait("the new message sent again", |a| a.len() >= 3)
        .await;
    assert_eq!(got[2].id, new, "{got:?}");
    let done = daemon.wait_delivery(&id, "delivered").await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["delivery"]["attempts"], 2, "{done:#}");
    assert!(
        done["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{done:#}"
    );
    assert_eq!(receiver.arrivals().len(), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_a_delivery_in_flight_end_before_releasing_it() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = HoldingReceiver::start().await;
    let daemon = Daemon::start(&[("PATIENT_SHUTDOWN_TIMEOUT", "5")]).await;
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/fast")},
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    receiver.wait("the message", |a| a.len() == 1).await;

    // Stopped while the receiver holds the message: the stop waits for
    // its answer (within shutdown_timeout) and records it.
    let dir = daemon.dir();
    let stop = async {
        let started = std::time::Instant::now();
        let stopped = daemon.stop().await;
        (stopped, started.elapsed())
    };
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        receiver.release();
    };
    let ((stopped, took), ()) = tokio::join!(stop, release);
    stopped.unwrap();
    assert!(
        took >= std::time::Duration::from_millis(600),
        "waited for the delivery: {took:?}"
    );
    assert_eq!(receiver.arrivals()[0].answered, 200);

    let daemon = Daemon::start_in(dir, &[]).await;
    let task = daemon.task(&id).await;
    assert_eq!(task["delivery"]["state"], "delivered", "{task:#}");
    assert_eq!(task["delivery"]["attempts"], 1, "{task:#}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        receiver.arrivals().len(),
        1,
        "not sent again: {:?}",
        receiver.arrivals()
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_still_in_flight_at_the_shutdown_timeout_is_sent_again_at_the_next_start() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = HoldingReceiver::start().await;
    let daemon = Daemon::start(&[("PATIENT_SHUTDOWN_TIMEOUT", "0.5")]).await;
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/fast")},
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    receiver.wait("the message", |a| a.len() == 1).await;
    let dir = daemon.dir();
    let started = std::time::Instant::now();
    daemon.stop().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "the stop is bounded: {took:?}"
    );

    // Cut off, the message counts as not delivered: the next start sends it
    // again with the same id (here answered 500, then 200).
    receiver.release();
    let daemon = Daemon::start_in(dir, &[]).await;
    let task = daemon.wait_delivery(&id, "delivered").await;
    let got = receiver.arrivals();
    assert!(got.len() >= 2, "{got:?}");
    assert!(
        got.iter().all(|a| a.id == got[0].id),
        "one webhook-id: {got:?}"
    );
    assert_eq!(
        task["delivery"]["attempts"],
        got.len() as u64 - 1,
        "{task:#}"
    );
    daemon.stop().await.unwrap();
}
