//! The engine's request planning driven with arbitrary request JSON: every
//! request the wire layer accepts is planned and stepped through the engine
//! (retry options, strategies, hedge delays, deadlines, redirects, priority,
//! upstream keys), and none may panic, hang or exceed the limits.
//!
//! The URL is always a closed port on 127.0.0.1 or the loopback test
//! upstream, so nothing leaves the machine. Runs 256 cases by default; set
//! `PROPTEST_CASES` for more.

use std::time::{Duration, SystemTime};

use patient_http::{
    breaker::BreakerPolicy, AwaitableClient, Builder, Decision, LimitWait, Request,
    ResilienceConfig, Task, TaskError, WireLimits,
};
use proptest::{collection, prelude::*, sample::select};
use serde_json::{json, Value};

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        select(vec![
            json!(0),
            json!(-1),
            json!(1e-9),
            json!(0.05),
            json!(1),
            json!(3),
            json!(86_400),
            json!(86_401),
            json!(1.8e19),
            json!(1e308),
            json!(-1e308),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(u32::MAX),
        ]),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        (0u32..10).prop_map(Value::from),
    ]
    .boxed()
}

fn string() -> BoxedStrategy<Value> {
    prop_oneof![
        select(vec![
            "",
            "single",
            "sequential",
            "hedged",
            "split",
            "pass_through",
            "high",
            "low",
            "normal",
            "get",
            "post",
            "\u{0}",
            "é",
            "a\nb",
        ])
        .prop_map(Value::from),
        "[ -~]{0,40}".prop_map(Value::from),
        (0usize..5000).prop_map(|n| Value::from("k".repeat(n))),
    ]
    .boxed()
}

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        number(),
        string(),
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
    ]
    .boxed()
}

fn value() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(3, 40, 8, |inner| {
            prop_oneof![
                collection::vec(inner.clone(), 0..20).prop_map(Value::from),
                collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
}

const PATHS: &[&str] = &[
    "/http_method",
    "/timeout",
    "/max_redirects",
    "/headers/x-a",
    "/headers/idempotency-key",
    "/preprocessors",
    "/options/strategy",
    "/options/hedge_delays",
    "/options/deadline",
    "/options/deadline_mode",
    "/options/priority",
    "/options/idempotency_key",
    "/options/upstream_key",
    "/options/retry/max_attempts",
    "/options/retry/base_delay",
    "/options/retry/factor",
    "/options/retry/max_delay",
    "/options/retry/statuses",
    "/options/retry/retry_unsafe",
];

/// A number of seconds: mostly plausible, sometimes hostile.
fn seconds() -> BoxedStrategy<Value> {
    prop_oneof![3 => (0.0f64..3.0).prop_map(Value::from), 1 => number()].boxed()
}

/// A value of the type `path` expects, with hostile magnitudes.
fn typed(path: &'static str) -> BoxedStrategy<Value> {
    let leaf = path.rsplit('/').next().unwrap_or_default();
    match leaf {
        "timeout" | "deadline" | "base_delay" | "max_delay" | "factor" => seconds(),
        "hedge_delays" => collection::vec(seconds(), 0..14)
            .prop_map(Value::from)
            .boxed(),
        "max_redirects" | "max_attempts" => {
            prop_oneof![3 => (0u32..120).prop_map(Value::from), 1 => number()].boxed()
        }
        "statuses" => collection::vec(prop_oneof![100u32..600, 0u32..100_000], 0..8)
            .prop_map(Value::from)
            .boxed(),
        "retry_unsafe" => any::<bool>().prop_map(Value::from).boxed(),
        "preprocessors" => Just(json!([])).boxed(),
        "http_method" => select(vec![
            "get", "post", "put", "patch", "delete", "head", "options",
        ])
        .prop_map(Value::from)
        .boxed(),
        "strategy" => select(vec!["single", "sequential", "hedged"])
            .prop_map(Value::from)
            .boxed(),
        "deadline_mode" => select(vec!["split", "pass_through"])
            .prop_map(Value::from)
            .boxed(),
        "priority" => select(vec!["high", "normal", "low"])
            .prop_map(Value::from)
            .boxed(),
        _ => string(),
    }
}

fn set(root: &mut Value, pointer: &str, v: Value) {
    let mut node = root;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if !node.is_object() {
            *node = json!({});
        }
        let map = node.as_object_mut().unwrap();
        if i + 1 == parts.len() {
            map.insert((*part).to_owned(), v);
            return;
        }
        node = map.entry((*part).to_owned()).or_insert_with(|| json!({}));
    }
}

fn request_json(url: String) -> BoxedStrategy<Value> {
    let base = json!({
        "http_method": "get",
        "url": url,
        "headers": {},
        "body": null,
        "timeout": 0.5,
        "max_redirects": 2,
        "options": {"strategy": "hedged", "hedge_delays": [0.01], "retry": {"max_attempts": 2}}
    });
    collection::vec(
        select(PATHS).prop_flat_map(|path| {
            prop_oneof![6 => typed(path), 1 => scalar(), 1 => value()].prop_map(move |v| (path, v))
        }),
        0..6,
    )
    .prop_map(move |mutations| {
        let mut v = base.clone();
        for (path, m) in mutations {
            set(&mut v, path, m);
        }
        v
    })
    .boxed()
}

fn client() -> AwaitableClient {
    let breaker = BreakerPolicy::builder()
        .consecutive_failures(Some(3))
        .build()
        .unwrap();
    let resilience = ResilienceConfig::builder()
        .defaults(|p| p.breaker(Some(breaker)))
        .build()
        .unwrap();
    Builder::new()
        .resilience(resilience)
        .build_awaitable()
        .unwrap()
}

fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x", listener.local_addr().unwrap());
    drop(listener);
    url
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn accepted_requests_plan_and_step_without_panicking(v in request_json(closed_port())) {
        let limits = WireLimits::default();
        let Ok(request) = Request::from_json(&v) else { return Ok(()) };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let client = client();
        let task = Task::new(request, "Callback");
        runtime.block_on(async {
            let mut progress = client.progress(&task, SystemTime::now());
            if let Some(deadline) = progress.deadline {
                prop_assert!(deadline <= SystemTime::now() + limits.max_deadline);
            }
            // Step until done, as a durable queue would: waiting out each
            // decision on the paused clock, never for a limit inside a step.
            // Refusals use no attempt; each is followed by an attempt once
            // its time has come (a half-open probe), so they are bounded by
            // the attempts too.
            let mut refusals = 0;
            for _ in 0..2 * (limits.max_attempts + 2) {
                let decision = tokio::time::timeout(
                    Duration::from_secs(3 * 86_400),
                    client.step(&task, &mut progress, LimitWait::UpTo(Duration::ZERO)),
                )
                .await;
                let Ok(decision) = decision else {
                    return Err(TestCaseError::fail("a step did not end"));
                };
                prop_assert!(progress.next_attempt as usize <= 1 + limits.max_attempts as usize + limits.max_hedge_delays);
                match decision {
                    Decision::Done(result) => {
                        if let Err(TaskError::Request(e)) = &result {
                            prop_assert_ne!(e.class_name.as_str(), "Panic", "{}", e.message);
                        }
                        return Ok(());
                    }
                    Decision::Retry { delay, .. } => {
                        prop_assert!(delay <= limits.max_delay.max(Duration::from_secs(60)));
                        tokio::time::sleep(delay).await;
                    }
                    Decision::Refused { retry_in, .. } => {
                        prop_assert!(retry_in <= Duration::from_secs(86_400));
                        refusals += 1;
                        prop_assert!(refusals <= limits.max_attempts + 1, "refused {} times", refusals);
                        tokio::time::sleep(retry_in).await;
                    }
                    _ => {}
                }
            }
            Err(TestCaseError::fail("more steps than attempts"))
        })?;
    }
}
