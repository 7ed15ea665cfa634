//! The egress guard, vector by vector, all on loopback: literal refused
//! addresses at submit, a name that resolves to one, a redirect to one, and
//! webhook URLs. No packet leaves the machine: every literal this file
//! submits is refused before anything runs, and each submit is delayed an
//! hour so that even a guard that let one through could not send it before
//! the test fails and stops the daemon.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use common::{Daemon, Receiver};
use patient_testkit::{Upstream, UpstreamOptions};
use serde_json::{json, Value};

/// A listener that counts the connections it accepts and answers none.
struct Trap {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn bind(ip: &str) -> Trap {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Trap {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The request error of a failed task's outcome.
fn request_error(task: &Value) -> &Value {
    assert_eq!(task["state"], "failed", "{task:#}");
    let error = &task["outcome"]["error"];
    assert!(error.is_object(), "{task:#}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_refused_literal_is_refused_at_submit() {
    // No egress.allow: loopback is refused too.
    let daemon = Daemon::start(&[("PATIENT_EGRESS__ALLOW", "")]).await;
    let trap = Trap::bind("127.0.0.1").await;
    let port = trap.addr.port();
    let urls = [
        format!("http://127.0.0.1:{port}/"),
        format!("http://127.0.0.2:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f000001:{port}/"),
        format!("http://0x7f.0.0.1:{port}/"),
        format!("http://0177.0.0.1:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::ffff:7f00:1]:{port}/"),
        format!("http://[0:0:0:0:0:ffff:7f00:0001]:{port}/"),
        format!("http://0.0.0.0:{port}/"),
        format!("http://0:{port}/"),
        format!("http://[::]:{port}/"),
        "http://10.0.0.1/".into(),
        "http://10.255.255.255/".into(),
        "http://172.16.0.1/".into(),
        "http://172.31.255.254/".into(),
        "http://192.168.0.1/".into(),
        "http://3232235521/".into(), // 192.168.0.1
        "http://100.64.0.1/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://2852039166/latest/meta-data/".into(), // 169.254.169.254
        "http://0xa9fea9fe/".into(),                  // 169.254.169.254
        "http://0xa9.0xfe.0xa9.0xfe/".into(),
        "http://[::ffff:169.254.169.254]/".into(),
        "http://[::ffff:a9fe:a9fe]/".into(),
        "http://[64:ff9b::a9fe:a9fe]/".into(),
        "http://[fd00:ec2::254]/".into(),
        "http://[fc00::1]/".into(),
        "http://[fe80::1]/".into(),
        "http://224.0.0.1/".into(),
        "http://[ff02::1]/".into(),
        "http://255.255.255.255/".into(),
        "https://[::ffff:10.0.0.1]/".into(),
    ];
    let mut accepted = Vec::new();
    for url in &urls {
        let reply = daemon
            .post(
                "/v1/tasks",
                &json!({"request": {"http_method": "get", "url": url}, "delay": 3600}),
            )
            .await;
        if reply.status != 422 {
            // Never run it: cancel at once (it waits an hour anyway).
            if let Some(id) = reply.json()["id"].as_str() {
                daemon
                    .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
                    .await;
            }
            accepted.push(format!("{url} -> {} {}", reply.status, reply.text()));
            continue;
        }
        let error = reply.assert_error(422, "egress_denied");
        assert_eq!(error["field"], "request.url", "{url}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("refused by the egress guard"),
            "{url}: {message}"
        );
    }
    assert!(
        accepted.is_empty(),
        "accepted refused addresses:\n{}",
        accepted.join("\n")
    );

    // The message names the address as it really is, whatever the spelling.
    let reply = daemon
        .post(
            "/v1/tasks",
            &json!({"request": {"http_method": "get", "url": "http://2852039166/"}, "delay": 3600}),
        )
        .await;
    let error = reply.assert_error(422, "egress_denied");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("169.254.169.254"),
        "{error}"
    );

    // Webhook URLs too.
    for url in [
        "http://169.254.169.254/hook",
        "http://[::1]:9/hook",
        "http://0x0a000001/hook",
    ] {
        let reply = daemon
            .post(
                "/v1/tasks",
                &json!({"request": {"http_method": "get", "url": "http://localhost:9/"},
                        "deliver": {"webhook": {"url": url}}, "delay": 3600}),
            )
            .await;
        let error = reply.assert_error(422, "egress_denied");
        assert_eq!(error["field"], "deliver.webhook.url", "{url}: {error}");
    }

    let list = daemon.get("/v1/tasks").await.json();
    assert_eq!(list["tasks"], json!([]), "nothing stored");
    assert_eq!(trap.accepted(), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_a_refused_address_fails_the_task_and_sends_nothing() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_EGRESS__ALLOW", "")]).await;
    let url = format!("http://localhost:{}/fast", upstream.addr().port());
    let task = daemon
        .submit(&json!({"request": {"http_method": "get", "url": url}}))
        .await;
    let task = daemon.wait_finished(task["id"].as_str().unwrap()).await;
    let error = request_error(&task);
    assert_eq!(error["class_name"], "EgressDenied", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1") || message.contains("::1"),
        "the message names the address: {message}"
    );
    assert_eq!(error["url"], url);
    assert_eq!(
        task["attempts"].as_array().unwrap().len(),
        1,
        "a refusal is not retried: {task:#}"
    );
    assert_eq!(upstream.requests(), 0, "nothing was sent");
    assert_eq!(upstream.connections(), 0, "not even a connection");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_address_ends_the_task_and_sends_nothing_there() {
    // The upstream sits on 127.0.0.2, which egress.allow covers; the trap on
    // 127.0.0.1, which it does not.
    let upstream = Upstream::start_with(
        UpstreamOptions::new()
            .listen("127.0.0.2:0".parse().unwrap())
            .fault_listen("127.0.0.2:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let trap = Trap::bind("127.0.0.1").await;
    let daemon = Daemon::start(&[("PATIENT_EGRESS__ALLOW", "127.0.0.2")]).await;

    let targets = [
        format!("http://127.0.0.1:{}/steal", trap.addr.port()),
        format!("http://localhost:{}/steal", trap.addr.port()),
        format!("http://2130706433:{}/steal", trap.addr.port()),
    ];
    for target in &targets {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("url", target)
            .finish();
        let url = upstream.url(&format!("/redirect-to?{query}"));
        let task = daemon
            .submit(&json!({"request": {"http_method": "get", "url": url}}))
            .await;
        let task = daemon.wait_finished(task["id"].as_str().unwrap()).await;
        let error = request_error(&task);
        assert_eq!(error["class_name"], "EgressDenied", "{target}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("127.0.0.1") || message.contains("::1"),
            "{target}: {message}"
        );
    }
    assert_eq!(upstream.requests_to("/redirect-to"), targets.len() as u64);
    assert_eq!(trap.accepted(), 0, "nothing reached the refused address");

    // A webhook whose name resolves to a refused address fails its
    // delivery; the receiver (on 127.0.0.1) never hears of it.
    let receiver = Receiver::start(&[]).await;
    let hook = format!("http://localhost:{}/hook", receiver.addr.port());
    let daemon = {
        daemon.stop().await.unwrap();
        Daemon::start(&[
            ("PATIENT_EGRESS__ALLOW", "127.0.0.2"),
            ("PATIENT_DELIVERY__MAX_ATTEMPTS", "2"),
        ])
        .await
    };
    let task = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
                        "deliver": {"webhook": {"url": hook}}}),
        )
        .await;
    let task = daemon
        .wait_delivery(task["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(task["state"], "completed");
    let last_error = task["delivery"]["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("127.0.0.1") || last_error.contains("::1"),
        "{last_error}"
    );
    assert!(receiver.received().is_empty());
    daemon.stop().await.unwrap();
}
