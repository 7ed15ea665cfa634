//! The examples of `examples/` against a real daemon: the Python app submits
//! a request and verifies the webhook with the reference `standardwebhooks`
//! package (the venv `scripts/services.sh` prepares, `PATIENT_TEST_PYTHON`).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{Daemon, SECRET};
use patient_testkit::Upstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_receives_and_verifies_its_webhook() {
    let Some(python) = patient_testkit::services::test_python("the Python example") else {
        return;
    };
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python/app.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(&app)
        .arg(upstream.url("/json"))
        .env("PATIENT_URL", &daemon.url)
        .env("PATIENT_WEBHOOK_SECRET", SECRET)
        .env_remove("PATIENT_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the example finishes within 60 s")
        .unwrap();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stdout), &mut out)
        .await
        .unwrap();
    assert!(status.success(), "the example failed: {status}\n{out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["type"], "task.completed", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["webhook_id"].as_str().unwrap().starts_with("msg_"),
        "{line}"
    );
    let task = daemon.task(line["task_id"].as_str().unwrap()).await;
    assert_eq!(task["delivery"]["state"], "delivered", "{task:#}");
    daemon.stop().await.unwrap();

    // A receiver that is told another secret refuses the delivery (the
    // verification is real): the task's delivery keeps failing.
    let daemon = Daemon::start(&[("PATIENT_DELIVERY__MAX_ATTEMPTS", "2")]).await;
    let mut child = tokio::process::Command::new(&python)
        .arg(&app)
        .arg(upstream.url("/json"))
        .env("PATIENT_URL", &daemon.url)
        .env(
            "PATIENT_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It waits for a verified delivery that never comes: stop it once the
    // daemon has given up.
    let failed = common::wait_for("the delivery to fail", Duration::from_secs(30), || async {
        let list = daemon.get("/v1/tasks").await.json();
        let task = list["tasks"].get(0)?.clone();
        (task["delivery"]["state"] == "failed").then_some(task)
    })
    .await;
    assert_eq!(failed["delivery"]["attempts"], 2, "{failed:#}");
    let _ = child.kill().await;
    daemon.stop().await.unwrap();
}

/// The `sidekiq` command of Debian's ruby-sidekiq, or `None` with a notice
/// (a failure with `PATIENT_REQUIRE_SERVICES=1`).
fn sidekiq() -> Option<String> {
    match std::env::var("PATIENT_TEST_SIDEKIQ") {
        Ok(bin) if !bin.is_empty() => Some(bin),
        _ => {
            let hint = "install it with `eval \"$(scripts/services.sh start)\"`";
            assert!(
                std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "the Ruby example needs PATIENT_TEST_SIDEKIQ (PATIENT_REQUIRE_SERVICES=1); {hint}"
            );
            eprintln!("notice: skipping the Ruby example: PATIENT_TEST_SIDEKIQ is not set; {hint}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidekiq_process_runs_the_callbacks_of_delivered_outcomes() {
    let (Some(sidekiq), Some(redis)) = (sidekiq(), common::redis_url()) else {
        return;
    };
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_REDIS_URL", redis.as_str())]).await;
    // A queue of this test's own: other tests share the Redis server.
    let queue = format!("patient-example-{}", std::process::id());
    let dir = daemon.dir();
    let out = dir.path().join("callbacks.jsonl");
    let ok = daemon
        .submit(&serde_json::json!({
            "request": {"http_method": "get", "url": upstream.url("/json")},
            "callback": "ExampleCallback", "callback_args": {"doc": 7},
            "deliver": {"sidekiq": {"queue": queue}}}))
        .await;
    let refused = daemon
        .submit(&serde_json::json!({
            "request": {"http_method": "get", "url": "http://127.0.0.1:1/unreachable"},
            "callback": "ExampleCallback", "callback_args": {"doc": 8},
            "deliver": {"sidekiq": {"queue": queue}}}))
        .await;
    for task in [&ok, &refused] {
        daemon
            .wait_delivery(task["id"].as_str().unwrap(), "delivered")
            .await;
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ruby/callbacks.rb");
    let mut worker = tokio::process::Command::new(&sidekiq)
        .arg("-r")
        .arg(&script)
        .args(["-q", &queue, "-c", "1"])
        .env("REDIS_URL", &redis)
        .env("PATIENT_EXAMPLE_OUT", &out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = common::wait_for("both callbacks to run", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    let _ = worker.kill().await;
    let by_doc = |doc: i64| {
        lines
            .iter()
            .find(|l| l["callback_args"]["doc"] == doc)
            .unwrap_or_else(|| panic!("no callback for doc {doc}: {lines:?}"))
    };
    let completed = by_doc(7);
    assert_eq!(completed["kind"], "response", "{completed}");
    assert_eq!(completed["status"], 200, "{completed}");
    assert_eq!(completed["task_id"], ok["id"], "{completed}");
    let failed = by_doc(8);
    assert_eq!(failed["kind"], "error", "{failed}");
    assert_eq!(failed["task_id"], refused["id"], "{failed}");
    assert!(failed["class_name"].is_string(), "{failed}");
    daemon.stop().await.unwrap();
}
