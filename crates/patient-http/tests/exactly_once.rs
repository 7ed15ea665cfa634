//! Stress: thousands of tasks against an upstream with mixed delays and faults,
//! the processor stopped at random moments (seeded), many iterations. Every
//! accepted task ends in exactly one of on_complete, on_error or retry; every
//! refused task comes back to the caller. Handlers panic now and then.
//!
//! Part of the mix is hostile wire input: tasks built from mutated Request
//! JSON (huge, negative, NaN or mistyped timeouts and deadlines, huge header
//! counts and values, bad methods, URLs and options). What the wire layer
//! rejects never becomes a task and is counted as refused at build; the rest
//! goes through the processor like any other task.
//!
//! `PATIENT_STRESS_ITERATIONS` and `PATIENT_STRESS_SEED` change the run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use patient_http::{
    preprocess::PreparedRequest, Config, Processor, Request, Response, Task, TaskError, TaskHandler,
};
use patient_testkit::{Fault, Upstream};
use serde_json::{json, Value};

#[derive(Default)]
struct Tally {
    seen: HashMap<String, Vec<&'static str>>,
}

struct Recording {
    tally: Arc<Mutex<Tally>>,
    panic_every: u64,
    calls: std::sync::atomic::AtomicU64,
}

impl Recording {
    fn record(&self, id: &str, kind: &'static str) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .entry(id.to_owned())
            .or_default()
            .push(kind);
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.panic_every > 0 && n.is_multiple_of(self.panic_every) {
            panic!("handler panic (deliberate, after recording)");
        }
    }
}

impl TaskHandler for Recording {
    fn on_complete(&self, response: Response, _: &str) {
        self.record(&response.request_id, "complete");
    }
    fn on_error(&self, error: TaskError, _: &str) {
        self.record(error.request_id(), "error");
    }
    fn retry(&self, task: Task) {
        self.record(&task.id, "retry");
    }
}

fn pick_url(up: &Upstream, rng: &mut fastrand::Rng) -> (String, Option<Duration>) {
    match rng.u32(0..100) {
        0..=29 => (up.url("/fast"), None),
        30..=59 => (up.url(&format!("/delay?ms={}", rng.u32(0..400))), None),
        60..=64 => (up.url("/status/500"), None),
        65..=69 => (up.url("/redirect/2"), None),
        70..=74 => (up.fault_url(Fault::ResetMidBody), None),
        75..=79 => (up.fault_url(Fault::CloseBeforeHeaders), None),
        80..=84 => (up.fault_url(Fault::ShortBody), None),
        85..=89 => (
            up.url("/delay?ms=1000"),
            Some(Duration::from_millis(rng.u64(10..200))),
        ),
        _ => ("http://127.0.0.1:1/".to_owned(), None),
    }
}

/// Where a task of the mix comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Built with the request builder: faults come from the upstream.
    Plain,
    /// Built from mutated wire JSON.
    Hostile,
    /// Names a preprocessor that panics: the engine itself panics
    /// mid-request, and the task must end in `on_error` (class `Panic`),
    /// never in `retry` unless a stop came first.
    EnginePanic,
}

fn pick_kind(rng: &mut fastrand::Rng) -> Kind {
    match rng.u32(0..100) {
        0..=59 => Kind::Plain,
        60..=89 => Kind::Hostile,
        _ => Kind::EnginePanic,
    }
}

/// One task of the mix, or the reason the wire layer refused to build it.
fn make_task(up: &Upstream, rng: &mut fastrand::Rng) -> (Kind, Result<Task, String>) {
    let kind = pick_kind(rng);
    let task = match kind {
        Kind::Plain => {
            let (url, timeout) = pick_url(up, rng);
            let mut b = Request::get(url);
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            Ok(Task::new(b.build().unwrap(), "Stress"))
        }
        Kind::Hostile => hostile_task(up, rng),
        Kind::EnginePanic => {
            let (url, _) = pick_url(up, rng);
            let request = Request::get(url).preprocessor("explode").build().unwrap();
            Ok(Task::new(request, "Stress"))
        }
    };
    (kind, task)
}

/// Seconds as hostile input: out of range, negative, zero, tiny, huge, or not
/// a number at all.
fn hostile_seconds(rng: &mut fastrand::Rng) -> Value {
    match rng.u32(0..16) {
        0 => json!(1e300),
        1 => json!(f64::MAX),
        2 => json!(1.9e19),
        3 => json!(9.3e18),
        4 => json!(1e12),
        5 => json!(-1),
        6 => json!(-1e-9),
        7 => json!(0),
        8 => json!(-0.0),
        9 => json!(1e-9),
        10 => json!(5e-324),
        11 => json!(u64::MAX),
        12 => json!("30"),
        13 => json!(true),
        14 => json!([1]),
        _ => json!(rng.f64() * 0.5),
    }
}

/// A request built from its wire JSON after one hostile mutation.
fn hostile_task(up: &Upstream, rng: &mut fastrand::Rng) -> Result<Task, String> {
    let (url, _) = pick_url(up, rng);
    let mut v = Request::get(url).build().unwrap().to_json();
    // Some mutations only exist as JSON text (JSON has no NaN or infinity).
    let mut text = None;
    match rng.u32(0..14) {
        0 => v["timeout"] = hostile_seconds(rng),
        1 => {
            let bad = ["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400"];
            v["timeout"] = json!("@");
            text = Some(v.to_string().replace("\"@\"", bad[rng.usize(..bad.len())]));
        }
        2 => {
            let headers: serde_json::Map<String, Value> = (0..rng.usize(50..3000))
                .map(|i| (format!("x-h{i}"), json!(format!("v{i}"))))
                .collect();
            v["headers"] = Value::Object(headers);
        }
        3 => v["headers"] = json!({"x-big": "v".repeat(rng.usize(16_000..128_000))}),
        4 => {
            let bad = [
                json!({"bad name": "v"}),
                json!({"": "v"}),
                json!({"x-ctl": "a\r\nInjected: 1"}),
                json!({"x-nul": "a\u{0}b"}),
                json!({"x-num": 42}),
                json!({"x-null": null}),
                json!({"x-secret": {"$secret": ""}}),
                json!({"x-secret": {"$secret": "never-registered"}}),
                json!({"x-secret": {"$secret": 7}}),
                json!("not an object"),
            ];
            v["headers"] = bad[rng.usize(..bad.len())].clone();
        }
        5 => {
            let bad = [
                json!(u32::MAX),
                json!(u64::MAX),
                json!(-1),
                json!(1.5),
                json!("3"),
            ];
            v["max_redirects"] = bad[rng.usize(..bad.len())].clone();
        }
        6 => {
            let modes = [
                json!("propagate"),
                json!("strict"),
                json!("bogus"),
                json!(1),
            ];
            v["options"] = json!({
                "deadline": hostile_seconds(rng),
                "deadline_mode": modes[rng.usize(..modes.len())].clone(),
            });
        }
        7 => {
            let delays: Vec<Value> = (0..rng.usize(1..5)).map(|_| hostile_seconds(rng)).collect();
            v["options"] = json!({"strategy": "hedged", "hedge_delays": delays});
        }
        8 => {
            let attempts = [json!(0), json!(1), json!(100), json!(101), json!(u64::MAX)];
            v["options"] = json!({"retry": {
                "max_attempts": attempts[rng.usize(..attempts.len())].clone(),
                "base_delay": hostile_seconds(rng),
                "max_delay": hostile_seconds(rng),
                "factor": hostile_seconds(rng),
            }});
        }
        9 => {
            let bad = [
                json!("high"),
                json!("urgent"),
                json!(""),
                json!(3),
                json!(null),
            ];
            v["options"] = json!({"priority": bad[rng.usize(..bad.len())].clone()});
        }
        10 => {
            let bad = [
                ("GET", Value::Null),
                ("trace", Value::Null),
                (
                    "get",
                    json!({"encoding": "text", "value": "x", "charset": "UTF-8"}),
                ),
                (
                    "post",
                    json!({"encoding": "binary", "value": "!!not base64"}),
                ),
                ("post", json!({"encoding": "gzipped", "value": "AAAA"})),
                ("post", json!({"encoding": "zstd", "value": "x"})),
            ];
            let (method, body) = bad[rng.usize(..bad.len())].clone();
            v["http_method"] = json!(method);
            v["body"] = body;
        }
        11 => {
            let long = format!("{}/{}", up.url("/fast"), "a".repeat(64 * 1024));
            let bad = [
                json!(""),
                json!("not a url"),
                json!("ftp://127.0.0.1/"),
                json!("http://"),
                json!("http://[::1"),
                json!("http://127.0.0.1:99999/"),
                json!(long),
                json!(null),
            ];
            v["url"] = bad[rng.usize(..bad.len())].clone();
        }
        12 => {
            let bad = [
                json!(null),
                json!([]),
                json!("request"),
                json!(42),
                json!({}),
            ];
            v = bad[rng.usize(..bad.len())].clone();
        }
        _ => v["unexpected"] = json!({"nested": [1, {"deeper": null}]}),
    }
    let v = match text {
        Some(text) => serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())?,
        None => v,
    };
    let request = Request::from_json(&v).map_err(|e| e.to_string())?;
    Ok(Task::new(request, "Hostile"))
}

#[test]
fn every_task_ends_in_exactly_one_outcome() {
    // The handler's deliberate panics are expected: keep them off the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let deliberate = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|m| m.contains("deliberate"));
        if !deliberate {
            default_hook(info);
        }
    }));
    let iterations: u64 = std::env::var("PATIENT_STRESS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let seed: u64 = std::env::var("PATIENT_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start()).unwrap();

    let mut totals: HashMap<&'static str, u64> = HashMap::new();
    let mut accepted_total = 0u64;
    let mut hostile_accepted_total = 0u64;
    let mut refused_total = 0u64;
    let mut refused_at_build_total = 0u64;
    let mut engine_panic_errors_total = 0u64;
    for iteration in 0..iterations {
        let mut rng = fastrand::Rng::with_seed(seed ^ iteration.wrapping_mul(0x9e37_79b9));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let config = Config::builder()
            .max_connections(rng.usize(50..2000))
            .worker_threads(rng.usize(1..3))
            .build()
            .unwrap();
        let processor = Processor::builder()
            .config(config)
            .preprocessor("explode", |_: &mut PreparedRequest| -> Result<(), String> {
                panic!("deliberate engine panic")
            })
            .build(Recording {
                tally: tally.clone(),
                panic_every: 37,
                calls: Default::default(),
            })
            .unwrap();
        processor.start().unwrap();

        let per_thread = rng.usize(50..150);
        let stop_after = Duration::from_millis(rng.u64(0..600));
        let stop_timeout = Duration::from_millis(rng.u64(0..150));
        let thread_seeds: Vec<u64> = (0..4).map(|_| rng.u64(..)).collect();
        let (accepted, refused, refused_at_build, hostile_accepted, panicking) =
            std::thread::scope(|s| {
                let handles: Vec<_> = thread_seeds
                    .iter()
                    .map(|&ts| {
                        let p = processor.clone();
                        let up = &up;
                        s.spawn(move || {
                            let mut rng = fastrand::Rng::with_seed(ts);
                            let mut accepted = Vec::new();
                            let mut refused = 0u64;
                            let mut refused_at_build = 0u64;
                            let mut hostile_accepted = 0u64;
                            let mut panicking = Vec::new();
                            for _ in 0..per_thread {
                                let (kind, task) = make_task(up, &mut rng);
                                let Ok(task) = task else {
                                    // Never a task: nothing to have an outcome.
                                    refused_at_build += 1;
                                    continue;
                                };
                                let id = task.id.clone();
                                match p.enqueue(task) {
                                    Ok(()) => {
                                        if kind == Kind::EnginePanic {
                                            panicking.push(id.clone());
                                        }
                                        accepted.push(id);
                                        hostile_accepted += u64::from(kind == Kind::Hostile);
                                    }
                                    Err(e) => {
                                        // Nothing is lost: the task comes back.
                                        assert_eq!(e.task().id, id);
                                        refused += 1;
                                    }
                                }
                                if rng.u32(0..10) == 0 {
                                    std::thread::sleep(Duration::from_millis(rng.u64(0..5)));
                                }
                            }
                            (
                                accepted,
                                refused,
                                refused_at_build,
                                hostile_accepted,
                                panicking,
                            )
                        })
                    })
                    .collect();
                std::thread::sleep(stop_after);
                processor.stop(Some(stop_timeout));
                let mut accepted = Vec::new();
                let mut panicking = Vec::new();
                let (mut refused, mut refused_at_build, mut hostile_accepted) = (0, 0, 0);
                for h in handles {
                    let (a, r, b, h, p) = h.join().unwrap();
                    accepted.extend(a);
                    refused += r;
                    refused_at_build += b;
                    hostile_accepted += h;
                    panicking.extend(p);
                }
                (
                    accepted,
                    refused,
                    refused_at_build,
                    hostile_accepted,
                    panicking,
                )
            });

        let tally = tally.lock().unwrap();
        for id in &accepted {
            let kinds = tally.seen.get(id).map(Vec::as_slice).unwrap_or(&[]);
            assert_eq!(
                kinds.len(),
                1,
                "iteration {iteration}: task {id} had outcomes {kinds:?}"
            );
            *totals.entry(kinds[0]).or_default() += 1;
        }
        assert_eq!(
            tally.seen.len(),
            accepted.len(),
            "iteration {iteration}: outcomes for tasks never accepted"
        );
        // A task whose engine code panicked failed; it is handed to `retry`
        // only when the stop came before it ran.
        let mut panic_errors = 0u64;
        for id in &panicking {
            match tally.seen[id][0] {
                "error" => panic_errors += 1,
                "retry" => {}
                other => panic!("iteration {iteration}: engine panic task {id} ended in {other}"),
            }
        }
        engine_panic_errors_total += panic_errors;
        let counts = processor.counts();
        assert!(counts.panics >= panic_errors);
        assert_eq!(counts.pending, 0);
        assert_eq!(counts.total(), accepted.len() as u64);
        accepted_total += accepted.len() as u64;
        hostile_accepted_total += hostile_accepted;
        refused_total += refused;
        refused_at_build_total += refused_at_build;
    }
    println!(
        "exactly_once: iterations={iterations} seed={seed} accepted={accepted_total} \
         (hostile {hostile_accepted_total}) refused={refused_total} \
         refused_at_build={refused_at_build_total} engine_panics={engine_panic_errors_total} \
         complete={} error={} retry={}",
        totals.get("complete").unwrap_or(&0),
        totals.get("error").unwrap_or(&0),
        totals.get("retry").unwrap_or(&0),
    );
    assert!(
        accepted_total > 1000,
        "the run must exercise thousands of tasks"
    );
    assert!(
        engine_panic_errors_total > 0,
        "engine panics must reach the processor and end as errors"
    );
    assert!(
        hostile_accepted_total > 0 && refused_at_build_total > 0,
        "the hostile mix must reach the processor and the wire layer's refusals"
    );
}
