//! The daemon, started in the test process on `127.0.0.1:0` with a
//! temporary data directory, the egress guard letting `127.0.0.1` through
//! and short retry backoffs.

#![allow(dead_code, unreachable_pub)]

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use patient_daemon::{settings::EgressSettings, ServeError, Settings};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "patient-client-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon; stopped (and its data removed) on drop.
pub struct Daemon {
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: TempDir,
}

impl Daemon {
    /// Starts a daemon on the current runtime with the test settings, then
    /// `configure`'s changes.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Daemon {
        let dir = TempDir::new("daemon");
        let mut settings = Settings {
            data_dir: dir.path().to_path_buf(),
            egress: EgressSettings {
                allow: vec!["127.0.0.1".into()],
            },
            shutdown_timeout: 1.0,
            ..Settings::default()
        };
        settings.retry.base_delay = 0.05;
        settings.retry.max_delay = 0.2;
        configure(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let handle = tokio::spawn(patient_daemon::run_until(settings, listener, async move {
            let _ = stop.await;
        }));
        Daemon {
            url: format!("http://{addr}"),
            shutdown: Some(shutdown),
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Stops the daemon and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The JSON body of a plain `GET`, read with the transport directly (not
/// with the client under test).
pub async fn raw_get(url: &str, token: Option<&str>) -> (u16, Value) {
    use patient_http::client::{ClientConfig, HttpClient, OutgoingRequest};
    let client = HttpClient::new(ClientConfig::default()).unwrap();
    let mut request = OutgoingRequest::new(http::Method::GET, url.parse().unwrap());
    if let Some(token) = token {
        request.headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
    }
    let response = client.send(request).await.unwrap();
    (
        response.status,
        serde_json::from_slice(&response.body).unwrap(),
    )
}

/// Polls `check` every 20 ms until it returns `Some`, for up to 10 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
