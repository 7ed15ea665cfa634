//! `patient request` against the real test upstream.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use patient_testkit::{Fault, ForwardProxy, TestCert, Upstream, UpstreamOptions};
use serde_json::Value;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn patient(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patient"))
        .args(args)
        .output()
        .unwrap()
}

fn outcome(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "one line of JSON: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_response_prints_the_response_json_and_exits_0() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    let out = patient(&[
        "request",
        "POST",
        &up.url("/echo"),
        "-H",
        "X-Trace: abc",
        "--json",
        r#"{"prompt":"hi"}"#,
        "--param",
        "page=2",
        "--callback-args",
        r#"{"user":{"id":7}}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = outcome(&out);
    assert_eq!(r["status"], 200);
    assert_eq!(r["http_method"], "post");
    assert_eq!(r["callback_args"]["user"]["id"], 7);
    let echo: Value = serde_json::from_str(r["body"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(echo["headers"]["x-trace"], "abc");
    assert_eq!(echo["body"], r#"{"prompt":"hi"}"#);
    assert_eq!(echo["query"], "page=2");
    // A non-2xx response is still a response unless asked otherwise.
    let out = patient(&["request", &up.url("/status/503")]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(outcome(&out)["status"], 503);
}

#[test]
fn raise_error_responses_prints_an_http_error_and_exits_1() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    let out = patient(&["request", &up.url("/status/404"), "--raise-error-responses"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(outcome(&out)["response"]["status"], 404);
}

#[test]
fn each_fault_gives_its_error_type() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    for (fault, expected, extra) in [
        (Fault::ResetMidBody, "connection", None),
        (Fault::CloseBeforeHeaders, "connection", None),
        (Fault::MalformedChunked, "connection", None),
        (Fault::OversizedHeaders, "response_too_large", None),
        (Fault::ShortBody, "connection", None),
        (Fault::TrickleHeaders, "timeout", Some("0.3")),
    ] {
        let url = up.fault_url(fault);
        let mut args = vec!["request", url.as_str()];
        if let Some(t) = extra {
            args.extend(["--timeout", t]);
        }
        let out = patient(&args);
        assert_eq!(out.status.code(), Some(1), "{fault:?}");
        let e = outcome(&out);
        assert_eq!(e["error_type"], expected, "{fault:?}: {e}");
        assert!(e["class_name"].as_str().is_some_and(|c| !c.is_empty()));
    }
    // Too large, timeout and a dead port.
    let out = patient(&[
        "request",
        &up.url("/bytes?n=5000"),
        "--max-response-size",
        "1000",
    ]);
    assert_eq!(outcome(&out)["error_type"], "response_too_large");
    let out = patient(&["request", &up.url("/delay?ms=5000"), "--timeout", "0.2"]);
    assert_eq!(outcome(&out)["error_type"], "timeout");
    let out = patient(&["request", "http://127.0.0.1:1/"]);
    assert_eq!(outcome(&out)["error_type"], "connection");
}

#[test]
fn redirect_chains_and_redirect_errors() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    let out = patient(&["request", &up.url("/redirect/3")]);
    assert_eq!(out.status.code(), Some(0));
    let r = outcome(&out);
    assert_eq!(r["redirects"].as_array().unwrap().len(), 3);
    let out = patient(&["request", &up.url("/redirect/3"), "--max-redirects", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        outcome(&out)["error_class"],
        "PatientHttp::TooManyRedirectsError"
    );
    let out = patient(&["request", &up.url("/redirect-loop")]);
    assert_eq!(
        outcome(&out)["error_class"],
        "PatientHttp::RecursiveRedirectError"
    );
    let out = patient(&["request", &up.url("/redirect/1"), "--max-redirects", "0"]);
    assert_eq!(outcome(&out)["status"], 302);
}

#[test]
fn from_runs_a_serialized_request_from_a_file_or_stdin() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    // As the gem serializes it.
    let request = serde_json::json!({
        "http_method": "put",
        "url": up.url("/echo"),
        "headers": {"content-type": "text/plain", "x-api-key": {"$secret": "key"}},
        "body": {"encoding": "text", "value": "hello", "charset": "UTF-8"},
        "timeout": 5,
        "max_redirects": null
    });
    let dir = std::env::temp_dir().join(format!("patient-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.json");
    std::fs::write(&file, request.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patient"))
        .args([
            "request",
            "--from",
            file.to_str().unwrap(),
            "--secret-env",
            "key=CLI_TEST_KEY",
        ])
        .env("CLI_TEST_KEY", "k-123")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = outcome(&out);
    let echo: Value = serde_json::from_str(r["body"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["body"], "hello");
    assert_eq!(echo["headers"]["x-api-key"], "k-123");

    let mut child = Command::new(env!("CARGO_BIN_EXE_patient"))
        .args(["request", "--from", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let get = serde_json::json!({"http_method": "get", "url": up.url("/fast"), "headers": {},
        "body": null, "timeout": null, "max_redirects": null});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(get.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(outcome(&out)["status"], 200);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gets_one_line_naming_the_problem_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["request"], "URL"),
        (&["request", "FETCH", "http://x/"], "FETCH"),
        (&["request", "ftp://x/"], "scheme"),
        (&["request", "not a url"], "URL"),
        (&["request", "GET", "http://x/", "--body", "a"], "body"),
        (&["request", "http://x/", "-H", "no-colon"], "no-colon"),
        (&["request", "http://x/", "--json", "{nope"], "--json"),
        (&["request", "http://x/", "--timeout", "-1"], "--timeout"),
        (
            &["request", "http://x/", "--callback-args", "[1]"],
            "callback",
        ),
        (
            &["request", "--from", "/nonexistent/request.json"],
            "/nonexistent/request.json",
        ),
        (&["request", "http://x/", "--bogus"], "--bogus"),
    ];
    for (args, needle) in cases {
        let out = patient(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{args:?}: {err}"
        );
    }
    let dir = std::env::temp_dir().join(format!("patient-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.json");
    std::fs::write(
        &file,
        r#"{"http_method":"fetch","url":"http://x/","headers":{}}"#,
    )
    .unwrap();
    let out = patient(&["request", "--from", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("http_method"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_attempt_by_default_and_retries_resend_a_failed_get() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    let out = patient(&["request", &up.url("/status/503")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(outcome(&out)["status"], 503);
    assert_eq!(up.requests_to("/status/503"), 1, "one attempt by default");

    let out = patient(&["request", &up.url("/status/503"), "--retries", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(outcome(&out)["status"], 503);
    assert_eq!(
        up.requests_to("/status/503"),
        1 + 3,
        "--retries 2: 3 attempts"
    );

    // `--retries 0` is the default: one attempt.
    let out = patient(&["request", &up.url("/status/503"), "--retries", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(up.requests_to("/status/503"), 1 + 3 + 1);

    // A POST is retried only with an idempotency key header.
    let out = patient(&["request", "POST", &up.url("/status/502"), "--retries", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(up.requests_to("/status/502"), 1);
    let out = patient(&[
        "request",
        "POST",
        &up.url("/status/502"),
        "--retries",
        "2",
        "-H",
        "Idempotency-Key: order-17",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(up.requests_to("/status/502"), 1 + 3);
}

#[test]
fn the_deadline_bounds_every_attempt_together() {
    let rt = runtime();
    let up = rt.block_on(Upstream::start()).unwrap();
    let started = std::time::Instant::now();
    let out = patient(&[
        "request",
        &up.url("/delay?ms=20000"),
        "--deadline",
        "1",
        "--retries",
        "5",
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = outcome(&out);
    assert_eq!(e["error_type"], "timeout", "{e}");
    // The deadline is split across the attempts (the first gets 1/6 of it),
    // and the task ends as soon as the next attempt could no longer fit:
    // somewhere after the first attempt's share, never past the deadline by
    // more than process start-up.
    assert!(
        took >= std::time::Duration::from_millis(150) && took < std::time::Duration::from_secs(3),
        "ended after {took:?}"
    );
}

#[test]
fn bad_retries_and_deadlines_exit_2_naming_the_flag() {
    for (args, needle) in [
        (&["--retries", "-1"][..], "--retries"),
        (&["--retries", "two"][..], "--retries"),
        (&["--retries", "100"][..], "--retries"),
        (&["--deadline", "0"][..], "--deadline"),
        (&["--deadline", "-1"][..], "--deadline"),
        (&["--deadline", "soon"][..], "--deadline"),
        (&["--deadline", "1e12"][..], "--deadline"),
    ] {
        let mut all = vec!["request", "http://127.0.0.1:1/"];
        all.extend_from_slice(args);
        let out = patient(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn an_out_of_range_timeout_from_a_file_is_bad_input_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("patient-cli-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.json");
    std::fs::write(
        &file,
        r#"{"http_method":"get","url":"http://127.0.0.1:1/","timeout":1.8e19}"#,
    )
    .unwrap();
    let out = patient(&["request", "--from", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("`timeout`"), "{err}");
    assert!(err.contains("86400"), "the maximum is named: {err}");
}

#[test]
fn help_documents_the_exit_status() {
    let out = patient(&["request", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Exit status",
        "--from",
        "--header",
        "--raise-error-responses",
        "--retries",
        "--deadline",
        "one attempt",
    ] {
        assert!(help.contains(needle), "{needle}");
    }
    assert!(!help.contains("whole-request timeout"), "{help}");
}

#[test]
fn tls_with_an_extra_root_and_a_forward_proxy() {
    let rt = runtime();
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let up = rt
        .block_on(Upstream::start_with(UpstreamOptions::new().tls(&cert)))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("patient-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &cert.ca_pem).unwrap();
    let url = up.url("/fast");
    assert!(url.starts_with("https://"));
    let untrusted = patient(&["request", &url]);
    assert_eq!(outcome(&untrusted)["error_type"], "ssl");
    let trusted = patient(&["request", &url, "--cacert", ca.to_str().unwrap()]);
    assert_eq!(trusted.status.code(), Some(0), "{}", stderr(&trusted));
    assert_eq!(outcome(&trusted)["status"], 200);

    let proxy = rt
        .block_on(ForwardProxy::start(Some(("user", "pass"))))
        .unwrap();
    let proxy_url = proxy.url().replace("http://", "http://user:pass@");
    let out = patient(&[
        "request",
        &url,
        "--cacert",
        ca.to_str().unwrap(),
        "--proxy",
        &proxy_url,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(proxy.connects(), 1);
    std::fs::remove_dir_all(&dir).ok();
}
