//! `DaemonClient::from_env` reads `PATIENT_URL` and `PATIENT_API_TOKEN`.
//! One test in its own binary: it changes the process environment.

mod common;

use common::Daemon;
use patient_client::{DaemonClient, Submit, DEFAULT_URL, TOKEN_ENV, URL_ENV};
use patient_testkit::Upstream;
use patient_wire::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_env_reads_the_url_and_the_token() {
    let up = Upstream::start().await.unwrap();
    let daemon = Daemon::start(|s| s.api_token = Some("env-token".into())).await;

    std::env::remove_var(URL_ENV);
    std::env::remove_var(TOKEN_ENV);
    let client = DaemonClient::from_env().unwrap();
    assert_eq!(client.base_url().as_str(), format!("{DEFAULT_URL}/"));

    std::env::set_var(URL_ENV, &daemon.url);
    let anonymous = DaemonClient::from_env().unwrap();
    let error = anonymous.get("tsk_x").await.unwrap_err();
    assert!(error.is_unauthorized(), "{error}");

    // An empty token is no token.
    std::env::set_var(TOKEN_ENV, "");
    let error = DaemonClient::from_env()
        .unwrap()
        .get("tsk_x")
        .await
        .unwrap_err();
    assert!(error.is_unauthorized(), "{error}");

    std::env::set_var(TOKEN_ENV, "env-token");
    let client = DaemonClient::from_env().unwrap();
    let request = Request::get(up.url("/fast")).build().unwrap();
    let task = client.submit(&Submit::new(request)).await.unwrap();
    assert_eq!(client.wait(&task.id, None).await.unwrap().id, task.id);

    std::env::set_var(URL_ENV, "ftp://127.0.0.1:8750");
    let error = DaemonClient::from_env().unwrap_err();
    assert_eq!(error.field(), Some("base_url"));
    std::env::remove_var(URL_ENV);
    std::env::remove_var(TOKEN_ENV);
    daemon.stop().await;
}
