//! `patient submit` and `patient tasks` against a real daemon started in
//! the test process (`run_until` on `127.0.0.1:0`) and the testkit upstream.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use patient_daemon::{settings::EgressSettings, Settings};
use patient_testkit::Upstream;
use serde_json::Value;
use tokio::sync::oneshot;

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "patient-cli-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon and the upstream on a runtime of their own, while the test
/// thread runs the command line.
struct Env {
    runtime: tokio::runtime::Runtime,
    up: Upstream,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    _dir: TempDir,
}

impl Env {
    fn start() -> Env {
        Env::start_with(|_| {})
    }

    fn start_with(configure: impl FnOnce(&mut Settings)) -> Env {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let up = runtime.block_on(Upstream::start()).unwrap();
        let dir = TempDir::new("daemon");
        let mut settings = Settings {
            data_dir: dir.0.clone(),
            egress: EgressSettings {
                allow: vec!["127.0.0.1".into()],
            },
            shutdown_timeout: 1.0,
            ..Settings::default()
        };
        settings.retry.base_delay = 0.05;
        settings.retry.max_delay = 0.2;
        configure(&mut settings);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        runtime.spawn(patient_daemon::run_until(settings, listener, async move {
            let _ = stopped.await;
        }));
        Env {
            runtime,
            up,
            url,
            stop: Some(stop),
            _dir: dir,
        }
    }

    /// `patient ARGS` against this daemon (`PATIENT_URL`), without a token.
    fn patient(&self, args: &[&str]) -> Output {
        self.patient_env(args, &[("PATIENT_URL", &self.url)])
    }

    /// `patient ARGS` with exactly these client variables set.
    fn patient_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_patient"));
        command
            .args(args)
            .env_remove("PATIENT_URL")
            .env_remove("PATIENT_API_TOKEN");
        for (name, value) in vars {
            command.env(name, value);
        }
        command.output().unwrap()
    }

    /// The task's JSON as the API sends it (its exact bytes, and parsed),
    /// read without the command line.
    fn raw_task(&self, id: &str, token: Option<&str>) -> (String, Value) {
        use patient_http::client::{ClientConfig, HttpClient, OutgoingRequest};
        let url = format!("{}/v1/tasks/{id}", self.url);
        self.runtime.block_on(async {
            let client = HttpClient::new(ClientConfig::default()).unwrap();
            let mut request = OutgoingRequest::new(http_method_get(), url.parse().unwrap());
            if let Some(token) = token {
                request
                    .headers
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            let response = client.send(request).await.unwrap();
            assert_eq!(response.status, 200);
            let text = String::from_utf8(response.body.to_vec()).unwrap();
            let value = serde_json::from_str(&text).unwrap();
            (text, value)
        })
    }

    /// Polls the task's JSON until `check` holds, for up to 10 s.
    fn task_until(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, task) = self.raw_task(id, None);
            if check(&task) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {task}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn http_method_get() -> http::Method {
    http::Method::GET
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    let text = stdout(out);
    assert_eq!(text.lines().count(), 1, "one line of JSON: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Asserts the exit status and that stderr is one line holding `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
    assert!(err.starts_with("patient: "), "{err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
}

/// The value of the field `name` in the detail view.
fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn submit_sends_the_request_flags_and_show_prints_the_api_json() {
    let env = Env::start();
    let out = env.patient(&[
        "submit",
        "POST",
        &env.up.url("/echo"),
        "-H",
        "X-Trace: abc",
        "--json",
        r#"{"prompt":"hi"}"#,
        "--param",
        "page=2",
        "--timeout",
        "5",
        "--callback",
        "EchoCallback",
        "--callback-args",
        r#"{"a":"x","id":1}"#,
        "--callback-arg",
        "id=7",
        "--callback-arg",
        r#"tags=["t"]"#,
        "--idempotency-key",
        "echo-1",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let task = json(&out);
    let id = task["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("tsk_"), "{id}");
    assert_eq!(task["callback"], "EchoCallback");
    assert_eq!(
        task["callback_args"],
        serde_json::json!({"a": "x", "id": 7, "tags": ["t"]})
    );
    assert_eq!(task["idempotency_key"], "echo-1");
    let request = &task["request"];
    assert_eq!(request["http_method"], "post");
    assert_eq!(request["timeout"], 5.0);
    assert!(request["url"].as_str().unwrap().ends_with("/echo?page=2"));
    assert_eq!(request["headers"]["x-trace"], "abc");

    let done = env.task_until(&id, "completion", |t| t["state"] == "completed");
    let echo: Value = serde_json::from_str(
        done["outcome"]["response"]["body"]["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(echo["body"], r#"{"prompt":"hi"}"#);
    assert_eq!(echo["headers"]["x-trace"], "abc");

    // `tasks show --json` prints exactly what the API sends.
    let (raw, _) = env.raw_task(&id, None);
    for args in [
        &["tasks", "show", &id, "--json"][..],
        &["tasks", "show", &id, "-o", "json"],
    ] {
        let out = env.patient(args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim_end(), raw);
    }

    // The table is for people: one field a line, then the attempts.
    let out = env.patient(&["tasks", "show", &id]);
    let text = stdout(&out);
    assert_eq!(field(&text, "id"), id);
    assert_eq!(field(&text, "state"), "completed");
    assert_eq!(field(&text, "callback"), "EchoCallback");
    assert_eq!(field(&text, "outcome"), "response 200");
    assert_eq!(field(&text, "delivery"), "none");
    assert_eq!(field(&text, "idempotency key"), "echo-1");
    assert!(text.contains("ATTEMPT  STATUS  ERROR"), "{text}");

    // The outcome format: the Response in the wire format.
    let out = env.patient(&["tasks", "show", &id, "-o", "outcome"]);
    assert_eq!(json(&out), done["outcome"]["response"]);

    // The same idempotency key gives the same task.
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--idempotency-key",
        "echo-1",
        "-o",
        "json",
    ]);
    assert_eq!(json(&out)["id"], id.as_str());
}

#[test]
fn submit_wait_exits_with_the_outcome_status() {
    let env = Env::start();
    let out = env.patient(&["submit", &env.up.url("/fast"), "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(field(&text, "state"), "completed");
    assert_eq!(field(&text, "outcome"), "response 200");
    assert_ne!(field(&text, "finished"), "-");

    // A non-2xx response is a response unless asked otherwise ...
    let out = env.patient(&[
        "submit",
        &env.up.url("/status/503"),
        "--retries",
        "1",
        "--wait",
        "-o",
        "outcome",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let response = json(&out);
    assert_eq!(response["status"], 503);
    assert_eq!(response["attempts"].as_array().unwrap().len(), 2);
    // ... and a failed task exits 1 with its error.
    let out = env.patient(&[
        "submit",
        &env.up.url("/status/404"),
        "--raise-error-responses",
        "--wait",
        "-o",
        "outcome",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["response"]["status"], 404);
    // A connection error, in the table.
    let out = env.patient(&["submit", "http://127.0.0.1:1/", "--retries", "0", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert_eq!(field(&text, "state"), "failed");
    assert!(
        field(&text, "outcome").starts_with("error connection"),
        "{text}"
    );

    // Past --wait-timeout: exit 3, the task goes on.
    let started = Instant::now();
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--delay",
        "60",
        "--wait",
        "--wait-timeout",
        "0.3",
    ]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_fails(&out, 3, "still scheduled");
    assert!(stdout(&out).is_empty());
    assert_eq!(env.up.requests_to("/fast"), 1);
}

#[test]
fn submit_schedules_and_takes_a_request_file() {
    let env = Env::start();
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--delay",
        "30",
        "--deadline",
        "120",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let task = json(&out);
    assert_eq!(task["state"], "scheduled");
    assert_eq!(task["request"]["options"]["deadline"], 120.0);
    let created = task["created_at"].as_str().unwrap();
    assert_ne!(task["not_before"].as_str().unwrap(), created);

    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--not-before",
        "2099-01-01T00:00:00Z",
    ]);
    assert_fails(&out, 2, "invalid_request: not_before");
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--delay",
        "5",
        "--not-before",
        "2026-12-01T10:00:00Z",
    ]);
    assert_fails(&out, 2, "--not-before");

    // A request file, with the flag's retries where the file has none ...
    let dir = TempDir::new("from");
    let file = dir.0.join("request.json");
    let request = serde_json::json!({
        "http_method": "put",
        "url": env.up.url("/echo"),
        "headers": {"content-type": "text/plain"},
        "body": {"encoding": "text", "value": "hello", "charset": "UTF-8"},
        "timeout": 5,
        "max_redirects": null
    });
    std::fs::write(&file, request.to_string()).unwrap();
    let path = file.to_str().unwrap();
    let out = env.patient(&["submit", "--from", path, "--retries", "2", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sent = &json(&out)["request"];
    assert_eq!(sent["http_method"], "put");
    assert_eq!(sent["options"]["retry"]["max_attempts"], 3);
    // ... and the file's own where it has them.
    let mut own = request.clone();
    own["options"] = serde_json::json!({"retry": {"max_attempts": 4}});
    std::fs::write(&file, own.to_string()).unwrap();
    let out = env.patient(&["submit", "--from", path, "--retries", "2", "-o", "json"]);
    assert_eq!(json(&out)["request"]["options"]["retry"]["max_attempts"], 4);
}

#[test]
fn tasks_list_prints_aligned_columns_and_pages() {
    let env = Env::start();
    let mut ids = Vec::new();
    for i in 0..3 {
        let url = env.up.url(&format!("/fast?i={i}"));
        let out = env.patient(&[
            "submit",
            &url,
            "--callback",
            "Paged",
            "--wait",
            "-o",
            "json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        ids.push(json(&out)["id"].as_str().unwrap().to_owned());
        std::thread::sleep(Duration::from_millis(5));
    }
    env.patient(&["submit", &env.up.url("/fast"), "--callback", "Other"]);

    let out = env.patient(&["tasks", "list", "--callback", "Paged", "--limit", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header = lines[0];
    let columns = ["ID", "STATE", "CALLBACK", "CREATED", "ATTEMPTS", "DELIVERY"];
    let starts: Vec<usize> = columns.iter().map(|c| header.find(c).unwrap()).collect();
    for (line, id) in lines[1..].iter().zip([&ids[2], &ids[1]]) {
        assert!(line.starts_with(id.as_str()), "{line}");
        // Every cell starts under its column's name.
        for (start, expected) in
            starts
                .iter()
                .zip([id.as_str(), "completed", "Paged", "2", "1", "none"])
        {
            let cell = line[*start..].split("  ").next().unwrap();
            if expected != "2" {
                assert_eq!(cell, expected, "{line}");
            } else {
                assert!(cell.starts_with("20"), "a created time: {line}");
            }
        }
    }
    let cursor = stderr(&out)
        .trim()
        .strip_prefix("patient: more tasks: --cursor ")
        .unwrap()
        .to_owned();

    let out = env.patient(&[
        "tasks",
        "list",
        "--callback",
        "Paged",
        "--limit",
        "2",
        "--cursor",
        &cursor,
    ]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().nth(1).unwrap().starts_with(ids[0].as_str()));
    assert!(stderr(&out).is_empty(), "the last page: {}", stderr(&out));

    // --json prints the API's page.
    let out = env.patient(&["tasks", "list", "--callback", "Paged", "--json"]);
    let page = json(&out);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(page["next_cursor"], Value::Null);
    let out = env.patient(&[
        "tasks",
        "--json",
        "list",
        "--state",
        "completed",
        "--callback",
        "Other",
    ]);
    assert!(json(&out)["tasks"].as_array().unwrap().len() <= 1);

    for (args, needle) in [
        (&["tasks", "list", "--state", "done"][..], "--state"),
        (&["tasks", "list", "--limit", "0"], "--limit"),
        (
            &["tasks", "list", "--cursor", "nonsense"],
            "invalid_request: cursor",
        ),
    ] {
        assert_fails(&env.patient(args), 2, needle);
    }
}

#[test]
fn cancel_retry_and_redeliver_change_the_task() {
    let env = Env::start_with(|s| s.delivery.max_attempts = 1);
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--delay",
        "60",
        "-o",
        "json",
    ]);
    let id = json(&out)["id"].as_str().unwrap().to_owned();
    let out = env.patient(&["tasks", "cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(field(&stdout(&out), "state"), "cancelled");
    assert_fails(&env.patient(&["tasks", "cancel", &id]), 2, "conflict: task");

    // Retry: a failed task runs again.
    let out = env.patient(&[
        "submit",
        &env.up.url("/status/404"),
        "--raise-error-responses",
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let failed = json(&out)["id"].as_str().unwrap().to_owned();
    let out = env.patient(&["tasks", "retry", &failed, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let retried = json(&out);
    assert_ne!(retried["state"], "failed");
    assert_eq!(retried["outcome"], Value::Null);
    env.task_until(&failed, "the retry to fail", |t| t["state"] == "failed");
    assert_eq!(env.up.requests_to("/status/404"), 2);

    // Redeliver: a failed webhook delivery is tried again.
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--deliver",
        &format!("webhook={}", env.up.url("/status/500")),
        "-o",
        "json",
    ]);
    let hooked = json(&out)["id"].as_str().unwrap().to_owned();
    env.task_until(&hooked, "a failed delivery", |t| {
        t["delivery"]["state"] == "failed"
    });
    let out = env.patient(&["tasks", "redeliver", &hooked, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json(&out)["delivery"]["state"], "pending");
    env.task_until(&hooked, "the second delivery", |t| {
        t["delivery"]["state"] == "failed"
    });
    assert_eq!(env.up.requests_to("/status/500"), 2);
    assert_fails(&env.patient(&["tasks", "redeliver", &id]), 2, "conflict:");
    assert_fails(
        &env.patient(&["tasks", "show", "tsk_missing"]),
        2,
        "not_found: no task tsk_missing",
    );
}

#[test]
fn a_webhook_delivery_reaches_its_receiver() {
    let env = Env::start();
    let out = env.patient(&[
        "submit",
        &env.up.url("/fast"),
        "--callback",
        "Hooked",
        "--deliver",
        &format!("webhook={}", env.up.url("/echo")),
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let task = json(&out);
    assert_eq!(task["delivery"]["channel"], "webhook");
    let id = task["id"].as_str().unwrap();
    let done = env.task_until(id, "the delivery", |t| {
        t["delivery"]["state"] == "delivered"
    });
    assert_eq!(done["delivery"]["attempts"], 1);
    assert_eq!(env.up.requests_to("/echo"), 1);
    let text = stdout(&env.patient(&["tasks", "show", id]));
    assert_eq!(field(&text, "delivery"), "webhook delivered (1 try)");
}

#[test]
fn bad_input_and_refusals_are_one_line_with_exit_2_and_no_daemon_exit_1() {
    let env = Env::start_with(|s| s.api_token = Some("s3cret".into()));
    let url = env.up.url("/fast");
    let token = [
        ("PATIENT_URL", env.url.as_str()),
        ("PATIENT_API_TOKEN", "s3cret"),
    ];

    // The token: missing, from the environment, overridden by --token.
    assert_fails(&env.patient(&["tasks", "list"]), 2, "unauthorized: ");
    let out = env.patient_env(&["submit", &url, "-o", "json"], &token);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = json(&out)["id"].as_str().unwrap().to_owned();
    assert_fails(
        &env.patient_env(&["tasks", "show", &id, "--token", "wrong"], &token),
        2,
        "unauthorized: ",
    );
    let out = env.patient(&["tasks", "show", &id, "--token", "s3cret", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (raw, _) = env.raw_task(&id, Some("s3cret"));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let raw: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(shown["id"], raw["id"]);

    // The URL: --url over PATIENT_URL.
    let dead = [
        ("PATIENT_URL", "http://127.0.0.1:1"),
        ("PATIENT_API_TOKEN", "s3cret"),
    ];
    assert_fails(
        &env.patient_env(&["tasks", "show", &id], &dead),
        1,
        "cannot reach the daemon at http://127.0.0.1:1/",
    );
    let out = env.patient_env(&["tasks", "show", &id, "--url", &env.url], &dead);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_fails(
        &env.patient_env(&["tasks", "list", "--url", "ftp://127.0.0.1:1"], &token),
        2,
        "--url: ",
    );
    assert_fails(
        &env.patient_env(&["tasks", "list"], &[("PATIENT_URL", "nowhere")]),
        2,
        "PATIENT_URL: ",
    );

    // The daemon's refusals, with its code and message.
    for (args, needle) in [
        (
            vec!["submit", "http://10.0.0.1/admin"],
            "egress_denied: request.url: 10.0.0.1",
        ),
        (
            vec![
                "submit",
                &url,
                "--deliver",
                "webhook=http://192.168.1.1/hook",
            ],
            "egress_denied: deliver.webhook.url",
        ),
        (
            vec!["submit", &url, "--deliver", "redis-list=outcomes"],
            "invalid_request: deliver: Redis and Sidekiq delivery need",
        ),
        (
            vec!["submit", &url, "--callback", &"x".repeat(300)],
            "invalid_request: callback",
        ),
        (vec!["tasks", "retry", &id], "conflict: "),
    ] {
        assert_fails(&env.patient_env(&args, &token), 2, needle);
    }

    // Bad arguments, refused before the daemon is asked.
    for (args, needle) in [
        (vec!["submit", &url, "--deliver", "email=a@b"], "--deliver"),
        (
            vec!["submit", &url, "--callback-arg", "name=Ada"],
            "not JSON",
        ),
        (vec!["submit", &url, "--delay", "-1"], "--delay"),
        (vec!["submit", &url, "--wait-timeout", "3"], "--wait"),
        (
            vec!["submit", &url, "--callback-args", "[1]"],
            "--callback-args",
        ),
        (vec!["submit", "ftp://127.0.0.1/x"], "ftp"),
        (vec!["submit"], "a URL is required"),
        (vec!["tasks", "show"], "ID"),
    ] {
        assert_fails(&env.patient_env(&args, &dead), 2, needle);
    }
}

#[test]
fn help_explains_the_environment_and_exit_statuses() {
    for args in [
        &["submit", "--help"][..],
        &["tasks", "--help"],
        &["tasks", "list", "--help"],
        &["tasks", "show", "--help"],
        &["tasks", "cancel", "--help"],
        &["tasks", "redeliver", "--help"],
        &["tasks", "retry", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_patient"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let help = stdout(&out);
        for needle in [
            "PATIENT_URL",
            "PATIENT_API_TOKEN",
            "--url",
            "--token",
            "Exit status:",
            "  0  done",
            "  1  ",
            "  2  bad arguments",
            "  3  submit --wait-timeout",
        ] {
            assert!(help.contains(needle), "{needle:?} in {args:?}: {help}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_patient"))
        .args(["submit", "--help"])
        .output()
        .unwrap();
    let help = stdout(&out);
    for needle in [
        "--deliver",
        "webhook=URL",
        "redis-list=KEY",
        "sidekiq=QUEUE[:WORKER]",
        "--wait-timeout",
        "--idempotency-key",
        "--not-before",
    ] {
        assert!(help.contains(needle), "{needle:?}: {help}");
    }
}

/// The Redis URL of the test services, or `None` (with a notice) when it
/// is not set; with `PATIENT_REQUIRE_SERVICES=1` a missing Redis fails.
fn redis_url() -> Option<String> {
    match std::env::var("PATIENT_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let hint = "start it with `eval \"$(scripts/services.sh start)\"`";
            if std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("Redis is required (PATIENT_REQUIRE_SERVICES=1) but PATIENT_TEST_REDIS_URL is not set; {hint}");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "notice: skipping the Redis delivery test: PATIENT_TEST_REDIS_URL is not set; {hint}"
            );
            None
        }
    }
}

#[test]
fn redis_and_sidekiq_targets_deliver_to_real_redis() {
    let Some(redis_url) = redis_url() else {
        return;
    };
    let env = Env::start_with(|s| s.redis_url = Some(redis_url.clone()));
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let prefix = format!("patient-cli-{}-{}", std::process::id(), unique_suffix());
    let list = format!("{prefix}:list");
    let stream = format!("{prefix}:stream");
    let queue = format!("{prefix}-q");
    let url = env.up.url("/fast");

    let submit = |target: String| -> String {
        let out = env.patient(&[
            "submit",
            &url,
            "--callback",
            "RedisCallback",
            "--deliver",
            &target,
            "--wait",
            "-o",
            "json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let id = json(&out)["id"].as_str().unwrap().to_owned();
        env.task_until(&id, "the delivery", |t| {
            t["delivery"]["state"] == "delivered"
        });
        id
    };

    let id = submit(format!("redis-list={list}"));
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query(&mut redis)
        .unwrap();
    assert_eq!(items.len(), 1);
    let event: Value = serde_json::from_str(&items[0]).unwrap();
    assert_eq!(event["task_id"], id.as_str());
    assert_eq!(event["type"], "task.completed");
    assert_eq!(event["callback"], "RedisCallback");

    let id = submit(format!("redis-stream={stream}"));
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query(&mut redis)
        .unwrap();
    assert_eq!(entries.len(), 1);
    let event: Value = serde_json::from_str(&entries[0].1[0].1).unwrap();
    assert_eq!(event["task_id"], id.as_str());

    submit(format!("sidekiq={queue}:App::OutcomeWorker"));
    let jobs: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("queue:{queue}"))
        .arg(0)
        .arg(-1)
        .query(&mut redis)
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let job: Value = serde_json::from_str(&jobs[0]).unwrap();
    assert_eq!(job["class"], "App::OutcomeWorker");
    assert_eq!(job["queue"], queue.as_str());
    assert_eq!(job["args"][1], "response");
    assert_eq!(job["args"][2], "RedisCallback");

    let _: () = redis::cmd("DEL")
        .arg(&list)
        .arg(&stream)
        .arg(format!("queue:{queue}"))
        .query(&mut redis)
        .unwrap();
    let _: () = redis::cmd("SREM")
        .arg("queues")
        .arg(&queue)
        .query(&mut redis)
        .unwrap();
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
