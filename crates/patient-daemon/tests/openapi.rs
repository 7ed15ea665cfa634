//! `openapi.json` lists exactly the routes the server has: every documented
//! operation is served (answers something other than 404/405, with a status
//! the document lists and a body its schema accepts), and nothing else is:
//! other methods on the documented paths answer 405, neighbouring paths 404.

mod common;

use std::collections::BTreeSet;

use common::{get_request, Daemon, Reply};
use patient_testkit::Upstream;
use serde_json::{json, Value};

/// The routes of the server, as `api::router` declares them.
const SERVED: [(&str, &str); 13] = [
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks"),
    ("POST", "/v1/tasks/batch"),
    ("GET", "/v1/tasks/{id}"),
    ("POST", "/v1/tasks/{id}/cancel"),
    ("POST", "/v1/tasks/{id}/redeliver"),
    ("POST", "/v1/tasks/{id}/retry"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/dashboard"),
    ("GET", "/"),
];

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn document() -> Value {
    serde_json::from_str(patient_daemon::OPENAPI).expect("openapi.json is JSON")
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local references: {reference}"));
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} does not resolve"));
            resolve(doc, target)
        }
        None => value,
    }
}

/// Checks `value` against an OpenAPI 3.0 schema (the subset the document
/// uses: `type`, `nullable`, `required`, `properties`,
/// `additionalProperties`, `maxProperties`, `items`, `minItems`,
/// `maxItems`, `enum`, `allOf`, `oneOf`, `anyOf`, `not`, `minimum`,
/// `maximum`, `exclusiveMinimum`, `minLength`, `maxLength`, `pattern`).
fn check_schema(doc: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    if let Some(not) = schema.get("not") {
        let mut e = Vec::new();
        check_schema(doc, not, value, path, &mut e);
        if e.is_empty() {
            errors.push(format!("{path}: fits what `not` refuses: {value}"));
        }
    }
    if let Some(n) = value.as_f64() {
        let exclusive = schema["exclusiveMinimum"] == true;
        if let Some(min) = schema["minimum"].as_f64() {
            if n < min || (exclusive && n == min) {
                errors.push(format!("{path}: {n} is below the minimum {min}"));
            }
        }
        if let Some(max) = schema["maximum"].as_f64() {
            if n > max {
                errors.push(format!("{path}: {n} is above the maximum {max}"));
            }
        }
    }
    if let Some(text) = value.as_str() {
        let chars = text.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| chars < min)
            || schema["maxLength"].as_u64().is_some_and(|max| chars > max)
        {
            errors.push(format!("{path}: {text:?} has the wrong length"));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            let re = regex_automata::meta::Regex::new(pattern)
                .unwrap_or_else(|e| panic!("{path}: bad pattern {pattern}: {e}"));
            if !re.is_match(text) {
                errors.push(format!("{path}: {text:?} does not match {pattern}"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|min| n < min)
            || schema["maxItems"].as_u64().is_some_and(|max| n > max)
        {
            errors.push(format!("{path}: {n} items is out of bounds"));
        }
    }
    if let Some(object) = value.as_object() {
        if schema["maxProperties"]
            .as_u64()
            .is_some_and(|max| object.len() as u64 > max)
        {
            errors.push(format!("{path}: too many properties"));
        }
    }
    for all in schema["allOf"].as_array().into_iter().flatten() {
        check_schema(doc, all, value, path, errors);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            let fits = options.iter().any(|option| {
                let mut e = Vec::new();
                check_schema(doc, option, value, path, &mut e);
                e.is_empty()
            });
            if !fits {
                errors.push(format!("{path}: fits none of {key}: {value}"));
            }
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    let fits_type = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{path}: unknown type {other}"),
    };
    if !fits_type {
        errors.push(format!("{path}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{path}: required {name} is missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, item) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(property) => {
                    check_schema(doc, property, item, &format!("{path}.{name}"), errors)
                }
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{path}: {name} is not a property of the schema"))
                    }
                    Some(extra) if extra.is_object() => {
                        check_schema(doc, extra, item, &format!("{path}.{name}"), errors)
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check_schema(doc, items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Checks a live answer against the document's operation: its status is
/// listed, and a JSON body fits the response's schema.
fn check_answer(doc: &Value, method: &str, path: &str, reply: &Reply) {
    let operation = &doc["paths"][path][method.to_ascii_lowercase()];
    let status = reply.status.to_string();
    let response = operation["responses"]
        .get(&status)
        .or_else(|| operation["responses"].get("default"))
        .unwrap_or_else(|| {
            panic!(
                "{method} {path} answered {status}, which the document does not list: {}",
                reply.text()
            )
        });
    let response = resolve(doc, response);
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(content) = response["content"].as_object() else {
        return;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let media = content.get(essence).unwrap_or_else(|| {
        panic!("{method} {path} {status}: content type {content_type:?} is not documented ({content:?})")
    });
    if essence == "application/json" {
        let mut errors = Vec::new();
        check_schema(doc, &media["schema"], &reply.json(), "body", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} {status} does not fit its schema:\n{}\n{}",
            errors.join("\n"),
            reply.text()
        );
    }
}

#[test]
fn the_document_lists_exactly_the_served_routes() {
    let doc = document();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document"
    );
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if ["parameters", "summary", "description", "servers"].contains(&method.as_str()) {
                continue;
            }
            assert!(
                operation["responses"].is_object(),
                "{method} {path} has responses"
            );
            documented.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );

    // Every reference in the document resolves.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        assert!(
            doc.pointer(r.trim_start_matches('#')).is_some(),
            "{r} does not resolve"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_documented_operation_is_served_as_documented_and_nothing_else_is() {
    let doc = document();
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[("PATIENT_API_TOKEN", "token-for-the-document")]).await;

    // Tasks in the states the operations need.
    let failed = daemon
        .submit(&json!({"request": {"http_method": "get", "url": upstream.url("/status/404")},
                        "raise_error_responses": true, "callback": "Cb", "callback_args": {"a": [1]}}))
        .await;
    let failed = failed["id"].as_str().unwrap().to_owned();
    daemon.wait_finished(&failed).await;
    let waiting = daemon
        .submit(&json!({"request": {"http_method": "get", "url": upstream.url("/fast")}, "delay": 3600}))
        .await;
    let waiting = waiting["id"].as_str().unwrap().to_owned();

    let submit = get_request(&upstream.url("/fast"));
    let mut answered = BTreeSet::new();
    for (method, path) in SERVED {
        let (concrete, body) = match (method, path) {
            ("POST", "/v1/tasks") => (path.to_owned(), Some(submit.clone())),
            ("POST", "/v1/tasks/batch") => {
                (path.to_owned(), Some(json!({"tasks": [submit, submit]})))
            }
            ("POST", "/v1/tasks/{id}/cancel") => (format!("/v1/tasks/{waiting}/cancel"), None),
            ("POST", "/v1/tasks/{id}/retry") => (format!("/v1/tasks/{failed}/retry"), None),
            (_, p) if p.contains("{id}") => (p.replace("{id}", &failed), None),
            _ => (path.to_owned(), None),
        };
        let reply = daemon.call(method, &concrete, body.as_ref()).await;
        assert!(
            ![404, 405].contains(&reply.status),
            "{method} {path} is served: {} {}",
            reply.status,
            reply.text()
        );
        check_answer(&doc, method, path, &reply);
        answered.insert(reply.status);
    }
    assert!(answered.contains(&201) && answered.contains(&200));

    // The schema check is not a formality: a task with a state the
    // document does not name, or without its id, does not fit.
    let task = daemon.task(&failed).await;
    let schema = json!({"$ref": "#/components/schemas/Task"});
    let mut errors = Vec::new();
    check_schema(&doc, &schema, &task, "task", &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    for broken in [
        {
            let mut t = task.clone();
            t["state"] = json!("lost");
            t
        },
        {
            let mut t = task.clone();
            t.as_object_mut().unwrap().remove("id");
            t
        },
        {
            let mut t = task.clone();
            t["attempts"] = json!("none");
            t
        },
    ] {
        let mut errors = Vec::new();
        check_schema(&doc, &schema, &broken, "task", &mut errors);
        assert!(!errors.is_empty(), "{broken}");
    }

    // Error answers fit the document too (the retried task has failed
    // again first).
    daemon.wait_finished(&failed).await;
    for (method, path, concrete, body) in [
        (
            "POST",
            "/v1/tasks",
            "/v1/tasks".to_owned(),
            Some(json!({"request": {"url": 1}})),
        ),
        (
            "POST",
            "/v1/tasks/batch",
            "/v1/tasks/batch".to_owned(),
            Some(json!({"tasks": []})),
        ),
        ("GET", "/v1/tasks", "/v1/tasks?limit=0".to_owned(), None),
        (
            "GET",
            "/v1/tasks/{id}",
            "/v1/tasks/tsk_00000000000000000000000000000000".to_owned(),
            None,
        ),
        (
            "POST",
            "/v1/tasks/{id}/cancel",
            format!("/v1/tasks/{failed}/cancel"),
            None,
        ),
        (
            "POST",
            "/v1/tasks/{id}/redeliver",
            format!("/v1/tasks/{failed}/redeliver"),
            None,
        ),
    ] {
        let reply = daemon.call(method, &concrete, body.as_ref()).await;
        assert!(reply.status >= 400, "{method} {concrete}: {}", reply.text());
        check_answer(&doc, method, path, &reply);
    }
    let unauthorized = common::call("GET", &format!("{}/v1/tasks", daemon.url), &[], None).await;
    check_answer(&doc, "GET", "/v1/tasks", &unauthorized);

    // Nothing undocumented: other methods on documented paths are 405...
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", &failed);
        for method in METHODS {
            if item.get(method.to_ascii_lowercase()).is_some() {
                continue;
            }
            let reply = daemon.call(method, &concrete, None).await;
            assert_eq!(
                reply.status,
                405,
                "{method} {path} is not documented, so not served: {}",
                reply.text()
            );
        }
    }
    // ... and neighbouring paths are 404.
    for path in [
        "/v1",
        "/v1/",
        "/v1/tasks/",
        format!("/v1/tasks/{failed}/").as_str(),
        format!("/v1/tasks/{failed}/outcome").as_str(),
        "/v1/tasks/batch/1",
        "/v1/task",
        "/v2/tasks",
        "/healthz/x",
        "/metrics.json",
        "/openapi.yaml",
    ] {
        for method in ["GET", "POST"] {
            let reply = daemon.call(method, path, None).await;
            assert_eq!(
                reply.status,
                404,
                "{method} {path} is not a route: {}",
                reply.text()
            );
            reply.assert_error(404, "not_found");
        }
    }
    daemon.stop().await.unwrap();
}

/// The submit schema describes what the daemon takes: bodies it accepts fit
/// the document (a body is a wire Payload, not a string; options, retry
/// options and secret parameters have their fields), and what the document
/// refuses the daemon refuses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_submit_schema_matches_what_the_daemon_accepts_and_refuses() {
    let doc = document();
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[
        ("PATIENT_SECRETS__KEY__ENV", "PATH"),
        ("PATIENT_SECRETS__KEY__HOSTS", "127.0.0.1"),
    ])
    .await;
    let schema = json!({"$ref": "#/components/schemas/Submit"});
    let fits = |body: &Value| {
        let mut errors = Vec::new();
        check_schema(&doc, &schema, body, "submit", &mut errors);
        errors
    };
    let accepted = [
        json!({"request": {"http_method": "post", "url": upstream.url("/echo"),
            "headers": {"content-type": "text/plain", "authorization": {"$secret": "key"}},
            "body": {"encoding": "text", "value": "hi", "charset": "UTF-8"},
            "timeout": 5, "max_redirects": 3,
            "options": {"deadline": 60, "priority": "high", "deadline_mode": "split",
                        "retry": {"max_attempts": 2, "base_delay": 0.1, "factor": 2,
                                  "max_delay": 1, "statuses": [503], "retry_unsafe": true}}},
            "callback": "Cb", "callback_args": {"a": 1}, "idempotency_key": "k-1"}),
        json!({"request": {"http_method": "put", "url": upstream.url("/echo"),
            "body": {"encoding": "binary", "value": "AAEC", "charset": "ASCII-8BIT"},
            "secret_params": {"k": {"$secret": "key"}}},
            "delay": 3600, "deliver": {"webhook": {"url": upstream.url("/hook")}}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast"), "body": null,
            "timeout": null, "options": null}, "deliver": null}),
    ];
    for body in &accepted {
        assert_eq!(fits(body), Vec::<String>::new(), "{body}");
        let reply = daemon.post("/v1/tasks", body).await;
        assert_eq!(reply.status, 201, "{body}: {}", reply.text());
    }
    let refused = [
        // A body is a Payload object.
        json!({"request": {"http_method": "post", "url": upstream.url("/echo"), "body": "hi"}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast"), "optoins": {}}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast"),
            "options": {"retry": {"max_attempts": 0}}}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast"),
            "options": {"priority": "urgent"}}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast"), "timeout": -1}}),
        json!({"request": {"http_method": "get", "url": "ftp://127.0.0.1/x"}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
            "deliver": {"redis": {"list": "a", "stream": "b"}}}),
        json!({"request": {"http_method": "get", "url": upstream.url("/fast")},
            "delay": 1, "not_before": "2030-01-01T00:00:00Z"}),
    ];
    for body in &refused {
        assert!(!fits(body).is_empty(), "the document refuses {body}");
        let reply = daemon.post("/v1/tasks", body).await;
        assert!(
            [400, 422].contains(&reply.status),
            "the daemon refuses {body}: {}",
            reply.text()
        );
    }
    // A cursor that the documented pattern refuses is refused.
    let reply = daemon.get("/v1/tasks?cursor=nonsense").await;
    reply.assert_error(422, "invalid_request");
    daemon.stop().await.unwrap();
}

/// The names the document lists are the typed contract's (`patient-api`),
/// which the daemon writes and `patient-client` reads: error codes, task
/// states, delivery states and channels.
#[test]
fn the_documents_names_are_the_typed_contracts() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let names = |value: &Value| -> Vec<String> {
        let mut names: Vec<String> = value["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("an enum: {value}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let sorted = |list: &[&str]| -> Vec<String> {
        let mut list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        list.sort();
        list
    };
    assert_eq!(
        names(&schemas["Error"]["properties"]["error"]["properties"]["code"]),
        sorted(&patient_api::code::ALL),
        "error codes"
    );
    assert_eq!(
        names(&schemas["State"]),
        sorted(&patient_api::TaskState::NAMES),
        "task states"
    );
    let delivery = resolve(&doc, &schemas["Task"]["properties"]["delivery"]);
    for (field, expected) in [
        ("state", ["pending", "delivered", "failed", "none"]),
        ("channel", ["webhook", "redis", "sidekiq", "none"]),
    ] {
        let listed = names(resolve(&doc, &delivery["properties"][field]));
        for name in expected {
            let parsed = match field {
                "state" => serde_json::from_value::<patient_api::DeliveryState>(Value::from(name))
                    .map(|s| s.as_str().to_owned()),
                _ => serde_json::from_value::<patient_api::DeliveryChannel>(Value::from(name))
                    .map(|c| c.as_str().to_owned()),
            };
            assert_eq!(parsed.unwrap(), name);
        }
        assert_eq!(listed, sorted(&expected), "delivery {field}");
    }
}
