//! The examples of `examples/` against a real daemon: the Python app submits
//! a request and verifies the webhook with the reference `standardwebhooks`
//! package (the venv `scripts/services.sh` prepares, `PATIENT_TEST_PYTHON`).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{Daemon, SECRET};
use patient_testkit::Upstream;

/// The Python with `standardwebhooks`, or `None` with a notice (a failure
/// with `PATIENT_REQUIRE_SERVICES=1`).
fn python() -> Option<String> {
    match std::env::var("PATIENT_TEST_PYTHON") {
        Ok(py) if !py.is_empty() => Some(py),
        _ => {
            let hint = "prepare it with `eval \"$(scripts/services.sh start)\"`";
            assert!(
                std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "the Python example needs PATIENT_TEST_PYTHON (PATIENT_REQUIRE_SERVICES=1); {hint}"
            );
            eprintln!(
                "notice: skipping the Python example: PATIENT_TEST_PYTHON is not set; {hint}"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_receives_and_verifies_its_webhook() {
    let Some(python) = python() else {
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
