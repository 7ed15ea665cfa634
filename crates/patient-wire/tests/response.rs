//! Responses: predicates, JSON body access, round trips and gem fixtures.

use std::time::Duration;

use patient_wire::{CallbackArgs, Headers, Method, Response, ResponseJsonError};
use serde_json::{json, Value};

fn response(status: u16, content_type: Option<&str>, body: Option<&[u8]>) -> Response {
    let mut headers = Headers::new();
    if let Some(ct) = content_type {
        headers.insert("Content-Type", ct);
    }
    let mut callback_args = CallbackArgs::new();
    callback_args.insert("user_id", 123);
    Response {
        status,
        headers,
        body: body.map(|b| b.to_vec().into()),
        duration: Duration::from_millis(183),
        request_id: "0b6e3c1e-4f5a-4c2b-9f0e-3c1d2e4f5a6b".into(),
        url: "https://api.example.com/users/1".into(),
        method: Method::Get,
        callback_args,
        redirects: vec!["https://old.example.com/users/1".into()],
        attempts: vec![],
    }
}

#[test]
fn status_predicates() {
    let r = |s| response(s, None, None);
    assert!(r(200).is_success() && r(299).is_success() && !r(300).is_success());
    assert!(r(301).is_redirect() && !r(400).is_redirect());
    assert!(r(404).is_client_error() && r(404).is_error() && !r(404).is_server_error());
    assert!(r(503).is_server_error() && r(503).is_error() && !r(503).is_client_error());
    assert!(!r(204).is_error() && !r(302).is_error());
}

#[test]
fn json_body() {
    let r = response(200, Some("application/json"), Some(b"{\"id\": 7}"));
    let v: Value = r.json().unwrap();
    assert_eq!(v, json!({"id": 7}));

    #[derive(serde::Deserialize)]
    struct User {
        id: u32,
    }
    let r = response(200, Some("application/problem+json"), Some(b"{\"id\": 7}"));
    assert_eq!(r.json::<User>().unwrap().id, 7);
}

#[test]
fn json_refuses_non_json_content_types() {
    let r = response(200, Some("text/html"), Some(b"{}"));
    let err = r.json::<Value>().unwrap_err();
    assert!(err.is_not_json());
    assert!(err.to_string().contains("text/html"), "{err}");

    let err = response(200, None, Some(b"{}"))
        .json::<Value>()
        .unwrap_err();
    assert!(matches!(
        err,
        ResponseJsonError::NotJson { content_type: None }
    ));

    let err = response(200, Some("application/json"), None)
        .json::<Value>()
        .unwrap_err();
    assert!(matches!(err, ResponseJsonError::MissingBody));

    let err = response(200, Some("application/json"), Some(b"{"))
        .json::<Value>()
        .unwrap_err();
    assert!(matches!(err, ResponseJsonError::Parse(_)));
}

#[test]
fn text_decodes_the_declared_charset() {
    let r = response(
        200,
        Some("text/plain; charset=iso-8859-1"),
        Some(b"caf\xe9"),
    );
    assert_eq!(r.text().as_deref(), Some("café"));
    assert_eq!(response(200, None, None).text(), None);
}

#[test]
fn round_trips_with_the_wire_shape() {
    let r = response(200, Some("application/json"), Some(b"{\"id\":1}"));
    let wire = r.to_json();
    assert_eq!(
        wire,
        json!({
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": {"encoding": "text", "value": "{\"id\":1}", "charset": "UTF-8"},
            "duration": 0.183,
            "request_id": "0b6e3c1e-4f5a-4c2b-9f0e-3c1d2e4f5a6b",
            "url": "https://api.example.com/users/1",
            "http_method": "get",
            "callback_args": {"user_id": 123},
            "redirects": ["https://old.example.com/users/1"]
        })
    );
    assert_eq!(Response::from_json(&wire).unwrap(), r);
    let text = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
}

#[test]
fn bodiless_and_binary_responses_round_trip() {
    let r = response(204, None, None);
    let wire = r.to_json();
    assert_eq!(wire["body"], Value::Null);
    assert_eq!(Response::from_json(&wire).unwrap(), r);

    let r = response(
        200,
        Some("image/png"),
        Some(&[0x89, b'P', b'N', b'G', 0, 0xff]),
    );
    let wire = r.to_json();
    assert_eq!(wire["body"]["encoding"], "binary");
    assert_eq!(Response::from_json(&wire).unwrap(), r);

    let big = "<p>".repeat(5000);
    let r = response(200, Some("text/html"), Some(big.as_bytes()));
    let wire = r.to_json();
    assert_eq!(wire["body"]["encoding"], "gzipped");
    assert_eq!(Response::from_json(&wire).unwrap(), r);
}

#[test]
fn repeated_headers_are_joined() {
    let mut r = response(200, None, None);
    r.headers = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
        .into_iter()
        .collect();
    assert_eq!(r.to_json()["headers"], json!({"set-cookie": "a=1, b=2"}));
}

#[test]
fn gem_fixture_loads() {
    let fixture = r#"{"status":404,"headers":{"content-type":"application/json; charset=utf-8","x-request-id":"abc"},
        "body":{"encoding":"text","value":"{\"error\":\"not found\"}","charset":"UTF-8"},
        "duration":0.0421,"request_id":"5f0c","url":"https://api.example.com/users/9",
        "http_method":"delete","callback_args":{"user_id":9,"tags":["a",1.5,null,{"k":true}]},"redirects":[]}"#;
    let r: Response = serde_json::from_str(fixture).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.is_client_error());
    assert_eq!(r.method, Method::Delete);
    assert_eq!(r.duration, Duration::from_secs_f64(0.0421));
    assert_eq!(r.header("X-Request-Id"), Some("abc"));
    assert_eq!(r.json::<Value>().unwrap(), json!({"error": "not found"}));
    assert_eq!(r.callback_args.get("user_id"), Some(&json!(9)));
    assert!(r.redirects.is_empty());

    // Older writers left callback_args and redirects out.
    let sparse = json!({"status": 200, "headers": {}, "body": null, "duration": 1,
                        "request_id": "x", "url": "http://h/", "http_method": "get"});
    let r = Response::from_json(&sparse).unwrap();
    assert!(r.callback_args.is_empty() && r.redirects.is_empty());
}

#[test]
fn loading_names_the_bad_field() {
    let good = response(200, None, None).to_json();
    let with = |key: &str, value: Value| {
        let mut v = good.clone();
        v[key] = value;
        Response::from_json(&v).unwrap_err().path().to_owned()
    };
    assert_eq!(with("status", json!(70000)), "status");
    assert_eq!(with("status", json!("200")), "status");
    assert_eq!(with("duration", json!(-0.5)), "duration");
    assert_eq!(with("http_method", json!("fetch")), "http_method");
    assert_eq!(with("redirects", json!(["a", 1])), "redirects[1]");
    assert_eq!(with("callback_args", json!([1])), "callback_args");
    assert_eq!(with("request_id", Value::Null), "request_id");
}
