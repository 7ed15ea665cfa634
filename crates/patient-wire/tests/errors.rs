//! The three error kinds: loading by keys, messages and round trips.

use std::time::Duration;

use patient_wire::{
    CallbackArgs, ErrorType, Headers, HttpError, Method, RedirectError, RedirectErrorKind,
    RequestError, Response, TaskError, WireErrorKind,
};
use serde_json::json;

fn args() -> CallbackArgs {
    CallbackArgs::from_value(json!({"order": 42, "retry": true})).unwrap()
}

fn http_error(status: u16) -> HttpError {
    let headers: Headers = [("content-type", "text/plain")].into_iter().collect();
    HttpError::new(Response {
        status,
        headers,
        body: Some("nope".into()),
        duration: Duration::from_millis(250),
        request_id: "req-1".into(),
        url: "https://api.example.com/orders/42".into(),
        method: Method::Post,
        callback_args: args(),
        redirects: vec![],
        attempts: vec![],
    })
}

#[test]
fn http_error_message_and_round_trip() {
    let e = http_error(503);
    assert_eq!(
        e.message(),
        "HTTP 503 response from POST https://api.example.com/orders/42"
    );
    assert_eq!(e.to_string(), e.message());
    assert!(e.is_server_error() && !e.is_client_error());
    assert!(http_error(404).is_client_error());

    let wire = e.to_json();
    assert_eq!(wire["response"]["status"], 503);
    assert_eq!(wire.as_object().map(|m| m.len()), Some(1));
    let loaded = TaskError::load(&wire).unwrap();
    assert_eq!(loaded, TaskError::Http(e.clone()));
    assert_eq!(loaded.message(), e.message());
    assert_eq!(loaded.request_id(), "req-1");
    assert_eq!(loaded.callback_args(), &args());
    assert_eq!(loaded.to_json(), wire);
}

#[test]
fn request_error_round_trip() {
    let e = RequestError {
        class_name: "Async::TimeoutError".into(),
        message: "execution expired".into(),
        backtrace: vec!["lib/a.rb:1".into()],
        request_id: "req-2".into(),
        error_type: ErrorType::Timeout,
        duration: Duration::from_millis(1020),
        url: "https://api.example.com/slow".into(),
        method: Method::Post,
        callback_args: args(),
        attempts: vec![],
    };
    let wire = e.to_json();
    assert_eq!(
        wire,
        json!({
            "class_name": "Async::TimeoutError",
            "message": "execution expired",
            "backtrace": ["lib/a.rb:1"],
            "request_id": "req-2",
            "error_type": "timeout",
            "duration": 1.02,
            "url": "https://api.example.com/slow",
            "http_method": "post",
            "callback_args": {"order": 42, "retry": true}
        })
    );
    let loaded = TaskError::load(&wire).unwrap();
    assert!(loaded.is_request());
    assert_eq!(loaded, TaskError::Request(e.clone()));
    assert_eq!(loaded.to_string(), "execution expired");
    assert!(e.is_timeout());
}

#[test]
fn every_error_type_round_trips() {
    for (t, name) in [
        (ErrorType::Timeout, "timeout"),
        (ErrorType::Connection, "connection"),
        (ErrorType::Ssl, "ssl"),
        (ErrorType::ResponseTooLarge, "response_too_large"),
        (ErrorType::Unknown, "unknown"),
    ] {
        assert_eq!(t.as_str(), name);
        assert_eq!(ErrorType::from_name(name), Some(t));
        assert_eq!(serde_json::to_value(t).unwrap(), json!(name));
    }
}

#[test]
fn redirect_errors_round_trip() {
    for kind in [
        RedirectErrorKind::TooManyRedirects,
        RedirectErrorKind::RecursiveRedirect,
    ] {
        let e = RedirectError {
            kind,
            url: "https://a.example/3".into(),
            method: Method::Get,
            duration: Duration::from_millis(400),
            request_id: "req-3".into(),
            redirects: vec!["https://a.example/1".into(), "https://a.example/2".into()],
            callback_args: CallbackArgs::new(),
        };
        let wire = e.to_json();
        assert_eq!(wire["error_class"], kind.class_name());
        assert_eq!(wire["duration"], 0.4);
        let loaded = TaskError::load(&wire).unwrap();
        assert_eq!(loaded, TaskError::Redirect(e.clone()));
        assert_eq!(loaded.to_json(), wire);
    }
}

#[test]
fn redirect_messages_match_the_gem() {
    let too_many = TaskError::load(&json!({
        "error_class": "PatientHttp::TooManyRedirectsError",
        "url": "https://a.example/6", "http_method": "get", "duration": 0.4,
        "request_id": "r", "redirects": ["https://a.example/1", "https://a.example/2"],
        "callback_args": {}
    }))
    .unwrap();
    assert_eq!(
        too_many.message(),
        "Too many redirects (2) while requesting GET https://a.example/1"
    );
    let recursive = TaskError::load(&json!({
        "error_class": "PatientHttp::RecursiveRedirectError",
        "url": "https://a.example/1", "http_method": "get", "duration": 0.1,
        "request_id": "r", "redirects": ["https://a.example/1"], "callback_args": {}
    }))
    .unwrap();
    assert_eq!(
        recursive.message(),
        "Recursive redirect detected: https://a.example/1 was already visited in redirect chain"
    );
}

#[test]
fn redirect_errors_under_the_earlier_gem_names_load() {
    for (old, kind, current) in [
        (
            "AsyncHttpPool::TooManyRedirectsError",
            RedirectErrorKind::TooManyRedirects,
            "PatientHttp::TooManyRedirectsError",
        ),
        (
            "AsyncHttpPool::RecursiveRedirectError",
            RedirectErrorKind::RecursiveRedirect,
            "PatientHttp::RecursiveRedirectError",
        ),
    ] {
        assert_eq!(RedirectErrorKind::from_class_name(old), Some(kind));
        let text = format!(
            r#"{{"error_class":"{old}","url":"https://a.example/1","http_method":"post",
            "duration":0.1,"request_id":"r","redirects":["https://a.example/1"],
            "callback_args":{{"id":3}}}}"#
        );
        let loaded: TaskError = serde_json::from_str(&text).unwrap();
        match &loaded {
            TaskError::Redirect(e) => {
                assert_eq!(e.kind, kind);
                assert_eq!(e.method, Method::Post);
                assert_eq!(e.callback_args.get("id"), Some(&json!(3)));
            }
            other => panic!("expected a redirect error, got {other:?}"),
        }
        // Written back under the current name.
        assert_eq!(loaded.to_json()["error_class"], current);
    }
    // Only those two: other names of the old namespace are still rejected.
    let err = TaskError::load(&json!({
        "error_class": "AsyncHttpPool::Error", "url": "https://a.example/", "http_method": "get",
        "duration": 0.1, "request_id": "r", "redirects": [], "callback_args": {}
    }))
    .unwrap_err();
    assert_eq!(err.path(), "error_class");
    assert!(
        err.to_string()
            .contains("AsyncHttpPool::TooManyRedirectsError"),
        "{err}"
    );
}

#[test]
fn load_rejects_other_error_classes() {
    for class in [
        "Kernel",
        "PatientHttp::Error",
        "PatientHttp::RedirectError",
        "",
    ] {
        let err = TaskError::load(&json!({
            "error_class": class, "url": "https://a.example/", "http_method": "get",
            "duration": 0.1, "request_id": "r", "redirects": [], "callback_args": {}
        }))
        .unwrap_err();
        assert_eq!(err.path(), "error_class");
        assert!(matches!(err.kind(), WireErrorKind::UnknownValue { .. }));
    }
}

#[test]
fn load_picks_the_kind_by_keys() {
    // `response` wins over `redirects`.
    let mut both = http_error(500).to_json();
    both["redirects"] = json!([]);
    assert!(TaskError::load(&both).unwrap().is_http());

    // Without `response` or `redirects` it is a request error, even with an
    // `error_class`.
    let err =
        TaskError::load(&json!({"error_class": "PatientHttp::TooManyRedirectsError"})).unwrap_err();
    assert_eq!(err.path(), "error_type");
}

#[test]
fn gem_fixtures_load() {
    let request_error = r#"{"class_name":"Errno::ECONNREFUSED","message":"Connection refused - connect(2)",
        "backtrace":null,"request_id":"9a1f","error_type":"connection","duration":0.003,
        "url":"http://localhost:9/","http_method":"get","callback_args":{"id":1}}"#;
    let e: TaskError = serde_json::from_str(request_error).unwrap();
    match &e {
        TaskError::Request(r) => {
            assert!(r.is_connection());
            assert!(r.backtrace.is_empty());
            assert_eq!(r.class_name, "Errno::ECONNREFUSED");
        }
        other => panic!("expected a request error, got {other:?}"),
    }

    let http = r#"{"response":{"status":429,"headers":{"retry-after":"3"},"body":null,"duration":0.2,
        "request_id":"77","url":"https://api.example.com/x","http_method":"put",
        "callback_args":{},"redirects":["https://api.example.com/old"]}}"#;
    let e: TaskError = serde_json::from_str(http).unwrap();
    assert_eq!(
        e.message(),
        "HTTP 429 response from PUT https://api.example.com/x"
    );
    assert_eq!(e.method(), Method::Put);
    assert_eq!(e.url(), "https://api.example.com/x");
    assert_eq!(e.duration(), Duration::from_millis(200));
}

#[test]
fn load_errors_name_nested_fields() {
    let mut wire = http_error(500).to_json();
    wire["response"]["status"] = json!("500");
    assert_eq!(
        TaskError::load(&wire).unwrap_err().path(),
        "response.status"
    );
    wire["response"] = json!(null);
    assert_eq!(TaskError::load(&wire).unwrap_err().path(), "response");

    let err = TaskError::load(&json!({
        "class_name": "X", "message": "m", "backtrace": [], "request_id": "r",
        "error_type": "exploded", "duration": 1, "url": "u", "http_method": "get"
    }))
    .unwrap_err();
    assert_eq!(err.path(), "error_type");
    assert!(TaskError::load(&json!("boom")).is_err());
}
