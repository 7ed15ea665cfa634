//! The queue's durable behaviour through the API: retries stored as
//! next-attempt times (surviving a restart), idempotency keys, batches,
//! cancel, retry of a failed task, list pagination, `delay` and
//! `not_before`.
//!
//! The daemon schedules by the wall clock it stores (`not_before` is a
//! time in the database, so that a restart keeps it), so these tests run on
//! the real clock with delays of a second or less.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{get_request, Daemon};
use patient_testkit::Upstream;
use serde_json::{json, Value};

fn ms(rfc3339: &Value) -> i64 {
    let text = rfc3339
        .as_str()
        .unwrap_or_else(|| panic!("a time: {rfc3339}"));
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn id(task: &Value) -> String {
    task["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_a_stored_next_attempt_time_that_survives_a_restart() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    // 503 with Retry-After: 2, then 200.
    let url = upstream.url("/sequence?key=durable&steps=503,200&retry_after=2");
    let task = daemon.submit(&get_request(&url)).await;
    let id = id(&task);

    // After the first attempt the task waits, scheduled, for the stored time.
    let waiting = daemon
        .wait_task(&id, "scheduled after its first attempt", |t| {
            t["attempts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    assert_eq!(waiting["state"], "scheduled", "{waiting:#}");
    let first = &waiting["attempts"][0];
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["status"], 503);
    let not_before = ms(&waiting["not_before"]);
    assert!(
        not_before >= ms(&first["started_at"]) + 1900,
        "Retry-After 2 honoured: {waiting:#}"
    );

    // Stop the daemon during the wait and start another on the same store.
    let dir = daemon.dir();
    daemon.stop().await.unwrap();
    assert_eq!(upstream.sequence_count("durable"), 1);
    let daemon = Daemon::start_in(dir, &[]).await;
    let task = daemon.task(&id).await;
    assert_eq!(
        task["state"], "scheduled",
        "still waiting after the restart"
    );
    assert_eq!(ms(&task["not_before"]), not_before, "the same stored time");

    let done = daemon.wait_finished(&id).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done:#}");
    assert_eq!(
        (&attempts[0]["status"], &attempts[1]["status"]),
        (&json!(503), &json!(200))
    );
    assert_eq!(attempts[1]["attempt"], 2);
    assert!(
        ms(&attempts[1]["started_at"]) >= not_before,
        "not run before its time: {done:#}"
    );
    assert_eq!(done["outcome"]["response"]["status"], 200);
    assert_eq!(
        upstream.sequence_count("durable"),
        2,
        "each attempt sent once"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_retries_end_at_max_attempts_with_the_last_answer() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_RETRY__MAX_ATTEMPTS", "3")]).await;
    let url = upstream.url("/sequence?key=always503&steps=503");
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": url}, "raise_error_responses": true}),
        )
        .await;
    let done = daemon.wait_finished(&id(&task)).await;
    assert_eq!(done["state"], "failed");
    let statuses: Vec<&Value> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status"])
        .collect();
    assert_eq!(statuses, [&json!(503); 3], "{done:#}");
    assert_eq!(done["outcome"]["error"]["response"]["status"], 503);
    assert_eq!(upstream.sequence_count("always503"), 3);

    // A POST without an idempotency key is not retried (unsafe)...
    let url = upstream.url("/sequence?key=post503&steps=503,200");
    let post = daemon
        .submit(&json!({"request": {"http_method": "post", "url": url}}))
        .await;
    let post = daemon.wait_finished(&id(&post)).await;
    assert_eq!(post["state"], "completed", "a 503 is a response");
    assert_eq!(post["outcome"]["response"]["status"], 503);
    assert_eq!(upstream.sequence_count("post503"), 1);
    // ... unless the request carries one.
    let url = upstream.url("/sequence?key=postkey&steps=503,200");
    let keyed = daemon
        .submit(&json!({"request": {"http_method": "post", "url": url,
                                    "options": {"idempotency_key": "order-17"}}}))
        .await;
    let keyed = daemon.wait_finished(&id(&keyed)).await;
    assert_eq!(keyed["outcome"]["response"]["status"], 200, "{keyed:#}");
    assert_eq!(upstream.sequence_count("postkey"), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_gives_back_the_first_task_unchanged() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let first = json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
                       "callback": "First", "idempotency_key": "doc-7-summary"});
    let reply = daemon.post("/v1/tasks", &first).await;
    assert_eq!(reply.status, 201);
    let task = reply.json();
    let done = daemon.wait_finished(&id(&task)).await;

    let second = json!({"request": {"http_method": "get", "url": upstream.url("/json")},
                        "callback": "Second", "idempotency_key": "doc-7-summary"});
    let reply = daemon.post("/v1/tasks", &second).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let again = reply.json();
    assert_eq!(again, done, "the first task, as it is, unchanged");
    assert_eq!(again["callback"], "First");

    // In a batch, a used key gives back its task in place; the rest are new.
    let reply = daemon
        .post(
            "/v1/tasks/batch",
            &json!({"tasks": [
                {"request": {"http_method": "get", "url": upstream.url("/fast")}, "callback": "b0"},
                second,
                {"request": {"http_method": "get", "url": upstream.url("/fast")}, "callback": "b2",
                 "idempotency_key": "fresh-key"},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let tasks = reply.json()["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 3);
    assert_eq!(tasks[0]["callback"], "b0");
    assert_eq!(tasks[1]["id"], task["id"]);
    assert_eq!(tasks[2]["callback"], "b2");
    assert_eq!(tasks[2]["idempotency_key"], "fresh-key");
    for t in [&tasks[0], &tasks[2]] {
        assert_eq!(daemon.wait_finished(&id(t)).await["state"], "completed");
    }
    assert_eq!(
        upstream.requests_to("/json"),
        0,
        "the second body never ran"
    );
    let list = daemon.get("/v1/tasks").await.json();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_waiting_or_running_task_for_good() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;

    let waiting = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")}, "delay": 0.6}),
        )
        .await;
    assert_eq!(waiting["state"], "scheduled");
    let reply = daemon
        .post(&format!("/v1/tasks/{}/cancel", id(&waiting)), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let cancelled = reply.json();
    assert_eq!(cancelled["state"], "cancelled");
    assert!(cancelled["finished_at"].is_string());

    let running = daemon
        .submit(&get_request(&upstream.url("/delay?ms=800")))
        .await;
    daemon
        .wait_task(&id(&running), "running", |t| t["state"] == "running")
        .await;
    common::wait_for("the upstream to get the request", common::WAIT, || async {
        (upstream.requests_to("/delay") == 1).then_some(())
    })
    .await;
    let reply = daemon
        .post(&format!("/v1/tasks/{}/cancel", id(&running)), &json!({}))
        .await;
    assert_eq!(reply.json()["state"], "cancelled");

    // Past the delay and the answer: neither ran or finished after all.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for t in [&waiting, &running] {
        let t = daemon.task(&id(t)).await;
        assert_eq!(t["state"], "cancelled", "{t:#}");
        assert_eq!(t["outcome"], Value::Null);
        assert_eq!(t["delivery"]["state"], "none");
    }
    assert_eq!(
        upstream.requests_to("/fast"),
        0,
        "the delayed task never ran"
    );
    let list = daemon.get("/v1/tasks?state=cancelled").await.json();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_runs_again_as_a_new_attempt_series() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let url = upstream.url("/sequence?key=again&steps=404,200");
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": url}, "raise_error_responses": true}),
        )
        .await;
    let failed = daemon.wait_finished(&id(&task)).await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(
        failed["attempts"].as_array().unwrap().len(),
        1,
        "404 is final"
    );

    let reply = daemon
        .post(&format!("/v1/tasks/{}/retry", id(&task)), &json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let queued = reply.json();
    assert!(
        matches!(queued["state"].as_str(), Some("queued" | "running")),
        "{queued:#}"
    );
    assert_eq!(queued["outcome"], Value::Null);
    let done = daemon.wait_finished(&id(&task)).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "a new series: {done:#}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["status"], 200);
    assert_eq!(upstream.sequence_count("again"), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_newest_first_with_a_cursor_and_filters() {
    let daemon = Daemon::start(&[]).await;
    let unique = format!("Page{}", uuid::Uuid::new_v4().simple());
    let mut ids = Vec::new();
    for i in 0..5 {
        // Scheduled far ahead: the list is stable while the test reads it.
        let task = daemon
            .submit(
                &json!({"request": {"http_method": "get", "url": "http://127.0.0.1:9/"},
                            "callback": unique, "callback_args": {"i": i}, "delay": 3600}),
            )
            .await;
        ids.push(id(&task));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": "http://127.0.0.1:9/"},
                        "callback": "Other", "delay": 3600}),
        )
        .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/v1/tasks?callback={unique}&limit=2");
        if let Some(c) = &cursor {
            let c: String = url::form_urlencoded::byte_serialize(c.as_bytes()).collect();
            path.push_str(&format!("&cursor={c}"));
        }
        let page = daemon.get(&path).await.json();
        pages += 1;
        let tasks = page["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 2);
        seen.extend(tasks.iter().map(id));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => {
                assert!(page["next_cursor"].is_null());
                break;
            }
        }
        assert!(pages < 10, "the cursor ends");
    }
    assert_eq!(pages, 3, "2 + 2 + 1");
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let all = daemon
        .get("/v1/tasks?state=scheduled&limit=1000")
        .await
        .json();
    assert_eq!(all["tasks"].as_array().unwrap().len(), 6);
    assert!(all["next_cursor"].is_null());
    let none = daemon.get("/v1/tasks?state=completed").await.json();
    assert_eq!(none["tasks"], json!([]));
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 5);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_not_before_hold_a_task_until_its_time() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;

    let delayed = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")}, "delay": 0.8}),
        )
        .await;
    assert_eq!(delayed["state"], "scheduled");
    let created = ms(&delayed["created_at"]);
    assert_eq!(ms(&delayed["not_before"]), created + 800);

    let at = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(700);
    let at_text = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let scheduled = daemon
        .submit(&json!({"request": {"http_method": "get", "url": upstream.url("/json")}, "not_before": at_text}))
        .await;
    assert_eq!(scheduled["state"], "scheduled");
    let at_ms = (at.unix_timestamp_nanos() / 1_000_000) as i64;
    assert_eq!(ms(&scheduled["not_before"]), at_ms);

    // In the past: due now.
    let past = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/html")},
                        "not_before": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert!(ms(&past["not_before"]) >= ms(&past["created_at"]));
    daemon.wait_finished(&id(&past)).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.requests_to("/fast"), 0, "not before its delay");
    assert_eq!(upstream.requests_to("/json"), 0, "not before not_before");
    for (task, not_before) in [(&delayed, created + 800), (&scheduled, at_ms)] {
        let done = daemon.wait_finished(&id(task)).await;
        assert_eq!(done["state"], "completed");
        let started = ms(&done["attempts"][0]["started_at"]);
        assert!(started >= not_before, "{done:#}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_bounds_the_task_from_submission_on() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    // The upstream asks for a 3 s pause; the deadline is 0.5 s away.
    let url = upstream.url("/sequence?key=deadline&steps=503&retry_after=3");
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": url, "options": {"deadline": 0.5}}}),
        )
        .await;
    let started = std::time::Instant::now();
    let done = daemon.wait_finished(&id(&task)).await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "ended at the deadline, not after the pause: {:?} {done:#}",
        started.elapsed()
    );
    assert_eq!(upstream.sequence_count("deadline"), 1);
    // A pause past the deadline is not waited: the last answer stands.
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["outcome"]["response"]["status"], 503);
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);

    // A delay past the deadline: the task ends without sending anything.
    let late = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast"),
                                    "options": {"deadline": 0.2}}, "delay": 0.5}),
        )
        .await;
    let late = daemon.wait_finished(&id(&late)).await;
    assert_eq!(late["state"], "failed", "{late:#}");
    assert!(late["outcome"]["error"].is_object(), "{late:#}");
    assert_eq!(
        upstream.requests_to("/fast"),
        0,
        "nothing sent past the deadline"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_each_attempt() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_RETRY__MAX_ATTEMPTS", "2")]).await;
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/delay?ms=3000"),
                                    "timeout": 0.3}}),
        )
        .await;
    let started = std::time::Instant::now();
    let done = daemon.wait_finished(&id(&task)).await;
    assert!(started.elapsed() < Duration::from_millis(2500), "{done:#}");
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(done["outcome"]["error"]["error_type"], "timeout");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "a timeout is retried: {done:#}");
    for a in attempts {
        assert_eq!(a["error_type"], "timeout", "{a}");
        assert_eq!(a["status"], Value::Null);
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_queue_is_served_high_priority_first_and_listed_by_its_shown_state() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_MAX_IN_FLIGHT", "1")]).await;
    // One slot, taken for 800 ms: the rest wait in the queue.
    let busy = daemon
        .submit(&get_request(&upstream.url("/delay?ms=800")))
        .await;
    daemon
        .wait_task(&id(&busy), "running", |t| t["state"] == "running")
        .await;
    let mut waiting = Vec::new();
    for priority in ["low", "normal", "high"] {
        let task = daemon
            .submit(&json!({"request": {"http_method": "get",
                "url": upstream.url(&format!("/sequence?key={priority}")),
                "options": {"priority": priority}}, "callback": priority}))
            .await;
        waiting.push(id(&task));
    }
    // A delayed one whose time comes while the slot is still taken.
    let delayed = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/sequence?key=delayed")},
                        "delay": 0.2, "callback": "delayed"}),
        )
        .await;
    assert_eq!(delayed["state"], "scheduled");
    tokio::time::sleep(Duration::from_millis(350)).await;

    // Due but not claimed: shown `queued`, and listed as such.
    let shown = daemon.task(&id(&delayed)).await;
    assert_eq!(shown["state"], "queued", "{shown:#}");
    let queued = daemon.get("/v1/tasks?state=queued").await.json();
    let queued: BTreeSet<String> = queued["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(
                t["state"], "queued",
                "the list shows what the filter says: {t}"
            );
            id(t)
        })
        .collect();
    let mut expected: BTreeSet<String> = waiting.iter().cloned().collect();
    expected.insert(id(&delayed));
    assert_eq!(queued, expected);
    let scheduled = daemon.get("/v1/tasks?state=scheduled").await.json();
    assert_eq!(scheduled["tasks"], json!([]), "{scheduled:#}");

    let mut starts = Vec::new();
    for task in waiting.iter().chain([&id(&delayed)]) {
        let done = daemon.wait_finished(task).await;
        starts.push((
            ms(&done["attempts"][0]["started_at"]),
            done["callback"].clone(),
        ));
    }
    starts.sort_by_key(|(at, _)| *at);
    let order: Vec<&Value> = starts.iter().map(|(_, c)| c).collect();
    assert_eq!(order[0], "high", "{starts:?}");
    assert_eq!(order[3], "low", "{starts:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_pages_tasks_created_in_the_same_millisecond() {
    let daemon = Daemon::start(&[]).await;
    let body = json!({"request": {"http_method": "get", "url": "http://127.0.0.1:9/"},
                      "callback": "SameMs", "delay": 3600});
    let reply = daemon
        .post(
            "/v1/tasks/batch",
            &json!({"tasks": [body, body, body, body, body]}),
        )
        .await;
    assert_eq!(reply.status, 201);
    let batch: BTreeSet<String> = reply.json()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(id)
        .collect();
    assert_eq!(batch.len(), 5);
    let mut seen = Vec::new();
    let mut path = "/v1/tasks?callback=SameMs&limit=2".to_owned();
    for _ in 0..3 {
        let page = daemon.get(&path).await.json();
        seen.extend(page["tasks"].as_array().unwrap().iter().map(id));
        match page["next_cursor"].as_str() {
            Some(c) => {
                let c: String = url::form_urlencoded::byte_serialize(c.as_bytes()).collect();
                path = format!("/v1/tasks?callback=SameMs&limit=2&cursor={c}");
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), batch);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_does_not_cut_an_attempt_short_of_its_timeout() {
    // With 5 attempts a split deadline would give each 0.8 s of the 4 s:
    // the daemon passes the whole remainder to an attempt (its timeout
    // still bounds it), so a 1.5 s answer arrives.
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/delay?ms=1500"),
                                    "timeout": 5, "options": {"deadline": 4}}}),
        )
        .await;
    let done = daemon.wait_finished(&id(&task)).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["outcome"]["response"]["status"], 200, "{done:#}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done:#}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_never_sends_an_unsafe_request_twice_and_resends_the_rest() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = common::Receiver::start(&[]).await;
    let daemon = Daemon::start(&[("PATIENT_SHUTDOWN_TIMEOUT", "0.5")]).await;
    // The upstream holds the first request of each key for a minute (past
    // the shutdown timeout) and answers the next at once.
    let held = |key: &str| upstream.url(&format!("/sequence?key={key}&delays=60000,0"));
    let cases = [
        // (key, request, sent again)
        (
            "post",
            json!({"http_method": "post", "url": held("post")}),
            false,
        ),
        (
            "patch",
            json!({"http_method": "patch", "url": held("patch")}),
            false,
        ),
        (
            "get",
            json!({"http_method": "get", "url": held("get")}),
            true,
        ),
        (
            "put",
            json!({"http_method": "put", "url": held("put")}),
            true,
        ),
        (
            "delete",
            json!({"http_method": "delete", "url": held("delete")}),
            true,
        ),
        (
            "keyed",
            json!({"http_method": "post", "url": held("keyed"),
                   "options": {"idempotency_key": "charge-7"}}),
            true,
        ),
        (
            "unsafe",
            json!({"http_method": "patch", "url": held("unsafe"),
                   "options": {"retry": {"retry_unsafe": true}}}),
            true,
        ),
    ];
    let mut ids = Vec::new();
    for (key, request, _) in &cases {
        let task = daemon
            .submit(&json!({"request": request, "callback": key,
                            "deliver": {"webhook": {"url": receiver.url}}}))
            .await;
        ids.push(id(&task));
    }
    common::wait_for("every request held upstream", common::WAIT, || async {
        cases
            .iter()
            .all(|(key, _, _)| upstream.sequence_count(key) == 1)
            .then_some(())
    })
    .await;
    let dir = daemon.dir();
    daemon.stop().await.unwrap();

    let daemon = Daemon::start_in(dir, &[]).await;
    for ((key, request, resent), id) in cases.iter().zip(&ids) {
        let done = daemon.wait_finished(id).await;
        if *resent {
            assert_eq!(done["state"], "completed", "{key} sent again: {done:#}");
            assert_eq!(done["outcome"]["response"]["status"], 200, "{done:#}");
            let attempts = done["attempts"].as_array().unwrap();
            assert_eq!(
                attempts.len(),
                1,
                "{key}: the cut-off attempt is not counted: {done:#}"
            );
            assert_eq!(attempts[0]["attempt"], 1, "{done:#}");
        } else {
            assert_eq!(done["state"], "failed", "{key} interrupted: {done:#}");
            let error = &done["outcome"]["error"];
            assert_eq!(error["class_name"], "Interrupted", "{key}: {error}");
            assert_eq!(error["http_method"], request["http_method"], "{error}");
            assert_eq!(error["url"], request["url"], "{error}");
            assert_eq!(done["outcome"]["type"], "task.failed");
        }
    }
    // Every outcome is delivered, the interrupted ones as any other.
    for id in &ids {
        daemon.wait_delivery(id, "delivered").await;
    }
    let got = receiver.received();
    for (key, _, resent) in &cases {
        let messages: Vec<&common::Received> = got
            .iter()
            .filter(|m| m.json()["data"]["callback"] == *key)
            .collect();
        assert_eq!(messages.len(), 1, "{key}: one delivery: {got:?}");
        let expected = if *resent {
            "task.completed"
        } else {
            "task.failed"
        };
        assert_eq!(messages[0].json()["type"], expected, "{key}");
    }
    // Time for a wrongly re-sent request to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (key, _, resent) in &cases {
        let expected = if *resent { 2 } else { 1 };
        assert_eq!(
            upstream.sequence_count(key),
            expected,
            "{key} reached the upstream {expected} time(s)"
        );
    }
    daemon.stop().await.unwrap();
}
