//! Who may call, tried the way a web page in the operator's browser and a
//! careless submitter would: cross-site scripts and forms, a body without
//! `Content-Type`, a rebinding host name, and a secret sent where its
//! owner never allowed.

mod common;

use std::sync::Arc;

use common::{call, get_request, Daemon, TempDir};
use patient_testkit::Upstream;
use serde_json::{json, Value};

fn body(value: &Value) -> Option<Vec<u8>> {
    Some(value.to_string().into_bytes())
}

#[tokio::test]
async fn a_cross_site_page_can_neither_submit_nor_cancel_nor_read() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let url = |path: &str| format!("{}{path}", daemon.url);
    let submit = get_request(&upstream.url("/delay?ms=5000"));

    // A no-cors fetch of a Blob: no Content-Type at all, or text/plain.
    for headers in [vec![], vec![("content-type", "text/plain;charset=UTF-8")]] {
        call("POST", &url("/v1/tasks"), &headers, body(&submit))
            .await
            .assert_error(415, "unsupported_media_type");
    }
    // A script on another origin, with the right content type.
    call(
        "POST",
        &url("/v1/tasks"),
        &[
            ("content-type", "application/json"),
            ("origin", "http://evil.example"),
        ],
        body(&submit),
    )
    .await
    .assert_error(403, "forbidden");
    assert_eq!(daemon.get("/v1/tasks").await.json()["tasks"], json!([]));

    // A cross-site form posting to cancel.
    let task = daemon.submit(&submit).await;
    let id = task["id"].as_str().unwrap();
    for origin in ["http://evil.example", "null"] {
        call(
            "POST",
            &url(&format!("/v1/tasks/{id}/cancel")),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", origin),
            ],
            Some(b"x=1".to_vec()),
        )
        .await
        .assert_error(403, "forbidden");
    }
    // Without an Origin, a form body is still not JSON.
    call(
        "POST",
        &url(&format!("/v1/tasks/{id}/cancel")),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(b"x=1".to_vec()),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    assert_ne!(daemon.task(id).await["state"], "cancelled");

    // A script reading the task list from another origin.
    call(
        "GET",
        &url("/v1/tasks"),
        &[("origin", "http://evil.example")],
        None,
    )
    .await
    .assert_error(403, "forbidden");

    // The daemon's own page (same origin) may.
    let own = daemon.url.clone();
    let reply = call(
        "POST",
        &url(&format!("/v1/tasks/{id}/cancel")),
        &[("origin", own.as_str())],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "cancelled");
}

#[tokio::test]
async fn a_rebinding_host_name_is_refused_unless_allowed() {
    let daemon = Daemon::start(&[]).await;
    let port = daemon.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("{}/v1/tasks", daemon.url);
    for host in [
        format!("attacker.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "localhost.attacker.example".to_owned(),
    ] {
        call("GET", &url, &[("host", host.as_str())], None)
            .await
            .assert_error(403, "forbidden");
        // Health needs no token, yet answers only its own names too.
        call(
            "GET",
            &format!("{}/healthz", daemon.url),
            &[("host", host.as_str())],
            None,
        )
        .await
        .assert_error(403, "forbidden");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "LocalHost".to_owned(),
    ] {
        let reply = call("GET", &url, &[("host", host.as_str())], None).await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
    }
    drop(daemon);

    let daemon = Daemon::start(&[(
        "PATIENT_ALLOWED_HOSTS",
        "patient.internal, *.corp.example, 127.0.0.1",
    )])
    .await;
    let url = format!("{}/v1/tasks", daemon.url);
    for (host, status) in [
        ("patient.internal", 200),
        ("q.corp.example:8750", 200),
        ("corp.example", 403),
        ("localhost", 403),
    ] {
        let reply = call("GET", &url, &[("host", host)], None).await;
        assert_eq!(reply.status, status, "{host}: {}", reply.text());
    }
    let any = Daemon::start(&[("PATIENT_ALLOWED_HOSTS", "*")]).await;
    let reply = call(
        "GET",
        &format!("{}/v1/tasks", any.url),
        &[("host", "whatever.example")],
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_secret_goes_only_to_the_hosts_its_owner_listed() {
    let upstream = Upstream::start().await.unwrap();
    let dir = Arc::new(TempDir::new("secrets"));
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-live-123\n").unwrap();
    let config = format!(
        "[secrets.listed]\nfile = {key:?}\nhosts = [\"127.0.0.1\"]\n\n[secrets.unlisted]\nfile = {key:?}\n",
        key = key_file.display().to_string()
    );
    let daemon = Daemon::start_with_config(&config, &[]).await;
    let with_secret = |url: String, name: &str| {
        json!({"request": {"http_method": "get", "url": url,
            "headers": {"authorization": {"$secret": name}}}})
    };

    // To a listed host: sent.
    let task = daemon
        .submit(&with_secret(upstream.url("/echo?listed"), "listed"))
        .await;
    let done = daemon.wait_finished(task["id"].as_str().unwrap()).await;
    let echoed: Value = serde_json::from_str(
        done["outcome"]["response"]["body"]["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        echoed["headers"]["authorization"], "sk-live-123",
        "{echoed}"
    );

    // To any other host: refused at submit, naming the field and the secret.
    let other = format!("http://localhost:{}/echo", upstream.addr().port());
    let error = daemon
        .post("/v1/tasks", &with_secret(other, "listed"))
        .await
        .assert_error(422, "invalid_request");
    assert_eq!(error["field"], "request.headers.authorization");
    assert!(
        error["message"].as_str().unwrap().contains("\"listed\""),
        "{error}"
    );

    // A secret without hosts serves no submitted task at all.
    let error = daemon
        .post("/v1/tasks", &with_secret(upstream.url("/echo"), "unlisted"))
        .await
        .assert_error(422, "invalid_request");
    assert!(
        error["message"].as_str().unwrap().contains("\"unlisted\""),
        "{error}"
    );

    // A secret query parameter follows the same rule.
    let error = daemon
        .post(
            "/v1/tasks",
            &json!({"request": {"http_method": "get",
                "url": format!("http://localhost:{}/echo", upstream.addr().port()),
                "secret_params": {"key": {"$secret": "listed"}}}}),
        )
        .await
        .assert_error(422, "invalid_request");
    assert_eq!(error["field"], "request.params.key");
}

#[tokio::test]
async fn proxy_routes_answer_only_their_own_hosts_and_origin_too() {
    let upstream = Upstream::start().await.unwrap();
    let config = format!(
        "[[routes]]\nname = \"open\"\npath_prefix = \"/open/\"\nstrip_prefix = true\nupstreams = [\"http://{}\"]\n",
        upstream.addr()
    );
    let daemon = Daemon::start_with_config(&config, &[]).await;
    let port = daemon.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("{}/open/echo", daemon.url);
    // A page on a rebinding name, or a script on another origin, reaches
    // nothing behind a route with auth = "none".
    let rebinding = format!("attacker.example:{port}");
    call("GET", &url, &[("host", rebinding.as_str())], None)
        .await
        .assert_error(403, "forbidden");
    call("GET", &url, &[("origin", "http://evil.example")], None)
        .await
        .assert_error(403, "forbidden");
    assert_eq!(upstream.requests_to("/echo"), 0);
    let reply = call("GET", &url, &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.requests_to("/echo"), 1);
}
