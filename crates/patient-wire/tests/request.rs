//! Requests: validation at build, JSON round trips, gem fixtures, templates.

use std::time::Duration;

use patient_wire::{
    HeaderValue, Method, Request, RequestTemplate, RequestValidationError, SecretRef, WireErrorKind,
};
use serde_json::json;

#[test]
fn builds_a_full_request() {
    let request = Request::post("https://api.example.com/users?x=1")
        .header("Accept", "application/json")
        .secret_header("Authorization", "api_key")
        .json(&json!({"name": "Ada"}))
        .param("q", "a b&c")
        .secret_param("token", "key_name")
        .timeout(Duration::from_millis(1500))
        .max_redirects(3)
        .preprocessor("sigv4")
        .build()
        .unwrap();

    assert_eq!(request.method(), Method::Post);
    assert_eq!(
        request.url().as_str(),
        "https://api.example.com/users?x=1&q=a+b%26c"
    );
    assert_eq!(
        request.content_type(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        request.body().map(|b| &b[..]),
        Some(&b"{\"name\":\"Ada\"}"[..])
    );
    assert_eq!(
        request.headers().get("AUTHORIZATION"),
        Some(&HeaderValue::Secret(SecretRef::new("api_key")))
    );
    assert_eq!(request.timeout(), Some(Duration::from_millis(1500)));
    assert_eq!(request.max_redirects(), Some(3));
    assert_eq!(
        request.secret_params().get("token"),
        Some(&SecretRef::new("key_name"))
    );
    assert_eq!(request.preprocessors(), ["sigv4"]);

    let wire = request.to_json();
    assert_eq!(
        wire,
        json!({
            "http_method": "post",
            "url": "https://api.example.com/users?x=1&q=a+b%26c",
            "headers": {
                "accept": "application/json",
                "authorization": {"$secret": "api_key"},
                "content-type": "application/json; charset=utf-8"
            },
            "body": {"encoding": "text", "value": "{\"name\":\"Ada\"}", "charset": "UTF-8"},
            "timeout": 1.5,
            "max_redirects": 3,
            "secret_params": {"token": {"$secret": "key_name"}},
            "preprocessors": ["sigv4"]
        })
    );
    assert_eq!(Request::from_json(&wire).unwrap(), request);
    let text = serde_json::to_string(&request).unwrap();
    assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
}

#[test]
fn minimal_request_omits_empty_keys() {
    let request = Request::get("https://h.example/").build().unwrap();
    let wire = request.to_json();
    assert_eq!(
        wire,
        json!({
            "http_method": "get",
            "url": "https://h.example/",
            "headers": {},
            "body": null,
            "timeout": null,
            "max_redirects": null
        })
    );
    assert_eq!(Request::from_json(&wire).unwrap(), request);
}

#[test]
fn whole_second_timeouts_are_integers() {
    let request = Request::get("https://h.example/")
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(request.to_json()["timeout"], json!(30));
}

#[test]
fn binary_and_large_bodies_round_trip() {
    let binary: Vec<u8> = (0..=255).collect();
    let request = Request::put("https://h.example/blob")
        .header("Content-Type", "application/octet-stream")
        .body(binary.clone())
        .build()
        .unwrap();
    let wire = request.to_json();
    assert_eq!(wire["body"]["encoding"], "binary");
    let loaded = Request::from_json(&wire).unwrap();
    assert_eq!(loaded.body().map(|b| b.to_vec()), Some(binary));

    let large = "{\"k\":\"".to_owned() + &"v".repeat(10_000) + "\"}";
    let request = Request::patch("https://h.example/doc")
        .header("content-type", "application/json")
        .body(large.clone())
        .build()
        .unwrap();
    let wire = request.to_json();
    assert_eq!(wire["body"]["encoding"], "gzipped");
    assert_eq!(Request::from_json(&wire).unwrap(), request);
}

#[test]
fn latin1_body_round_trips_to_the_same_bytes() {
    let body = vec![b'c', b'a', b'f', 0xE9];
    let request = Request::post("https://h.example/")
        .header("content-type", "text/plain; charset=iso-8859-1")
        .body(body.clone())
        .build()
        .unwrap();
    let wire = request.to_json();
    assert_eq!(wire["body"]["value"], "café");
    let loaded = Request::from_json(&wire).unwrap();
    assert_eq!(loaded.body().map(|b| b.to_vec()), Some(body));
    assert_eq!(loaded.to_json(), wire);
}

#[test]
fn gem_fixture_loads() {
    // As the Ruby gem's Request#as_json writes it.
    let fixture = r#"{
        "http_method": "post",
        "url": "https://api.example.com/users/1?x=1",
        "headers": {"authorization": {"$secret": "api_key"}, "accept": "application/json",
                    "content-type": "application/json; charset=utf-8"},
        "body": {"encoding": "text", "value": "{\"a\":1}", "charset": "UTF-8"},
        "timeout": 30,
        "max_redirects": null,
        "secret_params": {"api_key": {"$secret": "key_name"}},
        "preprocessors": ["sigv4"]
    }"#;
    let request: Request = serde_json::from_str(fixture).unwrap();
    assert_eq!(request.method(), Method::Post);
    assert_eq!(
        request.url().as_str(),
        "https://api.example.com/users/1?x=1"
    );
    assert_eq!(
        request.headers().get_str("accept"),
        Some("application/json")
    );
    assert_eq!(request.body().map(|b| &b[..]), Some(&b"{\"a\":1}"[..]));
    assert_eq!(request.timeout(), Some(Duration::from_secs(30)));
    assert_eq!(request.max_redirects(), None);
    assert_eq!(request.secret_params()["api_key"].name, "key_name");
    assert_eq!(request.preprocessors(), ["sigv4"]);

    // The gem's minimal form: no headers key content, body null, an upper-case
    // method from an older writer.
    let minimal = json!({"http_method": "GET", "url": "http://h.example/x", "headers": {},
                         "body": null, "timeout": 2.5, "max_redirects": 0});
    let request = Request::from_json(&minimal).unwrap();
    assert_eq!(request.method(), Method::Get);
    assert_eq!(request.timeout(), Some(Duration::from_millis(2500)));
    assert_eq!(request.max_redirects(), Some(0));
}

#[test]
fn validation_errors_at_build() {
    for method in [Method::Get, Method::Delete, Method::Head, Method::Options] {
        let err = Request::builder(method, "https://h.example/")
            .body("x")
            .build()
            .unwrap_err();
        assert_eq!(err, RequestValidationError::BodyNotAllowed { method });
        let err = Request::builder(method, "https://h.example/")
            .json(&json!({}))
            .build()
            .unwrap_err();
        assert_eq!(err, RequestValidationError::BodyNotAllowed { method });
    }
    // An empty body is no body.
    assert!(Request::get("https://h.example/").body("").build().is_ok());

    let err = Request::post("https://h.example/")
        .body("x")
        .json(&json!(1))
        .build()
        .unwrap_err();
    assert_eq!(err, RequestValidationError::BodyAndJson);

    let err = Request::get("not a url").build().unwrap_err();
    assert!(
        matches!(err, RequestValidationError::InvalidUrl { ref url, .. } if url == "not a url")
    );
    let err = Request::get("ftp://h.example/file").build().unwrap_err();
    assert_eq!(
        err,
        RequestValidationError::UnsupportedScheme {
            scheme: "ftp".into()
        }
    );
    assert!(err.to_string().contains("ftp"));

    let err = Request::get("https://h.example/")
        .header("Bad Name", "x")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        RequestValidationError::InvalidHeaderName {
            name: "Bad Name".into()
        }
    );
    let err = Request::get("https://h.example/")
        .header("X-Ok", "a\r\nInjected: 1")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        RequestValidationError::InvalidHeaderValue {
            name: "x-ok".into()
        }
    );
    let err = Request::get("https://h.example/")
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err, RequestValidationError::InvalidTimeout);
    let err = Request::get("https://h.example/")
        .secret_param("key", "")
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        RequestValidationError::EmptySecretName { .. }
    ));
}

#[test]
fn json_keeps_a_given_content_type() {
    let request = Request::post("https://h.example/")
        .header("Content-Type", "application/vnd.api+json")
        .json(&json!({"a": [1, 2]}))
        .build()
        .unwrap();
    assert_eq!(request.content_type(), Some("application/vnd.api+json"));
}

#[test]
fn later_headers_replace_earlier_ones() {
    let request = Request::get("https://h.example/")
        .header("Accept", "text/html")
        .header("accept", "application/json")
        .build()
        .unwrap();
    assert_eq!(request.headers().len(), 1);
    assert_eq!(
        request.headers().get_str("Accept"),
        Some("application/json")
    );
}

#[test]
fn loading_names_the_bad_field() {
    let base = json!({"http_method": "post", "url": "https://h.example/", "headers": {},
                      "body": null, "timeout": null, "max_redirects": null});
    let with = |key: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[key] = value;
        Request::from_json(&v).unwrap_err()
    };

    let err = with("http_method", json!("trace"));
    assert_eq!(err.path(), "http_method");
    assert!(matches!(err.kind(), WireErrorKind::UnknownValue { .. }));
    assert_eq!(with("url", json!("ftp://x/")).path(), "url");
    assert_eq!(with("url", json!(7)).path(), "url");
    assert_eq!(with("timeout", json!(-1)).path(), "timeout");
    assert_eq!(with("timeout", json!("30")).path(), "timeout");
    assert_eq!(with("timeout", json!(0)).path(), "timeout");
    assert_eq!(with("max_redirects", json!(-1)).path(), "max_redirects");
    assert_eq!(with("max_redirects", json!(1.5)).path(), "max_redirects");
    assert_eq!(with("headers", json!({"x-a": 1})).path(), "headers.x-a");
    assert_eq!(
        with("headers", json!({"x-a": "a\nb"})).path(),
        "headers.x-a"
    );
    assert_eq!(with("headers", json!({"bad name": "v"})).path(), "headers");
    assert_eq!(
        with("body", json!({"encoding": "binary", "value": "!!"})).path(),
        "body.value"
    );
    assert_eq!(
        with("body", json!({"encoding": "nope", "value": ""})).path(),
        "body.encoding"
    );
    assert_eq!(
        with("secret_params", json!({"k": "plain"})).path(),
        "secret_params.k"
    );
    assert_eq!(
        with("preprocessors", json!(["a", 2])).path(),
        "preprocessors[1]"
    );

    let mut get = base.clone();
    get["http_method"] = json!("get");
    get["body"] = json!({"encoding": "text", "value": "x", "charset": "UTF-8"});
    let err = Request::from_json(&get).unwrap_err();
    assert_eq!(err.path(), "body");
    assert!(matches!(
        err.kind(),
        WireErrorKind::Request(RequestValidationError::BodyNotAllowed {
            method: Method::Get
        })
    ));

    let err = Request::from_json(&json!({"url": "https://h/"})).unwrap_err();
    assert_eq!(err.path(), "http_method");
    assert!(err.is_missing());
    assert!(Request::from_json(&json!([])).is_err());
}

#[test]
fn to_builder_derives_a_changed_request() {
    let request = Request::post("https://h.example/a")
        .header("x-a", "1")
        .body("payload")
        .build()
        .unwrap();
    let changed = request
        .to_builder()
        .header("x-b", "2")
        .param("hop", "2")
        .build()
        .unwrap();
    assert_eq!(changed.url().as_str(), "https://h.example/a?hop=2");
    assert_eq!(changed.headers().get_str("x-a"), Some("1"));
    assert_eq!(changed.body(), request.body());
}

#[test]
fn template_builds_requests_and_never_changes() {
    let template = RequestTemplate::new("https://api.example.com/v1")
        .unwrap()
        .header("Accept", "application/json")
        .secret_header("Authorization", "api_key")
        .timeout(Duration::from_secs(10));
    let before = template.clone();

    let request = template
        .get("/users/1")
        .header("accept", "text/csv")
        .param("page", "2")
        .build()
        .unwrap();
    assert_eq!(
        request.url().as_str(),
        "https://api.example.com/v1/users/1?page=2"
    );
    assert_eq!(request.headers().get_str("accept"), Some("text/csv"));
    assert!(request
        .headers()
        .get("authorization")
        .is_some_and(HeaderValue::is_secret));
    assert_eq!(request.timeout(), Some(Duration::from_secs(10)));

    let other = template
        .post("users")
        .json(&json!({"a": 1}))
        .build()
        .unwrap();
    assert_eq!(other.url().as_str(), "https://api.example.com/v1/users");
    assert_eq!(other.headers().get_str("accept"), Some("application/json"));

    assert_eq!(template, before);
    assert_eq!(
        template.default_headers().get_str("accept"),
        Some("application/json")
    );

    for (method, builder) in [
        (Method::Get, template.get("x")),
        (Method::Post, template.post("x")),
        (Method::Put, template.put("x")),
        (Method::Patch, template.patch("x")),
        (Method::Delete, template.delete("x")),
        (Method::Head, template.head("x")),
        (Method::Options, template.options("x")),
    ] {
        assert_eq!(builder.build().unwrap().method(), method);
    }
}

#[test]
fn template_params_come_before_request_params() {
    let template = RequestTemplate::new("https://h.example/api?v=1")
        .unwrap()
        .param("key", "k");
    let request = template
        .get("items?sort=asc")
        .param("page", "3")
        .build()
        .unwrap();
    assert_eq!(
        request.url().as_str(),
        "https://h.example/api/items?v=1&sort=asc&key=k&page=3"
    );
}

#[test]
fn an_idempotency_key_header_counts_as_an_idempotency_key() {
    let url = "https://api.example.com/orders";
    assert!(!Request::post(url).build().unwrap().has_idempotency_key());
    assert!(Request::post(url)
        .idempotency_key("order-17")
        .build()
        .unwrap()
        .has_idempotency_key());
    for name in ["Idempotency-Key", "idempotency-key", "X-Idempotency-Key"] {
        let request = Request::post(url).header(name, "order-17").build().unwrap();
        assert!(request.has_idempotency_key(), "{name}");
        let secret = Request::post(url)
            .secret_header(name, "key")
            .build()
            .unwrap();
        assert!(secret.has_idempotency_key(), "{name} as a secret");
    }
    // A blank value is no key; neither is another header.
    let blank = Request::post(url)
        .header("Idempotency-Key", " ")
        .build()
        .unwrap();
    assert!(!blank.has_idempotency_key());
    let other = Request::post(url)
        .header("X-Request-Id", "order-17")
        .build()
        .unwrap();
    assert!(!other.has_idempotency_key());
}
