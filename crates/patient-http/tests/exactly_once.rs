//! Stress: thousands of tasks against an upstream with mixed delays and faults,
//! the processor stopped at random moments (seeded), many iterations. Every
//! accepted task ends in exactly one of on_complete, on_error or retry; every
//! refused task comes back to the caller. Handlers panic now and then.
//!
//! `PATIENT_STRESS_ITERATIONS` and `PATIENT_STRESS_SEED` change the run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use patient_http::{Config, Processor, Request, Response, Task, TaskError, TaskHandler};
use patient_testkit::{Fault, Upstream};

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
        if self.panic_every > 0 && n % self.panic_every == 0 {
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
    let mut refused_total = 0u64;
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
        let (accepted, refused) = std::thread::scope(|s| {
            let handles: Vec<_> = thread_seeds
                .iter()
                .map(|&ts| {
                    let p = processor.clone();
                    let up = &up;
                    s.spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(ts);
                        let mut accepted = Vec::new();
                        let mut refused = 0u64;
                        for _ in 0..per_thread {
                            let (url, timeout) = pick_url(up, &mut rng);
                            let mut b = Request::get(url);
                            if let Some(t) = timeout {
                                b = b.timeout(t);
                            }
                            let task = Task::new(b.build().unwrap(), "Stress");
                            let id = task.id.clone();
                            match p.enqueue(task) {
                                Ok(()) => accepted.push(id),
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
                        (accepted, refused)
                    })
                })
                .collect();
            std::thread::sleep(stop_after);
            processor.stop(Some(stop_timeout));
            let mut accepted = Vec::new();
            let mut refused = 0;
            for h in handles {
                let (a, r) = h.join().unwrap();
                accepted.extend(a);
                refused += r;
            }
            (accepted, refused)
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
        let counts = processor.counts();
        assert_eq!(counts.pending, 0);
        assert_eq!(counts.total(), accepted.len() as u64);
        accepted_total += accepted.len() as u64;
        refused_total += refused;
    }
    println!(
        "exactly_once: iterations={iterations} seed={seed} accepted={accepted_total} refused={refused_total} \
         complete={} error={} retry={}",
        totals.get("complete").unwrap_or(&0),
        totals.get("error").unwrap_or(&0),
        totals.get("retry").unwrap_or(&0),
    );
    assert!(
        accepted_total > 1000,
        "the run must exercise thousands of tasks"
    );
}
