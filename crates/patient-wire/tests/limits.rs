//! Bounds at the wire boundary: every duration, count, length and size of a
//! request, and callback arguments wherever they are loaded.

use std::time::Duration;

use patient_wire::{
    Bound, CallbackArgs, Request, RequestOptions, RequestTemplate, RequestValidationError,
    Response, RetryOptions, TaskError, WireError, WireLimits,
};
use serde_json::{json, Map, Value};

const DAY: Duration = Duration::from_secs(86_400);

fn request_with(key: &str, value: Value) -> Value {
    let mut request = json!({"http_method": "post", "url": "http://127.0.0.1:1/", "headers": {}});
    request[key] = value;
    request
}

fn options_with(value: Value) -> Value {
    request_with("options", value)
}

/// The error is a limit error at `path` for the `limit` setting, and its
/// message names both.
#[track_caller]
fn assert_limit(error: &WireError, path: &str, limit: &str) {
    assert_eq!(error.path(), path, "{error}");
    let broken = error
        .limit()
        .unwrap_or_else(|| panic!("not a limit error: {error}"));
    assert_eq!(broken.limit(), limit, "{error}");
    let message = error.to_string();
    assert!(message.contains(path), "{message}");
    assert!(message.contains(limit), "{message}");
}

#[track_caller]
fn assert_build_limit(result: Result<Request, RequestValidationError>, field: &str, limit: &str) {
    match result {
        Err(RequestValidationError::Limit(e)) => {
            assert_eq!((e.field(), e.limit()), (field, limit), "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
        other => panic!("expected a limit error at {field}, got {other:?}"),
    }
}

#[test]
fn durations_outside_their_bounds_are_refused_when_loaded() {
    for (request, path, limit, max) in [
        (
            request_with("timeout", json!(1.8e19)),
            "timeout",
            "max_timeout",
            "86400",
        ),
        (
            request_with("timeout", json!(u64::MAX)),
            "timeout",
            "max_timeout",
            "86400",
        ),
        (
            request_with("timeout", json!(1e300)),
            "timeout",
            "max_timeout",
            "86400",
        ),
        (
            request_with("timeout", json!(-1)),
            "timeout",
            "max_timeout",
            "86400",
        ),
        (
            request_with("timeout", json!(86_400.001)),
            "timeout",
            "max_timeout",
            "86400",
        ),
        (
            // Above the bound by less than a nanosecond: the number as
            // written is over, though its duration rounds to the bound.
            options_with(json!({"retry": {"base_delay": 86_400.000_000_000_01}})),
            "options.retry.base_delay",
            "max_delay",
            "86400",
        ),
        (
            options_with(json!({"deadline": 1.8e19})),
            "options.deadline",
            "max_deadline",
            "2592000",
        ),
        (
            options_with(json!({"hedge_delays": [0.1, 1.8e19]})),
            "options.hedge_delays[1]",
            "max_delay",
            "86400",
        ),
        (
            options_with(json!({"retry": {"base_delay": 1.8e19}})),
            "options.retry.base_delay",
            "max_delay",
            "86400",
        ),
        (
            options_with(json!({"retry": {"max_delay": -0.5}})),
            "options.retry.max_delay",
            "max_delay",
            "86400",
        ),
    ] {
        let error = Request::from_json(&request).unwrap_err();
        assert_limit(&error, path, limit);
        assert!(error.to_string().contains(max), "{error}");
    }

    // At the bound is fine.
    let request = Request::from_json(&request_with("timeout", json!(86_400))).unwrap();
    assert_eq!(request.timeout(), Some(DAY));
    let options =
        RequestOptions::from_json(&json!({"deadline": 2_592_000, "hedge_delays": [86_400]}))
            .unwrap();
    assert_eq!(options.deadline, Some(DAY * 30));

    // `RequestOptions` on its own, and `Deserialize`.
    let error = RequestOptions::from_json(&json!({"deadline": 1.8e19})).unwrap_err();
    assert_limit(&error, "options.deadline", "max_deadline");
    let text = r#"{"http_method":"get","url":"http://127.0.0.1:1/","timeout":1.8e19}"#;
    let error = serde_json::from_str::<Request>(text).unwrap_err();
    assert!(error.to_string().contains("max_timeout"), "{error}");
}

#[test]
fn durations_set_in_rust_are_checked_when_built() {
    let get = || Request::get("http://127.0.0.1:1/");
    assert_build_limit(
        get().timeout(Duration::MAX).build(),
        "timeout",
        "max_timeout",
    );
    assert_build_limit(
        get().timeout(DAY + Duration::from_nanos(1)).build(),
        "timeout",
        "max_timeout",
    );
    assert_build_limit(
        get().deadline(DAY * 31).build(),
        "options.deadline",
        "max_deadline",
    );
    let hedged = RequestOptions {
        hedge_delays: vec![Duration::from_millis(50), Duration::MAX],
        ..RequestOptions::default()
    };
    assert_build_limit(
        get().request_options(hedged).build(),
        "options.hedge_delays[1]",
        "max_delay",
    );
    for (retry, field) in [
        (
            RetryOptions {
                base_delay: Some(Duration::MAX),
                ..RetryOptions::default()
            },
            "options.retry.base_delay",
        ),
        (
            RetryOptions {
                max_delay: Some(DAY * 2),
                ..RetryOptions::default()
            },
            "options.retry.max_delay",
        ),
    ] {
        let options = RequestOptions {
            retry: Some(retry),
            ..RequestOptions::default()
        };
        assert_build_limit(get().request_options(options).build(), field, "max_delay");
    }
    let template = RequestTemplate::new("http://127.0.0.1:1/v1")
        .unwrap()
        .timeout(Duration::MAX);
    assert_build_limit(template.get("x").build(), "timeout", "max_timeout");

    // At the bound, and with other limits.
    assert_eq!(get().timeout(DAY).build().unwrap().timeout(), Some(DAY));
    let long = WireLimits::default().with_max_timeout(DAY * 2);
    let built = get().timeout(DAY * 2).build_with_limits(&long).unwrap();
    assert_eq!(built.timeout(), Some(DAY * 2));
    assert!(Request::from_json_with_limits(&built.to_json(), &long).is_ok());
    assert!(Request::from_json(&built.to_json()).is_err());
}

fn headers(n: usize, value_len: usize) -> Value {
    let map: Map<String, Value> = (0..n)
        .map(|i| (format!("x-h{i}"), Value::String("v".repeat(value_len))))
        .collect();
    Value::Object(map)
}

fn secret_params(n: usize) -> Value {
    let map: Map<String, Value> = (0..n)
        .map(|i| (format!("p{i}"), json!({"$secret": "s"})))
        .collect();
    Value::Object(map)
}

#[test]
fn every_request_field_is_bounded_when_loaded() {
    let long = |n: usize| "k".repeat(n);
    let url_of_len = |n: usize| {
        let base = "http://127.0.0.1:1/";
        format!("{base}{}", "a".repeat(n - base.len()))
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            request_with("url", json!(url_of_len(65_537))),
            "url",
            "max_url_len",
        ),
        (
            request_with("headers", headers(257, 1)),
            "headers",
            "max_headers",
        ),
        (
            request_with("headers", json!({"x-big": "v".repeat(16 * 1024 + 1)})),
            "headers.x-big",
            "max_header_value_len",
        ),
        (
            request_with("headers", json!({long(257): "v"})),
            "headers",
            "max_header_name_len",
        ),
        (
            request_with("headers", headers(5, 15 * 1024)),
            "headers",
            "max_headers_size",
        ),
        (
            request_with("max_redirects", json!(101)),
            "max_redirects",
            "max_redirects",
        ),
        (
            request_with("max_redirects", json!(u64::MAX)),
            "max_redirects",
            "max_redirects",
        ),
        (
            request_with("secret_params", secret_params(65)),
            "secret_params",
            "max_secret_params",
        ),
        (
            request_with("preprocessors", json!(vec!["sigv4"; 17])),
            "preprocessors",
            "max_preprocessors",
        ),
        (
            options_with(json!({"hedge_delays": vec![0.01; 11]})),
            "options.hedge_delays",
            "max_hedge_delays",
        ),
        (
            options_with(json!({"hedge_delays": vec![0.01; 1_000_000]})),
            "options.hedge_delays",
            "max_hedge_delays",
        ),
        (
            options_with(json!({"retry": {"max_attempts": 101}})),
            "options.retry.max_attempts",
            "max_attempts",
        ),
        (
            options_with(json!({"idempotency_key": long(257)})),
            "options.idempotency_key",
            "max_key_len",
        ),
        (
            options_with(json!({"upstream_key": long(257)})),
            "options.upstream_key",
            "max_key_len",
        ),
    ];
    for (request, path, limit) in &cases {
        let error = Request::from_json(request).unwrap_err();
        assert_limit(&error, path, limit);
    }

    // Everything at its bound loads.
    let mut at_bounds = request_with("url", json!(url_of_len(65_536)));
    at_bounds["headers"] = headers(256, 200);
    at_bounds["max_redirects"] = json!(100);
    at_bounds["secret_params"] = secret_params(64);
    at_bounds["preprocessors"] = json!(vec!["sigv4"; 16]);
    at_bounds["options"] = json!({
        "hedge_delays": vec![86_400; 10],
        "retry": {"max_attempts": 100, "base_delay": 86_400, "max_delay": 86_400},
        "deadline": 2_592_000,
        "idempotency_key": long(256),
        "upstream_key": long(256),
    });
    let request = Request::from_json(&at_bounds).unwrap();
    assert_eq!(request.headers().len(), 256);
    assert_eq!(Request::from_json(&request.to_json()).unwrap(), request);
}

#[test]
fn bodies_are_bounded_once_decoded() {
    let limits = WireLimits::default().with_max_body_size(10);
    let eleven = "x".repeat(11);
    let base64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    for body in [
        json!({"encoding": "text", "value": eleven}),
        json!({"encoding": "binary", "value": base64(eleven.as_bytes())}),
        json!({"encoding": "binary", "value": base64(&[0; 100])}),
        json!({"encoding": "gzipped", "value": base64(&gzip(eleven.as_bytes()))}),
    ] {
        let request = request_with("body", body);
        let error = Request::from_json_with_limits(&request, &limits).unwrap_err();
        assert_limit(&error, "body.value", "max_body_size");
        let response = json!({
            "status": 200, "headers": {}, "body": request["body"], "duration": 1,
            "request_id": "r", "url": "http://127.0.0.1:1/", "http_method": "get"
        });
        let error = Response::from_json_with_limits(&response, &limits).unwrap_err();
        assert_limit(&error, "body.value", "max_body_size");
        let error =
            TaskError::load_with_limits(&json!({"response": response}), &limits).unwrap_err();
        assert_limit(&error, "response.body.value", "max_body_size");
    }
    let ten = request_with("body", json!({"encoding": "text", "value": "x".repeat(10)}));
    assert!(Request::from_json_with_limits(&ten, &limits).is_ok());

    // Text re-encoded into UTF-16 for its content type is counted as sent.
    let mut utf16 = request_with("body", json!({"encoding": "text", "value": "x".repeat(6)}));
    utf16["headers"] = json!({"content-type": "text/plain; charset=utf-16le"});
    let error = Request::from_json_with_limits(&utf16, &limits).unwrap_err();
    assert_limit(&error, "body.value", "max_body_size");

    // Text going back into a one-byte charset counts once encoded back:
    // twelve bytes of UTF-8 are six of ISO-8859-1.
    let mut latin1 = request_with("body", json!({"encoding": "text", "value": "é".repeat(6)}));
    latin1["headers"] = json!({"content-type": "text/plain; charset=iso-8859-1"});
    let request = Request::from_json_with_limits(&latin1, &limits).unwrap();
    assert_eq!(request.body().map(|b| b.len()), Some(6));

    // Bodies set in Rust, JSON bodies included.
    let post = || Request::post("http://127.0.0.1:1/");
    assert_build_limit(
        post().body(eleven.clone()).build_with_limits(&limits),
        "body",
        "max_body_size",
    );
    assert_build_limit(
        post()
            .json(&json!({"k": "0123456789"}))
            .build_with_limits(&limits),
        "body",
        "max_body_size",
    );
}

#[test]
fn every_request_field_is_bounded_when_built() {
    let get = || Request::get("http://127.0.0.1:1/");
    let many = (0..257).map(|i| (format!("x-h{i}"), "v"));
    assert_build_limit(get().headers(many).build(), "headers", "max_headers");
    assert_build_limit(
        get().header("x-big", "v".repeat(16 * 1024 + 1)).build(),
        "headers.x-big",
        "max_header_value_len",
    );
    assert_build_limit(
        get().header("k".repeat(257), "v").build(),
        "headers",
        "max_header_name_len",
    );
    assert_build_limit(
        get()
            .secret_header("x-secret", "s".repeat(64 * 1024))
            .build(),
        "headers",
        "max_headers_size",
    );
    assert_build_limit(
        get().param("q", "a".repeat(64 * 1024)).build(),
        "url",
        "max_url_len",
    );
    assert_build_limit(
        get().max_redirects(101).build(),
        "max_redirects",
        "max_redirects",
    );
    let mut builder = get();
    for i in 0..65 {
        builder = builder.secret_param(format!("p{i}"), "s");
    }
    assert_build_limit(builder.build(), "secret_params", "max_secret_params");
    let mut builder = get();
    for _ in 0..17 {
        builder = builder.preprocessor("sigv4");
    }
    assert_build_limit(builder.build(), "preprocessors", "max_preprocessors");
    assert_build_limit(
        get().idempotency_key("k".repeat(257)).build(),
        "options.idempotency_key",
        "max_key_len",
    );
    let options = RequestOptions {
        hedge_delays: vec![Duration::from_millis(1); 11],
        upstream_key: Some("u".repeat(257)),
        ..RequestOptions::default()
    };
    assert_build_limit(
        get().request_options(options).build(),
        "options.hedge_delays",
        "max_hedge_delays",
    );
    let options = RequestOptions {
        retry: Some(RetryOptions {
            max_attempts: Some(101),
            ..RetryOptions::default()
        }),
        ..RequestOptions::default()
    };
    assert_build_limit(
        get().request_options(options).build(),
        "options.retry.max_attempts",
        "max_attempts",
    );

    // Other limits widen or narrow each bound.
    let limits = WireLimits::default()
        .with_max_hedge_delays(20)
        .with_max_headers(1);
    let options = RequestOptions {
        hedge_delays: vec![Duration::from_millis(1); 15],
        ..RequestOptions::default()
    };
    let request = get()
        .request_options(options)
        .build_with_limits(&limits)
        .unwrap();
    assert_eq!(request.request_options().hedge_delays.len(), 15);
    assert_build_limit(
        get()
            .header("a", "1")
            .header("b", "2")
            .build_with_limits(&limits),
        "headers",
        "max_headers",
    );
}

fn nested(depth: usize) -> Value {
    // `depth` levels of arrays under the arguments object (level 1).
    let mut value = json!(1);
    for _ in 1..depth {
        value = json!([value]);
    }
    json!({"deep": value})
}

#[test]
fn callback_args_are_bounded_wherever_they_are_loaded() {
    // Depth: the arguments object is level 1.
    assert!(CallbackArgs::from_json(&nested(64)).is_ok());
    let error = CallbackArgs::from_json(&nested(66)).unwrap_err();
    assert_limit(&error, "", "max_callback_args_depth");
    let error = CallbackArgs::from_value(nested(66)).unwrap_err();
    assert!(error.reason.contains("max_callback_args_depth"), "{error}");
    let error = serde_json::from_value::<CallbackArgs>(nested(66)).unwrap_err();
    assert!(
        error.to_string().contains("max_callback_args_depth"),
        "{error}"
    );

    // Size, as compact JSON.
    let big = json!({"blob": "x".repeat(1 << 20)});
    let error = CallbackArgs::from_json(&big).unwrap_err();
    assert_limit(&error, "", "max_callback_args_size");
    let small = WireLimits::default().with_max_callback_args_size(18);
    assert!(CallbackArgs::from_json_with_limits(&json!({"a": "0123456789"}), &small).is_ok());
    let error =
        CallbackArgs::from_json_with_limits(&json!({"a": "0123456789x"}), &small).unwrap_err();
    assert_limit(&error, "", "max_callback_args_size");

    // In responses and every kind of error.
    let response = json!({
        "status": 200, "headers": {}, "body": null, "duration": 1, "request_id": "r",
        "url": "http://127.0.0.1:1/", "http_method": "get", "callback_args": nested(66)
    });
    assert_limit(
        &Response::from_json(&response).unwrap_err(),
        "callback_args",
        "max_callback_args_depth",
    );
    assert_limit(
        &TaskError::load(&json!({"response": response})).unwrap_err(),
        "response.callback_args",
        "max_callback_args_depth",
    );
    let request_error = json!({
        "class_name": "Timeout", "message": "m", "request_id": "r", "error_type": "timeout",
        "duration": 1, "url": "http://127.0.0.1:1/", "http_method": "get", "callback_args": big
    });
    assert_limit(
        &TaskError::load(&request_error).unwrap_err(),
        "callback_args",
        "max_callback_args_size",
    );
    let redirect_error = json!({
        "error_class": "PatientHttp::TooManyRedirectsError", "url": "http://127.0.0.1:1/",
        "http_method": "get", "duration": 1, "request_id": "r", "redirects": [],
        "callback_args": nested(66)
    });
    assert_limit(
        &TaskError::load(&redirect_error).unwrap_err(),
        "callback_args",
        "max_callback_args_depth",
    );
}

#[test]
fn limit_errors_say_which_bound() {
    let error = Request::from_json(&request_with("timeout", json!(1.8e19))).unwrap_err();
    let broken = error.limit().unwrap();
    assert_eq!(broken.max(), Bound::Duration(DAY));
    assert_eq!(broken.found(), Some("1.8e+19"));
    assert!(error.is_limit());
    assert_eq!(
        error.to_string(),
        "invalid `timeout`: 1.8e+19 seconds is not between 0 and the maximum of 86400 seconds \
         (`max_timeout`)"
    );
    let source = std::error::Error::source(&error).map(ToString::to_string);
    assert_eq!(source.as_deref(), Some(&*broken.to_string()));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}
