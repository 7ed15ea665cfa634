//! The in-memory dispatch double: recorded tasks, canned replies, outcomes
//! delivered synchronously.

use std::sync::mpsc;

use patient_http::testing::{FakeDispatch, Reply, NO_CANNED_RESPONSE};
use patient_http::{
    Body, CallbackArgs, Dispatch, DispatchOptions, ErrorType, Method, Outcome, TaskError,
};
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
