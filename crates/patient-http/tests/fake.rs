//! The in-memory dispatch double: recorded tasks, canned replies, outcomes
//! delivered synchronously.

use std::{
    sync::{mpsc, Arc},
    time::Duration,
};

use patient_http::testing::{FakeClient, FakeDispatch, Reply, NO_CANNED_RESPONSE};
use patient_http::{
    AwaitableClient, AwaitableDispatch, Body, CallbackArgs, Dispatch, DispatchOptions, ErrorType,
    HeaderValue, InlineExecutor, Method, Outcome, Request, RequestTemplate, Task, TaskError,
    TemplateDispatch,
};
use patient_testkit::Upstream;
use serde_json::json;

fn fake() -> (FakeDispatch, mpsc::Receiver<Outcome>) {
    let (tx, rx) = mpsc::channel();
    (FakeDispatch::new(tx), rx)
}

#[test]
fn canned_response_is_delivered_before_dispatch_returns() {
    let (fake, rx) = fake();
    fake.stub(
        Method::Get,
        "https://api.example.com/users/1",
        Reply::json(200, &json!({"id": 1})).header("x-request", "abc"),
    );
    let mut args = CallbackArgs::new();
    args.insert("user_id", 1);
    let options = DispatchOptions {
        callback_args: args.clone(),
        ..DispatchOptions::default()
    };
    let id = fake
        .get("https://api.example.com/users/1", "UserLoaded", options)
        .unwrap();

    let Outcome::Completed { response, callback } = rx.try_recv().unwrap() else {
        panic!("expected a response");
    };
    assert_eq!(callback, "UserLoaded");
    assert_eq!(response.status, 200);
    assert_eq!(response.request_id, id);
    assert_eq!(response.method, Method::Get);
    assert_eq!(response.url, "https://api.example.com/users/1");
    assert_eq!(response.callback_args, args);
    assert_eq!(response.headers.get_str("x-request"), Some("abc"));
    assert_eq!(
        response.content_type(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(response.body.as_deref(), Some(&br#"{"id":1}"#[..]));
    assert!(rx.try_recv().is_err(), "exactly one outcome");
}

#[test]
fn records_every_task_in_order() {
    let (fake, _rx) = fake();
    let options = || DispatchOptions {
        headers: vec![("authorization".into(), "Bearer t".into())],
        ..DispatchOptions::default()
    };
    let first = fake
        .post(
            "https://h/items",
            Body::Json(json!({"name": "a"})),
            "Created",
            options(),
        )
        .unwrap();
    let second = fake
        .delete("https://h/items/1", "Deleted", options())
        .unwrap();

    let tasks = fake.tasks();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0].id, first);
    assert_eq!(tasks[0].callback, "Created");
    assert_eq!(tasks[1].id, second);
    let requests = fake.requests();
    assert_eq!(requests[0].method(), Method::Post);
    assert_eq!(requests[0].url().as_str(), "https://h/items");
    assert_eq!(
        requests[0].body().map(|b| &b[..]),
        Some(&br#"{"name":"a"}"#[..])
    );
    assert_eq!(
        requests[0].headers().get_str("authorization"),
        Some("Bearer t")
    );
    assert_eq!(requests[1].method(), Method::Delete);

    fake.clear();
    assert!(fake.tasks().is_empty());
}

#[test]
fn unmatched_request_gets_a_no_canned_response_error() {
    let (fake, rx) = fake();
    fake.stub(Method::Get, "https://h/a", Reply::status(204));
    // Same URL, other method; and same method, other URL.
    fake.post("https://h/a", Body::Empty, "Cb", DispatchOptions::default())
        .unwrap();
    fake.get("https://h/b", "Cb", DispatchOptions::default())
        .unwrap();
    for url in ["https://h/a", "https://h/b"] {
        let Outcome::Failed { error, callback } = rx.try_recv().unwrap() else {
            panic!("expected an error");
        };
        assert_eq!(callback, "Cb");
        let TaskError::Request(error) = error else {
            panic!("expected a request error, got {error:?}");
        };
        assert_eq!(error.class_name, NO_CANNED_RESPONSE);
        assert_eq!(error.error_type, ErrorType::Unknown);
        assert_eq!(error.url, url);
        assert!(error.message.contains(url), "{}", error.message);
    }
    assert_eq!(fake.tasks().len(), 2, "unmatched tasks are recorded too");
}

#[test]
fn canned_error_is_delivered_to_on_error() {
    let (fake, rx) = fake();
    fake.stub(
        Method::Get,
        "https://h/slow",
        Reply::error(ErrorType::Timeout, "ReadTimeout", "read timed out"),
    );
    let id = fake
        .get("https://h/slow", "Cb", DispatchOptions::default())
        .unwrap();
    let Outcome::Failed {
        error: TaskError::Request(error),
        ..
    } = rx.try_recv().unwrap()
    else {
        panic!("expected a request error");
    };
    assert!(error.is_timeout());
    assert_eq!(error.class_name, "ReadTimeout");
    assert_eq!(error.message, "read timed out");
    assert_eq!(error.request_id, id);
}

#[test]
fn error_responses_raise_when_the_task_or_the_fake_says_so() {
    let (fake, rx) = fake();
    fake.stub(Method::Get, "https://h/missing", Reply::status(404));
    fake.get("https://h/missing", "Cb", DispatchOptions::default())
        .unwrap();
    assert!(rx.try_recv().unwrap().is_completed());
    let raising = DispatchOptions {
        raise_error_responses: Some(true),
        ..DispatchOptions::default()
    };
    fake.get("https://h/missing", "Cb", raising).unwrap();
    let Outcome::Failed {
        error: TaskError::Http(error),
        ..
    } = rx.try_recv().unwrap()
    else {
        panic!("expected an HTTP error");
    };
    assert_eq!(error.status(), 404);

    let (tx, rx) = mpsc::channel();
    let fake = FakeDispatch::new(tx).raise_error_responses(true);
    fake.stub(Method::Get, "https://h/missing", Reply::status(404));
    fake.get("https://h/missing", "Cb", DispatchOptions::default())
        .unwrap();
    assert!(rx.try_recv().unwrap().is_failed());
    let not_raising = DispatchOptions {
        raise_error_responses: Some(false),
        ..DispatchOptions::default()
    };
    fake.get("https://h/missing", "Cb", not_raising).unwrap();
    assert!(rx.try_recv().unwrap().is_completed());
}

#[test]
fn closure_responders_and_the_latest_match_wins() {
    let (fake, rx) = fake();
    fake.respond_with(|task| {
        (task.request.url().host_str() == Some("h")).then(|| Reply::status(200))
    });
    fake.stub(Method::Get, "https://h/special?x=1", Reply::status(201));
    let status = |url: &str| {
        fake.get(url, "Cb", DispatchOptions::default()).unwrap();
        match rx.try_recv().unwrap() {
            Outcome::Completed { response, .. } => response.status,
            other => panic!("expected a response, got {other:?}"),
        }
    };
    assert_eq!(status("https://h/anything"), 200);
    assert_eq!(status("https://h/special?x=1"), 201);
    // The query is part of the match.
    assert_eq!(status("https://h/special?x=2"), 200);
    // Parsed URLs are compared: host case and an empty path do not matter.
    fake.stub(Method::Get, "https://OTHER.example", Reply::status(202));
    assert_eq!(status("https://other.example/"), 202);
}

#[test]
fn works_behind_a_trait_object() {
    fn load(api: &dyn Dispatch) -> String {
        api.get("https://h/x", "Cb", DispatchOptions::default())
            .unwrap()
    }
    let (fake, rx) = fake();
    fake.stub(Method::Get, "https://h/x", Reply::status(200).body("ok"));
    let id = load(&fake);
    assert_eq!(rx.try_recv().unwrap().task_id(), id);
}

fn api(base: &str) -> (TemplateDispatch<FakeDispatch>, mpsc::Receiver<Outcome>) {
    let (fake, rx) = fake();
    let template = RequestTemplate::new(base)
        .unwrap()
        .header("accept", "application/json")
        .header("x-client", "template")
        .param("key", "k")
        .timeout(Duration::from_secs(7));
    (TemplateDispatch::new(template, fake), rx)
}

#[test]
fn template_dispatch_joins_paths_under_the_base_url() {
    let (api, rx) = api("https://api.example.com/v1/");
    api.dispatch.respond_with(|_| Some(Reply::status(200)));
    let none = DispatchOptions::default;
    api.get("/users/1", "Cb", none()).unwrap();
    api.get("users/2?fields=name", "Cb", none()).unwrap();
    api.delete("", "Cb", none()).unwrap();
    api.post("//evil.example/x", Body::Empty, "Cb", none())
        .unwrap();
    api.get("https://other.example/abs", "Cb", none()).unwrap();
    let urls: Vec<String> = api
        .dispatch
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method().as_str(), r.url()))
        .collect();
    assert_eq!(
        urls,
        [
            "GET https://api.example.com/v1/users/1?key=k",
            "GET https://api.example.com/v1/users/2?fields=name&key=k",
            "DELETE https://api.example.com/v1/?key=k",
            "POST https://api.example.com/v1/evil.example/x?key=k",
            "GET https://other.example/abs?key=k",
        ]
    );
    // Every outcome reaches the handler, carrying the resolved URL.
    let Outcome::Completed { response, .. } = rx.try_recv().unwrap() else {
        panic!("expected a response");
    };
    assert_eq!(response.url, "https://api.example.com/v1/users/1?key=k");
}

#[test]
fn template_dispatch_applies_default_headers_and_timeout_with_per_call_overrides() {
    let (api, rx) = api("https://api.example.com/v1");
    api.dispatch.stub(
        Method::Put,
        "https://api.example.com/v1/users/1?key=k&page=2",
        Reply::status(204),
    );
    let options = DispatchOptions {
        headers: vec![
            ("X-Client".into(), "call".into()),
            ("x-extra".into(), "1".into()),
        ],
        params: vec![("page".into(), "2".into())],
        timeout: Some(Duration::from_secs(2)),
        ..DispatchOptions::default()
    };
    api.put(
        "/users/1",
        Body::Json(json!({"name": "ada"})),
        "Updated",
        options,
    )
    .unwrap();
    api.get("/users/1", "Loaded", DispatchOptions::default())
        .unwrap();

    let requests = api.dispatch.requests();
    let (put, get) = (&requests[0], &requests[1]);
    assert_eq!(put.headers().get_str("accept"), Some("application/json"));
    assert_eq!(put.headers().get_str("x-client"), Some("call"));
    assert_eq!(put.headers().get_str("x-extra"), Some("1"));
    assert_eq!(put.timeout(), Some(Duration::from_secs(2)));
    assert_eq!(put.body().map(|b| &b[..]), Some(&br#"{"name":"ada"}"#[..]));
    // The override was for that call only.
    assert_eq!(get.headers().get_str("x-client"), Some("template"));
    assert_eq!(get.headers().get_str("x-extra"), None);
    assert_eq!(get.timeout(), Some(Duration::from_secs(7)));
    // Exactly what the template's own builder gives.
    let built = api.template.get("/users/1").build().unwrap();
    assert_eq!(get, &built);

    assert!(rx.try_recv().unwrap().is_completed());
    assert!(rx.try_recv().unwrap().is_failed(), "no reply for the GET");
}

#[test]
fn template_dispatch_runs_through_an_inline_executor() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(Upstream::start()).unwrap();
    let (tx, rx) = mpsc::channel();
    let inline = InlineExecutor::builder().build_inline(tx).unwrap();
    let template = RequestTemplate::new(upstream.url("/"))
        .unwrap()
        .header("x-client", "template")
        .header("x-default", "d");
    let api = TemplateDispatch::new(template, inline);
    let options = DispatchOptions {
        headers: vec![("x-client".into(), "call".into())],
        ..DispatchOptions::default()
    };
    api.post("echo?a=1", Body::Bytes("hi".into()), "Cb", options)
        .unwrap();
    let Outcome::Completed { response, callback } = rx.try_recv().unwrap() else {
        panic!("expected a response");
    };
    assert_eq!(callback, "Cb");
    assert_eq!(response.status, 200);
    let echo: serde_json::Value =
        serde_json::from_slice(response.body.as_deref().unwrap()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "a=1");
    assert_eq!(echo["headers"]["x-client"], "call");
    assert_eq!(echo["headers"]["x-default"], "d");
    assert_eq!(echo["body"], "hi");
}

// ---------------------------------------------------------------- FakeClient

/// Application code written against the awaitable interface.
async fn load_user(
    api: &dyn AwaitableDispatch,
    base: &str,
    id: u32,
) -> Result<serde_json::Value, String> {
    let request = Request::get(format!("{base}/users/{id}"))
        .header("accept", "application/json")
        .build()
        .map_err(|e| e.to_string())?;
    let response = api.send(request).await.map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("status {}", response.status));
    }
    serde_json::from_slice(response.body.as_deref().unwrap_or_default()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_fake_client_answers_awaited_requests_and_records_them() {
    let fake = FakeClient::new();
    fake.stub(
        Method::Get,
        "https://api.example.com/users/1",
        Reply::json(200, &json!({"id": 1, "name": "ada"})),
    )
    .stub(
        Method::Get,
        "https://api.example.com/users/2",
        Reply::status(404),
    );
    let base = "https://api.example.com";
    assert_eq!(
        load_user(&fake, base, 1).await,
        Ok(json!({"id": 1, "name": "ada"}))
    );
    assert_eq!(load_user(&fake, base, 2).await, Err("status 404".into()));
    let unmatched = load_user(&fake, base, 3).await.unwrap_err();
    assert!(unmatched.contains("no canned response"), "{unmatched}");

    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].url().path(), "/users/1");
    assert_eq!(
        requests[0].headers().get("accept"),
        Some(&HeaderValue::Value("application/json".into()))
    );

    // A task's own settings apply: an error status raised as an HTTP error.
    let task = Task::new(
        Request::get("https://api.example.com/users/2")
            .build()
            .unwrap(),
        "Loaded",
    )
    .with_raise_error_responses(true);
    match fake.execute(&task).await {
        Err(TaskError::Http(error)) => assert_eq!(error.response.status, 404),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fake.tasks().last().map(|t| t.id.clone()),
        Some(task.id.clone())
    );
    fake.clear();
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn the_same_code_runs_against_the_real_awaitable_client() {
    let up = Upstream::start().await.unwrap();
    let client = AwaitableClient::builder().build_awaitable().unwrap();
    let api: Arc<dyn AwaitableDispatch> = Arc::new(client);
    // The testkit upstream has no /users route: a 404, through the same path
    // the fake answered above.
    assert_eq!(
        load_user(api.as_ref(), &up.url(""), 1).await,
        Err("status 404".into())
    );
    assert_eq!(up.requests_to("/users/1"), 1);
}
