//! The client against the real daemon (`run_until` on `127.0.0.1:0`) and
//! the testkit upstream.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{eventually, raw_get, Daemon};
use patient_client::{
    ClientError, DaemonClient, Deliver, DeliveryChannel, DeliveryState, ListFilter, OutcomeType,
    Submit, TaskState,
};
use patient_http::{wire::TaskError, CallbackArgs, Dispatch, DispatchError, DispatchOptions, Task};
use patient_testkit::Upstream;
use patient_wire::Request;
use serde_json::json;

fn get(url: &str) -> Request {
    Request::get(url).build().unwrap()
}

fn args(value: serde_json::Value) -> CallbackArgs {
    CallbackArgs::from_value(value).unwrap()
}

/// The client's error inside a dispatch error.
fn client_error(error: &DispatchError) -> &ClientError {
    match error {
        DispatchError::Remote(e) => e.downcast_ref::<ClientError>().unwrap(),
        other => panic!("not a remote error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_task_runs_and_its_outcome_loads() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();

    let request = Request::post(up.url("/echo"))
        .json(&json!({"prompt": "hi"}))
        .build()
        .unwrap();
    let submit = Submit::new(request.clone())
        .with_callback("EchoCallback")
        .with_callback_args(args(json!({"document_id": 7, "tags": ["a"]})));
    let task = client.submit(&submit).await.unwrap();
    assert!(task.id.starts_with("tsk_"), "{}", task.id);
    assert_eq!(task.callback, "EchoCallback");
    assert!(!task.state.is_finished(), "{:?}", task.state);
    assert_eq!(task.request().unwrap().unwrap(), request);

    let done = client
        .wait(&task.id, Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert!(done.finished_at.is_some());
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].status, Some(200));
    let outcome = done.outcome.as_ref().unwrap();
    assert_eq!(outcome.kind, OutcomeType::Completed);
    assert_eq!(outcome.task_id, task.id);
    assert_eq!(outcome.callback_args.get("document_id"), Some(&json!(7)));
    assert!(outcome.error().unwrap().is_none());
    let response = outcome.response().unwrap().unwrap();
    assert_eq!(response.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(response.body.as_ref().unwrap()).unwrap();
    assert_eq!(echo["body"], r#"{"prompt":"hi"}"#);
    assert_eq!(done.delivery.channel, DeliveryChannel::None);
    assert_eq!(done.delivery.state, DeliveryState::None);

    // The typed task serializes back to exactly the JSON the API sent.
    let (status, raw) = raw_get(&format!("{}/v1/tasks/{}", daemon.url, task.id), None).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::to_value(&done).unwrap(), raw);
    assert_eq!(client.get(&task.id).await.unwrap(), done);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_task() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let submit = Submit::new(get(&up.url("/fast"))).with_idempotency_key("report-7");
    let first = client.submit(&submit).await.unwrap();
    let second = client
        .submit(&submit.clone().with_callback("Other"))
        .await
        .unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.callback, "");
    assert_eq!(first.idempotency_key(), Some("report-7"));
    client.wait(&first.id, None).await.unwrap();
    assert_eq!(up.requests_to("/fast"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_order_or_not_at_all() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();

    let batch: Vec<Submit> = (0..3)
        .map(|i| Submit::new(get(&up.url(&format!("/fast?i={i}")))).with_callback(format!("B{i}")))
        .collect();
    let tasks = client.submit_batch(&batch).await.unwrap();
    let callbacks: Vec<&str> = tasks.iter().map(|t| t.callback.as_str()).collect();
    assert_eq!(callbacks, ["B0", "B1", "B2"]);

    let bad = vec![
        Submit::new(get(&up.url("/fast"))).with_callback("Half"),
        Submit::new(get(&up.url("/fast")))
            .with_callback("Half")
            .with_deliver(Deliver::webhook("ftp://127.0.0.1/hook")),
    ];
    let error = client.submit_batch(&bad).await.unwrap_err();
    assert_eq!(error.status(), Some(422));
    assert_eq!(error.code(), Some("invalid_request"));
    assert_eq!(error.field(), Some("tasks[1].deliver.webhook.url"));
    assert!(error.message().contains("ftp"), "{}", error.message());
    assert!(error.is_input() && !error.is_retryable());
    let stored = client
        .list(&ListFilter::new().callback("Half"))
        .await
        .unwrap();
    assert!(stored.tasks.is_empty(), "{:?}", stored.tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_and_pages_newest_first() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let task = client
            .submit(&Submit::new(get(&up.url(&format!("/fast?i={i}")))).with_callback("Paged"))
            .await
            .unwrap();
        ids.push(task.id);
        // Distinct creation times keep the order unambiguous.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client
        .submit(&Submit::new(get(&up.url("/fast"))).with_callback("Other"))
        .await
        .unwrap();
    for id in &ids {
        client.wait(id, None).await.unwrap();
    }

    let filter = ListFilter::new().callback("Paged").limit(2);
    let first = client.list(&filter).await.unwrap();
    let got: Vec<&str> = first.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = first.next_cursor.clone().unwrap();
    let second = client.list(&filter.clone().cursor(cursor)).await.unwrap();
    let got: Vec<&str> = second.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(got, [ids[0].as_str()]);
    assert_eq!(second.next_cursor, None);

    let completed = client
        .list(
            &ListFilter::new()
                .state(TaskState::Completed)
                .callback("Paged"),
        )
        .await
        .unwrap();
    assert_eq!(completed.tasks.len(), 3);
    let scheduled = client
        .list(&ListFilter::new().state(TaskState::Scheduled))
        .await
        .unwrap();
    assert!(scheduled.tasks.is_empty());

    let error = client.list(&ListFilter::new().limit(0)).await.unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"));
    assert_eq!(error.field(), Some("limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_waiting_task_once() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let task = client
        .submit(&Submit::new(get(&up.url("/fast"))).with_delay(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(task.state, TaskState::Scheduled);

    let cancelled = client.cancel(&task.id).await.unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert!(cancelled.outcome.is_none());
    // A finished task is what `wait` returns at once.
    let waited = client
        .wait(&task.id, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(waited.state, TaskState::Cancelled);

    let again = client.cancel(&task.id).await.unwrap_err();
    assert!(again.is_conflict(), "{again}");
    assert_eq!(again.code(), Some("conflict"));
    assert!(again.message().contains("cancelled"), "{}", again.message());
    assert_eq!(up.requests_to("/fast"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_a_failed_task_again() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let task = client
        .submit(&Submit::new(get(&up.url("/status/404"))).with_raise_error_responses(true))
        .await
        .unwrap();
    let failed = client.wait(&task.id, None).await.unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    let outcome = failed.outcome.as_ref().unwrap();
    assert_eq!(outcome.kind, OutcomeType::Failed);
    match outcome.error().unwrap().unwrap() {
        TaskError::Http(e) => assert_eq!(e.status(), 404),
        other => panic!("not an HTTP error: {other:?}"),
    }

    let retried = client.retry(&task.id).await.unwrap();
    assert!(!retried.state.is_finished(), "{:?}", retried.state);
    assert!(retried.outcome.is_none());
    let again = client.wait(&task.id, None).await.unwrap();
    assert_eq!(again.state, TaskState::Failed);
    assert_eq!(up.requests_to("/status/404"), 2);

    let error = client
        .retry(&daemon_task(&client, &up).await)
        .await
        .unwrap_err();
    assert!(error.is_conflict(), "{error}");
}

/// A completed task.
async fn daemon_task(client: &DaemonClient, up: &Upstream) -> String {
    let task = client
        .submit(&Submit::new(get(&up.url("/fast"))))
        .await
        .unwrap();
    client.wait(&task.id, None).await.unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_sends_a_failed_delivery_again() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|s| s.delivery.max_attempts = 1).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let task = client
        .submit(
            &Submit::new(get(&up.url("/fast")))
                .with_deliver(Deliver::webhook(up.url("/status/500"))),
        )
        .await
        .unwrap();
    let failed = eventually("the delivery to fail", || async {
        let t = client.get(&task.id).await.unwrap();
        (t.delivery.state == DeliveryState::Failed).then_some(t)
    })
    .await;
    assert_eq!(failed.delivery.channel, DeliveryChannel::Webhook);
    assert_eq!(failed.delivery.attempts, 1);
    assert!(failed.delivery.last_error.is_some());
    assert_eq!(up.requests_to("/status/500"), 1);

    let redelivered = client.redeliver(&task.id).await.unwrap();
    assert_eq!(redelivered.delivery.state, DeliveryState::Pending);
    eventually("the second delivery", || async {
        let t = client.get(&task.id).await.unwrap();
        (t.delivery.state == DeliveryState::Failed).then_some(())
    })
    .await;
    assert_eq!(up.requests_to("/status/500"), 2);

    // Without a channel there is nothing to deliver.
    let polled = daemon_task(&client, &up).await;
    assert!(client.redeliver(&polled).await.unwrap_err().is_conflict());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_contract_code_message_field_and_status() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|s| s.api_token = Some("s3cret".into())).await;

    let anonymous = DaemonClient::new(&daemon.url, None).unwrap();
    let error = anonymous.get("tsk_x").await.unwrap_err();
    assert!(error.is_api() && error.is_unauthorized() && error.is_input());
    assert_eq!(error.code(), Some("unauthorized"));
    assert_eq!(error.status(), Some(401));

    let client = DaemonClient::new(&daemon.url, Some("s3cret".into())).unwrap();
    let error = client.get("tsk_missing").await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
    assert_eq!(error.code(), Some("not_found"));
    assert!(error.to_string().starts_with("not_found: "), "{error}");
    // An id is one path segment, whatever it holds.
    assert!(client
        .get("a/../../healthz")
        .await
        .unwrap_err()
        .is_not_found());

    // A literal private address is refused at submit; nothing is sent to it.
    let error = client
        .submit(&Submit::new(get("http://10.0.0.1/internal")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("egress_denied"));
    assert_eq!(error.field(), Some("request.url"));
    assert_eq!(error.status(), Some(422));

    let error = client
        .submit(&Submit::new(get(&up.url("/fast"))).with_not_before("soon"))
        .await
        .unwrap_err();
    assert_eq!(error.field(), Some("not_before"));

    // Nothing listens on port 1.
    let nowhere = DaemonClient::new("http://127.0.0.1:1", None).unwrap();
    let error = nowhere.get("tsk_x").await.unwrap_err();
    assert!(error.is_transport() && error.is_connect() && error.is_retryable());
    assert_eq!(error.status(), None);
    assert_eq!(error.code(), None);
    assert!(std::error::Error::source(&error).is_some());
    assert!(error.to_string().contains("127.0.0.1:1"), "{error}");

    for (url, token, field) in [
        ("ftp://127.0.0.1:8750", None, "base_url"),
        ("not a url", None, "base_url"),
        ("http://user:pw@127.0.0.1:8750", None, "base_url"),
        ("http://127.0.0.1:8750?x=1", None, "base_url"),
        ("http://127.0.0.1:8750", Some("bad\ntoken"), "token"),
    ] {
        let error = DaemonClient::new(url, token.map(str::to_owned)).unwrap_err();
        assert!(error.is_config(), "{url}");
        assert_eq!(error.field(), Some(field), "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gives_up_after_its_timeout_and_the_task_goes_on() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let task = client
        .submit(&Submit::new(get(&up.url("/fast"))).with_delay(Duration::from_secs(60)))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = client
        .wait(&task.id, Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(error.is_wait_timeout(), "{error}");
    assert!(error.to_string().contains("scheduled"), "{error}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(
        client.get(&task.id).await.unwrap().state,
        TaskState::Scheduled
    );
}

#[test]
fn dispatch_from_plain_threads_submits_each_task() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = runtime.block_on(Upstream::start()).unwrap();
    let daemon = runtime.block_on(Daemon::start(|_| {}));
    let client = DaemonClient::builder(&daemon.url)
        .deliver(Some(Deliver::webhook(up.url("/echo"))))
        .build()
        .unwrap();
    let url = up.url("/fast");

    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let client = client.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|n| {
                        let options = DispatchOptions {
                            callback_args: args(json!({"thread": thread, "n": n})),
                            ..DispatchOptions::default()
                        };
                        // The inherent `get(id)` reads a task; the trait's `get` dispatches.
                        Dispatch::get(&client, &url, "Threaded", options).unwrap()
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let ids: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 20);

    runtime.block_on(async {
        let mut seen = BTreeSet::new();
        for id in &ids {
            assert!(id.starts_with("tsk_"), "{id}");
            let task = client
                .wait(id, Some(Duration::from_secs(10)))
                .await
                .unwrap();
            assert_eq!(task.state, TaskState::Completed);
            assert_eq!(task.callback, "Threaded");
            assert_eq!(task.delivery.channel, DeliveryChannel::Webhook);
            let key = (
                task.callback_args.get("thread").unwrap().to_string(),
                task.callback_args.get("n").unwrap().to_string(),
            );
            assert!(seen.insert(key.clone()), "{key:?} twice");
        }
        assert_eq!(up.requests_to("/fast"), 20);
        eventually("every webhook", || async {
            (up.requests_to("/echo") == 20).then_some(())
        })
        .await;
    });
    drop(client);
    runtime.block_on(daemon.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_inside_a_multi_thread_runtime_waits_in_block_in_place() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let url = up.url("/fast");

    // In the runtime's own `block_on` (this test's body) ...
    let first = client.dispatch(Task::new(get(&url), "InBlockOn")).unwrap();
    // ... on one of its workers ...
    let on_worker = {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move { client.dispatch(Task::new(get(&url), "OnWorker")) })
    };
    // ... and on its blocking pool.
    let on_blocking = {
        let client = client.clone();
        let url = url.clone();
        tokio::task::spawn_blocking(move || client.dispatch(Task::new(get(&url), "Blocking")))
    };
    let second = on_worker.await.unwrap().unwrap();
    let third = on_blocking.await.unwrap().unwrap();
    for (id, callback) in [
        (first, "InBlockOn"),
        (second, "OnWorker"),
        (third, "Blocking"),
    ] {
        let task = client
            .wait(&id, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(task.callback, callback);
        assert_eq!(task.state, TaskState::Completed);
    }
}

#[tokio::test]
async fn dispatch_on_a_current_thread_runtime_is_refused_not_stalled() {
    let up = Upstream::start().await.unwrap();
    // The daemon runs on this very thread: a blocking submit could never be
    // answered.
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let error = client
        .dispatch(Task::new(get(&up.url("/fast")), "Refused"))
        .unwrap_err();
    let error = client_error(&error);
    assert!(error.is_blocking(), "{error}");
    assert!(error.to_string().contains("current-thread"), "{error}");
    // The async call works here.
    let task = client
        .submit(&Submit::new(get(&up.url("/fast"))))
        .await
        .unwrap();
    assert!(task.id.starts_with("tsk_"));
    assert!(client
        .list(&ListFilter::new().callback("Refused"))
        .await
        .unwrap()
        .tasks
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_carries_the_task_and_its_keys() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|_| {}).await;
    let client = DaemonClient::builder(&daemon.url)
        .idempotency_key_from_task_id(true)
        .build()
        .unwrap();

    // The same task dispatched twice is one task.
    let task = Task::new(get(&up.url("/status/404")), "Once")
        .with_callback_args(args(json!({"order": 17})))
        .with_raise_error_responses(true);
    let first = client.dispatch(task.clone()).unwrap();
    let second = client.dispatch(task.clone()).unwrap();
    assert_eq!(first, second);
    let done = client.wait(&first, None).await.unwrap();
    assert_eq!(done.state, TaskState::Failed, "raise_error_responses");
    assert_eq!(done.callback, "Once");
    assert_eq!(done.callback_args.get("order"), Some(&json!(17)));
    assert_eq!(done.idempotency_key(), Some(task.id.as_str()));
    assert_eq!(up.requests_to("/status/404"), 1);

    // A per-call key: two different tasks, one daemon task.
    let keyed = client.with_idempotency_key("order-18");
    let a = keyed
        .dispatch(Task::new(get(&up.url("/fast?a")), "A"))
        .unwrap();
    let b = keyed
        .dispatch(Task::new(get(&up.url("/fast?b")), "B"))
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(client.get(&a).await.unwrap().callback, "A");

    // The delivery target of a handle.
    let hooked = client.with_deliver(Some(Deliver::webhook(up.url("/echo"))));
    let id = hooked
        .dispatch(Task::new(get(&up.url("/fast")), "Hooked"))
        .unwrap();
    let task = client.wait(&id, None).await.unwrap();
    assert_eq!(task.delivery.channel, DeliveryChannel::Webhook);

    // The daemon's refusal comes back as the client's error.
    let error = client
        .dispatch(Task::new(
            get("http://169.254.169.254/latest/meta-data"),
            "Metadata",
        ))
        .unwrap_err();
    let error = client_error(&error);
    assert_eq!(error.code(), Some("egress_denied"));
    assert!(error.is_input());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_filter_matches_the_state_each_task_shows() {
    let up = Upstream::start().await.unwrap();
    // One slot, held by a slow request: a delayed task that comes due waits.
    let daemon = Daemon::start(|s| s.max_in_flight = 1).await;
    let client = DaemonClient::new(&daemon.url, None).unwrap();
    let slow = client
        .submit(&Submit::new(get(&up.url("/delay?ms=2000"))))
        .await
        .unwrap();
    eventually("the slow task to run", || async {
        (client.get(&slow.id).await.unwrap().state == TaskState::Running).then_some(())
    })
    .await;
    let delayed = client
        .submit(&Submit::new(get(&up.url("/fast"))).with_delay(Duration::from_millis(100)))
        .await
        .unwrap();
    assert_eq!(delayed.state, TaskState::Scheduled);
    let ids = |list: patient_client::TaskList| -> Vec<String> {
        list.tasks.into_iter().map(|t| t.id).collect()
    };
    let only_delayed = vec![delayed.id.clone()];
    let scheduled = client
        .list(&ListFilter::new().state(TaskState::Scheduled))
        .await
        .unwrap();
    assert_eq!(ids(scheduled), only_delayed);

    eventually("the delayed task to come due", || async {
        (client.get(&delayed.id).await.unwrap().state == TaskState::Queued).then_some(())
    })
    .await;
    let queued = client
        .list(&ListFilter::new().state(TaskState::Queued))
        .await
        .unwrap();
    assert_eq!(ids(queued), only_delayed, "shown queued, listed queued");
    let scheduled = client
        .list(&ListFilter::new().state(TaskState::Scheduled))
        .await
        .unwrap();
    assert!(ids(scheduled).is_empty());
    assert_eq!(
        client.get(&slow.id).await.unwrap().state,
        TaskState::Running,
        "the slot was still taken"
    );
}
