//! Redis list, Redis stream and Sidekiq delivery, read back from a real
//! Redis (`PATIENT_TEST_REDIS_URL` from `scripts/services.sh start`) and
//! checked field by field against the contract.

mod common;

use std::collections::BTreeSet;

use common::{redis_url, Daemon};
use patient_testkit::Upstream;
use serde_json::{json, Value};

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_land_in_a_redis_list_and_a_redis_stream() {
    let Some(url) = redis_url() else { return };
    let mut redis = connection(&url).await;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let list = format!("patient-test:list:{unique}");
    let stream = format!("patient-test:stream:{unique}");
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_REDIS_URL", &url)]).await;

    let to_list = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/json")},
            "callback": "ListCallback",
            "callback_args": {"n": 1},
            "deliver": {"redis": {"list": list}},
        }))
        .await;
    let to_stream = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/status/404")},
            "callback": "StreamCallback",
            "raise_error_responses": true,
            "deliver": {"redis": {"stream": stream}},
        }))
        .await;
    assert_eq!(to_list["delivery"]["channel"], "redis");
    let listed = daemon
        .wait_delivery(to_list["id"].as_str().unwrap(), "delivered")
        .await;
    let streamed = daemon
        .wait_delivery(to_stream["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(listed["delivery"]["attempts"], 1);

    // LPUSH KEY <event JSON>
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    let event: Value = serde_json::from_str(&items[0]).unwrap();
    assert_eq!(event, listed["outcome"]);
    assert_eq!(event["task_id"], listed["id"]);
    assert_eq!(event["type"], "task.completed");
    assert_eq!(event["callback"], "ListCallback");
    assert_eq!(event["callback_args"], json!({"n": 1}));
    assert_eq!(event["response"]["status"], 200);
    assert_eq!(event["error"], Value::Null);

    // XADD KEY * event <event JSON>
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let fields = &entries[0].1;
    assert_eq!(fields.len(), 2, "one field: {fields:?}");
    assert_eq!(fields[0], "event");
    let event: Value = serde_json::from_str(&fields[1]).unwrap();
    assert_eq!(event, streamed["outcome"]);
    assert_eq!(event["type"], "task.failed");
    assert_eq!(event["response"], Value::Null);
    assert_eq!(event["error"]["response"]["status"], 404);

    let _: () = redis::cmd("DEL")
        .arg(&list)
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    daemon.stop().await.unwrap();
}

/// Checks a Sidekiq job field by field; returns its `jid`.
fn check_job(job: &Value, queue: &str, worker: &str, task: &Value, kind: &str) -> String {
    let keys: BTreeSet<&str> = job
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "class",
            "queue",
            "args",
            "jid",
            "retry",
            "created_at",
            "enqueued_at"
        ]),
        "{job}"
    );
    assert_eq!(job["class"], worker);
    assert_eq!(job["queue"], queue);
    let event = &task["outcome"];
    let payload = &event[kind];
    assert!(payload.is_object(), "{event}");
    assert_eq!(
        job["args"],
        json!([payload, kind, task["callback"]]),
        "args[0] is the {kind} JSON object itself"
    );
    let jid = job["jid"].as_str().unwrap();
    assert_eq!(jid.len(), 24, "{jid}");
    assert!(
        jid.bytes().all(|b| b.is_ascii_hexdigit()),
        "24 hexadecimal digits: {jid}"
    );
    assert_eq!(job["retry"], true);
    for field in ["created_at", "enqueued_at"] {
        assert!(job[field].is_f64(), "{field} is a float: {job}");
        let at = job[field].as_f64().unwrap();
        assert!(
            (at - now_seconds()).abs() < 60.0,
            "{field} {at} is epoch seconds of now"
        );
    }
    jid.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidekiq_job_is_the_one_the_callback_worker_runs() {
    let Some(url) = redis_url() else { return };
    let mut redis = connection(&url).await;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("patient_test_{unique}");
    let custom = format!("patient_test_custom_{unique}");
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_REDIS_URL", &url)]).await;

    // The worker's default is checked; the queue's (`default`) is not used
    // here, so that a test never writes to a queue a real app may read.
    let completed = daemon
        .submit(&json!({
            "request": {"http_method": "post", "url": upstream.url("/echo"),
                        "headers": {"content-type": "application/json"},
                        "body": {"encoding": "text", "value": "{\"q\":1}", "charset": "UTF-8"}},
            "callback": "SummarizeCallback",
            "callback_args": {"document_id": 7},
            "deliver": {"sidekiq": {"queue": queue}},
        }))
        .await;
    let failed = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/status/422?body=boom")},
            "callback": "FailingCallback",
            "raise_error_responses": true,
            "deliver": {"sidekiq": {"queue": custom, "worker": "App::PatientWorker"}},
        }))
        .await;
    assert_eq!(completed["delivery"]["channel"], "sidekiq");
    let completed = daemon
        .wait_delivery(completed["id"].as_str().unwrap(), "delivered")
        .await;
    let failed = daemon
        .wait_delivery(failed["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(completed["state"], "completed");
    assert_eq!(failed["state"], "failed");

    // SADD queues Q
    for q in [&queue, &custom] {
        let member: bool = redis::cmd("SISMEMBER")
            .arg("queues")
            .arg(q)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(member, "{q} is in the set `queues`");
    }
    // LPUSH queue:Q <job>
    let jobs = |q: String| {
        let mut redis = redis.clone();
        async move {
            let items: Vec<String> = redis::cmd("LRANGE")
                .arg(format!("queue:{q}"))
                .arg(0)
                .arg(-1)
                .query_async(&mut redis)
                .await
                .unwrap();
            items
                .iter()
                .map(|i| serde_json::from_str::<Value>(i).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let done = jobs(queue.clone()).await;
    assert_eq!(done.len(), 1, "{done:?}");
    let jid = check_job(
        &done[0],
        &queue,
        "PatientHttp::Sidekiq::CallbackWorker",
        &completed,
        "response",
    );
    let response = &done[0]["args"][0];
    assert_eq!(response["status"], 200);
    assert_eq!(response["http_method"], "post");
    assert_eq!(response["callback_args"], json!({"document_id": 7}));
    let echo: Value = serde_json::from_str(response["body"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        echo["body"], "{\"q\":1}",
        "the request body reached the upstream"
    );

    let errors = jobs(custom.clone()).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    check_job(&errors[0], &custom, "App::PatientWorker", &failed, "error");
    let error = &errors[0]["args"][0];
    assert_eq!(error["response"]["status"], 422, "an HTTP error: {error}");
    assert_eq!(error["response"]["body"]["value"], "boom");

    // A redelivery is the same job again: the same jid.
    let reply = daemon
        .post(
            &format!("/v1/tasks/{}/redeliver", completed["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let again = common::wait_for("the redelivered job", common::WAIT, || {
        let jobs = jobs(queue.clone());
        async move {
            let got = jobs.await;
            (got.len() == 2).then_some(got)
        }
    })
    .await;
    // LPUSH: the newest is first.
    assert_eq!(
        check_job(
            &again[0],
            &queue,
            "PatientHttp::Sidekiq::CallbackWorker",
            &completed,
            "response"
        ),
        jid
    );
    assert_eq!(again[0]["args"], again[1]["args"]);

    let _: () = redis::cmd("DEL")
        .arg(format!("queue:{queue}"))
        .arg(format!("queue:{custom}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SREM")
        .arg("queues")
        .arg(&queue)
        .arg(&custom)
        .query_async(&mut redis)
        .await
        .unwrap();
    daemon.stop().await.unwrap();
}
