//! `patient serve` as a process: `kill -9` while 1,000 tasks are being
//! submitted and run, then a restart on the same data directory; the
//! `Interrupted` rule for a request caught in flight; SIGTERM; and SIGHUP
//! reloading the proxy routes.
//!
//! The daemon is the real binary on `127.0.0.1:0` over a temporary data
//! directory; the upstream and the webhook receiver run in the test.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::HeaderMap};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use patient_testkit::Upstream;
use serde_json::{json, Value};

/// The daemon's webhook secret: the bytes 1 to 32.
const SECRET: &str = "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "patient-serve-test-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `patient serve`.
struct Serve {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Serve {
    /// Starts `patient serve --listen 127.0.0.1:0 --data-dir DIR` with the
    /// test settings and `env` on top, and waits for its listening line.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Serve {
        Serve::start_with(dir, &[], env)
    }

    /// The command of `patient serve --listen 127.0.0.1:0 --data-dir DIR`
    /// with `args`, the test settings and `env` on top, stderr piped.
    fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        Serve::command_under(&[], dir, args, env)
    }

    /// [`command`](Self::command) run by `wrapper` (a command and its
    /// arguments, before the daemon's: `prlimit --nofile=256 --`).
    fn command_under(wrapper: &[&str], dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let binary = env!("CARGO_BIN_EXE_patient");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("PATIENT_") {
                command.env_remove(name);
            }
        }
        for (name, value) in [
            ("PATIENT_LOG", "warn"),
            ("PATIENT_EGRESS__ALLOW", "127.0.0.1"),
            ("PATIENT_WEBHOOK_SECRET", SECRET),
            ("PATIENT_RETRY__BASE_DELAY", "0.05"),
            ("PATIENT_RETRY__MAX_DELAY", "0.2"),
            ("PATIENT_DELIVERY__BASE_DELAY", "0.1"),
            ("PATIENT_DELIVERY__MAX_DELAY", "0.5"),
        ]
        .iter()
        .chain(env)
        {
            command.env(name, value);
        }
        command
    }

    /// Runs `patient serve` on `dir` expecting it not to start: its exit
    /// status and its stderr, or a panic with its log when it still runs
    /// after 10 s (it started).
    fn refused(dir: &Path, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let mut child = Serve::command(dir, &[], env).spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "a second patient serve on {} started: {}",
                    dir.display(),
                    reader.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, reader.join().unwrap())
    }

    /// [`start`](Self::start) with more arguments (`--config FILE`).
    fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_wrapped(&[], dir, args, env)
    }

    /// [`start_with`](Self::start_with) run by `wrapper` (see
    /// [`command_under`](Self::command_under)).
    fn start_wrapped(wrapper: &[&str], dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut command = Serve::command_under(wrapper, dir, args, env);
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("patient: listening on http://") {
                    let _ = tx.send(url.to_owned());
                }
                let mut log = lines.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no listening line from patient serve: {}",
                    log.lock().unwrap()
                );
            }
        };
        Serve { child, addr, log }
    }

    /// `kill -9`, and waits for the process to be gone.
    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// `kill -TERM`, then waits (at most 30 s) for the exit.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "patient serve did not exit after SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 exchange with the daemon on a new connection: the status
/// and the JSON body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| "no answer in 30 s".to_owned())?
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, value))
}

async fn task(addr: SocketAddr, id: &str) -> Value {
    let (status, task) = call(addr, "GET", &format!("/v1/tasks/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{task}");
    task
}

/// Polls the task until `done` holds; panics with its last state after 20 s.
async fn wait_task(addr: SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = task(addr, id).await;
        if done(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting on {t:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn is_finished(task: &Value) -> bool {
    matches!(task["state"].as_str(), Some("completed" | "failed"))
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A webhook delivery: its `webhook-id` and body.
#[derive(Clone)]
struct Delivery {
    id: String,
    body: Value,
}

/// A webhook receiver on `127.0.0.1:0` that checks each Standard Webhooks
/// signature (with `ring` directly) and records the deliveries.
async fn receiver() -> Hook {
    #[derive(Clone)]
    struct Shared {
        got: Arc<Mutex<Vec<Delivery>>>,
        bad: Arc<AtomicUsize>,
        arrived: Arc<Mutex<Vec<Delivery>>>,
    }
    async fn receive(
        State(shared): State<Shared>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (id, timestamp, signature) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let key = STANDARD.decode(&SECRET["whsec_".len()..]).unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let signed = [id.as_bytes(), b".", timestamp.as_bytes(), b".", &body].concat();
        let valid = signature.split(' ').any(|s| {
            s.strip_prefix("v1,")
                .and_then(|b| STANDARD.decode(b).ok())
                .is_some_and(|tag| ring::hmac::verify(&key, &signed, &tag).is_ok())
        });
        if !valid {
            shared.bad.fetch_add(1, Ordering::SeqCst);
            return StatusCode::BAD_REQUEST;
        }
        let Ok(body) = serde_json::from_slice(&body) else {
            shared.bad.fetch_add(1, Ordering::SeqCst);
            return StatusCode::BAD_REQUEST;
        };
        let delivery = Delivery { id, body };
        shared.arrived.lock().unwrap().push(delivery.clone());
        // A slow receiver: some deliveries are in flight when the daemon
        // is killed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        shared.got.lock().unwrap().push(delivery);
        StatusCode::OK
    }
    let shared = Shared {
        got: Arc::new(Mutex::new(Vec::new())),
        bad: Arc::new(AtomicUsize::new(0)),
        arrived: Arc::new(Mutex::new(Vec::new())),
    };
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Hook {
        url,
        got: shared.got,
        bad: shared.bad,
        arrived: shared.arrived,
    }
}

/// The webhook receiver of a test.
struct Hook {
    /// Its URL.
    url: String,
    /// The deliveries it answered 200, in order.
    got: Arc<Mutex<Vec<Delivery>>>,
    /// Deliveries whose signature did not verify.
    bad: Arc<AtomicUsize>,
    /// The deliveries that arrived with a valid signature, answered or not
    /// (a delivery cut off by a crash arrives but is not answered).
    arrived: Arc<Mutex<Vec<Delivery>>>,
}

const TASKS: usize = 1000;
/// Submits from this index on wait until the killer is about to kill.
const GATED_FROM: usize = 600;
const CLIENTS: usize = 16;

fn submit_body(i: usize, upstream: &Upstream, hook: &str) -> Value {
    json!({
        "request": {"http_method": "get", "url": upstream.url(&format!("/delay?ms=200&i={i}"))},
        "callback": "CrashCallback",
        "callback_args": {"i": i},
        "idempotency_key": format!("crash-{i}"),
        "deliver": {"webhook": {"url": hook}},
    })
}

#[test]
fn kill_9_mid_run_then_a_restart_gives_every_acknowledged_task_one_outcome_and_its_delivery() {
    let rt = runtime();
    let dir = TempDir::new("crash");
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let upstream = Arc::new(upstream);
    let Hook {
        url: hook,
        got: deliveries,
        bad: bad_signatures,
        arrived,
    } = rt.block_on(receiver());
    let serve = Arc::new(Mutex::new(Serve::start(dir.path(), &[])));
    let addr = serve.lock().unwrap().addr;

    // Phase 1: 16 clients submit 1,000 tasks; the daemon is killed once 400
    // have been acknowledged and deliveries have begun: tasks are being
    // submitted, run and delivered. Submits past the 600th wait for the
    // killer's gate, which opens a moment before the kill, so the kill
    // always lands while submits are in flight, however fast the daemon.
    let acked: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let killed_after = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (acked, next, upstream, hook) = (
                Arc::clone(&acked),
                Arc::clone(&next),
                Arc::clone(&upstream),
                hook.clone(),
            );
            let mut gate = gate.clone();
            clients.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= TASKS {
                        break;
                    }
                    if i >= GATED_FROM {
                        gate.wait_for(|open| *open).await.unwrap();
                    }
                    let body = submit_body(i, &upstream, &hook);
                    if let Ok((status, task)) = call(addr, "POST", "/v1/tasks", Some(&body)).await {
                        assert!(status == 201 || status == 200, "{status} {task}");
                        acked
                            .lock()
                            .unwrap()
                            .insert(i, task["id"].as_str().unwrap().to_owned());
                    }
                }
            }));
        }
        let killer = {
            let (acked, serve, arrived) =
                (Arc::clone(&acked), Arc::clone(&serve), Arc::clone(&arrived));
            tokio::spawn(async move {
                wait_until("400 acknowledged submits and deliveries", || {
                    acked.lock().unwrap().len() >= 400 && arrived.lock().unwrap().len() >= 20
                })
                .await;
                open_gate.send_replace(true);
                tokio::time::sleep(Duration::from_millis(20)).await;
                serve.lock().unwrap().kill_9();
                acked.lock().unwrap().len()
            })
        };
        for client in clients {
            client.await.unwrap();
        }
        killer.await.unwrap()
    });
    let acknowledged = acked.lock().unwrap().clone();
    assert!(
        (400..TASKS).contains(&acknowledged.len()),
        "killed mid-way: {} acknowledged ({killed_after} when killed)",
        acknowledged.len()
    );
    let delivered_before = deliveries.lock().unwrap().len();
    let arrived_before = arrived.lock().unwrap().len();
    let restarted = Instant::now();
    let sent_before = upstream.requests_to("/delay");

    // Phase 2: restart on the same data directory; the clients submit what
    // was not acknowledged again, under the same idempotency keys.
    let serve = Serve::start(dir.path(), &[]);
    let addr = serve.addr;
    let mut ids = acknowledged.clone();
    rt.block_on(async {
        for i in 0..TASKS {
            if ids.contains_key(&i) {
                continue;
            }
            let (status, task) = call(
                addr,
                "POST",
                "/v1/tasks",
                Some(&submit_body(i, &upstream, &hook)),
            )
            .await
            .unwrap();
            // 200: the first submit was committed, its answer lost in the kill.
            assert!(status == 201 || status == 200, "{status} {task}");
            ids.insert(i, task["id"].as_str().unwrap().to_owned());
        }
    });

    // Every task finishes and is delivered.
    let tasks: Vec<Value> = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let (status, page) = call(addr, "GET", "/v1/tasks?limit=1000", None)
                .await
                .unwrap();
            assert_eq!(status, 200);
            let tasks = page["tasks"].as_array().unwrap().clone();
            let settled = tasks.len() == TASKS
                && tasks
                    .iter()
                    .all(|t| is_finished(t) && t["delivery"]["state"] == "delivered");
            if settled {
                return tasks;
            }
            if Instant::now() > deadline {
                let stuck: Vec<String> = tasks
                    .iter()
                    .filter(|t| !(is_finished(t) && t["delivery"]["state"] == "delivered"))
                    .take(5)
                    .map(|t| format!("{} {} {}", t["id"], t["state"], t["delivery"]))
                    .collect();
                panic!(
                    "{} tasks listed, not all finished and delivered: {stuck:#?}\n{}",
                    tasks.len(),
                    serve.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let settled_after = restarted.elapsed();
    // The work a crash left is taken up at the next start (SQLite), not
    // after its lease (30 s) runs out.
    assert!(
        settled_after < Duration::from_secs(20),
        "settled {settled_after:?} after the restart"
    );

    // One task per submit: no duplicate from a resubmit, none lost.
    let by_id: HashMap<&str, &Value> = tasks
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), t))
        .collect();
    assert_eq!(by_id.len(), TASKS);
    let distinct: BTreeSet<&String> = ids.values().collect();
    assert_eq!(distinct.len(), TASKS, "one task per idempotency key");
    for (i, id) in &ids {
        let t = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("task {id} of submit {i} is not stored"));
        assert_eq!(t["state"], "completed", "{t:#}");
        assert_eq!(t["callback_args"], json!({"i": i}));
        let outcome = &t["outcome"];
        assert_eq!(outcome["type"], "task.completed");
        assert_eq!(outcome["task_id"], id.as_str());
        assert_eq!(outcome["response"]["status"], 200);
    }

    // Exactly one outcome each: every delivery of a task carries the same
    // webhook-id and the stored outcome.
    let got = deliveries.lock().unwrap().clone();
    assert_eq!(
        bad_signatures.load(Ordering::SeqCst),
        0,
        "every signature verifies"
    );
    for d in &got {
        let event = &d.body["data"];
        let task_id = event["task_id"].as_str().unwrap();
        let t = by_id
            .get(task_id)
            .unwrap_or_else(|| panic!("a delivery for an unknown task {task_id}"));
        assert_eq!(
            event, &t["outcome"],
            "the delivery carries the stored outcome"
        );
    }
    let answered: BTreeSet<&str> = got
        .iter()
        .map(|d| d.body["data"]["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(answered.len(), TASKS, "every task's outcome was delivered");
    // Those cut off by the kill included, whatever arrived for a task
    // carries one webhook-id.
    let mut webhook_ids: HashMap<String, BTreeSet<String>> = HashMap::new();
    for d in arrived.lock().unwrap().iter() {
        let task_id = d.body["data"]["task_id"].as_str().unwrap().to_owned();
        webhook_ids.entry(task_id).or_default().insert(d.id.clone());
    }
    for (task_id, ids) in &webhook_ids {
        assert_eq!(ids.len(), 1, "task {task_id} has one outcome: {ids:?}");
    }
    let resent = arrived.lock().unwrap().len() - got.len();
    assert!(
        upstream.requests_to("/delay") >= TASKS as u64,
        "every task ran: {} requests",
        upstream.requests_to("/delay")
    );
    eprintln!(
        "kill -9 after {killed_after} acknowledged submits ({} by the end of phase 1, {arrived_before} deliveries arrived, {delivered_before} answered, {sent_before} requests sent); {} deliveries answered in all, {resent} cut off and sent again; settled {:?} after the restart",
        acknowledged.len(),
        got.len(),
        settled_after
    );
}

#[test]
fn a_request_caught_in_flight_by_kill_9_is_interrupted_unless_it_may_be_sent_again() {
    let rt = runtime();
    let dir = TempDir::new("interrupted");
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let mut serve = Serve::start(dir.path(), &[]);
    let addr = serve.addr;
    // The upstream holds the first request of each key for a minute and
    // answers the next at once.
    let held = |key: &str| upstream.url(&format!("/sequence?key={key}&delays=60000,0"));
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for request in [
            json!({"http_method": "post", "url": held("post"), "body": {"encoding": "text", "value": "charge", "charset": "UTF-8"}}),
            json!({"http_method": "get", "url": held("get")}),
            json!({"http_method": "post", "url": held("keyed"), "options": {"idempotency_key": "charge-7"}}),
            json!({"http_method": "post", "url": held("unsafe"), "options": {"retry": {"retry_unsafe": true}}}),
        ] {
            let (status, task) = call(addr, "POST", "/v1/tasks", Some(&json!({"request": request})))
                .await
                .unwrap();
            assert_eq!(status, 201, "{task}");
            ids.push(task["id"].as_str().unwrap().to_owned());
        }
        for key in ["post", "get", "keyed", "unsafe"] {
            wait_until("the upstream to hold every request", || upstream.sequence_count(key) == 1).await;
        }
        ids
    });
    serve.kill_9();

    let serve = Serve::start(dir.path(), &[]);
    let addr = serve.addr;
    rt.block_on(async {
        let post = wait_task(addr, &ids[0], is_finished).await;
        assert_eq!(post["state"], "failed", "{post:#}");
        let error = &post["outcome"]["error"];
        assert_eq!(error["class_name"], "Interrupted", "{error}");
        assert_eq!(error["http_method"], "post");
        assert_eq!(error["url"], held("post"));
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(post["outcome"]["type"], "task.failed");

        for id in &ids[1..] {
            let t = wait_task(addr, id, is_finished).await;
            assert_eq!(t["state"], "completed", "run again: {t:#}");
            assert_eq!(t["outcome"]["response"]["status"], 200);
        }
        // Give a wrongly re-sent POST the time to arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    assert_eq!(
        upstream.sequence_count("post"),
        1,
        "the POST was never sent twice"
    );
    for key in ["get", "keyed", "unsafe"] {
        assert_eq!(upstream.sequence_count(key), 2, "{key} was sent again");
    }
    let post = rt.block_on(task(addr, &ids[0]));
    assert_eq!(post["state"], "failed", "still interrupted: {post:#}");
}

#[test]
fn sigterm_lets_attempts_finish_up_to_the_timeout_releases_the_rest_and_exits_0() {
    let rt = runtime();
    let dir = TempDir::new("sigterm");
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let mut serve = Serve::start(dir.path(), &[("PATIENT_SHUTDOWN_TIMEOUT", "2")]);
    let addr = serve.addr;
    let (short, long, later) = rt.block_on(async {
        let submit = |body: Value| async move {
            let (status, task) = call(addr, "POST", "/v1/tasks", Some(&body)).await.unwrap();
            assert_eq!(status, 201, "{task}");
            task["id"].as_str().unwrap().to_owned()
        };
        // Answers after 1 s: within the shutdown timeout.
        let short = submit(json!({"request": {"http_method": "get",
            "url": upstream.url("/sequence?key=short&delays=1000")}}))
        .await;
        // Held for 30 s the first time: past it.
        let long = submit(json!({"request": {"http_method": "get",
            "url": upstream.url("/sequence?key=long&delays=30000,0")}}))
        .await;
        // Not due yet.
        let later = submit(json!({"request": {"http_method": "get",
            "url": upstream.url("/sequence?key=later")}, "delay": 5}))
        .await;
        wait_until("both requests in flight", || {
            upstream.sequence_count("short") == 1 && upstream.sequence_count("long") == 1
        })
        .await;
        (short, long, later)
    });
    let (status, took) = serve.terminate();
    assert_eq!(status.code(), Some(0), "exit 0 on SIGTERM: {}", serve.log());
    assert!(
        took < Duration::from_millis(4000),
        "stopped within the shutdown timeout (2 s): {took:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "waited for the attempt in flight: {took:?}"
    );
    assert_eq!(upstream.sequence_count("later"), 0);

    // As the store has them: the short one finished during the stop, the
    // long one released to the queue, the delayed one untouched.
    rt.block_on(async {
        let db = patient_daemon::db::Db::open(&format!(
            "sqlite://{}",
            dir.path().join("patient.db").display()
        ))
        .await
        .unwrap();
        let state = |id: String| {
            let db = db.clone();
            async move { db.get(&id).await.unwrap().unwrap().state.as_str() }
        };
        assert_eq!(state(short.clone()).await, "completed");
        assert_eq!(state(long.clone()).await, "queued", "released");
        assert_eq!(state(later.clone()).await, "scheduled");
    });

    let serve = Serve::start(dir.path(), &[]);
    let addr = serve.addr;
    rt.block_on(async {
        let s = task(addr, &short).await;
        assert_eq!(s["state"], "completed");
        assert_eq!(s["attempts"].as_array().unwrap().len(), 1);
        let l = wait_task(addr, &long, is_finished).await;
        assert_eq!(l["state"], "completed", "resumed on the next start: {l:#}");
        let d = wait_task(addr, &later, is_finished).await;
        assert_eq!(d["state"], "completed");
    });
    assert_eq!(
        upstream.sequence_count("short"),
        1,
        "finished, not run again"
    );
    assert_eq!(
        upstream.sequence_count("long"),
        2,
        "cut off, then run again"
    );
    assert_eq!(upstream.sequence_count("later"), 1);
}

#[test]
fn a_second_daemon_on_a_held_data_dir_refuses_to_start_and_a_killed_holder_blocks_nothing() {
    let rt = runtime();
    let dir = TempDir::new("lock");
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let mut first = Serve::start(dir.path(), &[]);
    let addr = first.addr;
    let pid = first.child.id().to_string();
    // A POST the upstream answers after 2 s: in flight on the first daemon
    // while the others try to start.
    let live = rt.block_on(async {
        let (status, task) = call(
            addr,
            "POST",
            "/v1/tasks",
            Some(&json!({"request": {"http_method": "post",
                "url": upstream.url("/sequence?key=live&delays=2000")}})),
        )
        .await
        .unwrap();
        assert_eq!(status, 201, "{task}");
        wait_until("the POST in flight", || {
            upstream.sequence_count("live") == 1
        })
        .await;
        task["id"].as_str().unwrap().to_owned()
    });

    // The same directory, however it is spelled, and the same database
    // named from another data_dir.
    let other = TempDir::new("lock-other");
    let link = other.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let database = format!("sqlite://{}", dir.path().join("patient.db").display());
    let dotted = dir.path().join(".");
    let elsewhere = other.path().join("data");
    let attempts: [(&Path, Vec<(&str, &str)>); 4] = [
        (dir.path(), vec![]),
        (&dotted, vec![]),
        (&link, vec![]),
        (
            &elsewhere,
            vec![("PATIENT_DATABASE_URL", database.as_str())],
        ),
    ];
    for (data_dir, env) in &attempts {
        let (status, stderr) = Serve::refused(data_dir, env);
        assert_eq!(status.code(), Some(1), "{}: {stderr}", data_dir.display());
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].contains(&dir.path().display().to_string()),
            "names the directory: {stderr}"
        );
        assert!(
            lines[0].contains(&pid),
            "names the holder's pid {pid}: {stderr}"
        );
    }

    // The first daemon's POST was left alone: its real answer stands.
    rt.block_on(async {
        let t = wait_task(addr, &live, is_finished).await;
        assert_eq!(t["state"], "completed", "{t:#}");
        assert_eq!(t["outcome"]["response"]["status"], 200, "{t:#}");
    });
    assert_eq!(upstream.sequence_count("live"), 1);

    // Killed, the holder leaves its lock file behind; it holds nothing.
    first.kill_9();
    let next = Serve::start(dir.path(), &[]);
    let t = rt.block_on(task(next.addr, &live));
    assert_eq!(t["state"], "completed");
    // And the new holder is the one named.
    let (status, stderr) = Serve::refused(dir.path(), &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&next.child.id().to_string()),
        "names the new holder: {stderr}"
    );
}

/// A fresh schema in the test PostgreSQL (`PATIENT_TEST_POSTGRES_URL`, from
/// `scripts/services.sh`) and the `database_url` that puts the queue in it;
/// `None` without one (a failure with `PATIENT_REQUIRE_SERVICES=1`).
async fn postgres_queue(label: &str) -> Option<String> {
    let Ok(url) = std::env::var("PATIENT_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "PATIENT_TEST_POSTGRES_URL is required (PATIENT_REQUIRE_SERVICES=1); start it with `eval \"$(scripts/services.sh start)\"`"
        );
        return None;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("serve_{label}_{}_{nanos}", std::process::id());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}options[search_path]={schema}"))
}

/// A counter of a daemon's `/metrics` text, summed over its labels.
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri("/metrics")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn nodes_on_one_postgres_queue_share_the_work_and_take_up_a_killed_nodes_tasks_once_its_lease_runs_out(
) {
    let rt = runtime();
    let Some(queue) = rt.block_on(postgres_queue("nodes")) else {
        return;
    };
    let upstream = Arc::new(rt.block_on(Upstream::start()).unwrap());
    let Hook {
        url: hook,
        got: deliveries,
        bad: bad_signatures,
        ..
    } = rt.block_on(receiver());
    let env = [
        ("PATIENT_DATABASE_URL", queue.as_str()),
        ("PATIENT_LEASE", "2"),
    ];
    let (dir_a, dir_b, dir_c) = (
        TempDir::new("node-a"),
        TempDir::new("node-b"),
        TempDir::new("node-c"),
    );
    let mut a = Serve::start(dir_a.path(), &env);
    let mut b = Serve::start(dir_b.path(), &env);

    // Phase 1: 300 tasks submitted to either node; both run them, each runs
    // once, and each outcome is delivered.
    const SHARED: usize = 300;
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..SHARED {
            let node = if i % 2 == 0 { a.addr } else { b.addr };
            let body = json!({
                "request": {"http_method": "get", "url": upstream.url(&format!("/delay?ms=20&i={i}"))},
                "callback": "NodeCallback",
                "callback_args": {"i": i},
                "deliver": {"webhook": {"url": hook}},
            });
            let (status, task) = call(node, "POST", "/v1/tasks", Some(&body)).await.unwrap();
            assert_eq!(status, 201, "{task}");
            ids.push(task["id"].as_str().unwrap().to_owned());
        }
        for id in &ids {
            wait_task(a.addr, id, |t| {
                is_finished(t) && t["delivery"]["state"] == "delivered"
            })
            .await;
        }
        ids
    });
    assert_eq!(
        upstream.requests_to("/delay"),
        SHARED as u64,
        "each task ran once"
    );
    let (ran_a, ran_b) = rt.block_on(async {
        (
            metric(a.addr, "patient_outcomes_total").await,
            metric(b.addr, "patient_outcomes_total").await,
        )
    });
    assert_eq!(ran_a + ran_b, SHARED as f64);
    assert!(
        ran_a > 0.0 && ran_b > 0.0,
        "both nodes ran tasks: {ran_a} and {ran_b}"
    );
    let delivered: BTreeSet<String> = deliveries
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.body["data"]["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(bad_signatures.load(Ordering::SeqCst), 0);

    // Phase 2: node B stops (SIGTERM, nothing held); node A takes ten GETs
    // and a POST that the upstream holds, and is killed with them in flight.
    let (status, _) = b.terminate();
    assert_eq!(status.code(), Some(0));
    let held = |key: &str| upstream.url(&format!("/sequence?key={key}&delays=60000,0"));
    let (gets, post) = rt.block_on(async {
        let mut gets = Vec::new();
        for i in 0..10 {
            let body = json!({
                "request": {"http_method": "get", "url": held(&format!("get-{i}"))},
                "callback": "NodeCallback",
            });
            let (status, task) = call(a.addr, "POST", "/v1/tasks", Some(&body))
                .await
                .unwrap();
            assert_eq!(status, 201, "{task}");
            gets.push(task["id"].as_str().unwrap().to_owned());
        }
        let body = json!({
            "request": {"http_method": "post", "url": held("post")},
            "callback": "NodeCallback",
        });
        let (status, task) = call(a.addr, "POST", "/v1/tasks", Some(&body))
            .await
            .unwrap();
        assert_eq!(status, 201, "{task}");
        let post = task["id"].as_str().unwrap().to_owned();
        wait_until("node A to hold all eleven requests", || {
            (0..10).all(|i| upstream.sequence_count(&format!("get-{i}")) == 1)
                && upstream.sequence_count("post") == 1
        })
        .await;
        (gets, post)
    });
    a.kill_9();

    // Node C starts at once: the tasks stay with the killed node until its
    // lease runs out (it may only be slow), then C takes them up: the GETs
    // run again, the POST, which may have reached the upstream, is finished
    // as Interrupted and not sent twice.
    let c = Serve::start(dir_c.path(), &env);
    rt.block_on(async {
        let t = task(c.addr, &gets[0]).await;
        assert_eq!(t["state"], "running", "held by node A's lease: {t:#}");
        for id in &gets {
            let t = wait_task(c.addr, id, is_finished).await;
            assert_eq!(t["state"], "completed", "{t:#}");
        }
        let p = wait_task(c.addr, &post, is_finished).await;
        assert_eq!(p["state"], "failed", "{p:#}");
        assert_eq!(p["outcome"]["error"]["class_name"], "Interrupted", "{p:#}");
    });
    for i in 0..10 {
        assert_eq!(
            upstream.sequence_count(&format!("get-{i}")),
            2,
            "get-{i} ran again"
        );
    }
    assert_eq!(
        upstream.sequence_count("post"),
        1,
        "the POST was not sent twice"
    );
    assert!(
        c.log().contains("lease ran out"),
        "node C says it took up the tasks: {}",
        c.log()
    );
}

#[test]
fn a_stopping_node_keeps_renewing_its_leases_while_its_attempts_drain() {
    let rt = runtime();
    let Some(queue) = rt.block_on(postgres_queue("drain")) else {
        return;
    };
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let env = [
        ("PATIENT_DATABASE_URL", queue.as_str()),
        ("PATIENT_LEASE", "1"),
        ("PATIENT_SHUTDOWN_TIMEOUT", "6"),
    ];
    let (dir_a, dir_b) = (TempDir::new("drain-a"), TempDir::new("drain-b"));
    let mut a = Serve::start(dir_a.path(), &env);
    // A GET answered after 3 s, three leases: node A holds it when it is
    // told to stop, and drains it.
    let id = rt.block_on(async {
        let body = json!({"request": {"http_method": "get",
            "url": upstream.url("/sequence?key=drain&delays=3000")}});
        let (status, task) = call(a.addr, "POST", "/v1/tasks", Some(&body))
            .await
            .unwrap();
        assert_eq!(status, 201, "{task}");
        wait_until("node A to send it", || {
            upstream.sequence_count("drain") == 1
        })
        .await;
        task["id"].as_str().unwrap().to_owned()
    });
    // Node B looks for expired leases every third of a second.
    let b = Serve::start(dir_b.path(), &env);
    let (status, took) = a.terminate();
    assert_eq!(status.code(), Some(0), "{}", a.log());
    assert!(took >= Duration::from_millis(1500), "drained: {took:?}");
    rt.block_on(async {
        let t = task(b.addr, &id).await;
        assert_eq!(t["state"], "completed", "node A finished it: {t:#}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    });
    assert_eq!(
        upstream.sequence_count("drain"),
        1,
        "node B did not take it up while node A still ran it: {}",
        b.log()
    );
}

#[test]
fn a_submit_on_one_node_wakes_the_other_nodes_at_once() {
    let rt = runtime();
    let Some(queue) = rt.block_on(postgres_queue("wake")) else {
        return;
    };
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let env = [("PATIENT_DATABASE_URL", queue.as_str())];
    let (dir_a, dir_b) = (TempDir::new("wake-a"), TempDir::new("wake-b"));
    // Node A runs one task at a time, and one holds it: whatever is
    // submitted to A has to be run by B.
    let a = Serve::start(dir_a.path(), &[env[0], ("PATIENT_MAX_IN_FLIGHT", "1")]);
    rt.block_on(async {
        let body = json!({"request": {"http_method": "get",
            "url": upstream.url("/sequence?key=busy&delays=60000")}});
        let (status, task) = call(a.addr, "POST", "/v1/tasks", Some(&body))
            .await
            .unwrap();
        assert_eq!(status, 201, "{task}");
        wait_until("node A busy", || upstream.sequence_count("busy") == 1).await;
    });
    let b = Serve::start(dir_b.path(), &env);
    // B's claim loop polls an idle queue once a second: picked up well
    // within that every time, B was woken by the submit.
    let latencies: Vec<Duration> = rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut latencies = Vec::new();
        for i in 0..6u64 {
            // Submits at different points of B's polling period.
            tokio::time::sleep(Duration::from_millis(150 + i * 173 % 500)).await;
            let key = format!("wake-{i}");
            let body = json!({"request": {"http_method": "get",
                "url": upstream.url(&format!("/sequence?key={key}"))}});
            let (status, task) = call(a.addr, "POST", "/v1/tasks", Some(&body))
                .await
                .unwrap();
            assert_eq!(status, 201, "{task}");
            let submitted = Instant::now();
            while upstream.sequence_count(&key) == 0 {
                assert!(
                    submitted.elapsed() < Duration::from_secs(5),
                    "{key} was never run: {}",
                    b.log()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            latencies.push(submitted.elapsed());
        }
        latencies
    });
    assert!(
        latencies.iter().all(|l| *l < Duration::from_millis(400)),
        "node B was not woken by the submits on node A: {latencies:?}"
    );
    drop(a);
}

/// One GET on a new connection: the status and the body as text.
async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn sighup_reloads_the_routes_without_dropping_a_stream_in_flight() {
    let rt = runtime();
    let dir = TempDir::new("sighup");
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let config = dir.path().join("patient.toml");
    let route = |prefix: &str| {
        format!(
            "[[routes]]\nname = \"r\"\npath_prefix = \"{prefix}\"\nstrip_prefix = true\nupstreams = [\"http://{}\"]\n",
            upstream.addr()
        )
    };
    std::fs::write(&config, route("/a/")).unwrap();
    let config_arg = config.display().to_string();
    let serve = Serve::start_with(
        dir.path(),
        &["--config", &config_arg],
        &[("PATIENT_LOG", "info")],
    );
    let addr = serve.addr;
    let hup = || {
        let sent = Command::new("kill")
            .args(["-HUP", &serve.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    rt.block_on(async {
        assert_eq!(get_text(addr, "/a/fast").await.0, 200);
        assert_eq!(get_text(addr, "/b/fast").await.0, 404);
        // A stream through /a/ stays open across the reload.
        let feed = upstream.feed("held");
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/a/feed?key=held&content-type=text/event-stream")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut body = sender.send_request(request).await.unwrap().into_body();
        assert!(feed.send("data: before\n\n").await);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: before\n\n");

        std::fs::write(&config, route("/b/")).unwrap();
        hup();
        wait_until("the routes to be reloaded", || {
            serve.log().contains("routes reloaded")
        })
        .await;
        assert_eq!(get_text(addr, "/b/fast").await.0, 200);
        assert_eq!(
            get_text(addr, "/a/fast").await.0,
            404,
            "the old route is gone"
        );
        assert!(
            feed.send("data: after\n\n").await,
            "the stream in flight goes on"
        );
        let next = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(next, "data: after\n\n");
        drop(feed);

        // A bad file: the routes stay as they were, the log says why.
        std::fs::write(
            &config,
            "[[routes]]\nname = \"r\"\npath_prefix = \"nope\"\nupstreams = []\n",
        )
        .unwrap();
        hup();
        wait_until("the failed reload to be logged", || {
            serve.log().contains("cannot reload the routes")
        })
        .await;
        assert!(
            serve.log().contains("routes[0].path_prefix"),
            "{}",
            serve.log()
        );
        assert_eq!(get_text(addr, "/b/fast").await.0, 200);
    });
}

/// A flood of half-sent requests against a daemon whose open-files limit is
/// 256: the connection cap (half the limit by default) closes the one that
/// waited longest for its head, so `/healthz` still answers at once.
#[test]
fn half_sent_requests_under_a_low_open_files_limit_do_not_lock_out_real_clients() {
    let dir = TempDir::new("fd-limit");
    let mut serve = Serve::start_wrapped(
        &["prlimit", "--nofile=256:256", "--"],
        dir.path(),
        &[],
        &[("PATIENT_HEADER_TIMEOUT", "600")],
    );
    let addr = serve.addr;
    runtime().block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut held = Vec::new();
        for _ in 0..300 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half:")
                .await
                .unwrap();
            held.push(stream);
        }
        for _ in 0..5 {
            let answered =
                tokio::time::timeout(Duration::from_secs(5), call(addr, "GET", "/healthz", None))
                    .await
                    .expect("/healthz answers within 5 s while 300 half-sent requests are held");
            assert_eq!(answered.unwrap().0, 200);
        }
        drop(held);
    });
    let (status, _) = serve.terminate();
    assert!(status.success(), "{}", serve.log());
}
