//! What the daemon's integration tests share: the real daemon started with
//! `run_until` on `127.0.0.1:0` over a temporary data directory, a small
//! HTTP/1.1 client, a real webhook receiver with a Standard Webhooks
//! verifier written here (not the daemon's), and waits with deadlines.
//!
//! Each test file uses part of it.

#![allow(dead_code, unreachable_pub)]

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use patient_daemon::{Flags, ServeError, Settings};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// The webhook signing secret of the test daemons: `whsec_` and the Base64
/// of the bytes 1 to 32.
pub const SECRET: &str = "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// How long a wait for the daemon gives up after.
pub const WAIT: Duration = Duration::from_secs(15);

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory whose name starts with `label`.
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "patient-daemon-test-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The settings every test daemon starts from, as `PATIENT_*` variables:
/// loopback allowed through the egress guard, the known webhook secret, and
/// short retry and delivery backoffs so that waits stay short.
pub fn base_env() -> BTreeMap<String, String> {
    [
        ("PATIENT_EGRESS__ALLOW", "127.0.0.1"),
        ("PATIENT_WEBHOOK_SECRET", SECRET),
        ("PATIENT_RETRY__BASE_DELAY", "0.05"),
        ("PATIENT_RETRY__MAX_DELAY", "0.2"),
        ("PATIENT_DELIVERY__BASE_DELAY", "0.1"),
        ("PATIENT_DELIVERY__MAX_DELAY", "0.4"),
        ("PATIENT_DELIVERY__TIMEOUT", "5"),
        ("PATIENT_SHUTDOWN_TIMEOUT", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The Redis server of `scripts/services.sh`, or `None` (with a notice)
/// when `PATIENT_TEST_REDIS_URL` is unset; with `PATIENT_REQUIRE_SERVICES=1`
/// a missing Redis fails the test instead.
pub fn redis_url() -> Option<String> {
    match std::env::var("PATIENT_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let hint = "start it with `eval \"$(scripts/services.sh start)\"`";
            if std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("Redis is required (PATIENT_REQUIRE_SERVICES=1) but PATIENT_TEST_REDIS_URL is not set; {hint}");
            }
            let _ = writeln!(
                std::io::stderr(),
                "notice: skipping a Redis delivery test: PATIENT_TEST_REDIS_URL is not set; {hint}"
            );
            None
        }
    }
}

/// A daemon running in this test's runtime.
pub struct Daemon {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The API token it was started with, sent on every call.
    pub token: Option<String>,
    /// The settings it runs with.
    pub settings: Settings,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<Result<(), ServeError>>>,
    dir: Arc<TempDir>,
}

impl Daemon {
    /// Starts a daemon on [`base_env`] with `overrides` on top (an empty
    /// value removes the variable: the setting keeps its default).
    pub async fn start(overrides: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(Arc::new(TempDir::new("serve")), overrides).await
    }

    /// Starts a daemon on the data directory `dir` (to restart one on the
    /// same store).
    pub async fn start_in(dir: Arc<TempDir>, overrides: &[(&str, &str)]) -> Daemon {
        Daemon::start_configured(dir, None, overrides).await
    }

    /// Starts a daemon with the settings file `config` (TOML text, written
    /// into the data directory) under the variables.
    pub async fn start_with_config(config: &str, overrides: &[(&str, &str)]) -> Daemon {
        let dir = Arc::new(TempDir::new("serve"));
        let path = dir.path().join("patient.toml");
        std::fs::write(&path, config).unwrap();
        Daemon::start_configured(dir, Some(&path), overrides).await
    }

    async fn start_configured(
        dir: Arc<TempDir>,
        config: Option<&Path>,
        overrides: &[(&str, &str)],
    ) -> Daemon {
        let mut env = base_env();
        for (k, v) in overrides {
            if v.is_empty() {
                env.remove(*k);
            } else {
                env.insert((*k).to_owned(), (*v).to_owned());
            }
        }
        let settings = Settings::load(
            config,
            env,
            &Flags {
                listen: Some("127.0.0.1:0".into()),
                data_dir: Some(dir.path().to_owned()),
            },
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(patient_daemon::run_until(
            settings.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        let daemon = Daemon {
            url,
            token: settings.api_token.clone(),
            settings,
            shutdown: Some(tx),
            served: Some(served),
            dir,
        };
        // The listener is bound before `run_until` opens the store: wait
        // until it answers.
        wait_for("the daemon to answer /healthz", WAIT, || async {
            match try_call("GET", &format!("{}/healthz", daemon.url), &[], None).await {
                Ok(reply) if reply.status == 200 => Some(()),
                _ => None,
            }
        })
        .await;
        daemon
    }

    /// Its data directory (shared with a restarted daemon).
    pub fn dir(&self) -> Arc<TempDir> {
        Arc::clone(&self.dir)
    }

    /// Stops it as a shutdown signal would, and returns how `run_until`
    /// ended.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.served.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the daemon stops")
            .expect("the daemon's task did not panic")
    }

    fn auth(&self) -> Vec<(String, String)> {
        self.token
            .iter()
            .map(|t| ("authorization".to_owned(), format!("Bearer {t}")))
            .collect()
    }

    /// A call to `path` with the daemon's token.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let mut headers = self.auth();
        if body.is_some() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        call(
            method,
            &format!("{}{path}", self.url),
            &headers,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(body)).await
    }

    /// Submits `body` and returns the task, asserting a `201`.
    pub async fn submit(&self, body: &Value) -> Value {
        let reply = self.post("/v1/tasks", body).await;
        assert_eq!(reply.status, 201, "submit {body}: {}", reply.text());
        reply.json()
    }

    /// The task `id`.
    pub async fn task(&self, id: &str) -> Value {
        let reply = self.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(reply.status, 200, "GET task {id}: {}", reply.text());
        reply.json()
    }

    /// Polls the task until `done` holds, and returns it; panics with the
    /// last state after [`WAIT`].
    pub async fn wait_task(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let task = self.task(id).await;
            if done(&task) {
                return task;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for task {id} to be {what}: {task:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls the task until it has finished (`completed`, `failed` or
    /// `cancelled`).
    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_task(id, "finished", |t| {
            matches!(
                t["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }

    /// Polls the task until its delivery is `state`.
    pub async fn wait_delivery(&self, id: &str, state: &str) -> Value {
        self.wait_task(id, &format!("delivery {state}"), |t| {
            t["delivery"]["state"] == state
        })
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A minimal submit body: `GET url`.
pub fn get_request(url: &str) -> Value {
    serde_json::json!({"request": {"http_method": "get", "url": url}})
}

/// An answer of an HTTP server.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// Asserts the contract's error shape with this status and code, and
    /// returns the error object.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "status: {}", self.text());
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "an error is JSON, not {content_type:?}: {}",
            self.text()
        );
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "code: {body}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a message: {body}"
        );
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error"], "only `error` at the top: {body}");
        error.clone()
    }
}

/// One HTTP/1.1 exchange on a new connection: `method url` with `headers`
/// and `body`; panics when the exchange fails.
pub async fn call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Reply {
    try_call(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// One HTTP/1.1 exchange on a new connection, or why it failed.
pub async fn try_call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Reply, String> {
    let url = url::Url::parse(url).map_err(|e| e.to_string())?;
    let authority = format!(
        "{}:{}",
        url.host_str().ok_or("no host")?,
        url.port_or_known_default().ok_or("no port")?
    );
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request = request.header("host", &authority);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| "no answer in 30 s".to_owned())?
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Calls `check` every 20 ms until it gives `Some`, for at most `timeout`;
/// panics naming `what` after.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
    /// The status the receiver answered.
    pub answered: u16,
}

impl Received {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    answers: Mutex<VecDeque<u16>>,
}

/// A real webhook receiver: an axum server on `127.0.0.1:0` that records
/// every request and answers the given statuses in order, then `200`.
pub struct Receiver {
    /// `http://127.0.0.1:PORT/hook`.
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver answering `answers` first.
    pub async fn start(answers: &[u16]) -> Receiver {
        let state = Arc::new(ReceiverState {
            received: Mutex::new(Vec::new()),
            answers: Mutex::new(answers.iter().copied().collect()),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            addr,
            state,
            server,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have arrived, and returns them all.
    pub async fn wait(&self, n: usize) -> Vec<Received> {
        wait_for(&format!("{n} webhook deliveries"), WAIT, || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let answered = state.answers.lock().unwrap().pop_front().unwrap_or(200);
    state.received.lock().unwrap().push(Received {
        headers,
        body,
        answered,
    });
    axum::http::StatusCode::from_u16(answered).unwrap()
}

/// Verifies a Standard Webhooks message as a receiver would, with `ring`
/// directly: the key is the Base64-decoded part of `secret` after `whsec_`,
/// the signed content `id.timestamp.body`, and one of the space-separated
/// `v1,<base64>` signatures must be the HMAC-SHA256 of it; the timestamp must
/// be within five minutes of now.
pub fn verify_webhook(secret: &str, message: &Received) -> Result<(), String> {
    use ring::hmac;
    let key = STANDARD
        .decode(
            secret
                .strip_prefix("whsec_")
                .ok_or("the secret has no whsec_ prefix")?,
        )
        .map_err(|e| format!("the secret is not Base64: {e}"))?;
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(format!("no {name} header"))
    };
    let id = header("webhook-id")?;
    let timestamp = header("webhook-timestamp")?;
    let signatures = header("webhook-signature")?;
    let seconds: i64 = timestamp
        .parse()
        .map_err(|_| format!("webhook-timestamp {timestamp:?} is not Unix seconds"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - seconds).abs() > 300 {
        return Err(format!(
            "webhook-timestamp {seconds} is not within 5 minutes of {now}"
        ));
    }
    let mut signed = Vec::new();
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(&message.body);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
    for signature in signatures.split(' ') {
        let Some(encoded) = signature.strip_prefix("v1,") else {
            continue;
        };
        let Ok(tag) = STANDARD.decode(encoded) else {
            continue;
        };
        if hmac::verify(&key, &signed, &tag).is_ok() {
            return Ok(());
        }
    }
    Err(format!("no valid v1 signature in {signatures:?}"))
}
