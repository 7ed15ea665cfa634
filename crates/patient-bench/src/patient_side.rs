//! The measured side: patient's processor with a handler that records each
//! task's enqueue → outcome latency and, in a closed loop, enqueues the next
//! task from `on_complete`.
//!
//! Tasks are numbered `0..n`; the number is the task id, so the handler finds
//! the task's slot in a [`LatencyBook`] from `Response::request_id` alone.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Instant,
};

use patient_http::{EnqueueError, Processor, Request, Response, Task, TaskError, TaskHandler};

use crate::{harness::Completion, stats::LatencyBook};

/// The callback name every benchmark task carries.
pub const CALLBACK: &str = "BenchCallback";

/// A [`TaskHandler`] that counts outcomes and latencies; cheap to clone.
#[derive(Clone)]
pub struct BenchHandler {
    state: Arc<State>,
}

struct State {
    processor: OnceLock<Processor>,
    request: Request,
    n: u64,
    /// Whether each outcome enqueues the next task.
    chain: bool,
    issued: AtomicU64,
    /// Set when no more tasks are to be issued.
    halted: AtomicBool,
    refused: AtomicU64,
    book: LatencyBook,
    completion: Arc<Completion>,
    /// Outcomes other than a 200, by kind (`status_503`, `CircuitOpen`, …).
    other_outcomes: Mutex<BTreeMap<String, u64>>,
}

impl BenchHandler {
    /// A handler for `n` tasks running `request`. With `chain`, every outcome
    /// enqueues the next task until `n` were issued.
    pub fn new(request: Request, n: u64, chain: bool) -> BenchHandler {
        BenchHandler {
            state: Arc::new(State {
                processor: OnceLock::new(),
                request,
                n,
                chain,
                issued: AtomicU64::new(0),
                halted: AtomicBool::new(false),
                refused: AtomicU64::new(0),
                book: LatencyBook::new(n as usize),
                completion: Arc::new(Completion::new(n)),
                other_outcomes: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Connects the handler to the processor it enqueues into. Only the
    /// first call counts.
    pub fn attach(&self, processor: Processor) {
        let _ = self.state.processor.set(processor);
    }

    /// The outcome counter (its target is `n`).
    pub fn completion(&self) -> Arc<Completion> {
        Arc::clone(&self.state.completion)
    }

    /// Enqueues up to `count` more tasks from the calling thread.
    pub fn issue(&self, count: u64) {
        for _ in 0..count {
            if !self.issue_next() {
                break;
            }
        }
    }

    /// Issues no more tasks (call before stopping the processor).
    pub fn halt(&self) {
        self.state.halted.store(true, Ordering::Release);
    }

    /// Task number `seq` with the enqueue instant recorded; hand it to
    /// [`Processor::enqueue`] next, and report a refusal with [`refused`](Self::refused).
    pub fn task(&self, seq: u64) -> Task {
        let task = Task::new(self.state.request.clone(), CALLBACK).with_id(seq.to_string());
        self.state.book.start(seq as usize);
        task
    }

    /// Task `seq` was refused by `enqueue`: it counts as a finished error.
    pub fn refused(&self, seq: u64) {
        self.state.book.forget(seq as usize);
        self.state.refused.fetch_add(1, Ordering::Relaxed);
        self.state.completion.record(false);
    }

    /// Tasks refused by `enqueue` so far.
    pub fn refusals(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }

    /// Latencies of the tasks that had an outcome, in nanoseconds.
    pub fn latencies(&self) -> Vec<u64> {
        self.state.book.latencies()
    }

    /// The zero of [`spans`](Self::spans): when the handler was made.
    pub fn origin(&self) -> Instant {
        self.state.book.origin()
    }

    /// `(enqueue, outcome)` of every task that had an outcome, in
    /// nanoseconds since [`origin`](Self::origin).
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.state.book.spans()
    }

    /// How many outcomes were not a 200, by kind: `status_N` for a response
    /// with another status, the error's class name (`CircuitOpen`,
    /// `DeadlineExceeded`, …) for a request error, `http_error` or
    /// `redirect_error` for the other errors, `retry` for a task handed back.
    pub fn other_outcomes(&self) -> BTreeMap<String, u64> {
        lock(&self.state.other_outcomes).clone()
    }

    fn count_other(&self, kind: String) {
        *lock(&self.state.other_outcomes).entry(kind).or_insert(0) += 1;
    }

    /// Enqueues the next numbered task; false once `n` were issued, after
    /// [`halt`](Self::halt), when the processor is not running or when none
    /// is attached. A task refused at capacity counts as an error and the
    /// next one is tried, so the loop keeps its concurrency.
    fn issue_next(&self) -> bool {
        let Some(processor) = self.state.processor.get() else {
            return false;
        };
        while !self.state.halted.load(Ordering::Acquire) {
            let seq = self.state.issued.fetch_add(1, Ordering::Relaxed);
            if seq >= self.state.n {
                return false;
            }
            match processor.enqueue(self.task(seq)) {
                Ok(()) => return true,
                Err(e) => {
                    self.on_refused(seq, &e);
                    if e.is_not_running() {
                        self.halt();
                    }
                }
            }
        }
        false
    }

    fn on_refused(&self, seq: u64, error: &EnqueueError) {
        if self.state.refused.load(Ordering::Relaxed) == 0 {
            eprintln!("first refused task: {error}");
        }
        self.refused(seq);
    }

    fn finish(&self, id: &str, ok: bool) {
        if let Ok(seq) = id.parse::<usize>() {
            self.state.book.end(seq);
        }
        if self.state.chain {
            self.issue_next();
        }
        self.state.completion.record(ok);
    }
}

impl TaskHandler for BenchHandler {
    fn on_complete(&self, response: Response, _callback: &str) {
        let ok = response.status == 200;
        if !ok {
            self.count_other(format!("status_{}", response.status));
        }
        self.finish(&response.request_id, ok);
    }

    fn on_error(&self, error: TaskError, _callback: &str) {
        self.count_other(match &error {
            TaskError::Request(e) => e.class_name.clone(),
            TaskError::Http(e) => format!("status_{}", e.response.status),
            TaskError::Redirect(_) => "redirect_error".to_owned(),
        });
        self.finish(error.request_id(), false);
    }

    fn retry(&self, task: Task) {
        self.count_other("retry".to_owned());
        self.finish(&task.id, false);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
