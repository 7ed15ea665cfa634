//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver (WebDriver), opens `/` on a daemon with a token that has
//! run a task that completed, one that failed and one whose delivery
//! failed; the page asks for the token in a form (typed in, kept in the
//! tab's session storage, never in the address), then shows the figures,
//! the upstream and both failures, and its
//! Retry and Redeliver buttons run the task and the delivery again (seen by
//! the upstream and through the API). The page's Content-Security-Policy
//! must not block anything it does: the browser logs no error.
//!
//! Chromium and chromedriver come from `scripts/services.sh`
//! (`PATIENT_TEST_CHROMIUM`, `PATIENT_TEST_CHROMEDRIVER`); without them the
//! browser test is skipped with a notice, except under `CI=true` or
//! `PATIENT_REQUIRE_SERVICES=1`, where that is a failure. The browser only
//! ever talks to 127.0.0.1: every other host name resolves to nothing.

mod common;

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{call, try_call, wait_for, Daemon, TempDir};
use patient_testkit::Upstream;
use serde_json::{json, Value};

const TOKEN: &str = "dashboard-token-42";

/// The key of a WebDriver element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn required() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() == Ok("1")
}

fn tool(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            let why = format!("{var} is not set; start `eval \"$(scripts/services.sh start)\"`");
            if required() {
                panic!("the dashboard's browser test cannot run (CI=true requires it): {why}");
            }
            eprintln!("notice: skipping the dashboard's browser test: {why}");
            None
        }
    }
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a loopback port, in a process group of its own with the
/// browsers it starts: on drop the whole group is killed, so no browser
/// outlives a failed test.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(path: &str) -> Driver {
        let port = free_port();
        let child = Command::new(path)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait_for(
            "chromedriver to be ready",
            Duration::from_secs(30),
            || async {
                match try_call("GET", &format!("{}/status", driver.url), &[], None).await {
                    Ok(reply) if reply.status == 200 && reply.json()["value"]["ready"] == true => {
                        Some(())
                    }
                    _ => None,
                }
            },
        )
        .await;
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session.
struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl<'a> Session<'a> {
    async fn new(driver: &'a Driver, chromium: &str, profile: &TempDir) -> Session<'a> {
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-default-apps".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-domain-reliability".to_owned(),
            "--no-proxy-server".to_owned(),
            // Nothing but the daemon resolves.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let body = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let reply = post(&format!("{}/session", driver.url), &body).await;
        let id = reply["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {reply}"))
            .to_owned();
        Session { driver, id }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.driver.url, self.id)
    }

    async fn open(&self, url: &str) {
        post(&self.url("/url"), &json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn script(&self, script: &str) -> Value {
        post(
            &self.url("/execute/sync"),
            &json!({"script": script, "args": []}),
        )
        .await["value"]
            .clone()
    }

    async fn click(&self, css: &str) {
        let element = self.element(css).await;
        post(&self.url(&format!("/element/{element}/click")), &json!({})).await;
    }

    /// Types `text` into the element at `css`, key by key.
    async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        post(
            &self.url(&format!("/element/{element}/value")),
            &json!({ "text": text }),
        )
        .await;
    }

    async fn element(&self, css: &str) -> String {
        let found = post(
            &self.url("/element"),
            &json!({"using": "css selector", "value": css}),
        )
        .await;
        found["value"][ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    /// The browser's console log so far.
    async fn log(&self) -> Vec<Value> {
        let reply = post(&self.url("/se/log"), &json!({"type": "browser"})).await;
        reply["value"].as_array().cloned().unwrap_or_default()
    }

    async fn close(self) {
        let _ = call("DELETE", &self.url(""), &[], None).await;
    }
}

/// A WebDriver command; panics on an error answer.
async fn post(url: &str, body: &Value) -> Value {
    let reply = call(
        "POST",
        url,
        &[("content-type", "application/json")],
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(reply.status, 200, "WebDriver {url}: {}", reply.text());
    reply.json()
}

/// What the page shows, read from its DOM.
/// Where the page keeps the token, and whether it asks for one.
const TOKEN_STATE: &str = r##"
return {
  url: window.location.href,
  stored: window.sessionStorage.getItem("patient.api_token"),
  form_hidden: document.getElementById("login").hidden,
  input: document.getElementById("token").value,
  loaded: Number(document.body.dataset.loaded || "0"),
};
"##;

const READ_PAGE: &str = r##"
const text = (sel) => { const e = document.querySelector(sel); return e ? e.textContent : null; };
return {
  loaded: Number(document.body.dataset.loaded || "0"),
  status: text("#status"),
  notice: text("#notice"),
  completed: text("#tasks-completed"),
  failed: text("#tasks-failed"),
  queued: text("#tasks-queued"),
  in_flight: text("#in-flight"),
  throughput: text("#throughput"),
  finished: text("#finished-window"),
  e2e_p50: text('#latency tr[data-kind="end_to_end"] td'),
  submit_count: text('#latency tr[data-kind="submit"] td:nth-of-type(4)'),
  http_errors: text("#count-error_http_error"),
  delivery_failed: text("#count-delivery_failed"),
  upstreams: Array.from(document.querySelectorAll("#upstreams tr[data-upstream]")).map(
    (tr) => ({ key: tr.dataset.upstream, cells: Array.from(tr.children).map((c) => c.textContent) })),
  failures: Array.from(document.querySelectorAll("#failures tr[data-task-id]")).map((tr) => ({
    id: tr.dataset.taskId,
    text: tr.textContent,
    retry: tr.querySelector("button.retry") !== null,
    redeliver: tr.querySelector("button.redeliver") !== null,
  })),
};
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_figures_and_its_buttons_retry_and_redeliver_in_a_browser() {
    let (Some(chromium), Some(chromedriver)) = (
        tool("PATIENT_TEST_CHROMIUM"),
        tool("PATIENT_TEST_CHROMEDRIVER"),
    ) else {
        return;
    };
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[
        ("PATIENT_API_TOKEN", TOKEN),
        ("PATIENT_DELIVERY__MAX_ATTEMPTS", "1"),
    ])
    .await;

    let ok = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
                        "callback": "Fine"}),
        )
        .await;
    let failing = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/status/404")},
                        "raise_error_responses": true, "callback": "Broken"}),
        )
        .await;
    let undelivered = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
                        "callback": "Unheard",
                        "deliver": {"webhook": {"url": upstream.url("/status/500")}}}),
        )
        .await;
    let (ok, failing, undelivered) = (
        ok["id"].as_str().unwrap().to_owned(),
        failing["id"].as_str().unwrap().to_owned(),
        undelivered["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(daemon.wait_finished(&ok).await["state"], "completed");
    let failed = daemon.wait_finished(&failing).await;
    assert_eq!(failed["state"], "failed");
    daemon.wait_delivery(&undelivered, "failed").await;
    assert_eq!(upstream.requests_to("/status/404"), 1);
    assert_eq!(upstream.requests_to("/status/500"), 1);

    let driver = Driver::start(&chromedriver).await;
    let profile = TempDir::new("chromium-profile");
    let session = Session::new(&driver, &chromium, &profile).await;
    session.open(&format!("{}/", daemon.url)).await;
    // Without the token the page shows nothing but a form asking for it.
    let asked = wait_for(
        "the form asking for the token",
        Duration::from_secs(20),
        || async {
            let asked = session.script(TOKEN_STATE).await;
            (asked["form_hidden"] == false).then_some(asked)
        },
    )
    .await;
    assert_eq!(asked["loaded"], 0, "{asked}");
    // The one error so far is the figures' 401 that made it ask (the log is
    // drained as it is read).
    let probe = session.log().await;
    assert!(
        probe.iter().all(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("/v1/dashboard") && m.contains("401"))),
        "browser errors before the token: {probe:#?}"
    );
    session.type_into("#token", TOKEN).await;
    session.click("#login button").await;
    let page = wait_for(
        "the page's first figures",
        Duration::from_secs(20),
        || async {
            let page = session.script(READ_PAGE).await;
            (page["loaded"].as_u64() >= Some(1)
                && page["failures"].as_array().is_some_and(|f| f.len() == 2))
            .then_some(page)
        },
    )
    .await;

    // The token lives in the tab's session storage, not in the address.
    let kept = session.script(TOKEN_STATE).await;
    assert_eq!(kept["stored"], TOKEN, "{kept}");
    assert_eq!(kept["form_hidden"], true, "{kept}");
    assert_eq!(kept["input"], "", "the form does not keep it: {kept}");
    assert!(!kept["url"].as_str().unwrap().contains(TOKEN), "{kept}");
    assert_eq!(page["completed"], "2", "{page:#}");
    assert_eq!(page["failed"], "1", "{page:#}");
    assert_eq!(page["queued"], "0", "{page:#}");
    assert_eq!(page["in_flight"], "0", "{page:#}");
    assert_eq!(
        page["finished"], "3",
        "three tasks finished this minute: {page:#}"
    );
    assert_eq!(page["throughput"], "0.05", "3 / 60 s: {page:#}");
    assert_eq!(page["submit_count"], "3", "{page:#}");
    assert!(
        page["e2e_p50"]
            .as_str()
            .is_some_and(|t| t.ends_with("ms") || t.ends_with(" s")),
        "an end-to-end median: {page:#}"
    );
    assert_eq!(page["http_errors"], "1", "{page:#}");
    assert_eq!(page["delivery_failed"], "1", "{page:#}");
    assert!(
        page["status"].as_str().unwrap().starts_with("updated"),
        "{page:#}"
    );
    // The upstream, with its breaker and limit state.
    let key = format!("http://{}", upstream.addr());
    let row = page["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["key"] == key.as_str())
        .unwrap_or_else(|| panic!("upstream {key} listed: {page:#}"));
    let cells: Vec<&str> = row["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        ["closed", "none"].contains(&cells[1]),
        "breaker state: {cells:?}"
    );
    assert_eq!(cells[2], "taking requests", "{cells:?}");
    // Both failures, each with its button.
    let failures = page["failures"].as_array().unwrap();
    let listed = |id: &str| {
        failures
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("{id} listed: {page:#}"))
    };
    let f = listed(&failing);
    assert!(f["retry"] == true && f["redeliver"] == false, "{f}");
    assert!(f["text"].as_str().unwrap().contains("Broken"), "{f}");
    assert!(f["text"].as_str().unwrap().contains("404"), "{f}");
    let u = listed(&undelivered);
    assert!(u["retry"] == false && u["redeliver"] == true, "{u}");
    assert!(
        u["text"].as_str().unwrap().contains("delivery failed"),
        "{u}"
    );
    assert!(
        failures.iter().all(|f| f["id"] != ok.as_str()),
        "a success is not a failure"
    );

    // Retry: the task runs again (the upstream is asked a second time),
    // and fails again.
    session
        .click(&format!("button.retry[data-task-id=\"{failing}\"]"))
        .await;
    wait_for("the retried request", Duration::from_secs(15), || async {
        (upstream.requests_to("/status/404") == 2).then_some(())
    })
    .await;
    let again = daemon
        .wait_task(&failing, "failed again", |t| {
            t["state"] == "failed" && t["finished_at"] != failed["finished_at"]
        })
        .await;
    assert_eq!(again["attempts"].as_array().unwrap().len(), 1, "{again}");

    // Redeliver: the webhook is tried again.
    session
        .click(&format!("button.redeliver[data-task-id=\"{undelivered}\"]"))
        .await;
    wait_for("the redelivery", Duration::from_secs(15), || async {
        (upstream.requests_to("/status/500") == 2).then_some(())
    })
    .await;
    daemon.wait_delivery(&undelivered, "failed").await;

    // The page goes on polling and shows the second failure of the task.
    let page = wait_for(
        "the figures after the retry",
        Duration::from_secs(20),
        || async {
            let page = session.script(READ_PAGE).await;
            (page["http_errors"] == "2" && page["delivery_failed"] == "2").then_some(page)
        },
    )
    .await;
    assert!(page["loaded"].as_u64().unwrap() >= 2, "{page:#}");
    assert!(
        page["notice"]
            .as_str()
            .is_some_and(|n| n.starts_with("Redeliver") && n.ends_with(": done")),
        "{page:#}"
    );
    assert_eq!(page["failed"], "1", "{page:#}");

    // Nothing the page did was blocked or failed: no error in the console
    // (a Content-Security-Policy violation would be one).
    let errors: Vec<Value> = session
        .log()
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "browser errors: {errors:#?}");
    session.close().await;
    drop(driver);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_holds_no_data_and_its_figures_need_the_token() {
    let daemon = Daemon::start(&[("PATIENT_API_TOKEN", TOKEN)]).await;
    let page = |path: &str| {
        let url = format!("{}{path}", daemon.url);
        async move { call("GET", &url, &[], None).await }
    };

    // The figures want the bearer header; a token in the address opens
    // nothing (it would end up in histories and logs).
    for path in ["/v1/dashboard", &format!("/v1/dashboard?token={TOKEN}")] {
        page(path).await.assert_error(401, "unauthorized");
    }
    // The page itself holds no data: it opens without the token and asks
    // for it in a form.
    for reply in [page("/").await, page(&format!("/?token={TOKEN}")).await] {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(header("content-type"), "text/html; charset=utf-8");
        let csp = header("content-security-policy");
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("cache-control"), "no-store");
        let html = reply.text();
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        assert!(html.contains("/v1/dashboard"));
        assert!(html.contains("sessionStorage"), "the token is kept per tab");
        assert!(
            !html.contains("location.search"),
            "never read from the address"
        );
    }

    // The figures, as documented, with the bearer header.
    let figures = daemon.get("/v1/dashboard").await;
    assert_eq!(figures.status, 200, "{}", figures.text());
    let figures = figures.json();
    assert_eq!(figures["tasks"]["queued"], 0, "{figures}");
    assert_eq!(figures["throughput"]["window"], 60, "{figures}");
    assert_eq!(
        figures["latency"]["submit"]["p50"],
        Value::Null,
        "{figures}"
    );
    assert_eq!(figures["recent_failures"], json!([]), "{figures}");

    // Other methods on the page are 405, in the error shape.
    let reply = call("POST", &format!("{}/", daemon.url), &[], None).await;
    reply.assert_error(405, "method_not_allowed");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_page_opens_as_is() {
    let daemon = Daemon::start(&[]).await;
    let reply = call("GET", &format!("{}/", daemon.url), &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let figures = daemon.get("/v1/dashboard").await;
    assert_eq!(figures.status, 200, "{}", figures.text());
    daemon.stop().await.unwrap();
}
