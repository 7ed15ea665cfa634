//! Every wire decoder driven with arbitrary JSON: fully random values, and
//! valid values with hostile numbers, strings, sizes and payloads mutated
//! in. No decoder may panic, and whatever one accepts keeps to the limits.
//!
//! Each property runs proptest's default number of cases (256), a few
//! seconds in all; set `PROPTEST_CASES` to run more.

use std::{io::Write as _, time::Duration};

use base64::Engine as _;
use patient_wire::{
    is_encrypted, is_secret_ref, is_storage_ref, CallbackArgs, EncryptedEnvelope, Headers,
    HttpError, Payload, RedirectError, Request, RequestError, RequestOptions, Response, SecretRef,
    StorageRef, TaskError, WireLimits,
};
use proptest::{collection, prelude::*, sample::select};
use serde_json::{json, Map, Value};

/// Limits small enough that bombs and long values are cheap to build.
fn small_limits() -> WireLimits {
    WireLimits::default()
        .with_max_body_size(16 * 1024)
        .with_max_headers(8)
        .with_max_headers_size(4096)
        .with_max_header_value_len(1024)
        .with_max_url_len(2048)
        .with_max_callback_args_depth(6)
        .with_max_callback_args_size(4096)
        .with_max_timeout(Duration::from_secs(60))
        .with_max_deadline(Duration::from_secs(600))
        .with_max_delay(Duration::from_secs(5))
        .with_max_hedge_delays(3)
        .with_max_attempts(5)
        .with_max_redirects(5)
        .with_max_key_len(16)
        .with_max_secret_params(2)
        .with_max_preprocessors(2)
}

const KEYS: &[&str] = &[
    "http_method",
    "url",
    "headers",
    "body",
    "timeout",
    "max_redirects",
    "secret_params",
    "preprocessors",
    "options",
    "retry",
    "max_attempts",
    "base_delay",
    "factor",
    "max_delay",
    "statuses",
    "retry_unsafe",
    "strategy",
    "hedge_delays",
    "deadline",
    "deadline_mode",
    "priority",
    "idempotency_key",
    "upstream_key",
    "encoding",
    "value",
    "charset",
    "status",
    "duration",
    "request_id",
    "http_method",
    "callback_args",
    "redirects",
    "attempts",
    "attempt",
    "hedged",
    "response",
    "error_class",
    "error_type",
    "class_name",
    "message",
    "backtrace",
    "content-type",
    "$secret",
    "$ref",
    "store",
    "key",
    "__encrypted__",
];

const HOSTILE_NUMBERS: &[f64] = &[
    0.0,
    -0.0,
    -1.0,
    1e-9,
    0.5,
    1.0,
    5.0,
    60.0,
    86_400.0,
    86_400.000_001,
    2_592_000.0,
    1.8e19,
    1.8446744073709552e19,
    9.3e18,
    1e300,
    -1e300,
    f64::MAX,
    f64::MIN,
    4_294_967_296.0,
];

const HOSTILE_STRINGS: &[&str] = &[
    "",
    " ",
    "get",
    "POST",
    "fetch",
    "http://127.0.0.1:1/",
    "https://u:p@h.example/x",
    "http://:p@h/",
    "http://u:%FF@h/",
    "ftp://h/",
    "http://h:99999/",
    "//h/x",
    "a\r\nb",
    "\u{0}",
    "text",
    "gzipped",
    "binary",
    "UTF-8",
    "ISO-8859-1",
    "utf-16le",
    "ASCII-8BIT",
    "text/plain; charset=utf-16le",
    "text/html; charset=iso-8859-1",
    "application/json",
    "hedged",
    "single",
    "sequential",
    "split",
    "pass_through",
    "high",
    "low",
    "PatientHttp::TooManyRedirectsError",
    "PatientHttp::RecursiveRedirectError",
    "timeout",
    "connection",
    "H4sI",
    "====",
    "é",
    "\u{10FFFF}",
    "%00",
    "$secret",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(KEYS).prop_map(str::to_owned),
        1 => "[a-zA-Z$_-]{0,6}",
    ]
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("a JSON number is finite", |f| {
            serde_json::Number::from_f64(f).map(Value::Number)
        }),
        select(HOSTILE_NUMBERS).prop_map(|f| json!(f)),
        (0_u64..700).prop_map(Value::from),
    ]
    .boxed()
}

fn string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        4 => select(HOSTILE_STRINGS).prop_map(str::to_owned),
        1 => (0_usize..40_000, select(&["a", "é", "%", "\n"][..])).prop_map(|(n, s)| s.repeat(n)),
    ]
    .boxed()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// A payload object, valid or nearly: text, Base64 of bytes, gzip of bytes,
/// a small gzip bomb, a truncated gzip, junk.
fn payload() -> BoxedStrategy<Value> {
    let value = prop_oneof![
        string(),
        collection::vec(any::<u8>(), 0..256).prop_map(|b| b64(&b)),
        collection::vec(any::<u8>(), 0..256).prop_map(|b| b64(&gzip(&b))),
        (0_usize..64 * 1024).prop_map(|n| b64(&gzip(&vec![0; n]))),
        (
            collection::vec(any::<u8>(), 1..64),
            any::<prop::sample::Index>()
        )
            .prop_map(|(b, i)| {
                let gz = gzip(&b);
                b64(&gz[..i.index(gz.len())])
            }),
    ];
    let encoding = prop_oneof![
        select(&["text", "gzipped", "binary"][..]).prop_map(Value::from),
        string().prop_map(Value::from),
        Just(Value::Null),
    ];
    let charset = prop_oneof![
        select(&["UTF-8", "ASCII-8BIT", "utf8", "ISO-8859-1"][..]).prop_map(Value::from),
        Just(Value::Null),
        number(),
    ];
    (encoding, value, charset)
        .prop_map(|(encoding, value, charset)| {
            json!({"encoding": encoding, "value": value, "charset": charset})
        })
        .boxed()
}

/// Any JSON value, a few levels deep, keys mostly the wire format's own.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            payload(),
        ]
    })
    .boxed()
}

/// Numbers on either side of the bounds of the default and the small
/// limits.
const NEAR_BOUNDS: &[f64] = &[
    0.0,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    5.000_001,
    6.0,
    10.0,
    11.0,
    16.0,
    17.0,
    60.0,
    60.5,
    99.0,
    100.0,
    101.0,
    256.0,
    257.0,
    599.0,
    600.0,
    601.0,
    86_400.0,
    86_401.0,
    2_592_000.0,
    2_592_001.0,
];

/// Something hostile to put somewhere valid.
fn hostile() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => number(),
        3 => string().prop_map(Value::String),
        2 => json_value(),
        2 => payload(),
        1 => (0_usize..40, number()).prop_map(|(n, v)| Value::Array(vec![v; n])),
        1 => (0_usize..300, 0_usize..300).prop_map(|(n, len)| {
            let map: Map<String, Value> = (0..n)
                .map(|i| (format!("x-h{i}"), Value::String("v".repeat(len))))
                .collect();
            Value::Object(map)
        }),
        1 => (0_usize..100).prop_map(|depth| {
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            json!({"deep": v})
        }),
    ]
    .boxed()
}

/// What a field holds, to mutate it mostly into a value of its own kind.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Seconds or a count.
    Number,
    /// A string.
    Text,
    /// A list of numbers (hedge delays, statuses).
    Numbers,
    /// A list of strings (preprocessors, redirects).
    Texts,
    /// A header map (or callback arguments).
    Map,
    /// A payload.
    Body,
    /// Anything.
    Any,
}

fn of_kind(kind: Kind) -> BoxedStrategy<Value> {
    let near_bound = || {
        select(NEAR_BOUNDS)
            .prop_map(|f| {
                if f.fract() == 0.0 {
                    json!(f as u64)
                } else {
                    json!(f)
                }
            })
            .boxed()
    };
    let kind = match kind {
        Kind::Number => prop_oneof![3 => near_bound(), 1 => number()].boxed(),
        Kind::Text => prop_oneof![
            string().prop_map(Value::String),
            (0_usize..300, select(&["k", "é", "%2F"][..])).prop_map(|(n, s)| json!(s.repeat(n))),
        ]
        .boxed(),
        Kind::Numbers => prop_oneof![
            (0_usize..12, near_bound()).prop_map(|(n, v)| Value::Array(vec![v; n])),
            collection::vec(number(), 0..12).prop_map(Value::Array),
        ]
        .boxed(),
        Kind::Texts => collection::vec(string().prop_map(Value::String), 0..20)
            .prop_map(Value::Array)
            .boxed(),
        Kind::Map => (0_usize..300, 0_usize..300)
            .prop_map(|(n, len)| {
                let map: Map<String, Value> = (0..n)
                    .map(|i| (format!("x-h{i}"), Value::String("v".repeat(len))))
                    .collect();
                Value::Object(map)
            })
            .boxed(),
        Kind::Body => payload(),
        Kind::Any => hostile(),
    };
    prop_oneof![4 => kind, 1 => hostile()].boxed()
}

const REQUEST_PATHS: &[(&str, Kind)] = &[
    ("/http_method", Kind::Text),
    ("/url", Kind::Text),
    ("/headers", Kind::Map),
    ("/headers/content-type", Kind::Text),
    ("/headers/x-a", Kind::Text),
    ("/headers/authorization", Kind::Any),
    ("/body", Kind::Body),
    ("/body/value", Kind::Text),
    ("/body/encoding", Kind::Text),
    ("/body/charset", Kind::Text),
    ("/timeout", Kind::Number),
    ("/max_redirects", Kind::Number),
    ("/secret_params", Kind::Any),
    ("/secret_params/token", Kind::Any),
    ("/preprocessors", Kind::Texts),
    ("/preprocessors/0", Kind::Text),
    ("/options", Kind::Any),
    ("/options/retry", Kind::Any),
    ("/options/retry/max_attempts", Kind::Number),
    ("/options/retry/base_delay", Kind::Number),
    ("/options/retry/factor", Kind::Number),
    ("/options/retry/max_delay", Kind::Number),
    ("/options/retry/statuses", Kind::Numbers),
    ("/options/retry/statuses/0", Kind::Number),
    ("/options/strategy", Kind::Text),
    ("/options/hedge_delays", Kind::Numbers),
    ("/options/hedge_delays/0", Kind::Number),
    ("/options/deadline", Kind::Number),
    ("/options/deadline_mode", Kind::Text),
    ("/options/priority", Kind::Text),
    ("/options/idempotency_key", Kind::Text),
    ("/options/upstream_key", Kind::Text),
];

const RESPONSE_PATHS: &[(&str, Kind)] = &[
    ("/status", Kind::Number),
    ("/headers", Kind::Map),
    ("/headers/content-type", Kind::Text),
    ("/body", Kind::Body),
    ("/body/value", Kind::Text),
    ("/body/encoding", Kind::Text),
    ("/duration", Kind::Number),
    ("/request_id", Kind::Text),
    ("/url", Kind::Text),
    ("/http_method", Kind::Text),
    ("/callback_args", Kind::Any),
    ("/callback_args/a", Kind::Any),
    ("/redirects", Kind::Texts),
    ("/redirects/0", Kind::Text),
    ("/attempts", Kind::Any),
    ("/attempts/0", Kind::Any),
    ("/attempts/0/duration", Kind::Number),
    ("/attempts/0/attempt", Kind::Number),
    ("/attempts/0/status", Kind::Number),
    ("/attempts/0/error_type", Kind::Text),
];

const ERROR_PATHS: &[(&str, Kind)] = &[
    ("/class_name", Kind::Text),
    ("/message", Kind::Text),
    ("/backtrace", Kind::Texts),
    ("/request_id", Kind::Text),
    ("/error_type", Kind::Text),
    ("/duration", Kind::Number),
    ("/url", Kind::Text),
    ("/http_method", Kind::Text),
    ("/callback_args", Kind::Any),
    ("/error_class", Kind::Text),
    ("/redirects", Kind::Texts),
    ("/response", Kind::Any),
    ("/response/body", Kind::Body),
    ("/response/callback_args", Kind::Any),
    ("/response/status", Kind::Number),
];

/// Up to two fields of a path list set to mutated values.
fn mutations(paths: &'static [(&'static str, Kind)]) -> BoxedStrategy<Vec<(&'static str, Value)>> {
    let one = select(paths).prop_flat_map(|(path, kind)| (Just(path), of_kind(kind)));
    collection::vec(one, 1..3).boxed()
}

fn valid_request() -> Value {
    json!({
        "http_method": "post",
        "url": "https://api.example.com/v1/users?x=1",
        "headers": {"content-type": "text/plain; charset=utf-8", "x-a": "1",
                    "authorization": {"$secret": "api_key"}},
        "body": {"encoding": "text", "value": "hello", "charset": "UTF-8"},
        "timeout": 5,
        "max_redirects": 3,
        "secret_params": {"token": {"$secret": "key_name"}},
        "preprocessors": ["sigv4"],
        "options": {
            "retry": {"max_attempts": 3, "base_delay": 0.1, "factor": 2.0, "max_delay": 2,
                      "statuses": [429, 503], "retry_unsafe": false},
            "strategy": "hedged", "hedge_delays": [0.05, 0.1], "deadline": 30,
            "deadline_mode": "split", "priority": "high", "idempotency_key": "order-17",
            "upstream_key": "openai"
        }
    })
}

fn valid_response() -> Value {
    json!({
        "status": 200, "headers": {"content-type": "application/json"},
        "body": {"encoding": "text", "value": "{}", "charset": "UTF-8"},
        "duration": 0.25, "request_id": "r-1", "url": "https://api.example.com/v1",
        "http_method": "get", "callback_args": {"a": 1}, "redirects": ["https://old.example/"],
        "attempts": [
            {"attempt": 1, "status": 503, "error_type": null, "class_name": null,
             "duration": 0.1, "hedged": false},
            {"attempt": 2, "status": 200, "error_type": null, "class_name": null,
             "duration": 0.1, "hedged": true}
        ]
    })
}

fn valid_errors() -> Vec<Value> {
    vec![
        json!({"class_name": "Timeout", "message": "m", "backtrace": ["a"], "request_id": "r",
               "error_type": "timeout", "duration": 1, "url": "https://h.example/",
               "http_method": "get", "callback_args": {}}),
        json!({"error_class": "PatientHttp::TooManyRedirectsError", "url": "https://h.example/",
               "http_method": "get", "duration": 0.4, "request_id": "r",
               "redirects": ["https://h.example/1"], "callback_args": {"a": [1]}}),
        json!({"response": valid_response()}),
    ]
}

/// Sets the value at a JSON pointer, when its parent exists.
fn set(root: &mut Value, pointer: &str, value: Value) {
    let (parent, last) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    match root.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last.to_owned(), value);
        }
        Some(Value::Array(items)) => {
            if let Some(slot) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *slot = value;
            }
        }
        _ => {}
    }
}

fn mutated(base: Value, paths: &'static [(&'static str, Kind)]) -> BoxedStrategy<Value> {
    mutations(paths)
        .prop_map(move |mutations| {
            let mut value = base.clone();
            for (path, v) in mutations {
                set(&mut value, path, v);
            }
            value
        })
        .boxed()
}

fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn check_callback_args(args: &CallbackArgs, limits: &WireLimits) {
    assert!(json_depth(&args.to_json()) <= limits.max_callback_args_depth);
    let size = serde_json::to_vec(args)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    assert!(size <= limits.max_callback_args_size, "{size}");
}

/// What an accepted request must keep to.
fn check_request(r: &Request, limits: &WireLimits) {
    assert!(r.url().as_str().len() <= limits.max_url_len);
    assert_eq!(r.url().username(), "", "{}", r.url());
    assert_eq!(r.url().password(), None, "{}", r.url());
    assert!(r.body().is_none_or(|b| b.len() <= limits.max_body_size));
    assert!(r
        .timeout()
        .is_none_or(|t| !t.is_zero() && t <= limits.max_timeout));
    assert!(r.max_redirects().is_none_or(|n| n <= limits.max_redirects));
    assert!(r.headers().len() <= limits.max_headers);
    let mut size = 0;
    for (name, value) in r.headers().iter() {
        assert!(name.len() <= limits.max_header_name_len);
        if let Some(v) = value.as_str() {
            assert!(v.len() <= limits.max_header_value_len);
            size += name.len() + v.len();
        }
    }
    assert!(size <= limits.max_headers_size);
    assert!(r.secret_params().len() <= limits.max_secret_params);
    assert!(r.preprocessors().len() <= limits.max_preprocessors);
    check_options(r.request_options(), limits);

    // What was accepted serializes to what loads again, the same.
    let wire = r.to_json();
    let again =
        Request::from_json_with_limits(&wire, limits).unwrap_or_else(|e| panic!("{e}: {wire}"));
    assert_eq!(again.to_json(), wire);
}

fn check_options(o: &RequestOptions, limits: &WireLimits) {
    assert!(o.hedge_delays.len() <= limits.max_hedge_delays);
    assert!(o.hedge_delays.iter().all(|d| *d <= limits.max_delay));
    assert!(o.deadline.is_none_or(|d| d <= limits.max_deadline));
    for key in [&o.idempotency_key, &o.upstream_key].into_iter().flatten() {
        assert!(key.len() <= limits.max_key_len);
    }
    if let Some(retry) = &o.retry {
        assert!(retry
            .max_attempts
            .is_none_or(|n| (1..=limits.max_attempts).contains(&n)));
        for d in [retry.base_delay, retry.max_delay].into_iter().flatten() {
            assert!(d <= limits.max_delay);
        }
        assert!(retry.factor.is_none_or(f64::is_finite));
    }
}

fn check_response(r: &Response, limits: &WireLimits) {
    assert!(r
        .body
        .as_ref()
        .is_none_or(|b| b.len() <= limits.max_body_size));
    check_callback_args(&r.callback_args, limits);
    let again = Response::from_json_with_limits(&r.to_json(), limits)
        .unwrap_or_else(|e| panic!("{e}: {}", r.to_json()));
    assert_eq!(again.to_json(), r.to_json());
}

fn check_task_error(e: &TaskError, limits: &WireLimits) {
    check_callback_args(e.callback_args(), limits);
    if let TaskError::Http(http) = e {
        check_response(&http.response, limits);
    }
    let _ = e.message();
    let _ = e.to_string();
}

/// Every decoder on one value: none may panic; what is accepted keeps to
/// the limits.
fn decode_everything(v: &Value) {
    for limits in [WireLimits::default(), small_limits()] {
        if let Ok(r) = Request::from_json_with_limits(v, &limits) {
            check_request(&r, &limits);
        }
        if let Ok(r) = Response::from_json_with_limits(v, &limits) {
            check_response(&r, &limits);
        }
        if let Ok(e) = TaskError::load_with_limits(v, &limits) {
            check_task_error(&e, &limits);
        }
        if let Ok(e) = HttpError::from_json_with_limits(v, &limits) {
            check_response(&e.response, &limits);
        }
        if let Ok(e) = RequestError::from_json_with_limits(v, &limits) {
            check_callback_args(&e.callback_args, &limits);
        }
        if let Ok(e) = RedirectError::from_json_with_limits(v, &limits) {
            check_callback_args(&e.callback_args, &limits);
            let _ = e.message();
        }
        if let Ok(o) = RequestOptions::from_json_with_limits(v, &limits) {
            check_options(&o, &limits);
        }
        if let Ok(args) = CallbackArgs::from_json_with_limits(v, &limits) {
            check_callback_args(&args, &limits);
        }
        if let Ok(p) = Payload::from_json(v) {
            if let Ok(bytes) = p.decode_with_limits(&limits) {
                assert!(bytes.len() <= limits.max_body_size);
            }
            for ct in [
                None,
                Some("text/plain; charset=utf-16le"),
                Some("text/plain; charset=latin1"),
            ] {
                if let Ok(bytes) = p.decode_for_with_limits(ct, &limits) {
                    assert!(bytes.len() <= limits.max_body_size);
                }
            }
        }
    }
    let _ = Headers::from_json(v);
    assert!(!is_secret_ref(v) || SecretRef::from_json(v).is_ok());
    assert!(!is_storage_ref(v) || StorageRef::from_json(v).is_ok());
    if is_encrypted(v) {
        if let Ok(envelope) = EncryptedEnvelope::from_json(v) {
            let _ = envelope.ciphertext();
        }
    } else {
        assert!(EncryptedEnvelope::from_json(v).is_err());
    }
    if let Ok(args) = CallbackArgs::from_value(v.clone()) {
        check_callback_args(&args, &WireLimits::default());
    }
    let _ = serde_json::from_value::<Request>(v.clone());
    let _ = serde_json::from_value::<TaskError>(v.clone());
}

proptest! {
    #[test]
    fn random_json_never_panics(v in json_value()) {
        decode_everything(&v);
    }

    #[test]
    fn near_valid_requests_are_loaded_within_the_limits(v in mutated(valid_request(), REQUEST_PATHS)) {
        decode_everything(&v);
        if let Some(options) = v.get("options") {
            decode_everything(options);
        }
    }

    #[test]
    fn near_valid_responses_are_loaded_within_the_limits(v in mutated(valid_response(), RESPONSE_PATHS)) {
        decode_everything(&v);
        if let Some(body) = v.get("body") {
            decode_everything(body);
        }
    }

    #[test]
    fn near_valid_errors_are_loaded_within_the_limits(
        base in select(valid_errors()),
        mutations in mutations(ERROR_PATHS),
    ) {
        let mut v = base;
        for (path, value) in mutations {
            set(&mut v, path, value);
        }
        decode_everything(&v);
    }

    #[test]
    fn payloads_decode_within_the_limits(v in payload()) {
        decode_everything(&v);
        let mut response = valid_response();
        response["body"] = v;
        decode_everything(&response);
    }

    #[test]
    fn built_requests_keep_to_the_limits(
        url in prop_oneof![string(), Just("https://u:p@h.example/a".to_owned())],
        headers in collection::vec((string(), string()), 0..12),
        body in proptest::option::of(string()),
        timeout in proptest::option::of((any::<u64>(), 0_u32..1_000_000_000)),
        hedges in collection::vec((0_u64..200_000, 0_u32..1_000_000_000), 0..6),
        deadline in proptest::option::of(any::<u64>()),
        key in proptest::option::of(string()),
        redirects in proptest::option::of(any::<u32>()),
    ) {
        let options = RequestOptions {
            hedge_delays: hedges.into_iter().map(|(s, n)| Duration::new(s, n)).collect(),
            deadline: deadline.map(Duration::from_secs),
            idempotency_key: key,
            ..RequestOptions::default()
        };
        let mut builder = Request::post(&url).request_options(options);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = body {
            builder = builder.body(body);
        }
        if let Some((secs, nanos)) = timeout {
            builder = builder.timeout(Duration::new(secs, nanos));
        }
        if let Some(n) = redirects {
            builder = builder.max_redirects(n);
        }
        for limits in [WireLimits::default(), small_limits()] {
            if let Ok(request) = builder.clone().build_with_limits(&limits) {
                check_request(&request, &limits);
            }
        }
    }
}
