//! Every bad input gets a 4xx in the contract's error shape with a stable
//! `code` (and the `field` where one is to blame), and nothing is stored.

mod common;

use std::io::{Read, Write};

use common::{call, get_request, Daemon, Reply};
use patient_testkit::Upstream;
use serde_json::{json, Value};

/// A case of the table: what is sent, and the status, code and field of the
/// answer.
struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

fn submit(name: &'static str, body: Value, field: &'static str) -> Case {
    Case {
        name,
        method: "POST",
        path: "/v1/tasks".into(),
        content_type: Some("application/json"),
        body: Some(body.to_string().into_bytes()),
        status: 422,
        code: "invalid_request",
        field: Some(field),
    }
}

fn raw(
    name: &'static str,
    method: &'static str,
    path: &str,
    content_type: Option<&'static str>,
    body: &[u8],
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        content_type,
        body: (!body.is_empty()).then(|| body.to_vec()),
        status,
        code,
        field: None,
    }
}

async fn run(daemon: &Daemon, case: &Case) -> Reply {
    let mut headers = Vec::new();
    if let Some(ct) = case.content_type {
        headers.push(("content-type", ct));
    }
    let auth = daemon.token.as_ref().map(|t| format!("Bearer {t}"));
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    call(
        case.method,
        &format!("{}{}", daemon.url, case.path),
        &headers,
        case.body.clone(),
    )
    .await
}

async fn check_table(daemon: &Daemon, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let reply = run(daemon, case).await;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(reply.status < 500, "never a 5xx for bad input");
            let error = reply.assert_error(case.status, case.code);
            match case.field {
                Some(field) => {
                    assert_eq!(error["field"], field, "field");
                    let message = error["message"].as_str().unwrap();
                    assert!(
                        message.contains(field),
                        "the message names {field}: {message}"
                    );
                }
                None => assert!(
                    error.get("field").is_none_or(Value::is_null),
                    "no field: {error}"
                ),
            }
        }));
        if let Err(panic) = result {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!(
                "{}: {} {} -> {} {}\n    {}",
                case.name,
                case.method,
                case.path,
                reply.status,
                reply.text(),
                why.replace('\n', " ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

async fn assert_nothing_stored(daemon: &Daemon) {
    let reply = daemon.get("/v1/tasks").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"tasks": [], "next_cursor": null}),
        "no task was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_submit_has_its_status_code_and_field_and_nothing_is_stored() {
    let daemon = Daemon::start(&[("PATIENT_MAX_BATCH", "3"), ("PATIENT_MAX_BODY", "4096")]).await;
    let url = "http://127.0.0.1:9/x";
    let ok = get_request(url);
    let with = |extra: Value| {
        let mut body = ok.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let request = |r: Value| json!({ "request": r });
    let later = |days: i64| {
        (time::OffsetDateTime::now_utc() + time::Duration::days(days))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let cases = vec![
        // The body.
        raw(
            "not JSON",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            b"{\"request\":",
            400,
            "invalid_json",
        ),
        raw(
            "empty body",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            b"",
            400,
            "invalid_json",
        ),
        raw(
            "not UTF-8",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            b"{\"request\": \"\xff\"}",
            400,
            "invalid_json",
        ),
        raw(
            "nested too deep",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            "[".repeat(1000).as_bytes(),
            400,
            "invalid_json",
        ),
        raw(
            "JSON with trailing junk",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            b"{} {}",
            400,
            "invalid_json",
        ),
        raw(
            "text/plain",
            "POST",
            "/v1/tasks",
            Some("text/plain"),
            ok.to_string().as_bytes(),
            415,
            "unsupported_media_type",
        ),
        raw(
            "form",
            "POST",
            "/v1/tasks",
            Some("application/x-www-form-urlencoded"),
            b"a=1",
            415,
            "unsupported_media_type",
        ),
        submit("an array", json!([ok]), "request"),
        submit("a string", json!("GET /"), "request"),
        submit("unknown field", with(json!({"colour": "blue"})), "colour"),
        submit("no request", json!({"callback": "Cb"}), "request"),
        submit("null request", json!({"request": null}), "request"),
        // The request.
        submit(
            "ftp URL",
            request(json!({"http_method": "get", "url": "ftp://127.0.0.1/x"})),
            "request.url",
        ),
        submit(
            "relative URL",
            request(json!({"http_method": "get", "url": "/x"})),
            "request.url",
        ),
        submit(
            "no URL",
            request(json!({"http_method": "get"})),
            "request.url",
        ),
        submit(
            "unknown method",
            request(json!({"http_method": "fetch", "url": url})),
            "request.http_method",
        ),
        submit(
            "headers not an object",
            request(json!({"http_method": "get", "url": url, "headers": [1]})),
            "request.headers",
        ),
        submit(
            "header value a number",
            request(json!({"http_method": "get", "url": url, "headers": {"x-a": 1}})),
            "request.headers.x-a",
        ),
        submit(
            "negative timeout",
            request(json!({"http_method": "get", "url": url, "timeout": -1})),
            "request.timeout",
        ),
        submit(
            "body on GET",
            request(
                json!({"http_method": "get", "url": url, "body": {"encoding": "text", "value": "x", "charset": "UTF-8"}}),
            ),
            "request.body",
        ),
        submit(
            "a bad option",
            request(json!({"http_method": "get", "url": url, "options": {"priority": "urgent"}})),
            "request.options.priority",
        ),
        submit(
            "a deadline too long",
            request(json!({"http_method": "get", "url": url, "options": {"deadline": 1e12}})),
            "request.options.deadline",
        ),
        submit(
            "a misspelt request field",
            request(json!({"http_method": "get", "url": url, "optoins": {"deadline": 5}})),
            "request.optoins",
        ),
        submit(
            "a misspelt option",
            request(json!({"http_method": "get", "url": url, "options": {"dedline": 5}})),
            "request.options.dedline",
        ),
        submit(
            "a misspelt retry option",
            request(
                json!({"http_method": "get", "url": url, "options": {"retry": {"max_attempt": 2}}}),
            ),
            "request.options.retry.max_attempt",
        ),
        submit(
            "credentials in the URL",
            request(json!({"http_method": "get", "url": "http://u:p@127.0.0.1:9/"})),
            "request.url",
        ),
        submit(
            "an unknown secret",
            request(
                json!({"http_method": "get", "url": url, "headers": {"authorization": {"$secret": "nope"}}}),
            ),
            "request.headers.authorization",
        ),
        // The rest of a submit.
        submit(
            "callback a number",
            with(json!({"callback": 7})),
            "callback",
        ),
        submit(
            "callback_args a list",
            with(json!({"callback_args": [1]})),
            "callback_args",
        ),
        submit(
            "raise_error_responses a string",
            with(json!({"raise_error_responses": "yes"})),
            "raise_error_responses",
        ),
        submit(
            "idempotency_key empty",
            with(json!({"idempotency_key": ""})),
            "idempotency_key",
        ),
        submit(
            "idempotency_key too long",
            with(json!({"idempotency_key": "k".repeat(256)})),
            "idempotency_key",
        ),
        submit(
            "idempotency_key a number",
            with(json!({"idempotency_key": 7})),
            "idempotency_key",
        ),
        // deliver.
        submit(
            "deliver a string",
            with(json!({"deliver": "webhook"})),
            "deliver",
        ),
        submit(
            "deliver two channels",
            with(
                json!({"deliver": {"webhook": {"url": "http://127.0.0.1:9/h"}, "redis": {"list": "l"}}}),
            ),
            "deliver",
        ),
        submit(
            "deliver an unknown channel",
            with(json!({"deliver": {"email": {"to": "a"}}})),
            "deliver.email",
        ),
        submit(
            "webhook without url",
            with(json!({"deliver": {"webhook": {}}})),
            "deliver.webhook.url",
        ),
        submit(
            "webhook url ftp",
            with(json!({"deliver": {"webhook": {"url": "ftp://127.0.0.1/h"}}})),
            "deliver.webhook.url",
        ),
        submit(
            "webhook url not a URL",
            with(json!({"deliver": {"webhook": {"url": "hook"}}})),
            "deliver.webhook.url",
        ),
        submit(
            "webhook unknown key",
            with(json!({"deliver": {"webhook": {"url": "http://127.0.0.1:9/h", "secret": "s"}}})),
            "deliver.webhook.secret",
        ),
        submit(
            "redis list and stream",
            with(json!({"deliver": {"redis": {"list": "a", "stream": "b"}}})),
            "deliver.redis",
        ),
        submit(
            "redis list empty",
            with(json!({"deliver": {"redis": {"list": ""}}})),
            "deliver.redis.list",
        ),
        submit(
            "redis without redis_url",
            with(json!({"deliver": {"redis": {"list": "a"}}})),
            "deliver",
        ),
        submit(
            "sidekiq queue a number",
            with(json!({"deliver": {"sidekiq": {"queue": 1}}})),
            "deliver.sidekiq.queue",
        ),
        // delay and not_before.
        submit("negative delay", with(json!({"delay": -1})), "delay"),
        submit("delay a string", with(json!({"delay": "soon"})), "delay"),
        submit(
            "delay over 30 days",
            with(json!({"delay": 31 * 86_400})),
            "delay",
        ),
        submit(
            "delay and not_before",
            with(json!({"delay": 1, "not_before": later(1)})),
            "delay",
        ),
        submit(
            "not_before not RFC 3339",
            with(json!({"not_before": "tomorrow"})),
            "not_before",
        ),
        submit(
            "not_before a number",
            with(json!({"not_before": 1_700_000_000})),
            "not_before",
        ),
        submit(
            "not_before over 30 days",
            with(json!({"not_before": later(40)})),
            "not_before",
        ),
        // Too large a body.
        raw(
            "too large",
            "POST",
            "/v1/tasks",
            Some("application/json"),
            &vec![b' '; 5000],
            413,
            "payload_too_large",
        ),
    ];
    check_table(&daemon, &cases).await;
    assert_nothing_stored(&daemon).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_names_the_item_and_stores_none_of_it() {
    let daemon = Daemon::start(&[("PATIENT_MAX_BATCH", "3")]).await;
    let good = get_request("http://127.0.0.1:9/x");
    let batch = |tasks: Value| {
        let mut case = submit("", json!({ "tasks": tasks }), "");
        case.path = "/v1/tasks/batch".into();
        case
    };
    let named = |name, mut case: Case, field| {
        case.name = name;
        case.field = Some(field);
        case
    };
    let cases = vec![
        named(
            "the second item's URL",
            batch(json!([good, {"request": {"http_method": "get", "url": "ftp://x/"}}])),
            "tasks[1].request.url",
        ),
        named(
            "the third item's deliver",
            batch(json!([good, good, {"request": good["request"], "deliver": {"webhook": {}}}])),
            "tasks[2].deliver.webhook.url",
        ),
        named(
            "an unknown field of the first item",
            batch(json!([{"request": good["request"], "x": 1}, good])),
            "tasks[0].x",
        ),
        named(
            "an item not an object",
            batch(json!([good, 7])),
            "tasks[1].request",
        ),
        named("an empty batch", batch(json!([])), "tasks"),
        named("tasks not a list", batch(json!({"a": good})), "tasks"),
        named(
            "over max_batch",
            batch(json!([good, good, good, good])),
            "tasks",
        ),
        named(
            "no tasks",
            {
                let mut c = batch(json!([]));
                c.body = Some(b"{}".to_vec());
                c
            },
            "tasks",
        ),
        named(
            "a field beside tasks",
            {
                let mut c = batch(json!([]));
                c.body = Some(
                    json!({"tasks": [good], "mode": "x"})
                        .to_string()
                        .into_bytes(),
                );
                c
            },
            "mode",
        ),
    ];
    check_table(&daemon, &cases).await;
    assert_nothing_stored(&daemon).await;
    // An idempotency key used twice in one bad batch stores nothing either.
    let keyed = json!({"request": good["request"], "idempotency_key": "batch-key"});
    let reply = daemon
        .post(
            "/v1/tasks/batch",
            &json!({"tasks": [keyed, {"request": good["request"], "delay": -5}]}),
        )
        .await;
    assert_eq!(
        reply.assert_error(422, "invalid_request")["field"],
        "tasks[1].delay"
    );
    assert_nothing_stored(&daemon).await;
    let reply = daemon.post("/v1/tasks", &keyed).await;
    assert_eq!(
        reply.status, 201,
        "the key was not taken by the refused batch"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_methods_ids_and_states_answer_in_the_error_shape() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[]).await;
    let cases = vec![
        raw(
            "unknown route",
            "GET",
            "/v2/tasks",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "unknown route under /v1",
            "GET",
            "/v1/nothing",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "unknown action",
            "POST",
            "/v1/tasks/tsk_x/explode",
            Some("application/json"),
            b"{}",
            404,
            "not_found",
        ),
        raw(
            "unknown task",
            "GET",
            "/v1/tasks/tsk_00000000000000000000000000000000",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "cancel an unknown task",
            "POST",
            "/v1/tasks/tsk_nope/cancel",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "redeliver an unknown task",
            "POST",
            "/v1/tasks/tsk_nope/redeliver",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "retry an unknown task",
            "POST",
            "/v1/tasks/tsk_nope/retry",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "an id that is not UTF-8",
            "GET",
            "/v1/tasks/%FF",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "cancel an id that is not UTF-8",
            "POST",
            "/v1/tasks/%C3%28/cancel",
            None,
            b"",
            404,
            "not_found",
        ),
        raw(
            "DELETE the list",
            "DELETE",
            "/v1/tasks",
            None,
            b"",
            405,
            "method_not_allowed",
        ),
        raw(
            "PUT a task",
            "PUT",
            "/v1/tasks/tsk_nope",
            Some("application/json"),
            b"{}",
            405,
            "method_not_allowed",
        ),
        raw(
            "GET the batch route",
            "GET",
            "/v1/tasks/batch",
            None,
            b"",
            405,
            "method_not_allowed",
        ),
        raw(
            "GET cancel",
            "GET",
            "/v1/tasks/tsk_nope/cancel",
            None,
            b"",
            405,
            "method_not_allowed",
        ),
        raw(
            "POST healthz",
            "POST",
            "/healthz",
            None,
            b"",
            405,
            "method_not_allowed",
        ),
    ];
    check_table(&daemon, &cases).await;

    let list = |query: &'static str, field: &'static str| Case {
        name: query,
        method: "GET",
        path: format!("/v1/tasks?{query}"),
        content_type: None,
        body: None,
        status: 422,
        code: "invalid_request",
        field: Some(field),
    };
    check_table(
        &daemon,
        &[
            list("state=lost", "state"),
            list("limit=0", "limit"),
            list("limit=1001", "limit"),
            list("limit=ten", "limit"),
            list("cursor=zzz", "cursor"),
            list("sort=asc", "sort"),
        ],
    )
    .await;

    // Finished tasks: cancel and retry answer 409, and so does a redeliver
    // of a task without a channel.
    let done = daemon.submit(&get_request(&upstream.url("/fast"))).await;
    let id = done["id"].as_str().unwrap();
    daemon.wait_finished(id).await;
    // A finished task cannot be cancelled, only a failed one retried, and
    // one without a channel has nothing to deliver again.
    for action in ["cancel", "retry", "redeliver"] {
        let reply = daemon
            .post(&format!("/v1/tasks/{id}/{action}"), &json!({}))
            .await;
        let error = reply.assert_error(409, "conflict");
        assert!(
            error["message"].as_str().unwrap().contains(id),
            "{action}: the message names the task: {error}"
        );
    }
    // A task that has not finished has no outcome to deliver again.
    let waiting = daemon
        .submit(
            &json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
                        "delay": 3600, "deliver": {"webhook": {"url": upstream.url("/fast")}}}),
        )
        .await;
    let waiting = waiting["id"].as_str().unwrap();
    daemon
        .post(&format!("/v1/tasks/{waiting}/redeliver"), &json!({}))
        .await
        .assert_error(409, "conflict");
    daemon
        .post(&format!("/v1/tasks/{waiting}/cancel"), &json!({}))
        .await;
    daemon
        .post(&format!("/v1/tasks/{waiting}/cancel"), &json!({}))
        .await
        .assert_error(409, "conflict");
    let task = daemon.task(waiting).await;
    assert_eq!(task["state"], "cancelled");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_max_body_is_refused_without_a_length() {
    let daemon = Daemon::start(&[("PATIENT_MAX_BODY", "1024")]).await;
    let addr = daemon.url.strip_prefix("http://").unwrap().to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /v1/tasks HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        // 4 chunks of 512 bytes: past max_body on the third.
        for _ in 0..4 {
            let chunk = format!("200\r\n{}\r\n", " ".repeat(512));
            if stream.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    let status_line = answer.lines().next().unwrap_or("");
    assert!(status_line.contains(" 413 "), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert_nothing_stored(&daemon).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_token_only_health_readiness_and_the_document_are_open() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_API_TOKEN", "s3cret-token")]).await;
    let base = daemon.url.clone();
    let body = get_request(&upstream.url("/fast")).to_string().into_bytes();
    let json_type = ("content-type", "application/json");
    for (method, path) in [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks/batch"),
        ("GET", "/v1/tasks/tsk_x"),
        ("POST", "/v1/tasks/tsk_x/cancel"),
        ("POST", "/v1/tasks/tsk_x/redeliver"),
        ("POST", "/v1/tasks/tsk_x/retry"),
        ("GET", "/metrics"),
    ] {
        let url = format!("{base}{path}");
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("Bearer s3cret-toke"),
            Some("Basic czNjcmV0LXRva2Vu"),
            Some("s3cret-token"),
        ] {
            let mut headers = vec![json_type];
            if let Some(auth) = auth {
                headers.push(("authorization", auth));
            }
            let reply = call(method, &url, &headers, Some(body.clone())).await;
            let error = reply.assert_error(401, "unauthorized");
            assert!(
                !error["message"].as_str().unwrap().contains("s3cret"),
                "the token is never echoed"
            );
        }
    }
    assert_nothing_stored(&daemon).await;
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let reply = call("GET", &format!("{base}{path}"), &[], None).await;
        assert_eq!(reply.status, 200, "{path} needs no token: {}", reply.text());
        reply.json();
    }
    let reply = daemon
        .post("/v1/tasks", &get_request(&upstream.url("/fast")))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = daemon.get("/metrics").await;
    assert_eq!(reply.status, 200);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_read_in_any_case_and_only_the_whole_token_passes() {
    let token = "s3cret-token";
    let daemon = Daemon::start(&[("PATIENT_API_TOKEN", token)]).await;
    let url = format!("{}/v1/tasks", daemon.url);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for value in [format!("{scheme} {token}"), format!("{scheme}   {token} ")] {
            let reply = call("GET", &url, &[("authorization", &value)], None).await;
            assert_eq!(reply.status, 200, "{value:?}: {}", reply.text());
        }
    }
    let refused = [
        vec![format!("Bearer {}", &token[..token.len() - 1])],
        vec![format!("Bearer {token}x")],
        vec![format!("Bearer {token}{token}")],
        vec![format!("Bearer x{token}")],
        vec![format!("Bearer {}", token.to_uppercase())],
        vec![format!("Bearer{token}")],
        vec!["Bearer ".to_owned()],
        // A wrong token beside the right one, in either order.
        vec!["Bearer wrong".to_owned(), format!("Bearer {token}")],
        vec![format!("Bearer {token}"), "Bearer wrong".to_owned()],
    ];
    for values in refused {
        let headers: Vec<(&str, &str)> = values
            .iter()
            .map(|v| ("authorization", v.as_str()))
            .collect();
        let reply = call("GET", &url, &headers, None).await;
        reply.assert_error(401, "unauthorized");
    }
    // The API takes the token in Authorization only.
    let reply = call("GET", &url, &[("x-api-key", token)], None).await;
    reply.assert_error(401, "unauthorized");
    daemon.stop().await.unwrap();
}
